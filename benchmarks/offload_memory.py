"""
Peak memory of oneshot on a MoE that does not fit the memory the run may use:
MoNE against a modifier that does nothing, on the same offloaded model,
pipeline and data.

    python benchmarks/offload_memory.py [--quick] [--repeats 3]
                                        [--out benchmarks/results]

Builds an OLMoE-style model with random weights several times larger than
its CPU budget (``budget_mb`` below), loads it the way llm-compressor loads
models too big for memory (``load_offloaded_model`` with
``device_map="auto_offload"``: what does not fit the budget is offloaded to
disk), and runs the sequential pipeline, which onloads one decoder layer at a
time. MoNE must stay close to the no-op run: it keeps only float64 statistics
of size layers x experts x hidden, and replaces experts without onloading the
others. Each run is a fresh process; the methods alternate, ``--repeats``
times each, and the ratio is taken between their medians.

Loading includes linearising the experts (``linearize_moe``, which llm-
compressor asks for at load time and otherwise does first thing in oneshot).
It copies every layer's fused experts into per-expert Linears and offloads
those again; glibc keeps the freed copies mapped, a different amount on each
run (measured: 0.2 to 1.5 GB of the 1.5 GB model), and that retained heap
then shows as the peak of whichever run it fell on. The heap is therefore
given back to the system (``malloc_trim``) before oneshot, so that the peak
is what oneshot itself needs.

Peak memory is sampled during oneshot only: resident (``oneshot_peak_rss_mb``,
which counts the pages of the mmapped offloaded weights as they are read, so
it can exceed the budget), its anonymous part (``..._anonymous_mb``: the heap
of tensors, MoNE's statistics included), and how far that heap grew above its
level when oneshot began (``oneshot_anonymous_growth_mb``: what oneshot
allocated, without the interpreter and libraries). Loading is reported apart
(``load_peak_rss_mb``): it is the same for both runs and not MoNE's.
"""

import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from compare import NoOp, peak_rss_mb, process_memory_mb
from compressed_tensors.offload import get_offloaded_device, load_offloaded_model
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import AutoModelForCausalLM, OlmoeConfig

from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import calibration_ids, tiny_tokenizer

FULL = dict(layers=8, experts=32, hidden=512, intermediate=1024, budget_mb=300)
QUICK = dict(layers=4, experts=16, hidden=256, intermediate=512, budget_mb=40)
SAMPLES, SEQ_LEN = 16, 128
# name in the JSON's ratios -> the measured field
RATIOS = {
    "rss_mb": "oneshot_peak_rss_mb",
    "anonymous_mb": "oneshot_peak_anonymous_mb",
    "anonymous_growth_mb": "oneshot_anonymous_growth_mb",
}


def build(path: Path, size: dict) -> int:
    """Save a random OLMoE-style model; returns its weight bytes."""
    config = OlmoeConfig(
        vocab_size=96,
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=size["experts"],
        num_experts_per_tok=4,
        max_position_embeddings=SEQ_LEN,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PeakMemory:
    """Peak resident memory while the block runs, all of it and its anonymous
    part (the heap, without file pages such as the mmapped offloaded
    weights), sampled every 5 ms (the process's peak cannot be reset after
    loading)."""

    def __enter__(self) -> "PeakMemory":
        self.rss_mb, self.anon_mb = process_memory_mb("VmRSS", "RssAnon")
        self.start_anon_mb = self.anon_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            rss, anon = process_memory_mb("VmRSS", "RssAnon")
            self.rss_mb, self.anon_mb = max(self.rss_mb, rss), max(self.anon_mb, anon)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def disk_offloaded_mb(model: torch.nn.Module) -> float:
    """Weights the loaded model keeps on disk, from the offload caches'
    entries (meta tensors for disk), without onloading them."""
    return (
        sum(
            tensor.numel() * tensor.element_size()
            for module in model.modules()
            if get_offloaded_device(module) == "disk"
            for tensor in module._parameters.offloaded_values.values()
            if tensor is not None
        )
        / 2**20
    )


def run_child(method: str, path: Path, budget_mb: int, offload: Path) -> dict:
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            device_map="auto_offload",
            max_memory={"cpu": budget_mb * 2**20},
            offload_folder=str(offload),
        )
    linearize_moe(model)
    # give back the heap linearisation freed, which glibc would otherwise keep
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    samples = calibration_ids(SAMPLES, SEQ_LEN)
    dataset = Dataset.from_dict(
        {
            "input_ids": samples.tolist(),
            "attention_mask": torch.ones_like(samples).tolist(),
        }
    )
    modifier = NoOp() if method == "noop" else MoNEPruningModifier(sparsity=0.25)
    load_peak = peak_rss_mb()
    on_disk = disk_offloaded_mb(model)
    start = time.perf_counter()
    with PeakMemory() as peak:
        oneshot(
            model=model,
            dataset=dataset,
            recipe=[modifier],
            num_calibration_samples=SAMPLES,
            pipeline="sequential",
            shuffle_calibration_samples=False,
        )
    return {
        "weights_on_disk_mb": on_disk,
        "load_peak_rss_mb": load_peak,
        "oneshot_peak_rss_mb": peak.rss_mb,
        "oneshot_peak_anonymous_mb": peak.anon_mb,
        "oneshot_anonymous_growth_mb": peak.anon_mb - peak.start_anon_mb,
        "oneshot_s": time.perf_counter() - start,
    }


def measure(method: str, path: Path, budget_mb: int, work: Path) -> dict:
    offload = Path(tempfile.mkdtemp(dir=work, prefix=f"offload-{method}-"))
    command = [sys.executable, __file__, "--child", method, str(path)]
    command += [str(budget_mb), str(offload)]
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        raise RuntimeError(f"{method} run failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, path, budget, offload = args.child
        print(json.dumps(run_child(method, Path(path), int(budget), Path(offload))))
        return
    size = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="mone-offload-") as work:
        work = Path(work)
        weight_bytes = build(work / "model", size)
        runs = {"noop": [], "mone": []}
        for _ in range(args.repeats):
            for method, results in runs.items():
                results.append(measure(method, work / "model", size["budget_mb"], work))
    median = {method: medians(results) for method, results in runs.items()}
    result = {
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "command": "python benchmarks/offload_memory.py"
        + (" --quick" if args.quick else "")
        + f" --repeats {args.repeats}",
        "model": size,
        "weights_mb": weight_bytes / 2**20,
        "runs": runs,
        "median": median,
        "oneshot_peak_ratio_mone_vs_noop": {
            kind: median["mone"][field] / median["noop"][field]
            for kind, field in RATIOS.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"offload_memory{'_quick' if args.quick else ''}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
