"""
From what the calibration hooks see to per-expert rows.

The experts module receives ``(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k])``; each expert then sees either its routed rows, in
``LinearExperts2D``'s slot-major order, or all T rows when
``moe_calibrate_all_experts`` is on. ``split_routing`` does the per-expert
bookkeeping once per layer and batch with a single device sync.
"""

from dataclasses import dataclass

import torch
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

__all__ = ["ExpertRouting", "split_routing", "routed_rows"]


@dataclass
class ExpertRouting:
    """
    The current batch's routing, per expert.

    :param token_index: expert id -> ``[n_i]`` indices of its routed tokens
    :param weights: expert id -> ``[n_i]`` their routing weights
    """

    token_index: tuple[torch.Tensor, ...]
    weights: tuple[torch.Tensor, ...]


@torch.no_grad()
def split_routing(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> ExpertRouting:
    num_tokens = top_k_index.shape[0]
    # slot-major flattening is the order torch.where yields in LinearExperts2D,
    # so routed outputs and these weights line up row by row
    flat_experts = top_k_index.T.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    return ExpertRouting(
        token_index=(order % num_tokens).split(counts),
        weights=top_k_weights.T.reshape(-1)[order].split(counts),
    )


def routed_rows(
    output: torch.Tensor, routing: ExpertRouting, expert: int
) -> torch.Tensor:
    """An expert's outputs on its routed tokens, ``[n_i, H]``."""
    output = output.reshape(-1, output.shape[-1])
    if get_calibrate_all_experts_flag():
        return output[routing.token_index[expert]]
    return output
