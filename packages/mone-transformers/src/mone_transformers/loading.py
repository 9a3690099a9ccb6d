"""
Loading MoNE checkpoints as transformers models.

The model is built with its parameters on the meta device, so a pruned
expert's weights are never allocated. Each MoE layer's experts become the
architecture's own fused experts module holding only the retained experts,
packed from the checkpoint's per-expert tensors; a layer with novices wraps
it in ``NoviceMoEExperts`` (``pruned_experts.py``).
Every other tensor goes through transformers' own loading path (its renames
and converters for the architecture), so the model loads as transformers
would load it.
"""

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig

from mone_format import (
    NOVICE_TENSOR,
    LayerNovices,
    expert_count,
    layer_index,
    read_novices,
    stock_config,
)
from mone_transformers.dequantize import dequantize_tensors
from mone_transformers.expert_packing import is_fused_experts, pack_experts
from mone_transformers.pruned_experts import NoviceMoEExperts

__all__ = ["config_dtype", "from_pretrained", "model_class", "model_names"]


def from_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, **kwargs
) -> PreTrainedModel:
    """
    Load a MoNE checkpoint (``approximate_experts`` layout, the paper authors'
    and this package's, or ``expert_substitution``) as a transformers causal
    LM with novices; a checkpoint without novices loads through plain
    transformers. Quantized (compressed-tensors) checkpoints are dequantized
    to dense weights.

    :param path: checkpoint directory
    :param dtype: dtype to cast the loaded weights to (default: as stored)
    :param kwargs: passed to the model constructor (e.g. ``attn_implementation``)
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"from_pretrained: {path} is not a checkpoint directory (no "
            f"config.json); pass the directory a pruned model was saved to"
        )
    config = _read_config(path)
    auto_class = model_class(config)
    text_config = config.get_text_config()
    novices = read_novices(config, expert_count(text_config))
    if not novices:
        return auto_class.from_pretrained(path, config=config, dtype=dtype, **kwargs)

    tensors = _checkpoint_tensors(path)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        tensors = dequantize_tensors(tensors, quantization)
    # transformers' loading path casts every tensor to its parameter's dtype:
    # build in the requested one, else the checkpoint's (its "auto")
    build_dtype = dtype or config_dtype(text_config)
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=build_dtype, **kwargs)
    text_config = model.config.get_text_config()
    weight_mapping = get_model_conversion_mapping(model)
    names = model_names(model, weight_mapping, tensors)
    moe_layers = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    _check_novice_layers(novices, [layer_index(name) for name, _ in moe_layers], path)
    for name, experts in moe_layers:
        layer = layer_index(name)
        stored = novices.get(layer, LayerNovices({}))
        per_expert = _logical_experts(tensors, names, name, stored, experts.num_experts)
        model.set_submodule(
            name, _load_layer(type(experts), text_config, layer, per_expert, stored)
        )
    info = _load_the_rest(model, tensors, weight_mapping, build_dtype)
    model.tie_weights()  # a tied lm_head is not in the checkpoint
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    unexpected = sorted(info.unexpected_keys)
    mismatched = sorted(info.mismatched_keys)
    if unexpected or missing or mismatched:
        raise ValueError(
            f"checkpoint {path} does not match its model: tensors without a "
            f"parameter {unexpected[:5]}, parameters without a tensor "
            f"{missing[:5]}, tensors of another shape {mismatched[:5]}"
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _read_config(path: Path) -> PretrainedConfig:
    """The checkpoint's config; the MoNE authors' own model types
    (``olmoe_compressed``, ...) as their stock family's."""
    content = json.loads((path / "config.json").read_text())
    stock = stock_config(content)
    if stock is content:
        return AutoConfig.from_pretrained(path)
    return AutoConfig.for_model(**stock)


def model_class(config: PretrainedConfig) -> type:
    """The auto class that builds ``config``'s model with a language-model
    head: causal LM, else image-text-to-text (vision-language MoE models such
    as Qwen3-VL-MoE have no causal-LM class)."""
    for auto_class in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto_class._model_mapping:
            return auto_class
    raise ValueError(
        f"no causal-LM or image-text-to-text model for config "
        f"{type(config).__name__} (model_type {config.model_type!r})"
    )


def config_dtype(config: PretrainedConfig) -> torch.dtype:
    value = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, value) if isinstance(value, str) else value


def _check_novice_layers(novices: dict, moe_layers: list[int], path: Path):
    if stray := sorted(set(novices) - set(moe_layers)):
        raise ValueError(
            f"checkpoint {path}: its config names novices for layers {stray}, "
            f"which are not MoE layers of this model (MoE layers: {moe_layers}); "
            f"the novice metadata belongs to another model"
        )


def model_names(
    model: PreTrainedModel, weight_mapping: list, checkpoint_names: Iterable[str]
) -> dict[str, str]:
    """Checkpoint name -> model name, by transformers' own load-time renames
    (scoped per sub-model, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``),
    without its converters: those merge per-expert tensors into fused ones
    and so lose the expert id the novices are found by."""
    renamings = [t for t in weight_mapping if isinstance(t, WeightRenaming)]
    meta_state_dict = model.state_dict()
    return {
        key: rename_source_key(
            key, renamings, [], model.base_model_prefix, meta_state_dict
        )[0]
        for key in checkpoint_names
    }


def _load_the_rest(
    model: PreTrainedModel,
    tensors: dict[str, torch.Tensor],
    weight_mapping: list,
    dtype: torch.dtype,
):
    """Load every tensor but the experts through transformers' loading path
    (renames, converters such as Kimi-Linear's concatenated convolutions,
    base-model prefixes); it records the conversions, so the model saves
    back to the checkpoint format."""
    config = LoadStateDictConfig(
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=weight_mapping,
    )
    info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
    return info


def _pop_named(
    tensors: dict[str, torch.Tensor], names: dict[str, str], name: str
) -> torch.Tensor:
    """The tensor the config names, by its checkpoint name or, as written
    by a loaded model, by its model name."""
    if name not in tensors:
        name = next((k for k in tensors if names[k] == name), name)
    if name not in tensors:
        raise ValueError(f"the checkpoint has no tensor {name!r} named by its config")
    return tensors.pop(name)


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, under its checkpoint name."""
    tensors = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _logical_experts(
    tensors: dict[str, torch.Tensor],
    names: dict[str, str],
    experts_name: str,
    stored: LayerNovices,
    num_experts: int,
) -> dict[int, dict[str, torch.Tensor]]:
    """Take one layer's expert tensors out of ``tensors``, keyed by logical
    expert id: ``<experts_name>.<id>.<tensor>`` under its model name, with
    compact ids mapped back and novices named in the config added as
    ``approx_value``."""
    pattern = re.compile(rf"{re.escape(experts_name)}\.(\d+)\.(.+)")
    per_expert: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in [k for k in tensors if pattern.fullmatch(names[k])]:
        expert, tensor = pattern.fullmatch(names[key]).groups()
        per_expert[int(expert)][tensor] = tensors.pop(key)
    if stored.compact:
        retained = [i for i in range(num_experts) if i not in stored.novices]
        compact = dict(per_expert)
        per_expert = {new: compact.pop(old, {}) for old, new in enumerate(retained)}
        if compact:
            raise ValueError(
                f"{experts_name}: compact expert ids {sorted(compact)} exceed the "
                f"{len(retained)} retained experts"
            )
    for expert, tensor_name in stored.novices.items():
        if tensor_name is not None:
            per_expert[expert] = {
                NOVICE_TENSOR: _pop_named(tensors, names, tensor_name)
            }
    return dict(per_expert)


def _load_layer(
    fused_cls: type[torch.nn.Module],
    config,
    layer: int,
    per_expert: dict[int, dict[str, torch.Tensor]],
    stored: LayerNovices,
) -> torch.nn.Module:
    num_experts = expert_count(config)
    novice_ids = sorted(stored.novices)
    retained_ids = [i for i in range(num_experts) if i not in set(novice_ids)]
    hidden_size = config.hidden_size
    for expert in set(per_expert) - set(range(num_experts)):
        raise ValueError(
            f"layer {layer}: the checkpoint has tensors of expert {expert}, but "
            f"the router has {num_experts} experts (ids 0 to {num_experts - 1})"
        )
    novices = {}
    for expert in novice_ids:
        found = per_expert.get(expert, {})
        if set(found) != {NOVICE_TENSOR}:
            raise ValueError(
                f"layer {layer}: novice {expert} must have exactly one tensor "
                f"'{NOVICE_TENSOR}', found {sorted(found) or 'none'}"
            )
        if found[NOVICE_TENSOR].shape != (hidden_size,):
            raise ValueError(
                f"layer {layer}: novice {expert} has shape "
                f"{tuple(found[NOVICE_TENSOR].shape)}, expected ({hidden_size},)"
            )
        novices[expert] = found[NOVICE_TENSOR]
    for expert in retained_ids:
        found = per_expert.get(expert, {})
        if "down_proj.weight" not in found or NOVICE_TENSOR in found:
            raise ValueError(
                f"layer {layer}: retained expert {expert} needs its weights and no "
                f"'{NOVICE_TENSOR}', found {sorted(found) or 'none'}"
            )
    retained = pack_experts(fused_cls, config, [per_expert[i] for i in retained_ids])
    if not novices:
        return retained
    return NoviceMoEExperts(retained, retained_ids, novices, config)
