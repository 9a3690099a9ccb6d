"""
The quickstart: build a small OLMoE-style model, prune it with a MoNE recipe
through ``oneshot`` on real text (Python standard-library sources, present on
every machine), and print the report summary.

    python -m mone_modifier.demo --recipe recipes/mone_25.yaml
"""

import argparse
import inspect
import tempfile
from pathlib import Path

from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.core import active_session
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mone_modifier import MoNEPruningModifier
from mone_modifier.report import write_report
from mone_modifier.tiny_moe import build_tiny_moe, train_tokenizer

VOCAB_SIZE = 512
DEMO_MODEL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=4,
    num_experts=16,
    num_experts_per_tok=4,
)


def stdlib_text() -> list[str]:
    """Paragraphs of a few standard-library modules' sources."""
    import argparse as a
    import dataclasses
    import json as j
    import textwrap

    source = "\n".join(inspect.getsource(m) for m in (a, dataclasses, j, textwrap))
    return [p for p in source.split("\n\n") if len(p) > 200]


def summary(report: dict) -> str:
    settings = report["settings"]
    lines = [
        f"MoNE {settings['scoring']} scoring, {settings['novice']} novices, "
        f"sparsity {settings['sparsity']}: {settings['replaced_per_layer']} of "
        f"{settings['num_experts']} experts (top-{settings['top_k']}) per layer",
        f"{'layer':>5}  {'tokens':>6}  novices",
    ]
    for layer in report["layers"]:
        never = (
            f"  (never routed: {layer['never_routed']})"
            if layer["never_routed"]
            else ""
        )
        lines.append(
            f"{layer['index']:>5}  {layer['tokens']:>6}  {layer['novices']}{never}"
        )
    totals = report["totals"]
    lines.append(
        f"total: {totals['novices']} novices, {totals['retained']} experts kept"
    )
    return "\n".join(lines)


def recipes_help() -> str:
    found = sorted(str(p) for p in Path("recipes").glob("*.yaml"))
    listed = ", ".join(found) if found else "none here: run from the repository root"
    return f"YAML recipe to run (this repository's: {listed})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mone_modifier.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--recipe", default="recipes/mone_25.yaml", help=recipes_help())
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the model, the pruned checkpoint and the report go "
        "(default: a new temporary directory)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=32,
        help="calibration samples (paragraphs of standard-library source)",
    )
    args = parser.parse_args(argv)
    if not Path(args.recipe).is_file():
        parser.error(
            f"--recipe {args.recipe!r} is not a file; run from the repository root"
        )
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mone-demo-"))
    texts = stdlib_text()
    model_path = build_tiny_moe(
        "olmoe",
        work / "model",
        tokenizer=train_tokenizer(texts, VOCAB_SIZE),
        **DEMO_MODEL,
    )
    params_before = sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters()
    )
    model = oneshot(
        model=str(model_path),
        dataset=Dataset.from_dict({"text": texts}),
        recipe=args.recipe,
        num_calibration_samples=args.num_samples,
        max_seq_length=128,
    )
    modifiers = active_session().lifecycle.recipe.modifiers
    (modifier,) = [m for m in modifiers if isinstance(m, MoNEPruningModifier)]
    report = modifier.report()
    write_report(work / "report.json", report)
    params_after = sum(p.numel() for p in model.parameters())
    pruned = work / "pruned"
    model.save_pretrained(pruned, save_compressed=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(pruned)

    print(f"recipe ran: {', '.join(type(m).__name__ for m in modifiers)}")
    print(summary(report))
    print(f"parameters: {params_before:,} -> {params_after:,}")
    print(f"report: {work / 'report.json'} and report.png")
    saved = AutoConfig.from_pretrained(pruned)
    print(next_steps(pruned, quantized=hasattr(saved, "quantization_config")))


def next_steps(pruned: Path, quantized: bool) -> str:
    lines = [
        f"pruned checkpoint{' (quantized, compressed-tensors)' if quantized else ''}: "
        f"{pruned}",
        "next:",
        f'  load:     python -c "import mone_modifier; '
        f"print(mone_modifier.from_pretrained('{pruned}'))\"",
        f"  evaluate: python -m mone_modifier.evaluation --model mone "
        f"--model_args pretrained={pruned} --tasks arc_easy",
        f"  serve:    python -m vllm.entrypoints.openai.api_server --model {pruned}"
        f"  (serving environment: packages/mone-vllm/install-serving-env.sh)",
    ]
    if quantized:
        lines.append(
            "  (vLLM's CPU backend has no kernel for quantized experts: serve on a GPU)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
