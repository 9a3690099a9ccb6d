"""
MoNE stacked with GPTQ W4A16 and FP8 in one recipe: the quantizer never works
on replaced experts, novices stay full-precision constants, and the saved
checkpoint holds quantized retained experts, novices and the metadata.
"""

import json
from pathlib import Path

import pytest
import torch
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors import safe_open

from helpers import run_oneshot
from mone_modifier.novice import NoviceExpert
from mone_modifier.tiny_moe import NUM_EXPERTS

RECIPES = Path(__file__).parent.parent / "recipes"
FAMILY = "qwen2_moe"  # shared expert and its gate, the widest ignore list


@pytest.fixture
def gptq_work(monkeypatch):
    """Every module GPTQ compresses during the test."""
    compressed = []
    original = GPTQModifier.compress_module_list

    def spy(self, modules):
        compressed.extend(modules)
        return original(self, modules)

    monkeypatch.setattr(GPTQModifier, "compress_module_list", spy)
    return compressed


def quantizable_linears(model) -> dict[int, str]:
    """id -> name of every Linear the recipes target in the pruned model."""
    return {
        id(module): name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name != "lm_head"
        and not name.endswith("shared_expert_gate")
    }


@pytest.mark.parametrize("family", [FAMILY, "deepseek_v3"])
@pytest.mark.parametrize("pipeline", ["independent", "sequential"])
@pytest.mark.parametrize("recipe,replaced", [("mone_w4", 2), ("mone_w4_50", 4)])
def test_gptq_compresses_exactly_the_retained_linears(
    family, pipeline, recipe, replaced, quantizable_moe, samples, gptq_work
):
    model = run_oneshot(
        quantizable_moe(family),
        samples,
        str(RECIPES / f"{recipe}.yaml"),
        pipeline=pipeline,
    )
    targets = quantizable_linears(model)
    assert sorted(targets[id(m)] for m in gptq_work if id(m) in targets) == sorted(
        targets.values()
    )
    assert len(gptq_work) == len(targets), "GPTQ compressed replaced experts"

    novices = model.config.approximate_experts
    assert all(len(ids) == replaced for ids in novices.values())
    for index, ids in novices.items():
        experts = model.model.layers[int(index)].mlp.experts
        for expert in ids:
            assert isinstance(experts[expert], NoviceExpert)
            assert not hasattr(experts[expert], "quantization_scheme")
            assert torch.isfinite(experts[expert].approx_value).all()


@pytest.mark.parametrize("pipeline", ["independent", "sequential"])
def test_fp8_recipe(pipeline, quantizable_moe, samples, tmp_path):
    model = run_oneshot(
        quantizable_moe(FAMILY),
        samples,
        str(RECIPES / "mone_fp8.yaml"),
        pipeline=pipeline,
        output_dir=str(tmp_path / "out"),
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    assert config["approximate_experts"] == model.config.approximate_experts
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        for index, ids in model.config.approximate_experts.items():
            prefix = f"model.layers.{index}.mlp.experts"
            for expert in range(NUM_EXPERTS):
                if expert in ids:
                    assert f.get_tensor(f"{prefix}.{expert}.approx_value").dtype == (
                        torch.float32
                    )
                else:
                    weight = f.get_tensor(f"{prefix}.{expert}.up_proj.weight")
                    assert weight.dtype == torch.float8_e4m3fn


def test_w4a16_checkpoint_layout_and_size(quantizable_moe, samples, tmp_path):
    path = quantizable_moe(FAMILY)
    run_oneshot(
        path,
        samples,
        str(RECIPES / "mone_w4.yaml"),
        output_dir=str(tmp_path / "pruned"),
    )
    gptq_only = GPTQModifier(
        targets=["Linear"],
        scheme="W4A16",
        ignore=["lm_head", "re:.*shared_expert_gate$"],
    )
    baseline = run_oneshot(
        path, samples, gptq_only, output_dir=str(tmp_path / "unpruned")
    )

    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["format"] == "pack-quantized"
    assert "lm_head" in quantization["ignore"]
    assert config["num_experts"] == NUM_EXPERTS
    novices = config["approximate_experts"]

    with safe_open(tmp_path / "pruned" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for index, ids in novices.items():
            prefix = f"model.layers.{index}.mlp"
            assert f.get_tensor(f"{prefix}.gate.weight").shape[0] == NUM_EXPERTS
            assert (
                f.get_tensor(f"{prefix}.shared_expert_gate.weight").dtype
                == torch.float32
            )
            for expert in range(NUM_EXPERTS):
                names = {k for k in keys if k.startswith(f"{prefix}.experts.{expert}.")}
                if expert in ids:
                    assert names == {f"{prefix}.experts.{expert}.approx_value"}
                else:
                    assert f"{prefix}.experts.{expert}.down_proj.weight_packed" in names

    # smaller than the same recipe without MoNE by the replaced experts' bytes
    with safe_open(tmp_path / "unpruned" / "model.safetensors", "pt") as f:
        expert_bytes = sum(
            f.get_tensor(k).nbytes
            for k in f.keys()
            if k.startswith("model.layers.0.mlp.experts.0.")
        )
    hidden = baseline.config.hidden_size
    replaced = sum(len(ids) for ids in novices.values())
    size = {
        d: (tmp_path / d / "model.safetensors").stat().st_size
        for d in ("unpruned", "pruned")
    }
    saving = size["unpruned"] - size["pruned"]
    assert abs(saving - replaced * (expert_bytes - 4 * hidden)) < 8192
