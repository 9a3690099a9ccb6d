"""
Between per-expert 2-D weights (``experts.<id>.gate_proj.weight``, the
linearised form llm-compressor calibrates and saves) and an architecture's
fused 3-D experts module, using llm-compressor's own per-family copy
functions.
"""

import copy
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from llmcompressor.modeling.moe.gpt_oss import GptOssExpertMLP
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.utils.dev import skip_weights_initialize
from transformers import PretrainedConfig

from mone_format import EXPERT_COUNT_KEYS

__all__ = [
    "gpt_oss_repack_fix",
    "pack_experts",
    "with_expert_count",
]


def with_expert_count(config: PretrainedConfig, count: int) -> PretrainedConfig:
    """``config``, or a copy whose every expert-count key says ``count``."""
    if all(getattr(config, k, count) == count for k in EXPERT_COUNT_KEYS):
        return config
    config = copy.deepcopy(config)
    for key in EXPERT_COUNT_KEYS:
        if key in config.to_dict():
            setattr(config, key, count)
    return config


@torch.no_grad()
def pack_experts(
    fused_cls: type[torch.nn.Module],
    config: PretrainedConfig,
    experts: list[dict[str, torch.Tensor]],
) -> torch.nn.Module:
    """
    Build ``fused_cls`` for ``len(experts)`` experts and fill it.

    :param fused_cls: the architecture's experts class (e.g. ``Qwen3MoeExperts``)
    :param config: the model's (text) config
    :param experts: per expert, its 2-D tensors by name (``gate_proj.weight``,
        ``up_proj.weight``, ``down_proj.weight`` and biases where present)
    """
    with skip_weights_initialize():
        fused = fused_cls(with_expert_count(config, len(experts)))
    first = experts[0]["down_proj.weight"]
    fused.to(first.dtype)
    linear_cls = LinearExperts2D.get_linear_experts_cls(fused_cls)
    expert_cls = (
        linear_cls.expert_cls_with_gate
        if linear_cls.has_gate
        else linear_cls.expert_cls_without_gate
    )
    with gpt_oss_repack_fix():
        for index, tensors in enumerate(experts):
            expert_cls.copy_to_experts_module(_as_expert(tensors), fused, index)
    return fused


def _as_expert(tensors: dict[str, torch.Tensor]) -> SimpleNamespace:
    """The attributes ``copy_to_experts_module`` reads off an ExpertMLP."""
    projections = {
        name: SimpleNamespace(
            weight=tensors[f"{name}.weight"], bias=tensors.get(f"{name}.bias")
        )
        for name in ("gate_proj", "up_proj", "down_proj")
        if f"{name}.weight" in tensors
    }
    intermediate_size = tensors["down_proj.weight"].shape[1]
    return SimpleNamespace(intermediate_size=intermediate_size, **projections)


@contextmanager
def gpt_oss_repack_fix():
    """llm-compressor 0.14 repacks GPT-OSS experts into halves of
    ``gate_up_proj`` although the model interleaves gate and up columns (its
    own ``copy_from_experts_module`` reads them interleaved)."""
    original = GptOssExpertMLP.__dict__.get("copy_to_experts_module")
    GptOssExpertMLP.copy_to_experts_module = _gpt_oss_copy_to_experts_module
    try:
        yield
    finally:
        if original is None:
            del GptOssExpertMLP.copy_to_experts_module
        else:
            GptOssExpertMLP.copy_to_experts_module = original


@torch.no_grad()
def _gpt_oss_copy_to_experts_module(self, experts, index: int):
    experts.gate_up_proj[index, :, 0::2].copy_(self.gate_proj.weight.T)
    experts.gate_up_proj[index, :, 1::2].copy_(self.up_proj.weight.T)
    experts.down_proj[index].copy_(self.down_proj.weight.T)
    experts.gate_up_proj_bias[index, 0::2].copy_(self.gate_proj.bias)
    experts.gate_up_proj_bias[index, 1::2].copy_(self.up_proj.bias)
    experts.down_proj_bias[index].copy_(self.down_proj.bias)
