"""Data-parallel training on a Dask cluster (LocalCluster with worker processes)."""
import collections
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import fastbp  # noqa: E402
from fastbp import MLPClassifier, MLPRegressor  # noqa: E402
from fastbp import distributed as fdist  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def digits():
    """Four noisy copies of digits: 7188 rows, four blocks of 2048 rows."""
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    rng = np.random.default_rng(0)
    X = np.concatenate([X + 0.3 * rng.normal(size=X.shape) for _ in range(4)])
    y = np.tile(y, 4)
    w = rng.uniform(0.2, 3.0, len(y))
    return X, y, w


@pytest.fixture(scope="module")
def diabetes():
    """Six noisy copies of diabetes: 2652 rows, two blocks."""
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    y = (y - y.mean()) / y.std()
    rng = np.random.default_rng(1)
    X = np.concatenate([X + 0.1 * rng.normal(size=X.shape) for _ in range(6)])
    y = np.tile(y, 6)
    w = rng.uniform(0.2, 3.0, len(y))
    return X, y, w


def _dask(a, chunks):
    return da.from_array(a, chunks=(chunks,) + (-1,) * (a.ndim - 1))


def _quiet_fit(est, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(*args, **kwargs)


def _assert_same_fit(local, remote):
    # Exact sums make the distributed fit bitwise the local one (far inside the 1e-8
    # relative that is asked for).
    assert remote.loss_ == local.loss_
    assert remote.n_iter_ == local.n_iter_
    np.testing.assert_array_equal(remote._theta, local._theta)
    assert remote.loss_curve_ == local.loss_curve_


def _wait_until(condition, what, timeout=60.0):
    """Poll condition() until it holds; fail saying what did not happen. The timeout only
    bounds a hang: nothing asserts how long it took."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(0.05)


def _workers(client):
    return set(client.scheduler_info()["workers"])


class _TaskLog(distributed.SchedulerPlugin):
    """On the scheduler: how many times each task finished computing
    (processing -> memory), and which workers left. Read it with ``_TaskLog.read``."""
    name = "fastbp-test-task-log"

    def __init__(self):
        self.computed = collections.Counter()
        self.removed = []

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "processing" and finish == "memory":
            self.computed[key] += 1

    def remove_worker(self, scheduler, worker, **kwargs):
        self.removed.append(worker)

    @classmethod
    def read(cls, client):
        """(computed, removed) as they are now on the scheduler."""
        def get(dask_scheduler):
            log = dask_scheduler.plugins[cls.name]
            return dict(log.computed), list(log.removed)
        return client.run_on_scheduler(get)


@pytest.mark.parametrize("solver,max_iter", [("lbfgs", 15), ("tnc", 15), ("newton-cg", 5),
                                             ("trust-krylov", 3), ("hessian-free", 4)])
def test_classifier_matches_the_local_fit(client, digits, solver, max_iter):
    X, y, w = digits
    kw = dict(hidden_layer_sizes=(16,), solver=solver, max_iter=max_iter, random_state=0)
    local = _quiet_fit(MLPClassifier(**kw), X, y, sample_weight=w)
    # Uneven chunks, not aligned to blocks (they are realigned).
    remote = _quiet_fit(MLPClassifier(**kw), _dask(X, 1500), _dask(y, 1500),
                        sample_weight=_dask(w, 1333))
    _assert_same_fit(local, remote)
    np.testing.assert_array_equal(remote.classes_, local.classes_)
    assert remote.n_features_in_ == 64
    np.testing.assert_array_equal(remote.predict(X), local.predict(X))


@pytest.mark.parametrize("solver,max_iter", [("lbfgs", 10), ("hessian-free", 3)])
def test_per_layer_activations_match_the_local_fit(client, digits, solver, max_iter):
    # The workers rebuild the network from its (sizes, activation, ...) spec: a tuple of
    # one activation per hidden layer, gelu's kept pre-activations included.
    X, y, w = digits
    kw = dict(hidden_layer_sizes=(16, 8), activation=["gelu", "softplus"], solver=solver,
              max_iter=max_iter, random_state=0)
    local = _quiet_fit(MLPClassifier(**kw), X, y, sample_weight=w)
    remote = _quiet_fit(MLPClassifier(**kw), _dask(X, 1500), _dask(y, 1500),
                        sample_weight=_dask(w, 1333))
    _assert_same_fit(local, remote)
    assert remote._net.activation == ("gelu", "softplus")


def test_regressor_matches_the_local_fit(client, diabetes):
    X, y, w = diabetes
    kw = dict(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=40, random_state=0)
    local = _quiet_fit(MLPRegressor(**kw), X, y, sample_weight=w)
    remote = _quiet_fit(MLPRegressor(**kw), _dask(X, 1000), _dask(y, 1000),
                        sample_weight=_dask(w, 1000))
    _assert_same_fit(local, remote)
    assert remote.score(X, y) == local.score(X, y)


def test_float32_and_multi_output_regression(client, diabetes):
    X, y, _ = diabetes
    Y = np.c_[y, -0.5 * y].astype(np.float32)
    kw = dict(hidden_layer_sizes=(6,), solver="lbfgs", max_iter=20, random_state=0)
    local = _quiet_fit(MLPRegressor(**kw), X.astype(np.float32), Y)
    remote = _quiet_fit(MLPRegressor(**kw), _dask(X.astype(np.float32), 900),
                        _dask(Y, 900))
    assert remote.coefs_[0].dtype == np.float32
    _assert_same_fit(local, remote)


def test_numpy_input_with_backend_dask(client, digits):
    X, y, w = digits
    kw = dict(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=15, random_state=0)
    local = _quiet_fit(MLPClassifier(**kw), X, y, sample_weight=w)
    seen = []
    original = fdist.DaskObjective.__init__

    def spy(self, client, net, X, *args, **kwargs):
        seen.append(X)
        return original(self, client, net, X, *args, **kwargs)
    fdist.DaskObjective.__init__ = spy
    try:
        remote = _quiet_fit(MLPClassifier(backend="dask", **kw), X, y, sample_weight=w,
                            client=client)
    finally:
        fdist.DaskObjective.__init__ = original
    _assert_same_fit(local, remote)
    # One chunk per worker thread, in whole blocks, built from the task graph (so
    # rebuildable).
    # 7188 rows are cut into blocks of 899 rows: 4 + 4 blocks.
    assert len(seen) == 1 and seen[0].chunks[0] == (3596, 3592)


def test_a_killed_worker_costs_a_recomputation_not_the_fit(client, digits, monkeypatch):
    X, y, w = digits
    kw = dict(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=20, random_state=0)
    local = _quiet_fit(MLPClassifier(**kw), X, y, sample_weight=w)
    objectives = []
    original = fdist.DaskObjective.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        objectives.append(self)
    monkeypatch.setattr(fdist.DaskObjective, "__init__", spy)
    fault = {}

    def kill_one_worker(n_iter, loss):
        if n_iter != 3:
            return
        obj, = objectives
        chunks = obj._x + obj._y + obj._sw
        # Chunk tasks copy chunks between workers; keep one copy of each, so that the
        # victim's chunks exist nowhere else and have to be rebuilt from the graph.
        client.replicate(chunks, n=1)
        holders = client.who_has(chunks)
        assert all(len(holders[f.key]) == 1 for f in chunks)
        held = collections.defaultdict(set)
        for f in chunks:
            held[holders[f.key][0]].add(f.key)
        victim = max(sorted(held), key=lambda a: len(held[a]))
        fault["victim"], fault["lost"] = victim, held[victim]
        fault["chunks"] = [f.key for f in chunks]
        fault["computed"], removed = _TaskLog.read(client)
        assert victim not in removed
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        # The scheduler notices before the next evaluation is submitted.
        _wait_until(lambda: victim not in _workers(client), "the victim's removal")

    client.register_plugin(_TaskLog())
    try:
        est = MLPClassifier(**kw)
        est._progress_callback = kill_one_worker
        _quiet_fit(est, _dask(X, 2048), _dask(y, 2048), sample_weight=_dask(w, 2048))
        computed, removed = _TaskLog.read(client)
    finally:
        client.unregister_scheduler_plugin(_TaskLog.name)
        client.wait_for_workers(2, timeout=60)  # the nanny starts a new worker
    assert fault, "the fit ended before iteration 3"
    # The fault happened: the victim left the cluster (its nanny restarted it under a
    # new address) ...
    victim, lost = fault["victim"], fault["lost"]
    assert removed == [victim] and victim not in _workers(client)
    # ... with chunks that lived only there (4 chunks of X, y and w on 2 workers) ...
    assert len(lost) >= 6
    # ... and exactly those were computed again, once.
    before = fault["computed"]
    again = {k: computed.get(k, 0) - before.get(k, 0) for k in fault["chunks"]}
    assert {k for k, n in again.items() if n} == lost
    assert all(again[k] == 1 for k in lost)
    # The fit did not notice: bitwise the fit in one process.
    _assert_same_fit(local, est)


def _local_problem(digits, hidden, activation, alpha):
    """A 64-hidden-10 softmax network on the digits, its initial parameters, the one-hot
    targets and the one-process objective the Dask objective must match bit for bit."""
    X, y, w = digits
    net = fastbp.Network([64, hidden, 10], activation=activation, output="softmax")
    Y = np.eye(10)[y]
    local = fastbp._objective.LocalObjective(net, net.prepare(X, Y, w), alpha)
    return net, net.init_params(random_state=0), Y, local


def test_inputs_lost_with_their_last_worker_are_sent_again(digits, monkeypatch, tmp_path):
    # The retry path of DaskObjective._map: an evaluation whose scattered theta died with
    # the only worker holding it is resubmitted with theta scattered again, up to
    # fdist.RETRIES times.
    X, y, w = digits
    net, theta, Y, local = _local_problem(digits, 12, "tanh", 1e-3)
    ref_g = np.empty(net.n_params)
    ref = local.loss_grad(theta, ref_g)
    attempts, armed, victims = [], [], []
    original = fdist.DaskObjective._gather

    def gather(self, futures):
        attempts.append((list(futures), self._theta_key[1].key))
        if armed:  # the chunk tasks are submitted, theta is on the worker: kill it
            c, victim, pid = armed.pop()
            os.kill(pid, signal.SIGKILL)
            _wait_until(lambda: victim not in _workers(c), "the victim's removal")
            victims.append(victim)
        return original(self, futures)

    def lose_the_next_evaluation(c):
        """Occupy the only worker's only thread (so that the next evaluation's chunk
        tasks cannot run), and kill that worker once they are submitted."""
        (victim, pid), = c.run(os.getpid).items()
        flag = tmp_path / f"holding-{pid}"

        def hold_the_thread():
            if os.getpid() == pid:  # not again in the worker the nanny starts next
                flag.touch()
                time.sleep(600)
        blocker = c.submit(hold_the_thread, pure=False)
        _wait_until(flag.exists, "the start of the task holding the thread")
        armed.append((c, victim, pid))
        del attempts[:]
        return victim, blocker

    def lost_scattered(c, victim):
        events = [e for _, e in c.get_events(victim) if e.get("action") == "remove-worker"]
        return set().union(*(e["lost-scattered-tasks"] for e in events))

    # Set here, not assumed: the scheduler retries the tasks that were on a dying
    # worker (allowed-failures > 0) instead of marking them failed.
    with dask.config.set({"distributed.scheduler.allowed-failures": 3}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        obj = fdist.DaskObjective(c, net, _dask(X, 2500), _dask(Y, 2500), _dask(w, 2500),
                                  alpha=1e-3)
        monkeypatch.setattr(fdist.DaskObjective, "_gather", gather)
        try:
            victim, blocker = lose_the_next_evaluation(c)
            g = np.empty(net.n_params)
            loss = obj.loss_grad(theta, g)
            # The fault happened: the worker left (its nanny started a new one), taking
            # the only copy of the first attempt's theta, and that attempt's chunk
            # tasks were cancelled ...
            assert victims == [victim] and victim not in _workers(c)
            (first, first_theta), (second, second_theta) = attempts
            assert first_theta in lost_scattered(c, victim)
            assert [f.status for f in first] == ["cancelled"] * obj.n_chunks
            # ... so the evaluation was submitted again, with theta scattered again ...
            assert second_theta != first_theta
            assert [f.status for f in second] == ["finished"] * obj.n_chunks
            # ... and its result is bitwise the one-process evaluation.
            assert loss == ref
            np.testing.assert_array_equal(g, ref_g)
            del blocker

            # With no retries left, the same fault is a ClusterError saying so.
            monkeypatch.setattr(fdist, "RETRIES", 0)
            victim, blocker = lose_the_next_evaluation(c)
            with pytest.raises(fdist.ClusterError,
                               match="lost this evaluation's inputs once"):
                obj.loss_grad(theta, np.empty(net.n_params))
            assert victims[-1] == victim and len(attempts) == 1
            assert attempts[0][1] in lost_scattered(c, victim)
        finally:
            obj.close()


def test_an_unusable_cluster_raises_and_keeps_the_best_parameters(digits, monkeypatch):
    X, y, _ = digits
    monkeypatch.setattr(fdist, "WORKER_TIMEOUT", 2.0)
    monkeypatch.setattr(fdist, "POLL", 0.2)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        est = MLPClassifier((8,), solver="lbfgs", max_iter=50, random_state=0)
        losses = []

        def take_the_workers_away(n_iter, loss):
            losses.append(loss)
            if n_iter == 4:
                cluster.scale(0)  # every worker leaves, and none comes back
        est._progress_callback = take_the_workers_away
        with pytest.raises(fdist.ClusterError, match="no workers"):
            est.fit(_dask(X, 2048), _dask(y, 2048), client=c)
    assert np.isfinite(est._theta).all()
    # The model holds the best parameters evaluated before the failure.
    d = est._net.prepare(X, est._label_binarizer.transform(y))
    kept = est._net._loss_grad(est._theta, d, est.alpha, None)
    assert kept <= min(losses) * (1 + 1e-9)
    assert est.predict(X).shape == (len(y),)


# A scheduler (with one worker thread) in a process of its own, so that a test can kill it.
_SCHEDULER = """
import sys
import distributed
with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                              protocol="tcp", host="127.0.0.1",
                              dashboard_address=None) as cluster:
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


@contextlib.contextmanager
def _scheduler_process():
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbp.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    # cwd: where the fastbp under test lives. From a checkout's root, `python -c` would
    # import the checkout's sources (without compiled kernels when fastbp is installed).
    proc = subprocess.Popen([sys.executable, "-c", _SCHEDULER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        address = proc.stdout.readline().strip() if ready else ""
        assert address.startswith("tcp://127.0.0.1:"), "the scheduler did not start"
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


@pytest.mark.parametrize("when", ["between evaluations", "during an evaluation"])
def test_a_lost_scheduler_is_a_clear_error_not_a_hang(digits, monkeypatch, when):
    X, y, _ = digits
    est = MLPClassifier((8,), solver="lbfgs", max_iter=50, random_state=0)
    losses, killed, outcome = [], [], []
    with _scheduler_process() as (proc, address), \
            distributed.Client(address, timeout="5s") as c:
        # timeout: set here, not assumed, how long the client tries to reach a
        # scheduler; a request sent before the client noticed the loss waits that long.

        def kill_the_scheduler():
            proc.kill()
            killed.append(proc.wait(timeout=60))

        def progress(n_iter, loss):
            losses.append(loss)
            if when == "between evaluations" and n_iter == 3:
                kill_the_scheduler()
        est._progress_callback = progress
        if when == "during an evaluation":
            original, calls = fdist.DaskObjective._gather, []

            def gather(self, futures):
                calls.append(futures)
                if len(calls) == 6:  # the 5th evaluation is submitted, not yet gathered
                    kill_the_scheduler()
                return original(self, futures)
            monkeypatch.setattr(fdist.DaskObjective, "_gather", gather)

        def fit():
            try:
                est.fit(_dask(X, 2048), _dask(y, 2048), client=c)
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)
        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        thread.join(timeout=120)  # bounds a hang; the fit normally ends in seconds
        assert not thread.is_alive(), "the fit hangs after losing its scheduler"
    # The fault happened: the scheduler process was killed, mid-fit.
    assert killed == [-signal.SIGKILL] and len(losses) >= 3
    exc, = outcome
    assert isinstance(exc, fdist.ClusterError), repr(exc)
    message = str(exc)
    assert "lost the Dask scheduler" in message and "\n" not in message
    assert "keeps its best parameters" in message
    if when == "during an evaluation":
        # Stopped by the cancellation of the evaluation in flight, not resubmitted.
        assert isinstance(exc.__cause__, distributed.client.FuturesCancelledError)
        assert "scheduler-connection-lost" in message
    # The model holds the best parameters evaluated before the failure.
    d = est._net.prepare(X, est._label_binarizer.transform(y))
    assert est._net._loss_grad(est._theta, d, est.alpha, None) <= min(losses) * (1 + 1e-9)


def test_workers_use_their_cores():
    # The nanny limits OpenMP/BLAS to one thread in its workers (Dask's default, set
    # here explicitly rather than assumed); fastbp's kernels still use as many threads
    # as the worker was given. One more than this machine's CPUs, so that the count
    # cannot come from the CPUs (what n_jobs=None would give).
    given = fastbp._threads.effective_n_jobs(None) + 1
    limits = {f"distributed.nanny.pre-spawn-environ.{name}": 1
              for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}

    def probe():  # as the chunk tasks do, in a task
        net = fdist._worker_net(((4, 3, 2), "relu", "softmax", "float64"))
        return os.environ.get("OMP_NUM_THREADS"), net.n_jobs, net._threads(1000)
    with dask.config.set(limits), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=given,
                                     processes=True, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        omp, n_jobs, threads = c.submit(probe, pure=False).result()
    assert omp == "1"  # the limit reached the worker
    assert n_jobs == threads == given


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_minibatch_solvers_refuse_dask_input(client, digits, solver):
    X, y, _ = digits
    with pytest.raises(ValueError, match="full-batch.*lbfgs"):
        MLPClassifier(solver=solver).fit(_dask(X, 600), _dask(y, 600))
    with pytest.raises(ValueError, match="full-batch.*lbfgs"):
        MLPClassifier(solver=solver, backend="dask").fit(X, y)


def test_partial_fit_refuses_dask_input(client, digits):
    X, y, _ = digits
    with pytest.raises(ValueError, match="partial_fit"):
        MLPClassifier(solver="adam").partial_fit(_dask(X, 600), _dask(y, 600),
                                                  classes=np.arange(10))


@pytest.mark.parametrize("case,make,match", [
    ("nan in X", lambda X, y, w: (np.where(np.arange(X.size).reshape(X.shape) == 77,
                                           np.nan, X), y, None), "X contains NaN"),
    ("inf in weights", lambda X, y, w: (X, y, np.where(np.arange(len(w)) == 5, np.inf, w)),
     "sample_weight contains NaN"),
    ("negative weights", lambda X, y, w: (X, y, -w), "Negative values"),
    ("zero weights", lambda X, y, w: (X, y, 0 * w), "sums to zero"),
    ("short y", lambda X, y, w: (X, y[:-3], None), "rows"),
    ("1-D X", lambda X, y, w: (X[:, 0], y, None), "2-D"),
])
def test_bad_dask_input_is_refused(client, digits, case, make, match):
    X, y, w = digits
    X, y, w = make(X, y, w)
    Xd = da.from_array(X, chunks=500)
    yd = da.from_array(y, chunks=500)
    wd = None if w is None else da.from_array(w, chunks=500)
    with pytest.raises(ValueError, match=match):
        MLPClassifier((4,), solver="lbfgs").fit(Xd, yd, sample_weight=wd)


def test_unknown_chunk_sizes_are_refused(client, digits):
    X, y, _ = digits
    Xd = _dask(X, 500)
    Xd = Xd[Xd[:, 0] > -100]  # a boolean mask leaves the chunk sizes unknown
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        MLPClassifier((4,), solver="lbfgs").fit(Xd, _dask(y, 500))


def test_no_client_is_a_clear_error(digits, monkeypatch):
    X, y, _ = digits

    def no_client():
        raise ValueError("No clients found")
    monkeypatch.setattr(distributed, "default_client", no_client)
    with pytest.raises(ValueError, match="Client"):
        MLPClassifier((4,), solver="lbfgs", backend="dask").fit(X, y)


def test_dask_objective_is_bitwise_the_local_objective(client, digits):
    X, y, w = digits
    net, theta, Y, local = _local_problem(digits, 12, "tanh", 1e-3)
    obj = fdist.DaskObjective(client, net, _dask(X, 2500), _dask(Y, 2500), _dask(w, 999),
                              alpha=1e-3)
    p = net.n_params
    try:
        # 7188 rows in blocks of 899: chunks of 3, 3 and 2 blocks.
        assert obj.n_chunks == 3 and obj._offsets.tolist() == [0, 2697, 5394, 7188]
        assert obj.weight_sum == local.weight_sum
        g, ref_g = np.empty(p), np.empty(p)
        assert obj.loss_grad(theta, g) == local.loss_grad(theta, ref_g)
        np.testing.assert_array_equal(g, ref_g)
        assert obj.loss_grad(theta, None) == local.loss_grad(theta, None)
        # ... and both are the objective (against an independent evaluation).
        loss, grad = net.loss_grad(theta, X, Y, w, alpha=1e-3)
        np.testing.assert_allclose(g, grad, rtol=1e-12, atol=1e-16)
        v = np.random.default_rng(0).normal(size=p)
        for exact in (False, True):
            np.testing.assert_array_equal(obj.curvature(theta, v, exact, np.empty(p)),
                                          local.curvature(theta, v, exact, np.empty(p)))
        rows, k = fastbp._hessian_free.draw_rows(np.random.default_rng(3), len(y), 899,
                                                 1000)
        sub, local_sub = obj.subsample(rows, k), local.subsample(rows, k)
        assert sub.weight_sum == local_sub.weight_sum
        np.testing.assert_array_equal(sub.fisher(theta, np.empty(p)),
                                      local_sub.fisher(theta, np.empty(p)))
        np.testing.assert_array_equal(sub.curvature(theta, v, False, np.empty(p)),
                                      local_sub.curvature(theta, v, False, np.empty(p)))
    finally:
        obj.close()


def test_cli_trains_on_a_scheduler(client, tmp_path, capsys, monkeypatch):
    from fastbp.cli import main
    monkeypatch.chdir(tmp_path)
    address = client.scheduler.address
    rc = main(["train", "--scheduler", address, "--hidden", "16", "--max-iter", "30",
               "--quiet", "--output", "dask.fbp"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert float(out.split(":")[-1]) >= 0.9  # test accuracy on digits
    model = fastbp.load(tmp_path / "dask.fbp")
    assert model[-1].solver == "lbfgs" and model[-1].backend is None
    # The same run in one process gives the same model.
    rc = main(["train", "--solver", "lbfgs", "--hidden", "16", "--max-iter", "30",
               "--quiet", "--output", "local.fbp"])
    capsys.readouterr()
    local = fastbp.load(tmp_path / "local.fbp")
    np.testing.assert_array_equal(model[-1]._theta, local[-1]._theta)


@pytest.mark.parametrize("argv,needle", [
    (["--scheduler", "tcp://127.0.0.1:9"], "cannot connect to the Dask scheduler"),
    (["--scheduler", "tcp://127.0.0.1:9", "--solver", "adam"], "trains full-batch"),
])
def test_cli_scheduler_errors(tmp_path, capsys, monkeypatch, argv, needle):
    from fastbp.cli import main
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--quiet", "--max-iter", "2"] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_many_chunks_merge_on_the_workers(client, digits, monkeypatch):
    X, y, w = digits
    net, theta, Y, local = _local_problem(digits, 8, "relu", 1e-2)
    monkeypatch.setattr(fdist, "TREE_FANIN", 2)
    obj = fdist.DaskObjective(client, net, _dask(X, 899), _dask(Y, 899), _dask(w, 899),
                              alpha=1e-2)
    try:
        assert obj.n_chunks == 8
        g, ref = np.empty(net.n_params), np.empty(net.n_params)
        assert obj.loss_grad(theta, g) == local.loss_grad(theta, ref)
        np.testing.assert_array_equal(g, ref)
        # 8 chunk sums become 2 on the workers before the driver gathers them.
        parts = [client.submit(np.full, 8, i, dtype=np.int64, pure=False)
                 for i in range(8)]
        merged = obj._tree(parts)
        assert len(merged) == 2
        assert sum(int(m.result()[0]) for m in merged) == sum(range(8))
    finally:
        obj.close()


def test_readme_dask_example_runs(tmp_path):
    import re
    import subprocess
    import sys
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme[readme.index("## Training on a Dask cluster"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["1.0", "True", "True"]
