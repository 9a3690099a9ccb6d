"""
Forward speed of reloaded MoNE models against the unpruned one, per experts
implementation and input shape, all models in one process.

    python benchmarks/novice_speed.py [--preset cpu|olmoe] [--device cpu|cuda]
        [--layers N] [--quick] [--out benchmarks/results]

Builds an OLMoE-style model with random weights (``cpu``: small shapes that
time on this CPU; ``olmoe``: OLMoE-1B-7B's layer shapes, hidden 2048, 64
experts of 1024, top-8, with ``--layers`` layers), prunes it at 25% and 50%
with ``MoNEPruningModifier`` through ``oneshot`` (random-token calibration),
saves and reloads the pruned models with ``mone_modifier.from_pretrained``.
Then, for each experts implementation transformers offers and each input
shape (prefill: batch x tokens; decode: batch x 1, one forward without a
cache), every model runs the same input in each repeat, in rotating order;
speed is the median (and interquartile range) of the per-repeat ratios
unpruned time / pruned time. batched_mm copies each route's expert weights,
so it runs only on shapes whose copies fit in the preset's
``batched_mm_bytes``.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from llmcompressor import oneshot
from loguru import logger
from transformers import AutoModelForCausalLM, OlmoeConfig

import mone_modifier
from mone_modifier import MoNEPruningModifier

PRESETS = {
    "cpu": dict(
        model=dict(hidden_size=256, intermediate_size=256, num_experts=32,
                   num_experts_per_tok=4, num_attention_heads=4, vocab_size=512),
        shapes={"prefill 4x256": (4, 256), "decode 64x1": (64, 1),
                "decode 8x1": (8, 1)},
        dtype="float32",
        batched_mm_bytes=2**29,
    ),
    "olmoe": dict(
        model=dict(hidden_size=2048, intermediate_size=1024, num_experts=64,
                   num_experts_per_tok=8, num_attention_heads=16, vocab_size=50304),
        shapes={"prefill 8x1024": (8, 1024), "decode 256x1": (256, 1),
                "decode 32x1": (32, 1)},
        dtype="bfloat16",
        batched_mm_bytes=4 * 2**30,
    ),
}  # fmt: skip
SPARSITIES = {"mone_25": 0.25, "mone_50": 0.5}
IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")


def build_source(config: OlmoeConfig, dtype: torch.dtype, path: Path) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
    return path


def prune(source: Path, sparsity: float, samples: torch.Tensor, path: Path) -> Path:
    model = oneshot(
        model=str(source),
        dataset=Dataset.from_dict({"input_ids": samples.tolist()}),
        recipe=MoNEPruningModifier(sparsity=sparsity),
        num_calibration_samples=len(samples),
        pipeline="basic",
    )
    model.save_pretrained(path)
    return path


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def paired_speed(
    models: dict[str, torch.nn.Module],
    batches: list[torch.Tensor],
    repeats: int,
    warmups: int = 3,
    baseline: str = "unpruned",
) -> dict:
    """
    Per model: median milliseconds to run ``batches`` (and tokens/s), and its
    speed against ``baseline`` as the median and interquartile range of
    per-repeat ratios. In each repeat every model runs the batches back to
    back, in rotating order, so machine noise hits the models of one repeat
    alike; on a GPU the clock stops once the device is done.
    """
    device = batches[0].device
    names = list(models)
    seconds = {name: [] for name in names}
    for model in models.values():
        for _ in range(warmups):
            model(input_ids=batches[0])
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            for batch in batches:
                models[name](input_ids=batch)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    tokens = sum(batch.numel() for batch in batches)
    speed = {}
    for name in names:
        ratios = [b / t for b, t in zip(seconds[baseline], seconds[name])]
        quartiles = statistics.quantiles(ratios, n=4)
        median = statistics.median(seconds[name])
        speed[name] = {
            "ms": 1000 * median,
            "tokens_per_s": tokens / median,
            "speed_ratio": statistics.median(ratios),
            "speed_ratio_iqr": [quartiles[0], quartiles[2]],
        }
    return speed


def batched_mm_bytes(config: OlmoeConfig, shape: tuple[int, int], itemsize: int):
    """What batched_mm's per-route copies of the expert weights take."""
    routes = shape[0] * shape[1] * config.num_experts_per_tok
    return routes * 3 * config.hidden_size * config.intermediate_size * itemsize


@torch.no_grad()
def compiled_speed(
    models: dict, shapes: dict, vocab_size: int, repeats: int, device: torch.device
) -> dict:
    """Paired speed of the models compiled with ``fullgraph=True`` under
    grouped_mm, and each one's largest logit difference from its uncompiled
    self (compiled kernels round otherwise: compare the pruned models'
    difference with the unpruned one's)."""
    generator = torch.Generator().manual_seed(1)
    compiled = {}
    for name, model in models.items():
        model.set_experts_implementation("grouped_mm")
        compiled[name] = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    speed = {}
    for shape_name, shape in shapes.items():
        inputs = torch.randint(2, vocab_size, shape, generator=generator).to(device)
        difference = {}
        for name, model in models.items():
            expected = model(input_ids=inputs).logits.float()
            logits = compiled[name](input_ids=inputs).logits.float()
            difference[name] = (logits - expected).abs().max().item()
        speed[shape_name] = paired_speed(compiled, [inputs], repeats)
        for name, row in speed[shape_name].items():
            row["logit_difference_from_uncompiled"] = difference[name]
    return speed


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"{processor}, {torch.get_num_threads()} threads"


def markdown_table(results: dict) -> str:
    lines = [
        "| experts implementation | input | unpruned ms | MoNE 25% | MoNE 50% |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for implementation, rows in results.items():
        for shape_name, row in rows.items():
            cells = [
                "{:.2f}x ({:.2f}-{:.2f})".format(
                    row[name]["speed_ratio"], *row[name]["speed_ratio_iqr"]
                )
                for name in SPARSITIES
            ]
            unpruned = f"{row['unpruned']['ms']:.2f}"
            lines.append(
                f"| {implementation} | {shape_name} | {unpruned} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="model and input shapes (default: cpu)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to time on (default: cuda when present)",
    )
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 layers, 3 repeats, the first two shapes (a smoke run)",
    )
    parser.add_argument(
        "--implementations",
        nargs="+",
        default=list(IMPLEMENTATIONS),
        help="experts implementations to time (default: all three)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(fullgraph=True, mode='reduce-overhead', "
        "CUDA graphs on a GPU) under grouped_mm on the first decode shape",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="directory for novice_speed_<preset>_<device>.json",
    )
    arguments = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(arguments)
    logger.remove()
    preset = PRESETS[args.preset]
    layers, repeats = (2, 3) if args.quick else (args.layers, args.repeats)
    shapes = dict(
        list(preset["shapes"].items())[:2] if args.quick else preset["shapes"]
    )
    dtype = getattr(torch, preset["dtype"])
    device = torch.device(args.device)
    config = OlmoeConfig(
        **preset["model"],
        num_hidden_layers=layers,
        num_key_value_heads=preset["model"]["num_attention_heads"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )

    work = Path(tempfile.mkdtemp(prefix="mone-novice-speed-"))
    generator = torch.Generator().manual_seed(0)
    samples = torch.randint(2, config.vocab_size, (8, 128), generator=generator)
    source = build_source(config, dtype, work / "unpruned")
    models = {"unpruned": AutoModelForCausalLM.from_pretrained(source, dtype=dtype)}
    for name, sparsity in SPARSITIES.items():
        pruned = prune(source, sparsity, samples, work / name)
        models[name] = mone_modifier.from_pretrained(pruned, dtype=dtype)
    models = {name: model.to(device).eval() for name, model in models.items()}

    results = {}
    for implementation in args.implementations:
        for model in models.values():
            model.set_experts_implementation(implementation)
        results[implementation] = {}
        for shape_name, shape in shapes.items():
            copies = batched_mm_bytes(config, shape, dtype.itemsize)
            if implementation == "batched_mm" and copies > preset["batched_mm_bytes"]:
                continue
            inputs = torch.randint(2, config.vocab_size, shape, generator=generator)
            results[implementation][shape_name] = paired_speed(
                models, [inputs.to(device)], repeats
            )

    machine = machine_name(device)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"OLMoE-style, {layers} layers, {preset['model']}, {dtype}")
    print(f"{machine}; {versions}")
    print(markdown_table(results), flush=True)
    if args.compile:
        # one decode shape: each shape compiles every model anew
        decode = next((n, s) for n, s in shapes.items() if s[1] == 1)
        compiled = compiled_speed(
            models, dict([decode]), config.vocab_size, repeats, device
        )
        results["grouped_mm, compiled"] = compiled
        print(markdown_table({"grouped_mm, compiled": compiled}).split("\n")[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    report = {
        "command": " ".join(["python benchmarks/novice_speed.py", *arguments]),
        "model": {**preset["model"], "num_hidden_layers": layers},
        "dtype": preset["dtype"],
        "machine": machine,
        "versions": versions,
        "repeats": repeats,
        "speed": results,
    }
    path = out / f"novice_speed_{args.preset}_{device.type}{suffix}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
