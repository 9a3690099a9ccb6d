"""
Reloaded layers with novices at inference (``pruned_experts.py``): equal to
an independent computation under every experts implementation, novice routes
costing no expert rows under grouped_mm, and whole models compiling with
``fullgraph=True`` to the same logits. The same check under the serving
environment's newer transformers is in ``test_serving.py``.
"""

import pytest
import torch
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    batched_mm_experts_forward,
)

import mone_modifier
import novice_experts_check
from devices import DEVICE, assert_close
from helpers import run_oneshot
from mone_modifier import MoNEPruningModifier
from mone_transformers import pruned_experts


@pytest.mark.parametrize("implementation", novice_experts_check.IMPLEMENTATIONS)
def test_equals_the_independent_computation(implementation):
    assert novice_experts_check.max_diff(implementation) < 1e-5


def test_novice_routes_cost_no_expert_rows(monkeypatch):
    module, _, _ = novice_experts_check.build()
    module.config._experts_implementation = "grouped_mm"
    ids, gates = novice_experts_check.routing(24)
    computed_rows = []
    grouped_mm = pruned_experts.F.grouped_mm

    def recording(rows, weight, offs):
        computed_rows.append(int(offs[-1]))
        return grouped_mm(rows, weight, offs=offs)

    monkeypatch.setattr(pruned_experts.F, "grouped_mm", recording)
    with torch.no_grad():
        module(torch.randn(24, novice_experts_check.HIDDEN), ids, gates)
    novices = novice_experts_check.NOVICE_IDS
    retained_routes = sum(i not in novices for i in ids.flatten().tolist())
    assert retained_routes < ids.numel()
    assert computed_rows == [retained_routes, retained_routes]


def test_other_registered_implementations_see_only_retained_expert_ids(monkeypatch):
    """transformers also registers ``deepgemm`` and ``sonicmoe``, whose kernels
    this machine lacks. An implementation registered the same way stands in
    for them: it is given only ids of the retained module, and the layer
    still equals the independent computation."""
    given = []

    def retained_ids_only(self, hidden_states, top_k_index, top_k_weights):
        given.append(top_k_index.clone())
        return batched_mm_experts_forward(
            self, hidden_states, top_k_index, top_k_weights
        )

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "retained_ids_only", retained_ids_only)
    assert novice_experts_check.max_diff("retained_ids_only") < 1e-5
    retained = len(novice_experts_check.RETAINED_IDS)
    assert given and all(
        0 <= int(ids.min()) <= int(ids.max()) < retained for ids in given
    )


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory, tiny_moe, samples):
    out = tmp_path_factory.mktemp("pruned") / "out"
    model = run_oneshot(tiny_moe("olmoe"), samples, MoNEPruningModifier(sparsity=0.5))
    model.save_pretrained(out)
    return out


# one bfloat16 ulp of logits of magnitude 4 to 8, should the compiled graph
# round an operation differently; a wrong route moves them by more than 4
@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1 / 32)]
)
def test_compiles_fullgraph_to_the_same_logits(pruned_checkpoint, samples, dtype, atol):
    """bfloat16 takes our grouped product under compilation; float32 the
    fused module's own (inductor's grouped_mm takes bfloat16 only).
    aot_eager: the whole graph is captured and run through AOT autograd,
    without inductor's minutes of C++ compilation on a CPU."""
    model = mone_modifier.from_pretrained(pruned_checkpoint, dtype=dtype).to(DEVICE)
    inputs = samples.to(DEVICE)
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        logits = compiled(input_ids=inputs).logits
    assert_close(logits.float(), expected.float(), rtol=0, atol=atol)
