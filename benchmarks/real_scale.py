"""
The paper's setting on a real model, for users with a GPU and a model hub.

    python benchmarks/real_scale.py --out runs/olmoe
    python benchmarks/real_scale.py --model allenai/OLMoE-1B-7B-0924 \\
        --dataset allenai/c4 --dataset-config en --split train \\
        --num-samples 100 --sparsities 0.25 0.5 --methods mone frequency reap

Each (method, sparsity) prunes the model with ``oneshot`` on the same
calibration samples, saves the checkpoint under ``--out``, then evaluates it
with lm-eval through the registered ``mone`` model (``mone_modifier.from_pretrained``);
the unpruned model is evaluated the same way. Writes ``results.json`` and a
markdown table ``results.md`` (zero-shot accuracy per task and the average).
"""

import argparse
import json
from pathlib import Path

from datasets import Dataset, load_dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.reap.base import REAPPruningModifier

from mone_modifier import MoNEPruningModifier

PAPER_TASKS = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "copa",
    "mmlu",
    "openbookqa",
    "piqa",
    "rte",
    "winogrande",
)
METHODS = {
    "mone": lambda s: MoNEPruningModifier(sparsity=s),
    "mone_weighted": lambda s: MoNEPruningModifier(sparsity=s, novice="weighted_mean"),
    "frequency": lambda s: MoNEPruningModifier(sparsity=s, scoring="frequency"),
    "mone_drop": lambda s: MoNEPruningModifier(sparsity=s, novice="drop"),
    "reap": lambda s: REAPPruningModifier(sparsity=s),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="allenai/OLMoE-1B-7B-0924")
    parser.add_argument(
        "--dataset", default="allenai/c4", help="hub name or local file"
    )
    parser.add_argument("--dataset-config", default="en")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument(
        "--methods", nargs="+", default=["mone", "frequency", "reap"], choices=METHODS
    )
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS))
    parser.add_argument("--include-path", help="extra lm-eval task directory")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for sparsity in args.sparsities:
        if not 0 < sparsity < 1:
            parser.error(f"--sparsities: {sparsity} is not in (0, 1)")
    if args.num_samples < 1:
        parser.error("--num-samples must be at least 1")
    return args


def calibration_samples(args: argparse.Namespace):
    """The first ``--num-samples`` non-empty texts of the dataset split
    (streamed, so C4 is never downloaded whole)."""
    if Path(args.dataset).exists():
        stream = load_dataset(
            "json", data_files=args.dataset, split="train", streaming=True
        )
    else:
        stream = load_dataset(
            args.dataset, args.dataset_config, split=args.split, streaming=True
        )
    texts = []
    for row in stream:
        if row[args.text_column].strip():
            texts.append(row[args.text_column])
        if len(texts) == args.num_samples:
            break
    if len(texts) < args.num_samples:
        raise ValueError(
            f"--dataset {args.dataset} has {len(texts)} non-empty texts, "
            f"fewer than --num-samples {args.num_samples}"
        )
    return Dataset.from_dict({"text": texts})


def evaluate(checkpoint: str, args: argparse.Namespace, tasks) -> dict[str, float]:
    import lm_eval

    import mone_modifier.evaluation  # noqa: F401  (registers "mone")

    results = lm_eval.simple_evaluate(
        model="mone",
        model_args=f"pretrained={checkpoint}",
        tasks=args.tasks,
        task_manager=tasks,
        batch_size=args.batch_size,
        device=args.device,
    )
    accuracy = {}
    for task in args.tasks:
        metrics = results["results"][task]
        accuracy[task] = metrics.get("acc_norm,none", metrics.get("acc,none"))
    accuracy["average"] = sum(accuracy[t] for t in args.tasks) / len(args.tasks)
    return accuracy


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = calibration_samples(args)
    from lm_eval.tasks import TaskManager

    # lm-eval's task index reads every task it ships: build it once
    tasks = TaskManager(include_path=args.include_path)
    runs = {"unpruned": evaluate(args.model, args, tasks)}
    for sparsity in args.sparsities:
        for method in args.methods:
            name = f"{method}_{int(round(sparsity * 100))}"
            oneshot(
                model=args.model,
                dataset=dataset,
                recipe=METHODS[method](sparsity),
                num_calibration_samples=args.num_samples,
                max_seq_length=args.max_seq_length,
                output_dir=str(args.out / name),
            )
            runs[name] = evaluate(str(args.out / name), args, tasks)
            (args.out / "results.json").write_text(json.dumps(runs, indent=2))
    columns = [*args.tasks, "average"]
    lines = ["| run | " + " | ".join(columns) + " |"]
    lines.append("| --- |" + " ---: |" * len(columns))
    for name, accuracy in runs.items():
        values = " | ".join(f"{accuracy[c]:.4f}" for c in columns)
        lines.append(f"| {name} | {values} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
