"""
The ``architectures`` names of MoNE checkpoints.

A checkpoint with novices names ``MoNE<stock architecture>`` (for example
``MoNEOlmoeForCausalLM``) in its ``config.json``. Only the mone-vllm plugin
registers those names, so a stock vLLM refuses the checkpoint ("not
supported") instead of serving it with uninitialised experts. transformers
picks its class from ``model_type`` and is unaffected.
"""

__all__ = ["mone_architecture", "stock_architecture"]

PREFIX = "MoNE"


def mone_architecture(stock: str) -> str:
    """``OlmoeForCausalLM`` -> ``MoNEOlmoeForCausalLM`` (unchanged if it is
    a MoNE name already)."""
    return stock if stock.startswith(PREFIX) else PREFIX + stock


def stock_architecture(name: str) -> str:
    """``MoNEOlmoeForCausalLM`` -> ``OlmoeForCausalLM`` (unchanged if it is
    not a MoNE name)."""
    return name.removeprefix(PREFIX)
