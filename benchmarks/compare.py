"""
MoNE against REAP and the other criteria on the benchmark's trained MoE
models: quality, robustness, speed, memory and size, in one run.

    python benchmarks/compare.py [--quick] [--out benchmarks] [--models NAME ...]

Every method prunes the same model with the same calibration data. Quality
is measured on held-out text of each domain: perplexity, next-token top-1
accuracy, and a multiple-choice accuracy run through lm-eval (choose the
true continuation among four). Writes RESULTS.md (or RESULTS_quick.md), a
JSON of every number, and PNG plots into ``--out``; with ``--models``, only
those models, into RESULTS_<models>.md and results_<models>.json.
"""

import argparse
import functools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Every figure here is a CPU one (time on CPU threads, resident memory), and
# oneshot would move a pruned model's forward to a GPU where there is one:
# the models stay on the CPU on every machine.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch
from data import DOMAINS, load_domain
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import get_linearized_moes, linearize_moe
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning.reap.base import REAPPruningModifier
from llmcompressor.modifiers.quantization import GPTQModifier
from loguru import logger
from novice_speed import paired_speed
from pruned_checkpoints import checkpoint_bytes
from train_models import build, full_setup, models_suffix, quick_setup, select
from transformers import AutoModelForCausalLM, AutoTokenizer

from mone_modifier import MoNEPruningModifier
from mone_modifier.checkpoint import write_expert_count

SPARSITIES = (0.25, 0.5)


def method_modifiers(method: str, sparsity: float) -> list[Modifier]:
    """The pruning modifiers of one compared method."""
    if method == "reap":
        return [REAPPruningModifier(sparsity=sparsity)]
    options = {
        "mone": {},
        "mone_weighted": {"novice": "weighted_mean"},
        "frequency": {"scoring": "frequency"},
        "variance": {"scoring": "variance"},
        "mone_zero": {"novice": "zero"},
        "mone_drop": {"novice": "drop"},
    }
    if method.startswith("random_"):
        seed = int(method.split("_")[1])
        return [MoNEPruningModifier(sparsity=sparsity, scoring="random", seed=seed)]
    return [MoNEPruningModifier(sparsity=sparsity, **options[method])]


METHODS = (
    "mone",
    "mone_weighted",
    "frequency",
    "variance",
    "reap",
    "mone_zero",
    "mone_drop",
    "random_0",
    "random_1",
    "random_2",
)
ROBUSTNESS_METHODS = ("mone", "frequency", "variance", "reap")


def w4a16_group_size(config: dict) -> int:
    """The largest group of at most 128 that divides every Linear's input
    width: the hidden size and the expert widths (olmoe64's experts are 64
    wide)."""
    widths = [config["hidden_size"], config["intermediate_size"]]
    widths += (
        [config["moe_intermediate_size"]] if "moe_intermediate_size" in config else []
    )
    return math.gcd(128, *widths)


def w4a16(group: int) -> GPTQModifier:
    return GPTQModifier(
        config_groups={
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": group,
                },
            }
        },
        ignore=["lm_head"],
    )


@dataclass
class Plan:
    """What one run measures; the quick plan is a small slice of the full."""

    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    calibration_samples: int
    calibration_chars: int
    robustness_sizes: tuple[int, ...]
    robustness_methods: tuple[str, ...]
    with_w4a16: bool
    eval_windows: int
    choice_questions: int


# sized to finish in about an hour on 2 CPU cores; 500 characters (about
# 120 tokens) is the longest sample of which the prose calibration split
# holds 256
FULL = Plan(
    METHODS, SPARSITIES, 64, 500, (16, 64, 256), ROBUSTNESS_METHODS, True, 64, 120
)
# each criterion once (one random seed, no weighted-mean novices) and
# robustness at one calibration size: the full plan's length on a model whose
# every oneshot costs several times more (olmoe64, 64 experts)
CORE = Plan(
    ("mone", "frequency", "variance", "reap", "mone_zero", "mone_drop", "random_0"),
    SPARSITIES,
    64,
    500,
    (64,),
    ROBUSTNESS_METHODS,
    True,
    64,
    120,
)
PLANS = {"full": FULL, "core": CORE}
QUICK = Plan(
    ("mone", "frequency", "reap"),
    (0.25,),
    16,
    400,
    (16,),
    ("mone", "reap"),
    True,
    8,
    24,
)


# -- evaluation -------------------------------------------------------------


@torch.no_grad()
def perplexity_and_accuracy(model, windows: torch.Tensor) -> tuple[float, float]:
    nll, correct, count = 0.0, 0, 0
    for batch in windows.split(8):
        logits = model(input_ids=batch).logits[:, :-1]
        targets = batch[:, 1:]
        nll += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                reduction="sum",
            )
        )
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    return math.exp(nll / count), correct / count


def choice_task(domains: dict, directory: Path, questions: int, seed: int = 0) -> str:
    """A local lm-eval task: continue a held-out passage with its true next
    characters or one of three continuations of other passages of the same
    domain.

    Passages keep their own whitespace, since code without its newlines and
    indentation is not what the models learned. Choices are scored by mutual
    information, log P(choice | context) - log P(choice), because a small
    model's raw likelihood mostly ranks how common a continuation's words
    are, which leaves plain accuracy at chance.
    """
    rng = random.Random(seed)
    rows = []
    for domain in domains.values():
        pairs = []
        for text in domain.samples("heldout", questions // len(domains), 600, seed):
            cut = text.rfind(" ", 0, 300)
            end = text.find(" ", cut + 60)
            if cut > 0 and end > 0:
                pairs.append((text[:cut], text[cut:end]))
        for i, (context, true) in enumerate(pairs):
            others = rng.sample([c for j, (_, c) in enumerate(pairs) if j != i], 3)
            choices = [true, *others]
            rng.shuffle(choices)
            rows.append(
                {"context": context, "choices": choices, "label": choices.index(true)}
            )
    data = directory / "continuation_choice.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (directory / "continuation_choice.yaml").write_text(
        "task: continuation_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc_mutual_info\n"
    )
    return "continuation_choice"


@functools.cache
def task_manager(directory: Path):
    """lm-eval's task index, built once per run: it reads every task lm-eval
    ships, which takes longer than evaluating a quick-mode model."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(directory))


def choice_accuracy(model, tokenizer, task: str, directory: Path) -> float:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8),
        tasks=[task],
        task_manager=task_manager(directory),
        verbosity="ERROR",
    )
    return results["results"][task]["acc_mutual_info,none"]


class Evaluator:
    def __init__(self, tokenizer, domains: dict, plan: Plan, seq_len: int, work: Path):
        self.tokenizer = tokenizer
        self.windows = {}
        for name, domain in domains.items():
            text = "\n".join(domain.documents("heldout"))
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
            usable = (len(ids) // seq_len) * seq_len
            self.windows[name] = ids[:usable].view(-1, seq_len)[: plan.eval_windows]
        self.task_dir = work / "tasks"
        self.task_dir.mkdir(parents=True, exist_ok=True)
        self.task = choice_task(domains, self.task_dir, plan.choice_questions)

    def __call__(self, model, choice: bool = True) -> dict:
        """Held-out perplexity and top-1 per domain, and (unless ``choice``
        is off) the lm-eval continuation-choice accuracy."""
        model.eval()
        row = {}
        for name, windows in self.windows.items():
            ppl, top1 = perplexity_and_accuracy(model, windows)
            row[f"{name}_ppl"] = ppl
            row[f"{name}_top1"] = top1
        if choice:
            row["choice_acc"] = choice_accuracy(
                model, self.tokenizer, self.task, self.task_dir
            )
        return row


# -- runs ---------------------------------------------------------------------


def calibration_set(domains: dict, source: str, count: int, chars: int) -> Dataset:
    names = DOMAINS if source == "mixed" else (source,)
    texts = []
    for i, name in enumerate(names):
        share = count // len(names) + (1 if i < count % len(names) else 0)
        texts += domains[name].samples("calibration", share, chars, seed=0)
    return Dataset.from_dict({"text": texts})


def prune(model_path: Path, modifiers: list, dataset: Dataset, seq_len: int):
    start = time.perf_counter()
    model = oneshot(
        model=str(model_path),
        dataset=dataset,
        recipe=modifiers,
        num_calibration_samples=len(dataset),
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    return model, time.perf_counter() - start


def quality_table(model_path, evaluate, plan, domains, seq_len, group) -> list[dict]:
    rows = []
    base = AutoModelForCausalLM.from_pretrained(model_path)
    rows.append(
        {"method": "unpruned", "sparsity": 0.0, "w4a16": False, **evaluate(base)}
    )
    dataset = calibration_set(
        domains, "mixed", plan.calibration_samples, plan.calibration_chars
    )
    for sparsity in plan.sparsities:
        for method in plan.methods:
            for quantize in (False, True) if plan.with_w4a16 else (False,):
                modifiers = method_modifiers(method, sparsity)
                if quantize:
                    modifiers.append(w4a16(group))
                logger.info(f"{model_path.name}: {method} {sparsity} w4a16={quantize}")
                model, seconds = prune(model_path, modifiers, dataset, seq_len)
                rows.append(
                    {
                        "method": method,
                        "sparsity": sparsity,
                        "w4a16": quantize,
                        "oneshot_s": seconds,
                        **evaluate(model),
                    }
                )
    return rows


def robustness_table(
    model_path, evaluate, plan, domains, seq_len, base_row
) -> list[dict]:
    rows = []
    for source in ("code", "prose", "mixed"):
        for size in plan.robustness_sizes:
            dataset = calibration_set(domains, source, size, plan.calibration_chars)
            for method in plan.robustness_methods:
                model, _ = prune(
                    model_path, method_modifiers(method, 0.25), dataset, seq_len
                )
                row = evaluate(model, choice=False)
                rows.append(
                    {
                        "method": method,
                        "source": source,
                        "size": size,
                        "ppl_increase": sum(
                            row[f"{d}_ppl"] / base_row[f"{d}_ppl"] - 1 for d in DOMAINS
                        )
                        / len(DOMAINS),
                        "top1_drop": sum(
                            base_row[f"{d}_top1"] - row[f"{d}_top1"] for d in DOMAINS
                        )
                        / len(DOMAINS),
                    }
                )
    return rows


def peak_memory_run(model_path: Path, method: str, quick: bool, seq_len: int) -> dict:
    """oneshot of one method in a fresh process: wall time and peak RSS."""
    command = [sys.executable, __file__, "--oneshot-cost", str(model_path), method]
    command += ["--seq-len", str(seq_len)] + (["--quick"] if quick else [])
    output = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def oneshot_costs(
    model_path: Path, methods: tuple[str, ...], quick: bool, seq_len: int
) -> dict:
    """Per method, the median wall time and peak RSS of fresh processes,
    alternating between methods so that the machine's drifts in speed fall
    on all of them alike (one process each varied by 20% here)."""
    runs = {method: [] for method in methods}
    for _ in range(1 if quick else 3):
        for method in methods:
            runs[method].append(peak_memory_run(model_path, method, quick, seq_len))
    return {
        method: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for method, rs in runs.items()
    }


def oneshot_cost(model_path: Path, method: str, plan: "Plan", seq_len: int) -> dict:
    domains = {name: load_domain(name) for name in DOMAINS}
    data = calibration_set(
        domains, "mixed", plan.calibration_samples, plan.calibration_chars
    )
    modifiers = [NoOp()] if method == "noop" else method_modifiers(method, 0.25)
    _, seconds = prune(model_path, modifiers, data, seq_len)
    return {"oneshot_s": seconds, "peak_rss_mb": peak_rss_mb()}


def process_memory_mb(*fields: str) -> tuple[float, ...]:
    """Fields of this process's ``/proc/self/status`` (``VmRSS``, ``RssAnon``,
    ``VmHWM``, ...), in MB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    status = dict(line.split(":", 1) for line in lines)
    return tuple(int(status[field].split()[0]) / 1024 for field in fields)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not ``ru_maxrss``: Linux carries
    that over from the forked parent across exec, so a child launched by a
    large parent reports the parent's size."""
    return process_memory_mb("VmHWM")[0]


class PhaseTimer:
    """Wall seconds of named phases: ``with timer("quality"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start


class NoOp(Modifier):
    """A calibration modifier that does nothing: the pipeline's own cost."""

    requires_calibration_data: bool = True

    def on_initialize(self, state, **kwargs) -> bool:
        return True


def size_and_speed(model_path, plan, domains, seq_len, evaluate, work) -> dict:
    """Checkpoint bytes and forward throughput of each pruned model, loaded
    with mone_modifier.from_pretrained, against the unpruned model."""
    import mone_modifier

    dataset = calibration_set(
        domains, "mixed", plan.calibration_samples, plan.calibration_chars
    )
    unpruned_dir = work / f"{model_path.name}-unpruned"
    base = AutoModelForCausalLM.from_pretrained(model_path)
    linearize_moe(base)
    base.save_pretrained(unpruned_dir)
    sizes = {"unpruned": checkpoint_bytes(unpruned_dir)}
    models = {"unpruned": AutoModelForCausalLM.from_pretrained(model_path).eval()}
    for method in ("mone", "reap", "mone_drop"):
        for sparsity in plan.sparsities:
            name = f"{method}_{int(sparsity * 100)}"
            model, _ = prune(
                model_path, method_modifiers(method, sparsity), dataset, seq_len
            )
            model.save_pretrained(work / name)
            if method == "reap":
                fix_expert_count(work / name, model)
            sizes[name] = checkpoint_bytes(work / name)
            models[name] = mone_modifier.from_pretrained(work / name)
    # about 0.4 s of work per model and repeat on 2 CPU cores, so timer and
    # scheduler noise stay small against it
    windows = evaluate.windows[DOMAINS[0]][:16]
    speed = paired_speed(
        models, list(windows.split(4)), 5 if plan is QUICK else 21, warmups=1
    )
    return {
        name: {
            "bytes": size,
            "bytes_ratio": size / sizes["unpruned"],
            **speed[name],
        }
        for name, size in sizes.items()
    }


def fix_expert_count(directory: Path, model):
    """REAP's save keeps DeepSeek-V3's n_routed_experts at the unpruned count,
    so stock transformers cannot load it; write the count the experts have."""
    (count,) = {m.num_experts for _, m in get_linearized_moes(model)}
    write_expert_count(directory, count)


# -- report -------------------------------------------------------------------


def headline(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["method"] in ("unpruned", "mone", "reap", "frequency")]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; columns after the first two are right-aligned."""
    align = ["---"] * min(2, len(header)) + ["---:"] * max(0, len(header) - 2)
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def quality_lines(rows: list[dict]) -> list[str]:
    metrics = [f"{d}_ppl" for d in DOMAINS] + [f"{d}_top1" for d in DOMAINS]
    metrics.append("choice_acc")
    return md_table(
        ["method", "W4A16", "sparsity", *metrics],
        [
            [r["method"], "yes" if r["w4a16"] else "no", f"{r['sparsity']:.2f}"]
            + [f"{r[m]:.2f}" if m.endswith("ppl") else f"{r[m]:.3f}" for m in metrics]
            for r in rows
        ],
    )


def robustness_summary(rows: list[dict]) -> list[dict]:
    summary = []
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        ppl = [r["ppl_increase"] for r in mine]
        acc = [r["top1_drop"] for r in mine]
        summary.append(
            {
                "method": method,
                "ppl_increase_mean": sum(ppl) / len(ppl),
                "ppl_increase_spread": max(ppl) - min(ppl),
                "top1_drop_mean": sum(acc) / len(acc),
                "top1_drop_spread": max(acc) - min(acc),
            }
        )
    return summary


def plot(results: dict, out: Path, suffix: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model_name, result in results["models"].items():
        base = next(r for r in result["quality"] if r["method"] == "unpruned")
        fig, ax = plt.subplots(figsize=(6, 4))
        methods = sorted({r["method"] for r in result["quality"]} - {"unpruned"})
        for method in methods:
            points = sorted(
                (
                    r["sparsity"],
                    sum(r[f"{d}_ppl"] / base[f"{d}_ppl"] - 1 for d in DOMAINS)
                    / len(DOMAINS),
                )
                for r in result["quality"]
                if r["method"] == method and not r["w4a16"]
            )
            ax.plot(
                [0] + [p[0] for p in points],
                [0] + [p[1] for p in points],
                marker="o",
                label=method,
            )
        ax.set_xlabel("sparsity (fraction of routed experts replaced)")
        ax.set_ylabel("held-out perplexity increase (mean over domains)")
        ax.set_title(f"{model_name}: quality drop against sparsity")
        ax.legend(fontsize=7)
        fig.savefig(
            out / f"quality_{model_name}{suffix}.png", dpi=100, bbox_inches="tight"
        )
        plt.close(fig)

        summary = result["robustness_summary"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(
            [s["method"] for s in summary],
            [s["ppl_increase_mean"] for s in summary],
            yerr=[s["ppl_increase_spread"] / 2 for s in summary],
            capsize=4,
        )
        ax.set_ylabel("perplexity increase at 25% (mean, spread)")
        ax.set_title(f"{model_name}: robustness over calibration source x size")
        fig.savefig(
            out / f"robustness_{model_name}{suffix}.png", dpi=100, bbox_inches="tight"
        )
        plt.close(fig)


def write_report(results: dict, path: Path, suffix: str, command: str):
    questions = results["choice_questions"]
    lines = [
        f"# MoNE benchmark results{' (quick mode)' if suffix else ''}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}  ",
        f"Wall time: {results['seconds'] / 60:.1f} min",
        "",
        "Perplexity (`_ppl`) and next-token top-1 accuracy (`_top1`) are "
        "measured on held-out text of each domain. `choice_acc` is lm-eval's "
        f"`acc_mutual_info` on a local task of {questions} held-out passages: "
        "pick the true continuation among four (chance 0.25; standard error at "
        f"most {0.5 / math.sqrt(questions):.2f}).",
    ]
    for name, result in results["models"].items():
        training = result["training"]
        lines += ["", f"## {name}", "", "Held-out perplexity after training:", ""]
        lines += md_table(
            ["domain", "model", "unigram baseline"],
            [
                [d, f"{training[d]['perplexity']:.1f}"]
                + [f"{training[d]['unigram_perplexity']:.1f}"]
                for d in DOMAINS
            ],
        )
        lines += ["", "### Headline: MoNE vs REAP vs frequency", ""]
        lines += quality_lines(headline(result["quality"]))
        lines += ["", "### All methods", ""]
        lines += quality_lines(result["quality"])
        lines += ["", "### Robustness at 25% over calibration source x size", ""]
        lines += md_table(
            ["method", "ppl increase", "spread", "top-1 drop", "spread"],
            [
                [s["method"]]
                + [f"{s[k]:.3f}" for k in ("ppl_increase_mean", "ppl_increase_spread")]
                + [f"{s[k]:.3f}" for k in ("top1_drop_mean", "top1_drop_spread")]
                for s in result["robustness_summary"]
            ],
        )
        lines += [
            "",
            "### oneshot cost (median of fresh processes, alternating; same "
            "pipeline and data)",
            "",
        ]
        noop = result["cost"]["noop"]
        lines += md_table(
            ["modifier", "wall s", "vs no-op", "peak RSS MB", "vs no-op"],
            [
                [
                    m,
                    f"{c['oneshot_s']:.1f}",
                    f"{c['oneshot_s'] / noop['oneshot_s']:.2f}",
                ]
                + [f"{c['peak_rss_mb']:.0f}"]
                + [f"{c['peak_rss_mb'] / noop['peak_rss_mb']:.2f}"]
                for m, c in result["cost"].items()
            ],
        )
        lines += ["", "### Checkpoint size and forward speed against unpruned", ""]
        lines += md_table(
            ["checkpoint", "bytes ratio", "speed ratio", "speed IQR"],
            [
                [m, f"{s['bytes_ratio']:.3f}", f"{s['speed_ratio']:.2f}"]
                + ["{:.2f}-{:.2f}".format(*s["speed_ratio_iqr"])]
                for m, s in result["size_speed"].items()
            ],
        )
        lines += ["", f"![quality](quality_{name}{suffix}.png)"]
        lines += [f"![robustness](robustness_{name}{suffix}.png)"]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, few cases (CI)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument(
        "--oneshot-cost", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS
    )
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", help="only these models")
    parser.add_argument(
        "--plan",
        choices=list(PLANS),
        default="full",
        help="core: each criterion once, robustness at one calibration size",
    )
    args = parser.parse_args(argv)
    if args.oneshot_cost:
        model, method = args.oneshot_cost
        plan = QUICK if args.quick else FULL
        print(json.dumps(oneshot_cost(Path(model), method, plan, args.seq_len)))
        return
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    start = time.time()
    plan, setup = (
        (QUICK, quick_setup()) if args.quick else (PLANS[args.plan], full_setup())
    )
    setup = select(setup, args.models)
    suffix = "_quick" if args.quick else ""
    report_suffix = suffix + models_suffix(args.models)
    domains = {name: load_domain(name) for name in DOMAINS}
    for source in ("code", "prose", "mixed"):  # fail now, not an hour in
        for size in plan.robustness_sizes:
            calibration_set(domains, source, size, plan.calibration_chars)
    work = Path(tempfile.mkdtemp(prefix="mone-compare-"))
    results = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "choice_questions": plan.choice_questions,
        "models": {},
    }
    for model_name, model_path in build(setup).items():
        training = setup.models[model_name]
        seq_len = training.seq_len
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        # one choice task (text only) for every model, so one lm-eval task index
        evaluate = Evaluator(tokenizer, domains, plan, seq_len, work)
        group = w4a16_group_size(training.config)
        timer = PhaseTimer()
        with timer("quality"):
            quality = quality_table(model_path, evaluate, plan, domains, seq_len, group)
        with timer("robustness"):
            robustness = robustness_table(
                model_path, evaluate, plan, domains, seq_len, quality[0]
            )
        with timer("cost"):
            cost = oneshot_costs(
                model_path, ("noop", "mone", "reap"), args.quick, seq_len
            )
        with timer("size_speed"):
            size_speed = size_and_speed(
                model_path,
                plan,
                domains,
                seq_len,
                evaluate,
                work / f"{model_name}-ckpt",
            )
        results["models"][model_name] = {
            "training": json.loads((model_path / "metrics.json").read_text()),
            "quality": quality,
            "robustness": robustness,
            "robustness_summary": robustness_summary(robustness),
            "cost": cost,
            "size_speed": size_speed,
            "phase_seconds": timer.seconds,
        }
    results["seconds"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results{report_suffix}.json").write_text(
        json.dumps(results, indent=2)
    )
    plot(results, args.out, suffix)
    command = "python benchmarks/compare.py" + (" --quick" if args.quick else "")
    if args.models:
        command += " --models " + " ".join(args.models)
    if args.plan != "full":
        command += f" --plan {args.plan}"
    write_report(results, args.out / f"RESULTS{report_suffix}.md", suffix, command)
    print((args.out / f"RESULTS{report_suffix}.md").read_text())


if __name__ == "__main__":
    main()
