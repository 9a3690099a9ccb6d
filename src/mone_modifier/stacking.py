"""
Keeping the modifiers that share MoNE's calibration pass from compressing
experts MoNE has just replaced.

With ``pipeline="sequential"`` every modifier calibrates in the same pass.
At a layer's epoch end MoNE acts first (recipe order), then GPTQ, SparseGPT
or Wanda compress every module whose statistics they gathered, which
includes the experts MoNE detached a moment before. Forgetting those modules'
pending statistics skips that work. (With oneshot's default independent
pipeline the next modifier calibrates the already pruned model and never
meets them.)
"""

from collections.abc import Iterable

import torch
from llmcompressor.core import active_session

__all__ = ["forget_modules"]

# per-module statistics awaiting compression in GPTQ, SparseGPT and Wanda
PENDING_STATISTICS = ("_hessians", "_num_samples", "_row_scalars")


def forget_modules(modules: Iterable[torch.nn.Module]) -> int:
    """
    Drop ``modules`` (and their submodules) from every active modifier's
    pending statistics; returns how many entries were dropped.
    """
    gone = {sub for module in modules for sub in module.modules()}
    dropped = 0
    for modifier in active_session().lifecycle.recipe.modifiers:
        for name in PENDING_STATISTICS:
            pending = getattr(modifier, name, None)
            if isinstance(pending, dict):
                for module in gone & pending.keys():
                    del pending[module]
                    dropped += 1
    return dropped
