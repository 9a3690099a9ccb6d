"""Running oneshot on the tiny models the way a user would."""

import hashlib
import json
from pathlib import Path

import torch
from llmcompressor import oneshot

from conftest import as_dataset


def run_oneshot(
    model,
    samples: torch.Tensor,
    recipe,
    batch_size: int = 1,
    calibrate_all: bool = True,
    pipeline: str = "independent",
    **kwargs,
):
    return oneshot(
        model=str(model) if isinstance(model, Path) else model,
        dataset=as_dataset(samples),
        recipe=recipe,
        num_calibration_samples=len(samples),
        batch_size=batch_size,
        shuffle_calibration_samples=False,
        moe_calibrate_all_experts=calibrate_all,
        pipeline=pipeline,
        **kwargs,
    )


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def novice_vectors(model, layer_index: int) -> dict[int, torch.Tensor]:
    experts = model.model.layers[layer_index].mlp.experts
    return {
        int(name.split(".")[0]): buffer
        for name, buffer in experts.named_buffers()
        if name.endswith("approx_value")
    }


def tree_digest(path: Path) -> str:
    """One hash of every file's name and bytes under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()
