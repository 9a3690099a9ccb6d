"""
Tiny models of every MoE family transformers ships, built from each family's
own config class: its defaults, shrunk to a few layers of small width with 8
routed experts, top-2, keeping the family's structure (dense first layers,
shared experts, routing groups, hybrid attention / state-space layers). Every
Linear's input width is a multiple of 128, so W4A16 (groups of 128) can
quantize it.

``python tests/family_configs.py`` prints the MoE model types of the installed
transformers (``moe_model_types``).
"""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from mone_format import EXPERT_COUNT_KEYS, expert_count
from mone_modifier.tiny_moe import distinguish_experts, randomize, tiny_tokenizer

__all__ = [
    "auto_class",
    "build_family_model",
    "example_checkpoint",
    "moe_model_types",
    "tiny_family_config",
]


def auto_class(model_type: str):
    """The auto class oneshot users load ``model_type`` with."""
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    raise ValueError(f"{model_type} is neither a causal nor an image-text-to-text LM")


def example_checkpoint(model_type: str) -> str | None:
    """The checkpoint transformers' config documentation names for the family."""
    found = re.search(
        r"\[([\w.-]+/[\w.-]+)\]\(https://huggingface\.co/",
        CONFIG_MAPPING[model_type].__doc__ or "",
    )
    return found.group(1) if found else None


def moe_model_types() -> list[str]:
    """Every model type whose default (text) config declares more than one
    routed expert. Run in a child process without network access: some
    configs' defaults look up sub-configs on the Hub."""
    result = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(result.stdout.splitlines()[-1])


def _scan_moe_model_types() -> list[str]:
    found = []
    for model_type in CONFIG_MAPPING:
        try:
            count = expert_count(CONFIG_MAPPING[model_type]().get_text_config())
        except Exception:  # configs that need arguments or the Hub: not MoE LMs
            continue
        if count > 1:
            found.append(model_type)
    return found


def build_family_model(model_type: str, path: Path) -> Path:
    """Save a tiny ``model_type`` model with random weights, distinguishable
    experts where llm-compressor can linearise them, and a tokenizer to
    ``path``."""
    torch.manual_seed(0)
    model = auto_class(model_type).from_config(tiny_family_config(model_type))
    randomize(model)
    try:
        distinguish_experts(model)
    except (AttributeError, TypeError):
        # llm-compressor 0.14 fails to linearise this family's experts (Llama
        # 4, ERNIE-4.5-VL); the walk expects oneshot to refuse it, and the
        # model is saved with plain random experts
        pass
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


LAYERS = 3
EXPERTS = (*EXPERT_COUNT_KEYS, "num_routed_experts", "n_experts")
TOPK = (
    "num_experts_per_tok",
    "top_k",
    "moe_k",
    "num_experts_per_token",
    "moe_topk",
    "num_selected_experts",
    "moe_top_k",
)
TEXT = dict(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=128,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    shared_intermediate_size=128,
    ffn_hidden_size=128,
    expert_ffn_hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    kv_lora_rank=128,
    q_lora_rank=128,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=32,
    sliding_window=64,
    n_group=2,
    topk_group=1,
    # sparse-attention indexer (DeepSeek-V3.2 style): head dim must exceed the rope dim
    index_head_dim=32,
    index_n_heads=4,
    index_topk=4,
    # linear attention / mamba
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_head_dim=32,
    linear_num_heads=4,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=32,
    sliding_window_size=64,
    o_lora_rank=128,
    hc_lowrank=128,
    ple_embed_dim=128,
    mamba_num_heads=8,
    mamba_head_dim=32,
    ssm_state_size=16,
    moe_shared_expert_intermediate_size=128,
    mamba_n_heads=8,
    mamba_d_head=32,
    mamba_d_state=16,
    mamba_chunk_size=32,
    mamba_dt_rank=128,
)
VISION = dict(
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=1,
    depth=1,
    num_layers=1,
    num_attention_heads=2,
    num_heads=2,
    out_hidden_size=128,
    embed_dim=128,
    image_size=32,
    patch_size=8,
    num_channels=3,
    n_layers=1,
    mlp_dim=128,
    # towers that derive their MLP width from it on load (Step3p7)
    mlp_ratio=1.0,
    vocab_size=96,
    max_position_embeddings=256,
    # audio towers (Whisper-style encoders, mel-token embeddings)
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=128,
    d_model=128,
    downsample_hidden_size=32,
    mel_vocab_size=16,
    projection_intermediate_size=128,
)
# top-level (multimodal wrapper) keys
TOP = dict(projector_hidden_size=128)
# keys whose value None means "feature off": never switch them on
KEEP_NONE = ("q_lora_rank", "kv_lora_rank", "index_topk")
GROUP_KEYS = ("n_group", "topk_group", "num_expert_group")
# non pad/bos/eos special tokens get ids 90..95 (random test ids 0..89 stay clear)
SPECIAL_BASE = 90
DEFAULT_TOKENS = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3}

# MoE families whose default config is dense (Gemma 4) or whose fields the
# generic shrinking does not know (DBRX's nested attention / FFN configs)
BY_HAND = {
    "dbrx": dict(
        d_model=128,
        n_heads=4,
        n_layers=3,
        max_seq_len=256,
        vocab_size=96,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(
            ffn_hidden_size=128, moe_num_experts=8, moe_top_k=2, hidden_size=128
        ),
        **DEFAULT_TOKENS,
    ),
    "gemma4_text": dict(
        vocab_size=96,
        vocab_size_per_layer_input=96,
        hidden_size=128,
        hidden_size_per_layer_input=128,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=128,
        **DEFAULT_TOKENS,
    ),
}

# Per-family overrides (text-config keys; "vision": vision_config keys; "top": top-level
# config keys)
FAMILY_OVERRIDES = {
    # its config accepts top-1 routing only
    "zaya": dict(num_experts_per_tok=1),
    # low-rank widths that W4A16's groups of 128 must divide
    "axk2": dict(gated_norm_rank=128),
    "deepseek_v4": dict(o_groups=1),
    "kimi_linear": dict(linear_head_dim=128),
    "glm5_next_text": dict(
        linear_head_dim=128, index_kpool=4, qk_rope_head_dim=0, qk_nope_head_dim=32
    ),
    # hybrid models whose default layer pattern is not expressed as a per-layer list
    "jamba": dict(
        attn_layer_period=3,
        attn_layer_offset=1,
        expert_layer_period=1,
        expert_layer_offset=0,
    ),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"]),
    # a decoder layer holds 2 attention sublayers (num_hidden_layers = 2 * num_layers)
    # and one MoE
    # whose router also picks among "zero" (identity) experts: keep their 1:2 ratio to
    # routed ones
    "longcat_flash": dict(num_layers=3, num_hidden_layers=6, zero_expert_num=4),
    # SAM ViT + Qwen2 encoder tower: SAM's neck output (downsample_channels[-1]) feeds
    # the encoder
    "deepseek_ocr2": dict(
        vision=dict(
            sam_config=dict(
                image_size=64,
                patch_size=16,
                window_size=2,
                global_attn_indexes=[0],
                output_channels=32,
                downsample_channels=[32, 64],
            ),
        )
    ),
    # one mixer per block (mamba | attention | moe | mlp), so 4 blocks to hold mamba +
    # attention + 2 MoE
    "nemotron_h": dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
        n_groups=2,
        chunk_size=32,
    ),
    # QSA indexer fields default to None (set by checkpoints)
    "qwen4_exp_text": dict(
        indexer_n_heads=4,
        indexer_kv_heads=1,
        indexer_head_dim=32,
        indexer_budget=4,
        indexer_compress_ratio=2,
    ),
    # mrope_section is not in the config; the modeling default [8, 12, 12] covers
    # head_dim 128 * 0.5
    "glm4v_moe": dict(
        rope_parameters={
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
        }
    ),
    # modeling default [22, 22, 20] covers head_dim 128
    "ernie4_5_vl_moe": dict(
        rope_parameters={
            "rope_theta": 500000.0,
            "rope_type": "default",
            "mrope_section": [6, 6, 4],
        },
        # 3 x 16 x 16 patch values: a width W4A16's groups of 128 divide
        vision=dict(patch_size=16),
    ),
}


def _compress(values, n):
    """A length-n per-layer list keeping the family's pattern: collapse runs
    (so every distinct value and the order of kinds survive), pad with the
    last value."""
    runs = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    out = runs[:n]
    while len(out) < n:
        out.append(out[-1])
    return out


def _scale_sections(sections, target):
    total = sum(sections)
    out = [max(1, int(s * target / total)) for s in sections]
    out[-1] += target - sum(out)
    return out


def shrink(config: PretrainedConfig, values: dict, layers: int | None):
    d = config.to_dict()
    heads = d.get("num_attention_heads")
    mha = isinstance(heads, int) and d.get("num_key_value_heads") == heads
    old_hd = d.get("head_dim") or (
        d["hidden_size"] // heads if d.get("hidden_size") and heads else None
    )
    for k, v in values.items():
        if k not in d or isinstance(d[k], dict):
            continue
        if k in GROUP_KEYS and not (isinstance(d[k], int) and d[k] > 1):
            continue
        if d[k] is None and k in KEEP_NONE:
            continue
        if (
            isinstance(d[k], list)
            and all(isinstance(x, int) for x in d[k])
            and isinstance(v, int)
        ):
            v = [v] * len(d[k])  # e.g. ernie4_5_vl moe_intermediate_size [text, vision]
        setattr(config, k, v)
    if mha and "num_key_value_heads" in d:
        config.num_key_value_heads = config.num_attention_heads
    has_experts = False
    for k in EXPERTS:
        if isinstance(d.get(k), int) and d[k] > 1:
            setattr(config, k, 8)
            has_experts = True
    for k in TOPK:
        if k in d and (
            (isinstance(d[k], int) and d[k] >= 1) or (d[k] is None and has_experts)
        ):
            setattr(config, k, 2)
    if layers is not None and "num_hidden_layers" in d:
        old = d["num_hidden_layers"]
        config.num_hidden_layers = layers
        for k, v in d.items():
            if isinstance(v, list) and len(v) == old and k not in ("architectures",):
                setattr(config, k, _compress(v, layers))
        for k in ("first_k_dense_replace", "num_dense_layers", "first_k_dense"):
            if isinstance(d.get(k), int) and d[k] > 0:
                setattr(config, k, 1)
        if "mlp_only_layers" in d:
            config.mlp_only_layers = []
        if "decoder_sparse_step" in d:
            config.decoder_sparse_step = 1
        # per-layer MLP kinds left to the checkpoint: dense first layer, MoE after
        # (DeepSeek layout)
        if "mlp_layer_types" in d and d["mlp_layer_types"] is None and has_experts:
            config.mlp_layer_types = ["dense"] + ["sparse"] * (layers - 1)
        # hybrid models: at least one full-attention layer among the few kept
        lt = getattr(config, "layer_types", None)
        if (
            "layer_types" in d
            and isinstance(lt, list)
            and lt
            and all(t in ("linear_attention", "mamba", "conv") for t in lt)
        ):
            lt = list(lt)
            lt[len(lt) // 2] = "full_attention"
            config.layer_types = lt
    # MLA: keep the derived head dims consistent with the shrunk nope/rope dims
    if "qk_rope_head_dim" in d and "qk_nope_head_dim" in d:
        rope, nope = config.qk_rope_head_dim, config.qk_nope_head_dim
        if "qk_head_dim" in d:
            config.qk_head_dim = rope + nope
        if "head_dim" in d:
            if d["head_dim"] == d["qk_rope_head_dim"] + d["qk_nope_head_dim"]:
                config.head_dim = rope + nope
            else:
                config.head_dim = rope
    # multimodal rope: the sections cover head_dim/2 (times partial rotary), scale them
    new_hd = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
        if "hidden_size" in d and heads
        else None
    )
    for key in ("rope_parameters", "rope_scaling"):
        rp = getattr(config, key, None)
        if (
            isinstance(rp, dict)
            and isinstance(rp.get("mrope_section"), list)
            and old_hd
            and new_hd
        ):
            rp = dict(rp)
            sec = rp["mrope_section"]
            rp["mrope_section"] = _scale_sections(sec, sum(sec) * new_hd // old_hd)
            setattr(config, key, rp)
    return config


def _fix_token_ids(
    cfg: PretrainedConfig, vocab: int, remap: dict[int, int], free: list[int]
):
    """Every *_token_id / *_token_index inside the tiny vocab: pad/bos/eos -> 1/2/3
    (when out of range), other special tokens -> distinct ids taken from
    ``free`` (90..95), the same id for the same original id (``remap``)."""
    for k, v in cfg.to_dict().items():
        if not (
            k.endswith("_token_id")
            or k.endswith("_token_index")
            or k.endswith("_token_ids")
        ):
            continue
        if k in DEFAULT_TOKENS:
            if isinstance(v, int) and v >= vocab:
                setattr(cfg, k, DEFAULT_TOKENS[k])
            elif isinstance(v, list):
                setattr(cfg, k, [x if x < vocab else DEFAULT_TOKENS[k] for x in v])
        elif isinstance(v, int) and not isinstance(v, bool):
            if v not in remap:
                remap[v] = free.pop(0) if free else vocab - 1
            setattr(cfg, k, remap[v])


def _subconfigs(config):
    out = [config]
    for k, v in vars(config).items():
        if isinstance(v, PretrainedConfig):
            out += _subconfigs(v)
    return out


def _shrink_tower(cfg: PretrainedConfig, text_hidden: int):
    """Vision/audio tower: 1 layer, tiny widths, recursively through nested
    sub-configs."""
    shrink(cfg, VISION, 1)
    d = cfg.to_dict()
    # the tower's output is projected to the text width
    for k in ("text_hidden_size", "output_dim"):
        if isinstance(d.get(k), int):
            setattr(cfg, k, text_hidden)
    for v in list(vars(cfg).values()):
        if isinstance(v, PretrainedConfig):
            _shrink_tower(v, text_hidden)


def _apply(cfg: PretrainedConfig, over: dict):
    for k, v in over.items():
        sub = getattr(cfg, k, None)
        if isinstance(v, dict) and isinstance(sub, PretrainedConfig):
            _apply(sub, v)
        else:
            setattr(cfg, k, v)


def tiny_family_config(model_type: str) -> PretrainedConfig:
    """A tiny config of ``model_type`` (see the module docstring)."""
    if model_type in BY_HAND:
        return AutoConfig.for_model(model_type, **BY_HAND[model_type])
    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    fam = copy.deepcopy(
        FAMILY_OVERRIDES.get(model_type) or FAMILY_OVERRIDES.get(text.model_type) or {}
    )
    vis_over = fam.pop("vision", {})
    top_over = fam.pop("top", {})
    shrink(text, TEXT, LAYERS)
    for k, v in fam.items():
        setattr(text, k, v)
    for key in ("vision_config", "audio_config"):
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig):
            _shrink_tower(sub, text.hidden_size)
            if key == "vision_config":
                _apply(sub, vis_over)
    d = config.to_dict()
    if config is not text:
        for k, v in TOP.items():
            if isinstance(d.get(k), int):
                setattr(config, k, v)
        # derived: text hidden size times the spatial merge window (MiniMax-M3-VL)
        merge = getattr(
            getattr(config, "vision_config", None), "spatial_merge_size", None
        )
        if isinstance(d.get("merged_hidden_size"), int) and isinstance(merge, int):
            config.merged_hidden_size = text.hidden_size * merge**2
    for k, v in top_over.items():
        setattr(config, k, v)
    if config is not text and "vocab_size" in config.to_dict():
        config.vocab_size = text.vocab_size
    remap, free = {}, list(range(SPECIAL_BASE, text.vocab_size))
    for c in _subconfigs(config):
        _fix_token_ids(c, text.vocab_size, remap, free)
    return config


if __name__ == "__main__":
    print(json.dumps(_scan_moe_model_types()))
