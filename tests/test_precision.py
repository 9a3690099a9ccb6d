"""
bfloat16 and float16 models: MoNE's statistics stay float64, and it chooses
the experts a float32 run chooses on the same data, wherever the float32
scores are not tied within the low precision's rounding (routing itself
flips on near-tied tokens, so the statistics differ at the model's own
precision; that they are float64 sums of the low-precision outputs is
tested in test_statistics).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import novice_vectors, read_report, run_oneshot
from mone_modifier import MoNEPruningModifier

# relative score gap at the cut above which low-precision forwards (8 or 11
# mantissa bits, a few layers deep) cannot reorder the experts
CLEAR_GAP = {torch.bfloat16: 0.05, torch.float16: 0.01}


def prune(path, samples, dtype, report):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    modifier = MoNEPruningModifier(sparsity=0.25, report_path=str(report))
    pruned = run_oneshot(model, samples, modifier, pipeline="sequential")
    return pruned, read_report(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_low_precision_chooses_float32_experts(
    family, dtype, tiny_moe, samples, tmp_path
):
    path = tiny_moe(family)
    _, full = prune(path, samples, torch.float32, tmp_path / "fp32.json")
    low_model, low = prune(path, samples, dtype, tmp_path / "low.json")

    compared = 0
    for layer_full, layer_low in zip(full["layers"], low["layers"], strict=True):
        scores = sorted(layer_full["score"])
        cut = len(layer_full["novices"])
        gap = (scores[cut] - scores[cut - 1]) / scores[cut]
        assert layer_low["tokens"] == layer_full["tokens"]
        if gap > CLEAR_GAP[dtype]:
            assert layer_low["novices"] == layer_full["novices"], layer_full["index"]
            compared += 1
        if layer_low["novices"] != layer_full["novices"]:
            break  # later layers calibrate on differently pruned models
    assert compared >= 1, "no layer's cut was clear of rounding"
    # the novices are stored in the model's precision
    for layer in low["layers"]:
        for vector in novice_vectors(low_model, layer["index"]).values():
            assert vector.dtype == dtype
