"""
The MoNE checkpoint format, without llm-compressor or any engine: which
experts of which layer are novices, where their constants are stored, and
which ``architectures`` names mark a MoNE checkpoint. Shared by
``mone_modifier`` (which writes and loads checkpoints) and ``mone_vllm``
(which serves them).
"""

from mone_format.architectures import mone_architecture, stock_architecture
from mone_format.authors import AUTHORS_MODEL_TYPES, stock_config
from mone_format.novices import (
    EXPERT_COUNT_KEYS,
    NOVICE_TENSOR,
    NOVICES_CONFIG_KEY,
    LayerNovices,
    expert_count,
    layer_index,
    read_novices,
    record_novices,
    recorded_novices,
)

__all__ = [
    "AUTHORS_MODEL_TYPES",
    "EXPERT_COUNT_KEYS",
    "NOVICE_TENSOR",
    "NOVICES_CONFIG_KEY",
    "LayerNovices",
    "expert_count",
    "layer_index",
    "mone_architecture",
    "read_novices",
    "record_novices",
    "recorded_novices",
    "stock_config",
    "stock_architecture",
]
