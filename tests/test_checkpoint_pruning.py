"""
Pruning a saved checkpoint from saved statistics, shard by shard
(``mone_modifier.checkpoint_pruning``): the written checkpoint holds the
tensors, novices and config of the checkpoint that oneshot from the same
statistics saves, loads to the same logits, and one shard at a time is held
in memory; what it cannot do is refused before anything is written.
"""

import json
import subprocess
import sys

import pytest
import torch
from llmcompressor import oneshot
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import mone_modifier
from helpers import run_oneshot
from mone_modifier import MoNEPruningModifier, checkpoint_pruning
from mone_modifier.checkpoint_pruning import prune_checkpoint
from mone_modifier.tiny_moe import build_tiny_moe

FAMILIES = ["olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, samples):
    """family -> (source checkpoint, its statistics from a basic run), the
    source saved in shards so the copy crosses shard boundaries."""
    root = tmp_path_factory.mktemp("checkpoint-pruning")
    cache = {}

    def get(family: str):
        if family not in cache:
            built = build_tiny_moe(family, root / f"{family}-built")
            source = root / f"{family}-source"
            model = AutoModelForCausalLM.from_pretrained(built)
            model.save_pretrained(source, max_shard_size="100KB")
            AutoTokenizer.from_pretrained(built).save_pretrained(source)
            statistics = root / f"{family}.safetensors"
            recipe = MoNEPruningModifier(
                sparsity=0.25, save_statistics_path=str(statistics)
            )
            run_oneshot(source, samples, recipe, pipeline="basic")
            cache[family] = source, statistics
        return cache[family]

    return get


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def via_oneshot(source, statistics, out, **settings):
    recipe = MoNEPruningModifier(statistics_path=str(statistics), **settings)
    oneshot(model=str(source), recipe=recipe, output_dir=str(out))
    return out


def assert_same_checkpoint(path, expected, samples):
    config = json.loads((path / "config.json").read_text())
    expected_config = json.loads((expected / "config.json").read_text())
    for key in ("approximate_experts", "architectures", "model_type"):
        assert config[key] == expected_config[key], key
    assert config.get("approximate_expert_init_tokens") == expected_config.get(
        "approximate_expert_init_tokens"
    )
    got, want = tensors(path), tensors(expected)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        logits = mone_modifier.from_pretrained(path)(input_ids=samples).logits
        expected_logits = mone_modifier.from_pretrained(expected)(
            input_ids=samples
        ).logits
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prunes_as_oneshot_from_the_same_statistics(
    family, calibrated, samples, tmp_path
):
    source, statistics = calibrated(family)
    novices = prune_checkpoint(source, tmp_path / "out", statistics, 0.25)
    expected = via_oneshot(source, statistics, tmp_path / "expected", sparsity=0.25)
    assert_same_checkpoint(tmp_path / "out", expected, samples)
    assert novices == {
        int(k): v
        for k, v in json.loads((expected / "config.json").read_text())[
            "approximate_experts"
        ].items()
    }


@pytest.mark.parametrize(
    "settings",
    [
        dict(sparsity=0.5, scope="model", novice="weighted_mean"),
        dict(sparsity=0.375, scoring="reap", novice="zero"),
        dict(sparsity=0.25, authors_layout=True),
    ],
    ids=["50%-model-scope-weighted-mean", "reap-zero", "authors-layout"],
)
def test_other_settings_from_the_same_statistics(
    settings, calibrated, samples, tmp_path
):
    source, statistics = calibrated("olmoe")
    prune_checkpoint(source, tmp_path / "out", statistics, **settings)
    expected = via_oneshot(source, statistics, tmp_path / "expected", **settings)
    assert_same_checkpoint(tmp_path / "out", expected, samples)


def test_holds_one_shard_at_a_time(calibrated, tmp_path, monkeypatch):
    source, statistics = calibrated("olmoe")
    shard_bytes = [f.stat().st_size for f in source.glob("*.safetensors")]
    written = []
    save_file = checkpoint_pruning.save_file

    def recording(tensors, path, metadata=None):
        written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_pruning, "save_file", recording)
    prune_checkpoint(source, tmp_path / "out", statistics, 0.25)
    assert len(written) == len(shard_bytes) > 3
    assert max(written) <= max(shard_bytes)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(tmp_path / "out"))


def test_command_line(calibrated, samples, tmp_path):
    """The command prunes as the function does, and reports as oneshot."""
    source, statistics = calibrated("olmoe")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "mone_modifier.checkpoint_pruning", str(source)]
        + [str(out), "--statistics", str(statistics), "--sparsity", "0.5"]
        + ["--scope", "model", "--report", str(tmp_path / "report.json")]
        + ["--authors-layout"],
        capture_output=True,
        text=True,
        check=True,
    )
    novices = json.loads(result.stdout.strip().splitlines()[-1])
    expected = via_oneshot(
        source,
        statistics,
        tmp_path / "expected",
        sparsity=0.5,
        scope="model",
        authors_layout=True,
        report_path=str(tmp_path / "expected.json"),
    )
    assert json.loads((out / "config.json").read_text())["model_type"] == (
        "olmoe_compressed"
    )
    assert_same_checkpoint(out, expected, samples)
    assert (
        novices == json.loads((out / "config.json").read_text())["approximate_experts"]
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads((tmp_path / "expected.json").read_text())
    assert (tmp_path / "report.png").is_file()


def assert_refused(tmp_path, pattern, source, statistics, sparsity, **settings):
    out = tmp_path / "refused" / "out"
    with pytest.raises(ValueError, match=pattern):
        prune_checkpoint(source, out, statistics, sparsity, **settings)
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize(
    "family,pattern",
    [
        ("gpt_oss", "does not store its 8 experts one by one"),
        ("mixtral", r"w1\.weight"),
    ],
)
def test_other_expert_layouts_are_refused(family, pattern, tiny_moe, samples, tmp_path):
    statistics = tmp_path / "statistics.safetensors"
    recipe = MoNEPruningModifier(sparsity=0.25, save_statistics_path=str(statistics))
    run_oneshot(tiny_moe(family), samples, recipe, pipeline="basic")
    assert_refused(
        tmp_path, pattern + ".*statistics_path", tiny_moe(family), statistics, 0.25
    )


def test_bad_requests_are_refused(calibrated, tmp_path):
    source, statistics = calibrated("olmoe")
    other_source, other_statistics = calibrated("qwen3_moe")
    assert_refused(tmp_path, "describe another model", other_source, statistics, 0.25)
    assert_refused(
        tmp_path,
        "authors_layout: the MoNE authors' code has no model type for 'qwen3_moe'",
        other_source,
        other_statistics,
        0.25,
        authors_layout=True,
    )
    assert_refused(tmp_path, "novice: drop", source, statistics, 0.25, novice="drop")
    assert_refused(tmp_path, "sparsity", source, statistics, 1.5)
    with pytest.raises(ValueError, match="is the source checkpoint"):
        prune_checkpoint(source, source, statistics, 0.25)
