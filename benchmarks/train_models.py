"""
The benchmark's own small MoE language models, trained here on real text.

    python benchmarks/train_models.py [--quick] [--cache DIR] [--models NAME ...]

A byte-level BPE tokenizer is trained on the training split of the code and
prose domains, then two models with architectures llm-compressor handles:

- ``olmoe``: OLMoE-style, softmax top-k routing, with its router auxiliary
  (load-balancing) loss;
- ``deepseek``: DeepSeek-V3-style, sigmoid group-limited routing with a
  shared expert and a dense first layer, balanced the DeepSeek-V3 way (the
  router's correction bias moves towards under-used experts after each step,
  no auxiliary loss);
- ``olmoe64``: ``olmoe`` at the MoNE paper's granularity, OLMoE-1B-7B's 64
  routed experts and top-8, each a quarter of ``olmoe``'s width, so the
  total expert parameters are the same and it trains in about the same time.

Training is deterministic (fixed seeds, fixed step count, one data order) and
cached under a hash of everything that shapes the model, so later runs reuse
it. Each model's held-out perplexity per domain is reported next to a unigram
baseline, so a reader can see it learned.
"""

import argparse
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from data import DOMAINS, load_domain
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mone_modifier.tiny_moe import train_tokenizer

# outside the work tree, like the Hugging Face cache, so a fresh checkout on
# the same machine reuses trained models
CACHE = Path(os.environ.get("MONE_BENCHMARK_CACHE", "~/.cache/mone-modifier-benchmark"))
CACHE = CACHE.expanduser()
# bump when the training procedure changes, so cached models are rebuilt
PROCEDURE = 1


@dataclass(frozen=True)
class Training:
    """How one model is trained; all of it goes into the cache key."""

    architecture: str
    config: dict
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    seed: int = 0
    bias_update: float = 0.0  # DeepSeek-V3's correction-bias step size


@dataclass(frozen=True)
class Setup:
    vocab_size: int
    models: dict[str, Training] = field(default_factory=dict)


def full_setup() -> Setup:
    vocab = 4096
    common = dict(
        vocab_size=vocab,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        num_experts_per_tok=4,
        # the tokenizer's special tokens: <unk> 0, <eos> 1
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=1,
    )
    olmoe = dict(
        common,
        num_hidden_layers=4,
        num_experts=16,
        intermediate_size=256,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    olmoe64 = dict(olmoe, num_experts=64, num_experts_per_tok=8, intermediate_size=64)
    deepseek = dict(
        common,
        num_hidden_layers=5,
        first_k_dense_replace=1,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        moe_intermediate_size=256,
        intermediate_size=512,
        routed_scaling_factor=1.0,
        kv_lora_rank=128,  # W4A16 groups of 128 need in_features % 128 == 0
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=48,
        v_head_dim=64,
        head_dim=16,
    )
    return Setup(
        vocab,
        {
            "olmoe": Training("olmoe", olmoe, 700, 16, 256, 2e-3),
            "deepseek": Training(
                "deepseek_v3", deepseek, 700, 16, 256, 2e-3, bias_update=1e-3
            ),
            "olmoe64": Training("olmoe", olmoe64, 700, 16, 256, 2e-3),
        },
    )


def quick_setup() -> Setup:
    """Tiny models, a few steps: checks the pipeline, learns little. The
    fine-grained ``olmoe64`` would shrink to the quick ``olmoe``: left out."""
    full = full_setup()
    del full.models["olmoe64"]
    shrink = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=64
    )
    models_ = {}
    for name, training in full.models.items():
        config = {**training.config, **shrink}
        if training.architecture == "deepseek_v3":
            config.update(
                num_hidden_layers=3,
                n_routed_experts=8,
                n_group=2,
                topk_group=1,
                num_experts_per_tok=2,
                moe_intermediate_size=64,
                kv_lora_rank=64,
                v_head_dim=16,
                qk_nope_head_dim=16,
            )
        else:
            config.update(num_experts=8, num_experts_per_tok=2)
        models_[name] = Training(
            training.architecture,
            config,
            30,
            8,
            64,
            3e-3,
            bias_update=training.bias_update,
        )
    return Setup(512, models_)


def select(setup: Setup, names: list[str] | None) -> Setup:
    """``setup`` with only the models ``names`` (all when None)."""
    if names is None:
        return setup
    if unknown := sorted(set(names) - set(setup.models)):
        raise SystemExit(f"--models: no model {unknown}; models: {list(setup.models)}")
    return Setup(setup.vocab_size, {n: setup.models[n] for n in names})


def models_suffix(names: list[str] | None) -> str:
    """The file-name suffix of a run restricted to ``names``."""
    return "".join(f"_{name}" for name in names or [])


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents, each followed by <eos>, as one long token sequence."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for batch_start in range(0, len(texts), 256):
        for encoded in tokenizer(texts[batch_start : batch_start + 256]).input_ids:
            ids += encoded + [eos]
    return torch.tensor(ids, dtype=torch.long)


def train(training: Training, stream: torch.Tensor, out: Path) -> dict:
    torch.manual_seed(training.seed)
    config = AutoConfig.for_model(training.architecture, **training.config)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=0.1)
    warmup = max(1, training.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * step / training.steps))
        ),
    )
    generator = torch.Generator().manual_seed(training.seed)
    loads = _expert_loads(model) if training.bias_update else None
    model.train()
    losses = []
    start = time.time()
    for step in range(training.steps):
        offsets = torch.randint(
            0,
            len(stream) - training.seq_len - 1,
            (training.batch_size,),
            generator=generator,
        )
        batch = torch.stack([stream[o : o + training.seq_len] for o in offsets])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if loads is not None:
            _balance(loads, training.bias_update)
        losses.append(loss.item())
        if step % 50 == 0 or step == training.steps - 1:
            elapsed = time.time() - start
            print(f"  step {step:4d}  loss {loss.item():.3f}  ({elapsed:.0f} s)")
    model.eval()
    model.config.output_router_logits = False
    model.save_pretrained(out)
    return {
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": time.time() - start,
    }


def _expert_loads(model) -> dict:
    """Router -> running count of its top-k picks in the current step."""
    loads = {}
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            loads[module] = torch.zeros_like(module.e_score_correction_bias)

            def count(router, args, output):
                loads[router] += torch.bincount(
                    output[2].reshape(-1), minlength=loads[router].numel()
                ).to(loads[router].dtype)

            module.register_forward_hook(count)
    return loads


@torch.no_grad()
def _balance(loads: dict, step_size: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the selection bias
    of under-loaded experts, lower it for over-loaded ones."""
    for router, load in loads.items():
        router.e_score_correction_bias += step_size * torch.sign(load.mean() - load)
        load.zero_()


@torch.no_grad()
def perplexity(
    model, stream: torch.Tensor, seq_len: int, max_windows: int = 64
) -> float:
    windows = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[
        :max_windows
    ]
    total, count = 0.0, 0
    for window in windows.split(8):
        logits = model(input_ids=window).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            window[:, 1:].reshape(-1),
            reduction="sum",
        )
        total += float(nll)
        count += window[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(
    train: torch.Tensor, held_out: torch.Tensor, vocab: int
) -> float:
    counts = Counter(train.tolist())
    total = len(train) + vocab  # add-one smoothing
    log_p = sum(math.log((counts[t] + 1) / total) for t in held_out.tolist())
    return math.exp(-log_p / len(held_out))


def build(setup: Setup, cache: Path = CACHE) -> dict[str, Path]:
    """Train (or reuse) the tokenizer and every model; return the models' paths
    (each holds the model, the shared tokenizer and metrics.json)."""
    domains = {name: load_domain(name) for name in DOMAINS}
    train_texts = [t for d in domains.values() for t in d.documents("train")]
    fingerprint = hashlib.sha256()
    for text in train_texts:
        fingerprint.update(hashlib.sha256(text.encode()).digest())
    data_key = [PROCEDURE, setup.vocab_size, fingerprint.hexdigest()]

    tokenizer_dir = cache / f"tokenizer-{_digest(data_key)}"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer(train_texts, setup.vocab_size).save_pretrained(tokenizer_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    stream = None

    paths = {}
    for name, training in setup.models.items():
        out = cache / f"{name}-{_digest([data_key, asdict(training)])}"
        paths[name] = out
        if (out / "metrics.json").is_file():
            print(f"{name}: cached at {out}")
            continue
        print(f"{name}: training ({training.steps} steps) -> {out}")
        if stream is None:
            stream = token_stream(tokenizer, train_texts)
        metrics = train(training, stream, out)
        tokenizer.save_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        for domain_name, domain in domains.items():
            held_out = token_stream(tokenizer, domain.documents("heldout"))
            domain_train = token_stream(tokenizer, domain.documents("train"))
            metrics[domain_name] = {
                "perplexity": perplexity(model, held_out, training.seq_len),
                "unigram_perplexity": unigram_perplexity(
                    domain_train, held_out, setup.vocab_size
                ),
            }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return paths


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--models", nargs="+", help="only these models")
    args = parser.parse_args(argv)
    setup = select(quick_setup() if args.quick else full_setup(), args.models)
    paths = build(setup, args.cache)
    print("| model | domain | held-out perplexity | unigram baseline |")
    print("| --- | --- | ---: | ---: |")
    for name, path in paths.items():
        metrics = json.loads((path / "metrics.json").read_text())
        for domain in DOMAINS:
            row = metrics[domain]
            print(
                f"| {name} | {domain} | {row['perplexity']:.1f} | "
                f"{row['unigram_perplexity']:.1f} |"
            )


if __name__ == "__main__":
    main()
