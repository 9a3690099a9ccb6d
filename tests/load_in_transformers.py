"""
Greedy generation from MoNE checkpoints loaded by ``mone_transformers``,
under each experts implementation. Imported by ``test_serving.py`` for its
references, and run there as a script in the serving environment, whose
transformers is newer than llm-compressor allows and which has no
llm-compressor:

    python load_in_transformers.py JOBS.json RESULTS.json

JOBS.json maps a job name to ``{"path", "prompt" (token ids), "max_tokens",
"experts_implementation"}``; RESULTS.json maps it to ``{"tokens",
"logprobs", "transformers"}`` or ``{"error"}``.
"""

import sys

import torch
import transformers

from job_files import run_jobs
from mone_transformers import from_pretrained


@torch.no_grad()
def greedy(model, prompt: list[int], max_tokens: int) -> dict:
    """Greedy tokens and their log-probabilities, computed step by step."""
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        logits = model(input_ids=ids).logits[0, -1].double()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return {"tokens": tokens, "logprobs": logprobs}


def generate(job: dict) -> dict:
    model = from_pretrained(job["path"])
    model.set_experts_implementation(job["experts_implementation"])
    result = greedy(model, job["prompt"], job["max_tokens"])
    return {**result, "transformers": transformers.__version__}


if __name__ == "__main__":
    run_jobs(*sys.argv[1:], generate)
