"""
The pruning report: a JSON of every layer's decision and statistics, and a
PNG heatmap (layers x experts, novices marked) next to it.
"""

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mone_modifier.statistics import LayerStatistics

__all__ = [
    "LayerDecision",
    "build_report",
    "layer_decision",
    "report_settings",
    "write_report",
]


@dataclass
class LayerDecision:
    """
    What was decided for one MoE layer, and on what evidence.

    :param name: module path of the MoE block
    :param index: decoder layer index
    :param novices: expert ids replaced (or dropped, with ``novice: drop``)
    :param retained: expert ids kept
    :param never_routed: experts that saw no calibration token (zero novices)
    :param tokens: calibration tokens that reached the layer
    :param score: per-expert redundancy score (lower = replaced first)
    :param frequency: per-expert mean routing weight over all tokens
    :param output_std: per-expert ``||sqrt(var)||_2`` over routed tokens
    :param routed_tokens: per-expert count of routed tokens
    """

    name: str
    index: int
    novices: list[int]
    retained: list[int]
    never_routed: list[int]
    tokens: int
    score: list[float]
    frequency: list[float]
    output_std: list[float]
    routed_tokens: list[int]


def layer_decision(
    name: str,
    index: int,
    stats: LayerStatistics,
    scores: torch.Tensor,
    novices: list[int],
) -> LayerDecision:
    """One layer's decision with the statistics it rests on."""
    num_experts = len(scores)
    return LayerDecision(
        name=name,
        index=index,
        novices=novices,
        retained=sorted(set(range(num_experts)) - set(novices)),
        never_routed=[i for i in range(num_experts) if not stats.is_routed[i]],
        tokens=int(stats.tokens),
        score=scores.tolist(),
        frequency=stats.frequency.tolist(),
        output_std=stats.output_std.tolist(),
        routed_tokens=[int(n) for n in stats.routed.tolist()],
    )


def report_settings(
    modifier_settings: dict, num_experts: int, top_k: int, replaced_per_layer: int
) -> dict[str, Any]:
    """A report's settings: the MoNE options and the routing shape."""
    return {
        **modifier_settings,
        "num_experts": num_experts,
        "top_k": top_k,
        "replaced_per_layer": replaced_per_layer,
    }


def build_report(settings: dict[str, Any], decisions: list[LayerDecision]) -> dict:
    """The run's settings, totals and per-layer decisions, as JSON-ready data."""
    return {
        "settings": settings,
        "totals": {
            "moe_layers": len(decisions),
            "novices": sum(len(d.novices) for d in decisions),
            "retained": sum(len(d.retained) for d in decisions),
            "never_routed": sum(len(d.never_routed) for d in decisions),
            "calibration_tokens_per_layer": {str(d.index): d.tokens for d in decisions},
        },
        "layers": [asdict(d) for d in decisions],
    }


def write_report(path: str | Path, report: dict):
    """Write ``path`` (JSON) and the heatmap beside it, each atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, json.dumps(report, indent=2).encode())
    _atomic_write(target.with_suffix(".png"), _heatmap_png(report))


def _heatmap_png(report: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings, decisions = report["settings"], report["layers"]
    scores = np.array([d["score"] for d in decisions], dtype=float)
    num_layers, num_experts = scores.shape
    fig, ax = plt.subplots(
        figsize=(max(6, 0.25 * num_experts + 2), max(3, 0.35 * num_layers + 1.5))
    )
    image = ax.imshow(scores, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label=f"{settings['scoring']} score")
    for row, decision in enumerate(decisions):
        ax.scatter(
            decision["novices"],
            [row] * len(decision["novices"]),
            marker="x",
            c="red",
            s=20,
        )
    ax.set_yticks(range(num_layers), [str(d["index"]) for d in decisions])
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_title(f"MoNE novices (x), sparsity {settings['sparsity']}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
