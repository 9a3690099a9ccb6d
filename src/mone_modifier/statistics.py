"""
Exact streaming statistics of one MoE layer's routed experts.

Every quantity MoNE and its ablations need is kept as a float64 sum or as a
(count, mean, M2) triple merged with Chan's parallel formula, so the result
does not depend on batch size, batch order or how the data is split over
processes, only on the set of calibration tokens.
"""

from dataclasses import dataclass, fields

import torch
from compressed_tensors.distributed import is_distributed
from torch import distributed as dist

__all__ = ["LayerStatistics", "reduce_across_ranks"]


@dataclass
class LayerStatistics:
    """
    Calibration statistics of the E routed experts of one MoE layer, for
    experts' outputs ``f_i(x)`` (before the routing weight) and routing
    weights ``g_i(x)``:

    - ``tokens``: N, every token that reached the layer
    - ``routed``: ``|X_i|``, tokens routed to expert i
    - ``weight_sum``: ``sum_x g_i(x)`` (zero where i is not selected)
    - ``weight_sq_sum``: ``sum_x g_i(x)^2``
    - ``weighted_output_sum``: ``sum_x g_i(x)^2 f_i(x)``, ``[E, H]``
    - ``saliency_sum``: ``sum_x g_i(x) ||f_i(x)||_2`` (REAP)
    - ``mean``, ``m2``: per-dimension mean and sum of squared deviations of
      ``f_i`` over ``X_i``, ``[E, H]``
    """

    tokens: torch.Tensor
    routed: torch.Tensor
    weight_sum: torch.Tensor
    weight_sq_sum: torch.Tensor
    weighted_output_sum: torch.Tensor
    saliency_sum: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(
        cls, num_experts: int, hidden_size: int, device: torch.device | str = "cpu"
    ) -> "LayerStatistics":
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(
            tokens=zeros(),
            routed=zeros(num_experts),
            weight_sum=zeros(num_experts),
            weight_sq_sum=zeros(num_experts),
            weighted_output_sum=zeros(num_experts, hidden_size),
            saliency_sum=zeros(num_experts),
            mean=zeros(num_experts, hidden_size),
            m2=zeros(num_experts, hidden_size),
        )

    @property
    def num_experts(self) -> int:
        return self.routed.shape[0]

    @torch.no_grad()
    def add_routing(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Count one batch of tokens and their routing weights, ``[T, k]`` each."""
        self.tokens += top_k_index.shape[0]
        self.weight_sum.index_add_(
            0,
            top_k_index.reshape(-1).to(self.weight_sum.device, torch.long),
            top_k_weights.reshape(-1).to(self.weight_sum.device, torch.float64),
        )

    @torch.no_grad()
    def add_routed_outputs(
        self, expert_ids: torch.Tensor, outputs: torch.Tensor, weights: torch.Tensor
    ):
        """
        Merge one batch of experts' outputs on their routed tokens, all experts
        at once.

        :param expert_ids: ``[R]`` the expert of each (token, expert) pair
        :param outputs: ``[R, H]`` that expert's output ``f_i(x)`` on the token
        :param weights: ``[R]`` the routing weight ``g_i(x)`` of the pair
        """
        ids = expert_ids.to(self.mean.device, torch.long)
        x = outputs.to(self.mean.device, torch.float64)
        g = weights.to(self.mean.device, torch.float64)
        batch_n = torch.zeros_like(self.routed).index_add_(0, ids, torch.ones_like(g))
        batch_mean = torch.zeros_like(self.mean).index_add_(0, ids, x)
        batch_mean /= batch_n.clamp(min=1).unsqueeze(1)
        batch_m2 = torch.zeros_like(self.m2).index_add_(
            0, ids, (x - batch_mean[ids]).square()
        )
        self.mean, self.m2 = _chan_merge(
            self.routed, self.mean, self.m2, batch_n, batch_mean, batch_m2
        )
        self.routed += batch_n
        self.weight_sq_sum.index_add_(0, ids, g.square())
        self.weighted_output_sum.index_add_(0, ids, g.square().unsqueeze(1) * x)
        self.saliency_sum.index_add_(0, ids, g * x.norm(dim=1))

    @torch.no_grad()
    def merge(self, other: "LayerStatistics"):
        """Fold the statistics of a disjoint set of tokens into these."""
        other = LayerStatistics(
            **{
                f.name: getattr(other, f.name).to(self.mean.device)
                for f in fields(self)
            }
        )
        self.mean, self.m2 = _chan_merge(
            self.routed, self.mean, self.m2, other.routed, other.mean, other.m2
        )
        for name in (
            "tokens",
            "routed",
            "weight_sum",
            "weight_sq_sum",
            "weighted_output_sum",
            "saliency_sum",
        ):
            getattr(self, name).add_(getattr(other, name))

    def non_finite_experts(self) -> list[int]:
        """Experts whose outputs or routing weights contained NaN or inf."""
        finite = (
            self.mean.isfinite().all(dim=1)
            & self.m2.isfinite().all(dim=1)
            & self.weight_sum.isfinite()
            & self.saliency_sum.isfinite()
        )
        return (~finite).nonzero().squeeze(1).tolist()

    # -- derived quantities ------------------------------------------------

    @property
    def is_routed(self) -> torch.Tensor:
        """Experts that received at least one token."""
        return self.routed > 0

    @property
    def frequency(self) -> torch.Tensor:
        """Mean routing weight over all tokens, ``sum_x g_i(x) / N``."""
        return self.weight_sum / self.tokens.clamp(min=1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-dimension population variance over routed tokens, ``[E, H]``."""
        return self.m2 / self.routed.clamp(min=1).unsqueeze(1)

    @property
    def output_std(self) -> torch.Tensor:
        """``||sqrt(var_i)||_2``, the L2 norm of the per-dimension std."""
        return self.variance.sqrt().norm(dim=1)

    @property
    def saliency(self) -> torch.Tensor:
        """REAP: ``mean_{x in X_i} g_i(x) ||f_i(x)||_2``."""
        return self.saliency_sum / self.routed.clamp(min=1)

    @property
    def weighted_mean(self) -> torch.Tensor:
        """``sum g^2 f / sum g^2``: the constant with least routing-weighted
        squared error; zero for experts never routed."""
        return self.weighted_output_sum / torch.where(
            self.weight_sq_sum > 0, self.weight_sq_sum, 1.0
        ).unsqueeze(1)


def _chan_merge(
    n_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Chan et al.'s pairwise combination of (n, mean, M2) summaries; ``n`` has
    the leading shape of ``mean`` without its last (hidden) dimension. Pure
    tensor arithmetic, so it never waits for the device.
    """
    n = (n_a + n_b).clamp(min=1).unsqueeze(-1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b.unsqueeze(-1) / n)
    m2 = m2_a + m2_b + delta.square() * (n_a * n_b).unsqueeze(-1) / n
    return mean, m2


def reduce_across_ranks(
    stats: LayerStatistics, group: dist.ProcessGroup | None = None
) -> LayerStatistics:
    """
    Merge every rank's statistics, in rank order, so that all ranks hold the
    same totals and therefore make the same (deterministic) decision.
    """
    if not is_distributed():
        return stats
    world = dist.get_world_size(group)
    gathered = {}
    for field in fields(LayerStatistics):
        local = getattr(stats, field.name).cpu()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        gathered[field.name] = parts
    device = stats.mean.device
    total = LayerStatistics(**{k: v[0].to(device) for k, v in gathered.items()})
    for rank in range(1, world):
        total.merge(LayerStatistics(**{k: v[rank] for k, v in gathered.items()}))
    return total
