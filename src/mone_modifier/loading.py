"""
Loading MoNE checkpoints as transformers models.

The model is built with its parameters on the meta device, so a pruned
expert's weights are never allocated. Each MoE layer's experts become the
architecture's own fused experts module holding only the retained experts,
packed from the checkpoint's per-expert tensors; a layer with novices wraps
it in ``NoviceMoEExperts``, which adds the novices with one gather.
"""

import re
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import init_empty_weights
from llmcompressor.modeling.moe.linearize import get_non_linearized_moes
from loguru import logger
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from mone_modifier.dequantize import dequantize_tensors
from mone_modifier.expert_packing import EXPERT_COUNT_KEYS, pack_experts
from mone_modifier.metadata import NOVICES_CONFIG_KEY

__all__ = ["NoviceMoEExperts", "from_pretrained"]

NOVICE_TENSOR = "approx_value"
IGNORED_CONFIG_KEYS = ("approximate_expert_init_tokens",)


class NoviceMoEExperts(torch.nn.Module):
    """
    The experts of a pruned MoE layer, called like the architecture's experts
    module: ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.

    Routes to retained experts go to ``retained``, the fused experts module of
    the retained experts, under their compact ids; routes to novices reach it
    with weight zero and add ``g * novice`` through one gather instead.

    :param retained: fused experts module holding the retained experts
    :param retained_ids: logical ids of its experts, in order
    :param novices: logical id -> ``[hidden_size]`` novice vector
    :param num_experts: the router's width, E
    """

    def __init__(
        self,
        retained: torch.nn.Module,
        retained_ids: list[int],
        novices: dict[int, torch.Tensor],
        num_experts: int,
    ):
        super().__init__()
        self.retained = retained
        compact = torch.zeros(num_experts, dtype=torch.long)
        compact[retained_ids] = torch.arange(len(retained_ids))
        is_retained = torch.zeros(num_experts, dtype=torch.bool)
        is_retained[retained_ids] = True
        value = next(iter(novices.values()))
        table = torch.zeros(num_experts, value.shape[0], dtype=value.dtype)
        for expert, vector in novices.items():
            table[expert] = vector
        self.register_buffer("compact_id", compact, persistent=False)
        self.register_buffer("is_retained", is_retained, persistent=False)
        self.register_buffer("novice_table", table, persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        retained = self.is_retained[top_k_index]
        output = self.retained(
            hidden_states,
            self.compact_id[top_k_index],
            torch.where(retained, top_k_weights, 0),
        )
        novices = self.novice_table[top_k_index].to(top_k_weights.dtype)
        return output + torch.einsum("tk,tkh->th", top_k_weights, novices).to(
            output.dtype
        )


def from_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, **kwargs
) -> PreTrainedModel:
    """
    Load a MoNE checkpoint (``approximate_experts`` layout: the paper authors'
    and this package's) as a transformers causal LM with novices; a
    checkpoint without novices loads through plain transformers. Quantized
    (compressed-tensors) checkpoints are dequantized to dense weights.

    :param path: checkpoint directory
    :param dtype: dtype to cast the loaded weights to (default: as stored)
    :param kwargs: passed to the model constructor (e.g. ``attn_implementation``)
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config()
    novices = read_novices(text_config)
    if not novices:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)

    tensors = _checkpoint_tensors(path, config.model_type)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        tensors = dequantize_tensors(tensors, quantization)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    for name, experts in get_non_linearized_moes(model):
        layer = int(re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)[-1])
        per_expert = _pop_expert_tensors(tensors, name)
        model.set_submodule(
            name,
            _load_layer(
                type(experts), text_config, layer, per_expert, novices.get(layer, [])
            ),
        )
    unexpected = model.load_state_dict(
        tensors, strict=False, assign=True
    ).unexpected_keys
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {path} does not match its model: tensors without a "
            f"parameter {unexpected[:5]}, parameters without a tensor {missing[:5]}"
        )
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def read_novices(config) -> dict[int, list[int]]:
    """Novice ids by decoder layer from a config, validated against E."""
    for key in IGNORED_CONFIG_KEYS:
        if getattr(config, key, None) is not None:
            logger.info(
                f"MoNE: ignoring {key} (used by an optional update at inference)"
            )
    raw = getattr(config, NOVICES_CONFIG_KEY, None) or {}
    num_experts = _num_experts(config)
    novices = {}
    for layer, ids in raw.items():
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < num_experts]
        if bad or len(set(ids)) != len(ids) or len(ids) >= num_experts:
            raise ValueError(
                f"{NOVICES_CONFIG_KEY}[{layer!r}] = {ids} is not a set of distinct "
                f"expert ids in [0, {num_experts}) that leaves at least one expert"
            )
        novices[int(layer)] = sorted(ids)
    return novices


def _num_experts(config) -> int:
    return next(
        getattr(config, key)
        for key in EXPERT_COUNT_KEYS
        if isinstance(getattr(config, key, None), int)
    )


def _checkpoint_tensors(path: Path, model_type: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, under the model's parameter names."""
    renames = [
        rule
        for rule in get_checkpoint_conversion_mapping(model_type) or []
        if isinstance(rule, WeightRenaming)
    ]
    tensors = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                name = key
                for rule in renames:
                    name, _ = rule.rename_source_key(name)
                tensors[name] = f.get_tensor(key)
    return tensors


def _pop_expert_tensors(
    tensors: dict[str, torch.Tensor], experts_name: str
) -> dict[int, dict[str, torch.Tensor]]:
    """Take ``<experts_name>.<id>.<tensor>`` entries out of ``tensors``."""
    pattern = re.compile(rf"{re.escape(experts_name)}\.(\d+)\.(.+)")
    per_expert: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in [k for k in tensors if pattern.fullmatch(k)]:
        expert, tensor = pattern.fullmatch(key).groups()
        per_expert[int(expert)][tensor] = tensors.pop(key)
    return per_expert


def _load_layer(
    fused_cls: type[torch.nn.Module],
    config,
    layer: int,
    per_expert: dict[int, dict[str, torch.Tensor]],
    novice_ids: list[int],
) -> torch.nn.Module:
    num_experts = _num_experts(config)
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
    return NoviceMoEExperts(retained, retained_ids, novices, num_experts)
