"""
Pruning a saved checkpoint from saved statistics, without loading the model:

    python -m mone_modifier.checkpoint_pruning SOURCE OUTPUT \\
        --statistics stats.safetensors --sparsity 0.25 [--scope model] \\
        [--authors-layout ...]

The experts are chosen exactly as ``MoNEPruningModifier(statistics_path=...)``
chooses them (same settings, same checks). The checkpoint is then copied
shard by shard: a pruned expert's tensors are left out, its novice vector
(``<experts>.<id>.approx_value``) is written into the shard that held it,
every other tensor is copied as stored (quantized ones included), and
``config.json`` records the novices. Memory holds one shard at a time.

This needs the checkpoint to store experts one by one, as
``gate_proj``/``up_proj``/``down_proj`` (the Hub layout of OLMoE, Qwen-MoE
and DeepSeek), which is how a pruned checkpoint stores its retained experts.
A checkpoint that stores a layer's experts fused (GPT-OSS) or under other
names (Mixtral's ``w1``/``w2``/``w3``) is refused before anything is
written: prune it through ``oneshot`` with ``statistics_path``, which
handles every family.

The output is written beside its target and moved in at the end, as a
pruned model's ``save_pretrained`` does.
"""

import argparse
import json
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import init_empty_weights
from llmcompressor.modifiers.pruning.reap.utils import (
    EXPERTS_ATTRS,
    N_GROUP_CONFIG_KEYS,
    TOP_K_GROUP_CONFIG_KEYS,
)
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping

from mone_format import NOVICE_TENSOR, expert_count, layer_index
from mone_modifier.base import MoNEPruningModifier
from mone_modifier.checkpoint import WEIGHT_FILE_SUFFIXES, publish, write_novices
from mone_modifier.novice import novice_values
from mone_modifier.report import (
    build_report,
    layer_decision,
    report_settings,
    write_report,
)
from mone_modifier.scoring import (
    check_rankable,
    expert_scores,
    plan_budget,
    select_novices,
)
from mone_modifier.statistics_file import (
    SavedStatistics,
    identity_config,
    load_statistics,
)
from mone_modifier.validation import check_authors_family
from mone_transformers.loading import config_dtype, model_class, model_names

__all__ = ["prune_checkpoint"]

INDEX_FILE = "model.safetensors.index.json"
# the per-expert projections of the linearised experts, as a pruned
# checkpoint stores its retained experts
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def prune_checkpoint(
    source: str | Path,
    output: str | Path,
    statistics: str | Path | list[str | Path],
    sparsity: float,
    *,
    scoring: str = "mone",
    scope: str = "layer",
    novice: str = "mean",
    ignore: list[str] | None = None,
    seed: int = 0,
    stock_architectures: bool = False,
    authors_layout: bool = False,
    report_path: str | None = None,
) -> dict[int, list[int]]:
    """
    Write ``source`` pruned by ``statistics`` to ``output``.

    :param source: checkpoint directory the statistics were measured on
    :param output: directory to write the pruned checkpoint to
    :param statistics: statistics file(s) saved by ``save_statistics_path``
    :param sparsity, scoring, scope, novice, ignore, seed,
        stock_architectures, authors_layout, report_path: as
        ``MoNEPruningModifier``'s
        (``novice: drop`` changes the router, so it is not offered here)
    :return: decoder layer index -> the expert ids that became novices
    """
    settings = MoNEPruningModifier(
        sparsity=sparsity,
        scoring=scoring,
        scope=scope,
        novice=novice,
        ignore=ignore or [],
        seed=seed,
        stock_architectures=stock_architectures,
        authors_layout=authors_layout,
        report_path=report_path,
        statistics_path=[str(p) for p in statistics]
        if isinstance(statistics, list)
        else str(statistics),
    )
    if settings.novice == "drop":
        raise ValueError(
            "novice: drop removes experts from the router, which this command "
            "copies as stored; use oneshot with MoNEPruningModifier(novice='drop', "
            "statistics_path=...), or a novice kind that keeps the router"
        )
    source, output = Path(source), Path(output)
    _check_paths(source, output)
    config = AutoConfig.from_pretrained(source)
    if settings.authors_layout:
        check_authors_family(config)
    saved = load_statistics(settings.statistics_path)
    saved.check_matches(
        {"model_type": config.model_type, "config": identity_config(config)},
        str(settings.statistics_path),
    )
    novices, values, report = _decide(settings, saved, config)
    shards = _shard_keys(source)
    layers = {layer_index(name): name for name in saved.identity["layers"]}
    placement = _expert_tensors(config, shards, {i: layers[i] for i in novices})
    _write(
        source,
        output,
        shards,
        novices,
        values,
        placement,
        config,
        settings,
    )
    if settings.report_path is not None:
        write_report(settings.report_path, report)
    return novices


def _check_paths(source: Path, output: Path):
    if not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"prune_checkpoint: {source} is not a checkpoint directory (no config.json)"
        )
    if not list(source.glob("*.safetensors")):
        raise ValueError(
            f"prune_checkpoint: {source} has no .safetensors files; this "
            f"command reads safetensors checkpoints"
        )
    if output.resolve() == source.resolve():
        raise ValueError(
            f"prune_checkpoint: output {output} is the source checkpoint; pass "
            f"another output directory"
        )


def _decide(
    settings: MoNEPruningModifier, saved: SavedStatistics, config: PretrainedConfig
) -> tuple[dict[int, list[int]], dict[int, dict[int, torch.Tensor]], dict]:
    """The modifier's decision on saved statistics: each layer's novices,
    their vectors, and the report of it."""
    names = [
        name
        for name in saved.identity["layers"]
        if not any(re.search(pattern, name) for pattern in settings.ignore)
    ]
    if not names:
        raise ValueError(
            f"ignore={settings.ignore} matches every MoE layer of the statistics "
            f"({saved.identity['layers'][0]}, ...): nothing would be pruned"
        )
    text = config.get_text_config()
    budget = plan_budget(
        settings.sparsity,
        saved.identity["num_experts"],
        saved.identity["top_k"],
        _config_value(text, N_GROUP_CONFIG_KEYS),
        _config_value(text, TOP_K_GROUP_CONFIG_KEYS),
        drop=False,
    )
    layers = {layer_index(name): name for name in names}
    stats = {index: saved.layers[name] for index, name in layers.items()}
    for index, name in layers.items():
        check_rankable(name, index, stats[index])
    scores = {
        index: expert_scores(s, settings.scoring, settings.seed, index)
        for index, s in stats.items()
    }
    novices = select_novices(
        scores,
        {index: s.is_routed for index, s in stats.items()},
        budget,
        model_wide=settings.scope == "model",
    )
    values = {
        index: novice_values(stats[index], ids, settings.novice)
        for index, ids in novices.items()
    }
    decisions = [
        layer_decision(name, index, stats[index], scores[index], novices[index])
        for index, name in layers.items()
    ]
    report = build_report(
        report_settings(
            settings.decision_settings(),
            saved.identity["num_experts"],
            saved.identity["top_k"],
            budget.per_layer,
        ),
        decisions,
    )
    return novices, values, report


def _config_value(config: PretrainedConfig, keys: list[str]):
    return next((getattr(config, k) for k in keys if hasattr(config, k)), None)


def _shard_keys(source: Path) -> dict[str, list[str]]:
    """Shard file name -> its tensor names (read from the headers only)."""
    shards = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            shards[file.name] = list(f.keys())
    return shards


def _expert_tensors(
    config: PretrainedConfig, shards: dict[str, list[str]], layers: dict[int, str]
) -> dict[tuple[int, int], list[tuple[str, str]]]:
    """
    ``(layer index, expert id)`` -> its tensors as ``(shard, name)``, found by
    the model names transformers' load-time renames give them (a model built
    on the meta device supplies the names, allocating nothing).

    :param layers: decoder layer index -> MoE block name, of the layers pruned
    """
    with init_empty_weights():
        model = model_class(config).from_config(config)
    keys = [(shard, key) for shard, names in shards.items() for key in names]
    renamed = model_names(
        model, get_model_conversion_mapping(model), [key for _, key in keys]
    )
    experts = "|".join(map(re.escape, EXPERTS_ATTRS))
    found: dict[tuple[int, int], list[tuple[str, str]]] = defaultdict(list)
    num_experts = expert_count(config.get_text_config())
    for index, block in layers.items():
        prefix = rf"{re.escape(block)}\.(?:{experts})\."
        per_expert = re.compile(rf"{prefix}(\d+)\.({'|'.join(PROJECTIONS)})\..+")
        for shard, key in keys:
            if match := per_expert.fullmatch(renamed[key]):
                found[index, int(match.group(1))].append((shard, key))
        if any((index, expert) not in found for expert in range(num_experts)):
            stored = [k for _, k in keys if re.match(prefix, renamed[k])]
            raise ValueError(
                f"layer {index} ({block}): the checkpoint does not store its "
                f"{num_experts} experts one by one as {'/'.join(PROJECTIONS)} "
                f"(its expert tensors: {stored[:3]}), the layout a pruned "
                f"checkpoint keeps its retained experts in. Prune it through "
                f"oneshot with MoNEPruningModifier(statistics_path=...) instead."
            )
    return found


def _write(
    source: Path,
    output: Path,
    shards: dict[str, list[str]],
    novices: dict[int, list[int]],
    values: dict[int, dict[int, torch.Tensor]],
    placement: dict[tuple[int, int], list[tuple[str, str]]],
    config: PretrainedConfig,
    settings: MoNEPruningModifier,
):
    """Copy ``source`` to ``output`` shard by shard, pruned experts left out
    and their novices added, through a staging directory; ``config.json``
    written as ``settings`` ask."""
    dropped = {
        key
        for index, ids in novices.items()
        for e in ids
        for _, key in placement[index, e]
    }
    dtype = config_dtype(config.get_text_config())
    added: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for index, ids in novices.items():
        for expert in ids:
            shard, key = placement[index, expert][0]
            prefix = re.match(rf"(.*\.{expert}\.)", key).group(1)
            added[shard][prefix + NOVICE_TENSOR] = values[index][expert].to(dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-")
    )
    try:
        weight_map = {}
        for shard, keys in tqdm(shards.items(), desc="Pruning checkpoint shards"):
            with safe_open(source / shard, "pt") as f:
                tensors = {k: f.get_tensor(k) for k in keys if k not in dropped}
                metadata = f.metadata()
            tensors.update(added[shard])
            save_file(tensors, staging / shard, metadata=metadata)
            weight_map.update(dict.fromkeys(tensors, shard))
            del tensors
        for file in source.iterdir():
            if file.is_file() and not file.name.endswith(WEIGHT_FILE_SUFFIXES):
                shutil.copy2(file, staging / file.name)
        if (source / INDEX_FILE).is_file():
            _write_index(source / INDEX_FILE, staging, weight_map)
        write_novices(
            staging, novices, settings.stock_architectures, settings.authors_layout
        )
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"MoNE checkpoint written to {output}")


def _write_index(source_index: Path, staging: Path, weight_map: dict[str, str]):
    index = json.loads(source_index.read_text())
    index["weight_map"] = dict(sorted(weight_map.items()))
    index.get("metadata", {}).pop("total_size", None)
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description="Prune a checkpoint from saved MoNE statistics, shard by shard."
    )
    parser.add_argument("source", type=Path, help="checkpoint directory")
    parser.add_argument("output", type=Path, help="directory for the pruned one")
    parser.add_argument(
        "--statistics",
        nargs="+",
        required=True,
        help="statistics file(s) saved by save_statistics_path (merged)",
    )
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--scoring", default="mone")
    parser.add_argument("--scope", default="layer")
    parser.add_argument("--novice", default="mean")
    parser.add_argument("--ignore", nargs="*", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stock-architectures", action="store_true")
    parser.add_argument(
        "--authors-layout",
        action="store_true",
        help="write the config the MoNE authors' code reads (OLMoE, DeepSeek)",
    )
    parser.add_argument("--report", help="path of a .json pruning report")
    args = parser.parse_args(argv)
    novices = prune_checkpoint(
        args.source,
        args.output,
        args.statistics,
        args.sparsity,
        scoring=args.scoring,
        scope=args.scope,
        novice=args.novice,
        ignore=args.ignore,
        seed=args.seed,
        stock_architectures=args.stock_architectures,
        authors_layout=args.authors_layout,
        report_path=args.report,
    )
    print(json.dumps({str(k): v for k, v in sorted(novices.items())}))


if __name__ == "__main__":
    main()
