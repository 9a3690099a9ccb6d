"""
Checkpoints written the way the MoNE authors' code (github zxgx/mode-pd,
``modepd/prune.py`` with ``modepd/model/{olmoe,deepseek_v2,moonshotai}``)
writes them, built from that published layout without importing it:

- ``config.json`` as their config classes save it under their transformers
  (4.48.2, ``requirements.txt``): ``model_type`` ``<family>_compressed`` and
  no ``auto_map`` (``prune.py`` deletes it); ``architectures`` naming their
  model class (OLMoE's is ``OlmoneForCausalLM``, DeepSeek's the stock names);
  ``torch_dtype``, ``rope_theta`` and ``rope_scaling`` (DeepSeek's
  ``{"type": "yarn", ...}``) where transformers 5 writes ``dtype`` and
  ``rope_parameters``; DeepSeek's
  remote-code routing fields (``scoring_func``, ``aux_loss_alpha``,
  ``seq_aux``, ``moe_layer_freq``, ``ep_size``; V2's ``mod_type`` and
  ``staged_mod_topk``) and none of transformers 5's derived ones
  (``head_dim``, ``qk_head_dim``, ``mlp_bias``, ``rope_interleave``);
  ``approximate_experts`` and ``approximate_expert_init_tokens`` keyed by
  decoder layer (the counts are 0 unless "novice evolving" was on);
  ``routed_intermediate_sizes``, ``shared_intermediate_sizes`` (DeepSeek) and
  ``flap_intermediate_sizes`` null unless their width pruning ran;
- tensors: the per-expert names of the families' hub checkpoints, which
  their modeling code keeps (``mlp.experts.<i>.gate_proj.weight``,
  ``mlp.gate.weight``, DeepSeek's ``mlp.shared_experts.*`` and V3's
  ``mlp.gate.e_score_correction_bias``), and a novice as
  ``mlp.experts.<i>.approx_value`` (``[hidden_size]``, bfloat16:
  ``prune.py`` casts novices to bfloat16).
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
    config = authors_config(json.loads((source / "config.json").read_text()))
    config.update(
        approximate_experts={str(k): v for k, v in novices.items()},
        approximate_expert_init_tokens={
            str(k): [0] * len(v) for k, v in novices.items()
        },
    )
    config.update(config_fields)
    (out / "config.json").write_text(json.dumps(config))
    return vectors


# the rope of the DeepSeek models the authors prune (DeepSeek-V2-Lite: yarn,
# factor 40 over 4096 positions), at tiny sizes, so the fixture carries the
# remote code's ``rope_scaling`` with the yarn attention scaling
DEEPSEEK_YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=32,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=0.707,
)
SOURCE_OVERRIDES = {
    "olmoe": {},
    "deepseek_v2": dict(rope_parameters=DEEPSEEK_YARN),
    "deepseek_v3": dict(rope_parameters=DEEPSEEK_YARN),
}


# the DeepSeek remote code's fields that transformers 5's config lacks, at
# the values of DeepSeek-V2-Lite's and Moonlight's hub configs
DEEPSEEK_REMOTE_FIELDS = {
    "deepseek_v2": dict(scoring_func="softmax", mod_type=None, staged_mod_topk=2048),
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc"),
}
TRANSFORMERS_5_DERIVED = ("head_dim", "qk_head_dim", "mlp_bias", "rope_interleave")


def authors_config(stock: dict) -> dict:
    """A stock transformers 5 ``config.json`` content as the authors' config
    class of that family saves it, before any novice is recorded."""
    family = stock["model_type"]
    config = {k: v for k, v in stock.items() if k not in ("auto_map", "dtype")}
    rope = dict(config.pop("rope_parameters"))
    rope_type = rope.pop("rope_type")
    config.update(
        model_type=f"{family}_compressed",
        transformers_version="4.48.2",
        torch_dtype=stock["dtype"],
        rope_theta=rope.pop("rope_theta"),
        rope_scaling=None if rope_type == "default" else {"type": rope_type, **rope},
        routed_intermediate_sizes=None,
        flap_intermediate_sizes=None,
    )
    if family == "olmoe":
        # save_pretrained names the saving class, theirs misspelt
        config["architectures"] = ["OlmoneForCausalLM"]
    if family in DEEPSEEK_REMOTE_FIELDS:
        for key in TRANSFORMERS_5_DERIVED:
            config.pop(key, None)
        config.update(
            aux_loss_alpha=0.001,
            seq_aux=True,
            moe_layer_freq=1,
            ep_size=1,
            shared_intermediate_sizes=None,
            **DEEPSEEK_REMOTE_FIELDS[family],
        )
    return config
