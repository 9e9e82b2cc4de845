"""Behavioural tests of fastbp's scikit-learn estimators, MLPClassifier and MLPRegressor.

Three kinds of checks:

- agreement with scikit-learn's own MLPs: the same random_state gives the same initial
  weights (exactly) and, wherever the computation is deterministic (L-BFGS, full-batch or
  unshuffled minibatch SGD/Adam), the same trajectory up to floating-point rounding, so
  ``loss_`` and ``loss_curve_`` are compared tightly at equal iteration counts and
  ``n_iter_`` within a small band (see "Tolerances" below); with shuffled minibatches
  only the held-out score is compared;
- the documented improvements (float32 everywhere, L-BFGS loss curve and verbose output,
  optimizer state kept by warm_start/partial_fit, Ctrl-C, divergence);
- the scikit-learn estimator contract (validation, targets, sparse input, pickling,
  meta-estimators).
"""
import inspect
import math
import pickle
import re
import tracemalloc
from functools import lru_cache

import numpy as np
import pytest
import scipy.sparse as sp
import sklearn.neural_network as sk_nn
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris
from sklearn.dummy import DummyClassifier
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.metrics import mean_poisson_deviance
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

import fastbp
import fastbp._network
import fastbp._stochastic
from fastbp import DivergenceError, MLPClassifier, MLPRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

SOLVERS = ["lbfgs", "sgd", "adam"]
STOCHASTIC = ["sgd", "adam"]
EPS = np.finfo(np.float64).eps


# ---------------------------------------------------------------------------------------
# Data


@lru_cache(maxsize=None)
def _split(name):
    """A held-out split of one of scikit-learn's bundled data sets, standardised."""
    loader = {"digits": load_digits, "iris": load_iris, "breast_cancer": load_breast_cancer,
              "diabetes": load_diabetes}[name]
    X, y = loader(return_X_y=True)
    regression = name == "diabetes"
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=0.3, random_state=0, stratify=None if regression else y)
    scaler = StandardScaler().fit(X_tr)
    X_tr, X_te = scaler.transform(X_tr), scaler.transform(X_te)
    if regression:
        mean, std = y_tr.mean(), y_tr.std()
        y_tr, y_te = (y_tr - mean) / std, (y_te - mean) / std
    for a in (X_tr, X_te, y_tr, y_te):
        a.flags.writeable = False  # shared between tests: nobody may modify it
    return X_tr, X_te, y_tr, y_te


@lru_cache(maxsize=None)
def _digits_scaled(n=None):
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    if n is not None:
        X, y = X[:n], y[:n]
    X.flags.writeable = False
    y.flags.writeable = False
    return X, y


@lru_cache(maxsize=None)
def _iris_scaled():
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    X.flags.writeable = False
    return X, y


def _small_regression(n=120, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 5))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0, 1.5]) + 0.3 * np.sin(3 * X[:, 0])
    return X, y


def _all_params(est):
    """The flat parameter vector rebuilt from the public attributes."""
    return np.concatenate([a.ravel() for a in est.coefs_ + est.intercepts_])


# ---------------------------------------------------------------------------------------
# Tolerances
#
# Two runs of the same solver from the same parameters on the same data (fastbp against
# scikit-learn, sparse against dense, one memory layout against another, one thread
# count against another) differ only in rounding: the GEMMs sum in another order (BLAS
# kernels differ between CPUs: AVX2 or AVX-512, with or without FMA), and fastbp sums
# over rows exactly where scikit-learn rounds. Each loss or gradient evaluation then
# differs by a few ulps per product, up to K ulps for a K-term dot product. How much a
# whole run amplifies that is the run's condition, measured here by perturbing X by 1
# and by 64 float64 ulps (a stand-in for another kernel's rounding) for every run
# compared below: the float64 runs moved by at most
#   - L-BFGS (up to 86 iterations): loss 1.3e-11 relative, outputs 3.3e-10;
#   - SGD/Adam (up to 252 epochs): loss curve 4e-14 relative, outputs 2e-14.
# Their tolerances below (loss 1e-8 relative and outputs 1e-8 for L-BFGS, curves 1e-10
# and outputs 1e-9 for SGD/Adam) are those bounds times 100 or more: room for kernels
# that differ by far more than 64 ulps. The float32 bounds are set where they are used.
# The runs were also checked under OpenBLAS's Haswell, SkylakeX, Sandybridge and Nehalem
# kernels (OPENBLAS_CORETYPE).
#
# Iteration counts are compared with a band: a stopping test (L-BFGS's gradient test,
# the stochastic solvers' tol / n_iter_no_change rule, early stopping's validation
# score) decides the same way in both runs unless its quantity lies within the runs'
# difference of its threshold. Such a near tie can move a stop by an iteration, so the
# counts may differ by N_ITER_BAND; the runs are then compared after the same number of
# iterations (``_at_the_same_iteration``), where the tight tolerances hold.
N_ITER_BAND = 2


def _at_the_same_iteration(a, b, refit):
    """(a, b) after the same number of iterations: whichever ran longer is refit by
    ``refit(est, k)`` with max_iter=k, the other's count. A solver's run is
    deterministic, so the refit repeats the same run and stops it at k."""
    assert abs(a.n_iter_ - b.n_iter_) <= N_ITER_BAND, (a.n_iter_, b.n_iter_)
    k = min(a.n_iter_, b.n_iter_)
    a = a if a.n_iter_ == k else refit(a, k)
    b = b if b.n_iter_ == k else refit(b, k)
    assert a.n_iter_ == b.n_iter_ == k
    return a, b


def _refit_on(X, y, sample_weight=None):
    """A ``refit`` for ``_at_the_same_iteration``: the same estimator, max_iter=k."""
    return lambda est, k: clone(est).set_params(max_iter=k).fit(
        X, y, sample_weight=sample_weight)


# ---------------------------------------------------------------------------------------
# 1. Held-out scores equal scikit-learn's (within one point)

_CLASSIFICATION = ("clf", dict(hidden_layer_sizes=(32,), alpha=0.1),
                   {"lbfgs": dict(max_iter=200),
                    "sgd": dict(max_iter=100, learning_rate_init=0.05),
                    "adam": dict(max_iter=100, learning_rate_init=0.003)})
_ACCURACY_CASES = {
    # dataset: (estimator kind, common params, per-solver params)
    "digits": _CLASSIFICATION,
    "iris": _CLASSIFICATION,
    "breast_cancer": _CLASSIFICATION,
    "diabetes": ("reg", dict(hidden_layer_sizes=(16,), alpha=10.0),
                 {"lbfgs": dict(max_iter=200),
                  "sgd": dict(max_iter=200, learning_rate_init=0.001),
                  "adam": dict(max_iter=200, learning_rate_init=0.003)}),
}


@pytest.mark.parametrize("dataset", list(_ACCURACY_CASES))
@pytest.mark.parametrize("solver", SOLVERS)
def test_held_out_score_matches_sklearn(dataset, solver):
    kind, common, per_solver = _ACCURACY_CASES[dataset]
    X_tr, X_te, y_tr, y_te = _split(dataset)
    params = dict(common, **per_solver[solver], solver=solver, random_state=0)
    # n_jobs=1: with more threads fastbp sums each minibatch's gradient in another
    # order (the models differ by rounding only, far below the 0.01 allowed here).
    if kind == "clf":
        ours, theirs = MLPClassifier(n_jobs=1, **params), sk_nn.MLPClassifier(**params)
    else:
        ours, theirs = MLPRegressor(n_jobs=1, **params), sk_nn.MLPRegressor(**params)
    ours.fit(X_tr, y_tr)
    theirs.fit(X_tr, y_tr)
    ours_score, theirs_score = ours.score(X_te, y_te), theirs.score(X_te, y_te)
    assert abs(ours_score - theirs_score) <= 0.01, (ours_score, theirs_score)
    # ... and both actually learned something.
    floor = 0.3 if kind == "reg" else 0.9
    assert ours_score > floor
    assert theirs_score > floor


# ---------------------------------------------------------------------------------------
# Deterministic trajectories equal scikit-learn's


def test_signature_matches_sklearn():
    for ours, theirs in [(MLPClassifier, sk_nn.MLPClassifier),
                         (MLPRegressor, sk_nn.MLPRegressor)]:
        ours_params = inspect.signature(ours).parameters
        theirs_params = inspect.signature(theirs).parameters
        for name, p in theirs_params.items():
            assert name in ours_params, name
            assert ours_params[name].default == p.default, name
            assert ours_params[name].kind == p.kind, name
        # The positional order is scikit-learn's too (MLPRegressor starts with loss).
        assert list(ours_params)[:len(theirs_params)] == list(theirs_params)


def test_initial_weights_are_sklearns_glorot_draws(monkeypatch):
    """The first parameters L-BFGS evaluates are the initial ones: Glorot-uniform drawn
    from RandomState(random_state) in scikit-learn's order."""
    X, y = _iris_scaled()
    seen = []
    original = fastbp._network.Network._loss_grad

    def recording(self, theta, *args, **kwargs):
        seen.append(np.array(theta, copy=True))
        return original(self, theta, *args, **kwargs)

    monkeypatch.setattr(fastbp._network.Network, "_loss_grad", recording)
    for activation, factor in [("relu", 6.0), ("logistic", 2.0)]:
        seen.clear()
        est = MLPClassifier((7, 5), activation=activation, solver="lbfgs", max_iter=1,
                            random_state=42).fit(X, y)
        rng = np.random.RandomState(42)
        coefs, intercepts = [], []
        for fan_in, fan_out in [(4, 7), (7, 5), (5, 3)]:
            bound = np.sqrt(factor / (fan_in + fan_out))
            coefs.append(rng.uniform(-bound, bound, (fan_in, fan_out)))
            intercepts.append(rng.uniform(-bound, bound, fan_out))
        expected = np.concatenate([a.ravel() for a in coefs + intercepts])
        np.testing.assert_array_equal(seen[0], expected)
        assert est.n_layers_ == 4


@pytest.mark.parametrize("extra", [{}, dict(max_iter=10), dict(max_fun=15),
                                   dict(tol=1e-2), dict(alpha=1.0)])
def test_lbfgs_n_iter_and_loss_match_sklearn_on_digits(extra):
    X, y = _digits_scaled()
    params = dict(hidden_layer_sizes=(32,), solver="lbfgs", random_state=0, **extra)
    ours = MLPClassifier(**params).fit(X, y)
    theirs = sk_nn.MLPClassifier(**params).fit(X, y)
    # The loss at the same parameters: fastbp's objective at scikit-learn's final
    # parameters is scikit-learn's loss_. The same formula summed in another order
    # (1797 rows: at most 2e-13 relative), except that scikit-learn takes the log of
    # probabilities rounded to float64 (and clipped to [eps, 1 - eps]), which costs up
    # to eps per row in absolute terms, eps on the mean: rel 1e-12, abs 10 eps.
    Y = ours._label_binarizer.transform(y)
    at_theirs, _ = ours._net.loss_grad(_all_params(theirs), X, Y, alpha=ours.alpha)
    assert at_theirs == pytest.approx(theirs.loss_, rel=1e-12, abs=10 * EPS)
    if "max_iter" in extra:
        # Stopped by the iteration limit, far from the gradient test (tol = 1e-4): the
        # same count, exactly.
        grad = ours._net.loss_grad(ours._theta, X, Y, alpha=ours.alpha)[1]
        assert np.abs(grad).max() > 10 * ours.tol
        assert ours.n_iter_ == theirs.n_iter_ == extra["max_iter"]
    # The runs, compared after the same number of iterations (see "Tolerances").
    ours, theirs = _at_the_same_iteration(ours, theirs, _refit_on(X, y))
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-8)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-8)


def test_lbfgs_regression_matches_sklearn():
    X_tr, X_te, y_tr, _ = _split("diabetes")
    params = dict(hidden_layer_sizes=(8,), solver="lbfgs", random_state=1, max_iter=60)
    ours = MLPRegressor(**params).fit(X_tr, y_tr)
    theirs = sk_nn.MLPRegressor(**params).fit(X_tr, y_tr)
    # The loss at the same parameters (squared error: no clipping, see above).
    at_theirs, _ = ours._net.loss_grad(_all_params(theirs), X_tr, y_tr, alpha=ours.alpha)
    assert at_theirs == pytest.approx(theirs.loss_, rel=1e-12)
    ours, theirs = _at_the_same_iteration(ours, theirs, _refit_on(X_tr, y_tr))
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-8)
    np.testing.assert_allclose(ours.predict(X_te), theirs.predict(X_te), rtol=1e-7,
                               atol=1e-8)


_FULL_BATCH_CASES = [
    # (params, whether the stopping rule fires before max_iter)
    (dict(solver="sgd", learning_rate="constant", learning_rate_init=0.05), True),
    (dict(solver="sgd", learning_rate="invscaling", learning_rate_init=0.5), True),
    (dict(solver="sgd", learning_rate="adaptive", learning_rate_init=0.05, tol=1e-3),
     True),
    (dict(solver="sgd", nesterovs_momentum=False, learning_rate_init=0.05), True),
    (dict(solver="sgd", momentum=0.0, learning_rate_init=0.05, max_iter=60), False),
    (dict(solver="adam", learning_rate_init=0.05, tol=1e-3, n_iter_no_change=3), True),
    (dict(solver="adam", learning_rate_init=0.05, early_stopping=True,
          validation_fraction=0.2), True),
    (dict(solver="sgd", learning_rate_init=0.05, early_stopping=True, tol=1e-3,
          n_iter_no_change=5), True),
]


@pytest.mark.parametrize("params,stops", _FULL_BATCH_CASES,
                         ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items())
                         if isinstance(p, dict) else str(p))
def test_full_batch_stochastic_trajectory_matches_sklearn(params, stops):
    """With one batch per epoch shuffling cannot matter: the per-epoch losses, the
    stopping rule (tol, n_iter_no_change, adaptive rate), the validation split and the
    validation scores must all be scikit-learn's. n_jobs=1: with more threads fastbp
    sums each minibatch's gradient in another order (see the threads test)."""
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X[:190])  # below 200: batch_size='auto' = full
    y = y[:190]
    params = dict(dict(hidden_layer_sizes=(16,), random_state=0, max_iter=300), **params)
    ours = MLPClassifier(n_jobs=1, **params).fit(X, y)
    theirs = sk_nn.MLPClassifier(**params).fit(X, y)
    assert (ours.n_iter_ < params["max_iter"]) == stops
    assert (theirs.n_iter_ < params["max_iter"]) == stops
    ours, theirs = _at_the_same_iteration(ours, theirs, _refit_on(X, y))
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-10)
    assert ours.t_ == theirs.t_
    if params.get("early_stopping"):
        # Accuracies on the same held-out rows: a prediction could only change where
        # two class probabilities tie to within the runs' 1e-14 difference; at most
        # one row (1 / n_val) is allowed.
        n_val = math.ceil(params.get("validation_fraction", 0.1) * len(y))
        np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_,
                                   rtol=0, atol=1.01 / n_val)
        assert ours.best_validation_score_ == pytest.approx(
            theirs.best_validation_score_, rel=0, abs=1.01 / n_val)
        assert ours.best_loss_ is None
    else:
        assert ours.best_loss_ == pytest.approx(theirs.best_loss_, rel=1e-10)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X),
                               atol=1e-9)


@pytest.mark.parametrize("solver", STOCHASTIC)
@pytest.mark.parametrize("weighted", [False, True])
def test_unshuffled_minibatches_match_sklearn(solver, weighted):
    """shuffle=False fixes the minibatches (the last one partial): the trajectory is
    then scikit-learn's up to rounding, sample weights included (n_jobs=1: see
    above)."""
    X, y = _digits_scaled(500)
    sw = np.random.RandomState(0).uniform(0.1, 3.0, size=len(y)) if weighted else None
    params = dict(hidden_layer_sizes=(16,), solver=solver, random_state=0, max_iter=15,
                  learning_rate_init=0.01, shuffle=False, batch_size=48)
    ours = MLPClassifier(n_jobs=1, **params).fit(X, y, sample_weight=sw)
    theirs = sk_nn.MLPClassifier(**params).fit(X, y, sample_weight=sw)
    ours, theirs = _at_the_same_iteration(ours, theirs, _refit_on(X, y, sw))
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-10)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X),
                               atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_sample_weight_matches_sklearn(solver):
    X, y = _iris_scaled()
    w = np.random.RandomState(0).uniform(0.1, 3.0, size=len(y))
    params = dict(hidden_layer_sizes=(8,), solver=solver, random_state=0, max_iter=40,
                  learning_rate_init=0.01)
    ours = MLPClassifier(n_jobs=1, **params).fit(X, y, sample_weight=w)
    theirs = sk_nn.MLPClassifier(**params).fit(X, y, sample_weight=w)
    ours, theirs = _at_the_same_iteration(ours, theirs, _refit_on(X, y, w))
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-8)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-8)

    Xr, yr = X[:, 1:], X[:, 0]
    ours_r = MLPRegressor(n_jobs=1, **params).fit(Xr, yr, sample_weight=w)
    theirs_r = sk_nn.MLPRegressor(**params).fit(Xr, yr, sample_weight=w)
    ours_r, theirs_r = _at_the_same_iteration(ours_r, theirs_r, _refit_on(Xr, yr, w))
    assert ours_r.loss_ == pytest.approx(theirs_r.loss_, rel=1e-8)
    np.testing.assert_allclose(ours_r.predict(Xr), theirs_r.predict(Xr), rtol=1e-7,
                               atol=1e-8)


def test_at_the_same_iteration_refits_the_longer_run():
    """The band helper itself: a run of 12 iterations cut to another's 10 is that run."""
    X, y = _iris_scaled()
    params = dict(hidden_layer_sizes=(8,), solver="lbfgs", random_state=0)
    ten = MLPClassifier(max_iter=10, **params).fit(X, y)
    twelve = MLPClassifier(max_iter=12, **params).fit(X, y)
    a, b = _at_the_same_iteration(twelve, ten, _refit_on(X, y))
    assert a is not twelve and b is ten
    np.testing.assert_array_equal(a._theta, ten._theta)
    with pytest.raises(AssertionError):
        _at_the_same_iteration(MLPClassifier(max_iter=15, **params).fit(X, y), ten,
                               _refit_on(X, y))


# ---------------------------------------------------------------------------------------
# float32


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_trains_and_predicts_in_float32(solver, monkeypatch):
    X, y = _iris_scaled()
    X32 = X.astype(np.float32)
    dtypes = set()
    original = fastbp._network.Network._loss_grad

    def recording(self, theta, *args, **kwargs):
        dtypes.add(np.asarray(theta).dtype)
        return original(self, theta, *args, **kwargs)

    monkeypatch.setattr(fastbp._network.Network, "_loss_grad", recording)
    params = dict(hidden_layer_sizes=(16,), solver=solver, random_state=0, max_iter=150,
                  learning_rate_init=0.05)
    clf = MLPClassifier(**params).fit(X32, y)
    assert clf._theta.dtype == np.float32
    assert all(c.dtype == np.float32 for c in clf.coefs_ + clf.intercepts_)
    assert clf.predict_proba(X32).dtype == np.float32
    assert clf.predict_log_proba(X32).dtype == np.float32
    assert clf.decision_function(X32).dtype == np.float32
    if solver == "lbfgs":
        # The objective itself runs on float32 parameters, not on an upcast copy.
        assert dtypes == {np.dtype(np.float32)}
    np.testing.assert_allclose(clf.predict_proba(X32).sum(axis=1), 1.0, rtol=1e-5)
    clf64 = MLPClassifier(**params).fit(X, y)
    assert clf.score(X32, y) == pytest.approx(clf64.score(X, y), abs=0.03)
    assert clf.score(X32, y) > 0.9

    Xr, yr = _small_regression()
    reg = MLPRegressor(**params).fit(Xr.astype(np.float32), yr.astype(np.float32))
    assert reg.coefs_[0].dtype == np.float32
    assert reg.predict(Xr.astype(np.float32)).dtype == np.float32
    assert reg.score(Xr.astype(np.float32), yr) > 0.8


@pytest.mark.parametrize("solver", SOLVERS)
def test_float64_stays_float64(solver):
    X, y = _iris_scaled()
    clf = MLPClassifier((8,), solver=solver, random_state=0, max_iter=20).fit(X, y)
    assert clf._theta.dtype == np.float64
    assert all(c.dtype == np.float64 for c in clf.coefs_ + clf.intercepts_)
    assert clf.predict_proba(X).dtype == np.float64
    # Integer input is converted to float64 too.
    reg = MLPRegressor(hidden_layer_sizes=(4,), solver=solver, random_state=0,
                       max_iter=5).fit(np.arange(40).reshape(20, 2), np.arange(20))
    assert reg.coefs_[0].dtype == np.float64


# ---------------------------------------------------------------------------------------
# L-BFGS loss curve, verbose output


def test_lbfgs_records_loss_curve():
    X, y = _digits_scaled(600)
    est = MLPClassifier((16,), solver="lbfgs", random_state=0, max_iter=12).fit(X, y)
    curve = np.asarray(est.loss_curve_)
    assert len(curve) == est.n_iter_ == 12
    assert curve[-1] == pytest.approx(est.loss_, rel=1e-12)
    assert est.best_loss_ == pytest.approx(curve.min(), rel=1e-12)
    # L-BFGS-B's line search only accepts decreasing steps.
    assert (np.diff(curve) <= 1e-12).all()
    assert curve[0] > 2 * curve[-1]
    # A warm start appends to the curve.
    est.set_params(warm_start=True, max_iter=5).fit(X, y)
    assert len(est.loss_curve_) == 17
    assert est.loss_curve_[-1] == pytest.approx(est.loss_, rel=1e-12)
    assert est.loss_curve_[-1] <= curve[-1]


@pytest.mark.parametrize("solver", SOLVERS)
def test_verbose_prints_one_line_per_iteration(solver, capsys):
    X, y = _iris_scaled()
    est = MLPClassifier((8,), solver=solver, random_state=0, max_iter=12,
                        verbose=True).fit(X, y)
    out = capsys.readouterr().out
    found = re.findall(r"^Iteration (\d+), loss = ([0-9.eE+-]+)$", out, flags=re.M)
    assert [int(n) for n, _ in found] == list(range(1, est.n_iter_ + 1))
    np.testing.assert_allclose([float(v) for _, v in found], est.loss_curve_, atol=1e-8)
    quiet = MLPClassifier((8,), solver=solver, random_state=0, max_iter=12).fit(X, y)
    assert "Iteration" not in capsys.readouterr().out
    np.testing.assert_array_equal(quiet.predict_proba(X), est.predict_proba(X))


# ---------------------------------------------------------------------------------------
# warm_start and partial_fit keep the optimizer state


def _xor_like(n=130, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 5))
    return X, (X[:, 0] * X[:, 1] > 0).astype(int)


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_warm_start_and_partial_fit_continue_the_same_run(solver):
    """Without shuffling, 5 + 5 warm-started epochs and 10 partial_fit calls are exactly
    one 10-epoch run: the Adam moments and step count, and the SGD velocities, carry
    over instead of restarting."""
    X, y = _xor_like()
    params = dict(hidden_layer_sizes=(8,), solver=solver, random_state=0, shuffle=False,
                  batch_size=32, tol=0.0, learning_rate_init=0.01)
    straight = MLPClassifier(max_iter=10, **params).fit(X, y)

    warm = MLPClassifier(max_iter=5, warm_start=True, **params).fit(X, y)
    optimizer = warm._optimizer
    moments = [optimizer.state_1.copy(), optimizer.state_2.copy()]
    step_after_first = int(optimizer.step[0])
    warm.fit(X, y)
    assert warm._optimizer is optimizer
    np.testing.assert_array_equal(warm._theta, straight._theta)
    np.testing.assert_array_equal(warm.predict_proba(X), straight.predict_proba(X))
    assert warm.t_ == straight.t_ == 10 * len(y)
    assert len(warm.loss_curve_) == 10
    assert not np.array_equal(optimizer.state_1, moments[0])
    if solver == "adam":
        assert step_after_first == 5 * 5  # 5 epochs of 5 batches (130 rows / 32)
        assert int(optimizer.step[0]) == 2 * step_after_first
        assert not np.array_equal(optimizer.state_2, moments[1])
    else:
        assert np.abs(moments[0]).max() > 0  # the velocity was non-zero and was kept

    partial = MLPClassifier(**params)
    for _ in range(10):
        partial.partial_fit(X, y, classes=[0, 1])
    np.testing.assert_array_equal(partial._theta, straight._theta)
    assert partial.t_ == 10 * len(y)
    assert len(partial.loss_curve_) == 10


def test_fit_without_warm_start_restarts_the_optimizer():
    X, y = _xor_like()
    est = MLPClassifier((8,), solver="adam", random_state=0, max_iter=5, batch_size=32)
    est.fit(X, y)
    first_theta, first_opt = est._theta.copy(), est._optimizer
    est.fit(X, y)
    assert int(est._optimizer.step[0]) == 25
    assert est._optimizer is not first_opt
    np.testing.assert_array_equal(est._theta, first_theta)  # the same run again
    assert len(est.loss_curve_) == 5


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_warm_start_uses_the_new_learning_rate(solver):
    """Keeping the optimizer's *state* must not freeze its *hyperparameters*: after
    set_params(learning_rate_init=1e-12), a warm-started fit must barely move the weights,
    as it does in scikit-learn."""
    X, y = _xor_like()
    for Est in (sk_nn.MLPClassifier, MLPClassifier):
        est = Est((8,), solver=solver, random_state=0, warm_start=True, max_iter=3,
                  learning_rate_init=0.05, momentum=0.0).fit(X, y)
        before = _all_params(est)
        est.set_params(learning_rate_init=1e-12)
        est.fit(X, y)
        moved = np.abs(_all_params(est) - before).max()
        assert moved < 1e-9, (Est.__module__, moved)


# ---------------------------------------------------------------------------------------
# Ctrl-C


def _interrupt_on_call(monkeypatch, owner, name, n_call, snapshots, theta_arg=0,
                       record_result=False):
    """Patch owner.name to raise KeyboardInterrupt on its n_call-th call; record copies
    of the parameter argument (after the call), or (result, parameters)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n_call:
            raise KeyboardInterrupt
        result = original(self, *args, **kwargs)
        theta = np.array(args[theta_arg], copy=True)
        snapshots.append((result, theta) if record_result else theta)
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("solver", STOCHASTIC)
@pytest.mark.parametrize("regression", [False, True])
def test_keyboard_interrupt_stochastic_keeps_best_epoch(solver, regression, monkeypatch):
    X, y = _digits_scaled(500)
    if regression:
        y = X[:, 20] - X[:, 30] + 0.5 * X[:, 40]
        X = np.delete(X, [20, 30, 40], axis=1)
        est = MLPRegressor(hidden_layer_sizes=(16,), solver=solver, random_state=0,
                           max_iter=50, learning_rate_init=0.01)
    else:
        est = MLPClassifier((16,), solver=solver, random_state=0, max_iter=50,
                            learning_rate_init=0.02)
    snapshots = []
    # StochasticOptimizer.epoch(self, net, theta, ...): theta is args[1].
    calls = _interrupt_on_call(monkeypatch, fastbp._stochastic.StochasticOptimizer,
                               "epoch", 8, snapshots, theta_arg=1)
    with pytest.warns(UserWarning, match="interrupted"):
        returned = est.fit(X, y)
    assert returned is est
    assert calls["n"] == 8
    assert est.n_iter_ == 7 == len(est.loss_curve_) == len(snapshots)
    best = int(np.argmin(est.loss_curve_))
    np.testing.assert_array_equal(est._theta, snapshots[best])
    assert np.isfinite(est._theta).all()
    pred = est.predict(X)
    if regression:
        assert np.isfinite(pred).all()
        assert est.score(X, y) > 0.5  # an untrained network scores below zero
    else:
        baseline = DummyClassifier().fit(X, y).score(X, y)
        assert est.score(X, y) > baseline + 0.3
    # The model is still usable for more training.
    monkeypatch.undo()
    est.set_params(warm_start=True, max_iter=3).fit(X, y)
    assert np.isfinite(est._theta).all()


def test_keyboard_interrupt_in_first_epoch_keeps_initial_weights(monkeypatch):
    X, y = _iris_scaled()
    reference = MLPClassifier((8,), solver="lbfgs", random_state=0, max_iter=1)
    initial = []
    _interrupt_on_call(monkeypatch, fastbp._network.Network, "_loss_grad", 2, initial)
    with pytest.warns(UserWarning, match="interrupted"):
        reference.fit(X, y)
    monkeypatch.undo()
    est = MLPClassifier((8,), solver="adam", random_state=0, max_iter=10)
    _interrupt_on_call(monkeypatch, fastbp._stochastic.StochasticOptimizer, "epoch", 1, [],
                       theta_arg=1)
    with pytest.warns(UserWarning, match="interrupted"):
        est.fit(X, y)
    assert est.n_iter_ == 0
    np.testing.assert_array_equal(est._theta, initial[0])
    assert np.isfinite(est.predict_proba(X)).all()


def test_keyboard_interrupt_lbfgs_keeps_lowest_loss_parameters(monkeypatch):
    X, y = _digits_scaled(500)
    evaluations = []
    calls = _interrupt_on_call(monkeypatch, fastbp._network.Network, "_loss_grad", 15,
                               evaluations, record_result=True)
    est = MLPClassifier((16,), solver="lbfgs", random_state=0, max_iter=200)
    with pytest.warns(UserWarning, match="interrupted"):
        est.fit(X, y)
    assert calls["n"] == 15
    losses = [loss for loss, _ in evaluations]
    best = int(np.argmin(losses))
    np.testing.assert_array_equal(est._theta, evaluations[best][1])
    assert est.loss_ == pytest.approx(losses[best], rel=1e-12)
    assert 0 < est.n_iter_ < 14
    assert len(est.loss_curve_) == est.n_iter_
    assert np.isfinite(est.predict_proba(X)).all()
    baseline = DummyClassifier().fit(X, y).score(X, y)
    assert est.score(X, y) > baseline + 0.4


def test_keyboard_interrupt_with_early_stopping_keeps_best_validation(monkeypatch):
    X, y = _digits_scaled(600)
    snapshots = []
    _interrupt_on_call(monkeypatch, fastbp._stochastic.StochasticOptimizer, "epoch", 9,
                       snapshots, theta_arg=1)
    est = MLPClassifier((16,), solver="adam", random_state=0, max_iter=100,
                        learning_rate_init=0.02, early_stopping=True)
    with pytest.warns(UserWarning, match="interrupted"):
        est.fit(X, y)
    assert len(est.validation_scores_) == 8
    best = int(np.argmax(est.validation_scores_))
    np.testing.assert_array_equal(est._theta, snapshots[best])


# ---------------------------------------------------------------------------------------
# Divergence


def _assert_diverged(est, fit):
    with pytest.raises(DivergenceError, match="non-finite") as info:
        fit()
    assert isinstance(info.value, ValueError)
    assert np.isfinite(est._theta).all()
    assert all(np.isfinite(c).all() for c in est.coefs_ + est.intercepts_)
    return info.value


def test_divergence_sgd_huge_learning_rate():
    X, y = _small_regression(100)
    est = MLPRegressor(hidden_layer_sizes=(8,), solver="sgd", learning_rate_init=1e6,
                       random_state=0, max_iter=20)
    _assert_diverged(est, lambda: est.fit(X, y))
    assert est.n_iter_ < 20
    assert np.isfinite(est.predict(X)).all()
    assert all(np.isfinite(est.loss_curve_))


def test_divergence_sgd_huge_inputs_classifier():
    X, y = _xor_like(100)
    est = MLPClassifier((8,), solver="sgd", learning_rate_init=1.0, random_state=0,
                        max_iter=20)
    _assert_diverged(est, lambda: est.fit(X * 1e30, y))
    assert np.isfinite(est.predict_proba(X)).all()


def test_divergence_adam_huge_targets():
    X, y = _small_regression(100)
    est = MLPRegressor(hidden_layer_sizes=(8,), solver="adam", random_state=0,
                       max_iter=20)
    _assert_diverged(est, lambda: est.fit(X, y * 1e200))
    assert np.isfinite(est.predict(X)).all()


def test_divergence_lbfgs_keeps_initial_parameters(monkeypatch):
    X, y = _small_regression(100)
    initial = []
    original = fastbp._network.Network._loss_grad

    def recording(self, theta, *args, **kwargs):
        if not initial:
            initial.append(np.array(theta, copy=True))
        return original(self, theta, *args, **kwargs)

    monkeypatch.setattr(fastbp._network.Network, "_loss_grad", recording)
    est = MLPRegressor(hidden_layer_sizes=(8,), solver="lbfgs", random_state=0,
                       max_iter=20)
    _assert_diverged(est, lambda: est.fit(X * 1e200, y * 1e200))
    np.testing.assert_array_equal(est._theta, initial[0])


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_training_continues_after_divergence(solver):
    """After a DivergenceError the model holds its last finite parameters; training it
    again on sane data (warm_start) must then work like training from those parameters,
    not re-diverge or stand still because the optimizer kept the diverged epoch's
    velocities / moments."""
    X, y = _small_regression(100)
    est = MLPRegressor(hidden_layer_sizes=(8,), solver=solver, random_state=0,
                       warm_start=True, max_iter=5, learning_rate_init=0.001).fit(X, y)
    good = est._theta.copy()
    loss_before = est.loss_
    _assert_diverged(est, lambda: est.fit(X, y * 1e200))
    np.testing.assert_array_equal(est._theta, good)
    est.fit(X, y)  # must not raise
    assert not np.array_equal(est._theta, good)  # must train
    assert est.loss_ < loss_before


# ---------------------------------------------------------------------------------------
# Threads (n_jobs, not in scikit-learn)


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_default_threads_train_the_same_model(solver):
    """n_jobs=None may split minibatches across every CPU; the model is the one trained
    with n_jobs=1, up to floating-point summation order. (Speed is measured in
    benchmarks/, not here.)"""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 3))
    y = ((X[:, 0] > 0).astype(int) + (X[:, 1] > 0)) % 3
    params = dict(hidden_layer_sizes=(16,), solver=solver, random_state=0, max_iter=100,
                  tol=0.0, learning_rate_init=0.02)
    one = MLPClassifier(n_jobs=1, **params).fit(X, y)
    refit = _refit_on(X, y)
    for n_jobs in (None, 2):
        other = MLPClassifier(n_jobs=n_jobs, **params).fit(X, y)
        # A thread count of t sums each minibatch gradient in t parts: a relative
        # difference of about t ulps per step (t <= 200 // 16 = 12 threads for batches
        # of 200 rows, whatever the machine). Over these 200 steps the runs' condition
        # (a 64-ulp change of X moves the parameters by 1.5e-14) keeps that near 1e-14;
        # rtol 1e-9 leaves a margin of 1e5 (see "Tolerances").
        one_k, other = _at_the_same_iteration(one, other, refit)
        np.testing.assert_allclose(other._theta, one_k._theta, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------
# 2. Reproducibility, 3. pickling


@pytest.mark.parametrize("solver", SOLVERS)
def test_same_random_state_is_bitwise_reproducible(solver):
    X, y = _digits_scaled(600)
    params = dict(hidden_layer_sizes=(24,), solver=solver, max_iter=25, batch_size=64,
                  learning_rate_init=0.01)
    runs = [MLPClassifier(random_state=3, **params).fit(X, y) for _ in range(2)]
    np.testing.assert_array_equal(runs[0]._theta, runs[1]._theta)
    np.testing.assert_array_equal(runs[0].predict_proba(X), runs[1].predict_proba(X))
    assert runs[0].loss_curve_ == runs[1].loss_curve_
    # A RandomState instance seeded the same way gives the same model.
    same = MLPClassifier(random_state=np.random.RandomState(3), **params).fit(X, y)
    np.testing.assert_array_equal(same._theta, runs[0]._theta)
    other = MLPClassifier(random_state=4, **params).fit(X, y)
    assert np.abs(other._theta - runs[0]._theta).max() > 0.1

    Xr, yr = _small_regression()
    regs = [MLPRegressor(hidden_layer_sizes=(8,), solver=solver, random_state=5,
                         max_iter=25, batch_size=16).fit(Xr, yr) for _ in range(2)]
    np.testing.assert_array_equal(regs[0].predict(Xr), regs[1].predict(Xr))


def test_fitted_model_keeps_no_scratch_and_pickles_small():
    # A fitted Adam model holds its parameters and Adam's two moments: three vectors
    # of n_params. The per-chunk gradients and workspaces of the fit are freed, and
    # are never pickled; partial_fit keeps them from one call to the next.
    X, y = _iris_scaled()
    X = np.repeat(X, 4, axis=0)
    y = np.repeat(y, 4)
    est = MLPClassifier((64, 64), solver="adam", random_state=0, max_iter=3,
                        batch_size=200, n_jobs=2).fit(X, y)
    assert est._optimizer._grads is None and est._optimizer._work is None
    vectors = 3 * est._theta.nbytes
    assert vectors < len(pickle.dumps(est)) < vectors + 20_000
    part = MLPClassifier((64, 64), solver="adam", random_state=0, batch_size=200)
    part.partial_fit(X, y, classes=np.unique(y))
    grads = part._optimizer._grads
    assert grads is not None
    blob = pickle.dumps(part)
    assert len(blob) < vectors + 20_000
    part.partial_fit(X, y)
    assert part._optimizer._grads is grads
    back = pickle.loads(blob)
    back.partial_fit(X, y)  # allocates its scratch again
    np.testing.assert_array_equal(back._theta, part._theta)


@pytest.mark.parametrize("solver", SOLVERS)
def test_pickle_round_trip(solver):
    X, y = _iris_scaled()
    est = MLPClassifier((8, 6), solver=solver, random_state=0, max_iter=30).fit(X, y)
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(back.predict_proba(X), est.predict_proba(X))
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    np.testing.assert_array_equal(back.classes_, est.classes_)
    assert back.loss_curve_ == est.loss_curve_
    for original, restored in zip(est.coefs_ + est.intercepts_,
                                  back.coefs_ + back.intercepts_):
        np.testing.assert_array_equal(original, restored)
        assert np.shares_memory(restored, back._theta)
        assert not np.shares_memory(restored, est._theta)
    # The views stay live: writing through coefs_ changes the model.
    back.coefs_[-1][...] = 0.0
    back.intercepts_[-1][...] = 0.0
    np.testing.assert_allclose(back.predict_proba(X), 1.0 / 3.0)
    # Training after unpickling updates the same vector the views look into.
    again = pickle.loads(pickle.dumps(est))
    again.set_params(warm_start=True, max_iter=3).fit(X, y)
    np.testing.assert_array_equal(_all_params(again), again._theta)
    assert all(np.shares_memory(c, again._theta) for c in again.coefs_)
    # Regressor too, and a pickled unfitted estimator stays unfitted.
    Xr, yr = _small_regression()
    reg = MLPRegressor(hidden_layer_sizes=(5,), solver=solver, random_state=0,
                       max_iter=20).fit(Xr, yr)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(reg)).predict(Xr),
                                  reg.predict(Xr))
    with pytest.raises(NotFittedError):
        pickle.loads(pickle.dumps(MLPRegressor())).predict(Xr)


@pytest.mark.parametrize("solver", SOLVERS)
def test_coefs_are_views_into_theta_after_fit(solver):
    X, y = _iris_scaled()
    est = MLPClassifier((5, 4), solver=solver, random_state=0, max_iter=10).fit(X, y)
    assert [c.shape for c in est.coefs_] == [(4, 5), (5, 4), (4, 3)]
    assert [b.shape for b in est.intercepts_] == [(5,), (4,), (3,)]
    assert all(np.shares_memory(a, est._theta) for a in est.coefs_ + est.intercepts_)
    np.testing.assert_array_equal(_all_params(est), est._theta)
    est.set_params(warm_start=True).fit(X, y)
    np.testing.assert_array_equal(_all_params(est), est._theta)


# ---------------------------------------------------------------------------------------
# 4. Meta-estimators


def test_pipeline_and_grid_search_with_two_jobs():
    X, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(),
                         MLPClassifier((16,), solver="lbfgs", random_state=0,
                                       max_iter=300))
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, random_state=0, stratify=y)
    assert pipe.fit(X_tr, y_tr).score(X_te, y_te) > 0.9

    grid = GridSearchCV(
        Pipeline([("scale", StandardScaler()),
                  ("mlp", MLPClassifier(solver="lbfgs", random_state=0, max_iter=200))]),
        {"mlp__alpha": [1e-4, 1.0], "mlp__hidden_layer_sizes": [(4,), (16,)]},
        cv=3, n_jobs=2)
    grid.fit(X_tr, y_tr)
    assert grid.best_params_["mlp__alpha"] in (1e-4, 1.0)
    assert grid.best_params_["mlp__hidden_layer_sizes"] in ((4,), (16,))
    assert len(grid.cv_results_["mean_test_score"]) == 4
    assert grid.best_score_ > 0.9
    assert grid.score(X_te, y_te) > 0.9
    best_mlp = grid.best_estimator_.named_steps["mlp"]
    assert best_mlp.get_params()["alpha"] == grid.best_params_["mlp__alpha"]
    assert best_mlp.n_features_in_ == 4


def test_clone_keeps_params_and_drops_fit():
    X, y = _iris_scaled()
    est = MLPClassifier((3,), solver="sgd", alpha=0.5, momentum=0.5, random_state=1,
                        max_iter=5).fit(X, y)
    copy = clone(est)
    assert copy.get_params() == est.get_params()
    assert not hasattr(copy, "coefs_")
    reg = MLPRegressor(loss="poisson", hidden_layer_sizes=(2,))
    assert clone(reg).get_params()["loss"] == "poisson"


# ---------------------------------------------------------------------------------------
# 5. Validation


_BAD_PARAMS = [
    ("solver", "foo"), ("alpha", -1.0), ("hidden_layer_sizes", 0),
    ("hidden_layer_sizes", "abc"), ("learning_rate_init", 0.0), ("momentum", 2.0),
    ("batch_size", 0), ("max_iter", 0), ("activation", "softmax"),
    ("learning_rate", "fast"), ("tol", -1.0), ("validation_fraction", 1.0),
    ("beta_1", 1.0), ("beta_2", -0.1), ("epsilon", 0.0), ("n_iter_no_change", 0),
    ("max_fun", 0), ("power_t", -1.0), ("shuffle", "yes"), ("early_stopping", 1),
    ("warm_start", None),
]


@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("name,value", _BAD_PARAMS)
def test_invalid_hyperparameter_raises_invalid_parameter_error(Est, name, value):
    X, y = _xor_like(40)
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter") as info:
        Est(**{name: value}).fit(X, y)
    assert isinstance(info.value, ValueError)


def test_invalid_loss_for_regressor():
    X, y = _small_regression(30)
    with pytest.raises(InvalidParameterError, match="'loss' parameter"):
        MLPRegressor(loss="foo").fit(X, y)
    with pytest.raises(InvalidParameterError, match="'loss' parameter"):
        MLPRegressor(loss="absolute_error").fit(X, y)


@pytest.mark.parametrize("sizes", [(0,), (5, 0), (5, -1), (2.5,)])
def test_invalid_hidden_layer_sizes_sequence(sizes):
    # Like scikit-learn (which raises ValueError "hidden_layer_sizes must be > 0"), not
    # InvalidParameterError: the constraint only covers the scalar form.
    X, y = _xor_like(40)
    for Est in (MLPClassifier, MLPRegressor):
        with pytest.raises(ValueError, match="hidden_layer_sizes"):
            Est(hidden_layer_sizes=sizes).fit(X, y)


def test_validation_happens_before_any_state_change():
    X, y = _xor_like(40)
    est = MLPClassifier((4,), random_state=0, max_iter=5).fit(X, y)
    theta = est._theta.copy()
    with pytest.raises(InvalidParameterError):
        est.set_params(alpha=-1.0).fit(X, y)
    np.testing.assert_array_equal(est._theta, theta)


def _bad_input_cases():
    X, y = _xor_like(40)
    yr = X[:, 0] - X[:, 1]
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    X_inf = X.copy()
    X_inf[0, 0] = np.inf
    y_nan = yr.copy()
    y_nan[2] = np.nan
    clf = lambda **k: MLPClassifier((4,), random_state=0, max_iter=5, **k)  # noqa: E731
    reg = lambda **k: MLPRegressor(hidden_layer_sizes=(4,), random_state=0,  # noqa: E731
                                   max_iter=5, **k)

    def fitted_clf():
        return clf().fit(X, y)

    def partial_then_unseen():
        est = clf(solver="sgd").partial_fit(X, y, classes=[0, 1])
        est.partial_fit(X, y + 1)

    return [
        ("nan-X-clf", lambda: clf().fit(X_nan, y), "NaN"),
        ("nan-X-reg", lambda: reg().fit(X_nan, yr), "NaN"),
        ("inf-X", lambda: reg().fit(X_inf, yr), "infinity"),
        ("nan-y-reg", lambda: reg().fit(X, y_nan), "NaN"),
        ("1d-X", lambda: clf().fit(X[:, 0], y), "2D array"),
        ("1d-X-predict", lambda: fitted_clf().predict(X[:, 0]), "2D array"),
        ("nan-X-predict", lambda: fitted_clf().predict(X_nan), "NaN"),
        ("features-predict", lambda: fitted_clf().predict(X[:, :3]), "5 features"),
        ("features-proba", lambda: fitted_clf().predict_proba(np.c_[X, X]), "5 features"),
        ("features-decision", lambda: fitted_clf().decision_function(X[:, :2]),
         "5 features"),
        ("features-partial-fit",
         lambda: clf(solver="adam").partial_fit(X, y, classes=[0, 1]).partial_fit(
             X[:, :2], y), "5 features"),
        ("negative-weights", lambda: clf().fit(X, y, sample_weight=-np.ones(40)),
         "[Nn]egative"),
        ("wrong-length-weights", lambda: reg().fit(X, yr, sample_weight=np.ones(39)),
         r"\(39,\)"),
        ("zero-weights", lambda: clf().fit(X, y, sample_weight=np.zeros(40)), "zero"),
        ("nan-weights",
         lambda: clf().fit(X, y, sample_weight=np.r_[np.nan, np.ones(39)]), "NaN"),
        ("unseen-class-partial-fit", partial_then_unseen, "classes"),
        ("no-classes-first-partial-fit", lambda: clf(solver="sgd").partial_fit(X, y),
         "classes must be passed"),
        ("changed-classes-partial-fit",
         lambda: clf(solver="sgd").partial_fit(X, y, classes=[0, 1]).partial_fit(
             X, y, classes=[0, 1, 2]), "classes"),
        ("early-stopping-partial-fit-clf",
         lambda: clf(solver="adam", early_stopping=True).partial_fit(X, y, classes=[0, 1]),
         "early_stopping"),
        ("early-stopping-partial-fit-reg",
         lambda: reg(solver="sgd", early_stopping=True).partial_fit(X, yr),
         "early_stopping"),
        ("poisson-negative-y", lambda: reg(loss="poisson").fit(X, yr), "non-negative"),
        ("string-features",
         lambda: clf().fit(np.array([["a", "b", "c"]] * 40, dtype=object), y),
         "could not convert string"),
        ("string-features-unicode",
         lambda: clf().fit(np.array([["a", "b", "c"]] * 40), y), "could not convert"),
        ("string-target-regressor", lambda: reg().fit(X, np.array(["a"] * 40)),
         "could not convert"),
        ("continuous-target-classifier", lambda: clf().fit(X, yr), "Unknown label type"),
        ("complex-X", lambda: clf().fit(X + 1j, y), "Complex"),
        ("empty-X", lambda: clf().fit(X[:0], y[:0]), "0 sample"),
        ("warm-start-new-classes",
         lambda: clf(warm_start=True).fit(X, y).fit(X, y + 1), "classes"),
        ("warm-start-new-architecture",
         lambda: clf(warm_start=True).fit(X, y).set_params(
             hidden_layer_sizes=(5,)).fit(X, y), "same network"),
        ("early-stopping-tiny-validation",
         lambda: reg(early_stopping=True, validation_fraction=0.02).fit(X, yr),
         "validation set is too small"),
    ]


@pytest.mark.parametrize("case", _bad_input_cases(), ids=lambda c: c[0])
def test_bad_input_raises_value_error(case):
    _, action, match = case
    with pytest.raises(ValueError, match=match):
        action()


def test_unfitted_and_partial_fit_availability():
    X, y = _xor_like(40)
    for Est in (MLPClassifier, MLPRegressor):
        with pytest.raises(NotFittedError):
            Est().predict(X)
        assert not hasattr(Est(solver="lbfgs"), "partial_fit")
        assert hasattr(Est(solver="sgd"), "partial_fit")
        assert hasattr(Est(solver="adam"), "partial_fit")
        est = Est(solver="lbfgs")
        est.set_params(solver="adam")
        assert hasattr(est, "partial_fit")
    with pytest.raises(NotFittedError):
        MLPClassifier().predict_proba(X)
    with pytest.raises(NotFittedError):
        MLPClassifier().decision_function(X)


# ---------------------------------------------------------------------------------------
# 6. Targets


@pytest.mark.parametrize("solver", SOLVERS)
def test_multilabel_indicator_targets(solver):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 4))
    Y = np.column_stack([X[:, 0] > 0, X[:, 1] + X[:, 2] > 0, X[:, 3] > 0.5]).astype(int)
    est = MLPClassifier((16,), solver=solver, random_state=0, max_iter=300,
                        learning_rate_init=0.01).fit(X[:200], Y[:200])
    assert est.out_activation_ == "logistic"
    assert est.n_outputs_ == 3
    pred = est.predict(X[200:])
    assert pred.shape == (100, 3)
    assert set(np.unique(pred)) <= {0, 1}
    assert est.score(X[200:], Y[200:]) > 0.8  # subset accuracy
    assert (pred == Y[200:]).mean() > 0.93  # per-label accuracy
    proba = est.predict_proba(X[200:])
    assert proba.shape == (100, 3)
    assert ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_array_equal(pred, (proba > 0.5).astype(int))
    scores = est.decision_function(X[200:])
    assert scores.shape == (100, 3)
    np.testing.assert_array_equal(scores > 0, pred == 1)


@pytest.mark.parametrize("solver", SOLVERS)
def test_multioutput_regression(solver):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 6))
    W = rng.normal(size=(6, 3))
    Y = X @ W + 0.2 * np.tanh(X[:, :3])
    Y /= Y.std(axis=0)
    est = MLPRegressor(hidden_layer_sizes=(32,), solver=solver, random_state=0,
                       max_iter=300, learning_rate_init=0.01).fit(X[:200], Y[:200])
    pred = est.predict(X[200:])
    assert pred.shape == (100, 3)
    assert est.n_outputs_ == 3
    assert est.out_activation_ == "identity"
    assert est.score(X[200:], Y[200:]) > 0.9
    # A single-column 2-D target gives 1-D predictions.
    with pytest.warns(Warning):
        one = MLPRegressor(hidden_layer_sizes=(8,), solver=solver, random_state=0,
                           max_iter=20).fit(X[:200], Y[:200, :1])
    assert one.predict(X[200:]).shape == (100,)


@pytest.mark.parametrize("labels", [
    np.array(["a", "b", "c"]), np.array([-1.0, 2.0, 5.0]), np.array([10, 20, 30]),
    np.array(["neg", "pos"]), np.array([-1, 1]), np.array([3, 7]),
], ids=["str3", "float3", "int3", "str2", "pm1", "int2"])
@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_arbitrary_labels_round_trip(labels, solver):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 3))
    code = ((X[:, 0] > 0).astype(int) + (X[:, 1] > 0)) % len(labels)
    y = labels[code]
    est = MLPClassifier((16,), solver=solver, random_state=0, max_iter=300,
                        learning_rate_init=0.02).fit(X, y)
    np.testing.assert_array_equal(est.classes_, np.sort(labels))
    pred = est.predict(X)
    assert pred.dtype == y.dtype
    assert set(pred) <= set(labels)
    assert est.score(X, y) > 0.93
    proba = est.predict_proba(X)
    assert proba.shape == (300, len(labels))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(pred, est.classes_[proba.argmax(axis=1)])
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(est.predict_log_proba(X), np.log(proba), rtol=1e-12)
    scores = est.decision_function(X)
    if len(labels) == 2:
        assert est.out_activation_ == "logistic"
        assert est.n_outputs_ == 1
        assert scores.shape == (300,)
        np.testing.assert_array_equal(scores > 0, pred == est.classes_[1])
        np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-scores)), rtol=1e-10)
    else:
        assert est.out_activation_ == "softmax"
        assert est.n_outputs_ == 3
        assert scores.shape == (300, 3)
        np.testing.assert_array_equal(scores.argmax(axis=1), proba.argmax(axis=1))


_R = np.random.RandomState(0)


@pytest.mark.parametrize("y", [
    np.array([3, 7, 3, 3, 7]), np.array([9, 9, 9]), np.arange(-4, 6) % 7 - 2,
    _R.randint(0, 12, 500).astype(np.uint8), _R.randint(-3, 40, 200).astype(np.int16),
    np.array([-128, 127, 0, -128], dtype=np.int8),
    np.array([2**64 - 1, 2**64 - 2, 2**64 - 1], dtype=np.uint64),
    np.array([-2**63, -2**63 + 1, -2**63]), np.array([2**40, 5, 5]),
    np.array([-2**62, 2**62]), _R.randint(0, 5, 300)[::3],
    np.array([0] * 50 + [51 + 1024]), np.array([0] * 50 + [51 + 1025]),
    np.array([0, 10**6] * 5), np.array(["b", "a", "b"]), np.array([1.0, 2.0, 1.0]),
    np.array([True, False, True]),
], ids=["int2", "int1", "negative", "uint8", "int16", "int8-extremes", "uint64-top",
        "int64-bottom", "wide", "extreme", "strided", "range-at-limit", "range-past-limit",
        "sparse-pair", "str", "float", "bool"])
def test_counted_integer_labels_match_label_binarizer(y):
    # A classifier's integer labels are counted instead of passed through
    # LabelBinarizer.fit(y). Whichever path a y takes, the fitted binarizer and the
    # one-hot targets must be exactly what LabelBinarizer gives.
    from fastbp._validation import _count_integer_labels, validate_local
    from sklearn.preprocessing import LabelBinarizer
    reference = LabelBinarizer().fit(y)
    counted = _count_integer_labels(y)
    if y.dtype.kind not in "iu":
        assert counted is None  # strings, floats and booleans: LabelBinarizer's path
    if counted is not None:
        classes, codes = counted
        np.testing.assert_array_equal(classes, reference.classes_)
        np.testing.assert_array_equal(classes[codes], y)
    est = MLPClassifier()
    X = np.zeros((len(y), 2), dtype=np.float32)
    if len(reference.classes_) < 2:
        with pytest.raises(ValueError, match="at least 2 classes"):
            validate_local(est, X, y, False, True)
        return
    _, Y, _, _ = validate_local(est, X, y, False, True)
    lb = est._label_binarizer
    np.testing.assert_array_equal(lb.classes_, reference.classes_)
    assert lb.classes_.dtype == reference.classes_.dtype
    assert vars(lb).keys() == vars(reference).keys()   # the whole fitted state
    for name, value in vars(reference).items():
        if name != "classes_":
            assert getattr(lb, name) == value, name
    np.testing.assert_array_equal(est.classes_, reference.classes_)
    assert Y.dtype == np.float32
    np.testing.assert_array_equal(Y, reference.transform(y))


def test_label_binarizer_is_fitted_when_its_state_is_not_the_known_one(monkeypatch):
    # Should a scikit-learn release keep more fitted state than classes_, y_type_ and
    # sparse_input_, the classes go through LabelBinarizer.fit instead.
    from fastbp import _validation
    from sklearn.preprocessing import LabelBinarizer
    assert _validation._label_binarizer_state_is_known()
    fitted = []
    original = LabelBinarizer.fit

    def fit(self, y):
        fitted.append(list(y))
        return original(self, y)
    monkeypatch.setattr(LabelBinarizer, "fit", fit)
    lb = _validation.fitted_label_binarizer(np.array([2, 5, 9]), "multiclass")
    assert fitted == [] and lb.y_type_ == "multiclass"
    monkeypatch.setattr(_validation, "_label_binarizer_state_is_known", lambda: False)
    lb = _validation.fitted_label_binarizer(np.array([2, 5, 9]), "multiclass")
    assert fitted == [[2, 5, 9]]
    np.testing.assert_array_equal(lb.transform([9, 2]), [[0, 0, 1], [1, 0, 0]])


def test_counted_labels_never_count_a_range_wider_than_the_sample():
    # The counts are as long as the range of the labels: past n + 1024 values (or near
    # the int64 limits) the labels go to LabelBinarizer instead, so memory stays O(n).
    from fastbp._validation import _count_integer_labels
    n = 51
    assert _count_integer_labels(np.array([0] * (n - 1) + [n + 1024])) is not None
    assert _count_integer_labels(np.array([0] * (n - 1) + [n + 1025])) is None
    assert _count_integer_labels(np.array([2**62 + 1, 2**62 + 2])) is None
    assert _count_integer_labels(np.array([-2**62 - 1, -2**62])) is None
    assert _count_integer_labels(np.array([], dtype=np.int64)) is None
    assert _count_integer_labels(np.array([[1, 2], [2, 1]])) is None


def test_single_class_is_refused():
    # scikit-learn fits a single class and predicts it; fastbp refuses, on purpose (the
    # README lists the difference): there is nothing to learn.
    X, _ = _xor_like(40)
    y = np.full(40, 7)
    for solver in ("lbfgs", "adam"):
        with pytest.raises(ValueError, match="at least 2 classes.*single class: 7"):
            MLPClassifier((4,), solver=solver, max_iter=10).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MLPClassifier((4,), solver="sgd").partial_fit(X, y, classes=[7])
    # Later partial_fit batches may hold one class of the declared ones.
    clf = MLPClassifier((4,), solver="sgd", random_state=0)
    clf.partial_fit(X, y, classes=[3, 7])
    assert set(clf.predict(X)) <= {3, 7}


# ---------------------------------------------------------------------------------------
# 7. Sparse input


def _sparse_problem():
    X = sp.random(300, 40, density=0.2, format="csr", random_state=0)
    X_dense = X.toarray()
    score = X_dense[:, :5].sum(axis=1)
    return X, X_dense, (score > np.median(score)).astype(int)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_sparse_equals_dense(solver, fmt):
    X, X_dense, y = _sparse_problem()
    Xs = X.asformat(fmt)
    params = dict(hidden_layer_sizes=(16,), solver=solver, random_state=0, max_iter=40,
                  learning_rate_init=0.05, n_jobs=1)
    dense = MLPClassifier(**params).fit(X_dense, y)
    sparse = MLPClassifier(**params).fit(Xs, y)
    # The sparse first-layer product sums only the stored values, in CSR order; the
    # dense GEMM sums every term in its kernel's order: rounding differences, compared
    # at equal iteration counts with the bounds of "Tolerances" (a 64-ulp change of X
    # moves these runs' probabilities by at most 1e-14, their parameters by 3e-12).
    data = {id(sparse): Xs, id(dense): X_dense}
    sparse, dense = _at_the_same_iteration(
        sparse, dense, lambda est, k: clone(est).set_params(max_iter=k).fit(data[id(est)], y))
    tol = 1e-10 if solver == "lbfgs" else 1e-9
    np.testing.assert_allclose(sparse.predict_proba(Xs), dense.predict_proba(X_dense),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(sparse._theta, dense._theta, rtol=1e-8, atol=1e-8)
    # Predicting dense data with the sparse-trained model and vice versa.
    np.testing.assert_allclose(sparse.predict_proba(X_dense), dense.predict_proba(Xs),
                               rtol=tol, atol=tol)
    assert sparse.score(Xs, y) > 0.8

    yr = X_dense[:, :5] @ np.arange(1.0, 6.0)
    reg_dense = MLPRegressor(**params).fit(X_dense, yr)
    reg_sparse = MLPRegressor(**params).fit(Xs, yr)
    data = {id(reg_sparse): Xs, id(reg_dense): X_dense}
    reg_sparse, reg_dense = _at_the_same_iteration(
        reg_sparse, reg_dense,
        lambda est, k: clone(est).set_params(max_iter=k).fit(data[id(est)], yr))
    # Predictions of about 10, moved by 3e-11 by a 64-ulp change of X.
    np.testing.assert_allclose(reg_sparse.predict(Xs), reg_dense.predict(X_dense),
                               rtol=1e-9, atol=1e-9)


def _random_csr(n_rows, n_cols, nnz, seed=0):
    rng = np.random.RandomState(seed)
    return sp.csr_matrix((rng.rand(nnz), (rng.randint(0, n_rows, nnz),
                                          rng.randint(0, n_cols, nnz))),
                         shape=(n_rows, n_cols))


def test_large_sparse_input_trains():
    X = _random_csr(20000, 5000, 100000)
    y = X @ np.random.RandomState(1).choice([-1.0, 1.0], 5000) > 0
    est = MLPClassifier((8,), solver="adam", random_state=0, max_iter=3,
                        learning_rate_init=0.01).fit(X, y)
    np.testing.assert_array_equal(est.predict(X.tocsc()), est.predict(X))
    assert est.score(X, y) > DummyClassifier().fit(X, y).score(X, y) + 0.3


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_sparse_input_memory_does_not_scale_with_dense_size(solver):
    """1000 x 100000 with 10000 stored values: the dense matrix would be 800 MB, the
    model (2 hidden units) has 200002 parameters. Fitting and predicting must not
    allocate anything of the dense matrix's size."""
    X = _random_csr(1000, 100_000, 10_000)
    y = np.arange(1000) % 2
    dense_bytes = X.shape[0] * X.shape[1] * 8
    tracemalloc.start()
    try:
        est = MLPClassifier((2,), solver=solver, random_state=0, max_iter=2).fit(X, y)
        est.predict_proba(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Without any dense-sized buffer the peak is about 70 MB (L-BFGS-B's history).
    assert peak < dense_bytes / 5, f"peak {peak / 1e6:.0f} MB"


# ---------------------------------------------------------------------------------------
# Input layouts


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_memory_layouts_give_the_same_model(solver, dtype):
    rng = np.random.RandomState(0)
    wide = rng.normal(size=(300, 10)).astype(dtype)
    X = np.ascontiguousarray(wide[:, ::2])
    y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(int)
    params = dict(hidden_layer_sizes=(8,), solver=solver, random_state=0, max_iter=20,
                  batch_size=32, n_jobs=1)
    ref = MLPClassifier(**params).fit(X, y)
    # A strided or read-only X is copied to (or used as) the same C-ordered values: the
    # same bytes reach the same kernels, so the model is the same, exactly.
    read_only = X.copy()
    read_only.flags.writeable = False
    for variant in (wide[:, ::2], read_only):
        est = MLPClassifier(**params).fit(variant, y)
        np.testing.assert_array_equal(est._theta, ref._theta)
        np.testing.assert_array_equal(est.predict_proba(variant), ref.predict_proba(X))
    # An F-ordered X goes through GEMM's transpose flag: another kernel, other rounding.
    XF = np.asfortranarray(X)
    # One evaluation: each first-layer product is a 5-term dot product, which two
    # summation orders round differently by at most 2 * 5 ulps of its terms' sum; the
    # later layers and the row sums carry that over without growth. 64 ulps of the
    # largest gradient entry (64 eps: 7.6e-6 in float32, 1.4e-14 in float64) bound it.
    net, theta = ref._net, ref._net.init_params(0)
    Y = ref._label_binarizer.transform(y)
    grad_c = net.loss_grad(theta, X, Y, alpha=ref.alpha)[1].astype(np.float64)
    grad_f = net.loss_grad(theta, XF, Y, alpha=ref.alpha)[1].astype(np.float64)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(grad_f, grad_c, rtol=0, atol=64 * eps * np.abs(grad_c).max())
    # The whole fit: float64 runs as in "Tolerances". float32 L-BFGS is the
    # ill-conditioned one: SciPy's float64 line search and curvature pairs work on a
    # float32 objective whose rounding noise (1e-7) they amplify, so a 1-ulp change of
    # X already moves its probabilities by 1.8e-5 after 20 iterations, and 8 ulps by
    # 6e-5 (a kernel with another summation order differs by up to about 8 ulps here:
    # 5 inputs, 8 hidden units); 1e-3 leaves a margin of 15 on that. float32 SGD/Adam
    # move by 1.8e-7 for 8 ulps: 1e-5.
    if dtype == np.float64:
        tol = 1e-10
    else:
        tol = 1e-3 if solver == "lbfgs" else 1e-5
    est = MLPClassifier(**params).fit(XF, y)
    np.testing.assert_allclose(est.predict_proba(XF), ref.predict_proba(X), rtol=0,
                               atol=tol)
    np.testing.assert_allclose(est._theta, ref._theta, rtol=tol, atol=tol)


def test_feature_names_from_dataframe():
    import pandas as pd
    X, y = _xor_like(60)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(5)])
    est = MLPClassifier((4,), solver="lbfgs", random_state=0, max_iter=20).fit(df, y)
    np.testing.assert_array_equal(est.feature_names_in_, df.columns.to_numpy())
    assert est.n_features_in_ == 5
    with pytest.warns(UserWarning, match="feature names"):
        from_array = est.predict(X)
    np.testing.assert_array_equal(from_array, est.predict(df))
    with pytest.raises(ValueError, match="feature names"):
        est.predict(df[["f1", "f0", "f2", "f3", "f4"]])
    plain = MLPClassifier((4,), solver="lbfgs", random_state=0, max_iter=20).fit(X, y)
    assert not hasattr(plain, "feature_names_in_")
    assert plain.n_features_in_ == 5


# ---------------------------------------------------------------------------------------
# 8. Early stopping


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_early_stopping_keeps_best_validation_parameters(solver, monkeypatch):
    X, y = _digits_scaled(600)
    snapshots = []
    original = fastbp._stochastic.StochasticOptimizer.epoch

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        snapshots.append(np.array(args[1], copy=True))
        return result

    monkeypatch.setattr(fastbp._stochastic.StochasticOptimizer, "epoch", recording)
    est = MLPClassifier((16,), solver=solver, random_state=0, max_iter=200,
                        learning_rate_init=0.02 if solver == "adam" else 0.1,
                        early_stopping=True, n_iter_no_change=5)
    est.fit(X, y)
    scores = est.validation_scores_
    assert len(scores) == est.n_iter_ == len(est.loss_curve_) == len(snapshots)
    assert est.n_iter_ < 200
    assert est.best_validation_score_ == max(scores)
    assert est.best_validation_score_ > 0.85
    assert est.best_loss_ is None
    best = int(np.argmax(scores))  # the first epoch reaching the best score
    np.testing.assert_array_equal(est._theta, snapshots[best])
    # It stopped n_iter_no_change + 1 epochs after the last improvement by tol.
    assert est.n_iter_ - 1 - best >= est.n_iter_no_change
    # t_ counts training samples only (the validation tenth is held out).
    assert est.t_ == est.n_iter_ * (600 - 60)


def test_early_stopping_regressor_scores_are_r2():
    X, y = _small_regression(300)
    est = MLPRegressor(hidden_layer_sizes=(16,), solver="adam", random_state=0,
                       max_iter=300, learning_rate_init=0.01, early_stopping=True,
                       validation_fraction=0.2).fit(X, y)
    assert len(est.validation_scores_) == est.n_iter_ < 300
    assert est.best_validation_score_ == max(est.validation_scores_) > 0.9
    assert est.score(X, y) > 0.9


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_no_early_stopping_attributes(solver):
    X, y = _iris_scaled()
    est = MLPClassifier((8,), solver=solver, random_state=0, max_iter=30).fit(X, y)
    assert est.validation_scores_ is None
    assert est.best_validation_score_ is None
    assert est.best_loss_ == pytest.approx(min(est.loss_curve_))


# ---------------------------------------------------------------------------------------
# 9. sample_weight


@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor])
def test_integer_sample_weights_equal_repeated_rows(Est):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(60, 4))
    y = ((X[:, 0] + X[:, 1] ** 2 > 0.5).astype(int) if Est is MLPClassifier
         else X[:, 0] - X[:, 1] * X[:, 2])
    w = rng.randint(0, 4, size=60)
    params = dict(hidden_layer_sizes=(8,), solver="lbfgs", random_state=0, max_iter=30)
    weighted = Est(**params).fit(X, y, sample_weight=w)
    X_rep, y_rep = np.repeat(X, w, axis=0), np.repeat(y, w)
    repeated = Est(**params).fit(X_rep, y_rep)
    # The same objective, rounded differently (w * loss against loss + loss + loss, and
    # GEMMs over other row counts): a run of rounding differences, compared at equal
    # iteration counts (a 64-ulp change of X moves these parameters by 3e-13).
    data = {id(weighted): (X, y, w), id(repeated): (X_rep, y_rep, None)}
    weighted, repeated = _at_the_same_iteration(
        weighted, repeated, lambda est, k: clone(est).set_params(max_iter=k).fit(
            *data[id(est)][:2], sample_weight=data[id(est)][2]))
    assert weighted.loss_ == pytest.approx(repeated.loss_, rel=1e-9)
    np.testing.assert_allclose(weighted._theta, repeated._theta, rtol=1e-8, atol=1e-10)
    out = "predict_proba" if Est is MLPClassifier else "predict"
    np.testing.assert_allclose(getattr(weighted, out)(X), getattr(repeated, out)(X),
                               rtol=1e-8, atol=1e-10)
    # Zero weights equal dropping the rows: the same rounding differences at most
    # (GEMMs over fewer rows), the same bound.
    weighted = Est(**params).fit(X, y, sample_weight=w)
    dropped = Est(**params).fit(X[w > 0], y[w > 0], sample_weight=w[w > 0])
    data = {id(weighted): (X, y, w), id(dropped): (X[w > 0], y[w > 0], w[w > 0])}
    weighted, dropped = _at_the_same_iteration(
        weighted, dropped, lambda est, k: clone(est).set_params(max_iter=k).fit(
            *data[id(est)][:2], sample_weight=data[id(est)][2]))
    np.testing.assert_allclose(weighted._theta, dropped._theta, rtol=1e-10, atol=1e-12)
    # Unit weights equal no weights, exactly: each row's loss and error is multiplied by
    # 1.0 (exact) and the weights sum to n exactly, so every evaluation is bitwise the
    # same (test_core checks it per evaluation), and so is the run.
    unit = Est(**params).fit(X, y, sample_weight=np.ones(60))
    plain = Est(**params).fit(X, y)
    np.testing.assert_array_equal(unit._theta, plain._theta)


def test_sample_weight_changes_the_model():
    X, y = _xor_like(80)
    w = np.where(y == 1, 10.0, 0.1)
    plain = MLPClassifier((4,), solver="lbfgs", random_state=0, max_iter=50).fit(X, y)
    weighted = MLPClassifier((4,), solver="lbfgs", random_state=0,
                             max_iter=50).fit(X, y, sample_weight=w)
    # Heavily weighted positives are predicted more often.
    assert weighted.predict_proba(X)[:, 1].mean() > plain.predict_proba(X)[:, 1].mean()


# ---------------------------------------------------------------------------------------
# 10. Fitted attributes


@pytest.mark.parametrize("solver", SOLVERS)
def test_fitted_attributes(solver):
    X, y = _iris_scaled()
    n = len(y)
    params = dict(solver=solver, random_state=0, max_iter=15)
    multi = MLPClassifier((6, 5), **params).fit(X, y)
    assert multi.out_activation_ == "softmax"
    assert multi.n_layers_ == 4
    assert multi.n_outputs_ == 3
    assert multi.n_features_in_ == 4
    np.testing.assert_array_equal(multi.classes_, [0, 1, 2])
    assert len(multi.loss_curve_) == multi.n_iter_ == 15
    assert multi.loss_ == pytest.approx(multi.loss_curve_[-1])
    if solver in STOCHASTIC:
        assert multi.t_ == multi.n_iter_ * n

    binary = MLPClassifier((6,), **params).fit(X, y == 2)
    assert binary.out_activation_ == "logistic"
    assert binary.n_outputs_ == 1
    assert binary.n_layers_ == 3
    assert [c.shape for c in binary.coefs_] == [(4, 6), (6, 1)]

    reg = MLPRegressor(hidden_layer_sizes=(), **params).fit(X[:, 1:], X[:, 0])
    assert reg.out_activation_ == "identity"
    assert reg.n_layers_ == 2  # no hidden layer: a linear model
    assert [c.shape for c in reg.coefs_] == [(3, 1)]

    poisson = MLPRegressor(loss="poisson", hidden_layer_sizes=7, **params).fit(
        X, np.arange(n) % 4)
    assert poisson.out_activation_ == "exp"
    assert poisson.n_layers_ == 3
    assert len(poisson.loss_curve_) == poisson.n_iter_


def test_stochastic_max_iter_warns_and_loss_curve_length():
    X, y = _iris_scaled()
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        est = MLPClassifier((8,), solver="sgd", random_state=0, max_iter=7).fit(X, y)
    assert est.n_iter_ == 7 == len(est.loss_curve_)
    with pytest.warns(ConvergenceWarning):
        MLPClassifier((8,), solver="lbfgs", random_state=0, max_iter=3).fit(X, y)


# ---------------------------------------------------------------------------------------
# 11. partial_fit


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_partial_fit_reduces_loss(solver):
    X, y = _digits_scaled(600)
    est = MLPClassifier((16,), solver=solver, random_state=0,
                        learning_rate_init=0.05 if solver == "sgd" else 0.01)
    classes = np.arange(10)
    est.partial_fit(X[:100], y[:100], classes=classes)  # a batch without every class
    first = est.loss_
    for _ in range(15):
        est.partial_fit(X, y)
    assert len(est.loss_curve_) == 16
    assert est.n_iter_ == 1
    assert est.t_ == 100 + 15 * 600
    assert est.loss_ < 0.5 * first
    assert np.all(np.diff(est.loss_curve_[1:]) < 0.05)
    np.testing.assert_array_equal(est.classes_, classes)
    assert est.score(X, y) > 0.9

    Xr, yr = _small_regression()
    reg = MLPRegressor(hidden_layer_sizes=(16,), solver=solver, random_state=0,
                       learning_rate_init=0.01)
    losses = [reg.partial_fit(Xr, yr).loss_ for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert reg.n_iter_ == 1


def test_partial_fit_classes_only_needed_first():
    X, y = _xor_like(60)
    est = MLPClassifier((4,), solver="sgd", random_state=0)
    with pytest.raises(ValueError, match="classes"):
        est.partial_fit(X, y)
    est.partial_fit(X, y, classes=np.array([0, 1]))
    est.partial_fit(X, y)  # fine without classes now
    est.partial_fit(X[y == 0], y[y == 0])  # a subset of the classes is fine
    assert est.predict_proba(X).shape == (60, 2)


def test_partial_fit_after_fit_continues():
    X, y = _iris_scaled()
    est = MLPClassifier((8,), solver="adam", random_state=0, max_iter=20).fit(X, y)
    theta = est._theta.copy()
    step = int(est._optimizer.step[0])
    est.partial_fit(X, y)
    assert int(est._optimizer.step[0]) == step + 1  # one full batch
    assert not np.array_equal(theta, est._theta)
    assert len(est.loss_curve_) == 21


# ---------------------------------------------------------------------------------------
# 12. Poisson


@pytest.mark.parametrize("solver", SOLVERS)
def test_poisson_regression_beats_a_constant(solver):
    rng = np.random.RandomState(0)
    X = rng.uniform(-1, 1, size=(400, 3))
    mu = np.exp(1.0 + X[:, 0] - 0.5 * X[:, 1])
    y = rng.poisson(mu).astype(float)
    est = MLPRegressor(loss="poisson", hidden_layer_sizes=(8,), solver=solver,
                       random_state=0, max_iter=200, learning_rate_init=0.01)
    est.fit(X[:300], y[:300])
    assert est.out_activation_ == "exp"
    pred = est.predict(X[300:])
    assert (pred > 0).all()
    constant = np.full(100, y[:300].mean())
    ours = mean_poisson_deviance(y[300:], pred)
    assert ours < 0.6 * mean_poisson_deviance(y[300:], constant)
    assert ours < 1.3 * mean_poisson_deviance(y[300:], mu[300:])  # near the truth
    # Zero counts are allowed.
    assert (y == 0).any()
