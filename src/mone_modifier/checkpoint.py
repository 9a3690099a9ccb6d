"""
Writing pruned models to disk.

``install_checkpoint_writer`` wraps the model's ``save_pretrained`` (already
wrapped by llm-compressor for compression) so that a save

- never overwrites the checkpoint the model was loaded from;
- writes into a temporary directory beside the target and moves the files in
  at the end, ``config.json`` last, so an interrupted save never leaves a
  directory that looks like a complete checkpoint;
- into an existing directory: replaces the checkpoint there (config and
  every weight file) and keeps other files;
- with novices: records ``approximate_experts`` in ``config.json`` after
  llm-compressor has rewritten it from the original config (which drops
  fields set during pruning), and names the MoNE architectures
  (``MoNEOlmoeForCausalLM``) that only the mone-vllm plugin serves, unless
  stock names are asked for; tensors are already in that layout: retained
  experts under their logical ids, ``experts.<id>.approx_value`` per novice;
- with ``novice: drop``: stores fused experts (``repack_moe``; the model
  keeps them), the native layout of each architecture, and the reduced
  expert count under every expert-count key the config uses, so stock
  transformers loads it.

Under torchrun only the source rank writes; the others take part in
llm-compressor's collective save and wait until the files are in place.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

import torch
from compressed_tensors.distributed import is_distributed, is_source_process
from llmcompressor.modeling.moe.gpt_oss import GptOssExpertMLP
from llmcompressor.modeling.moe.linearize import repack_moe
from loguru import logger
from torch import distributed as dist

from mone_format import (
    AUTHORS_MODEL_TYPES,
    EXPERT_COUNT_KEYS,
    NOVICES_CONFIG_KEY,
    mone_architecture,
    recorded_novices,
)

__all__ = [
    "install_checkpoint_writer",
    "publish",
    "write_expert_count",
    "write_novices",
]

WEIGHT_FILE_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
)


def install_checkpoint_writer(
    model: torch.nn.Module,
    dropped_to: int | None,
    stock_architectures: bool = False,
    authors_layout: bool = False,
):
    """
    :param model: the pruned model
    :param dropped_to: experts per layer after ``novice: drop``, else None
    :param stock_architectures: keep the model's own ``architectures`` names
        in a checkpoint with novices
    :param authors_layout: write the config the MoNE authors' code reads
        (``write_novices``)
    """
    save = model.save_pretrained
    if getattr(save, "_mone_writer", False):
        return

    @wraps(save)
    def save_pretrained(save_directory: str | os.PathLike, *args, **kwargs):
        target = Path(save_directory)
        _refuse_source_checkpoint(model, target)
        if dropped_to is not None:
            with gpt_oss_repack_fix():
                repack_moe(model)
        if not is_source_process():
            # llm-compressor's save is collective but writes on the source
            # rank only; this rank takes part and writes nothing
            save(target, *args, **kwargs)
            dist.barrier()
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-")
        )
        try:
            save(staging, *args, **kwargs)
            if dropped_to is None:
                write_novices(
                    staging,
                    recorded_novices(model.config),
                    stock_architectures,
                    authors_layout,
                )
            else:
                write_expert_count(staging, dropped_to)
            publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if is_distributed():
                dist.barrier()
        logger.info(f"MoNE checkpoint written to {target}")

    save_pretrained._mone_writer = True
    model.save_pretrained = save_pretrained


def _refuse_source_checkpoint(model: torch.nn.Module, target: Path):
    source = getattr(model.config, "_name_or_path", "") or ""
    if source and target.exists() and Path(source).exists():
        if target.resolve() == Path(source).resolve():
            raise ValueError(
                f"refusing to save the pruned model over the checkpoint it was "
                f"loaded from ({source}): pass another output directory"
            )


def _config_in(directory: Path) -> tuple[Path, dict, dict]:
    """``config.json``'s path, its content, and the part holding the text
    model's fields (``text_config`` for multimodal configs)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    return path, config, config.get("text_config", config)


def write_novices(
    directory: Path,
    novices: dict[int, list[int]],
    stock_architectures: bool,
    authors_layout: bool = False,
):
    """
    Record ``novices`` in a saved ``config.json``. With ``authors_layout``,
    as the MoNE authors' code (github zxgx/mode-pd) writes it: their model
    type (``olmoe_compressed``), zero ``approximate_expert_init_tokens`` (no
    novice evolving), no per-expert widths, the stock ``architectures``.
    """
    path, config, text = _config_in(directory)
    text[NOVICES_CONFIG_KEY] = {str(k): v for k, v in sorted(novices.items())}
    if authors_layout:
        authors_types = {stock: t for t, stock in AUTHORS_MODEL_TYPES.items()}
        text["model_type"] = authors_types[text["model_type"]]
        text["approximate_expert_init_tokens"] = {
            str(k): [0] * len(v) for k, v in sorted(novices.items())
        }
        text.update(routed_intermediate_sizes=None, flap_intermediate_sizes=None)
    elif novices and not stock_architectures:
        config["architectures"] = [
            mone_architecture(name) for name in config.get("architectures", [])
        ]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_expert_count(directory: Path, count: int):
    """Set every expert-count key of a saved ``config.json`` to ``count``."""
    path, config, text = _config_in(directory)
    for key in EXPERT_COUNT_KEYS:
        if key in text:
            text[key] = count
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def publish(staging: Path, target: Path):
    """
    Move the staged checkpoint into ``target``. A previous checkpoint there is
    replaced whole: its ``config.json`` goes first, then its weight files (a
    stale shard or index would otherwise be loaded with the new ones); files
    of other kinds are kept. The new ``config.json`` comes last.
    """
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").unlink(missing_ok=True)
    for stale in target.iterdir():
        if stale.is_file() and stale.name.endswith(WEIGHT_FILE_SUFFIXES):
            stale.unlink()
    files = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
    for file in files:
        destination = target / file.name
        if destination.is_dir() and not file.is_dir():
            shutil.rmtree(destination)
        os.replace(file, destination)


@contextmanager
def gpt_oss_repack_fix():
    """llm-compressor 0.14 repacks GPT-OSS experts into halves of
    ``gate_up_proj`` although the model interleaves gate and up columns (its
    own ``copy_from_experts_module`` reads them interleaved)."""
    original = GptOssExpertMLP.__dict__.get("copy_to_experts_module")
    GptOssExpertMLP.copy_to_experts_module = _gpt_oss_copy_to_experts_module
    try:
        yield
    finally:
        if original is None:
            del GptOssExpertMLP.copy_to_experts_module
        else:
            GptOssExpertMLP.copy_to_experts_module = original


@torch.no_grad()
def _gpt_oss_copy_to_experts_module(self, experts, index: int):
    experts.gate_up_proj[index, :, 0::2].copy_(self.gate_proj.weight.T)
    experts.gate_up_proj[index, :, 1::2].copy_(self.up_proj.weight.T)
    experts.down_proj[index].copy_(self.down_proj.weight.T)
    experts.gate_up_proj_bias[index, 0::2].copy_(self.gate_proj.bias)
    experts.gate_up_proj_bias[index, 1::2].copy_(self.up_proj.bias)
    experts.down_proj_bias[index].copy_(self.down_proj.bias)
