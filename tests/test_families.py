"""
MoNE inside oneshot against the independent reference, on every family:
statistics, chosen experts, novice vectors, config metadata, parameter count
and the pruned model's logits.
"""

import pytest
import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.offload.cache.base import OffloadCache
from transformers import AutoModelForCausalLM

import mone_modifier  # noqa: F401  (registers the modifier)
from devices import assert_close, tolerance
from helpers import novice_vectors, read_report, run_oneshot
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import FAMILIES, NUM_EXPERTS
from reference import ReferenceMoNE, moe_blocks

SPARSITY = 0.25
REPLACED = round(SPARSITY * NUM_EXPERTS)
LOGIT_TOL = 1e-5  # float32, on CPU

_references: dict[str, ReferenceMoNE] = {}


def reference_for(family: str, path, samples) -> ReferenceMoNE:
    if family not in _references:
        _references[family] = ReferenceMoNE(path, samples, NUM_EXPERTS).run_layer_scope(
            REPLACED
        )
    return _references[family]


def expert_sizes(path) -> dict[int, int]:
    """Parameters of one routed expert per MoE layer, read off the fused model."""
    model = AutoModelForCausalLM.from_pretrained(path)
    return {
        index: sum(p[0].numel() for p in experts.parameters())
        for index, experts in moe_blocks(model).items()
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "calibrate_all,batch_size", [(True, 1), (True, 4), (False, 1), (False, 4)]
)
def test_matches_reference(
    family, calibrate_all, batch_size, tiny_moe, samples, tmp_path
):
    path = tiny_moe(family)
    reference = reference_for(family, path, samples)
    report_path = tmp_path / "report.json"
    unpruned = AutoModelForCausalLM.from_pretrained(path)
    params_before = sum(p.numel() for p in unpruned.parameters())

    model = run_oneshot(
        path,
        samples,
        MoNEPruningModifier(sparsity=SPARSITY, report_path=str(report_path)),
        batch_size=batch_size,
        calibrate_all=calibrate_all,
    )

    report = read_report(report_path)
    assert [layer["index"] for layer in report["layers"]] == sorted(reference.layers)
    for layer in report["layers"]:
        expected = reference.layers[layer["index"]]
        assert layer["tokens"] == expected.tokens == samples.numel()
        assert layer["routed_tokens"] == expected.routed.tolist()
        torch.testing.assert_close(
            torch.tensor(layer["frequency"], dtype=torch.float64),
            expected.frequency,
            rtol=1e-5,
            atol=1e-9,
        )
        torch.testing.assert_close(
            torch.tensor(layer["output_std"], dtype=torch.float64),
            expected.output_std,
            rtol=1e-5,
            atol=1e-9,
        )
        assert layer["novices"] == expected.novices
        vectors = novice_vectors(model, layer["index"])
        assert sorted(vectors) == expected.novices
        for expert, vector in vectors.items():
            assert_close(vector.double(), expected.mean[expert], rtol=1e-5, atol=1e-6)
        # the sequential pipeline offloads every module; novices join that management
        experts = model.model.layers[layer["index"]].mlp.experts
        for expert in layer["novices"]:
            assert isinstance(experts[expert]._buffers, OffloadCache)
            assert not any(
                isinstance(m, torch.nn.Linear) for m in experts[expert].modules()
            )

    assert model.config.approximate_experts == {
        str(index): layer.novices for index, layer in reference.layers.items()
    }
    sizes = expert_sizes(path)
    params_after = sum(p.numel() for p in model.parameters())
    assert params_before - params_after == sum(
        sizes[i] * REPLACED for i in reference.layers
    )

    with torch.no_grad():
        logits = model(input_ids=samples).logits
    assert_close(logits, reference.logits(), rtol=0, atol=LOGIT_TOL)

    # the comparison can fail: zero novices move the logits far beyond the tolerance
    for index in reference.layers:
        experts = model.model.layers[index].mlp.experts
        for expert, vector in novice_vectors(model, index).items():
            # through the offload cache: on CUDA, ``vector`` is an onloaded copy
            zero = torch.zeros_like(vector)
            update_offload_parameter(experts[expert], "approx_value", zero)
    with torch.no_grad():
        zeroed = model(input_ids=samples).logits
    assert (zeroed.cpu() - reference.logits()).abs().max() > 100 * tolerance(LOGIT_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_are_well_separated(family, tiny_moe, samples):
    """The test models make a wrong choice visible: no near-tie at the cut."""
    reference = reference_for(family, tiny_moe(family), samples)
    for layer in reference.layers.values():
        score = layer.score("mone").sort().values
        gap = score[REPLACED] - score[REPLACED - 1]
        assert gap > 1e-3 * score.abs().max()
