"""Truncated-Newton solvers: 'tnc', 'newton-cg' and 'trust-krylov' (exact curvature),
and 'hessian-free'."""
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

import fastbp
from fastbp import MLPClassifier, MLPRegressor

NEWTON = [("tnc", "gauss-newton"), ("newton-cg", "gauss-newton"),
          ("newton-cg", "hessian"), ("trust-krylov", "gauss-newton"),
          ("trust-krylov", "hessian"), ("hessian-free", "gauss-newton")]


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return StandardScaler().fit_transform(X), y


# What a working solver must reach on standardized digits with 32 hidden units, 60
# iterations from random_state=0. The initial parameters give a loss of 2.44 (uniform
# predictions: log 10 = 2.30) and an accuracy of 0.12, near the majority share 0.10:
# that is where a solver that does not move, or moves the wrong way, stays. The first
# iteration of any of these solvers already gets below 1.7 (accuracy above 0.5). A
# working run gets to a loss near 0 in float64; in float32 a run may stop early where
# rounding noise hides its progress (TNC's "|f_n - f_(n-1)| ~= 0" test fired at
# iteration 11 with OpenBLAS's AVX-512 kernels: loss 0.13, accuracy 0.957). The bounds
# sit between the two with a margin of about 2 on each side: a loss below a tenth of the
# initial one, and an accuracy of at least 0.9.
def _assert_solver_worked(clf, X, y):
    initial_loss, _ = clf._net.loss_grad(clf._net.init_params(0), X,
                                         clf._label_binarizer.transform(y),
                                         alpha=clf.alpha)
    assert initial_loss > 2.3
    assert clf.loss_ < 0.1 * initial_loss, (clf.loss_, initial_loss)
    assert clf.score(X, y) >= 0.9


@pytest.mark.parametrize("solver,curvature", NEWTON)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_solver_fits_standardized_digits(digits, solver, curvature, dtype):
    X, y = digits
    X = X.astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((32,), solver=solver, curvature=curvature, max_iter=60,
                            random_state=0).fit(X, y)
    _assert_solver_worked(clf, X, y)
    assert clf.coefs_[0].dtype == dtype and clf.predict_proba(X).dtype == dtype
    assert len(clf.loss_curve_) == clf.n_iter_ >= 1
    assert clf.loss_ <= clf.loss_curve_[-1] * (1 + 1e-6)
    assert not hasattr(clf, "partial_fit")


@pytest.mark.parametrize("solver,curvature", NEWTON)
def test_regressor(solver, curvature):
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    y = (y - y.mean()) / y.std()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg = MLPRegressor(hidden_layer_sizes=(8,), solver=solver, curvature=curvature,
                           max_iter=50, random_state=0).fit(X, y)
    assert reg.score(X, y) > 0.5


def test_tnc_stops_at_max_iter_with_a_warning(digits):
    X, y = digits
    with pytest.warns(ConvergenceWarning, match="tnc failed to converge after 3"):
        clf = MLPClassifier((16,), solver="tnc", max_iter=3, random_state=0).fit(X, y)
    assert clf.n_iter_ == 3 and len(clf.loss_curve_) == 3
    assert np.isfinite(clf._theta).all()
    # The loss curve holds the objective at the iterates.
    d = clf._net.prepare(X, clf._label_binarizer.transform(y))
    loss = clf._net._loss_grad(clf._theta, d, clf.alpha, np.empty(clf._net.n_params))
    assert loss == pytest.approx(clf.loss_, rel=1e-12)


@pytest.mark.parametrize("solver", ["tnc", "newton-cg", "trust-krylov", "hessian-free"])
def test_verbose_and_warm_start(digits, solver, capsys):
    X, y = digits
    X, y = X[:400], y[:400]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((8,), solver=solver, max_iter=4, verbose=True,
                            warm_start=True, random_state=0).fit(X, y)
        first = clf.loss_
        lines = [ln for ln in capsys.readouterr().out.splitlines()
                 if ln.startswith("Iteration ")]
        assert len(lines) == clf.n_iter_
        clf.fit(X, y)
    assert clf.loss_ <= first
    assert len(clf.loss_curve_) > clf.n_iter_  # the curve goes on across warm starts


@pytest.mark.parametrize("solver", ["tnc", "newton-cg", "trust-krylov", "hessian-free"])
def test_ctrl_c_keeps_the_best_parameters(digits, solver, monkeypatch):
    X, y = digits
    losses = []
    original = fastbp._network.Network._loss_grad

    def interrupting(self, theta, *args, **kwargs):
        if len(losses) == 5:
            raise KeyboardInterrupt
        losses.append(original(self, theta, *args, **kwargs))
        return losses[-1]
    monkeypatch.setattr(fastbp._network.Network, "_loss_grad", interrupting)
    with pytest.warns(UserWarning, match="interrupted"):
        clf = MLPClassifier((16,), solver=solver, max_iter=50, random_state=0).fit(X, y)
    monkeypatch.setattr(fastbp._network.Network, "_loss_grad", original)
    assert len(losses) == 5  # it really was interrupted, after five evaluations
    assert np.isfinite(clf._theta).all()
    # The model holds the best of the parameters evaluated, not the last ones.
    d = clf._net.prepare(X, clf._label_binarizer.transform(y))
    kept = clf._net._loss_grad(clf._theta, d, clf.alpha, None)
    assert kept == pytest.approx(min(losses), rel=1e-12)
    assert kept < losses[0]


def test_bad_curvature_rejected(digits):
    X, y = digits
    with pytest.raises(InvalidParameterError, match="curvature"):
        MLPClassifier(solver="newton-cg", curvature="fisher").fit(X[:50], y[:50])


def test_trust_krylov_survives_its_own_lanczos_breakdown(digits):
    # Near convergence SciPy's trust-krylov can hand hessp a NaN direction, and then fun
    # a NaN point (seen in this configuration: iteration 19). That is SciPy's breakdown,
    # not a divergence of the model: the fit must end normally with finite parameters
    # (before the fix it raised DivergenceError here).
    X, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((32,), solver="trust-krylov", max_iter=40, tol=0.0,
                            random_state=0).fit(X, y)
    assert np.isfinite(clf._theta).all()
    _assert_solver_worked(clf, X, y)
