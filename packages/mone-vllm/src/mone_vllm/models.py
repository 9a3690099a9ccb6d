"""
The ``MoNE<Family>ForCausalLM`` models: vLLM's own model of each family,
built with novice MoE layers where the checkpoint has novices, and loading
its weights through the family's own loader after the novices are taken out
and retained experts are renamed to their compact rows.
"""

import re
import sys
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from vllm.model_executor.models.deepseek_v2 import (
    DeepseekV2ForCausalLM,
    DeepseekV3ForCausalLM,
)
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from mone_format import (
    NOVICE_TENSOR,
    LayerNovices,
    expert_count,
    layer_index,
    mone_architecture,
    read_novices,
)
from mone_vllm.novice_moe import NoviceMoERunner, novice_moe_factory

EXPERT_TENSOR = re.compile(r"(?P<experts>.+\.experts)\.(?P<id>\d+)\.(?P<tensor>.+)")
GPT_OSS_EXPERT_TENSORS = {
    f"{projection}.{kind}"
    for projection in ("gate_proj", "up_proj", "down_proj")
    for kind in ("weight", "bias")
}


@contextmanager
def _novice_layers(family_module, novices: dict[int, LayerNovices]):
    """While the model is built, its family module's ``FusedMoEFactory``
    builds novice layers."""
    stock = family_module.FusedMoEFactory
    family_module.FusedMoEFactory = novice_moe_factory(
        stock, {layer: sorted(stored.novices) for layer, stored in novices.items()}
    )
    try:
        yield
    finally:
        family_module.FusedMoEFactory = stock


class _NoviceWeights:
    """
    Takes a checkpoint's novice tensors out of its weight stream into the
    novice layers, renames retained experts from logical ids to compact rows
    (``approximate_experts`` layout) and checks that every novice and every
    retained expert of a pruned layer was in the checkpoint.
    """

    def __init__(self, novices: dict[int, LayerNovices], num_experts: int):
        self.novices = novices
        self.rows = {
            layer: {
                expert: row
                for row, expert in enumerate(
                    i for i in range(num_experts) if i not in stored.novices
                )
            }
            for layer, stored in novices.items()
        }
        self.named = {
            name: (layer, expert)
            for layer, stored in novices.items()
            for expert, name in stored.novices.items()
            if name is not None
        }
        self.loaded_novices: set[tuple[int, int]] = set()
        self.loaded_rows: set[tuple[int, int]] = set()

    def route(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        runners: dict[int, NoviceMoERunner],
    ) -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name in self.named:
                self._load_novice(runners, *self.named[name], tensor)
                continue
            match = EXPERT_TENSOR.fullmatch(name)
            layer = layer_index(match["experts"]) if match else None
            if layer not in self.novices:
                yield name, tensor
                continue
            expert = int(match["id"])
            if self.novices[layer].compact:
                self.loaded_rows.add((layer, expert))
                yield name, tensor
            elif match["tensor"] == NOVICE_TENSOR:
                self._load_novice(runners, layer, expert, tensor)
            elif expert in self.rows[layer]:
                row = self.rows[layer][expert]
                self.loaded_rows.add((layer, row))
                yield f"{match['experts']}.{row}.{match['tensor']}", tensor
            else:
                raise ValueError(
                    f"checkpoint tensor {name}: expert {expert} of layer {layer} "
                    f"is a novice, which has only its {NOVICE_TENSOR}"
                )

    def _load_novice(self, runners, layer: int, expert: int, tensor: torch.Tensor):
        if expert not in self.novices[layer].novices:
            raise ValueError(
                f"layer {layer}: the checkpoint has a novice vector for expert "
                f"{expert}, which its config does not name as a novice"
            )
        values = runners[layer].novice_values
        if tensor.shape != (values.shape[1],):
            raise ValueError(
                f"layer {layer}: novice {expert} has shape {tuple(tensor.shape)}, "
                f"expected ({values.shape[1]},)"
            )
        values.data[expert].copy_(tensor)
        self.loaded_novices.add((layer, expert))

    def check_complete(self):
        missing_novices = {
            (layer, expert)
            for layer, stored in self.novices.items()
            for expert in stored.novices
        } - self.loaded_novices
        missing_rows = {
            (layer, row) for layer, rows in self.rows.items() for row in rows.values()
        } - self.loaded_rows
        if missing_novices or missing_rows:
            raise ValueError(
                f"the checkpoint lacks novice vectors (layer, expert) "
                f"{sorted(missing_novices)[:5]} or retained expert weights "
                f"(layer, row) {sorted(missing_rows)[:5]}"
            )


def _gpt_oss_streamed_experts(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterable[tuple[str, torch.Tensor]]:
    """
    Per-expert Linear tensors (``experts.<id>.gate_proj.weight`` ...) as the
    per-expert ``w13`` / ``w2`` tensors vLLM's GPT-OSS loader reads (its
    loader skips the Linear names without a word): gate and up columns
    interleaved, weights stored ``[in, out]``.
    """
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        match = EXPERT_TENSOR.fullmatch(name)
        if match is None or match["tensor"] not in GPT_OSS_EXPERT_TENSORS:
            yield name, tensor
            continue
        expert = f"{match['experts']}.{match['id']}"
        parts = pending.setdefault(expert, {})
        parts[match["tensor"]] = tensor
        for kind in ("weight", "bias"):
            gate, up = parts.get(f"gate_proj.{kind}"), parts.get(f"up_proj.{kind}")
            if gate is not None and up is not None:
                # weights [out, in] -> [in, out]; biases stay as they are
                gate, up = (gate.mT, up.mT) if kind == "weight" else (gate, up)
                interleaved = torch.stack([gate, up], dim=-1).flatten(-2)
                yield f"{expert}.w13_{kind}", interleaved
                del parts[f"gate_proj.{kind}"], parts[f"up_proj.{kind}"]
        if "down_proj.weight" in parts:
            yield f"{expert}.w2_weight", parts.pop("down_proj.weight").T
        if "down_proj.bias" in parts:
            yield f"{expert}.w2_bias", parts.pop("down_proj.bias")
    incomplete = [expert for expert, parts in pending.items() if parts]
    if incomplete:
        raise ValueError(
            f"experts {incomplete[:3]} lack a gate or up projection in the checkpoint"
        )


def mone_model(stock_cls: type, weight_stage=None) -> type:
    """
    ``MoNE<stock_cls>``: ``stock_cls`` with novice layers where the
    checkpoint's config names novices.

    :param weight_stage: renames the (compact) checkpoint tensors into what
        the family's loader reads, where it does not read per-expert Linears
    """
    family_module = sys.modules[stock_cls.__module__]

    class MoNEModel(stock_cls):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            config = vllm_config.model_config.hf_config
            novices = read_novices(config, expert_count(config))
            with _novice_layers(family_module, novices):
                super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self._novice_weights = _NoviceWeights(novices, expert_count(config))
            unbuilt = set(novices) - set(self._novice_runners())
            if unbuilt:
                # the family module no longer builds its MoE layers through
                # its module-level FusedMoEFactory
                raise RuntimeError(
                    f"vLLM built layers {sorted(unbuilt)} of {type(self).__name__} "
                    f"without their novices: this vLLM version builds MoE layers "
                    f"in a way mone-vllm does not know (it was tested with 0.32)"
                )

        def _novice_runners(self) -> dict[int, NoviceMoERunner]:
            return {
                layer_index(name): module
                for name, module in self.named_modules()
                if isinstance(module, NoviceMoERunner)
            }

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            weights = self._novice_weights.route(weights, self._novice_runners())
            if weight_stage is not None:
                weights = weight_stage(weights)
            loaded = set(super().load_weights(weights))
            self._novice_weights.check_complete()
            return loaded | {
                f"{name}.novice_values"
                for name, module in self.named_modules()
                if isinstance(module, NoviceMoERunner)
            }

    MoNEModel.__name__ = MoNEModel.__qualname__ = mone_architecture(stock_cls.__name__)
    return MoNEModel


MoNEOlmoeForCausalLM = mone_model(OlmoeForCausalLM)
MoNEQwen3MoeForCausalLM = mone_model(Qwen3MoeForCausalLM)
MoNEQwen2MoeForCausalLM = mone_model(Qwen2MoeForCausalLM)
MoNEMixtralForCausalLM = mone_model(MixtralForCausalLM)
MoNEDeepseekV2ForCausalLM = mone_model(DeepseekV2ForCausalLM)
MoNEDeepseekV3ForCausalLM = mone_model(DeepseekV3ForCausalLM)
MoNEGptOssForCausalLM = mone_model(GptOssForCausalLM, _gpt_oss_streamed_experts)
