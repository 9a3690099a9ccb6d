"""
How a model's config records its novices: the ``approximate_experts``
layout (``{"<decoder layer index>": [expert ids]}``) that the MoNE authors'
checkpoints and vLLM read.
"""

from transformers import PretrainedConfig

__all__ = ["NOVICES_CONFIG_KEY", "record_novices", "recorded_novices"]

NOVICES_CONFIG_KEY = "approximate_experts"


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
