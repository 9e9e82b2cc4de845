"""Hessian-free (Martens 2010): the Fisher-diagonal kernel, preconditioned CG with
backtracking, the damping rule, the curvature subsample, and the estimator solver."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

import fastbp
from fastbp import MLPClassifier, MLPRegressor, _hessian_free
from fastbp._objective import LocalObjective
from fastbp._hessian_free import HessianFreeState, _cg_schedule, _pcg, fit_hessian_free


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def _problem(act, out, n=23, sizes=(5, 7, 6, 3), seed=0):
    rng = np.random.default_rng(seed)
    net = fastbp.Network(list(sizes), activation=act, output=out, block_size=4)
    theta = net.init_params(random_state=seed)
    X = rng.normal(size=(n, sizes[0]))
    if out == "softmax":
        Y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], n)]
    elif out == "logistic":
        Y = (rng.random((n, sizes[-1])) < 0.5).astype(float)
    else:
        Y = rng.normal(size=(n, sizes[-1]))
    sw = rng.uniform(0, 2, n)
    sw[3] = 0.0
    return net, theta, X, Y, sw


def _fisher_reference(net, theta, X, Y, sw):
    """sum_i w_i / sum(w) * (per-sample gradient)^2, one row at a time."""
    ref = np.zeros(net.n_params)
    for i in range(X.shape[0]):
        _, g = net.loss_grad(theta, X[i:i + 1], Y[i:i + 1])
        ref += sw[i] / sw.sum() * g ** 2
    return ref


@pytest.mark.parametrize("act", ["identity", "logistic", "tanh", "relu"])
@pytest.mark.parametrize("out", ["softmax", "logistic", "identity"])
def test_fisher_diagonal_matches_per_sample_gradients(act, out):
    net, theta, X, Y, sw = _problem(act, out)
    ref = _fisher_reference(net, theta, X, Y, sw)
    assert ref.min() >= 0 and ref.max() > 0
    for Xv in (X, np.asfortranarray(X), sp.csr_matrix(X)):
        got = net._fisher(theta, net.prepare(Xv, Y, sw), np.empty(net.n_params))
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15 * ref.max())


def test_fisher_diagonal_unweighted_float32_and_threads():
    net, theta, X, Y, _ = _problem("tanh", "softmax", n=50)
    ref = _fisher_reference(net, theta, X, Y, np.ones(50))
    got = net._fisher(theta, net.prepare(X, Y), np.empty(net.n_params))
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    net32 = fastbp.Network(net.layer_sizes, activation="tanh", output="softmax",
                           dtype=np.float32, block_size=4)
    got32 = net32._fisher(theta.astype(np.float32), net32.prepare(X, Y),
                          np.empty(net.n_params, dtype=np.float32))
    np.testing.assert_allclose(got32, ref, rtol=2e-4, atol=1e-6 * ref.max())
    # The lanes make the result bitwise independent of the number of threads.
    runs = []
    for n_jobs in (1, 2, 3):
        net.n_jobs = n_jobs
        runs.append(net._fisher(theta, net.prepare(X, Y), np.empty(net.n_params)))
    assert all(np.array_equal(runs[0], r) for r in runs[1:])


def test_cg_schedule_is_geometric():
    keep = sorted(_cg_schedule(250))  # the schedule itself, for a long CG run
    assert keep[:8] == [1, 2, 3, 4, 5, 7, 9, 11]
    assert keep[-1] <= 250 and all(b > a for a, b in zip(keep, keep[1:]))
    assert all(b <= np.ceil(1.3 * a) + 1 for a, b in zip(keep[4:], keep[5:]))


def test_pcg_solves_an_spd_system_and_tracks_the_quadratic(monkeypatch):
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    A = Q @ np.diag(np.linspace(1.0, 10.0, 30)) @ Q.T  # SPD, condition number 10
    g = rng.normal(size=30)
    minv = 1.0 / np.diag(A)
    exact = np.linalg.solve(A, -g)
    best = 0.5 * exact @ A @ exact + g @ exact
    kept = _pcg(lambda v: A @ v, g, np.zeros(30), minv, 250)
    # Martens' relative-progress test stops once the model barely improves ...
    assert 0 <= (kept[-1][2] - best) / -best < 1e-2
    # ... and without it CG reaches the exact solution.
    monkeypatch.setattr(_hessian_free, "CG_EPSILON", 0.0)
    kept = _pcg(lambda v: A @ v, g, np.zeros(30), minv, 250)
    np.testing.assert_allclose(kept[-1][1], exact, rtol=1e-6, atol=1e-8)
    for _, xi, phi in kept:  # phi is the quadratic model's value at each kept iterate
        assert phi == pytest.approx(0.5 * xi @ A @ xi + g @ xi, rel=1e-9, abs=1e-12)
    assert [i for i, _, _ in kept] == sorted(i for i, _, _ in kept)
    phis = [phi for _, _, phi in kept]
    assert all(b <= a + 1e-12 for a, b in zip(phis, phis[1:]))  # CG decreases phi


def test_pcg_warm_start_and_bad_warm_start(monkeypatch):
    monkeypatch.setattr(_hessian_free, "CG_EPSILON", 1e-12)
    rng = np.random.default_rng(1)
    Q = rng.normal(size=(20, 20))
    A = Q @ Q.T + np.eye(20)
    g = rng.normal(size=20)
    exact = np.linalg.solve(A, -g)
    calls = []

    def apply_a(v):
        calls.append(1)
        return A @ v
    kept = _pcg(apply_a, g, 0.95 * exact, np.ones(20), 250)
    np.testing.assert_allclose(kept[-1][1], exact, rtol=1e-6, atol=1e-8)
    warm_calls = len(calls)
    calls.clear()
    _pcg(apply_a, g, np.zeros(20), np.ones(20), 250)
    assert warm_calls < len(calls)  # the warm start saves products
    # A warm start worse than zero (phi > 0) is dropped: CG starts from zero.
    kept = _pcg(lambda v: A @ v, g, 100 * exact * -1, np.ones(20), 1)
    assert kept[-1][2] < 0


def test_damping_adapts_and_warm_start_keeps_it(digits):
    X, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((16,), solver="hessian-free", max_iter=5, warm_start=True,
                            random_state=0).fit(X, y)
    state = clf._optimizer
    assert isinstance(state, HessianFreeState)
    assert state.lam != 1.0  # moved from its initial value by the reduction ratio
    assert np.abs(state.direction).max() > 0
    lam = state.lam
    seen = {}
    original = _hessian_free._pcg

    def spy(apply_a, g, x0, minv, max_iter):
        seen.setdefault("x0", x0.copy())
        return original(apply_a, g, x0, minv, max_iter)
    _hessian_free._pcg = spy
    try:
        direction = state.direction.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
    finally:
        _hessian_free._pcg = original
    # The second fit starts CG from 0.95 x the last direction of the first, at its damping.
    np.testing.assert_array_equal(seen["x0"], 0.95 * direction)
    assert clf._optimizer is state and len(clf.loss_curve_) == 10
    assert lam > 0


def test_damping_rule_follows_the_reduction_ratio(monkeypatch):
    # A quadratic problem (identity output, no hidden layer): the Gauss-Newton model is
    # exact, so rho == 1 and the damping must shrink by 2/3 in every iteration.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    Y = X @ rng.normal(size=(4, 2)) + 0.1 * rng.normal(size=(200, 2))
    net = fastbp.Network([4, 2], output="identity")
    theta = net.init_params(random_state=0)
    state = HessianFreeState(net.n_params, lam=1.0)
    objective = LocalObjective(net, net.prepare(X, Y), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit_hessian_free(objective, theta, 3, 0.0, False, [], state=state)
    assert state.lam == pytest.approx((2 / 3) ** 3)
    # ... and, as the damping vanishes, it reaches the least-squares solution.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit_hessian_free(objective, theta, 30, 1e-12, False, [], state=state)
    W, *_ = np.linalg.lstsq(np.c_[X, np.ones(200)], Y, rcond=None)
    np.testing.assert_allclose(net.unpack(theta)[0][0], W[:4], rtol=1e-6, atol=1e-8)


def test_curvature_subsample_is_used_and_reproducible():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 6))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    net = fastbp.Network([6, 8, 2], activation="tanh", output="softmax")
    Y = np.eye(2)[y]
    sizes = []
    original = net._curvature

    def spy(theta, v, d, *args):
        sizes.append(d.n_samples)
        return original(theta, v, d, *args)
    net._curvature = spy
    thetas = []
    for _ in range(2):
        theta = net.init_params(random_state=0)
        curve = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit_hessian_free(LocalObjective(net, net.prepare(X, Y), 1e-4), theta, 8, 0.0,
                             False, curve, seed=3, curvature_rows=500)
        thetas.append(theta)
    # About 500 rows, the same number from every block of rows.
    assert len(set(sizes)) == 1 and abs(sizes[0] - 500) <= 8
    np.testing.assert_array_equal(thetas[0], thetas[1])  # same seed, same fit
    assert curve[-1] < 0.75 * curve[0]
    assert all(b <= a for a, b in zip(curve, curve[1:]))  # every accepted step descends


def test_stops_at_gradient_tolerance_without_warning(digits):
    X, y = digits
    X, y = X[:300], y[:300]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = MLPClassifier((8,), solver="hessian-free", tol=1e-2, max_iter=200,
                            random_state=0).fit(X, y)
    d = clf._net.prepare(X, clf._label_binarizer.transform(y))
    g = np.empty(clf._net.n_params)
    clf._net._loss_grad(clf._theta, d, clf.alpha, g)
    assert np.abs(g).max() <= 1e-2
    assert clf.n_iter_ < 200


def test_max_iter_warns(digits):
    X, y = digits
    with pytest.warns(ConvergenceWarning, match="hessian-free failed to converge after 2"):
        clf = MLPClassifier((8,), solver="hessian-free", max_iter=2, tol=0.0,
                            random_state=0).fit(X, y)
    assert clf.n_iter_ == 2 and len(clf.loss_curve_) == 2


def test_sample_weights_equal_repeated_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = X @ [1.0, -2.0, 0.5] + 0.1 * rng.normal(size=60)
    w = rng.integers(1, 4, 60)
    kw = dict(hidden_layer_sizes=(5,), solver="hessian-free", max_iter=5, tol=0.0,
              random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = MLPRegressor(**kw).fit(X, y, sample_weight=w)
        b = MLPRegressor(**kw).fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    np.testing.assert_allclose(a._theta, b._theta, rtol=1e-7, atol=1e-9)


def test_deep_autoencoder_makes_progress(digits):
    X, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg = MLPRegressor(hidden_layer_sizes=(32, 16, 8, 16, 32), activation="tanh",
                           solver="hessian-free", max_iter=10, random_state=0).fit(X, X)
    assert reg.loss_curve_[-1] < 0.7 * reg.loss_curve_[0]
