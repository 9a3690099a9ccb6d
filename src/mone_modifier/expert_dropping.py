"""
``novice: drop``: remove a MoE block's pruned experts and shrink its router.

llm-compressor's REAP ``prune_moe_layer`` shrinks only ``router.weight``,
``router.bias`` and an ``e_score_correction_bias`` it knows by name. Routers
of other families keep per-expert tensors elsewhere (a ``gate`` Linear inside
the router, a ``(1, E)`` correction under ``router.moe_statics``, an
``expert_bias`` on the block, extra rows after the routed experts for shared
experts or a skip class), and fail mid-calibration once a layer is shrunk.
Here every per-expert tensor is found by its shape instead of its name:

* a tensor is *per-expert* when its first dimension larger than one equals
  the expert count ``E`` (``(E, H)`` weights, ``(E,)`` biases, Ernie's
  ``(1, E)`` correction); it is index-selected to the retained experts;
* a tensor whose first such dimension equals an *extended* count ``D > E``
  that the router itself declares (an int attribute naming experts or
  classes: Inkling's ``n_total_experts`` = routed + shared experts, Zaya's
  ``num_router_classes`` = routed experts + a skip class) keeps the retained
  rows followed by the ``D - E`` trailing rows, which are not routed experts.

Only the router (recursively) and the block's own tensors are looked at:
the block's other children (shared experts, norms) are not per-expert, and
the routed experts themselves are sliced as module objects.
"""

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from compressed_tensors import align_module_device
from compressed_tensors.offload.utils import to_tensor
from llmcompressor.modeling.moe.linear_experts import ExpertMLP
from transformers import PretrainedConfig

from mone_format import EXPERT_COUNT_KEYS

__all__ = [
    "ExpertTensor",
    "check_droppable",
    "drop_experts",
    "expert_tensors",
    "set_expert_count",
    "shrink_router",
    "slice_experts",
]

# Words that mark an int attribute of the router as a count of experts (or of
# routing classes, which include the experts), never a hidden size.
_COUNT_WORDS = ("expert", "class")


@dataclass(frozen=True)
class ExpertTensor:
    """
    One per-expert parameter or buffer.

    :param module: the module holding it directly
    :param name: its name in ``module`` (no dots)
    :param dim: the dimension indexed by expert
    :param size: that dimension's size, ``E`` or an extended count ``D > E``
    """

    module: torch.nn.Module
    name: str
    dim: int
    size: int


def _expert_dim(shape: torch.Size, sizes: set[int]) -> int | None:
    """The first dimension larger than one, when its size is one of ``sizes``."""
    for dim, n in enumerate(shape):
        if n != 1:
            return dim if n in sizes else None
    return None


def _extended_counts(router: torch.nn.Module, num_experts: int) -> set[int]:
    """Counts above ``E`` the router declares for its experts or classes."""
    return {
        value
        for module in router.modules()
        for key, value in vars(module).items()
        if type(value) is int
        and value > num_experts
        and any(word in key.lower() for word in _COUNT_WORDS)
    }


def expert_tensors(
    block: torch.nn.Module, router: torch.nn.Module, num_experts: int
) -> list[ExpertTensor]:
    """
    The per-expert tensors of a MoE block: those of the router and its
    submodules, then the block's own (e.g. ``e_score_correction_bias``,
    ``expert_bias``); see the module docstring for the shape rule.
    """
    sizes = {num_experts} | _extended_counts(router, num_experts)
    found = []
    for module in [*router.modules(), block]:
        # an offloaded module's cache onloads each tensor to read its shape;
        # routers and the block's own tensors are small
        for name, tensor in [
            *module._parameters.items(),
            *module._buffers.items(),
        ]:
            if tensor is None:
                continue
            dim = _expert_dim(tensor.shape, sizes)
            if dim is not None:
                found.append(ExpertTensor(module, name, dim, tensor.shape[dim]))
    return found


def slice_experts(experts: torch.nn.Module, retained: list[int]):
    """
    Keep only the ``retained`` experts of a linearised experts module, renumbered
    ``0 .. R-1``, as llm-compressor's ``prune_moe_layer`` does: the expert
    module objects themselves move, so their offload state travels with them;
    non-expert children (e.g. ``act_fn``) stay.
    """
    others = {
        key: module
        for key, module in experts._modules.items()
        if not isinstance(module, ExpertMLP)
    }
    modules = OrderedDict((str(i), experts[pos]) for i, pos in enumerate(retained))
    modules.update(others)
    experts._modules = modules
    experts.num_experts = len(retained)


@torch.no_grad()
def shrink_router(
    block: torch.nn.Module,
    router: torch.nn.Module,
    retained: list[int],
    num_experts: int,
):
    """
    Shrink every per-expert tensor of ``router`` and ``block`` to ``retained``
    and update the int attributes that count experts.

    Tensors are replaced through the module's ``_parameters`` / ``_buffers``
    mapping, so a parameter stays a parameter (same class, ``requires_grad``)
    and a buffer stays a buffer (same persistence), and an offloaded module's
    ``OffloadCache`` offloads the new shape.
    """
    dropped = num_experts - len(retained)
    for t in expert_tensors(block, router, num_experts):
        store = (
            t.module._parameters
            if t.name in t.module._parameters
            else t.module._buffers
        )
        with align_module_device(t.module):
            old = store[t.name]
            index = torch.tensor(
                retained + list(range(num_experts, t.size)),
                dtype=torch.long,
                device=old.device,
            )
            new = old.detach().index_select(t.dim, index).contiguous()
        store[t.name] = to_tensor(new, old)
    holders = [block, *router.modules()]
    extended = _extended_counts(router, num_experts)
    for module in holders:
        for key, value in list(vars(module).items()):
            if type(value) is not int:
                continue
            names_count = any(w in key.lower() for w in _COUNT_WORDS)
            if names_count and value == num_experts:
                setattr(module, key, len(retained))
            elif names_count and value in extended:
                setattr(module, key, value - dropped)
        # a Linear's out_features must match the rows it now has
        if isinstance(module, torch.nn.Linear):
            module.out_features = module.weight.shape[0]
        # a module that reads the expert count from the (shared) model config
        # at forward time, e.g. Zaya's skip class at config.num_experts, gets
        # its own copy: the model config changes only once every layer is done
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig) and _count_of(config) == num_experts:
            module.config = copy.copy(config)
            set_expert_count(module.config, len(retained))


def drop_experts(
    block: torch.nn.Module,
    router_attr: str,
    experts_attr: str,
    retained: list[int],
    num_experts: int,
):
    """Remove all but the ``retained`` experts of a MoE block, and shrink its
    router to match."""
    slice_experts(getattr(block, experts_attr), retained)
    shrink_router(block, getattr(block, router_attr), retained, num_experts)


def check_droppable(
    model: torch.nn.Module,
    block_names: list[str],
    router_attr: str,
    num_experts: int,
):
    """
    Refuse, before any layer changes, a model whose routers cannot be shrunk:
    a router with no tensor sized by the expert count computes its scores some
    other way, and dropping experts would leave it routing to ids that are
    gone, so the run would fail (or route wrongly) halfway.

    :raises ValueError: naming the family, the block and the fix
    """
    family = getattr(model.config, "model_type", type(model).__name__)
    for name in block_names:
        block = model.get_submodule(name)
        router = getattr(block, router_attr, None)
        if not isinstance(router, torch.nn.Module) or not any(
            t.module is not block for t in expert_tensors(block, router, num_experts)
        ):
            raise ValueError(
                f"novice: drop cannot shrink the router of {family} models: "
                f"{name}.{router_attr} ({type(router).__name__}) holds no "
                f"parameter or buffer with one row per expert ({num_experts}), "
                f"so there is nothing to remove the dropped experts from. Use "
                f"novice: mean (the default), which keeps the router whole."
            )


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "text_config", None) or config


def _count_of(config: PretrainedConfig) -> int | None:
    text = _text_config(config)
    for key in EXPERT_COUNT_KEYS:
        value = getattr(text, key, None)
        if type(value) is int:
            return value
    return None


def set_expert_count(config: PretrainedConfig, count: int, extra_keys=()) -> list[str]:
    """
    Set every expert-count key of ``config`` (its ``text_config`` for
    multimodal models) that holds the old count to ``count``, so that plain
    transformers builds the dropped model's shapes from the saved config.
    Returns the keys changed.
    """
    text = _text_config(config)
    old = _count_of(config)
    changed = []
    for key in (*EXPERT_COUNT_KEYS, *extra_keys):
        value = getattr(text, key, None)
        if type(value) is int and (old is None or value == old):
            setattr(text, key, count)
            changed.append(key)
    return changed
