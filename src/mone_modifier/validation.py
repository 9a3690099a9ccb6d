"""
Checks on the model and the recipe that MoNE runs before any calibration
work, so a wrong set-up fails at once with the fix in the message.
"""

import importlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from compressed_tensors.distributed import is_distributed
from datasets import Dataset
from llmcompressor.core import active_session
from llmcompressor.entrypoints import utils as entrypoint_utils
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from torch import distributed as dist
from torch.utils.data import DataLoader
from transformers import AutoConfig, PretrainedConfig

from mone_format import (
    AUTHORS_MODEL_TYPES,
    expert_count,
    read_novices,
    recorded_novices,
)
from mone_modifier.novice import NoviceExpert
from mone_transformers.pruned_experts import NoviceMoEExperts

__all__ = [
    "check_authors_family",
    "check_calibration_tokens",
    "check_family_supported",
    "check_not_pruned",
    "check_rank_data",
    "check_recipe_order",
    "explain_linearisation_failures",
    "refuse_pruned_checkpoints_in_oneshot",
]


# families llm-compressor 0.14 cannot calibrate, and why (tests/family_walk.py
# shows each failure when its entry is removed)
_UNCALIBRATABLE = {
    "minimax_m3_vl_text": (
        "llm-compressor 0.14's linearised experts lack their clamped SwiGLU "
        "(swiglu_alpha, swiglu_limit), so calibration would fail in the first "
        "MoE layer"
    ),
    "qwen3_omni_moe_thinker": (
        "llm-compressor 0.14's sequential pipeline traces its forward to a graph "
        "that runs no decoder layer, and its basic pipeline fails in "
        "transformers' get_rope_index, so calibration would measure nothing"
    ),
}

# families whose checkpoints with novices cannot be read back, and why
_NOVICES_UNREADABLE = {
    "inkling_mm_model": (
        "transformers 5.17 saves it through a weight conversion (gate_proj + "
        "up_proj -> shared_w13_weight) that also rewrites the retained experts' "
        "tensors, so a checkpoint with novices would not load back. "
        "`novice: drop` works"
    ),
}


def check_family_supported(model: torch.nn.Module, novice: str):
    """Refuse a family that cannot be calibrated, or whose pruned checkpoint
    could not be read back, before any calibration."""
    config = model.config
    model_types = (config.model_type, config.get_text_config().model_type)
    for model_type in model_types:
        if model_type in _UNCALIBRATABLE:
            raise ValueError(
                f"MoNEPruningModifier cannot prune {config.model_type} models: "
                f"{_UNCALIBRATABLE[model_type]}. The families MoNE "
                f"prunes are in the README's family table."
            )
        if model_type in _NOVICES_UNREADABLE and novice != "drop":
            raise ValueError(
                f"MoNEPruningModifier cannot give {config.model_type} models "
                f"novices: {_NOVICES_UNREADABLE[model_type]}."
            )


def check_authors_family(config: PretrainedConfig):
    """``authors_layout`` names the MoNE authors' model types, which exist
    for three families only."""
    model_type = config.model_type
    if model_type not in AUTHORS_MODEL_TYPES.values():
        raise ValueError(
            f"authors_layout: the MoNE authors' code has no model type for "
            f"{model_type!r} (it has {', '.join(AUTHORS_MODEL_TYPES)}); save "
            f"this model in this package's layout (authors_layout: false)"
        )


def check_not_pruned(model: torch.nn.Module):
    """Refuse a model MoNE has already pruned: its novices would be measured
    as experts, and sparsities would compound unnoticed."""
    pruned = recorded_novices(model.config)
    if pruned or any(
        isinstance(m, (NoviceExpert, NoviceMoEExperts)) for m in model.modules()
    ):
        layers = sorted(pruned) or "some"
        raise ValueError(
            f"this model was already pruned by MoNE ({layers} layers have novices). "
            f"Prune the original checkpoint instead, with the total `sparsity` "
            f"you want."
        )


def refuse_pruned_checkpoints_in_oneshot():
    """
    Make ``oneshot(model=<path>)`` refuse a saved MoNE checkpoint before
    transformers loads it. Transformers cannot build a model whose experts
    are missing: it fails with a message about mismatched sizes, or loads
    random experts (Mixtral, GPT-OSS), so ``check_not_pruned`` would come too
    late. llm-compressor 0.14 has no hook before it loads a model by path;
    this wraps the function it loads with (``tests/test_bad_input.py`` pins
    that it is still called).
    """
    load = entrypoint_utils.initialize_model_from_path

    def initialize_model_from_path(model_args):
        _check_path_not_pruned(model_args.model)
        return load(model_args)

    entrypoint_utils.initialize_model_from_path = initialize_model_from_path


def explain_linearisation_failures():
    """
    Make a failure of llm-compressor's MoE linearisation in ``oneshot`` name
    the model family and what it means. oneshot linearises the experts
    before any modifier exists, so for families whose experts llm-compressor
    0.14 cannot convert (Llama 4's text model, for one) the user would
    otherwise meet a bare AttributeError from inside llm-compressor. Nothing
    is calibrated yet when it fails. This wraps the function oneshot calls
    (``tests/test_every_family.py`` shows the message on such a family).
    """
    # the module, not the ``oneshot`` function the package exports by its name
    oneshot_entrypoint = importlib.import_module("llmcompressor.entrypoints.oneshot")
    linearize = oneshot_entrypoint.linearize_moe

    def linearize_moe(model):
        try:
            return linearize(model)
        except Exception as error:
            raise ValueError(
                f"llm-compressor 0.14 cannot linearise the experts of this "
                f"{model.config.model_type} model ({type(error).__name__}: "
                f"{error}). Expert pruning (MoNE, REAP) and quantization of "
                f"per-expert Linears need linearised experts, so oneshot cannot "
                f"run them on this family; the families MoNE prunes are in the "
                f"README's family table."
            ) from error

    oneshot_entrypoint.linearize_moe = linearize_moe


def _check_path_not_pruned(model: str | Path):
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return
    config = AutoConfig.from_pretrained(model)
    try:
        num_experts = expert_count(config.get_text_config())
    except ValueError:  # no MoE model: nothing MoNE could have pruned
        return
    if novices := read_novices(config, num_experts):
        raise ValueError(
            f"{model} is a checkpoint MoNE already pruned (layers {sorted(novices)} "
            f"have novices); oneshot cannot load it by path. Prune the original "
            f"checkpoint instead, with the total `sparsity` you want and any "
            f"quantization in the same recipe (e.g. recipes/mone_w4.yaml)."
        )


def check_recipe_order(modifier: Modifier):
    """Refuse MoNE after a quantization modifier in the same recipe: it would
    measure quantized experts, and the quantizer would already have spent its
    work on experts MoNE then replaces."""
    modifiers = active_session().lifecycle.recipe.modifiers
    earlier = modifiers[: next(i for i, m in enumerate(modifiers) if m is modifier)]
    quantizers = [type(m).__name__ for m in earlier if isinstance(m, QuantizationMixin)]
    if quantizers:
        raise ValueError(
            f"MoNEPruningModifier comes after {', '.join(quantizers)} in the recipe. "
            f"Put it first: prune the experts, then quantize what remains."
        )


def check_rank_data(dataloader: DataLoader):
    """
    Under torchrun, refuse calibration data that every rank would read
    identically. llm-compressor 0.14 partitions a dataset that all ranks
    share, but its DataLoader indexes the whole dataset with the partition's
    positions, so every rank calibrates on the first share: the statistics
    would silently cover one share, counted once per rank.
    """
    fingerprint = getattr(dataloader.dataset, "_fingerprint", None)
    if not is_distributed() or fingerprint is None:
        return
    fingerprints = [None] * dist.get_world_size()
    dist.all_gather_object(fingerprints, fingerprint)
    if len(set(fingerprints)) == 1:
        raise ValueError(
            "every rank was given the same calibration `dataset`, and "
            "llm-compressor 0.14 would then calibrate every rank on the same "
            "samples. Give each rank its own share, e.g. "
            "dataset.shard(num_shards=dist.get_world_size(), "
            "index=dist.get_rank(), contiguous=True), or load it with "
            "split=get_rank_partition(split, num_samples)."
        )


def check_calibration_tokens(dataloader: DataLoader, num_experts: int, top_k: int):
    """
    Refuse calibration data that cannot measure the experts: none at all,
    samples without a real token (llm-compressor fails on empty ones deep in
    tracing, and MoNE would measure padding as text), or fewer routed tokens,
    over all ranks, than two per expert (the least that gives a variance).
    """
    if len(dataloader) == 0:
        raise ValueError(
            "the calibration `dataset` is empty: pass samples, and a "
            "`num_calibration_samples` of at least 1"
        )
    rows = dataloader.dataset
    if "input_ids" not in getattr(rows, "column_names", ()):
        return
    lengths = _real_tokens_per_row(rows)
    if empty := np.flatnonzero(lengths == 0).tolist():
        raise ValueError(
            f"calibration samples {empty[:10]}{' ...' if len(empty) > 10 else ''} "
            f"of the `dataset` hold no real token (empty, or all padding). "
            f"Drop them, e.g. dataset.filter(lambda s: len(s['text'].strip()) > 0)"
        )
    tokens = int(lengths.sum())
    if is_distributed():
        counts = [0] * dist.get_world_size()
        dist.all_gather_object(counts, tokens)
        tokens = sum(counts)
    if tokens * top_k < 2 * num_experts:
        raise ValueError(
            f"the calibration `dataset` holds {tokens} tokens, too few to measure "
            f"{num_experts} experts routed top-{top_k}: each needs at least two "
            f"routed tokens, so at least {-(-2 * num_experts // top_k)} tokens. "
            f"Pass more or longer samples (`num_calibration_samples`, "
            f"`max_seq_length`)"
        )


def _real_tokens_per_row(rows: Dataset) -> np.ndarray:
    """Tokens under the attention mask (or all tokens) of every row, counted
    in arrow: a calibration set can hold millions of tokens."""
    table = rows.with_format("arrow")
    if "attention_mask" not in rows.column_names:
        return pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    masks = table["attention_mask"].combine_chunks()
    flat = pc.list_flatten(masks).to_numpy(zero_copy_only=False)
    row_of = pc.list_parent_indices(masks).to_numpy(zero_copy_only=False)
    return np.bincount(row_of, weights=flat, minlength=len(masks)).astype(np.int64)
