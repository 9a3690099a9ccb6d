"""The shipped YAML recipes, the ModifierFactory registration and the quickstart."""

import json
from pathlib import Path

import pytest
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.recipe import Recipe

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


def test_quickstart_prints_summary(tmp_path, capsys):
    demo_main(
        [
            "--recipe",
            str(RECIPES / "mone_25.yaml"),
            "--work-dir",
            str(tmp_path),
            "--num-samples",
            "4",
        ]
    )
    out = capsys.readouterr().out
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
