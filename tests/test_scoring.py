"""
Redundancy scores, the sparsity budget and the choice of novices, against
values computed directly in the test (raw data, brute force over subsets, an
independent greedy).
"""

import random
from collections import Counter
from itertools import combinations

import pytest
import torch

from mone_modifier.scoring import (
    PruningBudget,
    expert_scores,
    plan_budget,
    select_novices,
)
from mone_modifier.statistics import LayerStatistics
from synthetic import feed, make_data

# -- expert_scores ------------------------------------------------------------------


def raw_layer(tokens=120, num_experts=8, top_k=2, hidden=5, seed=0, unused=()):
    """Random routing and outputs, the LayerStatistics fed from them, and
    the direct float64 frequency / std / saliency per expert."""
    data = make_data(tokens, num_experts, top_k, hidden, seed, unused)
    index, weights = data["index"], data["weights"]
    stats = LayerStatistics.empty(num_experts, hidden)
    for lo in range(0, tokens, 37):
        feed(stats, data, range(lo, min(lo + 37, tokens)))

    freq = torch.zeros(num_experts, dtype=torch.float64)
    std = torch.zeros(num_experts, dtype=torch.float64)
    saliency = torch.zeros(num_experts, dtype=torch.float64)
    for e in range(num_experts):
        rows, slot = (index == e).nonzero(as_tuple=True)
        g = weights[rows, slot]
        freq[e] = g.sum() / tokens
        if len(rows) == 0:
            continue
        f = data["outputs"][rows, e]
        std[e] = torch.var(f, dim=0, unbiased=False).sqrt().square().sum().sqrt()
        saliency[e] = (g * f.square().sum(1).sqrt()).mean()
    return stats, dict(frequency=freq, output_std=std, saliency=saliency)


CLOSE = dict(rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_raw_data(seed):
    stats, raw = raw_layer(seed=seed, unused=(5,))
    expected = {
        "mone": raw["frequency"] * raw["output_std"],
        "frequency": raw["frequency"],
        "variance": raw["output_std"],
        "reap": raw["saliency"],
    }
    for scoring, want in expected.items():
        got = expert_scores(stats, scoring, seed=0, layer_index=3)
        assert got.dtype == torch.float64 and got.device.type == "cpu", scoring
        assert got.shape == (8,), scoring
        torch.testing.assert_close(got, want, **CLOSE, msg=scoring)
        assert got[5] == 0, scoring  # never routed
    # the scorings really differ on this data (a swapped branch would show)
    assert not torch.allclose(expected["mone"], expected["frequency"])
    assert not torch.allclose(expected["variance"], expected["reap"])


def test_scores_match_statistics_properties():
    stats, _ = raw_layer(seed=4)
    torch.testing.assert_close(
        expert_scores(stats, "mone", 0, 0),
        stats.frequency * stats.output_std,
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        expert_scores(stats, "frequency", 0, 0), stats.frequency, rtol=0, atol=0
    )
    torch.testing.assert_close(
        expert_scores(stats, "variance", 0, 0), stats.output_std, rtol=0, atol=0
    )
    torch.testing.assert_close(
        expert_scores(stats, "reap", 0, 0), stats.saliency, rtol=0, atol=0
    )


def test_non_random_scores_ignore_seed_and_layer():
    stats, _ = raw_layer(seed=5)
    for scoring in ("mone", "frequency", "variance", "reap"):
        assert torch.equal(
            expert_scores(stats, scoring, 0, 0), expert_scores(stats, scoring, 99, 7)
        ), scoring


def test_random_scores_deterministic_and_seeded_by_seed_and_layer():
    stats, _ = raw_layer(seed=6)
    other_stats = LayerStatistics.empty(8, 2)  # same E, different content
    base = expert_scores(stats, "random", seed=3, layer_index=2)
    assert base.dtype == torch.float64 and base.shape == (8,)
    assert torch.equal(base, expert_scores(stats, "random", seed=3, layer_index=2))
    assert torch.equal(
        base, expert_scores(other_stats, "random", seed=3, layer_index=2)
    )
    assert not torch.equal(base, expert_scores(stats, "random", seed=4, layer_index=2))
    assert not torch.equal(base, expert_scores(stats, "random", seed=3, layer_index=1))
    # (seed, layer) is not collapsed into one number, e.g. a sum
    assert not torch.equal(
        expert_scores(stats, "random", seed=1, layer_index=2),
        expert_scores(stats, "random", seed=2, layer_index=1),
    )
    for seed in range(5):
        for layer in range(5):
            s = expert_scores(stats, "random", seed=seed, layer_index=layer)
            assert (s >= 0).all() and (s < 1).all()
            assert len(set(s.tolist())) == 8  # no ties on 8 draws


def test_random_scores_are_float64_draws_in_unit_interval():
    """Regression: the draws were once stored in float32, where the draw of
    expert 162853 for (seed=0, layer_index=1), 0.99999997899..., rounds to 1.0."""
    num_experts = 162854
    stats = LayerStatistics.empty(num_experts, 1)
    scores = expert_scores(stats, "random", seed=0, layer_index=1)
    assert scores.dtype == torch.float64
    assert scores.max() > 1 - 2**-25  # the draw that float32 would round up
    assert (scores >= 0).all() and (scores < 1).all()


def test_unknown_scoring_raises():
    stats, _ = raw_layer(seed=7)
    with pytest.raises(ValueError):
        expert_scores(stats, "bogus", 0, 0)


# -- plan_budget ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sparsity, num_experts, top_k, per_layer",
    [
        (0.25, 64, 8, 16),
        (0.5, 64, 8, 32),
        (0.5, 8, 2, 4),
        (0.3, 10, 2, 3),
        (0.34, 10, 2, 3),
        (0.36, 10, 2, 4),
        (0.75, 8, 2, 6),  # keeps exactly top_k
        (0.07, 8, 2, 1),  # 0.56 rounds up
        (0.1, 60, 4, 6),
    ],
)
def test_plan_budget_without_groups(sparsity, num_experts, top_k, per_layer):
    budget = plan_budget(sparsity, num_experts, top_k, None, None, drop=False)
    assert budget == PruningBudget(num_experts, per_layer, num_experts - top_k)
    assert budget.group_size is None and budget.group_limit is None
    drop = plan_budget(sparsity, num_experts, top_k, None, None, drop=True)
    assert drop == budget


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize(
    "sparsity, num_experts", [(0.01, 8), (0.06, 8), (0.0, 64), (0.007, 64)]
)
def test_plan_budget_rejects_zero_experts(sparsity, num_experts, drop):
    with pytest.raises(ValueError, match="`sparsity`"):
        plan_budget(sparsity, num_experts, 2, None, None, drop=drop)


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize(
    "sparsity, num_experts, top_k",
    [(0.85, 8, 2), (1.0, 8, 2), (0.9, 64, 8), (0.5, 8, 6)],
)
def test_plan_budget_rejects_fewer_than_top_k(sparsity, num_experts, top_k, drop):
    assert num_experts - round(sparsity * num_experts) < top_k
    with pytest.raises(ValueError, match="`sparsity`"):
        plan_budget(sparsity, num_experts, top_k, None, None, drop=drop)


@pytest.mark.parametrize(
    "num_experts, n_group, top_k, topk_group",
    [(8, 4, 2, 2), (8, 2, 2, 1), (16, 4, 3, 2), (256, 8, 8, 4), (64, 8, 6, 3)],
)
def test_novices_set_no_group_limit(num_experts, n_group, top_k, topk_group):
    """Novices keep the router full width: a group-limited router routes to
    every expert as before, so only top_k real experts per layer must stay."""
    for per_layer in range(1, num_experts + 1):
        sparsity = per_layer / num_experts
        if num_experts - per_layer >= top_k:
            budget = plan_budget(
                sparsity, num_experts, top_k, n_group, topk_group, drop=False
            )
            assert budget == PruningBudget(num_experts, per_layer, num_experts - top_k)
        else:
            with pytest.raises(ValueError, match="`sparsity`"):
                plan_budget(
                    sparsity, num_experts, top_k, n_group, topk_group, drop=False
                )


def test_plan_budget_drop_with_groups():
    budget = plan_budget(0.5, 16, 2, 4, 2, drop=True)
    assert budget == PruningBudget(16, 8, 14, 4, 2)
    budget = plan_budget(0.25, 256, 8, 8, 4, drop=True)
    assert budget == PruningBudget(256, 64, 248, 32, 8)
    budget = plan_budget(0.25, 16, 2, 4, 2, drop=True)
    assert budget.per_layer == 4 and budget.group_limit == 1


@pytest.mark.parametrize("sparsity", [0.375, 0.0625, 0.125, 0.625])
def test_plan_budget_drop_requires_multiple_of_n_group(sparsity):
    assert round(sparsity * 16) % 4 != 0
    with pytest.raises(ValueError, match="n_group"):
        plan_budget(sparsity, 16, 2, 4, 2, drop=True)
    # the novice modes keep the router and accept the same sparsity
    assert plan_budget(sparsity, 16, 2, 4, 2, drop=False).per_layer == round(
        sparsity * 16
    )


def test_plan_budget_drop_leaves_too_few_per_group():
    # groups of 2 lose 1 each in drop mode, leaving 1 < 2 (group top-2 ranking)
    with pytest.raises(ValueError, match="`sparsity`"):
        plan_budget(0.5, 8, 2, 4, 2, drop=True)


# -- select_novices ------------------------------------------------------------------


def as_inputs(scores: dict, routed: dict | None = None):
    s = {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}
    if routed is None:
        r = {k: torch.ones(len(v), dtype=torch.bool) for k, v in scores.items()}
    else:
        r = {k: torch.tensor(v, dtype=torch.bool) for k, v in routed.items()}
    return s, r


def test_layer_scope_picks_lowest_per_layer():
    gen = torch.Generator().manual_seed(0)
    scores = {
        layer: torch.rand(16, generator=gen, dtype=torch.float64) for layer in (0, 1, 5)
    }
    routed = {layer: torch.ones(16, dtype=torch.bool) for layer in scores}
    budget = plan_budget(0.25, 16, 2, None, None, drop=False)
    chosen = select_novices(scores, routed, budget, model_wide=False)
    assert set(chosen) == {0, 1, 5}
    for layer, s in scores.items():
        expected = sorted(torch.topk(s, 4, largest=False).indices.tolist())
        assert chosen[layer] == expected


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_novices_on_group_limited_routers_take_the_lowest_scores(sparsity):
    """The paper's rule, whatever the routing groups: each layer replaces its
    P lowest-scoring experts (never-routed first, ties by id), even when they
    all sit in one group (8 experts in 2 groups, top-2 from 1 group)."""
    gen = torch.Generator().manual_seed(1)
    scores = {
        layer: torch.rand(8, generator=gen, dtype=torch.float64) for layer in range(64)
    }
    scores[64] = torch.tensor(
        [0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0], dtype=torch.float64
    )
    routed = {layer: torch.rand(8, generator=gen) < 0.9 for layer in scores}
    routed[64] = torch.ones(8, dtype=torch.bool)
    budget = plan_budget(sparsity, 8, 2, 2, 1, drop=False)
    chosen = select_novices(scores, routed, budget, model_wide=False)
    count = round(sparsity * 8)
    for layer in scores:
        rule = sorted(
            range(8), key=lambda e: (bool(routed[layer][e]), float(scores[layer][e]), e)
        )
        assert chosen[layer] == sorted(rule[:count])
    # the case a per-group cap would change: the lowest all in group 0
    assert chosen[64] == list(range(count))


def test_layer_scope_is_per_layer_not_global():
    # layer 0 scores are all below layer 1's; each layer still loses per_layer
    scores, routed = as_inputs({0: [0.1, 0.2, 0.3, 0.4], 1: [9.0, 8.0, 7.0, 6.0]})
    budget = PruningBudget(num_experts=4, per_layer=2, layer_limit=3)
    assert select_novices(scores, routed, budget, model_wide=False) == {
        0: [0, 1],
        1: [2, 3],
    }


def test_never_routed_picked_first_even_with_higher_score():
    scores, routed = as_inputs(
        {0: [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.8, 0.7]},
        {0: [1, 1, 1, 1, 1, 0, 0, 1]},
    )
    budget = PruningBudget(num_experts=8, per_layer=2, layer_limit=6)
    assert select_novices(scores, routed, budget, False) == {0: [5, 6]}
    budget3 = PruningBudget(num_experts=8, per_layer=3, layer_limit=6)
    assert select_novices(scores, routed, budget3, False) == {0: [0, 5, 6]}
    # more unrouted than per_layer: the lowest-scored of them
    scores, routed = as_inputs(
        {0: [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.8, 0.7]},
        {0: [1, 1, 1, 1, 1, 0, 0, 0]},
    )
    assert select_novices(scores, routed, budget, False) == {0: [6, 7]}


def test_ties_broken_by_lower_expert_id():
    scores, routed = as_inputs(
        {0: [0.5] * 8, 1: [1.0, 0.2, 0.2, 0.2, 0.1, 0.2, 0.3, 0.2]}
    )
    budget = PruningBudget(num_experts=8, per_layer=3, layer_limit=6)
    expected = {0: [0, 1, 2], 1: [1, 2, 4]}
    for _ in range(3):
        assert select_novices(scores, routed, budget, False) == expected
    # ties among never-routed experts too
    scores, routed = as_inputs({0: [0.0] * 8}, {0: [1, 1, 0, 1, 0, 0, 1, 0]})
    assert select_novices(scores, routed, budget, False) == {0: [2, 4, 5]}


def test_selection_returns_sorted_python_ints():
    scores, routed = as_inputs({2: [0.9, 0.1, 0.8, 0.05, 0.7, 0.3]})
    budget = PruningBudget(num_experts=6, per_layer=3, layer_limit=4)
    chosen = select_novices(scores, routed, budget, False)
    assert chosen == {2: [1, 3, 5]}
    assert all(type(e) is int for e in chosen[2])


# reference implementations written independently of the package


def rank_key(scores, routed, layer, e):
    return (bool(routed[layer][e]), float(scores[layer][e]), layer, e)


def brute_force(scores, routed, layers, budget, count):
    """Among all feasible sets of ``count`` experts (over ``layers``), the one
    whose sorted ranking keys are lexicographically smallest."""
    items = [(layer, e) for layer in layers for e in range(budget.num_experts)]
    best, best_key = None, None
    for subset in combinations(items, count):
        per_layer = Counter(layer for layer, _ in subset)
        if any(n > budget.layer_limit for n in per_layer.values()):
            continue
        if budget.group_size is not None:
            per_group = Counter((layer, e // budget.group_size) for layer, e in subset)
            if any(n > budget.group_limit for n in per_group.values()):
                continue
        key = sorted(rank_key(scores, routed, layer, e) for layer, e in subset)
        if best_key is None or key < best_key:
            best, best_key = subset, key
    assert best is not None, "no feasible set"
    out = {layer: [] for layer in layers}
    for layer, e in best:
        out[layer].append(e)
    return {layer: sorted(ids) for layer, ids in out.items()}


def independent_greedy(scores, routed, layers, budget, count):
    ranking = sorted(
        ((layer, e) for layer in layers for e in range(budget.num_experts)),
        key=lambda item: rank_key(scores, routed, *item),
    )
    layer_used, group_used = Counter(), Counter()
    out = {layer: [] for layer in layers}
    total = 0
    for layer, e in ranking:
        if total >= count:
            break
        if layer_used[layer] >= budget.layer_limit:
            continue
        group = (layer, e // budget.group_size) if budget.group_size else None
        if group is not None and group_used[group] >= budget.group_limit:
            continue
        layer_used[layer] += 1
        if group is not None:
            group_used[group] += 1
        out[layer].append(e)
        total += 1
    return {layer: sorted(ids) for layer, ids in out.items()}


def assert_within_limits(chosen, budget):
    for layer, ids in chosen.items():
        assert len(ids) == len(set(ids))
        assert all(0 <= e < budget.num_experts for e in ids)
        assert len(ids) <= budget.layer_limit
        if budget.group_size is not None:
            per_group = Counter(e // budget.group_size for e in ids)
            assert max(per_group.values(), default=0) <= budget.group_limit, (
                layer,
                ids,
            )


def random_case(rng: random.Random, layers, num_experts):
    # few distinct values so that ties are common
    scores = {
        layer: torch.tensor(
            [float(rng.randrange(4)) for _ in range(num_experts)], dtype=torch.float64
        )
        for layer in layers
    }
    routed = {
        layer: torch.tensor([rng.random() < 0.8 for _ in range(num_experts)])
        for layer in layers
    }
    return scores, routed


GROUP_SETUPS = [
    # (num_experts, top_k, n_group, topk_group, per_layer, drop)
    (8, 2, 4, 2, 1, False),
    (8, 2, 4, 2, 3, False),
    (8, 2, 4, 2, 4, False),
    (8, 2, 2, 1, 3, False),
    (8, 2, 2, 1, 4, False),
    (8, 3, 2, 1, 2, False),  # keep 3 per group of 4: group_limit 1
    (8, 2, 2, 1, 2, True),  # drop: group_limit 1
    (8, 2, 2, 1, 4, True),  # drop: group_limit 2
]


@pytest.mark.parametrize("setup", GROUP_SETUPS)
def test_group_limited_layer_scope_matches_brute_force(setup):
    num_experts, top_k, n_group, topk_group, per_layer, drop = setup
    budget = plan_budget(
        per_layer / num_experts, num_experts, top_k, n_group, topk_group, drop
    )
    assert budget.per_layer == per_layer
    rng = random.Random(hash(setup) & 0xFFFF)
    for _ in range(25):
        scores, routed = random_case(rng, [0, 1], num_experts)
        chosen = select_novices(scores, routed, budget, model_wide=False)
        assert_within_limits(chosen, budget)
        for layer in (0, 1):
            assert len(chosen[layer]) == per_layer
            assert (
                chosen[layer]
                == brute_force(scores, routed, [layer], budget, per_layer)[layer]
            )
            assert (
                chosen[layer]
                == independent_greedy(scores, routed, [layer], budget, per_layer)[layer]
            )


def test_group_limit_skips_cheaper_expert_in_full_group():
    # groups {0,1}, {2,3}, {4,5}, {6,7}; one novice per group at most
    scores, routed = as_inputs({0: [0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 0.5]})
    budget = PruningBudget(8, 3, 6, group_size=2, group_limit=1)
    assert select_novices(scores, routed, budget, False) == {0: [0, 2, 7]}


def test_model_scope_global_ranking():
    scores, routed = as_inputs(
        {
            0: [0.10, 0.90, 0.80, 0.70, 0.60, 0.95],
            1: [0.20, 0.30, 0.85, 0.75, 0.65, 0.55],
            2: [0.05, 0.15, 0.25, 0.35, 0.99, 0.98],
        }
    )
    budget = PruningBudget(num_experts=6, per_layer=2, layer_limit=4)
    chosen = select_novices(scores, routed, budget, model_wide=True)
    # the six lowest over the model: 0.05, 0.10, 0.15, 0.20, 0.25, 0.30
    assert chosen == {0: [0], 1: [0, 1], 2: [0, 1, 2]}
    assert sum(len(v) for v in chosen.values()) == 6


def test_model_scope_respects_layer_limit():
    # layer 0 holds the 8 lowest scores but may lose only layer_limit = 6
    scores, routed = as_inputs(
        {
            0: [0.01 * i for i in range(8)],
            1: [0.5, 0.9, 0.6, 0.95, 0.7, 0.85, 0.8, 0.75],
            2: [0.55, 0.99, 0.65, 0.98, 0.97, 0.96, 0.94, 0.93],
        }
    )
    budget = plan_budget(0.5, 8, 2, None, None, drop=False)
    assert (budget.per_layer, budget.layer_limit) == (4, 6)
    chosen = select_novices(scores, routed, budget, model_wide=True)
    assert chosen[0] == [0, 1, 2, 3, 4, 5]
    # the next six by global rank: 0.5, 0.55, 0.6, 0.65, 0.7, 0.75
    assert chosen[1] == [0, 2, 4, 7]
    assert chosen[2] == [0, 2]
    assert sum(len(v) for v in chosen.values()) == 12


def test_model_scope_never_routed_first_across_layers():
    scores, routed = as_inputs(
        {0: [0.1, 0.2, 0.3, 0.4], 1: [0.9, 0.8, 0.7, 0.6]},
        {0: [1, 1, 1, 1], 1: [1, 0, 1, 1]},
    )
    budget = PruningBudget(num_experts=4, per_layer=1, layer_limit=2)
    assert select_novices(scores, routed, budget, model_wide=True) == {0: [0], 1: [1]}


@pytest.mark.parametrize(
    "num_experts, top_k, n_group, topk_group, per_layer",
    [(6, 2, None, None, 2), (6, 4, None, None, 2), (6, 2, 3, 2, 2), (8, 2, 4, 2, 2)],
)
def test_model_scope_matches_brute_force(
    num_experts, top_k, n_group, topk_group, per_layer
):
    budget = plan_budget(
        per_layer / num_experts, num_experts, top_k, n_group, topk_group, False
    )
    assert budget.per_layer == per_layer
    layers = [0, 3]
    rng = random.Random(num_experts * 100 + top_k * 10 + (n_group or 0))
    for _ in range(10):
        scores, routed = random_case(rng, layers, num_experts)
        # skew one layer low so the layer / group limits matter
        scores[3] = scores[3] - 10
        chosen = select_novices(scores, routed, budget, model_wide=True)
        assert_within_limits(chosen, budget)
        assert sum(len(v) for v in chosen.values()) == per_layer * len(layers)
        count = per_layer * len(layers)
        assert chosen == brute_force(scores, routed, layers, budget, count)
        assert chosen == independent_greedy(scores, routed, layers, budget, count)
