"""fastbp as a guest in its user's process: thread counts that follow the process's limits,
the minibatch parallelism plan, BLAS limits restored exactly, results that do not depend
on how many threads ran, and the O(n_params) check of a fit's final parameters."""
import os
import pathlib
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_info, threadpool_limits

import fastbp
from fastbp import MLPClassifier, MLPRegressor, Network, _core, _threads
from fastbp._divergence import DivergenceError
from fastbp._stochastic import StochasticOptimizer

ROOT = str(pathlib.Path(fastbp.__file__).resolve().parents[1])
CPUS = _threads.cpu_count()


def _run(code, **env):
    """Run ``code`` in a fresh interpreter that imports this fastbp; return its stdout."""
    full = dict(os.environ, PYTHONPATH=ROOT, **env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                         text=True, cwd=pathlib.Path(ROOT).parent, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _blobs(n=600, d=8, k=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = (rng.normal(size=(k, d))[y] * 2 + rng.normal(size=(n, d))).astype(dtype)
    return X, y


# --- Thread counts --------------------------------------------------------------------

def test_default_follows_openmp_limits():
    assert _threads.effective_n_jobs(None) == min(_core.openmp_max_threads(), CPUS)
    with threadpool_limits(1, user_api="openmp"):
        assert _threads.effective_n_jobs(None) == 1
        # An explicit n_jobs wins over the limit.
        assert _threads.effective_n_jobs(3) == 3
        assert _threads.effective_n_jobs(-1) == CPUS


def test_default_follows_omp_num_threads_in_a_fresh_process():
    out = _run("import fastbp; print(fastbp.show_config(mode='dicts')['threads']"
               "['n_jobs_default'])", OMP_NUM_THREADS="1")
    assert out.split()[-1] == "1"


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fits_under_an_openmp_limit_use_one_thread():
    X, y = _blobs()
    with threadpool_limits(1, user_api="openmp"):
        full = MLPClassifier((8,), solver="lbfgs", max_iter=5, random_state=0).fit(X, y)
        mini = MLPClassifier((8,), batch_size=64, max_iter=2, random_state=0).fit(X, y)
    assert full.parallelism_ == {"mode": "blocks", "threads": 1}
    assert mini.parallelism_ == {"mode": "serial", "threads": 1}


def test_joblib_workers_get_their_share_of_the_cores():
    from joblib import Parallel, delayed
    counts = Parallel(n_jobs=2, backend="loky")(
        delayed(_threads.effective_n_jobs)(None) for _ in range(2))
    assert all(1 <= c <= max(1, CPUS // 2) for c in counts), counts


def test_dask_worker_threads_are_used():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=3, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        assert client.submit(_threads.effective_n_jobs, None).result() == 3


# --- The minibatch plan -----------------------------------------------------------------

def test_plan_team_for_small_networks_blas_for_large_ones(monkeypatch):
    monkeypatch.setattr(_threads, "effective_n_jobs", lambda n_jobs: 2)
    monkeypatch.setattr(_threads, "_blas_max_threads", lambda: 2)
    monkeypatch.setattr(_threads, "last_level_cache_bytes", lambda: 8 * 2**20)
    small = [784, 100, 10]            # 79510 parameters, 3.2 Mflop per 10 samples
    # Three gradient-sized arrays fit in 8 MiB, and each thread gets 100 rows: a team.
    assert _threads.minibatch_plan(None, 200, small, 8) == ("team", 2)
    # Fewer than 16 rows per thread: no team.
    assert _threads.minibatch_plan(None, 20, small, 8) == ("serial", 1)
    # Too little arithmetic per thread between barriers (adam-small's shapes): no team.
    assert _threads.flops_per_sample([64, 128, 10]) * 32 < 2 * _threads.MIN_TEAM_WORK
    assert _threads.minibatch_plan(None, 32, [64, 128, 10], 4) == ("serial", 1)
    # ... but a units split, when the data allow it: 128 units for 32 rows, two parts of
    # 64 (whole cache lines), more than an eighth of a team's work each.
    assert _threads.minibatch_plan(None, 32, [64, 128, 10], 4, units_ok=True) == \
        ("units", 2)
    # With more hidden layers, while what every thread repeats (the products above the
    # second layer) is at most an eighth of a part's share of the first two: the
    # adam-mnist-like shapes repeat 7,680 flops per sample against 999,424 split in 2.
    assert _threads._units_flops([784, 256, 128, 10]) == (999424, 7680)
    assert _threads.minibatch_plan(None, 128, [784, 256, 128, 10], 4, units_ok=True) == \
        ("units", 2)
    assert _threads.minibatch_plan(None, 32, [64, 128, 128, 10], 4, units_ok=True) == \
        ("units", 2)   # 7,680 repeated, 131,072 split: 8 x 2 x 7,680 <= 131,072
    assert _threads.minibatch_plan(None, 32, [64, 128, 128, 128, 10], 4,
                                   units_ok=True) == ("team", 2)   # 105,984 repeated
    # Not with fewer units than rows; nor parts narrower than a cache line (16 float32
    # units), nor too little work.
    assert _threads.minibatch_plan(None, 200, small, 8, units_ok=True) == ("team", 2)
    assert _threads.minibatch_plan(None, 16, [4096, 16, 10], 4, units_ok=True)[0] != \
        "units"
    assert _threads.minibatch_plan(None, 4, [4, 64, 2], 4, units_ok=True) == ("serial", 1)
    # Long minibatches keep the team (or BLAS), however wide the layer.
    assert _threads.minibatch_plan(None, 512, [256, 2048, 10], 4, units_ok=True)[0] == \
        "team"
    assert _threads.minibatch_plan(None, 256, [100, 512, 10], 4, units_ok=True) == \
        ("units", 2)
    work = _threads.flops_per_sample([20, 64, 2]) * 2 * 32   # float64 counts twice
    assert 2 * _threads.MIN_TEAM_WORK / 8 <= work < 3 * _threads.MIN_TEAM_WORK / 8
    assert _threads.minibatch_plan(None, 32, [20, 64, 2], 8, units_ok=True) == ("units", 2)
    monkeypatch.setattr(_threads, "effective_n_jobs", lambda n_jobs: 4)
    assert _threads.minibatch_plan(None, 32, [64, 128, 10], 4, units_ok=True) == \
        ("units", 4)   # 4 parts of 32 units, the work allows 9
    # More threads than the repeated layers allow parts: as many parts as they do
    # (131,072 // (8 x 7,680) = 2), not none.
    assert _threads.minibatch_plan(None, 32, [64, 128, 128, 10], 4, units_ok=True) == \
        ("units", 2)
    assert _threads.minibatch_plan(None, 32, [64, 128, 10], 8, units_ok=True) == \
        ("units", 4)   # 4 parts of 32 float64 units (4 lines each)
    # No part left empty: 100 float32 units in parts of whole lines (16 units) for 6
    # threads are 4 parts of 32, 32, 32 and 4 units, not 6 parts of which 2 are empty;
    # 72 float64 units (lines of 8) are 5 parts of 16, 16, 16, 16 and 8.
    monkeypatch.setattr(_threads, "effective_n_jobs", lambda n_jobs: 6)
    assert _threads.minibatch_plan(None, 64, [200, 100, 10], 4, units_ok=True) == \
        ("units", 4)
    assert _threads.minibatch_plan(None, 64, [784, 72, 10], 8, units_ok=True) == \
        ("units", 5)
    monkeypatch.setattr(_threads, "effective_n_jobs", lambda n_jobs: 2)
    # The weights and per-thread gradients would not fit the cache: one thread, BLAS on
    # both cores.
    big = [1024, 1024, 10]
    assert _threads.minibatch_plan(None, 1024, big, 4) == ("blas", 2)
    # BLAS limited to one thread by the user: no BLAS threads either.
    monkeypatch.setattr(_threads, "_blas_max_threads", lambda: 1)
    assert _threads.minibatch_plan(None, 1024, big, 4) == ("serial", 1)


def test_plan_single_thread_is_serial():
    assert _threads.minibatch_plan(1, 1024, [4096, 4096, 10], 8) == ("serial", 1)


def test_last_level_cache_is_a_sane_size():
    size = _threads.last_level_cache_bytes()
    assert 2**16 <= size <= 2**32


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fitted_estimator_reports_its_parallelism():
    X, y = _blobs(n=400, d=200)
    clf = MLPClassifier((256,), batch_size=64, max_iter=2, n_jobs=2, random_state=0).fit(X, y)
    assert clf.parallelism_ == {"mode": "units", "threads": 2}  # 256 units >= 64 rows
    clf = MLPClassifier((256,), batch_size=64, max_iter=2, n_jobs=2, random_state=0,
                        dropout=0.1).fit(X, y)
    assert clf.parallelism_ == {"mode": "team", "threads": 2}  # no units split with dropout
    clf = MLPClassifier((256,), batch_size=64, max_iter=2, n_jobs=2,
                        random_state=0).fit(sp.csr_matrix(X), y)
    assert clf.parallelism_ == {"mode": "team", "threads": 2}  # nor with sparse X
    clf = MLPClassifier((128,), batch_size=256, max_iter=2, n_jobs=2,
                        random_state=0).fit(X, y)
    assert clf.parallelism_ == {"mode": "team", "threads": 2}  # fewer units than rows
    clf = MLPClassifier((8,), batch_size=64, max_iter=2, n_jobs=2, random_state=0).fit(X, y)
    assert clf.parallelism_ == {"mode": "serial", "threads": 1}  # too little work
    clf = MLPClassifier((256,), batch_size=64, max_iter=2, n_jobs=1, random_state=0).fit(X, y)
    assert clf.parallelism_ == {"mode": "serial", "threads": 1}


# --- BLAS limits ----------------------------------------------------------------------

def _blas_threads():
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("mode", ["team", "units", "blas"])
def test_blas_limits_are_restored_exactly(monkeypatch, mode):
    X, y = _blobs(n=400)
    monkeypatch.setattr("fastbp._estimators.minibatch_plan",
                        lambda n_jobs, batch, n_params, itemsize, units_ok: (mode, 2))
    seen = []
    original = StochasticOptimizer.epoch

    def spy(self, *args, **kwargs):
        seen.append(max(n for _, n in _blas_threads()))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(StochasticOptimizer, "epoch", spy)
    before = _blas_threads()
    MLPClassifier((8,), batch_size=64, max_iter=2, random_state=0).fit(X, y)
    assert _blas_threads() == before
    assert seen == [1 if mode != "blas" else min(2, max(n for _, n in before))] * 2
    # A user's own limit is kept during the fit (a 'blas' fit never raises it) and after.
    with threadpool_limits(1, user_api="blas"):
        limited = _blas_threads()
        seen.clear()
        MLPClassifier((8,), batch_size=64, max_iter=2, random_state=0).fit(X, y)
        assert _blas_threads() == limited
    assert set(seen) == {1}
    assert _blas_threads() == before


def test_concurrent_limits_take_the_smallest_and_restore_the_original():
    before = _blas_threads()
    with _threads.blas_threads(2):
        with _threads.single_threaded_blas():
            assert {n for _, n in _blas_threads()} == {1}
        assert {n for _, n in _blas_threads()} <= {min(2, n) for _, n in before}
    assert _blas_threads() == before


# --- Chunks: the result does not depend on how many threads ran --------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_epoch_result_depends_on_chunks_not_threads(dtype, solver):
    X, y = _blobs(n=1000, d=12, k=4, dtype=dtype)
    net = Network([12, 32, 16, 4], dtype=dtype)
    data = net.prepare(X, np.eye(4, dtype=dtype)[y])
    results = {}
    for threads in (1, 2, 3):
        theta = net.init_params(random_state=0)
        opt = StochasticOptimizer(solver, net.n_params, net.dtype, 1e-3, "constant", 0.9,
                                  True, 0.5, 0.9, 0.999, 1e-8)
        grads, work, dacc = opt._buffers(net, 3, 96, False)
        order = np.arange(1000, dtype=np.intp)
        total, _ = _core.run_epoch(
            theta, grads, data.X, None, None, None, data.Y, None, net._sizes, net._w_off,
            net._b_off, net._acts, net._out, work, dacc, order, True, 7, 96, 1e-4,
            _core.SOLVERS[solver], 1e-3, 0.9, True, 0.9, 0.999, 1e-8, opt.state_1,
            opt.state_2, opt.step, 3, threads, threads == 1)
        results[threads] = (total, theta)
    for threads in (2, 3):
        assert results[threads][0] == results[1][0]
        np.testing.assert_array_equal(results[threads][1], results[1][1])


def _direct_epoch(order, n_chunks, n_threads):
    """run_epoch called directly, as the kernels' own callers never would: 64 rows of a
    4-8-2 network, Adam, batches of 32."""
    net = Network([4, 8, 2])
    X, y = _blobs(n=64, d=4, k=2)
    data = net.prepare(X, np.eye(2)[y])
    theta = net.init_params(random_state=0)
    opt = StochasticOptimizer("adam", net.n_params, net.dtype, 1e-3, "constant", 0.9, True,
                              0.5, 0.9, 0.999, 1e-8)
    grads, work, dacc = opt._buffers(net, n_chunks, 32, False)
    _core.run_epoch(theta, grads, data.X, None, None, None, data.Y, None, net._sizes,
                    net._w_off, net._b_off, net._acts, net._out, work, dacc, order, False, 0,
                    32, 0.0, 1, 1e-3, 0.9, True, 0.9, 0.999, 1e-8, opt.state_1,
                    opt.state_2, opt.step, n_chunks, n_threads)


def test_run_epoch_refuses_more_threads_than_chunks():
    with pytest.raises(ValueError, match="n_threads <= n_chunks"):
        _direct_epoch(np.arange(64, dtype=np.intp), 2, 3)


@pytest.mark.parametrize("bad_row", [64, -1])
def test_run_epoch_refuses_row_indices_outside_the_data(bad_row):
    """A direct caller's order is checked against the rows before any is read."""
    order = np.arange(64, dtype=np.intp)
    order[10] = bad_row
    with pytest.raises(ValueError, match="outside the 64 rows"):
        _direct_epoch(order, 1, 1)


def test_busy_machine_runs_fewer_threads_and_never_spins(monkeypatch):
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    monkeypatch.setattr(_threads, "_machine_cpus", lambda: 2)
    monkeypatch.setattr(_threads, "_others_runnable", lambda: 0)
    assert _threads.team_for_now(2) == (2, True)
    # One core taken by other work: one thread runs both chunks.
    monkeypatch.setattr(_threads, "_others_runnable", lambda: 1)
    assert _threads.team_for_now(2)[0] == 1
    # More runnable threads than cores even for one thread: waiters must not spin.
    monkeypatch.setattr(_threads, "_others_runnable", lambda: 5)
    assert _threads.team_for_now(4) == (1, False)
    # A process allowed 4 of a machine's 8 CPUs, 3 of them busy elsewhere: the machine
    # still has free CPUs, and the process's own 4 bound the team.
    monkeypatch.setattr(_threads, "cpu_count", lambda: 4)
    monkeypatch.setattr(_threads, "_machine_cpus", lambda: 8)
    monkeypatch.setattr(_threads, "_others_runnable", lambda: 3)
    assert _threads.team_for_now(4) == (4, True)
    monkeypatch.setattr(_threads, "_others_runnable", lambda: 6)
    assert _threads.team_for_now(4) == (2, True)
    # No instantaneous count (not Linux): every chunk gets its thread.
    monkeypatch.setattr(_threads, "_others_runnable", lambda: None)
    assert _threads.team_for_now(4) == (4, True)
    assert _threads.team_for_now(1) == (1, True)


def test_last_level_cache_is_read_from_the_os():
    import glob
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20,
                                                 "G": 2**30}.get(text[-1:], 1))
    if not sizes:
        pytest.skip("this OS does not describe its caches under /sys")
    assert _threads.last_level_cache_bytes() >= max(sizes)


def test_a_build_without_openmp_leaves_the_cpus_to_blas(monkeypatch):
    monkeypatch.setattr(_core, "build_info", lambda: {"isa": "baseline", "openmp": 0})
    assert _threads.effective_n_jobs(None) == CPUS


def test_plan_ignores_limits_fastbp_itself_holds():
    with _threads.single_threaded_blas():
        inside = _threads._blas_max_threads()
    assert inside == _threads._blas_max_threads()


def test_failed_limit_leaves_no_registration(monkeypatch):
    def broken():
        raise RuntimeError("threadpoolctl failed")
    monkeypatch.setattr(_threads, "_apply", broken)
    with pytest.raises(RuntimeError, match="threadpoolctl"):
        with _threads.blas_threads(1):
            pass
    assert _threads._ACTIVE == []


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("hidden, batch, mode", [((256,), 64, "units"),
                                                 ((128,), 256, "team")])
def test_fit_on_a_busy_machine_gives_the_same_model(monkeypatch, hidden, batch, mode):
    X, y = _blobs(n=800, d=200)
    kw = dict(hidden_layer_sizes=hidden, batch_size=batch, max_iter=3, n_jobs=2,
              random_state=0)
    quiet = MLPClassifier(**kw).fit(X, y)
    monkeypatch.setattr(_threads, "_others_runnable", lambda: 10**6)
    busy = MLPClassifier(**kw).fit(X, y)
    assert busy.parallelism_ == quiet.parallelism_ == {"mode": mode, "threads": 2}
    for a, b in zip(quiet.coefs_ + quiet.intercepts_, busy.coefs_ + busy.intercepts_):
        np.testing.assert_array_equal(a, b)


def test_full_batch_fit_under_an_openmp_limit_keeps_one_core_busy():
    if CPUS < 2:
        pytest.skip("needs two CPUs to tell one busy core from two")
    code = """
import time, warnings, numpy as np, fastbp
from threadpoolctl import threadpool_limits
warnings.simplefilter("ignore")
rng = np.random.default_rng(0)
X = rng.normal(size=(40000, 32)); y = rng.integers(0, 4, 40000)
def fit():
    c, t = time.process_time(), time.perf_counter()
    fastbp.MLPClassifier((64,), solver="lbfgs", max_iter=25, random_state=0).fit(X, y)
    return (time.process_time() - c) / (time.perf_counter() - t)
fit()
with threadpool_limits(1, user_api="openmp"):
    print(fit())
"""
    # One thread cannot keep more than one core busy; ignoring the limit would keep two.
    assert float(_run(code).split()[-1]) < 1.3


# --- No hidden pass over the data -----------------------------------------------------

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor])
def test_stochastic_fit_makes_no_extra_pass(monkeypatch, Est):
    X, y = _blobs(n=500)
    calls = []
    original = Network._loss_grad
    monkeypatch.setattr(Network, "_loss_grad",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    Est(hidden_layer_sizes=(16,), batch_size=50, max_iter=3, random_state=0).fit(X, y)
    assert calls == []


def test_bound_certifies_ordinary_parameters_and_refuses_extreme_ones():
    X, y = _blobs(n=200)
    for output, Y in (("softmax", np.eye(3)[y]), ("identity", np.eye(3)[y] * 5.0),
                      ("exp", np.eye(3)[y])):
        if output == "exp":  # its bound grows like exp(z): certified for small inputs
            X = X / 10
        for act in ("relu", "tanh", "logistic", "identity"):
            net = Network([8, 16, 3], activation=act, output=output)
            data = net.prepare(X, Y)
            theta = net.init_params(random_state=0)
            assert net.loss_is_surely_finite(theta, data)
            assert np.isfinite(net.loss_grad(theta, X, Y)[0])
            certified = 0
            factors = (1.5, 2.0, 1e150) if output == "exp" else (1e3, 1e6, 1e12, 1e150)
            for factor in factors:
                big = theta * factor
                if net.loss_is_surely_finite(big, data):  # else the fit measures it
                    certified += 1
                    assert np.isfinite(net.loss_grad(big, X, Y)[0]), (output, act, factor)
            # Large but certifiable parameters exist, and the extreme ones are refused.
            assert 1 <= certified < len(factors), (output, act, certified)
    # Duplicate entries of a sparse X add up in the kernels, so the bound on |x| is the
    # largest sum of |duplicates| (3 here, where no stored value exceeds 2); a float32
    # sum that would overflow is bounded in float64 instead of refused.
    import scipy.sparse as sp
    net = Network([3, 4, 2], activation="relu", output="identity", dtype=np.float32)
    dup = sp.csr_matrix((np.array([2.0, -1.0, 0.5], np.float32), np.array([1, 1, 0]),
                         np.array([0, 2, 3])), shape=(2, 3))
    assert not dup.has_canonical_format
    before = [dup.data.copy(), dup.indices.copy(), dup.indptr.copy()]
    assert net.prepare(dup, np.zeros((2, 2), np.float32)).x_max == 3.0
    for kept, now in zip(before, [dup.data, dup.indices, dup.indptr]):
        np.testing.assert_array_equal(kept, now)  # the caller's matrix is untouched
    big = sp.csr_matrix((np.array([3e38, 3e38], np.float32), np.array([0, 0]),
                         np.array([0, 2, 2])), shape=(2, 3))
    assert net.prepare(big, np.zeros((2, 2), np.float32)).x_max == float(
        np.float32(3e38)) * 2
    canonical = sp.csr_matrix(dup.toarray())  # [[0, 1, 0], [0.5, 0, 0]]
    assert net.prepare(canonical, np.zeros((2, 2), np.float32)).x_max == 1.0
    # The L2 penalty counts too: weights whose squares overflow float64 are refused even
    # where tanh caps what the next layer sees.
    net = Network([3, 4, 2], activation="tanh", output="identity")
    Xs = X[:, :3]
    data = net.prepare(Xs, np.eye(2)[y % 2])
    theta = net.init_params(random_state=0)
    theta[:12] = 1e200
    assert net.loss_is_surely_finite(theta, data) is True  # no penalty: finite indeed
    assert np.isfinite(net.loss_grad(theta, Xs, np.eye(2)[y % 2])[0])
    assert not net.loss_is_surely_finite(theta, data, alpha=1e-4)
    assert not np.isfinite(net.loss_grad(theta, Xs, np.eye(2)[y % 2], alpha=1e-4)[0])
    # Squares each finite in float64 whose total overflows: refused quietly.
    theta = net.init_params(random_state=0)
    theta[:4] = 1.3e154  # the first row of W_1: 1.7e308 per column, finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not net.loss_is_surely_finite(theta, data, alpha=1e-4)
    net = Network([8, 16, 3], output="exp")
    data = net.prepare(X, np.eye(3)[y])
    theta = net.init_params(random_state=0)
    theta[:] = 50.0  # exp(z) overflows float64 for these z: not certified
    assert not net.loss_is_surely_finite(theta, data)
    theta[0] = np.nan
    assert not net.loss_is_surely_finite(theta, data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_sums_match_numpy_and_flag_non_finite_columns(dtype):
    """The bound check's one pass over W: per-column sums of |w| and w^2 in float64."""
    W = np.random.default_rng(0).standard_normal((37, 19)).astype(dtype)
    col, sq = np.empty(19), np.empty(19)
    _core.column_sums(W, col, sq)
    np.testing.assert_allclose(col, np.abs(W).sum(axis=0, dtype=np.float64), rtol=1e-14)
    np.testing.assert_allclose(sq, (W.astype(np.float64) ** 2).sum(axis=0), rtol=1e-14)
    W[3, 4], W[5, 7] = np.nan, -np.inf
    _core.column_sums(W, col, sq)
    assert np.isnan(col[4]) and np.isnan(sq[4])
    assert col[7] == np.inf and sq[7] == np.inf
    assert np.isfinite(np.delete(col, [4, 7])).all()
    with pytest.raises(ValueError, match="one entry per column"):
        _core.column_sums(W, np.empty(18), sq)


@pytest.mark.parametrize("where", ["first weight", "last weight", "first intercept",
                                   "last intercept"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bound_refuses_any_non_finite_parameter(where, bad):
    X, y = _blobs(n=50)
    net = Network([8, 16, 3])
    data = net.prepare(X, np.eye(3)[y])
    theta = net.init_params(random_state=0)
    assert net.loss_is_surely_finite(theta, data)
    coefs, intercepts = net.unpack(theta)
    {"first weight": coefs[0][0], "last weight": coefs[-1][-1],
     "first intercept": intercepts[0], "last intercept": intercepts[-1]}[where][-1] = bad
    assert not np.isfinite(theta).all()
    assert not net.loss_is_surely_finite(theta, data)


def test_uncertain_final_parameters_are_measured_and_divergence_reported(monkeypatch):
    X, y = _blobs(n=300)
    monkeypatch.setattr(Network, "loss_is_surely_finite", lambda self, *args: False)
    calls = []
    original = Network._loss_grad

    def spy(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)
    monkeypatch.setattr(Network, "_loss_grad", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier((8,), batch_size=50, max_iter=2, random_state=0).fit(X, y)
    assert calls == [1]  # measured once, found finite: the fit stands
    assert np.isfinite(clf.loss_)
    monkeypatch.setattr(Network, "_loss_grad", lambda self, *a, **k: np.inf)
    start = MLPClassifier((8,), batch_size=50, max_iter=1, random_state=0, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(Network, "_loss_grad", original)
        start.fit(X, y)
        before = [c.copy() for c in start.coefs_]
        monkeypatch.setattr(Network, "_loss_grad", lambda self, *a, **k: np.inf)
        with pytest.raises(DivergenceError, match="final parameters"):
            start.fit(X, y)
    for a, b in zip(before, start.coefs_):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_blas_mode_is_deterministic_and_agrees_with_serial(monkeypatch):
    # One thread with multi-threaded BLAS: the same model on every run with the same
    # thread count; the serial model up to the rounding of BLAS's threaded GEMMs (which
    # may split sums differently from its single-threaded ones).
    X, y = _blobs(n=512, d=256, k=4, dtype=np.float32)
    # More rows per minibatch than hidden units: no units split.
    kw = dict(hidden_layer_sizes=(256,), batch_size=300, max_iter=2, random_state=0)
    serial = MLPClassifier(n_jobs=1, **kw).fit(X, y)
    monkeypatch.setattr(_threads, "last_level_cache_bytes", lambda: 2**16)
    first = MLPClassifier(n_jobs=2, **kw).fit(X, y)
    again = MLPClassifier(n_jobs=2, **kw).fit(X, y)
    assert serial.parallelism_["mode"] == "serial"
    if CPUS >= 2:
        assert first.parallelism_ == again.parallelism_
        assert first.parallelism_["mode"] in ("blas", "serial")  # serial if BLAS is capped
    for a, b, c in zip(first.coefs_ + first.intercepts_, again.coefs_ + again.intercepts_,
                       serial.coefs_ + serial.intercepts_):
        np.testing.assert_array_equal(a, b)
        # Same start, 4 Adam steps of learning rate 1e-3: a step moves a weight by at most
        # lr (1 - beta_1) / sqrt(1 - beta_2) < 3.2 lr, whatever the gradient's rounding,
        # so the two fits cannot drift further apart than 2 x 4 x 3.2e-3.
        np.testing.assert_allclose(a, c, rtol=0, atol=2 * 4 * 3.2e-3)
