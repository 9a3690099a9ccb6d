"""``novice: drop`` on routers beyond llm-compressor's ``prune_moe_layer``:
every per-expert router tensor is shrunk, whatever it is called, and a router
with none is refused before calibration."""

import pytest
import torch
from compressed_tensors.offload import offload_module
from compressed_tensors.offload.cache import OffloadCache
from transformers import AutoModelForCausalLM, PretrainedConfig

from helpers import run_oneshot
from mone_modifier import MoNEPruningModifier
from mone_modifier.expert_dropping import set_expert_count, shrink_router
from mone_modifier.tiny_moe import NUM_EXPERTS

E, H, SHARED = 8, 16, 2
RETAINED = [0, 2, 3, 5, 7]


class Statics(torch.nn.Module):
    """Ernie-style ``(1, E)`` correction held by a child of the router."""

    def __init__(self):
        super().__init__()
        self.e_score_correction_bias = torch.nn.Parameter(
            torch.randn(1, E), requires_grad=False
        )


class Router(torch.nn.Module):
    """A sigmoid router with every kind of per-expert tensor: a weight and
    bias of a child Linear (AFMoE), a correction buffer (DeepSeek-V3), a
    ``(1, E)`` parameter of a grandchild (Ernie), and rows after the routed
    experts (Inkling's shared experts), declared by ``n_total_experts``."""

    def __init__(self):
        super().__init__()
        self.num_experts = E
        self.n_total_experts = E + SHARED
        self.hidden_dim = H
        self.gate = torch.nn.Linear(H, E + SHARED)
        self.e_score_correction_bias = torch.nn.Buffer(torch.randn(E))
        self.statics = Statics()

    def forward(self, x, block_bias):
        logits = self.gate(x)
        routed = logits[:, : self.num_experts].sigmoid()
        shared = logits[:, self.num_experts :]
        choice = (
            routed
            + self.e_score_correction_bias
            + self.statics.e_score_correction_bias.squeeze(0)
            + block_bias
        )
        return routed, choice, shared


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Router()
        self.expert_bias = torch.nn.Parameter(torch.randn(E), requires_grad=False)
        self.shared_gate = torch.nn.Linear(H, 1)  # not per-expert: left alone

    def forward(self, x):
        return self.gate(x, self.expert_bias)


def _tensor_kinds(block):
    return {
        name: isinstance(t, torch.nn.Parameter)
        for name, t in [*block.named_parameters(), *block.named_buffers()]
    }


@pytest.mark.parametrize("offloaded", [False, True], ids=["plain", "offloaded"])
def test_shrunk_router_routes_as_the_original_restricted(offloaded):
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(32, H)
    with torch.no_grad():
        routed, choice, shared = block(x)
    kinds = _tensor_kinds(block)
    shared_gate = block.shared_gate.weight.clone()
    if offloaded:
        for module in block.modules():
            offload_module(module, "cpu", "cpu")

    shrink_router(block, block.gate, RETAINED, E)

    with torch.no_grad():
        got_routed, got_choice, got_shared = block(x)
    # independent computation: the original scores of the retained experts,
    # the shared experts' logits untouched
    torch.testing.assert_close(got_routed, routed[:, RETAINED])
    torch.testing.assert_close(got_choice, choice[:, RETAINED])
    torch.testing.assert_close(got_shared, shared)
    # top-k over the shrunk router = top-k over the original with the dropped
    # experts masked out, mapped back to original ids
    masked = choice.clone()
    masked[:, [i for i in range(E) if i not in RETAINED]] = float("-inf")
    want = masked.topk(2, dim=-1).indices
    got = torch.tensor(RETAINED)[got_choice.topk(2, dim=-1).indices]
    assert torch.equal(got, want)

    # parameters stay parameters, buffers stay buffers, nothing else moves
    assert _tensor_kinds(block) == kinds
    assert torch.equal(block.shared_gate.weight, shared_gate)
    assert block.gate.num_experts == len(RETAINED)
    assert block.gate.n_total_experts == len(RETAINED) + SHARED
    assert block.gate.gate.out_features == len(RETAINED) + SHARED
    assert block.gate.hidden_dim == H
    if offloaded:
        assert isinstance(block.gate.gate._parameters, OffloadCache)


def test_set_expert_count_sets_every_key():
    config = PretrainedConfig(num_experts=8, n_routed_experts=8, num_experts_per_tok=2)
    assert sorted(set_expert_count(config, 6)) == ["n_routed_experts", "num_experts"]
    assert (config.num_experts, config.n_routed_experts) == (6, 6)
    assert config.num_experts_per_tok == 2


class HashRouter(torch.nn.Module):
    """Routes token ids by position, with no per-expert tensor at all."""

    def __init__(self, top_k):
        super().__init__()
        self.top_k = top_k

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        n = flat.shape[0]
        logits = torch.zeros(n, NUM_EXPERTS, dtype=flat.dtype, device=flat.device)
        ids = torch.arange(n, device=flat.device)[:, None] + torch.arange(self.top_k)
        ids = ids % NUM_EXPERTS
        weights = torch.full(ids.shape, 1 / self.top_k, dtype=flat.dtype)
        return logits, weights, ids


def test_router_without_expert_rows_refused_before_calibration(tiny_moe, samples):
    model = AutoModelForCausalLM.from_pretrained(tiny_moe("olmoe"))
    for layer in model.model.layers:
        layer.mlp.gate = HashRouter(layer.mlp.gate.top_k)
    with pytest.raises(ValueError) as error:
        run_oneshot(model, samples, MoNEPruningModifier(sparsity=0.25, novice="drop"))
    message = str(error.value)
    assert "olmoe" in message and "HashRouter" in message
    assert "novice: mean" in message
    # refused before any layer changed
    assert all(
        layer.mlp.experts.num_experts == NUM_EXPERTS for layer in model.model.layers
    )
