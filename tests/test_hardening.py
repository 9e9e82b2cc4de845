"""Hardening: bad input, numerics, concurrency, memory, interrupts.

Compiled kernels turn a missed check into a crash, so every public entry point is fed
the failure modes here, and each must end in a clear error or a safe recovery. The
property-based fuzzing lives in test_fuzz.py; estimator input checks shared with
scikit-learn are in test_estimators.py (``test_bad_input_raises_value_error``).
"""
import ctypes
import dis
import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

import fastbp
from fastbp import DivergenceError, MLPClassifier, MLPRegressor, Network, _core
from fastbp._stochastic import StochasticOptimizer

ROOT = Path(__file__).resolve().parents[1]
FULL_BATCH = ["lbfgs", "tnc", "newton-cg", "trust-krylov", "hessian-free"]
ALL_SOLVERS = ["sgd", "adam"] + FULL_BATCH


def _net_problem(n=30):
    rng = np.random.default_rng(0)
    net = Network([4, 5, 3], activation="tanh", output="softmax")
    theta = net.init_params(random_state=0)
    X = rng.normal(size=(n, 4))
    Y = np.eye(3)[rng.integers(0, 3, n)]
    return net, theta, X, Y


def _with(a, index, value):
    a = np.array(a, dtype=float)
    a.flat[index] = value
    return a


# ---------------------------------------------------------------------------------------
# Input: the low-level Network entry points


def _network_cases():
    net, theta, X, Y = _net_problem()
    v = np.ones(net.n_params)
    w = np.ones(len(X))
    calls = {
        "loss_grad": lambda t, X_, Y_, w_=None: net.loss_grad(t, X_, Y_, w_),
        "gnvp": lambda t, X_, Y_, w_=None: net.gnvp(t, v, X_, Y_, w_),
        "hessp": lambda t, X_, Y_, w_=None: net.hessp(t, v, X_, Y_, w_),
    }
    bad = [
        ("nan-X", lambda: (theta, _with(X, 7, np.nan), Y, None), ValueError, "X contains NaN"),
        ("inf-X", lambda: (theta, _with(X, 3, -np.inf), Y, None), ValueError, "X contains NaN"),
        ("overflow-X32", lambda: (theta, _with(X, 3, 1e300), Y, None), None, None),
        ("nan-Y", lambda: (theta, X, _with(Y, 0, np.nan), None), ValueError, "Y contains NaN"),
        ("nan-sparse-X", lambda: (theta, sp.csr_matrix(_with(X, 5, np.nan)), Y, None),
         ValueError, "X contains NaN"),
        ("nan-theta", lambda: (_with(theta, 2, np.nan), X, Y, None), ValueError, "theta"),
        ("short-theta", lambda: (theta[:-1], X, Y, None), ValueError, "theta must have"),
        ("string-theta", lambda: (np.array(["a"] * net.n_params), X, Y, None), TypeError,
         "theta must hold numbers"),
        ("object-X", lambda: (theta, np.array([["a"] * 4] * 30, dtype=object), Y, None),
         TypeError, "X must hold numbers"),
        ("1-D-X", lambda: (theta, X[:, 0], Y, None), ValueError, "2-D"),
        ("3-D-X", lambda: (theta, X[None], Y, None), ValueError, "2-D"),
        ("features", lambda: (theta, X[:, :3], Y, None), ValueError, "3 features"),
        ("Y-shape", lambda: (theta, X, Y[:, :2], None), ValueError, "Y must have shape"),
        ("Y-rows", lambda: (theta, X, Y[:-1], None), ValueError, "Y must have shape"),
        ("empty", lambda: (theta, X[:0], Y[:0], None), ValueError, "no rows"),
        ("negative-weights", lambda: (theta, X, Y, -w), ValueError, "non-negative"),
        ("zero-weights", lambda: (theta, X, Y, 0 * w), ValueError, "sums to zero"),
        ("nan-weights", lambda: (theta, X, Y, _with(w, 1, np.nan)), ValueError, "NaN"),
        ("short-weights", lambda: (theta, X, Y, w[:-2]), ValueError, "sample_weight"),
        ("string-weights", lambda: (theta, X, Y, np.array(["1"] * 30)), TypeError,
         "sample_weight"),
    ]
    return [(f"{name}-{kind}", call, make, exc, match)
            for kind, call in calls.items() for name, make, exc, match in bad]


@pytest.mark.parametrize("case", _network_cases(), ids=lambda c: c[0])
def test_network_entry_points_refuse_bad_input(case):
    _, call, make, exc, match = case
    args = make()
    if exc is None:
        # 1e300 fits in float64: the result is defined, and it is finite or NaN as a
        # whole (never a silently partial result).
        loss_or_vec = call(*args)
        value = loss_or_vec[0] if isinstance(loss_or_vec, tuple) else loss_or_vec
        assert np.all(np.isfinite(value)) or np.all(np.isnan(value))
        return
    with pytest.raises(exc, match=match):
        call(*args)


def test_float32_network_refuses_values_it_cannot_hold():
    net = Network([2, 1], output="identity", dtype=np.float32)
    theta = net.init_params(random_state=0)
    with pytest.raises(ValueError, match="too large for float32"):
        net.loss_grad(theta, np.array([[1e300, 0.0]]), [[1.0]])
    with pytest.raises(ValueError, match="theta"):
        net.forward(np.array([1e300, 0.0, 0.0]), [[1.0, 1.0]])


def test_forward_accepts_empty_input_and_refuses_nan():
    net, theta, X, _ = _net_problem()
    assert net.forward(theta, X[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="NaN"):
        net.forward(theta, _with(X, 0, np.inf))


# ---------------------------------------------------------------------------------------
# Input: the estimators (more cases in test_estimators.py)


def _xy(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    return X, (X[:, 0] + X[:, 1] > 0).astype(int), X[:, 0] - X[:, 2]


@pytest.mark.parametrize("case,make,match", [
    ("inf-X", lambda X, y, yr: (MLPClassifier(), _with(X, 4, np.inf), y), "infinity"),
    ("nan-sparse-X", lambda X, y, yr: (MLPClassifier(), sp.csr_matrix(_with(X, 4, np.nan)),
                                       y), "NaN"),
    ("nan-y-regressor", lambda X, y, yr: (MLPRegressor(), X, _with(yr, 3, np.nan)), "NaN"),
    ("inf-y-regressor", lambda X, y, yr: (MLPRegressor(), X, _with(yr, 3, np.inf)),
     "infinity"),
    ("nan-label", lambda X, y, yr: (MLPClassifier(), X, _with(y, 3, np.nan)), "NaN"),
    ("3-D-X", lambda X, y, yr: (MLPClassifier(), X[None], y), "dim"),
    ("2-D-labels-wrong-rows", lambda X, y, yr: (MLPRegressor(), X, np.c_[yr, yr][:-1]),
     "inconsistent numbers of samples"),
])
@pytest.mark.parametrize("solver", ["adam", "lbfgs", "hessian-free"])
def test_estimators_refuse_non_finite_and_malformed_input(case, make, match, solver):
    est, X, y = make(*_xy())
    est.set_params(solver=solver)
    with pytest.raises(ValueError, match=match):
        est.fit(X, y)


@pytest.mark.parametrize("solver", ["adam", "lbfgs", "hessian-free"])
def test_predict_refuses_non_finite_input(solver):
    X, y, _ = _xy()
    clf = MLPClassifier((4,), solver=solver, max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    for bad in (_with(X, 0, np.nan), _with(X, 0, np.inf), sp.csr_matrix(_with(X, 0, np.nan))):
        for method in (clf.predict, clf.predict_proba, clf.decision_function):
            with pytest.raises(ValueError, match="NaN|infinity"):
                method(bad)


def _copy_aligned_like(a, like, page=4096):
    """An in-memory, writeable copy of ``a`` whose address has the same offset into a
    page as ``like``'s. Kernels are read in place, and a BLAS may round differently at
    different alignments (MKL does): equal alignment leaves file-backed vs in-memory and
    read-only vs writeable as the only differences, which must change nothing."""
    buf = np.empty(a.nbytes + page, dtype=np.uint8)
    start = (like.ctypes.data - buf.ctypes.data) % page
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % page == like.ctypes.data % page and out.flags.writeable
    return out


def test_memory_mapped_input_trains_and_predicts_like_in_memory(tmp_path):
    X, y, yr = _xy(200)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", yr)
    Xm = np.load(tmp_path / "X.npy", mmap_mode="r")  # read-only memory map
    ym = np.load(tmp_path / "y.npy", mmap_mode="r")
    assert isinstance(Xm, np.memmap) and not Xm.flags.writeable
    X, yr = _copy_aligned_like(Xm, Xm), _copy_aligned_like(ym, ym)
    for solver in ("adam", "lbfgs"):
        kw = dict(hidden_layer_sizes=(6,), solver=solver, max_iter=10, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            a = MLPRegressor(**kw).fit(Xm, ym)
            b = MLPRegressor(**kw).fit(X, yr)
        np.testing.assert_array_equal(a._theta, b._theta)
        np.testing.assert_array_equal(a.predict(Xm), b.predict(X))
    net = Network([5, 3, 1], output="identity")
    theta = net.init_params(random_state=0)
    np.testing.assert_array_equal(net.loss_grad(theta, Xm, ym)[1],
                                  net.loss_grad(theta, X, yr)[1])


# ---------------------------------------------------------------------------------------
# Numerics: divergence is detected and the model stays finite


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_divergence_is_reported_and_weights_stay_finite(solver):
    X, _, yr = _xy(60)
    X = X * 1e200  # finite inputs whose products overflow
    reg = MLPRegressor(hidden_layer_sizes=(4,), solver=solver, max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.raises(DivergenceError, match="non-finite"):
            reg.fit(X, yr)
    assert np.isfinite(reg._theta).all()
    assert all(np.isfinite(c).all() for c in reg.coefs_ + reg.intercepts_)
    # Training again on sane data from there works.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg.set_params(warm_start=True).fit(X / 1e200, yr)
    assert np.isfinite(reg.predict(X / 1e200)).all()


@pytest.mark.parametrize("solver", ["sgd"])  # Adam's steps are bounded by the rate
def test_divergence_from_a_huge_learning_rate(solver):
    X, _, yr = _xy(60)
    reg = MLPRegressor(hidden_layer_sizes=(8,), solver=solver, learning_rate_init=1e12,
                       max_iter=20, random_state=0)
    with pytest.raises(DivergenceError):
        reg.fit(X, yr * 1e6)
    assert np.isfinite(reg._theta).all()


# ---------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_fits_equal_sequential_fits():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3000, 8))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    jobs = [dict(solver=s, random_state=r) for s in ("adam", "lbfgs", "hessian-free", "sgd")
            for r in (0, 1)]

    def fit(kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = MLPClassifier((16,), max_iter=8, batch_size=64, **kw).fit(X, y)
        return est._theta.copy(), est.loss_

    sequential = [fit(kw) for kw in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(fit, jobs))
    for (t1, l1), (t2, l2) in zip(sequential, concurrent):
        np.testing.assert_array_equal(t1, t2)
        assert l1 == l2


# The GIL probe. A worker thread calls a kernel through a thin Python wrapper while this
# thread waits for the GIL. With the switch interval made longer than any probe runs, the
# interpreter never makes a thread hand the GIL over: this thread runs only when the
# worker lets go of the GIL of its own accord (a kernel's `with nogil:`, a blocking
# call). So if this thread, running, finds the worker parked on the wrapper's call
# instruction, the call released the GIL; if the call held it, this thread could not run
# until it returned. Only the order of events counts, never a clock: a loaded machine
# or a single core changes how long the probe takes, not its answer.
GIL_PROBE_SWITCH_INTERVAL = 1000.0  # seconds


def _traced(function):
    def traced(*args, **kwargs):
        return function(*args, **kwargs)
    return traced


def _released_gil_during(traced, work, max_calls):
    """Run ``work`` (which calls ``traced``) up to ``max_calls`` times in a thread; True
    when this thread ran Python while that thread was inside ``traced``'s call."""
    call_offsets = {i.offset for i in dis.get_instructions(traced)
                    if i.opname.startswith("CALL")}
    stop, errors = threading.Event(), []

    def worker():
        try:
            for _ in range(max_calls):
                if stop.is_set():
                    return
                work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_PROBE_SWITCH_INTERVAL)
    seen = False
    try:
        thread.start()  # returns once the worker has let go of the GIL
        while thread.is_alive() and not seen:
            frame = sys._current_frames().get(thread.ident)
            seen = (frame is not None and frame.f_code is traced.__code__
                    and frame.f_lasti in call_offsets)
            if not seen:
                # The worker let go elsewhere (NumPy on big arrays, a ctypes call in
                # threadpoolctl): block, so that it takes the GIL back and goes on.
                time.sleep(1e-3)
    finally:
        stop.set()
        sys.setswitchinterval(old_interval)
    thread.join()
    if errors:
        raise errors[0]
    return seen


def test_gil_probe_tells_a_released_gil_from_a_held_one():
    sleep = _traced(time.sleep)  # releases the GIL while it waits
    assert _released_gil_during(sleep, lambda: sleep(0.01), max_calls=100)
    add = _traced(sum)  # one C loop over a range: holds the GIL throughout
    assert not _released_gil_during(add, lambda: add(range(300_000)), max_calls=5)


def _kernel_calls():
    """One call of each kernel entry point, the way the library makes it; each takes
    some tens of milliseconds (0.5 GFLOP for the full-batch passes)."""
    rng = np.random.default_rng(0)
    n = 8000
    net = Network([64, 128, 10], activation="tanh", n_jobs=1)
    theta = net.init_params(random_state=0)
    d = net.prepare(rng.normal(size=(n, 64)), np.eye(10)[rng.integers(0, 10, n)])
    v = rng.normal(size=net.n_params)
    out = np.empty(net.n_params)
    opt = StochasticOptimizer("adam", net.n_params, np.float64, 1e-3)
    theta_adam, order = theta.copy(), np.arange(n, dtype=np.intp)
    return {
        "loss_grad": lambda: net._loss_grad(theta, d, 1e-4, out),
        "forward": lambda: net._forward(theta, d),
        "curvature_product": lambda: net._curvature(theta, v, d, 1e-4, True, out),
        "fisher_diag": lambda: net._fisher(theta, d, out),
        "run_epoch": lambda: opt.epoch(net, theta_adam, d, order, True, 0, 64, 1e-4, 1),
    }


@pytest.mark.parametrize("kernel", ["loss_grad", "forward", "curvature_product",
                                    "fisher_diag", "run_epoch"])
def test_kernels_release_the_gil(kernel, monkeypatch):
    work = _kernel_calls()[kernel]
    traced = _traced(getattr(_core, kernel))
    monkeypatch.setattr(_core, kernel, traced)  # the library looks kernels up on _core
    assert _released_gil_during(traced, work, max_calls=200)


# ---------------------------------------------------------------------------------------
# Memory


try:  # glibc: give free heap memory back to the system
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (AttributeError, OSError, TypeError):  # other C libraries
    _MALLOC_TRIM = None


def _resident_bytes():
    """Resident set size, counting memory in use rather than memory the allocator keeps
    for reuse: a cyclic collection, then glibc's malloc_trim(0), which hands free heap
    pages back (glibc otherwise keeps up to twice a fit's largest freed block)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return psutil.Process().memory_info().rss


# 64 features -> 256 tanh units -> 1 logistic output: 16,897 float64 parameters, a
# 132 KiB parameter vector; the same sizes everywhere (n_jobs is fixed, so are the
# per-thread workspaces).
LEAK_CHECK = dict(n_samples=300, n_features=64, hidden=256, fits=100, warm_up=20)


def _leak_limit(vector_bytes):
    """What the RSS may grow between the readings after fits ``warm_up`` and ``fits``.

    A leak adds at least one parameter vector per fit (a leaked copy of theta, of a
    gradient, of an optimizer state; a leaked workspace, data copy or estimator is
    larger): (fits - warm_up) x vector_bytes = 80 x 132 KiB = 10.3 MiB over the 80 fits
    between the readings. The limit is half that, 40 vectors (5.2 MiB): any leak of more
    than half a vector per fit fails. Without a leak the readings differ by the allocator's
    granularity only (partly used pages and pymalloc pools, the readings being taken
    after malloc_trim): under 0.5 MiB over 200 fits of each solver where measured, a
    tenth of the limit; the allocator's reuse of freed blocks is settled by the first
    reading (fit 20).
    """
    return (LEAK_CHECK["fits"] - LEAK_CHECK["warm_up"]) * vector_bytes / 2


def test_rss_readings_see_a_leak_of_one_parameter_vector_per_fit():
    n_params = LEAK_CHECK["n_features"] * LEAK_CHECK["hidden"] + 2 * LEAK_CHECK["hidden"] + 1
    before = _resident_bytes()
    leaked = [np.ones(n_params) for _ in range(LEAK_CHECK["fits"] - LEAK_CHECK["warm_up"])]
    growth = _resident_bytes() - before
    assert growth > _leak_limit(leaked[0].nbytes), growth


@pytest.mark.parametrize("solver", ["adam", "lbfgs", "hessian-free"])
def test_one_hundred_fits_do_not_grow_memory(solver):
    c = LEAK_CHECK
    rng = np.random.default_rng(0)
    X = rng.normal(size=(c["n_samples"], c["n_features"]))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    rss = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for i in range(1, c["fits"] + 1):
            est = MLPClassifier((c["hidden"],), activation="tanh", solver=solver, max_iter=3,
                                n_jobs=2, random_state=i).fit(X, y)
            if i in (c["warm_up"], c["fits"]):
                rss[i] = _resident_bytes()
    vector_bytes = est._theta.nbytes
    assert vector_bytes == (c["n_features"] * c["hidden"] + 2 * c["hidden"] + 1) * 8
    growth, limit = rss[c["fits"]] - rss[c["warm_up"]], _leak_limit(vector_bytes)
    assert growth < limit, (f"RSS grew by {growth / 2**20:.2f} MiB over "
                            f"{c['fits'] - c['warm_up']} fits (limit {limit / 2**20:.2f} MiB:"
                            f" half a {vector_bytes // 1024} KiB parameter vector per fit)")


VALGRIND_SCRIPT = """
import warnings
import numpy as np, scipy.sparse as sp
import fastbp
warnings.simplefilter("ignore")
rng = np.random.default_rng(0)
for dtype in (np.float64, np.float32):
    for act in ("relu", "tanh"):
        net = fastbp.Network([5, 7, 3], activation=act, output="softmax", dtype=dtype,
                             block_size=8, n_jobs=2)
        th = net.init_params(0)
        X = rng.normal(size=(37, 5)).astype(dtype)
        Y = np.eye(3, dtype=dtype)[rng.integers(0, 3, 37)]
        sw = rng.uniform(0, 2, 37)
        v = rng.normal(size=net.n_params)
        for Xv in (X, np.asfortranarray(X), sp.csr_matrix(X)):
            net.loss_grad(th, Xv, Y, sw, alpha=0.1)
            net.forward(th, Xv)
            net.gnvp(th, v, Xv, Y, sw, 0.1)
            net.hessp(th, v, Xv, Y, sw, 0.1)
            net._fisher(th, net.prepare(Xv, Y, sw), np.empty(net.n_params, dtype))
Xf = rng.normal(size=(60, 4))
yf = rng.integers(0, 3, 60)
for solver in ("adam", "sgd", "lbfgs", "hessian-free"):
    fastbp.MLPClassifier((6,), solver=solver, max_iter=2, batch_size=8,
                         n_jobs=2).fit(Xf, yf)
# The units split of a minibatch (forced: the plan keeps it for wider layers): 3 parts
# of 20 units (16, 4 and an empty one in float32 lines of 16; 8, 8 and 4 in float64
# lines of 8), a short last minibatch, gelu's kept derivative and sample weights; with
# one hidden layer, and with two more on the threads' copies.
import fastbp._estimators
fastbp._estimators.minibatch_plan = lambda *a, **k: ("units", 3)
for dtype in (np.float32, np.float64):
    for solver, act in (("adam", "gelu"), ("sgd", "relu")):
        for hidden in ((20,), (20, 9, 5)):
            fastbp.MLPClassifier(hidden, solver=solver, activation=act, max_iter=2,
                                 batch_size=7, n_jobs=2, alpha=0.01).fit(
                Xf.astype(dtype), yf, sample_weight=rng.uniform(0.5, 2, 60))
print("kernels ok")
"""


# Frames in the kernels' sources: the index _kernels.pxi and the files it includes.
KERNEL_SOURCES = ("_kernels.pxi:",) + tuple(
    f"{p.name}:" for p in sorted((ROOT / "fastbp" / "_kernels").glob("*.pxi")))


def _memcheck_errors_in(text, marker=("_core.cpython", "__pyx_", "fastbp_5_core",
                                       "_core.c:", "_kernels_") + KERNEL_SOURCES,
                        depth=4):
    """Memcheck error records with one of the top ``depth`` stack frames in fastbp's
    extensions: the dispatcher ``_core`` or a kernel variant ``_kernels_<isa>`` (deeper
    frames are the interpreter calling into everything)."""
    records, cur = [], None
    for line in text.splitlines():
        m = re.match(r"==\d+== (.*)$", line)
        if not m:
            continue
        body = m.group(1)
        if re.match(r"(Invalid (read|write|free)|Conditional jump|Use of uninitialised|"
                    r"Syscall param|Mismatched free|Source and destination overlap)", body):
            cur = [body]
            records.append(cur)
        elif cur is not None and body.strip():
            cur.append(body)
        else:
            cur = None
    return [r for r in records
            if any(any(k in ln for k in marker) for ln in r[1:1 + depth])]


def test_memcheck_parser_finds_errors_in_the_extension():
    fake = "\n".join([
        "==1== Invalid read of size 8",
        "==1==    at 0x1: __pyx_f_6fastbp_5_core_block_pass (in /x/_core.so)",
        "==1==    by 0x2: PyEval (ceval.c:1)",
        "==1== ",
        "==1== Use of uninitialised value of size 8",
        "==1==    at 0x5: memcpy (string.c:1)",
        "==1==    by 0x6: ??? (in /x/fastbp/_core.cpython-311-x86_64-linux-gnu.so)",
        "==1== ",
        "==1== Invalid write of size 4",
        "==1==    at 0x9: ??? (in /x/fastbp/_kernels_avx2.cpython-311-x86_64-linux-gnu.so)",
        "==1== ",
        "==1== Conditional jump or move depends on uninitialised value(s)",
        "==1==    at 0x7: long_bitwise (longobject.c:5074)",
        "==1==    by 0x8: do_call_core (ceval.c:7352)",
        "==1== ",
        "==1== Invalid read of size 8",
        "==1==    at 0x3: strncmp (strcmp.S:160)",
        "==1== ",
    ])
    found = _memcheck_errors_in(fake)
    assert len(found) == 3 and "block_pass" in found[0][1] and "memcpy" in found[1][1]
    assert "_kernels_avx2" in found[2][1]


def test_kernels_are_clean_under_valgrind_memcheck(tmp_path):
    if shutil.which("valgrind") is None:
        if os.environ.get("CI"):
            pytest.fail("valgrind is not installed, and CI is set: CI must install valgrind "
                        "(this memcheck of the kernels runs on CI)")
        pytest.skip("valgrind is not installed and CI is not set: the memcheck of the "
                    "kernels runs on CI only (install valgrind to run it here)")
    script = tmp_path / "kernels.py"
    script.write_text(VALGRIND_SCRIPT)
    # The interpreter as invoked: a virtual environment's python is a symlink, and the
    # environment is found from that path (its pyvenv.cfg), so resolving it would run
    # Python without the environment's packages. It must be the binary itself, not a
    # script that starts it (valgrind would trace the shell).
    python = sys.executable
    with open(python, "rb") as fh:
        assert fh.read(2) != b"#!", f"{python} is a script, not the interpreter"
    env = dict(os.environ, PYTHONMALLOC="malloc")
    # valgrind's CPU has no AVX-512: a BLAS or kernel variant forced by the environment
    # (OPENBLAS_CORETYPE=SkylakeX, FASTBP_KERNELS=avx512) could not run on it; each
    # library picks for the CPU it sees, as on a real CPU without AVX-512.
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("FASTBP_KERNELS", None)
    res = subprocess.run(["valgrind", "--tool=memcheck", "--leak-check=no",
                          "--error-exitcode=0", python, str(script)],
                         capture_output=True, text=True, timeout=900, env=env)
    # valgrind cannot decode every vector instruction (AVX-512 among them): a build
    # for the building CPU (FASTBP_NATIVE=1, -march=native) dies of SIGILL under it,
    # while the default build picks kernels valgrind's CPU can run.
    assert "unhandled instruction bytes" not in res.stderr, (
        "valgrind cannot decode an instruction of the build (built with FASTBP_NATIVE=1? "
        "the default build is portable):\n" + res.stderr[-3000:])
    python_stderr = "\n".join(ln for ln in res.stderr.splitlines() if not ln.startswith("=="))
    assert "kernels ok" in res.stdout, python_stderr[-3000:] or res.stderr[-3000:]
    assert "Memcheck" in res.stderr  # valgrind really ran python
    errors = _memcheck_errors_in(res.stderr)
    assert errors == [], "\n\n".join("\n".join(r[:12]) for r in errors[:3])


def test_debug_build_passes_the_kernel_tests(tmp_path):
    """Build the extension with bounds checking (FASTBP_DEBUG=1) in a copy of the tree
    and run the kernel-level tests against that build."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "*.so", "*.c", ".git", "__pycache__", "benchmarks"))
    env = dict(os.environ, FASTBP_DEBUG="1")
    env.pop("FASTBP_KERNELS", None)  # the debug build has the baseline kernels only
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=src, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    # A debug build holds the baseline kernels only, with bounds checks compiled in.
    assert not list((src / "fastbp").glob("_kernels_avx*.c"))
    c_source = (src / "fastbp" / "_kernels_baseline.c").read_text()
    assert "__Pyx_RaiseBufferIndexError" in c_source or "IndexError" in c_source
    env["PYTHONPATH"] = str(src)
    probe = subprocess.run([sys.executable, "-c", "import fastbp; print(fastbp.__file__)"],
                           cwd=src, env=env, capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(src)), probe.stdout + probe.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/test_core.py", "tests/test_threads.py",
                          "tests/test_curvature.py", "tests/test_hessian_free.py"],
                         cwd=src, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", run.stdout)


# ---------------------------------------------------------------------------------------
# Interrupts


SIGINT_SCRIPT = """
import signal
# Python installs its SIGINT handler only when SIGINT is not ignored at start-up, and a
# child of a non-interactive background job (or of `trap '' INT`) inherits it ignored:
# restore the interpreter's default handler first, and say what was inherited.
inherited = signal.getsignal(signal.SIGINT)
signal.signal(signal.SIGINT, signal.default_int_handler)
print("inherited SIGINT:", "ignored" if inherited == signal.SIG_IGN else "default",
      flush=True)
import sys, warnings
import numpy as np
import fastbp
solver, max_iter = sys.argv[1], int(sys.argv[3])
rng = np.random.default_rng(0)
X = rng.normal(size=(20000, 20))
y = (X[:, 0] * X[:, 1] + X[:, 2] > 0).astype(int)
clf = fastbp.MLPClassifier((64,), solver=solver, max_iter=max_iter, tol=0.0,
                           n_iter_no_change=max_iter, random_state=0)
def progress(n_iter, loss):
    print(f"iteration {n_iter} loss {loss}", flush=True)
clf._progress_callback = progress
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    clf.fit(X, y)
print("interrupted:", any("interrupted" in str(w.message) for w in caught), flush=True)
del clf._progress_callback
fastbp.save(clf, sys.argv[2])
print("saved after", clf.n_iter_, "iterations", flush=True)
"""
# Far more iterations than a fit runs before the signal: Adam (tol=0) would run for
# hours and hit the timeout below; L-BFGS and Hessian-free may stop on their own
# criteria, which the 'interrupted' warning (issued only on KeyboardInterrupt) tells apart.
SIGINT_MAX_ITER = 100_000


@pytest.mark.parametrize("inherited", ["default", "ignored"])
@pytest.mark.parametrize("solver", ["adam", "lbfgs", "hessian-free"])
def test_sigint_during_a_long_fit_leaves_a_usable_model(tmp_path, solver, inherited):
    # The child starts with SIGINT at its default or ignored (as under a background job),
    # whatever the disposition of this process: both launch contexts are tested anywhere.
    disposition = signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL
    script = tmp_path / "fit.py"
    script.write_text(SIGINT_SCRIPT)
    model = tmp_path / "model.fbp"
    proc = subprocess.Popen(
        [sys.executable, str(script), solver, str(model), str(SIGINT_MAX_ITER)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("iteration 3 "):
                proc.send_signal(signal.SIGINT)
                sent = True
                break
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the child still ran {solver} 120 s after SIGINT: the signal was "
                        f"not delivered or not handled (inherited {inherited})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines += out.splitlines()
    assert sent, "".join(lines[-5:]) + err[-2000:]
    assert proc.returncode == 0, err[-2000:]
    # The child really started in the launch context under test ...
    assert lines[0].strip() == f"inherited SIGINT: {inherited}", lines[:2]
    # ... the signal reached fit as a KeyboardInterrupt, which stopped it early ...
    assert any(line.startswith("interrupted: True") for line in lines), lines[-5:]
    saved = [m for m in map(re.compile(r"saved after (\d+) iterations").match, lines) if m]
    assert len(saved) == 1, lines[-5:]
    n_iter = int(saved[0].group(1))
    assert 3 <= n_iter < SIGINT_MAX_ITER
    # ... and the saved model is the usable one it stopped with.
    clf = fastbp.load(model)
    assert clf.n_iter_ == n_iter
    X = np.random.default_rng(1).normal(size=(100, 20))
    proba = clf.predict_proba(X)
    assert np.isfinite(proba).all() and np.isfinite(clf._theta).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
