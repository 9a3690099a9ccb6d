"""
Statistics gathered by two processes (gloo, CPU) and merged with
``reduce_across_ranks`` equal one pass over all the data, on every rank.
"""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mone_modifier.statistics import LayerStatistics, reduce_across_ranks

NUM_EXPERTS, HIDDEN, TOP_K, TOKENS = 6, 5, 2, 40


def make_data():
    generator = torch.Generator().manual_seed(0)
    index = torch.stack(
        [
            torch.randperm(NUM_EXPERTS, generator=generator)[:TOP_K]
            for _ in range(TOKENS)
        ]
    )
    weights = torch.rand(TOKENS, TOP_K, generator=generator, dtype=torch.float64)
    outputs = torch.randn(TOKENS, NUM_EXPERTS, HIDDEN, generator=generator) + 3.0
    return index, weights, outputs


def statistics_of(tokens: slice) -> LayerStatistics:
    index, weights, outputs = (t[tokens] for t in make_data())
    stats = LayerStatistics.empty(NUM_EXPERTS, HIDDEN)
    stats.add_routing(index, weights)
    rows = torch.arange(index.shape[0]).repeat_interleave(TOP_K)
    experts = index.reshape(-1)
    stats.add_routed_outputs(experts, outputs[rows, experts], weights.reshape(-1))
    return stats


def rank_main(rank: int, port: int, results):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        # uneven shares, as llm-compressor's partitioning can give
        share = slice(0, 13) if rank == 0 else slice(13, TOKENS)
        merged = reduce_across_ranks(statistics_of(share))
        results[rank] = {
            name: getattr(merged, name).clone()
            for name in (
                "tokens",
                "routed",
                "frequency",
                "variance",
                "mean",
                "saliency",
            )
        }
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_pass():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(port, results), nprocs=2, join=True)

    index, weights, outputs = make_data()
    assert int(results[0]["tokens"]) == TOKENS
    for expert in range(NUM_EXPERTS):
        rows, slot = (index == expert).nonzero(as_tuple=True)
        f = outputs[rows, expert].double()
        g = weights[rows, slot]
        expected = {
            "routed": float(len(rows)),
            "frequency": g.sum() / TOKENS,
            "mean": f.mean(dim=0),
            "variance": f.var(dim=0, unbiased=False),
            "saliency": (g * f.norm(dim=1)).mean(),
        }
        for rank in (0, 1):
            for name, value in expected.items():
                torch.testing.assert_close(
                    results[rank][name][expert],
                    torch.as_tensor(value, dtype=torch.float64),
                    rtol=1e-12,
                    atol=1e-12,
                )
