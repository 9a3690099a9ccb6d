"""
LayerStatistics against a direct float64 computation over the whole data.

The statistics are fed the way the calibration hooks feed them: once per batch
``add_routing(top_k_index, top_k_weights)``, then one ``add_routed_outputs``
call with every (token, expert) pair's output and routing weight. The reference
values are computed in one pass over the concatenated data in float64 with
plain torch reductions (``torch.var(unbiased=False)`` and friends), never
through the code under test.
"""

from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import distributed as dist

from mone_modifier.statistics import LayerStatistics, reduce_across_ranks
from synthetic import feed, make_data

RTOL = 1e-10
ATOL = 1e-12


# -- data and reference ---------------------------------------------------------


def reference(data: dict, token_ids=None) -> dict:
    """Direct float64 statistics over ``token_ids`` (default: every token)."""
    index, weights, outputs = data["index"], data["weights"], data["outputs"]
    if token_ids is not None:
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        index, weights, outputs = (
            index[token_ids],
            weights[token_ids],
            outputs[token_ids],
        )
    weights = weights.to(torch.float64)
    outputs = outputs.to(torch.float64)
    num_experts = data["num_experts"]
    hidden = outputs.shape[-1]
    n_tokens = index.shape[0]
    dense = torch.zeros(n_tokens, num_experts, dtype=torch.float64)
    dense.scatter_(1, index, weights)

    ref = {
        "tokens": float(n_tokens),
        "frequency": dense.sum(0) / max(n_tokens, 1),
        "routed": torch.zeros(num_experts, dtype=torch.float64),
        "mean": torch.zeros(num_experts, hidden, dtype=torch.float64),
        "variance": torch.zeros(num_experts, hidden, dtype=torch.float64),
        "output_std": torch.zeros(num_experts, dtype=torch.float64),
        "saliency": torch.zeros(num_experts, dtype=torch.float64),
        "weighted_mean": torch.zeros(num_experts, hidden, dtype=torch.float64),
    }
    for e in range(num_experts):
        mask = (index == e).any(dim=1)
        if not mask.any():
            continue
        f = outputs[mask, e]
        g = dense[mask, e]
        var = torch.var(f, dim=0, unbiased=False)
        ref["routed"][e] = float(mask.sum())
        ref["mean"][e] = f.mean(0)
        ref["variance"][e] = var
        ref["output_std"][e] = torch.sqrt((var.sqrt() ** 2).sum())
        ref["saliency"][e] = (g * torch.linalg.vector_norm(f, dim=1)).mean()
        ref["weighted_mean"][e] = (g**2 @ f) / (g**2).sum()
    return ref


def random_batches(token_ids, gen: torch.Generator, max_batch: int) -> list[list[int]]:
    """``token_ids`` in random order, cut into batches of random sizes."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    ids = ids[torch.randperm(len(ids), generator=gen)].tolist()
    batches = []
    while ids:
        size = int(torch.randint(1, max_batch + 1, (1,), generator=gen))
        batches.append(ids[:size])
        ids = ids[size:]
    return batches


def collect(data: dict, batches, dtype=None) -> LayerStatistics:
    stats = LayerStatistics.empty(data["num_experts"], data["outputs"].shape[-1])
    for batch in batches:
        feed(stats, data, batch, dtype)
    return stats


def assert_matches(stats: LayerStatistics, ref: dict, rtol=RTOL, atol=ATOL):
    close = dict(rtol=rtol, atol=atol)
    assert float(stats.tokens) == ref["tokens"]
    torch.testing.assert_close(stats.routed, ref["routed"], rtol=0, atol=0)
    torch.testing.assert_close(stats.frequency, ref["frequency"], **close)
    torch.testing.assert_close(stats.mean, ref["mean"], **close)
    torch.testing.assert_close(stats.variance, ref["variance"], **close)
    torch.testing.assert_close(stats.output_std, ref["output_std"], **close)
    torch.testing.assert_close(stats.saliency, ref["saliency"], **close)
    torch.testing.assert_close(stats.weighted_mean, ref["weighted_mean"], **close)
    torch.testing.assert_close(stats.is_routed, ref["routed"] > 0, rtol=0, atol=0)


def assert_same_stats(a: LayerStatistics, b: LayerStatistics, rtol=RTOL, atol=ATOL):
    for f in fields(LayerStatistics):
        torch.testing.assert_close(
            getattr(a, f.name), getattr(b, f.name), rtol=rtol, atol=atol, msg=f.name
        )


# -- batching ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_match_direct_float64(seed):
    data = make_data(tokens=97, num_experts=8, top_k=2, hidden=6, seed=seed)
    ref = reference(data)
    assert ref["routed"].min() > 0  # every expert used: a meaningful comparison

    gen = torch.Generator().manual_seed(100 + seed)
    split_a = random_batches(range(97), gen, max_batch=17)
    split_b = random_batches(range(97), gen, max_batch=5)
    assert split_a != split_b

    stats_a = collect(data, split_a)
    stats_b = collect(data, split_b)
    assert_matches(stats_a, ref)
    assert_matches(stats_b, ref)
    # derived quantities agree between the two splits as well
    for name in ("frequency", "variance", "output_std", "saliency", "weighted_mean"):
        torch.testing.assert_close(
            getattr(stats_a, name), getattr(stats_b, name), rtol=RTOL, atol=ATOL
        )
    torch.testing.assert_close(stats_a.routed, stats_b.routed, rtol=0, atol=0)


def test_single_token_batches_and_one_big_batch_agree():
    data = make_data(tokens=40, num_experts=6, top_k=3, hidden=5, seed=7)
    ref = reference(data)
    one = collect(data, [list(range(40))])
    singles = collect(data, [[t] for t in reversed(range(40))])
    assert_matches(one, ref)
    assert_matches(singles, ref)


def test_frequency_counts_weight_not_selection():
    """freq_i = sum_x g_i(x) / N over ALL tokens, not |X_i| / N."""
    index = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 3]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    stats = LayerStatistics.empty(5, 2)
    stats.add_routing(index, weights)
    w = weights.double()
    expected = (
        torch.stack(
            [
                w[0, 0] + w[1, 0] + w[3, 0],
                w[0, 1] + w[2, 0],
                w[1, 1] + w[2, 1],
                w[3, 1],
                torch.tensor(0.0, dtype=torch.float64),
            ]
        )
        / 4
    )
    torch.testing.assert_close(stats.frequency, expected, rtol=1e-12, atol=0)
    assert stats.tokens.item() == 4


# -- dtypes -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float64(dtype):
    data = make_data(tokens=600, num_experts=4, top_k=2, hidden=8, seed=3)
    # the reference sees exactly the values the statistics receive
    low = dict(
        data,
        weights=data["weights"].to(dtype).to(torch.float64),
        outputs=data["outputs"].to(dtype).to(torch.float64),
    )
    ref = reference(low)
    gen = torch.Generator().manual_seed(5)
    stats = collect(data, random_batches(range(600), gen, max_batch=300), dtype=dtype)
    for f in fields(LayerStatistics):
        assert getattr(stats, f.name).dtype == torch.float64, f.name
    # float32 / bfloat16 accumulation would be off by ~1e-7 / ~1e-3
    assert_matches(stats, ref)


def test_empty_state_is_float64_zeros():
    stats = LayerStatistics.empty(5, 3)
    assert stats.num_experts == 5
    for f in fields(LayerStatistics):
        value = getattr(stats, f.name)
        assert value.dtype == torch.float64, f.name
        assert not value.any(), f.name
    assert stats.mean.shape == (5, 3) and stats.m2.shape == (5, 3)
    assert stats.weighted_output_sum.shape == (5, 3)
    assert stats.tokens.shape == ()


# -- merge ------------------------------------------------------------------------


def test_merge_of_disjoint_sets_equals_one_pass_over_union():
    data = make_data(tokens=80, num_experts=8, top_k=2, hidden=4, seed=11)
    gen = torch.Generator().manual_seed(12)
    perm = torch.randperm(80, generator=gen).tolist()
    part_a, part_b = perm[:23], perm[23:]

    a = collect(data, random_batches(part_a, gen, max_batch=7))
    b = collect(data, random_batches(part_b, gen, max_batch=9))
    assert_matches(a, reference(data, part_a))
    assert_matches(b, reference(data, part_b))

    a.merge(b)
    assert_matches(a, reference(data))
    one_pass = collect(data, [list(range(80))])
    assert_same_stats(a, one_pass)


def test_merge_where_parts_route_to_different_experts():
    """One part never routes to an expert the other part uses (n_a = 0 or n_b = 0)."""
    d1 = make_data(tokens=30, num_experts=6, top_k=2, hidden=3, seed=21, unused=(0, 1))
    d2 = make_data(tokens=25, num_experts=6, top_k=2, hidden=3, seed=22, unused=(4, 5))
    union = dict(
        index=torch.cat([d1["index"], d2["index"]]),
        weights=torch.cat([d1["weights"], d2["weights"]]),
        outputs=torch.cat([d1["outputs"], d2["outputs"]]),
        num_experts=6,
    )
    a = collect(union, [list(range(0, 17)), list(range(17, 30))])
    b = collect(union, [list(range(30, 55))])
    b.merge(a)
    assert_matches(b, reference(union))


def test_merge_with_empty_is_noop():
    data = make_data(tokens=50, num_experts=8, top_k=2, hidden=4, seed=31, unused=(3,))
    stats = collect(data, [list(range(20)), list(range(20, 50))])
    before = {f.name: getattr(stats, f.name).clone() for f in fields(LayerStatistics)}

    stats.merge(LayerStatistics.empty(8, 4))
    for name, value in before.items():
        assert torch.equal(getattr(stats, name), value), name
    assert not torch.isnan(stats.mean).any()

    empty = LayerStatistics.empty(8, 4)
    empty.merge(stats)
    assert_same_stats(empty, stats, rtol=1e-15, atol=0)
    assert_matches(empty, reference(data))


def test_merge_does_not_modify_other():
    data = make_data(tokens=30, num_experts=4, top_k=2, hidden=3, seed=41)
    a = collect(data, [list(range(10))])
    b = collect(data, [list(range(10, 30))])
    b_before = {f.name: getattr(b, f.name).clone() for f in fields(LayerStatistics)}
    a.merge(b)
    for name, value in b_before.items():
        assert torch.equal(getattr(b, name), value), name


# -- experts never routed ----------------------------------------------------------


def test_expert_never_routed_is_zero_not_nan():
    data = make_data(
        tokens=60, num_experts=8, top_k=2, hidden=5, seed=51, unused=(2, 7)
    )
    gen = torch.Generator().manual_seed(52)
    stats = collect(data, random_batches(range(60), gen, max_batch=13))
    assert_matches(stats, reference(data))
    for e in (2, 7):
        assert stats.routed[e] == 0
        assert not stats.is_routed[e]
        assert stats.frequency[e] == 0
        assert stats.output_std[e] == 0
        assert stats.saliency[e] == 0
        assert torch.equal(stats.mean[e], torch.zeros(5, dtype=torch.float64))
        assert torch.equal(stats.variance[e], torch.zeros(5, dtype=torch.float64))
        assert torch.equal(stats.weighted_mean[e], torch.zeros(5, dtype=torch.float64))
    for name in (
        "frequency",
        "variance",
        "output_std",
        "saliency",
        "weighted_mean",
        "mean",
    ):
        assert torch.isfinite(getattr(stats, name)).all(), name
    assert stats.is_routed.sum() == 6


def test_empty_statistics_derived_quantities_are_zero():
    stats = LayerStatistics.empty(4, 3)
    for name in ("frequency", "variance", "output_std", "saliency", "weighted_mean"):
        value = getattr(stats, name)
        assert torch.isfinite(value).all(), name
        assert not value.any(), name


def test_empty_expert_batch_is_ignored():
    data = make_data(tokens=20, num_experts=4, top_k=2, hidden=3, seed=61)
    stats = collect(data, [list(range(20))])
    before = {f.name: getattr(stats, f.name).clone() for f in fields(LayerStatistics)}
    stats.add_routed_outputs(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0)
    )
    for name, value in before.items():
        assert torch.equal(getattr(stats, name), value), name


# -- property: any partition over batches and processes ---------------------------

_PROP_DATA = make_data(tokens=14, num_experts=5, top_k=2, hidden=3, seed=71)
_PROP_REF = reference(_PROP_DATA)


@settings(max_examples=30, deadline=None)
@given(
    order=st.permutations(list(range(14))),
    cuts=st.lists(st.integers(min_value=1, max_value=13), max_size=8, unique=True),
    process=st.lists(st.integers(min_value=0, max_value=1), min_size=9, max_size=9),
    reverse_merge=st.booleans(),
)
def test_any_partition_over_batches_and_processes_matches_one_pass(
    order, cuts, process, reverse_merge
):
    bounds = [0, *sorted(cuts), 14]
    batches = [order[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    ranks = [LayerStatistics.empty(5, 3), LayerStatistics.empty(5, 3)]
    for batch, rank in zip(batches, process):
        feed(ranks[rank], _PROP_DATA, batch)
    first, second = ranks[::-1] if reverse_merge else ranks
    first.merge(second)
    assert_matches(first, _PROP_REF)


# -- distributed -------------------------------------------------------------------


def test_reduce_across_ranks_is_noop_without_process_group():
    assert not (dist.is_available() and dist.is_initialized())
    data = make_data(tokens=10, num_experts=4, top_k=2, hidden=3, seed=81)
    stats = collect(data, [list(range(10))])
    before = {f.name: getattr(stats, f.name).clone() for f in fields(LayerStatistics)}
    assert reduce_across_ranks(stats) is stats
    for name, value in before.items():
        assert torch.equal(getattr(stats, name), value), name
