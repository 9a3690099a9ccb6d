"""
The benchmark's quick mode runs end to end (so the benchmark cannot rot):
trains its tiny models, compares the methods, writes the report, the JSON
and the plots.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_choice_task

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_quick_benchmark(tmp_path):
    pytest.importorskip("lm_eval")
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "compare.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    results = json.loads((tmp_path / "results_quick.json").read_text())
    assert set(results["models"]) == {"olmoe", "deepseek"}
    for name, result in results["models"].items():
        methods = {(r["method"], r["w4a16"]) for r in result["quality"]}
        assert methods == {("unpruned", False)} | {
            (m, q) for m in ("mone", "frequency", "reap") for q in (False, True)
        }
        for row in result["quality"]:
            assert row["code_ppl"] > 1 and row["prose_ppl"] > 1
            assert 0 <= row["choice_acc"] <= 1
        assert {r["source"] for r in result["robustness"]} == {"code", "prose", "mixed"}
        assert set(result["cost"]) == {"noop", "mone", "reap"}
        sizes = result["size_speed"]
        assert (
            sizes["mone_25"]["bytes_ratio"] < 1
            and sizes["mone_drop_25"]["bytes_ratio"] < 1
        )
        assert (tmp_path / f"quality_{name}_quick.png").is_file()
        assert (tmp_path / f"robustness_{name}_quick.png").is_file()
    report = (tmp_path / "RESULTS_quick.md").read_text()
    assert "### Headline: MoNE vs REAP vs frequency" in report
    assert "python benchmarks/compare.py --quick" in report


def test_real_scale_script_on_a_tiny_local_model(
    tiny_moe, samples, tmp_path, monkeypatch
):
    """benchmarks/real_scale.py's argument handling and data flow, offline."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import real_scale

    write_choice_task(tmp_path / "tasks", samples)
    data = tmp_path / "calibration.jsonl"
    texts = [" ".join(f"w{t}" for t in row) for row in samples.tolist()]
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts + [""]))
    args = ["--model", str(tiny_moe("olmoe")), "--dataset", str(data)]
    args += ["--num-samples", "4", "--sparsities", "0.25", "--methods", "mone", "reap"]
    args += ["--tasks", "mone_tiny_choice", "--include-path", str(tmp_path / "tasks")]
    args += ["--device", "cpu", "--batch-size", "1", "--max-seq-length", "32"]
    real_scale.main(args + ["--out", str(tmp_path / "out")])

    runs = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(runs) == {"unpruned", "mone_25", "reap_25"}
    for accuracy in runs.values():
        assert 0 <= accuracy["mone_tiny_choice"] == accuracy["average"] <= 1
    assert json.loads((tmp_path / "out" / "mone_25" / "config.json").read_text())[
        "approximate_experts"
    ]
    assert "| mone_25 |" in (tmp_path / "out" / "results.md").read_text()

    with pytest.raises(SystemExit):
        real_scale.parse_args(["--out", "x", "--sparsities", "1.5"])
    with pytest.raises(ValueError, match="fewer than --num-samples 100"):
        real_scale.calibration_samples(
            real_scale.parse_args(["--out", "x", "--dataset", str(data)])
        )
