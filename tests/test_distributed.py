"""
oneshot under ``torchrun --nproc_per_node 2`` (gloo; on the CPU unless two
GPUs are visible) against the same run in one process: the same experts,
novices and report, written once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tree_digest

SCRIPT = Path(__file__).parent / "distributed_oneshot.py"
RECIPES = Path(__file__).parents[1] / "recipes"


def run(model: Path, recipe: str, out: Path, ranks: int, *options: str):
    out.mkdir(parents=True)
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone"]
        launcher += [f"--nproc_per_node={ranks}"]
    command = launcher + [str(SCRIPT), str(model), str(RECIPES / recipe), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.device_count() < 2:
        # llm-compressor puts rank r on accelerator r: two ranks need two GPUs
        # (on one, rank 1 fails and takes rank 0's gloo collectives with it).
        # With fewer, every run, the one-process run too, computes on the CPU,
        # so that the runs compared computed on one device.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        command + list(options), capture_output=True, text=True, env=env, timeout=600
    )


def outputs(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    report = json.loads((out / "report.json").read_text())
    return report, load_file(out / "model" / "model.safetensors")


def assert_same_mone_result(single: Path, multi: Path):
    (report_1, tensors_1), (report_2, tensors_2) = outputs(single), outputs(multi)
    assert report_1["settings"] == report_2["settings"]
    assert report_1["totals"] == report_2["totals"]
    for layer_1, layer_2 in zip(report_1["layers"], report_2["layers"], strict=True):
        for key in ("novices", "retained", "never_routed", "tokens", "routed_tokens"):
            assert layer_1[key] == layer_2[key], (layer_1["index"], key)
        for key in ("score", "frequency", "output_std"):
            torch.testing.assert_close(
                torch.tensor(layer_2[key], dtype=torch.float64),
                torch.tensor(layer_1[key], dtype=torch.float64),
                rtol=1e-7,
                atol=0.0,
            )
    assert tensors_1.keys() == tensors_2.keys()
    novices = [name for name in tensors_1 if name.endswith("approx_value")]
    assert novices
    for name in novices:
        # float32 novices from float64 statistics merged in another order
        torch.testing.assert_close(tensors_2[name], tensors_1[name])
    config_1 = json.loads((single / "model" / "config.json").read_text())
    config_2 = json.loads((multi / "model" / "config.json").read_text())
    assert config_1 == config_2
    # written once, by one rank, and nothing half-written left beside it
    assert sorted(p.name for p in multi.iterdir()) == [
        "model",
        "report.json",
        "report.png",
    ]


@pytest.fixture(scope="module")
def model(quantizable_moe) -> Path:
    # Qwen3-MoE also needs the sequential tracer fix on every rank
    return quantizable_moe("qwen3_moe")


def test_two_ranks_equal_one_process(model, tmp_path):
    single = run(model, "mone_25.yaml", tmp_path / "single", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = run(model, "mone_25.yaml", tmp_path / "multi", 2)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert_same_mone_result(tmp_path / "single", tmp_path / "multi")
    # the retained experts and everything else are bit-identical
    _, tensors_1 = outputs(tmp_path / "single")
    _, tensors_2 = outputs(tmp_path / "multi")
    for name, tensor in tensors_1.items():
        if not name.endswith("approx_value"):
            assert torch.equal(tensors_2[name], tensor), name


def test_two_ranks_stacked_with_gptq(model, tmp_path):
    # MoNE calibrates its own pass, then GPTQ W4A16 quantizes the retained
    # experts across both ranks (llm-compressor's distributed GPTQ)
    options = ("--pipeline", "independent")
    single = run(model, "mone_w4.yaml", tmp_path / "single", 1, *options)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = run(model, "mone_w4.yaml", tmp_path / "multi", 2, *options)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert_same_mone_result(tmp_path / "single", tmp_path / "multi")
    _, tensors = outputs(tmp_path / "multi")
    packed = {n.rsplit(".", 2)[0] for n in tensors if n.endswith("weight_packed")}
    report, _ = outputs(tmp_path / "multi")
    for layer in report["layers"]:
        prefix = f"model.layers.{layer['index']}.mlp.experts"
        for expert in layer["retained"]:
            assert f"{prefix}.{expert}" in packed
        for expert in layer["novices"]:
            assert not any(n.startswith(f"{prefix}.{expert}.") for n in packed)


def test_same_dataset_on_every_rank_is_refused(model, tmp_path):
    before = tree_digest(model)
    result = run(model, "mone_25.yaml", tmp_path / "out", 2, "--same-data")
    assert result.returncode != 0
    assert "every rank was given the same calibration `dataset`" in result.stderr
    assert "dataset.shard(" in result.stderr
    assert not (tmp_path / "out" / "model").exists()
    assert tree_digest(model) == before
