"""
Every bad input fails with an error naming the parameter and the fix, before
any calibration work, and leaves the user's files untouched.
"""

import re

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoConfig, AutoModelForCausalLM

import mone_modifier  # noqa: F401
from helpers import run_oneshot, tree_digest
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import tiny_tokenizer


@pytest.fixture
def no_calibration(monkeypatch):
    """Fails the test if MoNE starts calibrating."""
    started = []
    monkeypatch.setattr(
        MoNEPruningModifier,
        "on_calibration_start",
        lambda self, *args, **kwargs: started.append(True),
    )
    yield
    assert not started, "the error came after calibration started"


def fails_before_calibration(path, samples, recipe, match, **kwargs):
    before = tree_digest(path)
    with pytest.raises(Exception, match=match):
        run_oneshot(path, samples, recipe, **kwargs)
    assert tree_digest(path) == before


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.25, 1.5])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be .* in \(0, 1\)"):
        MoNEPruningModifier(sparsity=sparsity)


@pytest.mark.parametrize(
    "field,value", [("scoring", "entropy"), ("scope", "global"), ("novice", "median")]
)
def test_unknown_choice_names_field_and_choices(field, value):
    with pytest.raises(ValueError) as error:
        MoNEPruningModifier(sparsity=0.25, **{field: value})
    message = str(error.value)
    assert field in message and value in message
    assert "mean" in message or "mone" in message or "layer" in message


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(
        ValueError, match="no parameter 'sparsty'.*Did you mean 'sparsity'"
    ):
        MoNEPruningModifier(sparsty=0.25)


def test_unknown_key_in_yaml_recipe(tiny_moe, samples, tmp_path, no_calibration):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "mone_stage:\n  pruning_modifiers:\n    MoNEPruningModifier:\n"
        "      sparsity: 0.25\n      novices: mean\n"
    )
    fails_before_calibration(
        tiny_moe("olmoe"), samples, str(recipe), "no parameter 'novices'.*'novice'"
    )


def test_report_path_must_be_json():
    with pytest.raises(ValueError, match="report_path must name a .json"):
        MoNEPruningModifier(sparsity=0.25, report_path="out/report.txt")


def test_drop_needs_layer_scope():
    with pytest.raises(ValueError, match="novice: drop .* scope: layer"):
        MoNEPruningModifier(sparsity=0.25, novice="drop", scope="model")


def test_sparsity_leaving_fewer_than_top_k(tiny_moe, samples, no_calibration):
    # 8 experts, top-2: round(0.9 * 8) = 7 would keep a single expert
    fails_before_calibration(
        tiny_moe("olmoe"),
        samples,
        MoNEPruningModifier(sparsity=0.9),
        r"keep 1 of 8 experts .* top_k=2\. Lower `sparsity` to at most 0\.75",
    )


def test_drop_breaking_group_limits(tiny_moe, samples, no_calibration):
    # DeepSeek-V3 test model: 2 groups of 4, ranked by their top two scores;
    # dropping round(0.75 * 8) = 6 takes 3 from each group and leaves 1
    fails_before_calibration(
        tiny_moe("deepseek_v3"),
        samples,
        MoNEPruningModifier(sparsity=0.75, novice="drop"),
        r"fewer than 2 experts in some of the 2 routing groups.*`sparsity`",
    )


def test_drop_needs_equal_loss_per_group(tiny_moe, samples, no_calibration):
    fails_before_calibration(
        tiny_moe("deepseek_v3"),
        samples,
        MoNEPruningModifier(sparsity=0.375, novice="drop"),
        r"multiple of 2",
    )


def test_dense_model(tmp_path, samples, no_calibration):
    config = AutoConfig.for_model(
        "llama",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = tmp_path / "dense"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    fails_before_calibration(
        path,
        samples,
        MoNEPruningModifier(sparsity=0.25),
        r"no MoE layer in this LlamaForCausalLM \(llama\).*for a dense model",
    )


def test_ignore_excluding_every_layer(tiny_moe, samples, no_calibration):
    fails_before_calibration(
        tiny_moe("olmoe"),
        samples,
        MoNEPruningModifier(sparsity=0.25, ignore=[r".*mlp$"]),
        r"ignore=.* matches every MoE layer .*Narrow the `ignore` patterns",
    )


def test_recipe_without_calibration_dataset(tiny_moe, no_calibration):
    path = tiny_moe("olmoe")
    before = tree_digest(path)
    with pytest.raises(ValueError, match="needs calibration data .*: pass a dataset"):
        oneshot(model=str(path), recipe=MoNEPruningModifier(sparsity=0.25))
    assert tree_digest(path) == before


def test_mone_after_a_quantizer_is_refused(tiny_moe, samples, no_calibration):
    gptq = GPTQModifier(targets=["Linear"], scheme="W8A16", ignore=["lm_head"])
    fails_before_calibration(
        tiny_moe("olmoe"),
        samples,
        [gptq, MoNEPruningModifier(sparsity=0.25)],
        r"comes after GPTQModifier in the recipe\. Put it first",
    )


def test_model_already_pruned_in_memory_is_refused(tiny_moe, samples):
    pruned = run_oneshot(tiny_moe("olmoe"), samples, MoNEPruningModifier(sparsity=0.25))
    with pytest.raises(ValueError, match=r"already pruned by MoNE \(\[0, 1\] layers"):
        run_oneshot(pruned, samples, MoNEPruningModifier(sparsity=0.25))


def test_reloaded_pruned_model_is_refused(tiny_moe, samples, tmp_path):
    pruned = run_oneshot(tiny_moe("olmoe"), samples, MoNEPruningModifier(sparsity=0.25))
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = mone_modifier.from_pretrained(tmp_path / "pruned")
    reloaded.config._name_or_path = str(tmp_path / "pruned")
    with pytest.raises(ValueError, match="already pruned by MoNE"):
        run_oneshot(reloaded, samples, MoNEPruningModifier(sparsity=0.25))


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_pruned_checkpoint_by_path_is_refused(family, tiny_moe, samples, tmp_path):
    """Plain transformers fails on a MoNE checkpoint (OLMoE: mismatched
    sizes) or loads random experts (Mixtral); oneshot refuses it first."""
    pruned = run_oneshot(tiny_moe(family), samples, MoNEPruningModifier(sparsity=0.25))
    pruned.save_pretrained(tmp_path / "pruned")
    layers = sorted(int(i) for i in pruned.config.approximate_experts)
    message = re.escape(f"is a checkpoint MoNE already pruned (layers {layers}")
    fails_before_calibration(
        tmp_path / "pruned", samples, MoNEPruningModifier(sparsity=0.25), message
    )


def test_non_finite_expert_outputs(tiny_moe, samples, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_moe("qwen3_moe"))
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[3] = float("inf")
    path = tmp_path / "overflowing"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(ValueError, match=r"layer 0: experts \[3\] produced NaN or inf"):
        run_oneshot(path, samples, MoNEPruningModifier(sparsity=0.25))


@pytest.mark.parametrize(
    "field,value",
    [
        ("sparsity", "a quarter"),
        ("sparsity", None),
        ("scoring", 3),
        ("ignore", "re:.*layers.0.*"),
        ("report_path", 7),
        ("seed", "zero"),
    ],
)
def test_wrongly_typed_parameter_is_named(field, value):
    with pytest.raises(ValueError, match=rf"(?s){field}\b.*(Input should|valid)"):
        MoNEPruningModifier(**{"sparsity": 0.25, field: value})


def oneshot_on(path, columns: dict, **kwargs):
    return oneshot(
        model=str(path),
        dataset=Dataset.from_dict(columns),
        recipe=MoNEPruningModifier(sparsity=0.25),
        shuffle_calibration_samples=False,
        **kwargs,
    )


def fails_on_data(path, columns, match, **kwargs):
    before = tree_digest(path)
    with pytest.raises(ValueError, match=match):
        oneshot_on(path, columns, **kwargs)
    assert tree_digest(path) == before


def test_empty_dataset(tiny_moe, no_calibration):
    fails_on_data(
        tiny_moe("olmoe"),
        {"input_ids": [], "attention_mask": []},
        "calibration `dataset` is empty",
    )


def test_all_padding_dataset(tiny_moe, samples, no_calibration):
    fails_on_data(
        tiny_moe("olmoe"),
        {
            "input_ids": samples.tolist(),
            "attention_mask": torch.zeros_like(samples).tolist(),
        },
        re.escape(
            f"samples {list(range(len(samples)))} of the `dataset` hold no real "
            f"token (empty, or all padding)"
        ),
    )


@pytest.mark.parametrize("with_mask", [True, False])
def test_empty_sample_among_real_ones(with_mask, tiny_moe, samples, no_calibration):
    rows = samples.tolist()
    rows[2] = []
    columns = {"input_ids": rows}
    if with_mask:
        columns["attention_mask"] = [[1] * len(row) for row in rows]
    fails_on_data(
        tiny_moe("olmoe"),
        columns,
        r"samples \[2\] of the `dataset` hold no real token",
    )


def test_too_few_tokens_to_measure_the_experts(tiny_moe, no_calibration):
    # 8 experts, top-2: 8 tokens give each expert two routed tokens at best
    fails_on_data(
        tiny_moe("olmoe"),
        {"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]]},
        r"holds 3 tokens, too few to measure 8 experts routed top-2.* at least 8 "
        r"tokens.*num_calibration_samples",
    )


def test_truncation_that_leaves_too_few_tokens(tiny_moe, samples, no_calibration):
    # rows as long as needed, but only one short sample is asked for
    fails_on_data(
        tiny_moe("olmoe"),
        {"input_ids": samples[:1, :3].tolist(), "attention_mask": [[1, 1, 1]]},
        "too few to measure",
        num_calibration_samples=1,
    )
