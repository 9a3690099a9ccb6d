import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from loguru import logger

sys.path.insert(0, str(Path(__file__).parent))

from mone_modifier.tiny_moe import (  # noqa: E402
    build_tiny_moe,
    calibration_ids,
    group_quantizable,
)

NUM_SAMPLES = 8
SEQ_LEN = 24
# the background process preparing the serving cases, and its directory
SERVING_PREPARATION = pytest.StashKey[tuple[subprocess.Popen, Path]]()
ONE_CORE = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}


def pytest_collection_finish(session):
    """Once a serving test is selected, prepare the serving cases in the
    background (tests/serving_cases.py): they build a second environment and
    serve some twenty models, minutes of work that would otherwise add to the
    suite's time. On one thread, bound to one core: two processes each
    spinning threads on every core slow each other down several times over."""
    if not any(item.path.name == "test_serving.py" for item in session.items):
        return
    directory = Path(tempfile.mkdtemp(prefix="mone-serving-cases-"))
    script = Path(__file__).parent / "serving_cases.py"
    with open(directory / "log.txt", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), str(directory)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ONE_CORE},
            start_new_session=True,  # one process group, ended together
        )
    session.config.stash[SERVING_PREPARATION] = (process, directory)


def pytest_sessionfinish(session):
    preparation = session.config.stash.get(SERVING_PREPARATION, None)
    if preparation is not None:
        process, directory = preparation
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """family -> path of a saved tiny model (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_moe(family, root / family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def quantizable_moe(tmp_path_factory):
    """family -> path of a tiny model whose Linears W4A16 can quantize."""
    root = tmp_path_factory.mktemp("quantizable")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_moe(
                family, root / family, **group_quantizable(family)
            )
        return cache[family]

    return get


@pytest.fixture(scope="session")
def samples() -> torch.Tensor:
    return calibration_ids(NUM_SAMPLES, SEQ_LEN)


def as_dataset(samples: torch.Tensor) -> Dataset:
    return Dataset.from_dict(
        {
            "input_ids": samples.tolist(),
            "attention_mask": torch.ones_like(samples).tolist(),
        }
    )


@pytest.fixture
def log_lines():
    """Messages logged through loguru while the test runs."""
    lines: list[str] = []
    handle = logger.add(lambda message: lines.append(str(message)), level="INFO")
    yield lines
    logger.remove(handle)
