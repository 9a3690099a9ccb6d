"""
The lm-eval route: a local multiple-choice task built from a small JSON file,
run offline on a saved MoNE checkpoint through the registered ``mone`` model,
gives the accuracy computed directly from the loaded model's log-likelihoods.
"""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import mone_modifier  # noqa: E402
import mone_modifier.evaluation  # noqa: E402, F401  (registers "mone")
from helpers import run_oneshot  # noqa: E402
from mone_modifier import MoNEPruningModifier  # noqa: E402

TASK = """task: mone_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def documents(samples: torch.Tensor) -> list[dict]:
    """Continue each held-out sequence with its true next four tokens or with
    three other four-token spans."""
    docs = []
    for i, row in enumerate(samples.tolist()):
        words = [f"w{t}" for t in row]
        spans = [words[12:16], words[16:20], words[4:8], words[20:24]]
        label = i % 4
        spans[0], spans[label] = spans[label], spans[0]
        docs.append(
            {
                "context": " ".join(words[:12]),
                "choices": [" " + " ".join(s) for s in spans],
                "label": label,
            }
        )
    return docs


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
    docs = documents(samples)
    data = root / "tasks" / "tiny_choice.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (data.parent / "tiny_choice.yaml").write_text(TASK.format(data=data))
    return root / "checkpoint", data.parent, docs


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_simple_evaluate_matches_direct_loglikelihoods(checkpoint_and_task):
    checkpoint, tasks, docs = checkpoint_and_task
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
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
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
