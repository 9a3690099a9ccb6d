"""
oneshot with one of the project's MoNE recipes, as a user runs it: in one
process (``python``) or with ``torchrun --nproc_per_node N`` (gloo on CPU).
test_distributed.py compares what the two write.

    python tests/distributed_oneshot.py MODEL RECIPE OUT [--pipeline P]
"""

import argparse
import os
from pathlib import Path

import torch
import yaml
from compressed_tensors.offload import load_offloaded_model
from datasets import Dataset
from llmcompressor import oneshot
from torch import distributed as dist
from transformers import AutoModelForCausalLM

import mone_modifier  # noqa: F401  registers MoNEPruningModifier
from mone_modifier.tiny_moe import calibration_ids

NUM_SAMPLES, SEQ_LEN = 12, 24


def recipe_with_report(recipe: Path, report: Path) -> str:
    """The recipe's YAML with ``report_path`` set on its MoNE modifier."""
    stages = yaml.safe_load(recipe.read_text())
    for stage in stages.values():
        for group in stage.values():
            if "MoNEPruningModifier" in group:
                group["MoNEPruningModifier"]["report_path"] = str(report)
    return yaml.safe_dump(stages)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pipeline", default="sequential")
    parser.add_argument(
        "--same-data",
        action="store_true",
        help="give every rank all samples (which MoNE refuses under torchrun)",
    )
    args = parser.parse_args()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # compressed_tensors.distributed.init_dist needs an accelerator
        dist.init_process_group("gloo")
    samples = calibration_ids(NUM_SAMPLES, SEQ_LEN)
    dataset = Dataset.from_dict(
        {
            "input_ids": samples.tolist(),
            "attention_mask": torch.ones_like(samples).tolist(),
        }
    )
    if dist.is_initialized() and not args.same_data:
        dataset = dataset.shard(dist.get_world_size(), dist.get_rank(), contiguous=True)
    # llm-compressor's distributed loading: the source rank reads the weights
    # into cpu memory that every rank shares, so each module that a rank
    # compresses is compressed for all
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype="auto", device_map="auto_offload"
        )
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe_with_report(args.recipe, args.out / "report.json"),
        num_calibration_samples=len(dataset),
        shuffle_calibration_samples=False,
        pipeline=args.pipeline,
        output_dir=str(args.out / "model"),
    )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
