"""
Reading compressed-tensors checkpoints (W4A16 ``pack-quantized``, FP8
``float-quantized``, ...) into dense tensors, with compressed-tensors' own
per-module decompressors, so the loader can rebuild experts from them.

A module counts as quantized by the config's own terms: a config group
targets it, ``ignore`` does not name it, and the checkpoint holds every
tensor the group's format writes for it (``compression_param_names``). A
model's own parameter whose name merely looks like a quantization parameter
(Zaya's ``input_hidden_states_scale``) is therefore left alone.
"""

from collections.abc import Iterable, Iterator

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationMetadata,
    QuantizationScheme,
)
from compressed_tensors.utils.match import match_quantizable_tensors
from loguru import logger

__all__ = ["dequantize_tensors"]

# side tensors of a quantized module besides its format's own: activation
# qparams (the serving engine's business) and GPTQ's activation-order index
_SIDE_TENSORS = (*QuantizationMetadata.all_qparam_names(), "weight_g_idx")


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
    count = 0
    for scheme in _by_specificity(config.config_groups.values()):
        compressor = BaseCompressor.get_value_from_registry(
            scheme.format or config.format
        )
        names = compressor.compression_param_names(scheme)
        for module in _quantized_modules(tensors, config.ignore or [], scheme, names):
            qparams = {
                name: tensors.pop(f"{module}.{name}")
                for name in (*names, *_SIDE_TENSORS)
                if f"{module}.{name}" in tensors
            }
            dense = compressor.decompress(qparams, scheme)
            tensors[f"{module}.weight"] = dense["weight"]
            count += 1
    logger.info(
        f"MoNE: dequantized {count} {config.format} modules to dense "
        f"weights (quantized execution is the serving engine's job)"
    )
    return tensors


def _by_specificity(
    groups: Iterable[QuantizationScheme],
) -> list[QuantizationScheme]:
    """Groups naming modules (``re:`` targets) before groups targeting a
    layer class (``Linear``), which match every module by name alone: a
    module takes the scheme of the group that names it."""
    return sorted(
        groups,
        key=lambda group: any(not t.startswith("re:") for t in group.targets),
    )


def _quantized_modules(
    tensors: dict[str, torch.Tensor],
    ignore: list[str],
    scheme: QuantizationScheme,
    names: tuple[str, ...],
) -> Iterator[str]:
    """Modules the group quantized: targeted, not ignored, and holding every
    tensor its format writes (e.g. FP8's ``weight`` is also an unquantized
    module's name, its ``weight_scale`` is not)."""
    matches = match_quantizable_tensors(
        tensors, ignore=ignore, targets=scheme.targets, param_targets=[names[0]]
    )
    # a list first: the caller pops the tensors this iterates over
    for module in [module for module, _ in matches]:
        if all(f"{module}.{name}" in tensors for name in names):
            yield module
