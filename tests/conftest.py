import os
import sys
from pathlib import Path

# Under pytest-xdist (the README's test command) the workers share the
# cores: each, and every process it starts, takes its share of threads,
# since oversubscribed torch threads spin far slower than one each.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from loguru import logger  # noqa: E402

if workers:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

sys.path.insert(0, str(Path(__file__).parent))

from family_configs import build_family_model  # noqa: E402
from mone_modifier.tiny_moe import (  # noqa: E402
    build_tiny_moe,
    calibration_ids,
    group_quantizable,
)

NUM_SAMPLES = 8
SEQ_LEN = 24


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
def family_model(tmp_path_factory):
    """model type -> path of its tiny model (built once per session)."""
    root = tmp_path_factory.mktemp("every-family")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_family_model(family, root / family)
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
