"""
MoNE keeps O(layers x experts x hidden) statistics and nothing per token
beyond the batch in flight, and prunes a disk-offloaded model as it prunes
one in memory. (Peak memory: benchmarks/offload_memory.py.)
"""

import gc

import torch
from compressed_tensors.offload import load_offloaded_model
from transformers import AutoModelForCausalLM

from helpers import read_report, run_oneshot
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


def test_disk_offloaded_model_prunes_as_a_loaded_one(tiny_moe, samples, tmp_path):
    path = tiny_moe("olmoe")
    with load_offloaded_model():
        offloaded = AutoModelForCausalLM.from_pretrained(
            path,
            device_map="auto_offload",
            max_memory={"cpu": 100_000},  # far less than the experts' weights
            offload_folder=str(tmp_path / "offload"),
        )
    assert any((tmp_path / "offload").iterdir()), "nothing was offloaded to disk"
    reports = {}
    for name, model in (("offloaded", offloaded), ("in_memory", path)):
        reports[name] = tmp_path / f"{name}.json"
        modifier = MoNEPruningModifier(sparsity=0.25, report_path=str(reports[name]))
        run_oneshot(model, samples, modifier, pipeline="sequential")
    expected, actual = (read_report(reports[n]) for n in ("in_memory", "offloaded"))
    for layer_expected, layer in zip(expected["layers"], actual["layers"], strict=True):
        assert layer["novices"] == layer_expected["novices"]
        torch.testing.assert_close(
            torch.tensor(layer["score"]), torch.tensor(layer_expected["score"])
        )
