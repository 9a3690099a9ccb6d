"""
Saved calibration statistics: every MoE layer's float64 accumulators in one
safetensors file, so one calibration prunes at any sparsity, scoring and
novice kind, and calibration split over several runs merges exactly.

Tensors are named ``<MoE layer name>.<LayerStatistics field>``; the header's
metadata holds the format version, what the statistics measured, the
calibration's settings and the model's identity (model type, expert count,
top-k, hidden size, MoE layer names, and its config without the fields
saving or pruning change), which a model must match to be pruned from them.
"""

import json
import os
from dataclasses import fields
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig

from mone_modifier.statistics import LayerStatistics

__all__ = [
    "FORMAT",
    "VERSION",
    "SavedStatistics",
    "identity_config",
    "load_statistics",
    "save_statistics",
]

FORMAT = "mone-statistics"
VERSION = "1"

# config fields that differ between a model and the same model after a MoNE
# run or a save (dtype, MoNE metadata, names), not part of its identity
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "approximate_experts",
    "approximate_expert_init_tokens",
    "expert_substitution",
    "quantization_config",
}


def identity_config(config: PretrainedConfig) -> dict:
    """The model's config as JSON values, without the fields that saving or
    pruning change."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.loads(json.dumps(data, sort_keys=True, default=str))


class SavedStatistics:
    """
    Statistics read from one or more files.

    :param layers: MoE layer name -> its statistics (float64, on the CPU)
    :param identity: the model they describe (``model_type``,
        ``num_experts``, ``top_k``, ``hidden_size``, ``layers``, ``config``)
    :param measured: ``unpruned`` (every layer measured on the unpruned model)
        or ``progressive`` (each layer measured after the earlier ones were
        pruned)
    :param settings: the saving run's MoNE settings
    """

    def __init__(
        self,
        layers: dict[str, LayerStatistics],
        identity: dict,
        measured: str,
        settings: dict,
    ):
        self.layers = layers
        self.identity = identity
        self.measured = measured
        self.settings = settings

    def check_matches(self, identity: dict, source: str):
        """Refuse statistics of another model, naming what differs."""
        differences = [
            _difference(key, self.identity.get(key), identity[key])
            for key in identity
            if self.identity.get(key) != identity[key]
        ]
        if differences:
            raise ValueError(
                f"statistics {source} describe another model ("
                + "; ".join(differences)
                + "). Calibrate this model with save_statistics_path, or prune "
                "the model the statistics were saved from."
            )


def _difference(key: str, saved, model) -> str:
    if key == "config":
        saved = saved or {}
        differing = sorted(
            k for k in saved.keys() | model.keys() if saved.get(k) != model.get(k)
        )
        return f"config fields {differing[:8]}"
    return f"{key}: {saved!r} in the statistics, {model!r} in the model"


def save_statistics(
    path: str | Path,
    layers: dict[str, LayerStatistics],
    identity: dict,
    measured: str,
    settings: dict,
):
    """Write ``layers`` to ``path`` atomically: a reader sees the whole file
    or none (the previous one, if any)."""
    path = Path(path)
    tensors = {
        f"{name}.{field.name}": getattr(stats, field.name).detach().cpu().contiguous()
        for name, stats in layers.items()
        for field in fields(LayerStatistics)
    }
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "measured": measured,
        "identity": json.dumps(identity),
        "settings": json.dumps(settings),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_statistics(paths: str | Path | list[str | Path]) -> SavedStatistics:
    """
    Read statistics files; several files (runs over disjoint calibration
    shards of one model, measured alike) merge into the statistics of one run
    over all their tokens.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("statistics_path: name at least one statistics file")
    saved = [_load_one(Path(p)) for p in paths]
    total = saved[0]
    for path, other in zip(paths[1:], saved[1:]):
        other.check_matches(total.identity, str(path))
        if other.measured != total.measured:
            raise ValueError(
                f"statistics {path} were measured {other.measured}, {paths[0]} "
                f"{total.measured}: only statistics measured alike merge"
            )
        for name, stats in other.layers.items():
            total.layers[name].merge(stats)
    return total


def _load_one(path: Path) -> SavedStatistics:
    if not path.is_file():
        raise FileNotFoundError(f"statistics_path: no file {path}")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"statistics {path} cannot be read ({error}): the file is damaged or "
            f"not a MoNE statistics file"
        ) from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a MoNE statistics file (no {FORMAT!r} header)")
    if metadata.get("version") != VERSION:
        raise ValueError(
            f"statistics {path} are format version {metadata.get('version')!r}; "
            f"this mone-modifier reads version {VERSION!r}. Calibrate again."
        )
    identity = json.loads(metadata["identity"])
    layers = {}
    for name in identity["layers"]:
        try:
            layers[name] = LayerStatistics(
                **{
                    f.name: tensors.pop(f"{name}.{f.name}")
                    for f in fields(LayerStatistics)
                }
            )
        except KeyError as missing:
            raise ValueError(
                f"statistics {path}: layer {name} lacks {missing}"
            ) from None
    if tensors:
        raise ValueError(
            f"statistics {path}: tensors of no listed layer {sorted(tensors)[:3]}"
        )
    return SavedStatistics(
        layers, identity, metadata["measured"], json.loads(metadata["settings"])
    )
