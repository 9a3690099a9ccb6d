"""
MoNE expert pruning for llm-compressor.

Importing this package registers ``MoNEPruningModifier`` with llm-compressor's
``ModifierFactory``, so YAML recipes can name it.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from mone_modifier.base import MoNEPruningModifier

__all__ = ["MoNEPruningModifier"]

ModifierFactory.register("MoNEPruningModifier", MoNEPruningModifier)
