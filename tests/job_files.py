"""
The job-file loop of the scripts the serving tests run in the serving
environment: ``JOBS.json`` maps a job name to its arguments, ``RESULTS.json``
receives each job's result or ``{"error"}`` (which the tests read).
"""

import json
from collections.abc import Callable


def run_jobs(jobs_path: str, results_path: str, run: Callable[[dict], dict]):
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = run(job)
        except Exception as error:  # the test reads the refusal
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{name}: {str(results[name])[:200]}", flush=True)
    with open(results_path, "w") as f:
        json.dump(results, f)
