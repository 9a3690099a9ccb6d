"""
A sparsity sweep from one calibration, against calibrating once per
sparsity, on the benchmark's trained MoE models.

    python benchmarks/statistics_sweep.py [--quick] [--out benchmarks/results]
                                          [--models NAME ...]

For each trained model (``train_models.py``'s, cached) and the calibration
data of ``compare.py``: one ``pipeline="basic"`` run saves the statistics,
then every sparsity is pruned from them without data; against it, the
default progressive run (sequential pipeline, each layer measured after the
earlier ones were pruned) calibrates once per sparsity. Reports the wall time
of both sweeps and the held-out perplexity per domain of each pruned model.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

# CPU figures on every machine, as in compare.py
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch
from compare import FULL, QUICK, Evaluator, calibration_set
from data import DOMAINS, load_domain
from llmcompressor import oneshot
from loguru import logger
from train_models import build, full_setup, models_suffix, quick_setup, select
from transformers import AutoTokenizer

from mone_modifier import MoNEPruningModifier

SPARSITIES = (0.125, 0.25, 0.375, 0.5, 0.625)


def timed_oneshot(model_path: Path, recipe, **kwargs):
    start = time.perf_counter()
    model = oneshot(model=str(model_path), recipe=recipe, **kwargs)
    return model, time.perf_counter() - start


def sweep(
    model_path: Path,
    sparsities: tuple[float, ...],
    dataset,
    seq_len: int,
    evaluate,
    work: Path,
) -> dict:
    data = dict(
        dataset=dataset,
        num_calibration_samples=len(dataset),
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    statistics = work / f"{model_path.name}.safetensors"
    recipe = MoNEPruningModifier(
        sparsity=sparsities[0], save_statistics_path=str(statistics)
    )
    _, calibration_s = timed_oneshot(model_path, recipe, pipeline="basic", **data)
    rows = []
    for sparsity in sparsities:
        recipe = MoNEPruningModifier(sparsity=sparsity, statistics_path=str(statistics))
        from_statistics, from_statistics_s = timed_oneshot(model_path, recipe)
        progressive, progressive_s = timed_oneshot(
            model_path, MoNEPruningModifier(sparsity=sparsity), **data
        )
        rows.append(
            {
                "sparsity": sparsity,
                "from_statistics": evaluate(from_statistics, choice=False),
                "progressive": evaluate(progressive, choice=False),
                "from_statistics_s": from_statistics_s,
                "progressive_s": progressive_s,
            }
        )
        logger.info(f"{model_path.name} {sparsity}: {rows[-1]}")
    return {
        "calibration_s": calibration_s,
        "sweep_from_statistics_s": calibration_s
        + sum(r["from_statistics_s"] for r in rows),
        "sweep_progressive_s": sum(r["progressive_s"] for r in rows),
        "rows": rows,
    }


def markdown(name: str, result: dict) -> str:
    lines = [
        f"{name}: one calibration {result['calibration_s']:.0f} s; sweep of "
        f"{len(result['rows'])} sparsities {result['sweep_from_statistics_s']:.0f} s "
        f"from statistics, {result['sweep_progressive_s']:.0f} s calibrating each",
        "",
        "| sparsity | " + " | ".join(
            f"{d} ppl, from statistics | {d} ppl, progressive" for d in DOMAINS
        ) + " |",
        "| ---: |" + " ---: | ---: |" * len(DOMAINS),
    ]  # fmt: skip
    for row in result["rows"]:
        cells = [
            f"{row[kind][f'{d}_ppl']:.2f}"
            for d in DOMAINS
            for kind in ("from_statistics", "progressive")
        ]
        lines.append(f"| {row['sparsity']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, two sparsities (CI)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="directory for statistics_sweep[_quick].json",
    )
    parser.add_argument("--models", nargs="+", help="only these models")
    args = parser.parse_args(argv)
    logger.remove()
    setup, plan = (quick_setup(), QUICK) if args.quick else (full_setup(), FULL)
    setup = select(setup, args.models)
    sparsities = SPARSITIES[1::2] if args.quick else SPARSITIES
    domains = {name: load_domain(name) for name in DOMAINS}
    dataset = calibration_set(
        domains, "mixed", plan.calibration_samples, plan.calibration_chars
    )
    work = Path(tempfile.mkdtemp(prefix="mone-sweep-"))
    results = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": " ".join(
            ["python benchmarks/statistics_sweep.py"]
            + (["--quick"] if args.quick else [])
            + (["--models", *args.models] if args.models else [])
        ),
        "models": {},
    }
    for name, path in build(setup).items():
        seq_len = setup.models[name].seq_len
        tokenizer = AutoTokenizer.from_pretrained(path)
        evaluate = Evaluator(tokenizer, domains, plan, seq_len, work)
        results["models"][name] = sweep(
            path, sparsities, dataset, seq_len, evaluate, work
        )
        print(markdown(name, results["models"][name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("_quick" if args.quick else "") + models_suffix(args.models)
    (args.out / f"statistics_sweep{suffix}.json").write_text(
        json.dumps(results, indent=2)
    )


if __name__ == "__main__":
    main()
