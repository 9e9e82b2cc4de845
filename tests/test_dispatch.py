"""The portable build: kernel variants chosen at import, all computing the same numbers.

Each variant is run in its own process (``FASTBP_KERNELS=...``), on every path that has
an elementwise or update loop: full-batch loss/gradient, curvature products, the Fisher
diagonal, the forward pass, and whole minibatch epochs (SGD with Nesterov momentum, Adam)
on one and on two threads, dense and sparse, float32 and float64; with every hidden
activation (the ones that call libm per element, and gelu/silu layers that keep Z,
mixed per layer). No variant fuses
multiply-adds, the reductions keep their order, and all call the same BLAS, so their
results must agree bit for bit: a vector path that computed anything else would show.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import fastbp
from fastbp import _core, _threads

PROBE = r"""
import hashlib, json, sys
import numpy as np
import scipy.sparse as sp
import fastbp
from fastbp import _core

def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

out = {"variant": _core.VARIANT, "isa": _core.build_info()["isa"],
       "small_own": _core.small_products_in_own_loops()}
rng = np.random.default_rng(0)
X = rng.normal(size=(700, 13))
y = (X[:, 0] * X[:, 1] + np.sin(X[:, 2]) > 0).astype(int) + (X[:, 3] > 1)
Xs = sp.random(700, 13, density=0.3, random_state=1, format="csr")
for dtype in (np.float32, np.float64):
    for act, output, k in (("relu", "softmax", 3), ("tanh", "logistic", 2),
                           ("logistic", "identity", 2), ("identity", "exp", 1),
                           ("gelu", "softmax", 3), (("silu", "softplus"), "logistic", 2),
                           (("leaky_relu", "elu"), "identity", 2)):
        net = fastbp.Network((13, 17, 9, k), activation=act, output=output, dtype=dtype)
        theta = net.init_params(0)
        Y = np.eye(3)[y][:, :k] if output != "exp" else np.abs(X[:, :1])
        v = rng.normal(size=theta.size).astype(dtype)
        for name, data in (("dense", X), ("sparse", Xs)):
            data = data.astype(dtype)
            Yd = Y.astype(dtype)
            loss, grad = net.loss_grad(theta, data, Yd, alpha=1e-3)
            key = f"{np.dtype(dtype).name}-{act}-{output}-{name}"
            prepared = net.prepare(data, Yd)
            out[key] = digest(np.array([loss]), grad,
                              net.gnvp(theta, v, data, Yd, alpha=1e-3),
                              net.hessp(theta, v, data, Yd, alpha=1e-3),
                              net.forward(theta, data),
                              net._fisher(theta, prepared, np.empty_like(theta)))
    for solver, extra in (("sgd", {"momentum": 0.9, "nesterovs_momentum": True}),
                          ("adam", {}), ("adam", {"activation": ["gelu", "silu"]})):
        for n_jobs in (1, 2):
            clf = fastbp.MLPClassifier((32, 16), solver=solver, batch_size=64,
                                       max_iter=4, tol=0.0, random_state=0,
                                       n_jobs=n_jobs, **extra)
            clf.fit(X.astype(dtype), y)
            act = "-".join(extra.get("activation", ["relu"]))
            out[f"{np.dtype(dtype).name}-{solver}-{act}-{n_jobs}"] = digest(
                clf._theta, np.array(clf.loss_curve_))
print(json.dumps(out))
"""


def _env(variant, **more):
    """The environment of a child that imports the very fastbp this test imported (run
    from outside the checkout, whose sources would shadow an installed package)."""
    return dict(os.environ, FASTBP_KERNELS=variant,
                PYTHONPATH=str(pathlib.Path(fastbp.__file__).resolve().parents[1]), **more)


def _probe(variant, cwd, small_products=None):
    env = _env(variant, **({"FASTBP_SMALL_PRODUCTS": small_products} if small_products
                           else {}))
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=600, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _runnable():
    have = set(_core.cpu_features())
    return [v for v in _core.built_variants()
            if all(f in have for f in _core.VARIANTS[v])]


def test_the_best_runnable_variant_is_chosen():
    runnable = _runnable()
    assert "baseline" in runnable
    forced = os.environ.get("FASTBP_KERNELS", "").strip().lower()
    order = list(_core.VARIANTS)
    assert _core.VARIANT == (forced or min(runnable, key=order.index))


def test_each_variant_is_compiled_for_the_isa_it_claims():
    # Only the runnable ones can be imported: a variant's module runs its own
    # instruction set from its first line on.
    import importlib
    for variant in _runnable():
        module = importlib.import_module(f"fastbp._kernels_{variant}")
        assert module.build_info()["isa"] == variant
        # Every variant holds the same kernels.
        assert set(dir(module)) == set(dir(importlib.import_module("fastbp._kernels_baseline")))


# Small products in fastbp's own loops (the default where the BLAS has no small-matrix
# kernels) and in BLAS: the variants agree bit for bit on both paths.
@pytest.mark.parametrize("small_products", ["own", "blas"])
def test_every_runnable_variant_computes_bitwise_the_same_numbers(tmp_path, small_products):
    runnable = _runnable()
    results = {v: _probe(v, tmp_path, small_products) for v in runnable}
    reference = results.pop("baseline")
    assert reference["variant"] == reference["isa"] == "baseline"
    assert len(reference) == 3 + 2 * 7 * 2 + 2 * 3 * 2  # every case ran
    # Each child took the path it was told to.
    assert {r["small_own"] for r in (reference, *results.values())} == {
        small_products == "own"}
    for variant, got in results.items():
        assert got.pop("variant") == got.pop("isa") == variant
        ref = {k: val for k, val in reference.items() if k not in ("variant", "isa")}
        differing = sorted(k for k in ref if got.get(k) != ref[k])
        assert differing == [], f"{variant} differs from baseline on {differing}"


def test_listing_the_variants_imports_only_the_chosen_one(tmp_path):
    # Importing a variant the CPU lacks kills the process (illegal instruction), so
    # built_variants() and show_config() must find the others without importing them.
    code = ("import sys, fastbp; from fastbp import _core; _core.built_variants(); "
            "fastbp.show_config(); print(sorted(m for m in sys.modules "
            "if m.startswith('fastbp._kernels_')), _core.VARIANT)")
    run = subprocess.run([sys.executable, "-c", code], env=_env(""), capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    modules, variant = run.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert modules == repr([f"fastbp._kernels_{variant}"])


@pytest.mark.parametrize("value, needle", [
    ("sse9", "is not a kernel variant"),
    ("Baseline ", None),
])
def test_forcing_a_variant(value, needle, tmp_path):
    env = _env(value)
    run = subprocess.run([sys.executable, "-c",
                          "from fastbp import _core; print(_core.VARIANT)"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if needle is None:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "baseline"
    else:
        assert run.returncode != 0
        assert needle in run.stderr and "FASTBP_KERNELS" in run.stderr


def test_forcing_a_variant_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setenv("FASTBP_KERNELS", "avx512")
    monkeypatch.setattr(_core, "cpu_features", lambda: ("avx", "avx2", "fma"))
    with pytest.raises(RuntimeError, match="lacks avx512f"):
        _core._choose()
    monkeypatch.setenv("FASTBP_KERNELS", "")
    name, module = _core._choose()
    assert name in ("avx2", "baseline") and module.build_info()["isa"] == name


def test_a_cpu_without_vector_extensions_gets_the_baseline(monkeypatch):
    monkeypatch.delenv("FASTBP_KERNELS", raising=False)
    monkeypatch.setattr(_core, "cpu_features", lambda: ())
    name, module = _core._choose()
    assert name == "baseline" and module.build_info()["isa"] == "baseline"


def test_show_config_reports_the_variant_blas_and_threads(capsys):
    assert fastbp.show_config() is None
    printed = capsys.readouterr().out
    info = fastbp.show_config(mode="dicts")
    assert info["kernels"]["variant"] == _core.VARIANT
    assert info["kernels"]["cpu_features"] == list(_core.cpu_features())
    assert info["kernels"]["built"] == list(_core.built_variants())
    assert info["threads"]["openmp_max_threads"] >= 1
    assert info["threads"]["n_jobs_default"] >= 1
    plan = info["minibatch_plan"]
    assert plan == {"last_level_cache_bytes": _threads.last_level_cache_bytes(),
                    "min_rows_per_thread": _threads.MIN_ROWS_PER_THREAD,
                    "min_team_work_flops": _threads.MIN_TEAM_WORK,
                    "max_units_batch": _threads.MAX_UNITS_BATCH}
    assert f"at most {_threads.MAX_UNITS_BATCH} rows" in printed
    assert any(lib["internal_api"] in ("openblas", "mkl", "blis", "flexiblas")
               for lib in info["blas"])
    assert _core.VARIANT in printed and "BLAS" in printed
    assert json.loads(fastbp.show_config(mode="json")) == info  # plain data
    with pytest.raises(ValueError, match="mode must be"):
        fastbp.show_config(mode="yaml")


def test_fastbp_bench_prints_the_configuration_in_its_header(monkeypatch, capsys):
    from fastbp import _bench
    from fastbp.cli import main
    fake = {"date": "2026-12-02", "machine": "a CPU", "versions": {"fastbp": "0"},
            "config": fastbp.show_config(mode="dicts"),
            "gemm_peak_gflops": {"sgemm": 1.0, "dgemm": 0.5}, "results": []}
    monkeypatch.setattr(_bench, "run", lambda quick, log: fake)
    assert main(["bench"]) == 0
    header = capsys.readouterr().out.splitlines()
    assert header[1].startswith(f"kernels: {_core.VARIANT}")
    assert any(line.startswith("BLAS: ") for line in header)
    small = [line for line in header
             if line.startswith("small products (at most 2^18 multiply-adds): ")]
    assert len(small) == 1
    # Where small products go to BLAS, larger ones are cut for its small kernels: said.
    assert (("cut for BLAS's small-matrix kernels" in small[0])
            == (fake["config"]["kernels"]["small_products"] == "blas"))
    # The table's first line says which kernels ran and where the small products went.
    where = {"own": "fastbp's loops", "blas": "BLAS"}[_threads.SMALL_PRODUCTS[0]]
    assert (f"fastbp kernels {_core.VARIANT}, small products in {where}."
            in _bench.markdown(fake).splitlines()[0])
