"""
The ablation scorings, the novice kinds (drop included), model-wide scope,
never-routed experts and every pipeline, each against the reference.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mone_modifier  # noqa: F401
from devices import assert_close
from helpers import novice_vectors, read_report, run_oneshot
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import NUM_EXPERTS, TOP_K, tiny_tokenizer
from reference import ReferenceMoNE


def run_and_report(path, samples, tmp_path, pipeline="independent", **options):
    report_path = tmp_path / "report.json"
    model = run_oneshot(
        path,
        samples,
        MoNEPruningModifier(report_path=str(report_path), **options),
        pipeline=pipeline,
    )
    report = read_report(report_path)
    return model, {layer["index"]: layer for layer in report["layers"]}


def assert_same_logits(model, reference, samples):
    with torch.no_grad():
        logits = model(input_ids=samples).logits
    assert_close(logits, reference.logits(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "family,options",
    [
        ("qwen2_moe", dict(scoring="frequency")),
        ("qwen2_moe", dict(scoring="variance")),
        ("qwen2_moe", dict(scoring="reap")),
        ("mixtral", dict(novice="weighted_mean")),
        ("olmoe", dict(novice="zero")),
    ],
)
def test_layer_scope_options(family, options, tiny_moe, samples, tmp_path):
    path = tiny_moe(family)
    reference = ReferenceMoNE(path, samples, NUM_EXPERTS).run_layer_scope(2, **options)
    model, layers = run_and_report(path, samples, tmp_path, sparsity=0.25, **options)
    for index, expected in reference.layers.items():
        assert layers[index]["novices"] == expected.novices
    assert_same_logits(model, reference, samples)


@pytest.mark.parametrize(
    "family", ["olmoe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]
)
def test_drop_matches_a_smaller_stock_model(family, tiny_moe, samples, tmp_path):
    path = tiny_moe(family)
    group_size = 4 if family == "deepseek_v3" else None
    reference = ReferenceMoNE(path, samples, NUM_EXPERTS).run_layer_scope(
        2, novice="drop", group_size=group_size
    )
    model, layers = run_and_report(
        path, samples, tmp_path, sparsity=0.25, novice="drop"
    )
    for index, expected in reference.layers.items():
        assert layers[index]["novices"] == expected.novices
        experts = model.model.layers[index].mlp.experts
        assert experts.num_experts == NUM_EXPERTS - 2
    assert not novice_vectors(model, max(reference.layers))
    assert_same_logits(model, reference, samples)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_model_scope(family, tiny_moe, samples, tmp_path):
    path = tiny_moe(family)
    reference = ReferenceMoNE(path, samples, NUM_EXPERTS).run_model_scope(
        per_layer=4, layer_limit=NUM_EXPERTS - TOP_K
    )
    model, layers = run_and_report(path, samples, tmp_path, sparsity=0.5, scope="model")
    for index, expected in reference.layers.items():
        assert layers[index]["novices"] == expected.novices
    assert sum(len(layer["novices"]) for layer in layers.values()) == 4 * len(layers)
    assert_same_logits(model, reference, samples)


def test_group_limited_router_loses_its_lowest_experts(tiny_moe, samples, tmp_path):
    """Novices keep DeepSeek-V3's group-limited router (2 groups of 4, top-2
    from 1 group) routing to every expert: at 50% each layer replaces its 4
    lowest-scoring experts, three of them in one group in some layer, which a
    cap per group would have refused."""
    path = tiny_moe("deepseek_v3")
    reference = ReferenceMoNE(path, samples, NUM_EXPERTS).run_layer_scope(4)
    model, layers = run_and_report(path, samples, tmp_path, sparsity=0.5)
    for index, expected in reference.layers.items():
        assert layers[index]["novices"] == expected.novices
    assert any(
        max(sum(e < 4 for e in layer.novices), sum(e >= 4 for e in layer.novices)) > 2
        for layer in reference.layers.values()
    )
    assert_same_logits(model, reference, samples)


@pytest.mark.parametrize(
    "pipeline,progressive",
    [("sequential", True), ("basic", False), ("independent", True)],
)
def test_pipelines(pipeline, progressive, tiny_moe, samples, tmp_path):
    path = tiny_moe("qwen3_moe")
    reference = ReferenceMoNE(path, samples, NUM_EXPERTS).run_layer_scope(
        2, progressive=progressive
    )
    model, layers = run_and_report(
        path, samples, tmp_path, pipeline=pipeline, sparsity=0.25
    )
    for index, expected in reference.layers.items():
        assert layers[index]["novices"] == expected.novices
        assert layers[index]["routed_tokens"] == expected.routed.tolist()
    assert_same_logits(model, reference, samples)


def test_random_scoring_is_seeded(tiny_moe, samples, tmp_path):
    path = tiny_moe("olmoe")
    runs = [
        run_and_report(
            path, samples, tmp_path / str(i), sparsity=0.25, scoring="random", seed=seed
        )[1]
        for i, seed in enumerate([0, 0, 1])
    ]
    choices = [{i: layer["novices"] for i, layer in run.items()} for run in runs]
    assert choices[0] == choices[1]
    assert choices[0] != choices[2]
    assert all(len(ids) == 2 for run in choices for ids in run.values())


def test_never_routed_expert_is_replaced_first_by_zero(
    tiny_moe, samples, tmp_path, log_lines
):
    model = AutoModelForCausalLM.from_pretrained(tiny_moe("gpt_oss"))
    with torch.no_grad():
        model.model.layers[0].mlp.router.bias[5] = -1e4  # never selected
    path = tmp_path / "gpt_oss_unrouted"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    reference = ReferenceMoNE(path, samples, NUM_EXPERTS).run_layer_scope(2)
    assert reference.layers[0].routed[5] == 0

    pruned, layers = run_and_report(path, samples, tmp_path, sparsity=0.25)
    assert layers[0]["never_routed"] == [5]
    assert 5 in layers[0]["novices"]
    assert layers[0]["novices"] == reference.layers[0].novices
    assert torch.count_nonzero(novice_vectors(pruned, 0)[5]) == 0
    assert any(
        "experts [5] received no calibration token" in line for line in log_lines
    )
    assert_same_logits(pruned, reference, samples)
