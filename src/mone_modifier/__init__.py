"""
MoNE expert pruning for llm-compressor.

Importing this package registers ``MoNEPruningModifier`` with llm-compressor's
``ModifierFactory``, so YAML recipes can name it.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from mone_modifier.base import MoNEPruningModifier
from mone_modifier.loading import from_pretrained

__all__ = ["MoNEPruningModifier", "from_pretrained"]

ModifierFactory.register("MoNEPruningModifier", MoNEPruningModifier)
