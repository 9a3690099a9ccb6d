"""
Correct causal masks in llm-compressor 0.14's sequential pipeline.

``SequentialTracer.create_arg`` puts a model config into a traced graph as
``ConfigClass(**config.to_dict())``. ``to_dict()`` drops the private
``_attn_implementation``, and transformers' ``create_causal_mask`` returns
no mask at all for a config without one. Models whose mask builder is
reached through a local variable (``mask_function = create_causal_mask ...``
in Qwen3-MoE, Mixtral, Mistral, ...) are traced that way instead of being
auto-wrapped, so their decoder layers calibrate with bidirectional
attention: every calibration-based modifier (MoNE, GPTQ, REAP) measures the
wrong activations.

While a MoNE modifier is alive (initialize to finalize, which spans every
pipeline of the oneshot run) the tracer embeds the live config object
instead, which keeps every private setting.
"""

from typing import Any, Callable

from llmcompressor.pipelines.sequential.helpers import SequentialTracer
from loguru import logger
from transformers import PretrainedConfig

__all__ = ["install", "uninstall"]

_original_create_arg: Callable | None = None


def _live_config(config: PretrainedConfig) -> Callable[[], PretrainedConfig]:
    def model_config() -> PretrainedConfig:
        return config

    return model_config


def _create_arg(self: SequentialTracer, value: Any):
    if isinstance(value, PretrainedConfig):
        return self.create_node("call_function", _live_config(value), (), {})
    return _original_create_arg(self, value)


def install():
    """Patch the tracer (idempotent) and tell the user why."""
    global _original_create_arg
    if _original_create_arg is not None:
        return
    _original_create_arg = SequentialTracer.__dict__["create_arg"]
    SequentialTracer.create_arg = _create_arg
    logger.info(
        "MoNE: the sequential pipeline will trace the model's live config. "
        "llm-compressor 0.14 rebuilds it from to_dict(), which loses the "
        "attention implementation, so models such as Qwen3-MoE and Mixtral "
        "would calibrate without their causal mask (this affects every "
        "modifier of the run, GPTQ included)."
    )


def uninstall():
    """Restore llm-compressor's tracer."""
    global _original_create_arg
    if _original_create_arg is None:
        return
    SequentialTracer.create_arg = _original_create_arg
    _original_create_arg = None
