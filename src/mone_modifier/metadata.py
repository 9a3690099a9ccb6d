"""
How a model's config records its novices.

This package writes the ``approximate_experts`` layout (``{"<decoder layer
index>": [expert ids]}``, novices stored as ``<experts>.<id>.approx_value``,
retained experts under their logical ids), which the MoNE authors'
checkpoints use too. It also reads the ``expert_substitution`` layout
(``transform_config.expert_substitution`` in the compression config: explicit
constant tensors per replaced expert, retained experts stored compactly).
"""

import re
from dataclasses import dataclass

from loguru import logger
from transformers import PretrainedConfig

from mone_modifier.moe_layers import layer_index

__all__ = [
    "NOVICES_CONFIG_KEY",
    "LayerNovices",
    "read_novices",
    "record_novices",
    "recorded_novices",
]

NOVICES_CONFIG_KEY = "approximate_experts"
IGNORED_CONFIG_KEYS = ("approximate_expert_init_tokens",)


@dataclass(frozen=True)
class LayerNovices:
    """
    How one layer's novices are stored.

    :param novices: novice id -> checkpoint name of its constant, or None for
        ``<experts>.<id>.approx_value``
    :param compact: retained experts are stored under ids ``0 .. R-1`` in
        logical order, rather than under their logical ids
    """

    novices: dict[int, str | None]
    compact: bool = False


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "text_config", None) or config


def record_novices(config: PretrainedConfig, layer_index: int, expert_ids: list[int]):
    """Add one layer's novice ids to the config (in place)."""
    target = _text_config(config)
    novices = dict(getattr(target, NOVICES_CONFIG_KEY, None) or {})
    novices[str(layer_index)] = sorted(expert_ids)
    setattr(target, NOVICES_CONFIG_KEY, novices)


def recorded_novices(config: PretrainedConfig) -> dict[int, list[int]]:
    """The novice ids recorded in the config, by decoder layer index."""
    novices = getattr(_text_config(config), NOVICES_CONFIG_KEY, None) or {}
    return {int(layer): list(ids) for layer, ids in novices.items()}


def read_novices(config: PretrainedConfig, num_experts: int) -> dict[int, LayerNovices]:
    """
    Every pruned layer's novices from either layout, validated.

    :raises ValueError: on both layouts at once, unknown formats, or ids that
        are not distinct experts in ``[0, num_experts)`` leaving one retained
    """
    text_config = _text_config(config)
    for key in IGNORED_CONFIG_KEYS:
        if getattr(text_config, key, None) is not None:
            logger.info(f"MoNE: ignoring {key} (for an optional inference-time update)")
    approximate = getattr(text_config, NOVICES_CONFIG_KEY, None) or {}
    compression = getattr(config, "quantization_config", None) or getattr(
        config, "compression_config", None
    )
    substitution = ((compression or {}).get("transform_config") or {}).get(
        "expert_substitution"
    )
    if approximate and substitution:
        raise ValueError(
            f"the config has both {NOVICES_CONFIG_KEY} and expert_substitution; "
            f"a MoNE checkpoint carries exactly one of them"
        )
    if substitution:
        layers = _read_substitution(substitution)
        for layer, entry in layers.items():
            _check_ids(list(entry.novices), layer, num_experts)
    else:
        layers = {}
        for layer, ids in approximate.items():
            ids = _as_ids(ids, layer)
            _check_ids(ids, layer, num_experts)
            layers[int(layer)] = LayerNovices(dict.fromkeys(ids))
    return layers


def _read_substitution(substitution: dict) -> dict[int, LayerNovices]:
    if substitution.get("version") != 1:
        raise ValueError(
            f"expert_substitution version {substitution.get('version')!r} is not "
            f"supported (version 1 is)"
        )
    layers = {}
    for path, target in substitution.get("targets", {}).items():
        if len(re.findall(r"(?:^|\.)\d+(?=\.|$)", path)) != 1:
            raise ValueError(
                f"expert_substitution target {path!r} must name one decoder layer"
            )
        if target.get("weight_layout") != "compact_retained_experts":
            raise ValueError(
                f"expert_substitution target {path!r}: weight_layout "
                f"{target.get('weight_layout')!r} is not supported "
                f"(compact_retained_experts is)"
            )
        novices = {}
        for expert, replacement in target.get("replacements", {}).items():
            if replacement.get("format") != "constant-v1":
                raise ValueError(
                    f"expert_substitution target {path!r}, expert {expert}: format "
                    f"{replacement.get('format')!r} is not supported (constant-v1 is)"
                )
            novices[_as_ids([expert], path)[0]] = replacement["tensors"]["value"]
        layers[layer_index(path)] = LayerNovices(novices, compact=True)
    return layers


def _as_ids(ids, where) -> list[int]:
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        raise ValueError(f"novice ids of {where!r} must be integers, got {ids!r}")


def _check_ids(ids: list[int], layer: int, num_experts: int):
    if (
        any(not 0 <= i < num_experts for i in ids)
        or len(set(ids)) != len(ids)
        or len(ids) >= num_experts
    ):
        raise ValueError(
            f"layer {layer}: novices {ids} are not distinct expert ids in "
            f"[0, {num_experts}) that leave at least one expert"
        )
