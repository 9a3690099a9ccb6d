"""
The experts of a reloaded MoE layer with novices, at inference.

Routes to novices must cost far less than an expert, under every experts
implementation transformers offers, without host synchronisation (so
``torch.compile(fullgraph=True)`` and CUDA graphs work) and without relying
on what an implementation does with an expert id it does not have: the
sentinel ids of transformers' expert parallelism are skipped by grouped_mm
in transformers 5.17 but are garbage multiplied by zero in 5.19.

So the novice term is one dense product per layer, routing weights scattered
to ``[T, E]`` times the ``[E, H]`` novice table; and the retained experts get
every route with shapes fixed by the batch:

- under ``grouped_mm``, by our grouped product (transformers' computation,
  through the same module attributes), where novice routes sort after the
  retained ones and ``torch.nn.functional.grouped_mm`` skips the rows past
  the last offset (its documented contract); those rows are discarded by
  selection, never multiplied, so whatever they hold cannot leak;
- under any other implementation, by the fused module itself, novice routes
  sent to the last retained expert with weight zero (computed, then
  multiplied by zero: the eager loop and batched_mm compute every route they
  are given).
"""

import torch
import torch.nn.functional as F

__all__ = ["NoviceMoEExperts"]


class NoviceMoEExperts(torch.nn.Module):
    """
    The experts of a pruned MoE layer, called like the architecture's experts
    module: ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.

    :param retained: fused experts module holding the retained experts
    :param retained_ids: logical ids of its experts, in order
    :param novices: logical id -> ``[hidden_size]`` novice vector
    :param config: the model's (text) config; its experts implementation
        (``set_experts_implementation``) applies to ``retained`` too
    """

    def __init__(
        self,
        retained: torch.nn.Module,
        retained_ids: list[int],
        novices: dict[int, torch.Tensor],
        config,
    ):
        super().__init__()
        self.retained = retained
        self.config = config
        num_experts = len(retained_ids) + len(novices)
        # logical id -> compact id, and num_retained (one past the last) for
        # novices: one gather gives every route its retained-module id
        route = torch.full((num_experts,), len(retained_ids), dtype=torch.long)
        route[retained_ids] = torch.arange(len(retained_ids))
        value = next(iter(novices.values()))
        table = torch.zeros(num_experts, value.shape[0], dtype=value.dtype)
        for expert, vector in novices.items():
            table[expert] = vector
        self.register_buffer("route_id", route, persistent=False)
        self.register_buffer("novice_table", table, persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        # the retained module has its own config (built for fewer experts)
        self.retained.config._experts_implementation = (
            self.config._experts_implementation
        )
        route = self.route_id[top_k_index]
        num_retained = self.retained.num_experts
        if self._groups_routes(hidden_states):
            routed = grouped_experts(self.retained, hidden_states, route, top_k_weights)
        else:
            # novice routes go to the last retained expert at weight zero
            routed = self.retained(
                hidden_states,
                route.clamp(max=num_retained - 1),
                torch.where(route < num_retained, top_k_weights, 0),
            )
        return routed + self._novice_term(top_k_index, top_k_weights).to(routed.dtype)

    def _novice_term(
        self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``sum_j g_j * novice[id_j]`` per token; retained experts' rows of
        the table are zero."""
        num_experts = self.novice_table.shape[0]
        dense = top_k_weights.new_zeros(top_k_index.shape[0], num_experts)
        dense = dense.scatter(1, top_k_index, top_k_weights)
        return dense @ self.novice_table.to(top_k_weights.dtype)

    def _groups_routes(self, hidden_states: torch.Tensor) -> bool:
        """Whether our grouped product serves this call: grouped_mm chosen,
        a module of transformers' experts interface (``has_gate`` and the
        weights its implementations read), and a grouped_mm kernel that takes
        the dtype (inductor's takes bfloat16 only)."""
        return (
            self.config._experts_implementation == "grouped_mm"
            and hasattr(self.retained, "has_gate")
            and hasattr(F, "grouped_mm")
            and not (
                torch.compiler.is_compiling() and hidden_states.dtype != torch.bfloat16
            )
        )


def grouped_experts(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """
    ``sum_j w_j * expert_{id_j}(x)`` per token over the routes whose id is
    below ``experts.num_experts``; routes with id ``num_experts`` cost no
    expert computation and contribute nothing.

    :param experts: fused experts module of transformers' experts interface
    :param hidden_states: ``[T, H]``
    :param expert_ids: ``[T, k]``, ids in ``[0, num_experts]``
    :param weights: ``[T, k]`` routing weights
    """
    num_tokens, top_k = expert_ids.shape
    num_experts = experts.num_experts
    sorted_ids, order = torch.sort(expert_ids.reshape(-1))
    rows = hidden_states[order // top_k]
    # group e ends after the last route with id e; skipped routes sort last
    offsets = torch.searchsorted(
        sorted_ids, torch.arange(num_experts, device=sorted_ids.device), right=True
    ).to(torch.int32)
    expert_of_row = sorted_ids.clamp(max=num_experts - 1)
    projected = _grouped_linear(
        experts,
        "gate_up_proj" if experts.has_gate else "up_proj",
        rows,
        offsets,
        expert_of_row,
    )
    if experts.has_gate:
        projected = experts._apply_gate(projected)
    else:
        projected = experts.act_fn(projected)
    out = _grouped_linear(experts, "down_proj", projected, offsets, expert_of_row)
    computed = (sorted_ids < num_experts).unsqueeze(-1)
    out = torch.where(computed, out * weights.reshape(-1)[order].unsqueeze(-1), 0)
    out = torch.zeros_like(out).index_copy(0, order, out)
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _grouped_linear(
    experts: torch.nn.Module,
    name: str,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    expert_of_row: torch.Tensor,
) -> torch.Tensor:
    weight = getattr(experts, name)
    if not experts.is_transposed:
        weight = weight.transpose(-2, -1)
    out = F.grouped_mm(rows.to(weight.dtype), weight, offs=offsets)
    if experts.has_bias:
        out = out + getattr(experts, f"{name}_bias")[expert_of_row]
    return out
