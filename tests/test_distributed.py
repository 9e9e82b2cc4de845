"""Data-parallel training on a Dask cluster (LocalCluster with worker processes)."""
import os
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import fastbp  # noqa: E402
from fastbp import MLPClassifier, MLPRegressor  # noqa: E402
from fastbp import distributed as fdist  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    w = np.random.default_rng(0).uniform(0.2, 3.0, len(y))
    return X, y, w


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    y = (y - y.mean()) / y.std()
    w = np.random.default_rng(1).uniform(0.2, 3.0, len(y))
    return X, y, w


def _dask(a, chunks):
    return da.from_array(a, chunks=(chunks,) + (-1,) * (a.ndim - 1))


def _quiet_fit(est, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(*args, **kwargs)


def _assert_same_fit(local, remote, rtol=1e-8):
    assert remote.loss_ == pytest.approx(local.loss_, rel=rtol)
    assert remote.n_iter_ == local.n_iter_
    np.testing.assert_allclose(remote._theta, local._theta, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(remote.loss_curve_, local.loss_curve_, rtol=rtol)


@pytest.mark.parametrize("solver", ["lbfgs", "newton-cg", "hessian-free"])
def test_classifier_matches_the_local_fit(client, digits, solver):
    X, y, w = digits
    kw = dict(hidden_layer_sizes=(16,), solver=solver, max_iter=25, random_state=0)
    local = _quiet_fit(MLPClassifier(**kw), X, y, sample_weight=w)
    # Uneven chunks, not aligned to anything.
    remote = _quiet_fit(MLPClassifier(**kw), _dask(X, 500), _dask(y, 500),
                        sample_weight=_dask(w, 333))
    _assert_same_fit(local, remote)
    np.testing.assert_array_equal(remote.classes_, local.classes_)
    assert remote.n_features_in_ == 64
    np.testing.assert_array_equal(remote.predict(X), local.predict(X))


def test_regressor_matches_the_local_fit(client, diabetes):
    X, y, w = diabetes
    kw = dict(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=40, random_state=0)
    local = _quiet_fit(MLPRegressor(**kw), X, y, sample_weight=w)
    remote = _quiet_fit(MLPRegressor(**kw), _dask(X, 150), _dask(y, 150),
                        sample_weight=_dask(w, 150))
    _assert_same_fit(local, remote)
    assert remote.score(X, y) == pytest.approx(local.score(X, y), rel=1e-8)


def test_float32_and_multi_output_regression(client, diabetes):
    X, y, _ = diabetes
    Y = np.c_[y, -0.5 * y].astype(np.float32)
    kw = dict(hidden_layer_sizes=(6,), solver="lbfgs", max_iter=20, random_state=0)
    local = _quiet_fit(MLPRegressor(**kw), X.astype(np.float32), Y)
    remote = _quiet_fit(MLPRegressor(**kw), _dask(X.astype(np.float32), 100),
                        _dask(Y, 100))
    assert remote.coefs_[0].dtype == np.float32
    assert remote.loss_ == pytest.approx(local.loss_, rel=1e-5)


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
    # One chunk per worker thread, built from the task graph (rebuildable).
    assert len(seen) == 1 and seen[0].numblocks[0] == 2


def test_a_killed_worker_costs_a_recomputation_not_the_fit(client, digits):
    X, y, w = digits
    kw = dict(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=20, random_state=0)
    args = (_dask(X, 450), _dask(y, 450))
    undisturbed = _quiet_fit(MLPClassifier(**kw), *args, sample_weight=_dask(w, 450))
    est = MLPClassifier(**kw)
    killed = []

    def kill_one_worker(n_iter, loss):
        if n_iter == 3:
            victim = sorted(client.scheduler_info()["workers"])[0]
            try:
                client.run(os._exit, 1, workers=[victim])
            except Exception:
                pass  # the worker died before it could answer
            killed.append(victim)
    est._progress_callback = kill_one_worker
    _quiet_fit(est, *args, sample_weight=_dask(w, 450))
    assert killed
    assert est.n_iter_ == undisturbed.n_iter_
    np.testing.assert_array_equal(est._theta, undisturbed._theta)  # bitwise
    assert est.loss_ == undisturbed.loss_
    client.wait_for_workers(2, timeout=60)


def test_an_unusable_cluster_raises_and_keeps_the_best_parameters(digits, monkeypatch):
    X, y, _ = digits
    monkeypatch.setattr(fdist, "WORKER_TIMEOUT", 2.0)
    monkeypatch.setattr(fdist, "POLL", 0.2)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        est = MLPClassifier((8,), solver="lbfgs", max_iter=50, random_state=0)
        losses = []

        def take_the_workers_away(n_iter, loss):
            losses.append(loss)
            if n_iter == 4:
                cluster.scale(0)
                c.wait_for_workers  # noqa: B018 - the cluster now has no workers
        est._progress_callback = take_the_workers_away
        with pytest.raises(fdist.ClusterError, match="no workers"):
            est.fit(_dask(X, 600), _dask(y, 600), client=c)
    assert np.isfinite(est._theta).all()
    # The model holds the best parameters evaluated before the failure.
    d = est._net.prepare(X, est._label_binarizer.transform(y))
    kept = est._net._loss_grad(est._theta, d, est.alpha, None)
    assert kept <= min(losses) * (1 + 1e-9)
    assert est.predict(X).shape == (len(y),)


def test_workers_use_their_cores(digits):
    # The nanny limits OpenMP/BLAS to one thread in its workers; fastbp's kernels still
    # use as many threads as the worker was given.
    def probe():
        net = fdist._worker_net(((4, 3, 2), "relu", "softmax", "float64"))
        return os.environ.get("OMP_NUM_THREADS"), net._threads(1000)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        (omp, threads), = c.run(probe).values()
    assert omp == "1"
    assert threads == 2


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


def test_no_client_is_a_clear_error(digits):
    X, y, _ = digits
    with pytest.raises(ValueError, match="Client"):
        MLPClassifier((4,), solver="lbfgs", backend="dask").fit(X, y)


def test_dask_objective_sums_match_the_network(client, digits):
    X, y, w = digits
    net = fastbp.Network([64, 12, 10], activation="tanh", output="softmax")
    theta = net.init_params(random_state=0)
    Y = np.eye(10)[y]
    obj = fdist.DaskObjective(client, net, _dask(X, 400), _dask(Y, 400), _dask(w, 400),
                              alpha=1e-3)
    try:
        g = np.empty(net.n_params)
        loss = obj.loss_grad(theta, g)
        ref_loss, ref_g = net.loss_grad(theta, X, Y, w, alpha=1e-3)
        assert loss == pytest.approx(ref_loss, rel=1e-13)
        np.testing.assert_allclose(g, ref_g, rtol=1e-11, atol=1e-15)
        assert obj.loss_grad(theta, None) == pytest.approx(ref_loss, rel=1e-13)
        v = np.random.default_rng(0).normal(size=net.n_params)
        np.testing.assert_allclose(obj.curvature(theta, v, False, np.empty(net.n_params)),
                                   net.gnvp(theta, v, X, Y, w, alpha=1e-3), rtol=1e-10)
        np.testing.assert_allclose(obj.curvature(theta, v, True, np.empty(net.n_params)),
                                   net.hessp(theta, v, X, Y, w, alpha=1e-3), rtol=1e-10)
        rows = np.arange(3, len(y), 7)
        sub = obj.subsample(rows)
        local = fastbp._objective.LocalObjective(net, net.prepare(X, Y, w), 1e-3)
        local_sub = local.subsample(rows)
        assert sub.weight_sum == pytest.approx(local_sub.weight_sum, rel=1e-13)
        np.testing.assert_allclose(sub.fisher(theta, np.empty(net.n_params)),
                                   local_sub.fisher(theta, np.empty(net.n_params)),
                                   rtol=1e-10, atol=1e-18)
        np.testing.assert_allclose(sub.curvature(theta, v, False, np.empty(net.n_params)),
                                   local_sub.curvature(theta, v, False,
                                                       np.empty(net.n_params)),
                                   rtol=1e-10)
    finally:
        obj.close()
