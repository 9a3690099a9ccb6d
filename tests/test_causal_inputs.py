"""
The experts' calibration inputs inside oneshot equal those of a plain causal
forward, on every family (llm-compressor 0.14's sequential tracer alone feeds
Qwen3-MoE and Mixtral bidirectional activations).
"""

import pytest
import torch
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import AutoModelForCausalLM

import mone_modifier  # noqa: F401
from devices import DEVICE, assert_close
from helpers import run_oneshot
from mone_modifier import MoNEPruningModifier
from mone_modifier.sequential_tracing import SequentialTracer
from mone_modifier.tiny_moe import FAMILIES
from reference import moe_blocks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_expert_inputs_equal_plain_causal_forward(
    family, batch_size, tiny_moe, samples
):
    path = tiny_moe(family)
    # computed where oneshot calibrates: on CUDA where present
    plain = AutoModelForCausalLM.from_pretrained(path).to(DEVICE).eval()
    first = min(moe_blocks(plain))
    expected = []
    plain.model.layers[first].mlp.experts.register_forward_pre_hook(
        lambda module, args: expected.append(args[0].detach().clone())
    )
    with torch.no_grad():
        for batch in samples.split(batch_size):
            plain(input_ids=batch.to(DEVICE))

    model = AutoModelForCausalLM.from_pretrained(path)
    linearize_moe(model)
    seen = []
    model.model.layers[first].mlp.experts.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    original_create_arg = SequentialTracer.create_arg
    run_oneshot(
        model, samples, MoNEPruningModifier(sparsity=0.25), batch_size=batch_size
    )

    # the first len(expected) calls are the calibration pass of that layer
    calibration = torch.cat(seen[: len(expected)])
    assert_close(calibration, torch.cat(expected), rtol=0, atol=1e-5)
    assert SequentialTracer.create_arg is original_create_arg, "tracer patch leaked"
