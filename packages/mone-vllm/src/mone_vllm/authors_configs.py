"""
Config classes for the MoNE authors' checkpoints (``olmoe_compressed``,
...), registered with transformers' ``AutoConfig`` so that vLLM can read
their ``config.json``. Each is the stock family's config read through
``mone_format.stock_config`` (which refuses the variants the stock model
cannot hold, and names the family's stock architecture), renamed to the
plugin's MoNE architecture: the stock model would serve the missing experts
as uninitialised memory.
"""

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mone_format import AUTHORS_MODEL_TYPES, mone_architecture, stock_config

__all__ = ["register_authors_configs"]


def register_authors_configs():
    for authors_type, stock_type in AUTHORS_MODEL_TYPES.items():
        config_cls = _authors_config_class(authors_type, CONFIG_MAPPING[stock_type])
        AutoConfig.register(authors_type, config_cls, exist_ok=True)


def _authors_config_class(
    authors_type: str, stock_cls: type[PretrainedConfig]
) -> type[PretrainedConfig]:
    def __init__(self, **fields):
        stock = stock_config({**fields, "model_type": authors_type})
        del stock["model_type"]
        stock_cls.__init__(self, **stock)
        self.architectures = [mone_architecture(a) for a in self.architectures]
        # vLLM reads the family off the instance (DeepSeek's MLA, for one);
        # the class keeps the authors' type, which AutoConfig is keyed by
        self.model_type = stock_cls.model_type

    return type(
        f"MoNE{stock_cls.__name__}",
        (stock_cls,),
        {"model_type": authors_type, "__init__": __init__},
    )
