"""
Serving throughput and memory of MoNE checkpoints in vLLM (with the mone-vllm
plugin), as ratios against the unpruned model and against dropping the same
experts, all served by the same engine in one run.

    python benchmarks/serving.py [--quick] [--out benchmarks/results]

Builds an OLMoE-style MoE (random weights; sizes below), calibrates on Python
standard-library text, and saves MoNE 25% / 50% (novices) and drop 25% / 50%
(the same experts removed, router shrunk: REAP's serving shape) checkpoints.
The serving environment (``packages/mone-vllm/install-serving-env.sh``,
``$MONE_SERVING_VENV`` or ``.venv-serving``) then generates from each, offline
(``LLM.generate``, float32, greedy, fixed prompts of held-out text): tokens/s
as the median over rounds of per-round ratios against the unpruned model,
bytes of weights vLLM holds, and the KV-cache capacity vLLM reports. On the
CPU backend the KV cache is a fixed size (``VLLM_CPU_KVCACHE_SPACE``); on a
GPU, vLLM sizes it from the memory the weights leave free, which is where a
smaller model buys cache.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

from loguru import logger
from pruned_checkpoints import calibrate

from mone_modifier import MoNEPruningModifier
from mone_modifier.demo import stdlib_text
from mone_modifier.tiny_moe import build_tiny_moe, train_tokenizer

REPO = Path(__file__).parent.parent
MODEL = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_hidden_layers=4,
    num_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=256,
)
QUICK_MODEL = {**MODEL, "num_hidden_layers": 2, "num_experts": 16}


def serving_python() -> Path:
    venv = Path(os.environ.get("MONE_SERVING_VENV", REPO / ".venv-serving"))
    script = REPO / "packages/mone-vllm/install-serving-env.sh"
    subprocess.run(["bash", str(script), str(venv)], check=True)
    return venv / "bin" / "python"


def summarise(results: dict) -> dict:
    """Per checkpoint: tokens/s (median over rounds of the median repeat),
    speed against ``unpruned`` (median and range of per-round ratios),
    weight bytes and KV-cache tokens, with their ratios to ``unpruned``."""

    def round_seconds(name):
        return [statistics.median(r["seconds"]) for r in results[name]]

    base = results["unpruned"][0]
    summary = {}
    for name, rounds in results.items():
        ratios = [u / t for u, t in zip(round_seconds("unpruned"), round_seconds(name))]
        summary[name] = {
            "tokens_per_s": rounds[0]["generated_tokens"]
            / statistics.median(round_seconds(name)),
            "speed_ratio": statistics.median(ratios),
            "speed_ratio_range": [min(ratios), max(ratios)],
            "weight_bytes": rounds[0]["weight_bytes"],
            "weight_ratio": rounds[0]["weight_bytes"] / base["weight_bytes"],
            "kv_cache_tokens": rounds[0]["kv_cache_tokens"],
            "kv_cache_ratio": rounds[0]["kv_cache_tokens"] / base["kv_cache_tokens"],
        }
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller model, fewer prompts"
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    logger.remove()
    config = QUICK_MODEL if args.quick else MODEL
    samples, prompts, new_tokens, rounds, repeats = (
        (16, 4, 16, 1, 1) if args.quick else (64, 32, 64, 5, 3)
    )
    python = serving_python()

    work = Path(tempfile.mkdtemp(prefix="mone-serving-bench-"))
    texts = stdlib_text()
    calibration, held_out = texts[: len(texts) // 2], texts[len(texts) // 2 :]
    tokenizer = train_tokenizer(texts, config["vocab_size"])
    source = build_tiny_moe("olmoe", work / "unpruned", tokenizer=tokenizer, **config)
    models = {"unpruned": source}
    for sparsity in (0.25, 0.5):
        for novice in ("mean", "drop"):
            name = f"{'mone' if novice == 'mean' else 'drop'}_{round(sparsity * 100)}"
            recipe = MoNEPruningModifier(sparsity=sparsity, novice=novice)
            calibrate(source, calibration, recipe, work / name, samples)
            models[name] = work / name

    ids = tokenizer("\n".join(held_out)).input_ids
    jobs = {
        "models": {name: str(path) for name, path in models.items()},
        "prompts": [ids[i * 64 : (i + 1) * 64] for i in range(prompts)],
        "max_tokens": new_tokens,
        "rounds": rounds,
        "repeats": repeats,
    }
    (work / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run(
        [
            str(python),
            str(Path(__file__).parent / "serving_throughput.py"),
            str(work / "jobs.json"),
            str(work / "results.json"),
        ],
        check=True,
    )
    summary = summarise(json.loads((work / "results.json").read_text()))

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"model: OLMoE-style {config} | {machine} | vllm-cpu 0.32.0, float32")
    print(
        "| checkpoint | tokens/s | speed vs unpruned (range) | weights | "
        "weights vs unpruned | KV-cache tokens | KV cache vs unpruned |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in summary.items():
        low, high = row["speed_ratio_range"]
        print(
            f"| {name} | {row['tokens_per_s']:.0f} | {row['speed_ratio']:.2f} "
            f"({low:.2f}-{high:.2f}) | {row['weight_bytes']:,} | "
            f"{row['weight_ratio']:.3f} | {row['kv_cache_tokens']:,} | "
            f"{row['kv_cache_ratio']:.2f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"serving{suffix}.json").write_text(
        json.dumps(
            {
                "model": config,
                "machine": machine,
                "prompts": prompts,
                "new_tokens": new_tokens,
                "rounds": rounds,
                "repeats": repeats,
                "summary": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
