"""
MoNE keeps O(layers x experts x hidden) statistics and nothing per token
beyond the batch in flight.
"""

import gc

import torch

from helpers import run_oneshot
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import NUM_EXPERTS, calibration_ids


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_nothing_per_token_is_retained(tiny_moe, monkeypatch):
    counts, stat_bytes, pending = [], [], []
    close_batch = MoNEPruningModifier._close_batch

    def measured(self, layer_name, *args):
        close_batch(self, layer_name, *args)
        if layer_name == self._moe.layers[-1].name:
            pending.append(len(self._batches))
            stat_bytes.append(
                sum(
                    t.nbytes
                    for s in self._stats.values()
                    for t in vars(s).values()
                    if isinstance(t, torch.Tensor)
                )
            )
            counts.append(live_tensors())

    monkeypatch.setattr(MoNEPruningModifier, "_close_batch", measured)
    samples = calibration_ids(12, 24)
    model = run_oneshot(
        tiny_moe("olmoe"), samples, MoNEPruningModifier(sparsity=0.25), pipeline="basic"
    )
    assert len(counts) == len(samples)
    # every batch's routing and outputs are released when it closes
    assert pending == [0] * len(samples)
    # statistics per layer, float64: a token count, four [E] and three
    # [E, H] tensors
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    per_layer = 8 * (1 + 4 * NUM_EXPERTS + 3 * NUM_EXPERTS * hidden)
    assert stat_bytes == [layers * per_layer] * len(samples)
    # no tensor accumulates across batches anywhere in the process
    assert counts[1:] == [counts[1]] * (len(samples) - 1)
