"""
Expert redundancy scores and the choice of which experts become novices.

Lower score = more redundant. Selection is a greedy walk over experts in
(never routed first, score, layer, expert id) order that respects capacity
limits: how many experts a layer, or (when ``drop`` shrinks a group-limited
router) a routing group within a layer, may lose. Both scopes (per layer,
whole model) use the same walk with different limits; with novices and
``scope: layer`` it takes exactly the ``P`` lowest-scoring experts of each
layer, the method's rule.
"""

import random
from dataclasses import dataclass
from math import ceil
from typing import Hashable, Literal

import torch

from mone_modifier.statistics import LayerStatistics

__all__ = [
    "Scoring",
    "PruningBudget",
    "check_rankable",
    "expert_scores",
    "plan_budget",
    "select_novices",
]

Scoring = Literal["mone", "frequency", "variance", "reap", "random"]


def check_rankable(name: str, index: int, stats: LayerStatistics):
    """Refuse a layer whose statistics cannot rank its experts."""
    if stats.tokens == 0:
        raise ValueError(
            f"MoNE layer {index} ({name}): no calibration token reached it, so "
            f"its experts cannot be ranked; llm-compressor's calibration "
            f"pipeline did not run it. Try oneshot(..., pipeline='basic')."
        )
    if bad := stats.non_finite_experts():
        raise ValueError(
            f"MoNE layer {index}: experts {bad} produced NaN or inf outputs on "
            f"the calibration data, so no statistic of theirs can rank them. "
            f"Check the checkpoint's weights, or load a float16 model in "
            f"bfloat16 or float32 to avoid overflow."
        )


def expert_scores(
    stats: LayerStatistics, scoring: Scoring, seed: int, layer_index: int
) -> torch.Tensor:
    """
    Per-expert redundancy score of one layer, float64 on the CPU.

    - ``mone``: frequency x output std (the paper's fused score)
    - ``frequency``: mean routing weight over all tokens
    - ``variance``: output std ``||sqrt(var)||_2`` alone
    - ``reap``: REAP saliency ``mean_{X_i} g ||f||``
    - ``random``: uniform draws seeded by ``(seed, layer_index)``
    """
    if scoring == "mone":
        score = stats.frequency * stats.output_std
    elif scoring == "frequency":
        score = stats.frequency
    elif scoring == "variance":
        score = stats.output_std
    elif scoring == "reap":
        score = stats.saliency
    elif scoring == "random":
        rng = random.Random(f"{seed}:{layer_index}")
        score = torch.tensor(
            [rng.random() for _ in range(stats.num_experts)], dtype=torch.float64
        )
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    return score.to("cpu", torch.float64)


@dataclass(frozen=True)
class PruningBudget:
    """
    How many experts each MoE layer gives up, and the limits that keep its
    router meaningful.

    :param num_experts: routed experts per layer, E
    :param per_layer: experts replaced in each layer, ``round(sparsity * E)``
    :param layer_limit: most experts a single layer may lose (model scope)
    :param group_size: experts per routing group, or None without groups
    :param group_limit: most experts one routing group may lose
    """

    num_experts: int
    per_layer: int
    layer_limit: int
    group_size: int | None = None
    group_limit: int | None = None


def plan_budget(
    sparsity: float,
    num_experts: int,
    top_k: int,
    n_group: int | None,
    topk_group: int | None,
    drop: bool,
) -> PruningBudget:
    """
    Turn ``sparsity`` into a per-layer count and capacity limits, or explain
    why it cannot work, before any calibration.

    Novices keep the router full width: it still routes to every expert of
    every group, so routing groups set no limit, and every layer only has to
    keep top_k real experts. Dropping experts shrinks the router, whose group
    view needs the same number of experts in every group: each group then
    loses ``P / n_group`` and keeps enough to rank (two) and fill top_k.
    """
    per_layer = round(sparsity * num_experts)
    if per_layer == 0:
        raise ValueError(
            f"sparsity={sparsity} replaces round({sparsity} * {num_experts}) = 0 "
            f"of the {num_experts} experts per layer. Raise `sparsity` to at "
            f"least {0.5 / num_experts:.4f}."
        )
    if num_experts - per_layer < top_k:
        raise ValueError(
            f"sparsity={sparsity} would keep {num_experts - per_layer} of "
            f"{num_experts} experts per layer, fewer than the router's "
            f"top_k={top_k}. Lower `sparsity` to at most "
            f"{(num_experts - top_k) / num_experts:.4f}."
        )
    if n_group is None or not drop:
        return PruningBudget(num_experts, per_layer, num_experts - top_k)

    group_size = num_experts // n_group
    if per_layer % n_group:
        raise ValueError(
            f"novice: drop shrinks a group-limited router (n_group={n_group}), "
            f"which needs every group to lose the same number of experts, but "
            f"sparsity={sparsity} drops {per_layer} of {num_experts}. Choose "
            f"`sparsity` so that round(sparsity * {num_experts}) is a multiple "
            f"of {n_group}, or use a novice mode that keeps the router."
        )
    group_limit = per_layer // n_group
    # DeepSeek-V3's router ranks groups by the sum of their top two scores
    min_kept = max(2, ceil(top_k / topk_group))
    if group_size - group_limit < min_kept:
        raise ValueError(
            f"sparsity={sparsity} would leave fewer than {min_kept} experts in some "
            f"of the {n_group} routing groups of {group_size} experts; the router "
            f"picks top_k={top_k} experts from topk_group={topk_group} groups. "
            f"Lower `sparsity` to at most "
            f"{n_group * (group_size - min_kept) / num_experts:.4f}."
        )
    return PruningBudget(
        num_experts, per_layer, num_experts - top_k, group_size, group_limit
    )


def select_novices(
    scores: dict[int, torch.Tensor],
    routed: dict[int, torch.Tensor],
    budget: PruningBudget,
    model_wide: bool,
) -> dict[int, list[int]]:
    """
    Choose the experts to replace.

    :param scores: layer index -> ``[E]`` scores
    :param routed: layer index -> ``[E]`` bool, expert saw a calibration token
    :param budget: per-layer count and capacity limits
    :param model_wide: one ranking over all given layers (total
        ``per_layer * layers``, each layer at most ``layer_limit``) instead of
        ``per_layer`` in each layer
    :return: layer index -> sorted expert ids to replace
    """
    layers = sorted(scores)
    if model_wide:
        return _greedy(scores, routed, layers, budget, budget.per_layer * len(layers))
    return {
        layer: _greedy(scores, routed, [layer], budget, budget.per_layer)[layer]
        for layer in layers
    }


def _greedy(
    scores: dict[int, torch.Tensor],
    routed: dict[int, torch.Tensor],
    layers: list[int],
    budget: PruningBudget,
    count: int,
) -> dict[int, list[int]]:
    candidates = sorted(
        (bool(routed[layer][e]), float(scores[layer][e]), layer, e)
        for layer in layers
        for e in range(budget.num_experts)
    )
    used: dict[Hashable, int] = {}
    chosen: dict[int, list[int]] = {layer: [] for layer in layers}
    taken = 0
    for _, _, layer, expert in candidates:
        if taken == count:
            break
        caps = [(("layer", layer), budget.layer_limit)]
        if budget.group_size is not None:
            group = ("group", layer, expert // budget.group_size)
            caps.append((group, budget.group_limit))
        if any(used.get(key, 0) >= cap for key, cap in caps):
            continue
        for key, _ in caps:
            used[key] = used.get(key, 0) + 1
        chosen[layer].append(expert)
        taken += 1
    return {layer: sorted(ids) for layer, ids in chosen.items()}
