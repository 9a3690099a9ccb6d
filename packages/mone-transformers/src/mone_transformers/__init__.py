"""
Loading MoNE checkpoints as transformers models: pruned experts are never
allocated, routes to novices cost a vector. Needs transformers, not
llm-compressor, so it runs in serving environments whose transformers is
newer than llm-compressor allows.
"""

from mone_transformers.loading import from_pretrained

__all__ = ["from_pretrained"]
