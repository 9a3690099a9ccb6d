"""
Runs in the serving environment (vLLM and mone-vllm, no llm-compressor):
greedy generation from each checkpoint of a job file, in float32 (vLLM's
CPU bfloat16 kernels round differently from transformers).

usage: python serve_in_vllm.py JOBS.json RESULTS.json

JOBS.json maps a job name to ``{"path", "prompt" (token ids), "max_tokens"}``
and optionally ``"engine"`` (more ``LLM`` arguments);
RESULTS.json maps it to ``{"tokens", "logprobs", "text"}`` or ``{"error"}``.
"""

import gc
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# engine and worker in this process: a model starts in seconds, not 30
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from job_files import run_jobs  # noqa: E402


def generate(path: str, prompt: list[int], max_tokens: int, engine: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=path,
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        distributed_executor_backend="uni",
        **engine,
    )
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True
        )
        out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
        return {
            "tokens": list(out.token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)],
            "text": out.text,
        }
    finally:
        del llm
        gc.collect()


def run(job: dict) -> dict:
    return generate(
        job["path"], job["prompt"], job["max_tokens"], job.get("engine", {})
    )


if __name__ == "__main__":
    run_jobs(*sys.argv[1:], run)
