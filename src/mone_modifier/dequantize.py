"""
Reading compressed-tensors checkpoints (W4A16 ``pack-quantized``, FP8
``float-quantized``, ...) into dense tensors, with compressed-tensors' own
per-module decompressors, so the loader can rebuild experts from them.
"""

import re
from collections import defaultdict

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from loguru import logger

__all__ = ["dequantize_tensors"]

# tensors a quantized module stores besides (or instead of) its weight
_QPARAM = re.compile(r"(.+)\.((?:weight|input|output)_[a-z_]+)")


def dequantize_tensors(
    tensors: dict[str, torch.Tensor], quantization_config: dict
) -> dict[str, torch.Tensor]:
    """
    :param tensors: checkpoint tensors by name, modified in place
    :param quantization_config: the config's ``quantization_config``
    :return: ``tensors`` with every quantized module's tensors replaced by a
        dense ``<module>.weight``
    """
    config = QuantizationConfig.model_validate(quantization_config)
    compressor = BaseCompressor.get_value_from_registry(config.format)
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in list(tensors):
        if match := _QPARAM.fullmatch(key):
            module, name = match.groups()
            modules[module][name] = tensors.pop(key)
    for module, qparams in modules.items():
        if f"{module}.weight" in tensors:
            qparams["weight"] = tensors.pop(f"{module}.weight")
        dense = compressor.decompress(qparams, _scheme_for(module, config))
        tensors[f"{module}.weight"] = dense["weight"]
    logger.info(
        f"MoNE: dequantized {len(modules)} {config.format} modules to dense "
        f"weights (quantized execution is the serving engine's job)"
    )
    return tensors


def _scheme_for(module: str, config: QuantizationConfig) -> QuantizationScheme:
    """The config group whose ``re:`` target matches the module name, else
    the group targeting a layer class (only Linear layers carry qparams)."""
    groups = list(config.config_groups.values())
    for group in groups:
        if any(t.startswith("re:") and re.match(t[3:], module) for t in group.targets):
            return group
    for group in groups:
        if any(not t.startswith("re:") for t in group.targets):
            return group
    raise ValueError(f"no quantization config group matches {module}")
