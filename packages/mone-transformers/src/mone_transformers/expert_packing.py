"""
From per-expert 2-D weights (``experts.<id>.gate_proj.weight``, the
linearised form llm-compressor calibrates and MoNE checkpoints store) to an
architecture's fused 3-D experts module.

The fused layout is the one its class declares to transformers'
``@use_experts_implementation`` (``is_concatenated``, ``is_transposed``,
``has_bias``, ``has_gate``), which the decorator sets on every instance and
transformers' own experts kernels read. Reading it here keeps the loader free
of llm-compressor, so it runs wherever transformers does.
"""

import copy

import torch
from accelerate import init_empty_weights
from transformers import PretrainedConfig

from mone_format import EXPERT_COUNT_KEYS

__all__ = ["is_fused_experts", "pack_experts", "with_expert_count"]

_LAYOUT = ("is_concatenated", "is_transposed", "has_bias", "has_gate")


def is_fused_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an experts module of transformers' fused kind."""
    return all(hasattr(module, flag) for flag in _LAYOUT) and isinstance(
        getattr(module, "down_proj", None), torch.nn.Parameter
    )


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
    Build ``fused_cls`` for ``len(experts)`` experts, holding their weights.

    :param fused_cls: the architecture's experts class (e.g. ``Qwen3MoeExperts``)
    :param config: the model's (text) config
    :param experts: per expert, its 2-D tensors by name (``gate_proj.weight``,
        ``up_proj.weight``, ``down_proj.weight`` and biases where present)
    """
    with init_empty_weights(include_buffers=False):
        fused = fused_cls(with_expert_count(config, len(experts)))
    if not is_fused_experts(fused):
        raise TypeError(
            f"{fused_cls.__name__} is not a fused experts module declared "
            f"through transformers' @use_experts_implementation"
        )
    packed = {
        name: torch.stack([_fused_tensor(fused, name, e) for e in experts])
        for name, _ in fused.named_parameters(recurse=False)
    }
    for name, tensor in packed.items():
        expected = getattr(fused, name).shape
        if tensor.shape != expected:
            raise ValueError(
                f"{fused_cls.__name__}.{name}: the checkpoint's experts pack to "
                f"{tuple(tensor.shape)}, the config asks {tuple(expected)}"
            )
        setattr(fused, name, torch.nn.Parameter(tensor))
    return fused


def _fused_tensor(
    fused: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One expert's slice of the fused parameter ``name``."""
    projection = name.removesuffix("_bias")
    kind = "bias" if name.endswith("_bias") else "weight"

    def stored(tensor_name: str) -> torch.Tensor:
        if tensor_name not in tensors:
            raise ValueError(
                f"{type(fused).__name__}.{name} needs each expert's "
                f"{tensor_name!r}; an expert has only {sorted(tensors)}"
            )
        return tensors[tensor_name]

    if projection == "gate_up_proj":
        gate, up = stored(f"gate_proj.{kind}"), stored(f"up_proj.{kind}")
        # [gate; up] halves, or GPT-OSS's interleaved gate0, up0, gate1, ...
        if fused.is_concatenated:
            tensor = torch.cat([gate, up])
        else:
            tensor = torch.stack([gate, up], dim=1).flatten(0, 1)
    elif projection in ("up_proj", "down_proj"):
        tensor = stored(f"{projection}.{kind}")
    else:
        raise ValueError(
            f"{type(fused).__name__} has a parameter {name!r} the per-expert "
            f"layout does not describe"
        )
    # weights are [out, in] per expert; transposed modules store [in, out]
    return tensor.T if fused.is_transposed and kind == "weight" else tensor
