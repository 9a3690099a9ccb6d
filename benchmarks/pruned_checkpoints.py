"""
Checkpoint size and forward throughput of MoNE-pruned models, as ratios
against the unpruned model, measured in one run on the same inputs.

    python benchmarks/pruned_checkpoints.py [--quick] [--out benchmarks/results]

Builds an OLMoE-style MoE (random weights; sizes below), calibrates on Python
standard-library text, applies the shipped recipes through oneshot, saves
every result, and reloads the pruned ones with ``mone_modifier.from_pretrained``.

- bytes: all ``*.safetensors`` of a checkpoint; dense results against the
  unpruned model saved the same way (linearised, llm-compressor's
  save_pretrained), W4A16 results against GPTQ W4A16 without MoNE
- tokens/s: forward passes (no grad) over the same held-out batches, under
  transformers' grouped_mm (its default) and eager experts implementations;
  speed as the median of paired per-repeat ratios against the unpruned model
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from llmcompressor.modifiers.quantization import GPTQModifier
from loguru import logger
from novice_speed import paired_speed
from transformers import AutoModelForCausalLM

import mone_modifier
from mone_modifier.demo import stdlib_text
from mone_modifier.tiny_moe import build_tiny_moe, group_quantizable, train_tokenizer

RECIPES = Path(__file__).parent.parent / "recipes"
MODEL = dict(
    vocab_size=512,
    num_hidden_layers=4,
    num_experts=32,
    num_experts_per_tok=4,
    **{**group_quantizable("olmoe"), "hidden_size": 256, "intermediate_size": 256},
)
QUICK_MODEL = {**MODEL, "num_hidden_layers": 2, "num_experts": 16}


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def calibrate(model_path: Path, texts: list[str], recipe, out: Path, samples: int):
    oneshot(
        model=str(model_path),
        dataset=Dataset.from_dict({"text": texts}),
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=128,
        output_dir=str(out),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller model, fewer repeats"
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    logger.remove()
    torch.manual_seed(0)
    config = QUICK_MODEL if args.quick else MODEL
    samples, repeats = (16, 5) if args.quick else (64, 21)

    work = Path(tempfile.mkdtemp(prefix="mone-bench-"))
    texts = stdlib_text()
    calibration, held_out = texts[: len(texts) // 2], texts[len(texts) // 2 :]
    tokenizer = train_tokenizer(texts, config["vocab_size"])
    source = build_tiny_moe("olmoe", work / "source", tokenizer=tokenizer, **config)

    unpruned = AutoModelForCausalLM.from_pretrained(source)
    linearize_moe(unpruned)
    unpruned.save_pretrained(work / "unpruned")
    sizes = {"unpruned": checkpoint_bytes(work / "unpruned")}
    gptq = GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
    calibrate(source, calibration, gptq, work / "w4a16", samples)
    sizes["w4a16"] = checkpoint_bytes(work / "w4a16")
    baselines = {"mone_25": "unpruned", "mone_50": "unpruned"}
    baselines.update({"mone_w4": "w4a16", "mone_w4_50": "w4a16"})
    for recipe in baselines:
        calibrate(
            source, calibration, str(RECIPES / f"{recipe}.yaml"), work / recipe, samples
        )
        sizes[recipe] = checkpoint_bytes(work / recipe)

    ids = tokenizer("\n".join(held_out), return_tensors="pt").input_ids[0]
    batches = list(ids[: (len(ids) // 1024) * 1024].view(-1, 8, 128)[:4])
    models = {
        "unpruned": AutoModelForCausalLM.from_pretrained(source).eval(),
        "mone_25": mone_modifier.from_pretrained(work / "mone_25"),
        "mone_50": mone_modifier.from_pretrained(work / "mone_50"),
    }
    speed = {}
    for implementation in ("grouped_mm", "eager"):
        for model in models.values():
            model.set_experts_implementation(implementation)
        speed[implementation] = paired_speed(models, batches, repeats, warmups=1)

    threads = torch.get_num_threads()
    machine = f"{platform.processor() or platform.machine()}, {threads} threads"
    print(f"model: OLMoE-style {config} | {machine} | torch {torch.__version__}")
    print("| checkpoint | bytes | against | bytes ratio |")
    print("| --- | ---: | --- | ---: |")
    for name, size in sizes.items():
        base = baselines.get(name)
        ratio = f"{size / sizes[base]:.3f}" if base else "1"
        print(f"| {name} | {size:,} | {base or '-'} | {ratio} |")
    print()
    print("| experts implementation | model | tokens/s | speed vs unpruned (IQR) |")
    print("| --- | --- | ---: | ---: |")
    for implementation, rows in speed.items():
        for name, row in rows.items():
            low, high = row["speed_ratio_iqr"]
            print(
                f"| {implementation} | {name} | {row['tokens_per_s']:.0f} | "
                f"{row['speed_ratio']:.2f} ({low:.2f}-{high:.2f}) |"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"pruned_checkpoints{suffix}.json").write_text(
        json.dumps(
            {"model": config, "machine": machine, "bytes": sizes, "speed": speed},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
