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
