"""
Checks on the model and the recipe that MoNE runs before any calibration
work, so a wrong set-up fails at once with the fix in the message.
"""

import torch
from compressed_tensors.distributed import is_distributed
from llmcompressor.core import active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from torch import distributed as dist
from torch.utils.data import DataLoader

from mone_modifier.loading import NoviceMoEExperts
from mone_modifier.metadata import recorded_novices
from mone_modifier.novice import NoviceExpert

__all__ = ["check_not_pruned", "check_rank_data", "check_recipe_order"]


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
