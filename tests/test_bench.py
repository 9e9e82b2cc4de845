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
