"""
MoNE (Mixture of Novices and Experts) expert pruning for MoE models.

See: https://arxiv.org/abs/2507.00390
"""

import difflib
from functools import partial
from typing import Any, Literal, Optional

import torch
from compressed_tensors.distributed import (
    get_source_rank,
    is_distributed,
    is_source_process,
)
from compressed_tensors.offload import get_execution_device
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import distributed as dist

from mone_format import record_novices
from mone_modifier import sequential_tracing
from mone_modifier.calibration import RoutedBatch
from mone_modifier.checkpoint import install_checkpoint_writer
from mone_modifier.expert_dropping import (
    check_droppable,
    drop_experts,
    set_expert_count,
)
from mone_modifier.moe_layers import MoELayer, MoEModel, find_moe_layers
from mone_modifier.novice import (
    NoviceKind,
    novice_values,
    replace_with_novices,
)
from mone_modifier.report import (
    LayerDecision,
    build_report,
    layer_decision,
    report_settings,
    write_report,
)
from mone_modifier.scoring import (
    PruningBudget,
    Scoring,
    check_rankable,
    expert_scores,
    plan_budget,
    select_novices,
)
from mone_modifier.stacking import forget_modules
from mone_modifier.statistics import LayerStatistics, reduce_across_ranks
from mone_modifier.statistics_file import (
    SavedStatistics,
    identity_config,
    load_statistics,
    save_statistics,
)
from mone_modifier.validation import (
    check_authors_family,
    check_calibration_tokens,
    check_family_supported,
    check_not_pruned,
    check_rank_data,
    check_recipe_order,
)

__all__ = ["MoNEPruningModifier"]


class MoNEPruningModifier(Modifier):
    """
    Replaces the most redundant routed experts of every MoE layer with
    *novices*: constant vectors equal to the expert's mean output, reached
    through the unchanged router. An expert's redundancy is

        ``score_i = freq_i * ||sqrt(var_i)||_2``

    with ``freq_i`` its mean routing weight over all calibration tokens and
    ``var_i`` the per-dimension variance of its output over the tokens routed
    to it. Statistics are exact float64 streaming statistics. With
    ``scope: layer`` each layer is decided at its sequential epoch end, so
    later layers calibrate on the pruned model and later modifiers see it.

    :param sparsity: fraction of routed experts per MoE layer to replace,
        ``round(sparsity * E)``, in (0, 1); at least top_k experts (and for
        group-limited routers enough per group) must remain
    :param scoring: ``mone`` (frequency x output std), or for ablations
        ``frequency``, ``variance``, ``reap`` (REAP saliency), ``random``
    :param scope: ``layer`` (each layer keeps ``E - P``) or ``model`` (one
        ranking over all layers, decided after calibration; each layer keeps
        at least top_k)
    :param novice: ``mean`` (the paper's), ``weighted_mean`` (``sum g^2 f /
        sum g^2``), ``zero`` (router kept, no output), or ``drop`` (remove the
        experts and shrink the router, as REAP does)
    :param ignore: regular expressions of MoE block names to leave alone
    :param report_path: optional ``.json`` path for the per-layer report; a
        heatmap ``.png`` is written next to it
    :param seed: seed of ``scoring: random``
    :param save_statistics_path: optional ``.safetensors`` path: every MoE
        layer's calibration statistics are written there (on the source rank,
        atomically), so that other sparsities, scorings and novice kinds can
        be decided without calibrating again. What they describe is recorded:
        ``unpruned`` when every layer was measured on the unpruned model
        (``pipeline="basic"``, or ``scope: model``), ``progressive`` when each
        layer was measured after the earlier ones were pruned (the default
        sequential run with ``scope: layer``)
    :param statistics_path: prune from saved statistics instead of
        calibrating (one path, or several from runs over disjoint
        calibration shards, merged exactly); the run then needs no dataset
        unless another modifier does. The statistics must describe this
        model (same config, MoE layers, expert count and hidden size)
    :param stock_architectures: a saved checkpoint with novices names its
        model's own ``architectures`` (``OlmoeForCausalLM``), for engines that
        read the novice layouts natively; by default it names
        ``MoNEOlmoeForCausalLM``, which only the mone-vllm plugin serves, so
        a stock vLLM refuses the checkpoint instead of serving its missing
        experts as uninitialised memory
    :param authors_layout: a saved checkpoint with novices is written as the
        MoNE authors' code (github zxgx/mode-pd) writes it, so their code
        loads it: ``model_type`` ``<family>_compressed``, zero
        ``approximate_expert_init_tokens``, the stock ``architectures``
        (OLMoE, DeepSeek-V2 and DeepSeek-V3, with novices)

    Example recipe::

        mone_stage:
          pruning_modifiers:
            MoNEPruningModifier:
              sparsity: 0.25
    """

    requires_calibration_data: bool = True

    sparsity: float
    scoring: Scoring = "mone"
    scope: Literal["layer", "model"] = "layer"
    novice: NoviceKind = "mean"
    ignore: list[str] = Field(default_factory=list)
    report_path: Optional[str] = None
    seed: int = 0
    stock_architectures: bool = False
    authors_layout: bool = False
    save_statistics_path: Optional[str] = None
    statistics_path: Optional[str | list[str]] = None

    _moe: MoEModel | None = PrivateAttr(default=None)
    _budget: PruningBudget | None = PrivateAttr(default=None)
    _stats: dict[str, LayerStatistics] = PrivateAttr(default_factory=dict)
    _batches: dict[str, RoutedBatch] = PrivateAttr(default_factory=dict)
    _layer_hooks: dict[str, set] = PrivateAttr(default_factory=dict)
    _decisions: list[LayerDecision] = PrivateAttr(default_factory=list)
    _cpu_pg: Any = PrivateAttr(default=None)
    _identity: dict = PrivateAttr(default_factory=dict)
    _saved: SavedStatistics | None = PrivateAttr(default=None)
    _measured: dict[str, LayerStatistics] = PrivateAttr(default_factory=dict)
    _decision_rounds: int = PrivateAttr(default=0)

    # -- validation ----------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(key, sorted(known), n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"MoNEPruningModifier has no parameter {key!r}.{hint} "
                        f"Its parameters: sparsity, scoring, scope, novice, "
                        f"ignore, report_path, seed, stock_architectures, "
                        f"authors_layout, "
                        f"save_statistics_path, statistics_path."
                    )
        return data

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"sparsity must be a fraction of the routed experts in (0, 1), "
                f"e.g. 0.25; got {value}"
            )
        return value

    @field_validator("report_path")
    @classmethod
    def _check_report_path(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.endswith(".json"):
            raise ValueError(
                f"report_path must name a .json file (a .png heatmap is written "
                f"next to it); got {value!r}"
            )
        return value

    @field_validator("save_statistics_path")
    @classmethod
    def _check_statistics_path(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.endswith(".safetensors"):
            raise ValueError(
                f"save_statistics_path must name a .safetensors file; got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _needs_data_unless_given_statistics(self) -> "MoNEPruningModifier":
        self.requires_calibration_data = self.statistics_path is None
        return self

    @model_validator(mode="after")
    def _check_authors_layout(self) -> "MoNEPruningModifier":
        if self.authors_layout and self.novice == "drop":
            raise ValueError(
                "authors_layout writes a checkpoint with novices; novice: drop "
                "writes a stock checkpoint, which needs no layout option"
            )
        return self

    @model_validator(mode="after")
    def _check_drop_scope(self) -> "MoNEPruningModifier":
        if self.novice == "drop" and self.scope == "model":
            raise ValueError(
                "novice: drop shrinks every layer's router to the same width, so "
                "it needs scope: layer; use scope: layer, or a novice mode that "
                "keeps the router (mean, weighted_mean, zero) with scope: model"
            )
        return self

    # -- lifecycle -------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        calibrating = self.statistics_path is None
        if calibrating and state.data.calib is None:
            raise ValueError(
                "MoNEPruningModifier needs calibration data to measure its "
                "experts: pass a dataset to oneshot, e.g. "
                "oneshot(model=..., dataset=..., recipe=...), or statistics "
                "saved by an earlier run (statistics_path)"
            )
        check_recipe_order(self)
        if calibrating:
            check_rank_data(state.data.calib)
        check_not_pruned(state.model)
        check_family_supported(state.model, self.novice)
        if self.authors_layout:
            check_authors_family(state.model.config)
        self._moe = find_moe_layers(state.model, self.ignore)
        attrs = self._moe.attrs
        self._identity = self._model_identity(state.model)
        if calibrating:
            check_calibration_tokens(state.data.calib, attrs.num_experts, attrs.top_k)
        else:
            self._saved = load_statistics(self.statistics_path)
            self._saved.check_matches(self._identity, str(self.statistics_path))
        if self.novice == "drop":
            check_droppable(
                state.model,
                [layer.name for layer in self._moe.layers],
                attrs.router_attr,
                attrs.num_experts,
            )
        self._budget = plan_budget(
            self.sparsity,
            attrs.num_experts,
            attrs.top_k,
            attrs.n_group,
            attrs.top_k_group,
            drop=self.novice == "drop",
        )
        self._cpu_pg = dist.new_group(backend="gloo") if is_distributed() else None
        sequential_tracing.install()
        logger.info(
            f"MoNE: {len(self._moe.layers)} MoE layers, {attrs.num_experts} experts "
            f"(top-{attrs.top_k}) each; replacing {self._budget.per_layer} per layer "
            f"({self.scoring} scoring, {self.novice} novices, {self.scope} scope)"
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if self._saved is not None:
            for layer in self._moe.layers:
                self._stats[layer.name] = self._saved.layers[layer.name]
                self._layer_hooks[layer.name] = set()
            return
        for layer in self._moe.layers:
            experts = self._moe.experts(state.model, layer)
            self._stats[layer.name] = LayerStatistics.empty(
                self._moe.attrs.num_experts,
                experts[0].down_proj.out_features,
                device=get_execution_device(experts),
            )
            handles = {
                self.register_hook(
                    experts, partial(self._open_batch, layer.name), "forward_pre"
                ),
                self.register_hook(
                    experts, partial(self._close_batch, layer.name), "forward"
                ),
            }
            for expert_id in range(self._moe.attrs.num_experts):
                handles.add(
                    self.register_hook(
                        experts[expert_id],
                        partial(self._expert_hook, layer.name, expert_id),
                        "forward",
                    )
                )
            self._layer_hooks[layer.name] = handles

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        if self.scope == "layer":
            self._decide(
                state.model,
                [
                    layer
                    for layer in self._moe.layers
                    if layer.name in self._stats and self._stats[layer.name].tokens > 0
                ],
            )

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._decide(
            state.model,
            [layer for layer in self._moe.layers if layer.name in self._stats],
        )
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs) -> bool:
        sequential_tracing.uninstall()
        dropped_to = None
        if self.novice == "drop":
            dropped_to = self._moe.attrs.num_experts - self._budget.per_layer
            changed = set_expert_count(
                state.model.config,
                dropped_to,
                extra_keys=(self._moe.attrs.num_experts_config_key,),
            )
            logger.info(f"MoNE: config {', '.join(changed)} -> {dropped_to}")
        install_checkpoint_writer(
            state.model,
            dropped_to,
            stock_architectures=self.stock_architectures,
            authors_layout=self.authors_layout,
        )
        if self.report_path is not None and is_source_process():
            write_report(self.report_path, self.report())
            logger.info(f"MoNE report written to {self.report_path}")
        if self.save_statistics_path is not None and is_source_process():
            self._save_statistics()
        if self._cpu_pg is not None:
            dist.destroy_process_group(group=self._cpu_pg)
            self._cpu_pg = None
        return True

    # -- calibration hooks -----------------------------------------------------

    def _open_batch(self, layer_name: str, module: torch.nn.Module, args: tuple):
        _, top_k_index, top_k_weights = args[:3]
        self._stats[layer_name].add_routing(top_k_index, top_k_weights)
        self._batches[layer_name] = RoutedBatch.from_routing(
            top_k_index, top_k_weights, self._moe.attrs.num_experts
        )

    def _expert_hook(
        self,
        layer_name: str,
        expert_id: int,
        module: torch.nn.Module,
        args: tuple,
        output: torch.Tensor,
    ):
        self._batches[layer_name].record(expert_id, output)

    def _close_batch(
        self, layer_name: str, module: torch.nn.Module, args: tuple, output: Any
    ):
        self._stats[layer_name].add_routed_outputs(
            *self._batches.pop(layer_name).flatten()
        )

    # -- decisions -------------------------------------------------------------

    def _decide(self, model: torch.nn.Module, layers: list[MoELayer]):
        if not layers:
            return
        stats = {layer.index: self._stats.pop(layer.name) for layer in layers}
        if self._saved is None:  # saved statistics are every rank's already
            stats = {i: reduce_across_ranks(s, self._cpu_pg) for i, s in stats.items()}
        self._decision_rounds += 1
        if self.save_statistics_path is not None:
            self._measured.update({layer.name: stats[layer.index] for layer in layers})
        for layer in layers:
            self.remove_hooks(self._layer_hooks.pop(layer.name))
            check_rankable(layer.name, layer.index, stats[layer.index])
        scores = {
            index: expert_scores(s, self.scoring, self.seed, index)
            for index, s in stats.items()
        }
        novices = self._choose(stats, scores)
        for layer in layers:
            decision = self._apply(
                model,
                layer,
                stats[layer.index],
                scores[layer.index],
                novices[layer.index],
            )
            self._decisions.append(decision)

    def _choose(
        self, stats: dict[int, LayerStatistics], scores: dict[int, torch.Tensor]
    ) -> dict[int, list[int]]:
        """Each layer's novices, chosen once on the source rank and broadcast
        (as REAP does), so no rounding difference between ranks can ever make
        their models diverge."""
        novices = None
        if is_source_process():
            novices = select_novices(
                scores,
                {index: s.is_routed.cpu() for index, s in stats.items()},
                self._budget,
                model_wide=self.scope == "model",
            )
        if is_distributed():
            shared = [novices]
            dist.broadcast_object_list(
                shared, src=get_source_rank(), group=self._cpu_pg
            )
            novices = shared[0]
        return novices

    def _apply(
        self,
        model: torch.nn.Module,
        layer: MoELayer,
        stats: LayerStatistics,
        scores: torch.Tensor,
        novices: list[int],
    ) -> LayerDecision:
        decision = layer_decision(layer.name, layer.index, stats, scores, novices)
        experts = self._moe.experts(model, layer)
        replaced = [experts[i] for i in novices]
        if self.novice == "drop":
            drop_experts(
                model.get_submodule(layer.name),
                self._moe.attrs.router_attr,
                self._moe.attrs.experts_attr,
                decision.retained,
                self._moe.attrs.num_experts,
            )
            outcome = "dropped"
        else:
            replace_with_novices(experts, novice_values(stats, novices, self.novice))
            record_novices(model.config, layer.index, novices)
            outcome = f"{self.novice} novices"
        forget_modules(replaced)
        logger.info(f"MoNE layer {layer.index}: experts {novices} -> {outcome}")
        if never_routed := decision.never_routed:
            unmeasured = sorted(set(never_routed) & set(novices))
            logger.warning(
                f"MoNE layer {layer.index}: experts {never_routed} received no "
                f"calibration token; {unmeasured} replaced first"
                f"{'' if self.novice == 'drop' else ' by zero novices'}. More or "
                f"more varied calibration data would measure them."
            )
        return decision

    def _model_identity(self, model: torch.nn.Module) -> dict:
        attrs = self._moe.attrs
        return {
            "model_type": model.config.model_type,
            "num_experts": attrs.num_experts,
            "top_k": attrs.top_k,
            "hidden_size": model.config.get_text_config().hidden_size,
            "layers": [layer.name for layer in self._moe.layers],
            "config": identity_config(model.config),
        }

    def _save_statistics(self):
        if self._saved is not None:
            measured = self._saved.measured
        else:
            measured = "progressive" if self._decision_rounds > 1 else "unpruned"
        save_statistics(
            self.save_statistics_path,
            self._measured,
            self._identity,
            measured,
            self.decision_settings(),
        )
        logger.info(
            f"MoNE statistics ({measured}) written to {self.save_statistics_path}"
        )

    def decision_settings(self) -> dict:
        """The options that decide the pruning (a report's and a statistics
        file's record of the run)."""
        return self.model_dump(
            include={"sparsity", "scoring", "scope", "novice", "ignore", "seed"}
        )

    def report(self) -> dict:
        """The settings, totals and every layer's decision so far (what
        ``report_path`` receives)."""
        attrs = self._moe.attrs
        settings = report_settings(
            self.decision_settings(),
            attrs.num_experts,
            attrs.top_k,
            self._budget.per_layer,
        )
        return build_report(settings, self._decisions)
