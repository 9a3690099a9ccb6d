"""
``NoviceMoEExperts`` (``mone_transformers.pruned_experts``) against an
independent computation, under each experts implementation of the installed
transformers.

Imported by ``test_pruned_experts.py``; also run as a script by
``test_serving.py`` in the serving environment, whose transformers is newer
and which has no llm-compressor:

    python tests/novice_experts_check.py  # {"transformers": ..., "max_diff": ...}
"""

import json

import torch
import transformers
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from mone_transformers.pruned_experts import NoviceMoEExperts

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 8, 3, 64, 32
NOVICE_IDS = [1, 4, 7]
RETAINED_IDS = [i for i in range(NUM_EXPERTS) if i not in NOVICE_IDS]


def _config(num_experts: int) -> OlmoeConfig:
    return OlmoeConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_experts=num_experts,
        num_experts_per_tok=TOP_K,
    )


def build(seed: int = 0):
    """A layer's experts with novices ``NOVICE_IDS``, and its parts: the
    retained experts' weights and the novice vectors, by logical id."""
    generator = torch.Generator().manual_seed(seed)
    retained = OlmoeExperts(_config(len(RETAINED_IDS)))
    with torch.no_grad():
        retained.gate_up_proj.copy_(
            torch.randn(retained.gate_up_proj.shape, generator=generator) / 8
        )
        retained.down_proj.copy_(
            torch.randn(retained.down_proj.shape, generator=generator) / 8
        )
    novices = {i: torch.randn(HIDDEN, generator=generator) for i in NOVICE_IDS}
    weights = {
        logical: (retained.gate_up_proj[compact], retained.down_proj[compact])
        for compact, logical in enumerate(RETAINED_IDS)
    }
    module = NoviceMoEExperts(retained, RETAINED_IDS, novices, _config(NUM_EXPERTS))
    return module, weights, novices


def routing(num_tokens: int, seed: int = 1):
    """Distinct top-k ids per token, with some tokens routed to novices
    only and some to retained experts only."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack(
        [
            torch.randperm(NUM_EXPERTS, generator=generator)[:TOP_K]
            for _ in range(num_tokens)
        ]
    )
    ids[0] = torch.tensor(NOVICE_IDS)
    ids[1] = torch.tensor(RETAINED_IDS[:TOP_K])
    return ids, torch.rand(num_tokens, TOP_K, generator=generator)


@torch.no_grad()
def expected(hidden, ids, gates, weights, novices) -> torch.Tensor:
    """Route by route: ``g * novice`` or ``g * down(silu(gate x) * up x)``."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for expert, g in zip(ids[t].tolist(), gates[t]):
            if expert in novices:
                out[t] += g * novices[expert]
                continue
            gate_up, down = weights[expert]
            gate, up = (gate_up @ hidden[t]).chunk(2)
            out[t] += g * (down @ (torch.nn.functional.silu(gate) * up))
    return out


@torch.no_grad()
def max_diff(implementation: str, num_tokens: int = 24) -> float:
    module, weights, novices = build()
    module.config._experts_implementation = implementation
    hidden = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(2))
    ids, gates = routing(num_tokens)
    got = module(hidden, ids, gates)
    return (got - expected(hidden, ids, gates, weights, novices)).abs().max().item()


if __name__ == "__main__":
    print(
        json.dumps(
            {
                "transformers": transformers.__version__,
                "max_diff": {name: max_diff(name) for name in IMPLEMENTATIONS},
            }
        )
    )
