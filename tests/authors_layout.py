"""
Checkpoints written the way the MoNE authors' code (github zxgx/mode-pd,
``modepd/prune.py`` with ``modepd/model/olmoe``) writes them, built from that
published layout without importing it:

- ``config.json``: ``model_type`` ``<family>_compressed`` and no ``auto_map``
  (``prune.py`` deletes it), ``approximate_experts`` and
  ``approximate_expert_init_tokens`` keyed by decoder layer (the counts are 0
  unless "novice evolving" was on), ``routed_intermediate_sizes`` and
  ``flap_intermediate_sizes`` null unless their width pruning ran;
- tensors: the stock per-expert names (``mlp.experts.<i>.gate_proj.weight``,
  ``mlp.gate.weight``, DeepSeek's ``mlp.shared_experts.*``; the DeepSeek
  fields are transformers' config's here, their remote code's may differ),
  and a novice as ``mlp.experts.<i>.approx_value``
  (``[hidden_size]``, bfloat16: ``prune.py`` casts novices to bfloat16).
"""

import json

import torch
from safetensors.torch import load_file, save_file

# novices of the first and second MoE layer
NOVICE_IDS = ([1, 4], [0, 6, 7])


def moe_layers(tensors: dict) -> list[int]:
    return sorted(
        {int(key.split(".")[2]) for key in tensors if ".mlp.experts.0." in key}
    )


def authors_checkpoint(source, out, **config_fields):
    """``source`` (a stock checkpoint of a family the authors prune) pruned
    in their layout, with random novice vectors; returns them by layer and
    expert."""
    out.mkdir()
    tensors = load_file(source / "model.safetensors")
    novices = dict(zip(moe_layers(tensors), NOVICE_IDS))
    generator = torch.Generator().manual_seed(0)
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    vectors = {}
    for layer, ids in novices.items():
        for expert in ids:
            prefix = f"model.layers.{layer}.mlp.experts.{expert}"
            for projection in ("gate_proj", "up_proj", "down_proj"):
                del tensors[f"{prefix}.{projection}.weight"]
            vector = torch.randn(hidden, generator=generator).bfloat16()
            tensors[f"{prefix}.approx_value"] = vector
            vectors[layer, expert] = vector
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.pop("auto_map", None)
    config.update(
        model_type=f"{config['model_type']}_compressed",
        approximate_experts={str(k): v for k, v in novices.items()},
        approximate_expert_init_tokens={
            str(k): [0] * len(v) for k, v in novices.items()
        },
        routed_intermediate_sizes=None,
        flap_intermediate_sizes=None,
    )
    config.update(config_fields)
    (out / "config.json").write_text(json.dumps(config))
    return vectors
