"""
The lm-eval route: a local multiple-choice task built from a small JSON file,
run offline on a saved MoNE checkpoint (and on one in the MoNE authors'
layout) through the registered ``mone`` model, gives the accuracy computed
directly from the loaded model's log-likelihoods.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import mone_modifier  # noqa: E402
import mone_modifier.evaluation  # noqa: E402, F401  (registers "mone")
from authors_layout import SOURCE_OVERRIDES, authors_checkpoint  # noqa: E402
from helpers import run_oneshot, write_choice_task  # noqa: E402
from mone_modifier import MoNEPruningModifier  # noqa: E402
from mone_modifier.tiny_moe import build_tiny_moe  # noqa: E402


@torch.no_grad()
def direct_accuracy(model, tokenizer, docs: list[dict]) -> float:
    correct = 0
    for doc in docs:
        context = tokenizer(doc["context"]).input_ids
        scores = []
        for choice in doc["choices"]:
            continuation = tokenizer(choice).input_ids
            ids = torch.tensor([context + continuation])
            logprobs = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
            targets = ids[0, 1:]
            token_scores = logprobs.gather(1, targets[:, None])[:, 0]
            scores.append(float(token_scores[-len(continuation) :].sum()))
        correct += int(max(range(4), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


@pytest.fixture(scope="module")
def checkpoint_and_task(tiny_moe, samples, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    run_oneshot(
        tiny_moe("qwen3_moe"),
        samples,
        MoNEPruningModifier(sparsity=0.25),
        output_dir=str(root / "checkpoint"),
    )
    docs = write_choice_task(root / "tasks", samples)
    return root / "checkpoint", root / "tasks", docs


@pytest.fixture(scope="module")
def authors_deepseek_v2(tmp_path_factory) -> Path:
    """A DeepSeek-V2 checkpoint as the MoNE authors' code writes it."""
    root = tmp_path_factory.mktemp("eval-authors")
    source = build_tiny_moe(
        "deepseek_v2", root / "source", **SOURCE_OVERRIDES["deepseek_v2"]
    )
    authors_checkpoint(source, root / "authors")
    AutoTokenizer.from_pretrained(source).save_pretrained(root / "authors")
    return root / "authors"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("layout", ["this package's", "the authors'"])
def test_simple_evaluate_matches_direct_loglikelihoods(
    layout, checkpoint_and_task, authors_deepseek_v2
):
    checkpoint, tasks, docs = checkpoint_and_task
    if layout == "the authors'":
        checkpoint = authors_deepseek_v2
    results = lm_eval.simple_evaluate(
        model="mone",
        model_args=f"pretrained={checkpoint}",
        tasks=["mone_tiny_choice"],
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=1,
    )
    accuracy = results["results"]["mone_tiny_choice"]["acc,none"]

    loaded = mone_modifier.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, config=loaded.config)
    assert accuracy == pytest.approx(direct_accuracy(loaded, tokenizer, docs))


def test_command_line(checkpoint_and_task, tmp_path):
    checkpoint, tasks, docs = checkpoint_and_task
    command = [sys.executable, "-m", "mone_modifier.evaluation"]
    command += ["--model", "mone", "--model_args", f"pretrained={checkpoint}"]
    command += ["--tasks", "mone_tiny_choice", "--include_path", str(tasks)]
    command += ["--device", "cpu", "--output_path", str(tmp_path / "results")]
    subprocess.run(command, check=True, capture_output=True, text=True)
    (result_file,) = (tmp_path / "results").rglob("results_*.json")
    accuracy = json.loads(result_file.read_text())["results"]["mone_tiny_choice"]
    loaded = mone_modifier.from_pretrained(checkpoint)
    expected = direct_accuracy(loaded, AutoTokenizer.from_pretrained(checkpoint), docs)
    assert accuracy["acc,none"] == pytest.approx(expected)
