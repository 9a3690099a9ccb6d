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

import json
import sys

import torch
import transformers

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


def main(jobs_path: str, results_path: str):
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = generate(job)
        except Exception as error:  # the test reports it
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{name}: {str(results[name])[:200]}", flush=True)
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
