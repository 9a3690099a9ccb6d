"""
The benchmark's quick mode runs end to end (so the benchmark cannot rot):
trains its tiny models, compares the methods, writes the report, the JSON
and the plots.
"""

import json

import pytest

from helpers import BENCHMARKS, run_quick, write_choice_task


def test_quick_benchmark(tmp_path):
    pytest.importorskip("lm_eval")
    run_quick("compare.py", tmp_path)
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


def test_choice_task_rows_are_true_continuations(tmp_path, monkeypatch):
    """Each question's labelled choice continues its own held-out passage; the
    three others are continuations of other passages of the same domain."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from compare import choice_task
    from data import DOMAINS, load_domain

    domains = {name: load_domain(name) for name in DOMAINS}
    choice_task(domains, tmp_path, questions=20)
    rows = [
        json.loads(line)
        for line in (tmp_path / "continuation_choice.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 20
    heldout = {name: "\n".join(d.documents("heldout")) for name, d in domains.items()}
    for row in rows:
        choices, label = row["choices"], row["label"]
        assert len(set(choices)) == 4 and all(c.startswith(" ") for c in choices)
        (domain,) = [n for n, t in heldout.items() if row["context"] in t]
        assert row["context"] + choices[label] in heldout[domain]
        for i, choice in enumerate(choices):
            assert choice in heldout[domain]
            if i != label:
                assert row["context"] + choice not in heldout[domain]
    task = (tmp_path / "continuation_choice.yaml").read_text()
    assert "acc_mutual_info" in task and 'target_delimiter: ""' in task


def test_offload_memory_quick(tmp_path):
    """benchmarks/offload_memory.py runs end to end on a disk-offloaded model."""
    run_quick("offload_memory.py", tmp_path, "--repeats", "1")
    result = json.loads((tmp_path / "offload_memory_quick.json").read_text())
    for method in ("noop", "mone"):
        (run,) = result["runs"][method]
        assert run["weights_on_disk_mb"] > 0.9 * result["weights_mb"]
        assert 0 < run["oneshot_anonymous_growth_mb"] < run["oneshot_peak_anonymous_mb"]
        assert run == result["median"][method]
    assert set(result["oneshot_peak_ratio_mone_vs_noop"]) == {
        "rss_mb",
        "anonymous_mb",
        "anonymous_growth_mb",
    }


def test_novice_speed_quick(tmp_path):
    """benchmarks/novice_speed.py end to end (prune, reload, paired timing,
    compiled timing); what it measures is not asserted, only its report."""
    run_quick(
        "novice_speed.py", tmp_path, "--implementations", "grouped_mm", "--compile"
    )
    report = json.loads((tmp_path / "novice_speed_cpu_cpu_quick.json").read_text())
    assert set(report["speed"]) == {"grouped_mm", "grouped_mm, compiled"}
    for rows in report["speed"].values():
        for row in rows.values():
            assert set(row) >= {"unpruned", "mone_25", "mone_50"}
            assert all(r["ms"] > 0 and r["speed_ratio"] > 0 for r in row.values())


def test_statistics_sweep_quick(tmp_path):
    """benchmarks/statistics_sweep.py end to end: one calibration's
    statistics prune every sparsity, beside calibrating once per sparsity;
    ``--models`` restricts the run and names its file."""
    run_quick("statistics_sweep.py", tmp_path, "--models", "deepseek")
    results = json.loads(
        (tmp_path / "statistics_sweep_quick_deepseek.json").read_text()
    )
    assert set(results["models"]) == {"deepseek"}
    assert results["command"].endswith("--quick --models deepseek")
    for result in results["models"].values():
        assert [row["sparsity"] for row in result["rows"]] == [0.25, 0.5]
        for row in result["rows"]:
            for kind in ("from_statistics", "progressive"):
                assert row[kind]["code_ppl"] > 1 and row[kind]["prose_ppl"] > 1
        assert result["calibration_s"] > 0
