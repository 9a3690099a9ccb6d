"""
A vLLM MoE layer with novices.

vLLM builds every MoE layer with ``FusedMoEFactory``. For a layer with
novices, ``novice_moe_factory`` builds it for the R retained experts only,
with two changes that every non-monolithic backend honours:

- ``NoviceRouter`` routes with the stock router of all E logical experts
  (softmax or sigmoid, groups, correction bias, scaling: vLLM's own code),
  then hands the kernel compact rows of the retained experts; a route to a
  novice goes to row 0 with weight zero, as vLLM's ``ZeroExpertRouter`` does
  for its zero experts.
- ``NoviceMoERunner`` adds ``sum_k g_k * novice[id_k]`` (one gather) to the
  routed output inside the same MoE op, before the tensor-parallel
  reduction, on TP rank 0 only, so the reduction counts it once.

Layouts a MoNE layer cannot honour (expert parallelism, EPLB, fused shared
experts, kernels that route internally, ...) are refused when the layer is
built.
"""

import inspect
from collections.abc import Callable

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.fused_moe_router import (
    FusedMoERouter,
)
from vllm.model_executor.layers.fused_moe.router.router_factory import (
    create_fused_moe_router,
)
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

from mone_format import layer_index

__all__ = ["NoviceMoERunner", "NoviceRouter", "novice_moe_factory"]

# FusedMoEFactory arguments a MoNE layer cannot take, with the value that
# means "not used"
UNSUPPORTED_ARGUMENTS = {
    "enable_eplb": False,
    "num_redundant_experts": 0,
    "fuse_shared_experts": False,
    "zero_expert_type": None,
    "hash_indices_table": None,
    "router": None,
    "routed_input_transform": None,
    "routed_output_transform": None,
    "runner_cls": None,
}


class NoviceRouter(FusedMoERouter):
    """
    Routes over all E logical experts with ``routing`` and returns routes to
    the compact rows of the retained experts; novice routes get row 0 and
    weight zero. The logical routes of the last call stay in
    ``logical_routes`` for the runner's novice term.

    :param routing: vLLM's router for the E logical experts
    :param retained_ids: logical ids of the retained experts, in row order
    """

    def __init__(self, routing: FusedMoERouter, retained_ids: list[int]):
        super().__init__(eplb_state=None)
        self.routing = routing
        num_experts = routing.global_num_experts
        self.is_retained = torch.zeros(num_experts, dtype=torch.bool)
        self.is_retained[retained_ids] = True
        self.compact_id = torch.zeros(num_experts, dtype=torch.int64)
        self.compact_id[retained_ids] = torch.arange(len(retained_ids))
        self.logical_routes: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def routing_method_type(self) -> RoutingMethodType:
        # kernels that route by themselves would bypass the novices
        return RoutingMethodType.Unspecified

    def set_capture_fn(self, capture_fn: Callable[[torch.Tensor], None] | None):
        self.routing.set_capture_fn(capture_fn)

    def _select_experts(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        topk_indices_dtype: torch.dtype | None = None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.routing.select_experts(
            hidden_states, router_logits, input_ids=input_ids
        )
        self.logical_routes = (weights, ids)
        retained = self.is_retained[ids]
        rows = torch.where(retained, self.compact_id[ids], 0)
        return torch.where(retained, weights, 0.0), rows.to(ids.dtype)


class NoviceMoERunner(MoERunner):
    """
    vLLM's MoE runner plus the novice term. ``novice_values`` holds one row
    per logical expert (zeros for retained ones), loaded from the
    checkpoint's novice tensors.
    """

    def __init__(self, *, num_logical_experts: int, **kwargs):
        super().__init__(**kwargs)
        if self.routed_experts.quant_method.is_monolithic:
            raise NotImplementedError(
                f"{self.layer_name}: the MoE kernel vLLM chose "
                f"({type(self.routed_experts.quant_method).__name__}) routes "
                f"tokens by itself, so MoNE novices cannot be served with it; "
                f"choose another MoE backend (--moe-backend)"
            )
        self.novice_values = torch.nn.Parameter(
            torch.zeros(
                num_logical_experts,
                self.moe_config.hidden_dim,
                dtype=self.moe_config.in_dtype,
            ),
            requires_grad=False,
        )
        self._adds_novices = self.moe_config.moe_parallel_config.tp_rank == 0

    def _apply_quant_method(self, *args, **kwargs):
        shared_output, fused_output = super()._apply_quant_method(*args, **kwargs)
        if not isinstance(fused_output, torch.Tensor):
            raise NotImplementedError(
                f"{self.layer_name}: the MoE kernel defers its output "
                f"({type(fused_output).__name__}); MoNE novices need it whole"
            )
        weights, ids = self.router.logical_routes
        self.router.logical_routes = None
        if self._adds_novices:
            novices = self.novice_values[ids]
            fused_output = fused_output + torch.einsum(
                "tk,tkh->th", weights.to(novices.dtype), novices
            ).to(fused_output.dtype)
        return shared_output, fused_output


def novice_moe_factory(stock_factory: Callable, novices: dict[int, list[int]]):
    """
    ``FusedMoEFactory`` for a model whose layers have novices: layers in
    ``novices`` (decoder layer index -> novice ids) get a ``NoviceMoERunner``
    over their retained experts; other layers are built as usual.
    """
    signature = inspect.signature(stock_factory)

    def build(**kwargs):
        arguments = signature.bind(**kwargs)
        arguments.apply_defaults()
        arguments = arguments.arguments
        prefix = arguments["prefix"]
        layer = layer_index(prefix)
        if layer not in novices:
            return stock_factory(**kwargs)
        _refuse_unsupported(prefix, arguments)
        num_experts = arguments["num_experts"]
        retained = [i for i in range(num_experts) if i not in set(novices[layer])]
        router = NoviceRouter(_logical_router(arguments), retained)
        return stock_factory(
            **{
                **kwargs,
                "num_experts": len(retained),
                "router": router,
                "runner_cls": NoviceMoERunner,
                "runner_args": {"num_logical_experts": num_experts},
            }
        )

    return build


def _logical_router(arguments: dict) -> FusedMoERouter:
    """The router ``FusedMoEFactory`` would build for all E experts."""
    scale_output = arguments["apply_routed_scale_to_output"]
    return create_fused_moe_router(
        top_k=arguments["top_k"],
        global_num_experts=arguments["num_experts"],
        renormalize=arguments["renormalize"],
        use_grouped_topk=arguments["use_grouped_topk"],
        num_expert_group=arguments["num_expert_group"],
        topk_group=arguments["topk_group"],
        custom_routing_function=arguments["custom_routing_function"],
        scoring_func=arguments["scoring_func"],
        # the runner applies the scale to the output instead, novices included
        routed_scaling_factor=1.0
        if scale_output
        else arguments["routed_scaling_factor"],
        e_score_correction_bias=arguments["e_score_correction_bias"],
    )


def _refuse_unsupported(prefix: str, arguments: dict):
    for name, unused in UNSUPPORTED_ARGUMENTS.items():
        if arguments[name] != unused:
            raise NotImplementedError(
                f"{prefix}: MoNE layers cannot be served with {name}="
                f"{arguments[name]!r}; serve this checkpoint without it"
            )
    parallel = get_current_vllm_config().parallel_config
    if parallel.enable_expert_parallel or parallel.data_parallel_size > 1:
        raise NotImplementedError(
            f"{prefix}: MoNE layers cannot be served with expert or data "
            f"parallelism (each rank would need every novice route); use "
            f"tensor parallelism (--tensor-parallel-size) instead"
        )
    if arguments["is_sequence_parallel"]:
        raise NotImplementedError(
            f"{prefix}: MoNE layers cannot be served with sequence-parallel MoE"
        )
