"""Saving pruned models: layout, metadata, size, drop exports, safety."""

import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llmcompressor.modeling.moe.linearize import linearize_moe
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import mone_modifier
from devices import DEVICE, assert_close
from helpers import PROJECTION_FAMILIES, novice_vectors, run_oneshot, tree_digest
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import FAMILIES, NUM_EXPERTS


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


@pytest.mark.parametrize("family", PROJECTION_FAMILIES)
def test_novice_checkpoint_layout(family, tiny_moe, samples, tmp_path):
    out = tmp_path / "out"
    model = run_oneshot(
        tiny_moe(family),
        samples,
        MoNEPruningModifier(sparsity=0.25),
        output_dir=str(out),
    )
    novices = model.config.approximate_experts
    config = json.loads((out / "config.json").read_text())
    assert config["approximate_experts"] == novices
    assert any(
        config.get(key) == NUM_EXPERTS
        for key in ("num_experts", "num_local_experts", "n_routed_experts")
    )

    saved = tensors(out)
    for index, ids in novices.items():
        # Mixtral's checkpoint names its block block_sparse_moe, others mlp
        (prefix,) = {
            re.match(rf"(model\.layers\.{index}\.\w+)\.experts\.", key).group(1)
            for key in saved
            if re.match(rf"model\.layers\.{index}\.\w+\.experts\.", key)
        }
        for expert in range(NUM_EXPERTS):
            names = {k for k in saved if k.startswith(f"{prefix}.experts.{expert}.")}
            if expert in ids:
                assert names == {f"{prefix}.experts.{expert}.approx_value"}
                assert_close(
                    saved[f"{prefix}.experts.{expert}.approx_value"],
                    novice_vectors(model, int(index))[expert],
                    rtol=0,
                    atol=0,
                )
            else:
                projections = {name.split(".")[-2] for name in names}
                assert projections == {"gate_proj", "up_proj", "down_proj"}
        (router,) = [
            v
            for k, v in saved.items()
            if k in (f"{prefix}.gate.weight", f"{prefix}.router.weight")
        ]
        assert router.shape[0] == NUM_EXPERTS


def test_recipe_reloads_in_a_fresh_process(tiny_moe, samples, tmp_path):
    out = tmp_path / "out"
    run_oneshot(
        tiny_moe("olmoe"),
        samples,
        MoNEPruningModifier(sparsity=0.25, scoring="reap"),
        output_dir=str(out),
    )
    code = (
        "import mone_modifier; from llmcompressor.recipe import Recipe; "
        f"(m,) = Recipe.create_instance({str(out / 'recipe.yaml')!r}).modifiers; "
        "print(type(m).__name__, m.sparsity, m.scoring)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines()[-1].split() == [
        "MoNEPruningModifier",
        "0.25",
        "reap",
    ]


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_checkpoint_smaller_by_pruned_experts(sparsity, tiny_moe, samples, tmp_path):
    path = tiny_moe("qwen3_moe")
    unpruned = AutoModelForCausalLM.from_pretrained(path)
    linearize_moe(unpruned)
    unpruned.save_pretrained(tmp_path / "unpruned")
    expert_bytes = sum(
        p.numel() * p.element_size()
        for p in unpruned.model.layers[0].mlp.experts[0].parameters()
    )
    hidden = unpruned.config.hidden_size

    run_oneshot(
        path,
        samples,
        MoNEPruningModifier(sparsity=sparsity),
        output_dir=str(tmp_path / "pruned"),
    )
    size = {
        d: (tmp_path / d / "model.safetensors").stat().st_size
        for d in ("unpruned", "pruned")
    }
    replaced = round(sparsity * NUM_EXPERTS) * unpruned.config.num_hidden_layers
    expected_saving = replaced * (expert_bytes - hidden * 4)
    # safetensors headers differ by a few hundred bytes of tensor names
    assert abs((size["unpruned"] - size["pruned"]) - expected_saving) < 4096
    assert (
        size["pruned"] / size["unpruned"] < 1 - 0.9 * expected_saving / size["unpruned"]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_export_loads_in_plain_transformers(family, tiny_moe, samples, tmp_path):
    model = run_oneshot(
        tiny_moe(family), samples, MoNEPruningModifier(sparsity=0.25, novice="drop")
    )
    with torch.no_grad():
        expected = model(input_ids=samples).logits
    model.save_pretrained(tmp_path / "out")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").to(DEVICE)
    with torch.no_grad():
        logits = reloaded(input_ids=samples.to(DEVICE)).logits
    assert_close(logits, expected, rtol=0, atol=1e-5)
    assert reloaded.model.layers[-1].mlp.experts.num_experts == NUM_EXPERTS - 2


def test_interrupted_save_leaves_no_checkpoint(
    tiny_moe, samples, tmp_path, monkeypatch
):
    model = run_oneshot(tiny_moe("olmoe"), samples, MoNEPruningModifier(sparsity=0.25))
    model.save_pretrained(tmp_path / "old")
    before = tree_digest(tmp_path / "old")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(
        "llmcompressor.transformers.compression.compressed_tensors_utils.resave_config",
        crash,
    )
    for target in (tmp_path / "new", tmp_path / "old"):
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(target)
    assert not (tmp_path / "new").exists()
    assert tree_digest(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_refuses_to_save_over_its_source(tiny_moe, samples, tmp_path):
    source = tmp_path / "source"
    model = AutoModelForCausalLM.from_pretrained(tiny_moe("olmoe"))
    model.save_pretrained(source)
    from mone_modifier.tiny_moe import tiny_tokenizer

    tiny_tokenizer().save_pretrained(source)
    before = tree_digest(source)
    pruned = run_oneshot(source, samples, MoNEPruningModifier(sparsity=0.25))
    with pytest.raises(ValueError, match="over the checkpoint it was loaded from"):
        pruned.save_pretrained(source)
    assert tree_digest(source) == before


def test_disk_full_while_writing_weights(tiny_moe, samples, tmp_path, monkeypatch):
    model = run_oneshot(tiny_moe("olmoe"), samples, MoNEPruningModifier(sparsity=0.25))
    model.save_pretrained(tmp_path / "old")
    before = tree_digest(tmp_path / "old")

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1024)  # what fit before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", disk_full)
    for target in (tmp_path / "new", tmp_path / "old"):
        with pytest.raises(OSError, match="No space left"):
            model.save_pretrained(target)
    assert not (tmp_path / "new").exists()
    assert tree_digest(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_existing_output_directory_is_replaced_but_other_files_kept(
    tiny_moe, samples, tmp_path
):
    model = run_oneshot(tiny_moe("olmoe"), samples, MoNEPruningModifier(sparsity=0.25))
    out = tmp_path / "out"
    out.mkdir()
    # an older, sharded checkpoint of another model, and the user's own notes
    for name in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "config.json",
    ):
        (out / name).write_text("stale")
    (out / "README.md").write_text("my notes")
    model.save_pretrained(out)
    names = sorted(p.name for p in out.iterdir())
    assert "README.md" in names and (out / "README.md").read_text() == "my notes"
    assert [n for n in names if n.endswith((".safetensors", ".json", ".bin"))] == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    reloaded = mone_modifier.from_pretrained(out).to(DEVICE)
    with torch.no_grad():
        expected = model(input_ids=samples).logits
        logits = reloaded(input_ids=samples.to(DEVICE)).logits
    assert_close(logits, expected, rtol=0, atol=1e-5)
