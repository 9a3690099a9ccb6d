"""
Runs in the serving environment (vLLM with the mone-vllm plugin): offline
generation throughput, weight memory and KV-cache capacity of each
checkpoint, for ``benchmarks/serving.py``.

usage: python serving_throughput.py JOBS.json RESULTS.json

JOBS.json: ``{"models": {name: path}, "prompts": [[token ids]], "max_tokens",
"rounds", "repeats"}``. Each round loads every model in turn (rotating the
order) and times ``repeats`` generations after a warm-up; the results hold
every timing, so ratios can be paired by round.
"""

import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def measure(path: str, prompts: list[list[int]], max_tokens: int, repeats: int):
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=path,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        distributed_executor_backend="uni",
    )
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        requests = [{"prompt_token_ids": p} for p in prompts]
        llm.generate(requests, params, use_tqdm=False)  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate(requests, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        (weight_bytes,) = llm.apply_model(
            lambda model: sum(p.numel() * p.element_size() for p in model.parameters())
        )
        cache = llm.llm_engine.vllm_config.cache_config
        return {
            "seconds": seconds,
            "generated_tokens": len(prompts) * max_tokens,
            "weight_bytes": weight_bytes,
            "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
        }
    finally:
        del llm
        gc.collect()


def main(jobs_path: str, results_path: str):
    with open(jobs_path) as f:
        jobs = json.load(f)
    names = list(jobs["models"])
    results = {name: [] for name in names}
    for round_ in range(jobs["rounds"]):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(
                measure(
                    jobs["models"][name],
                    jobs["prompts"],
                    jobs["max_tokens"],
                    jobs["repeats"],
                )
            )
            print(f"round {round_} {name}: {results[name][-1]}", flush=True)
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
