"""The shipped YAML recipes, the ModifierFactory registration and the quickstart."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.recipe import Recipe

import mone_modifier
from helpers import novice_vectors, run_oneshot
from mone_modifier import MoNEPruningModifier
from mone_modifier.demo import main as demo_main
from mone_modifier.tiny_moe import FAMILIES, NUM_EXPERTS

RECIPES = Path(__file__).parent.parent / "recipes"


def test_registered_for_yaml_recipes():
    ModifierFactory.refresh()
    recipe = Recipe.create_instance(str(RECIPES / "mone_50.yaml"))
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, MoNEPruningModifier)
    assert modifier.sparsity == 0.5 and modifier.scoring == "mone"


def test_recipe_without_the_import_fails_as_the_readme_says():
    """llm-compressor alone does not know the modifier; the README quotes its
    message next to the import it asks for."""
    code = "from llmcompressor.recipe import Recipe; Recipe.create_instance(r'{}')"
    result = subprocess.run(
        [sys.executable, "-c", code.format(RECIPES / "mone_25.yaml")],
        capture_output=True,
        text=True,
    )
    message = "No modifier of type 'MoNEPruningModifier' found."
    assert result.returncode != 0 and message in result.stderr
    readme = (RECIPES.parent / "README.md").read_text()
    assert "Import `mone_modifier` before a recipe" in readme and message in readme


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe,replaced", [("mone_25.yaml", 2), ("mone_50.yaml", 4)])
def test_recipe_replaces_round_sparsity_e_per_layer(
    family, recipe, replaced, tiny_moe, samples
):
    model = run_oneshot(tiny_moe(family), samples, str(RECIPES / recipe))
    novices = model.config.approximate_experts
    assert novices and all(len(ids) == replaced for ids in novices.values())
    for index, ids in novices.items():
        assert sorted(novice_vectors(model, int(index))) == ids
    assert round(float(recipe[5:7]) / 100 * NUM_EXPERTS) == replaced


def run_demo(recipe: str, work, capsys) -> str:
    demo_main(
        ["--recipe", str(RECIPES / recipe), "--work-dir", str(work)]
        + ["--num-samples", "4"]
    )
    return capsys.readouterr().out


def test_quickstart_prints_summary(tmp_path, capsys):
    out = run_demo("mone_25.yaml", tmp_path, capsys)
    assert "recipe ran: MoNEPruningModifier\n" in out
    assert "4 of 16 experts (top-4) per layer" in out
    assert "total: 16 novices, 48 experts kept" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert (
        report["settings"]["sparsity"] == 0.25
        and report["settings"]["novice"] == "mean"
    )
    assert report["totals"]["novices"] == 16
    for layer in report["layers"]:
        assert sorted(layer["novices"] + layer["retained"]) == list(range(16))
        assert (
            report["totals"]["calibration_tokens_per_layer"][str(layer["index"])]
            == layer["tokens"]
        )
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = mone_modifier.from_pretrained(tmp_path / "pruned")
    assert f"pretrained={tmp_path / 'pruned'}" in out
    assert sum(len(ids) for ids in loaded.config.approximate_experts.values()) == 16
    assert loaded.config.eos_token_id < loaded.config.vocab_size


def test_quickstart_with_quantization_saves_the_compressed_model(tmp_path, capsys):
    out = run_demo("mone_fp8.yaml", tmp_path, capsys)
    assert "recipe ran: MoNEPruningModifier, QuantizationModifier\n" in out
    assert f"(quantized, compressed-tensors): {tmp_path / 'pruned'}" in out
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "approximate_experts" in config


def test_quickstart_usage_names_the_module_and_the_recipes(capsys, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)
    with pytest.raises(SystemExit):
        demo_main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mone_modifier.demo")
    assert all(f"recipes/{recipe.name}" in out for recipe in RECIPES.glob("*.yaml"))
