"""
Where the MoE layers of a linearised model are, and their routing shape.

Detection and config reading are llm-compressor's own (REAP's
``get_moe_attrs``); this module adds the decoder-layer index of each block
and a clear error for models without MoE layers.
"""

import re
from dataclasses import dataclass

import torch
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modifiers.pruning.reap.utils import (
    EXPERTS_ATTRS,
    ROUTER_ATTRS,
    MoeModelAttrs,
    get_moe_attrs,
)

from mone_format import layer_index

__all__ = ["MoELayer", "MoEModel", "find_moe_layers"]

_MOE_CLASS = re.compile(r"Expert|Moe|MoE")


@dataclass(frozen=True)
class MoELayer:
    """
    One MoE block.

    :param name: module path of the block, e.g. ``model.layers.3.mlp``
    :param index: its decoder layer index, the key of ``approximate_experts``
    """

    name: str
    index: int


@dataclass(frozen=True)
class MoEModel:
    """
    The MoE layers of a model and their shared routing shape.

    :param attrs: llm-compressor's description (attribute names, E, top_k,
        routing groups)
    :param layers: the blocks to prune, in model order
    """

    attrs: MoeModelAttrs
    layers: list[MoELayer]

    def experts(self, model: torch.nn.Module, layer: MoELayer) -> LinearExperts2D:
        return getattr(model.get_submodule(layer.name), self.attrs.experts_attr)


def _no_moe_layer_message(model: torch.nn.Module) -> str:
    """A dense model, or an MoE model whose experts llm-compressor 0.14 does
    not linearise (its experts are not one fused module transformers marks
    as experts): say which, since the fix differs."""
    moe_classes = sorted(
        {
            type(module).__name__
            for module in model.modules()
            if _MOE_CLASS.search(type(module).__name__)
        }
    )
    model_type = model.config.model_type
    if moe_classes:
        return (
            f"MoNEPruningModifier cannot prune this {model_type} model: it is a "
            f"Mixture-of-Experts model ({', '.join(moe_classes)}), but "
            f"llm-compressor 0.14 does not linearise its experts into one "
            f"{' or '.join(map(repr, EXPERTS_ATTRS))} module of per-expert Linears "
            f"next to a {' or '.join(map(repr, ROUTER_ATTRS))} router, which "
            f"expert pruning (MoNE, REAP) needs. The families MoNE prunes are in "
            f"the README's family table; quantization alone works on this model."
        )
    return (
        f"MoNEPruningModifier found no MoE layer in this {type(model).__name__} "
        f"({model_type}): expert pruning needs a Mixture-of-Experts model. "
        f"Remove MoNEPruningModifier from the recipe for a dense model."
    )


def find_moe_layers(model: torch.nn.Module, ignore: list[str]) -> MoEModel:
    """
    :param model: model whose fused experts oneshot has linearised
    :param ignore: regular expressions of block names to leave alone
    :raises ValueError: when the model has no MoE block, or ``ignore``
        excludes them all
    """
    blocks = [
        name
        for name, module in model.named_modules()
        if any(
            isinstance(getattr(module, e, None), LinearExperts2D) for e in EXPERTS_ATTRS
        )
        and any(hasattr(module, r) for r in ROUTER_ATTRS)
    ]
    if not blocks:
        raise ValueError(_no_moe_layer_message(model))
    if all(any(re.search(pattern, name) for pattern in ignore) for name in blocks):
        raise ValueError(
            f"ignore={ignore} matches every MoE layer of the model ({blocks[0]}, "
            f"...): nothing would be pruned. Narrow the `ignore` patterns."
        )
    try:
        attrs = get_moe_attrs(model, ignore)
    except ValueError as error:  # a routing field llm-compressor has no name for
        raise ValueError(
            f"MoNEPruningModifier cannot prune this {model.config.model_type} "
            f"model: llm-compressor 0.14 cannot read its routing ({error}). The "
            f"families MoNE prunes are in the README's family table."
        ) from error
    return MoEModel(
        attrs, [MoELayer(name, layer_index(name)) for name in attrs.moe_layer_names]
    )
