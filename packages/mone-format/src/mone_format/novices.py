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

__all__ = [
    "EXPERT_COUNT_KEYS",
    "NOVICE_TENSOR",
    "NOVICES_CONFIG_KEY",
    "LayerNovices",
    "expert_count",
    "layer_index",
    "read_novices",
    "record_novices",
    "recorded_novices",
]

NOVICES_CONFIG_KEY = "approximate_experts"
NOVICE_TENSOR = "approx_value"
EXPERT_COUNT_KEYS = (
    "num_experts",
    "num_local_experts",
    "moe_num_experts",
    "n_routed_experts",
)
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


def layer_index(name: str) -> int:
    """The decoder layer index in a module path, e.g. 3 in model.layers.3.mlp."""
    indices = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
    if not indices:
        raise ValueError(f"cannot tell the decoder layer index of MoE block {name!r}")
    return int(indices[-1])


def expert_count(config) -> int:
    """The number of routed experts per MoE layer (E) a config declares."""
    config = _text_config(config)
    for key in EXPERT_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(
        f"the config declares no expert count (none of {', '.join(EXPERT_COUNT_KEYS)})"
    )


def _text_config(config):
    """The config holding the text model's fields (a transformers
    ``PretrainedConfig``, ``text_config`` for multimodal ones)."""
    return getattr(config, "text_config", None) or config


def record_novices(config, layer_index: int, expert_ids: list[int]):
    """Add one layer's novice ids to the config (in place)."""
    target = _text_config(config)
    novices = dict(getattr(target, NOVICES_CONFIG_KEY, None) or {})
    novices[str(layer_index)] = sorted(expert_ids)
    setattr(target, NOVICES_CONFIG_KEY, novices)


def recorded_novices(config) -> dict[int, list[int]]:
    """The novice ids recorded in the config, by decoder layer index."""
    novices = getattr(_text_config(config), NOVICES_CONFIG_KEY, None) or {}
    return {int(layer): list(ids) for layer, ids in novices.items()}


def read_novices(config, num_experts: int) -> dict[int, LayerNovices]:
    """
    Every pruned layer's novices from either layout, validated.

    Layer indices and expert ids in keys are decimal strings (``"3"``, not
    ``"03"``); ids in lists are JSON integers, so ``true`` or ``1.0`` is refused.

    :raises ValueError: naming the part of the config at fault, on either
        layout not having the documented shape, both layouts at once, unknown
        formats, or ids that are not distinct experts in ``[0, num_experts)``
        leaving one retained
    """
    text_config = _text_config(config)
    for key in IGNORED_CONFIG_KEYS:
        if getattr(text_config, key, None) is not None:
            logger.info(f"MoNE: ignoring {key} (for an optional inference-time update)")
    approximate = _read_approximate(
        getattr(text_config, NOVICES_CONFIG_KEY, None), num_experts
    )
    substitution = _expert_substitution(config)
    if substitution is None:
        return approximate
    if approximate:
        raise ValueError(
            f"the config has both {NOVICES_CONFIG_KEY} and expert_substitution; "
            f"a MoNE checkpoint carries exactly one of them"
        )
    return _read_substitution(substitution, num_experts)


def _read_approximate(approximate, num_experts: int) -> dict[int, LayerNovices]:
    if approximate is None:
        return {}
    layers = {}
    for key, ids in _dict(approximate, NOVICES_CONFIG_KEY).items():
        where = f"{NOVICES_CONFIG_KEY} layer {key!r}"
        layer = _index(key, f"{NOVICES_CONFIG_KEY} layer")
        layers[layer] = LayerNovices(dict.fromkeys(_ids(ids, where, num_experts)))
    return layers


def _expert_substitution(config):
    """The raw ``expert_substitution`` entry, or None where there is none."""
    key = "quantization_config"
    if not getattr(config, key, None):
        key = "compression_config"
    compression = getattr(config, key, None)
    if compression is None:
        return None
    if not isinstance(compression, dict) and hasattr(compression, "to_dict"):
        # a transformers quantization config object, as after a quantized load
        compression = compression.to_dict()
    transform = _dict(compression, key).get("transform_config")
    if transform is None:
        return None
    return _dict(transform, f"{key}.transform_config").get("expert_substitution")


def _read_substitution(substitution, num_experts: int) -> dict[int, LayerNovices]:
    substitution = _dict(substitution, "expert_substitution")
    version = substitution.get("version")
    if not _is_int(version) or version != 1:
        raise ValueError(
            f"expert_substitution version {version!r} is not supported (version 1 is)"
        )
    targets = _dict(substitution.get("targets"), "expert_substitution targets")
    layers = {}
    for path, target in targets.items():
        where = f"expert_substitution target {path!r}"
        if len(re.findall(r"(?:^|\.)\d+(?=\.|$)", path)) != 1:
            raise ValueError(f"{where} must name one decoder layer")
        target = _dict(target, where)
        if target.get("weight_layout") != "compact_retained_experts":
            raise ValueError(
                f"{where}: weight_layout {target.get('weight_layout')!r} is not "
                f"supported (compact_retained_experts is)"
            )
        replacements = _dict(target.get("replacements"), f"{where} replacements")
        novices = {}
        for expert, replacement in replacements.items():
            at = f"{where}, expert {expert!r}"
            replacement = _dict(replacement, at)
            if replacement.get("format") != "constant-v1":
                raise ValueError(
                    f"{at}: format {replacement.get('format')!r} is not supported "
                    f"(constant-v1 is)"
                )
            name = _dict(replacement.get("tensors"), f"{at} tensors").get("value")
            # None would silently mean the approximate_experts tensor name
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"{at}: tensors.value must be a checkpoint tensor name, "
                    f"got {name!r}"
                )
            novices[_index(expert, f"{where}: expert")] = name
        _ids(list(novices), where, num_experts)
        layer = layer_index(path)
        if layer in layers:
            # a second target of the layer would silently replace the first
            raise ValueError(f"{where}: another target names layer {layer} too")
        layers[layer] = LayerNovices(novices, compact=True)
    return layers


def _dict(value, where: str) -> dict:
    """``value``, checked to be a dict with string keys (JSON objects are)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{where} must be a dict with string keys, got {value!r}")
    return value


def _index(key: str, what: str) -> int:
    # only the canonical spelling: "01" beside "1" would silently overwrite it
    if not re.fullmatch(r"0|[1-9][0-9]*", key):
        raise ValueError(f"{what} {key!r} must be a non-negative integer like '3'")
    return int(key)


def _is_int(value) -> bool:
    # bool is an int to Python, but true in a config is not an id or a version
    return isinstance(value, int) and not isinstance(value, bool)


def _ids(ids, where: str, num_experts: int) -> list[int]:
    """``ids``, checked to be distinct expert ids leaving one expert retained."""
    # a string would iterate as digits and a float may be a rounded id: refuse both
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) for i in ids):
        raise ValueError(
            f"{where}: novices must be a list of integer expert ids, got {ids!r}"
        )
    if (
        any(not 0 <= i < num_experts for i in ids)
        or len(set(ids)) != len(ids)
        or len(ids) >= num_experts
    ):
        raise ValueError(
            f"{where}: novices {list(ids)} are not distinct expert ids in "
            f"[0, {num_experts}) that leave at least one expert"
        )
    return list(ids)
