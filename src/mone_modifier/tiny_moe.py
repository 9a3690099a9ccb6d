"""
Small MoE models of every supported family, built from transformers configs
with random weights and saved to disk (oneshot loads from a path): the
quickstart's default model and the tests' fixtures.

Random experts have near-zero mean outputs and near-tied scores, which would
let a wrong novice or a wrong choice hide inside the tolerance. So each
expert's up projection is made to follow its gate projection (SwiGLU of
correlated inputs is mostly positive, hence a clearly non-zero mean output)
and its down projection gets its own scale (well separated output stds).
"""

from pathlib import Path

import torch
from llmcompressor.modeling.moe.linearize import (
    get_linearized_moes,
    linearize_moe,
    repack_moe,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

FAMILIES = [
    "olmoe",
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
]
VOCAB = 96
NUM_EXPERTS = 8
TOP_K = 2

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    num_experts_per_tok=TOP_K,
)

_DEEPSEEK = dict(
    num_hidden_layers=3,
    first_k_dense_replace=1,
    n_routed_experts=NUM_EXPERTS,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    moe_intermediate_size=32,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    head_dim=8,
    num_key_value_heads=4,
)

_FAMILY = {
    "olmoe": dict(num_experts=NUM_EXPERTS),
    "qwen3_moe": dict(
        num_experts=NUM_EXPERTS,
        moe_intermediate_size=32,
        head_dim=16,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        num_experts=NUM_EXPERTS,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        layer_types=["full_attention"] * 2,
    ),
    "mixtral": dict(num_local_experts=NUM_EXPERTS),
    # sigmoid routing with correction bias, two routing groups of which one is
    # chosen per token, one dense first layer, a shared expert
    "deepseek_v3": _DEEPSEEK,
    # the same shape with DeepSeek-V2's softmax routing over the groups
    "deepseek_v2": dict(_DEEPSEEK, topk_method="group_limited_greedy"),
    "gpt_oss": dict(
        num_local_experts=NUM_EXPERTS,
        head_dim=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    ),
}


# W4A16 quantizes in groups of 128 input features: every Linear's input
# (hidden size, attention output, expert intermediate size) a multiple of 128
_DEEPSEEK_QUANTIZABLE = dict(
    hidden_size=128,
    intermediate_size=128,
    moe_intermediate_size=128,
    kv_lora_rank=128,
    v_head_dim=32,
)
_GROUP_QUANTIZABLE = {
    "olmoe": dict(hidden_size=128, intermediate_size=128),
    "qwen3_moe": dict(hidden_size=128, moe_intermediate_size=128, head_dim=32),
    "qwen2_moe": dict(
        hidden_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=128
    ),
    "mixtral": dict(hidden_size=128, intermediate_size=128),
    "deepseek_v2": _DEEPSEEK_QUANTIZABLE,
    "deepseek_v3": _DEEPSEEK_QUANTIZABLE,
    "gpt_oss": dict(hidden_size=128, intermediate_size=128, head_dim=32),
}


def group_quantizable(family: str) -> dict:
    """Config overrides that make ``family``'s tiny model W4A16-quantizable."""
    return dict(_GROUP_QUANTIZABLE[family])


def tiny_config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**_COMMON, **_FAMILY[family], **overrides})


@torch.no_grad()
def build_tiny_moe(
    family: str,
    path: Path,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **overrides,
) -> Path:
    """
    Save a tiny ``family`` model with distinguishable experts, and a tokenizer
    (a word-level one over ``w0 .. w94`` by default), to ``path``.

    :param overrides: config values to change, e.g. ``num_hidden_layers``
    """
    tokenizer = tokenizer or tiny_tokenizer()
    # the config's own defaults name ids outside the tiny vocabulary
    special = {
        f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id")
        for kind in ("bos", "eos", "pad")
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(family, **{**special, **overrides})
    )
    return save_distinguishable(model, path, tokenizer)


@torch.no_grad()
def save_distinguishable(
    model: PreTrainedModel, path: Path, tokenizer: PreTrainedTokenizerFast
) -> Path:
    """Give ``model`` random weights with distinguishable experts, and save it
    and ``tokenizer`` to ``path``."""
    randomize(model)
    distinguish_experts(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def randomize(model: PreTrainedModel):
    """Random weights of a size that keeps the tiny models' outputs in a
    useful range, and decisive, uneven routing."""
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, 0.15)
        elif "bias" in name:
            param.normal_(0.0, 0.1)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(0.0, 0.05)
    for _, module in model.named_modules():
        router = getattr(module, "gate", None) or getattr(module, "router", None)
        weight = getattr(router, "weight", None)
        if getattr(module, "experts", None) is not None and weight is not None:
            weight.mul_(3.0)


@torch.no_grad()
def distinguish_experts(model: PreTrainedModel):
    """Non-zero mean outputs (a gated expert's up projection follows its gate
    projection) and well separated output stds (each down projection gets
    its own scale), set on llm-compressor's linearised experts."""
    linearize_moe(model)
    for _, experts in get_linearized_moes(model):
        for index in range(experts.num_experts):
            expert = experts[index]
            if hasattr(expert, "gate_proj"):
                expert.up_proj.weight.copy_(
                    expert.gate_proj.weight
                    + 0.05 * torch.randn_like(expert.up_proj.weight)
                )
            expert.down_proj.weight.mul_(0.4 + 0.3 * index)
    repack_moe(model)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["[UNK]"] = VOCAB - 1
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[UNK]",
        eos_token="[UNK]",
    )


def calibration_ids(num_samples: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (num_samples, length), generator=generator)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (special tokens
    ``<unk>`` 0 and ``<eos>`` 1, which also pads)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<eos>",
    )
