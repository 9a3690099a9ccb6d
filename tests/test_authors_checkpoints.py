"""
Loading checkpoints in the MoNE authors' layout (``authors_layout.py``).
Their ``OlmoeSparseMoeBlock`` routes as stock OLMoE (softmax, top-k,
optional renormalisation) and adds ``weight * approx_value`` for a token
routed to a novice; the test computes that forward independently.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mone_modifier
from authors_layout import authors_checkpoint
from mone_format import stock_config
from mone_modifier.tiny_moe import build_tiny_moe


def authors_moe_forward(block, layer: int, vectors: dict):
    """The authors' ``OlmoeSparseMoeBlock.forward``, expert by expert, on a
    stock block holding the unpruned weights."""
    experts, router = block.experts, block.gate

    def forward(hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(x @ router.weight.T, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, router.top_k, dim=-1)
        if router.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for expert in range(experts.num_experts):
            token, slot = torch.where(chosen == expert)
            if (layer, expert) in vectors:
                y = vectors[layer, expert].to(x.dtype).expand(len(token), -1)
            else:
                gate, up = experts.gate_up_proj[expert].chunk(2, dim=0)
                h = x[token]
                y = (experts.act_fn(h @ gate.T) * (h @ up.T)) @ experts.down_proj[
                    expert
                ].T
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.reshape(shape)

    return forward


@torch.no_grad()
def test_loads_as_the_authors_forward_computes(tmp_path, samples):
    source = build_tiny_moe("olmoe", tmp_path / "source")
    vectors = authors_checkpoint(source, tmp_path / "authors")
    loaded = mone_modifier.from_pretrained(tmp_path / "authors")
    assert loaded.config.model_type == "olmoe"

    expected = AutoModelForCausalLM.from_pretrained(source).eval()
    for index, layer in enumerate(expected.model.layers):
        layer.mlp.forward = authors_moe_forward(layer.mlp, index, vectors)
    torch.testing.assert_close(
        loaded(input_ids=samples).logits,
        expected(input_ids=samples).logits,
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "fields,pattern",
    [
        (dict(model_type="qwen2_moe_compressed"), "qwen2_moe_compressed"),
        (dict(routed_intermediate_sizes={"0": [64, 32]}), "routed_intermediate_sizes"),
        (
            dict(flap_intermediate_sizes={"0": {"routed": [64]}}),
            "flap_intermediate_sizes",
        ),
        (dict(num_experts={"0": 6, "1": 8}), "num_experts differs per layer"),
        (dict(approximate_expert_init_tokens={"0": [5, 0]}), "novice evolving"),
    ],
    ids=["unknown-type", "widths", "flap", "dropped-experts", "evolving"],
)
def test_variants_the_stock_model_cannot_hold_are_refused(fields, pattern, tmp_path):
    source = build_tiny_moe("olmoe", tmp_path / "source")
    authors_checkpoint(source, tmp_path / "authors", **fields)
    with pytest.raises(ValueError, match=pattern):
        mone_modifier.from_pretrained(tmp_path / "authors")


def test_uniform_widths_map_to_the_stock_config():
    config = {
        "model_type": "deepseek_v3_compressed",
        "moe_intermediate_size": 32,
        "n_shared_experts": 2,
        "routed_intermediate_sizes": {"1": [32, 32]},
        "shared_intermediate_sizes": {"1": 64},
        "auto_map": {"AutoConfig": "x"},
    }
    assert stock_config(config) == {
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 32,
        "n_shared_experts": 2,
    }
    with pytest.raises(ValueError, match="shared_intermediate_sizes of layer 1"):
        stock_config({**config, "shared_intermediate_sizes": {"1": 48}})
