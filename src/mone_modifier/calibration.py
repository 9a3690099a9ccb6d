"""
From what the calibration hooks see to rows of (expert, output, weight).

The experts module receives ``(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k])``; each expert then sees either its routed rows, in
``LinearExperts2D``'s slot-major order, or all T rows when
``moe_calibrate_all_experts`` is on. A ``RoutedBatch`` is opened when the
experts module is entered, collects each expert's routed outputs (no
arithmetic per expert), and is flattened once when the module returns, so
the statistics update is one vectorised step per layer and batch.
"""

from dataclasses import dataclass, field

import torch
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

__all__ = ["RoutedBatch"]


@dataclass
class RoutedBatch:
    """
    One batch of one MoE layer.

    :param token_index: expert id -> ``[n_i]`` indices of its routed tokens
    :param weights: expert id -> ``[n_i]`` their routing weights
    :param outputs: expert id -> ``[n_i, H]`` its outputs on those tokens
    """

    token_index: tuple[torch.Tensor, ...]
    weights: tuple[torch.Tensor, ...]
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def from_routing(
        cls, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
    ) -> "RoutedBatch":
        num_tokens = top_k_index.shape[0]
        # slot-major flattening is the order torch.where yields in
        # LinearExperts2D, so routed outputs and weights line up row by row
        flat_experts = top_k_index.T.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
        return cls(
            token_index=(order % num_tokens).split(counts),
            weights=top_k_weights.T.reshape(-1)[order].split(counts),
        )

    def record(self, expert: int, output: torch.Tensor):
        """Keep an expert's outputs on its routed tokens."""
        output = output.reshape(-1, output.shape[-1])
        if get_calibrate_all_experts_flag():
            output = output[self.token_index[expert]]
        self.outputs[expert] = output

    def flatten(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(expert_ids [R], outputs [R, H], weights [R])`` of recorded experts."""
        experts = list(self.outputs)
        outputs = [self.outputs[e] for e in experts]
        expert_ids = torch.cat(
            [
                torch.full((len(o),), e, device=o.device)
                for e, o in zip(experts, outputs)
            ]
        )
        weights = torch.cat([self.weights[e] for e in experts])
        return expert_ids, torch.cat(outputs), weights
