"""
MoNE computed a second, plain way, to test the modifier against.

It uses only transformers' own (fused, un-linearised) model: the inputs and
routing of each MoE layer are captured from ordinary causal forwards, each
expert's output comes from calling the fused experts module with every token
routed to that one expert at weight 1, and statistics are whole-tensor float64
reductions (no streaming). Novices are applied with a forward hook that swaps
``g * f_i(x)`` for ``g * mu_i`` on the tokens routed to a novice.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@dataclass
class ReferenceLayer:
    index: int
    tokens: int
    routed: torch.Tensor  # [E] routed-token counts
    frequency: torch.Tensor  # [E]
    output_std: torch.Tensor  # [E]
    mean: torch.Tensor  # [E, H]
    weighted_mean: torch.Tensor  # [E, H]
    saliency: torch.Tensor  # [E]
    novices: list[int] = field(default_factory=list)

    def score(self, scoring: str) -> torch.Tensor:
        return {
            "mone": self.frequency * self.output_std,
            "frequency": self.frequency,
            "variance": self.output_std,
            "reap": self.saliency,
        }[scoring]


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> fused experts module, for MoE layers."""
    return {
        i: layer.mlp.experts
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "experts")
    }


def expert_output(
    experts: torch.nn.Module, expert: int, x: torch.Tensor
) -> torch.Tensor:
    """f_i(x): the fused module with every token routed to ``expert`` at weight 1."""
    index = torch.full((x.shape[0], 1), expert, dtype=torch.long)
    return experts.forward(x, index, torch.ones(x.shape[0], 1, dtype=x.dtype))


@torch.no_grad()
def layer_statistics(index: int, experts, captures, num_experts: int) -> ReferenceLayer:
    x = torch.cat([c[0] for c in captures])
    top_k_index = torch.cat([c[1] for c in captures])
    top_k_weights = torch.cat([c[2] for c in captures]).double()
    n = x.shape[0]
    routed, freq, std, mean, wmean, saliency = [], [], [], [], [], []
    for e in range(num_experts):
        hit = top_k_index == e
        g = (top_k_weights * hit).sum(dim=1)
        rows = hit.any(dim=1)
        f = expert_output(experts, e, x[rows]).double()
        routed.append(int(rows.sum()))
        freq.append(g.sum() / n)
        if rows.any():
            std.append(f.var(dim=0, unbiased=False).sqrt().norm())
            mean.append(f.mean(dim=0))
            gr = g[rows]
            wmean.append((gr.square()[:, None] * f).sum(0) / gr.square().sum())
            saliency.append((gr * f.norm(dim=1)).mean())
        else:
            zero = torch.zeros(x.shape[1], dtype=torch.float64)
            std.append(torch.tensor(0.0, dtype=torch.float64))
            mean.append(zero)
            wmean.append(zero)
            saliency.append(torch.tensor(0.0, dtype=torch.float64))
    return ReferenceLayer(
        index=index,
        tokens=n,
        routed=torch.tensor(routed),
        frequency=torch.stack(freq),
        output_std=torch.stack(std),
        mean=torch.stack(mean),
        weighted_mean=torch.stack(wmean),
        saliency=torch.stack(saliency),
    )


def choose_lowest(layer: ReferenceLayer, scoring: str, count: int) -> list[int]:
    """Never-routed experts first, then lowest score, ties by id (no groups)."""
    score = layer.score(scoring)
    order = sorted(
        range(len(score)), key=lambda e: (layer.routed[e] > 0, float(score[e]), e)
    )
    return sorted(order[:count])


def choose_lowest_per_group(
    layer: ReferenceLayer, scoring: str, per_group: int, group_size: int
) -> list[int]:
    """The ``per_group`` lowest scores inside each routing group."""
    score = layer.score(scoring)
    chosen = []
    for start in range(0, len(score), group_size):
        group = range(start, start + group_size)
        chosen += sorted(
            group, key=lambda e: (layer.routed[e] > 0, float(score[e]), e)
        )[:per_group]
    return sorted(chosen)


def choose_model_wide(
    layers: list[ReferenceLayer], scoring: str, per_layer: int, layer_limit: int
) -> dict[int, list[int]]:
    """One ranking over all layers; no layer loses more than ``layer_limit``."""
    ranking = sorted(
        (bool(layer.routed[e] > 0), float(layer.score(scoring)[e]), layer.index, e)
        for layer in layers
        for e in range(len(layer.routed))
    )
    chosen = {layer.index: [] for layer in layers}
    for _, _, index, e in ranking:
        if sum(map(len, chosen.values())) == per_layer * len(layers):
            break
        if len(chosen[index]) < layer_limit:
            chosen[index].append(e)
    return {index: sorted(ids) for index, ids in chosen.items()}


def shrunk_block(
    block: torch.nn.Module, config, retained: list[int]
) -> torch.nn.Module:
    """The same MoE block class built for fewer experts, holding the retained
    experts' weights and router rows: what a stock checkpoint with fewer
    experts loads as."""
    config = copy.deepcopy(config)
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in config.to_dict():
            setattr(config, key, len(retained))
    small = type(block)(config)
    num_experts = block.experts.gate_up_proj.shape[0]
    state = {
        key: value[retained]
        if key.split(".")[0] in ("experts", "gate", "router")
        and value.dim() > 0
        and value.shape[0] == num_experts
        else value
        for key, value in block.state_dict().items()
    }
    small.load_state_dict(state)
    return small.eval()


def novice_hook(novices: dict[int, torch.Tensor]):
    def hook(module, args, output):
        x, top_k_index, top_k_weights = args
        output = output.clone()
        for e, value in novices.items():
            hit = top_k_index == e
            rows = hit.any(dim=1)
            g = (top_k_weights * hit).sum(dim=1)[rows].to(output.dtype)
            f = expert_output(module, e, x[rows])
            output[rows] += g[:, None] * (value.to(output.dtype) - f)
        return output

    return hook


class ReferenceMoNE:
    """
    MoNE on a plain transformers model.

    :param progressive: decide layer by layer, each on activations of the
        model pruned so far (the sequential pipeline); otherwise measure all
        layers on the unpruned model first (the basic pipeline)
    """

    def __init__(self, path: Path, samples: torch.Tensor, num_experts: int):
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.samples = samples
        self.num_experts = num_experts
        self.blocks = moe_blocks(self.model)
        self.layers: dict[int, ReferenceLayer] = {}

    @torch.no_grad()
    def capture(self, indices: list[int]) -> dict[int, list]:
        captures = {i: [] for i in indices}
        handles = [
            self.blocks[i].register_forward_pre_hook(
                lambda m, args, i=i: captures[i].append(tuple(a.detach() for a in args))
            )
            for i in indices
        ]
        for sample in self.samples:
            self.model(input_ids=sample[None])
        for handle in handles:
            handle.remove()
        return captures

    def measure(self, indices: list[int]) -> list[ReferenceLayer]:
        captures = self.capture(indices)
        for i in indices:
            self.layers[i] = layer_statistics(
                i, self.blocks[i], captures[i], self.num_experts
            )
        return [self.layers[i] for i in indices]

    def replace(self, layer: ReferenceLayer, novices: list[int], novice: str = "mean"):
        layer.novices = novices
        if novice == "drop":
            retained = [e for e in range(self.num_experts) if e not in novices]
            decoder_layer = self.model.model.layers[layer.index]
            decoder_layer.mlp = shrunk_block(
                decoder_layer.mlp, self.model.config, retained
            )
            self.blocks[layer.index] = decoder_layer.mlp.experts
            return
        table = {
            "mean": layer.mean,
            "weighted_mean": layer.weighted_mean,
            "zero": torch.zeros_like(layer.mean),
        }[novice]
        self.blocks[layer.index].register_forward_hook(
            novice_hook({e: table[e] for e in novices})
        )

    def run_layer_scope(
        self,
        count: int,
        scoring: str = "mone",
        novice: str = "mean",
        progressive: bool = True,
        group_size: int | None = None,
    ):
        def choose(layer):
            if group_size is None:
                return choose_lowest(layer, scoring, count)
            per_group = count * group_size // self.num_experts
            return choose_lowest_per_group(layer, scoring, per_group, group_size)

        order = sorted(self.blocks)
        if progressive:
            for i in order:
                (layer,) = self.measure([i])
                self.replace(layer, choose(layer), novice)
        else:
            for layer in self.measure(order):
                self.replace(layer, choose(layer), novice)
        return self

    def run_model_scope(
        self,
        per_layer: int,
        layer_limit: int,
        scoring: str = "mone",
        novice: str = "mean",
    ):
        layers = self.measure(sorted(self.blocks))
        chosen = choose_model_wide(layers, scoring, per_layer, layer_limit)
        for layer in layers:
            self.replace(layer, chosen[layer.index], novice)
        return self

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        return self.model(input_ids=self.samples).logits
