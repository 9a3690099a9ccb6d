"""
vLLM plugin serving MoNE checkpoints.

vLLM calls ``register`` in every process it starts (entry point group
``vllm.general_plugins``). It registers one ``MoNE<Family>ForCausalLM``
architecture per supported family, the names a MoNE checkpoint's
``config.json`` carries, by module path, so nothing of vLLM's model code is
imported until a model is built; and the config classes of the MoNE
authors' own model types (``authors_configs.py``).
"""

from mone_format import mone_architecture

__all__ = ["SUPPORTED_ARCHITECTURES", "register"]

SUPPORTED_ARCHITECTURES = (
    "OlmoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "GptOssForCausalLM",
)


def register():
    from vllm import ModelRegistry

    from mone_vllm.authors_configs import register_authors_configs

    for stock in SUPPORTED_ARCHITECTURES:
        name = mone_architecture(stock)
        ModelRegistry.register_model(name, f"mone_vllm.models:{name}")
    register_authors_configs()
