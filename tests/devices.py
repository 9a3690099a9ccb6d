"""
The device the tests compute on, and tolerances that follow it.

With CUDA present, llm-compressor's oneshot leaves the model offloaded with
execution device cuda:0, so the pruned model's outputs are CUDA tensors, while
the references (``reference.py``) compute on the CPU. Models the tests load
themselves to compare against a pruned model (reloads, plain transformers) go
to ``DEVICE``; comparisons bring both sides to the CPU.
"""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# GPU float32 kernels accumulate in other orders than CPU ones: the tiny
# models' logits (magnitude about 5) differ by up to 1.2e-5 between a CUDA and
# a CPU forward, where CPU against CPU stays under 4e-6. Ten times the CPU
# tolerance covers that, with room for comparisons not measured on a GPU, and
# stays far below what a wrong novice moves the logits by (more than 4).
CUDA_FACTOR = 10


def tolerance(cpu_tolerance: float) -> float:
    """A tolerance stated for the dtype on CPU, as it applies on ``DEVICE``
    (zero stays zero: exact comparisons stay exact)."""
    return cpu_tolerance * CUDA_FACTOR if DEVICE.type == "cuda" else cpu_tolerance


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float
):
    """``torch.testing.assert_close`` on one device (the CPU, where the
    references are), with ``rtol`` and ``atol`` stated for the dtype on CPU
    and widened by :func:`tolerance` where the tests compute on CUDA."""
    torch.testing.assert_close(
        actual.cpu(), expected.cpu(), rtol=tolerance(rtol), atol=tolerance(atol)
    )
