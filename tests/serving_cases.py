"""
Everything the serving tests compare, prepared in one background process so
that it runs while the rest of the suite does (conftest starts it once
collection has selected a serving test; ``tests/test_serving.py`` waits for
it and asserts).

usage: python serving_cases.py DIRECTORY

This environment prunes tiny models of each family through oneshot, saves
them (both novice layouts) and computes greedy references with transformers
(``mone_modifier.from_pretrained``). The serving environment (vLLM 0.32 CPU,
mone-vllm, no llm-compressor; ``packages/mone-vllm/install-serving-env.sh``)
serves the same checkpoints in float32, with the plugin and without it.
DIRECTORY gets the checkpoints, ``cases.json`` (checkpoint paths, references,
served results) and ``bench/`` (``benchmarks/serving.py --quick``).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mone_modifier
from conftest import NUM_SAMPLES, SEQ_LEN
from helpers import BENCHMARKS, run_oneshot, to_expert_substitution
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import build_tiny_moe, calibration_ids

# benchmarks/ holds scripts, not a package
sys.path.insert(0, str(BENCHMARKS))
import serving as serving_benchmark  # noqa: E402

REPO = Path(__file__).parent.parent
SERVE = Path(__file__).parent / "serve_in_vllm.py"
PROMPT = [5, 17, 33, 2, 9, 61]
NEW_TOKENS = 32

# vLLM's CPU backend wants head_dim in {32, 64, ...} and hidden_size a
# multiple of 32
SERVABLE = {
    "olmoe": dict(hidden_size=128),
    "qwen3_moe": dict(hidden_size=128, head_dim=32),
    "qwen2_moe": dict(hidden_size=128),
    "mixtral": dict(hidden_size=128),
    "gpt_oss": dict(hidden_size=128, head_dim=32),
}
FAMILIES = list(SERVABLE)
# vLLM's CPU MLA kernel takes kv_lora_rank + qk_rope_head_dim = 576 only;
# DeepSeek-V3's own routing fields, which vLLM reads and transformers' config
# lacks
DEEPSEEK_V3 = dict(
    hidden_size=128,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=32,
    v_head_dim=32,
    head_dim=64,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
)


def serve(python: Path, jobs: dict, directory: Path, **env) -> dict:
    """Run ``jobs`` in the serving environment; their results by name."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run(
        [str(python), str(SERVE), "jobs.json", "results.json"],
        cwd=directory,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads((directory / "results.json").read_text())


@torch.no_grad()
def greedy(model) -> dict:
    """Greedy tokens and their log-probabilities, computed step by step."""
    ids = torch.tensor([PROMPT])
    tokens, logprobs = [], []
    for _ in range(NEW_TOKENS):
        logits = model(input_ids=ids).logits[0, -1].double()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return {"tokens": tokens, "logprobs": logprobs}


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


def silence_experts(source: Path, novices: dict, out: Path) -> Path:
    """A copy of an unpruned checkpoint (per-expert tensors) whose experts
    named in ``novices`` output zero: a stock model that routes like the
    pruned one and gets nothing from its novices."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    for layer, ids in novices.items():
        for expert in ids:
            name = f"model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def build_checkpoints(root: Path, samples: torch.Tensor) -> dict:
    """name -> {"path", "reference" (transformers' greedy result or None)}."""
    out = {}
    for family in FAMILIES:
        source = build_tiny_moe(family, root / f"{family}-source", **SERVABLE[family])
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
        out[f"{family}-zero"] = (root / f"{family}-zero", reference)

    source = build_tiny_moe("deepseek_v3", root / "deepseek_v3-source", **DEEPSEEK_V3)
    zero = MoNEPruningModifier(sparsity=0.25, novice="zero")
    model = run_oneshot(source, samples, zero)
    path = save(model, source, root / "deepseek_v3-zero")
    out["deepseek_v3-zero"] = (path, None)
    out["deepseek_v3-silent"] = (
        silence_experts(source, model.config.approximate_experts, root / "silent"),
        None,
    )

    source = root / "olmoe-source"
    model = run_oneshot(
        source, samples, MoNEPruningModifier(sparsity=0.25, stock_architectures=True)
    )
    out["olmoe-stock-names"] = (save(model, source, root / "olmoe-stock-names"), None)
    drop = MoNEPruningModifier(sparsity=0.25, novice="drop")
    path = save(run_oneshot(source, samples, drop), source, root / "olmoe-drop")
    out["olmoe-drop"] = (path, greedy(AutoModelForCausalLM.from_pretrained(path)))
    return {name: {"path": str(p), "reference": r} for name, (p, r) in out.items()}


def jobs(checkpoints: dict, names) -> dict:
    return {
        name: {
            "path": checkpoints[name]["path"],
            "prompt": PROMPT,
            "max_tokens": NEW_TOKENS,
        }
        for name in names
    }


def main(directory: str):
    root = Path(directory)
    python = serving_benchmark.serving_python()
    samples = calibration_ids(NUM_SAMPLES, SEQ_LEN)
    checkpoints = build_checkpoints(root, samples)
    plugin_names = [n for n in checkpoints if n != "olmoe-stock-names"]
    expert_parallel = jobs(checkpoints, ["olmoe-approximate_experts"])
    expert_parallel["olmoe-approximate_experts"]["engine"] = {
        "enable_expert_parallel": True
    }
    cases = {
        "serving_python": str(python),
        "checkpoints": checkpoints,
        "with_plugin": serve(
            python, jobs(checkpoints, plugin_names), root / "with-plugin"
        ),
        # VLLM_PLUGINS names no plugin that exists: stock vLLM
        "stock": serve(
            python,
            jobs(
                checkpoints,
                ["olmoe-approximate_experts", "olmoe-stock-names", "olmoe-drop"],
            ),
            root / "stock",
            VLLM_PLUGINS="none",
        ),
        "expert_parallel": serve(python, expert_parallel, root / "expert-parallel"),
    }
    (root / "cases.json").write_text(json.dumps(cases))
    serving_benchmark.main(["--quick", "--out", str(root / "bench")])


if __name__ == "__main__":
    main(*sys.argv[1:])
