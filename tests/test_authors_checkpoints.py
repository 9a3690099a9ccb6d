"""
Loading checkpoints in the MoNE authors' layout (``authors_layout.py``).
Their ``OlmoeSparseMoeBlock`` routes as stock OLMoE (softmax, top-k,
optional renormalisation) and adds ``weight * approx_value`` for a token
routed to a novice; the test computes that forward independently.
"""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mone_modifier
from authors_layout import SOURCE_OVERRIDES, authors_checkpoint
from devices import assert_close
from helpers import run_oneshot
from mone_format import stock_config
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import build_tiny_moe


def novice_experts_forward(experts, layer: int, vectors: dict):
    """Route by route, as the authors' MoE blocks add them: ``weight *
    approx_value`` for a novice, ``weight * down(act(gate x) * up x)`` for
    an expert (the stock fused module holds every expert's weights). Stock
    routing is theirs: they keep the family's router."""

    def forward(hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for token, slot in itertools.product(*map(range, top_k_index.shape)):
            expert, weight = int(top_k_index[token, slot]), top_k_weights[token, slot]
            if (layer, expert) in vectors:
                out[token] += weight * vectors[layer, expert].to(hidden.dtype)
                continue
            gate, up = (experts.gate_up_proj[expert] @ hidden[token]).chunk(2)
            out[token] += weight * (
                experts.down_proj[expert] @ (experts.act_fn(gate) * up)
            )
        return out

    return forward


@pytest.mark.parametrize("family", SOURCE_OVERRIDES)
@torch.no_grad()
def test_loads_as_the_authors_forward_computes(family, tmp_path, samples):
    source = build_tiny_moe(family, tmp_path / "source", **SOURCE_OVERRIDES[family])
    vectors = authors_checkpoint(source, tmp_path / "authors")
    loaded = mone_modifier.from_pretrained(tmp_path / "authors")
    assert loaded.config.model_type == family

    expected = AutoModelForCausalLM.from_pretrained(source).eval()
    for index in {layer for layer, _ in vectors}:
        experts = expected.model.layers[index].mlp.experts
        experts.forward = novice_experts_forward(experts, index, vectors)
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
        (dict(mod_type="integrated"), "mod_type"),
    ],
    ids=["unknown-type", "widths", "flap", "dropped-experts", "evolving", "depths"],
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
        "mod_type": None,
        "staged_mod_topk": 2048,
        "auto_map": {"AutoConfig": "x"},
    }
    assert stock_config(config) == {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "moe_intermediate_size": 32,
        "n_shared_experts": 2,
    }
    with pytest.raises(ValueError, match="shared_intermediate_sizes of layer 1"):
        stock_config({**config, "shared_intermediate_sizes": {"1": 48}})


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
@torch.no_grad()
def test_pruned_here_saves_for_both_readers(family, tiny_moe, samples, tmp_path):
    """``authors_layout`` writes the config the authors' code reads; their
    forward computed from the saved novices, and ``from_pretrained``, both
    give the pruned model's logits."""
    source = tiny_moe(family)
    recipe = MoNEPruningModifier(sparsity=0.25, authors_layout=True)
    model = run_oneshot(source, samples, recipe)
    in_memory = model(input_ids=samples).logits
    model.save_pretrained(tmp_path / "out")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    assert config["model_type"] == f"{family}_compressed"
    assert config["architectures"] == source_config["architectures"]
    novices = {int(k): v for k, v in config["approximate_experts"].items()}
    assert config["approximate_expert_init_tokens"] == {
        str(k): [0] * len(v) for k, v in novices.items()
    }
    assert config["routed_intermediate_sizes"] is None
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    vectors = {
        (layer, e): tensors[f"model.layers.{layer}.mlp.experts.{e}.approx_value"]
        for layer, ids in novices.items()
        for e in ids
    }
    assert not any(
        f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight" in tensors
        for layer, e in vectors
    )
    theirs = AutoModelForCausalLM.from_pretrained(source).eval()
    for index in novices:
        experts = theirs.model.layers[index].mlp.experts
        experts.forward = novice_experts_forward(experts, index, vectors)
    assert_close(theirs(input_ids=samples).logits, in_memory, rtol=0, atol=1e-5)
    ours = mone_modifier.from_pretrained(tmp_path / "out")
    assert_close(ours(input_ids=samples).logits, in_memory, rtol=0, atol=1e-5)


def test_authors_layout_is_refused_for_other_families(tiny_moe, samples):
    recipe = MoNEPruningModifier(sparsity=0.25, authors_layout=True)
    with pytest.raises(ValueError, match="no model type for 'qwen3_moe'"):
        run_oneshot(tiny_moe("qwen3_moe"), samples, recipe)
