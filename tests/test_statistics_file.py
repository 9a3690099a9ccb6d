"""
Calibrate once, prune at any setting: statistics saved by one run
(``save_statistics_path``) prune a model without calibration
(``statistics_path``) exactly as a ``pipeline="basic"`` run with the same
data decides; runs over disjoint calibration shards merge into one run;
statistics of another model, of another format version or damaged are
refused before anything changes.
"""

import json

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors import safe_open
from safetensors.torch import save_file

from devices import assert_close
from helpers import run_oneshot, tree_digest
from mone_modifier import MoNEPruningModifier, statistics_file
from mone_modifier.statistics_file import load_statistics
from mone_modifier.tiny_moe import FAMILIES, build_tiny_moe


def prune_from(source, statistics, **settings):
    """oneshot without a dataset, as a user prunes from saved statistics."""
    recipe = MoNEPruningModifier(statistics_path=statistics, **settings)
    return oneshot(model=str(source), recipe=recipe)


def decisions_and_logits(model, samples):
    with torch.no_grad():
        logits = model(input_ids=samples.to(model.device)).logits
    return model.config.to_dict().get("approximate_experts"), logits


def assert_same_pruning(model, expected, samples):
    novices, logits = decisions_and_logits(model, samples)
    expected_novices, expected_logits = decisions_and_logits(expected, samples)
    assert novices == expected_novices
    # with CUDA present the basic run computes on the CPU, the data-free run
    # on the GPU: a cross-device float32 tolerance (tests/devices.py)
    assert_close(logits, expected_logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_moe, samples):
    """family -> path of statistics saved by a basic run at 25%."""
    root = tmp_path_factory.mktemp("statistics")
    cache = {}

    def get(family: str):
        if family not in cache:
            path = root / f"{family}.safetensors"
            recipe = MoNEPruningModifier(sparsity=0.25, save_statistics_path=str(path))
            run_oneshot(tiny_moe(family), samples, recipe, pipeline="basic")
            cache[family] = path
        return cache[family]

    return get


@pytest.mark.parametrize("scope", ["layer", "model"])
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_statistics_prune_as_the_basic_run(
    family, scope, saved, tiny_moe, samples
):
    settings = dict(sparsity=0.25, scope=scope)
    pruned = prune_from(tiny_moe(family), str(saved(family)), **settings)
    expected = run_oneshot(
        tiny_moe(family), samples, MoNEPruningModifier(**settings), pipeline="basic"
    )
    assert_same_pruning(pruned, expected, samples)


@pytest.mark.parametrize(
    "settings",
    [
        dict(sparsity=0.5, scope="model", novice="weighted_mean"),
        dict(sparsity=0.375, scoring="reap", novice="zero"),
        dict(sparsity=0.25, novice="drop"),
    ],
    ids=["50%-model-scope-weighted-mean", "reap-zero", "drop"],
)
def test_one_calibration_decides_every_setting(settings, saved, tiny_moe, samples):
    pruned = prune_from(tiny_moe("olmoe"), str(saved("olmoe")), **settings)
    expected = run_oneshot(
        tiny_moe("olmoe"), samples, MoNEPruningModifier(**settings), pipeline="basic"
    )
    assert_same_pruning(pruned, expected, samples)
    if settings.get("novice") == "drop":
        assert pruned.config.num_experts == expected.config.num_experts == 6


def test_split_calibration_merges_into_one_run(tiny_moe, samples, saved, tmp_path):
    shards = []
    for index, part in enumerate((samples[:3], samples[3:])):
        path = tmp_path / f"shard{index}.safetensors"
        recipe = MoNEPruningModifier(sparsity=0.25, save_statistics_path=str(path))
        run_oneshot(tiny_moe("olmoe"), part, recipe, pipeline="basic")
        shards.append(str(path))
    merged = load_statistics(shards)
    whole = load_statistics(saved("olmoe"))
    for name, stats in whole.layers.items():
        for field in ("tokens", "routed", "weight_sum", "mean", "m2", "saliency_sum"):
            torch.testing.assert_close(
                getattr(merged.layers[name], field), getattr(stats, field)
            )
    pruned = prune_from(tiny_moe("olmoe"), shards, sparsity=0.25)
    expected = prune_from(tiny_moe("olmoe"), str(saved("olmoe")), sparsity=0.25)
    assert_same_pruning(pruned, expected, samples)


def test_what_the_statistics_measured_is_recorded(tiny_moe, samples, saved, tmp_path):
    progressive = tmp_path / "progressive.safetensors"
    recipe = MoNEPruningModifier(sparsity=0.25, save_statistics_path=str(progressive))
    run_oneshot(tiny_moe("olmoe"), samples, recipe, pipeline="sequential")
    assert load_statistics(progressive).measured == "progressive"
    saved_file = load_statistics(saved("olmoe"))
    assert saved_file.measured == "unpruned"
    assert saved_file.settings["sparsity"] == 0.25
    assert saved_file.identity["num_experts"] == 8


def test_statistics_of_another_model_are_refused(tiny_moe, saved):
    source = tiny_moe("olmoe")
    before = tree_digest(source)
    with pytest.raises(ValueError, match=r"describe another model \(model_type"):
        prune_from(source, str(saved("qwen2_moe")), sparsity=0.25)
    assert tree_digest(source) == before
    with pytest.raises(ValueError, match="describe another model"):
        load_statistics([saved("olmoe"), saved("qwen2_moe")])


def test_statistics_of_a_differently_configured_model_are_refused(saved, tmp_path):
    other = build_tiny_moe("olmoe", tmp_path / "other", rms_norm_eps=1e-3)
    with pytest.raises(ValueError, match=r"config fields \['rms_norm_eps'\]"):
        prune_from(other, str(saved("olmoe")), sparsity=0.25)


def test_damaged_statistics_are_refused(tiny_moe, saved, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(saved("olmoe").read_bytes()[:-100])
    with pytest.raises(ValueError, match="damaged or not a MoNE statistics file"):
        prune_from(tiny_moe("olmoe"), str(damaged), sparsity=0.25)


def test_statistics_of_another_version_are_refused(saved, tmp_path):
    with safe_open(saved("olmoe"), "pt") as f:
        metadata = {**f.metadata(), "version": "0"}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata=metadata)
    with pytest.raises(ValueError, match="format version '0'"):
        load_statistics(old)
    assert json.loads(metadata["identity"])["num_experts"] == 8


def test_a_failed_save_leaves_the_previous_file(saved, tmp_path, monkeypatch):
    target = tmp_path / "stats.safetensors"
    target.write_bytes(saved("olmoe").read_bytes())
    previous = load_statistics(target)

    def failing(tensors, path, metadata):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(statistics_file, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        statistics_file.save_statistics(
            target, previous.layers, previous.identity, "unpruned", {}
        )
    assert load_statistics(target).identity == previous.identity
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]


def test_save_path_must_be_safetensors():
    with pytest.raises(ValueError, match="save_statistics_path must name a"):
        MoNEPruningModifier(sparsity=0.25, save_statistics_path="stats.pt")


def test_stacks_with_gptq(quantizable_moe, samples, tmp_path):
    """MoNE from statistics, then GPTQ on the data: the same experts as
    the basic run decides, and GPTQ compresses only the retained ones."""
    source = quantizable_moe("olmoe")
    path = tmp_path / "stats.safetensors"
    recipe = MoNEPruningModifier(sparsity=0.5, save_statistics_path=str(path))
    expected = run_oneshot(source, samples, recipe, pipeline="basic")
    gptq = GPTQModifier(
        targets=["Linear"], scheme="W4A16", ignore=["lm_head", r"re:.*mlp\.gate$"]
    )
    recipe = [MoNEPruningModifier(sparsity=0.5, statistics_path=str(path)), gptq]
    model = run_oneshot(source, samples, recipe)
    novices = model.config.approximate_experts
    assert novices == expected.config.approximate_experts
    for index, layer in enumerate(model.model.layers):
        quantized = {
            int(name.split(".")[0])
            for name, module in layer.mlp.experts.named_modules()
            if hasattr(module, "weight_scale")
        }
        assert quantized == set(range(8)) - set(novices[str(index)])
