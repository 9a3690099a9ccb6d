"""
Writing pruned models to disk.

``install_checkpoint_writer`` wraps the model's ``save_pretrained`` (already
wrapped by llm-compressor for compression) so that a save

- never overwrites the checkpoint the model was loaded from;
- writes into a temporary directory beside the target and moves the files in
  at the end, ``config.json`` last, so an interrupted save never leaves a
  directory that looks like a complete checkpoint;
- with novices: records ``approximate_experts`` in ``config.json`` after
  llm-compressor has rewritten it from the original config (which drops
  fields set during pruning); tensors are already in that layout: retained
  experts under their logical ids, ``experts.<id>.approx_value`` per novice;
- with ``novice: drop``: stores fused experts (``repack_moe``; the model
  keeps them), the native layout of each architecture, and the reduced
  expert count under every expert-count key the config uses, so stock
  transformers loads it.
"""

import json
import os
import shutil
import tempfile
from functools import wraps
from pathlib import Path

import torch
from llmcompressor.modeling.moe.linearize import repack_moe
from loguru import logger

from mone_modifier.expert_packing import EXPERT_COUNT_KEYS, gpt_oss_repack_fix
from mone_modifier.metadata import NOVICES_CONFIG_KEY, recorded_novices

__all__ = ["install_checkpoint_writer"]


def install_checkpoint_writer(model: torch.nn.Module, dropped_to: int | None):
    """
    :param model: the pruned model
    :param dropped_to: experts per layer after ``novice: drop``, else None
    """
    save = model.save_pretrained
    if getattr(save, "_mone_writer", False):
        return

    @wraps(save)
    def save_pretrained(save_directory: str | os.PathLike, *args, **kwargs):
        target = Path(save_directory)
        _refuse_source_checkpoint(model, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-")
        )
        try:
            if dropped_to is None:
                save(staging, *args, **kwargs)
                _edit_config(staging, _add_novices(recorded_novices(model.config)))
            else:
                with gpt_oss_repack_fix():
                    repack_moe(model)
                save(staging, *args, **kwargs)
                _edit_config(staging, _set_expert_count(dropped_to))
            _publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
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


def _edit_config(directory: Path, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config.get("text_config", config))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _add_novices(novices: dict[int, list[int]]):
    def edit(config: dict):
        config[NOVICES_CONFIG_KEY] = {str(k): v for k, v in sorted(novices.items())}

    return edit


def _set_expert_count(count: int):
    def edit(config: dict):
        for key in EXPERT_COUNT_KEYS:
            if key in config:
                config[key] = count

    return edit


def _publish(staging: Path, target: Path):
    """Move the staged checkpoint into ``target``, keeping unrelated files
    there; a stale ``config.json`` goes first and the new one comes last."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").unlink(missing_ok=True)
    files = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
    for file in files:
        destination = target / file.name
        if destination.is_dir() and not file.is_dir():
            shutil.rmtree(destination)
        os.replace(file, destination)
