"""
Novice experts: the constant vectors that replace pruned experts.

A novice sits in the pruned expert's slot of the linearised experts module,
so llm-compressor's ``LinearExperts2D`` routes to it unchanged and multiplies
its constant by the routing weight. It is not an ``nn.Linear``, so no
quantization modifier ever targets it, and its vector is a buffer named
``approx_value``: the state-dict key is then exactly the checkpoint's
``<experts prefix>.<expert id>.approx_value``.
"""

from typing import Literal

import torch
from compressed_tensors.offload import (
    disable_onloading,
    get_execution_device,
    register_offload_module,
)
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

from mone_format import NOVICE_TENSOR
from mone_modifier.statistics import LayerStatistics

__all__ = ["NoviceKind", "NoviceExpert", "novice_values", "replace_with_novices"]

NoviceKind = Literal["mean", "weighted_mean", "zero", "drop"]


class NoviceExpert(torch.nn.Module):
    """Outputs ``approx_value`` (``[hidden_size]``) for every token."""

    def __init__(self, approx_value: torch.Tensor):
        super().__init__()
        self.register_buffer(NOVICE_TENSOR, approx_value)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.approx_value.expand(*hidden_states.shape[:-1], -1)


@torch.no_grad()
def replace_with_novices(experts: LinearExperts2D, values: dict[int, torch.Tensor]):
    """
    Put a novice in each given expert slot, in the replaced expert's dtype and
    device and under the experts module's offloading; the expert's weights are
    released with it.

    :param experts: linearised experts of one layer
    :param values: expert id -> ``[hidden_size]`` novice vector
    """
    device = get_execution_device(experts)
    for expert_id, value in values.items():
        with disable_onloading():
            dtype = next(experts[expert_id].parameters()).dtype
        novice = NoviceExpert(value.to(device, dtype))
        register_offload_module(experts, str(expert_id), novice)


def novice_values(
    stats: LayerStatistics, expert_ids: list[int], kind: NoviceKind
) -> dict[int, torch.Tensor]:
    """
    The float64 vector each replaced expert becomes.

    - ``mean``: the expert's mean output over its routed tokens (the paper's)
    - ``weighted_mean``: ``sum g^2 f / sum g^2``, least routing-weighted error
    - ``zero``: nothing (ablation)

    An expert never routed during calibration gets the zero vector in every
    mode.
    """
    if kind == "mean":
        table = stats.mean
    elif kind == "weighted_mean":
        table = stats.weighted_mean
    elif kind == "zero":
        table = torch.zeros_like(stats.mean)
    else:
        raise ValueError(f"novice {kind!r} has no vector")
    return {i: table[i].cpu() for i in expert_ids}
