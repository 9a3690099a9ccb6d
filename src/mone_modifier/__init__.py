"""
MoNE expert pruning for llm-compressor.

Importing this package registers ``MoNEPruningModifier`` with llm-compressor's
``ModifierFactory``, so YAML recipes can name it, and makes ``oneshot`` refuse
a MoNE checkpoint given by its path (transformers cannot load one), and
explain a failure of llm-compressor's expert linearisation.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from mone_modifier.base import MoNEPruningModifier
from mone_modifier.validation import (
    explain_linearisation_failures,
    refuse_pruned_checkpoints_in_oneshot,
)
from mone_transformers import from_pretrained

__all__ = ["MoNEPruningModifier", "from_pretrained"]

ModifierFactory.register("MoNEPruningModifier", MoNEPruningModifier)
refuse_pruned_checkpoints_in_oneshot()
explain_linearisation_failures()
