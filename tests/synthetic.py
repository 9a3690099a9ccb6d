"""Synthetic routing and expert outputs for the statistics and scoring tests."""

import torch

from mone_modifier.statistics import LayerStatistics


def make_data(
    tokens: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    seed: int,
    unused: tuple[int, ...] = (),
) -> dict:
    """
    Random routing with ``top_k`` distinct experts per token (never one of
    ``unused``), positive routing weights, and outputs of every expert on
    every token with a non-zero mean and an expert-specific scale.
    """
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused])
    index = torch.stack(
        [
            allowed[torch.randperm(len(allowed), generator=gen)[:top_k]]
            for _ in range(tokens)
        ]
    )
    weights = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64) + 0.05
    offset = torch.randn(num_experts, hidden, generator=gen, dtype=torch.float64) * 3
    scale = torch.rand(num_experts, 1, generator=gen, dtype=torch.float64) * 2 + 0.1
    outputs = (
        torch.randn(tokens, num_experts, hidden, generator=gen, dtype=torch.float64)
        * scale
        + offset
    )
    return dict(index=index, weights=weights, outputs=outputs, num_experts=num_experts)


def feed(stats: LayerStatistics, data: dict, token_ids, dtype=None) -> LayerStatistics:
    """One batch: routing first, then all experts' routed outputs at once."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    index = data["index"][ids]
    weights = data["weights"][ids]
    outputs = data["outputs"][ids]
    if dtype is not None:
        weights, outputs = weights.to(dtype), outputs.to(dtype)
    stats.add_routing(index, weights)
    # every (token, slot) pair of the batch in one call, experts interleaved
    rows, slot = torch.meshgrid(
        torch.arange(index.shape[0]), torch.arange(index.shape[1]), indexing="ij"
    )
    rows, slot = rows.reshape(-1), slot.reshape(-1)
    experts = index[rows, slot]
    stats.add_routed_outputs(experts, outputs[rows, experts], weights[rows, slot])
    return stats
