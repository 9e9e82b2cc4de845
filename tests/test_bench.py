"""The benchmark suite runs end to end (on tiny workloads) and reports what it promises."""
import json

import numpy as np
import pytest

from fastbp import _bench
from fastbp.cli import main


@pytest.fixture
def tiny(monkeypatch):
    small = {
        1: dict(_bench.WORKLOADS[1], n=600, d=8, hidden=(8,), iters=1),
        3: dict(_bench.WORKLOADS[3], n=600, d=8, hidden=(8,), iters=5),
    }
    monkeypatch.setattr(_bench, "WORKLOADS", small)
    monkeypatch.setattr(_bench, "QUICK", {})
    monkeypatch.setattr(_bench, "gemm_peak", lambda dtype=np.float32, **kw: 10.0)


def test_suite_reports_times_ratios_accuracy_and_peak_fraction(tiny):
    report = _bench.run(quick=True, rounds=1, settle=0.0, workloads=[1, 3],
                        with_torch=False, log=lambda msg: None)
    json.dumps(report)  # serialisable as promised
    adam, lbfgs = report["results"]
    for r in (adam, lbfgs):
        assert r["seconds"]["fastbp"] > 0 and r["seconds"]["scikit-learn"] > 0
        assert r["speedup"]["scikit-learn"] == pytest.approx(
            r["seconds"]["scikit-learn"] / r["seconds"]["fastbp"])
        assert 0.0 <= r["accuracy"]["fastbp"] <= 1.0
    # GFLOP/s from the counted work: 600 rows x one forward+backward of 8-8-10, 1 epoch.
    flops = 2 * (3 * (8 * 8 + 8 * 10) - 8 * 8) * 600
    assert adam["gflops"]["fastbp"] == pytest.approx(flops / adam["seconds"]["fastbp"] / 1e9)
    assert adam["peak_fraction"]["fastbp"] == pytest.approx(adam["gflops"]["fastbp"] / 10.0)
    table = _bench.markdown(report)
    assert table.count("\n| adam-small") == 1 and table.count("\n| lbfgs") == 1
    assert report["date"] in table and "scikit-learn" in table


def test_plot_writes_png(tiny, tmp_path):
    report = _bench.run(quick=True, rounds=1, settle=0.0, workloads=[1], with_torch=False,
                        log=lambda msg: None)
    path = tmp_path / "s.png"
    _bench.plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fastbp_bench_command_prints_the_table(tiny, monkeypatch, capsys):
    original = _bench.run
    monkeypatch.setattr(_bench, "run", lambda quick, log: original(
        quick=True, rounds=1, settle=0.0, workloads=[1], with_torch=False, log=log))
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "| adam-small" in out and "speed-up vs sklearn" in out


def test_fixed_cost_row_and_first_fit_on_tiny_workloads(tiny):
    # The tiny adam workload stands in for both stochastic workloads.
    _bench.WORKLOADS[2] = _bench.WORKLOADS[1]
    row = _bench._fixed_cost(rounds=1, settle=0.0, log=lambda msg: None)
    assert [r["workload"] for r in row["rows"]] == ["adam-small", "adam-small"]
    for r in row["rows"]:
        assert r["fixed_over_epoch"] == pytest.approx(r["fixed_seconds"] / r["epoch_seconds"])
    assert len(row["first_fit"]["ratios"]) == 7 and row["first_fit"]["ratio"] > 0


def test_extra_rows_render(tiny):
    report = _bench.run(quick=True, rounds=1, settle=0.0, workloads=[1], with_torch=False,
                        log=lambda msg: None)
    report["results"] += [
        {"workload": "sklearn-defaults", "shape": "5000x784", "seconds":
         {"fastbp": 1.0, "scikit-learn": 2.5}, "speedup": {"scikit-learn": 2.5},
         "accuracy": {"fastbp": 0.8, "scikit-learn": 0.79},
         "epochs": {"fastbp": 56, "scikit-learn": 56}, "target": "t"},
        {"workload": "gridsearch", "shape": "7188x64", "seconds":
         {"fastbp n_jobs=1": 0.8, "fastbp n_jobs=2": 0.5, "scikit-learn n_jobs=1": 3.0,
          "scikit-learn n_jobs=2": 2.0},
         "speedup": {"fastbp n_jobs=2 vs n_jobs=1": 1.6, "scikit-learn": 4.0},
         "target": "t"},
        {"workload": "fixed-cost", "rows": [{"workload": "adam-small", "epoch_seconds": 0.01,
                                             "fixed_seconds": 0.002,
                                             "fixed_over_epoch": 0.2}],
         "first_fit": {"ratio": 1.1}, "target": "t"},
        {"workload": "openmp-limit", "cores_used": {"limit": 1.0, "none": 1.9},
         "target": "t"},
        {"workload": "contention", "cases": {"adam-small": {
            "seconds": {"n_jobs=1": 0.04, "n_jobs=2": 0.05}, "n_jobs=2 / n_jobs=1": 1.25}},
         "target": "t"}]
    table = _bench.markdown(report)
    assert "| sklearn-defaults 5000x784" in table and "2.5x" in table
    assert "(56 / 56 epochs)" in table
    assert "| GridSearchCV 12 fits" in table and "1.60x from n_jobs=1 to 2" in table
    assert "adam-small 2.0 ms against 10.0 ms per epoch (0.20 epoch)" in table
    assert "First fit in a fresh process / a later one: 1.10" in table
    assert "1.90; under `threadpool_limits(1, user_api='openmp')`: 1.00" in table
    assert "adam-small 0.050 s against 0.040 s (1.25x)" in table


def test_feature_benchmark_confidence_interval_of_the_median():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_features.py"
    spec = importlib.util.spec_from_file_location("bench_features", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # 101 values 0..100: the median is 50; 1.96 sqrt(101) / 2 = 9.85 order statistics
    # either side, rounded outwards: from the 40th to the 60th value.
    assert bench.median_ci(np.arange(101.0)[::-1]) == [40.0, 60.0]
    # Tiny samples clip to the extremes rather than index outside.
    assert bench.median_ci([1.0, 3.0, 2.0]) == [1.0, 3.0]
