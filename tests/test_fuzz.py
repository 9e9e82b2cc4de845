"""Property-based fuzzing (hypothesis) of fastbp's public entry points.

What is fuzzed:

- ``MLPClassifier.fit`` and ``MLPRegressor.fit`` with random hyperparameters (every
  solver, hidden layers, activation, alpha, learning_rate_init, max_iter, batch_size, tol;
  valid and invalid values) on random data: shapes (0-30 rows, 0-5 columns, 1-D and 3-D
  arrays, CSR matrices), dtypes (float64, float32, int64, bool, object strings, complex),
  values (NaN, infinities, 1e300, subnormals), labels and targets (ints, strings, one
  class, NaN, wrong lengths) and sample weights (negative, zero, NaN, wrong length); then
  ``predict`` (and ``predict_proba``) on the training X and on a random X of possibly the
  wrong width.
- ``Network(...)``, ``Network.loss_grad`` and ``Network.forward`` with random layer
  sizes, activations, outputs and dtypes, with ``theta`` from ``init_params`` perturbed
  (NaN, infinity, huge values), of the wrong length or of the wrong type, and random X, Y,
  sample weights and alpha.
- ``fastbp.load`` on corrupted copies of a valid model file: truncated, bytes flipped,
  garbage inserted, random bytes, empty; and re-zipped archives whose JSON metadata or
  arrays were changed, so that the fuzz reaches past the zip checksums.

What is asserted: every call ends EITHER in a clean error -- exactly a ``ValueError`` or
``TypeError``, subclasses included (scikit-learn's ``InvalidParameterError``,
``fastbp.DivergenceError``) -- OR in a valid result: finite parameters, predictions of the
right length, finite regression outputs, probabilities that are finite, in [0, 1] and sum
to 1, finite losses and gradients of the right shape and dtype, and loaded models that
predict. Any other exception fails the test, and so does a non-finite result, except where
a worst-case bound shows that the exact result itself does not fit the dtype (see
``_overflow_possible``).
"""
import contextlib
import io
import json
import math
import os
import tempfile
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

import fastbp
from fastbp import MLPClassifier, MLPRegressor, Network

NAN, INF = float("nan"), float("inf")

SOLVERS = ["lbfgs", "sgd", "adam", "tnc", "newton-cg", "trust-krylov", "hessian-free"]
ACTIVATIONS = ["identity", "logistic", "tanh", "relu"]
OUTPUTS = ["softmax", "logistic", "identity", "exp"]


def _fuzz_settings(max_examples):
    # No explain phase: it re-runs failing examples many times to annotate them, which
    # costs more than the whole fuzz on this file's failures.
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------
# The harness


def _clean_or_valid(call):
    """Run ``call()``: its result, or None when it raised a ValueError or TypeError (a
    clean refusal). Any other exception propagates and fails the test."""
    try:
        return call()
    except (ValueError, TypeError):
        return None


@contextlib.contextmanager
def _quiet():
    """Convergence warnings, clipping warnings and NumPy overflow warnings are all fine:
    only the outcome of a call is under test."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _log10_1p(value):
    """log10(1 + value) for value >= 0, infinite when value is."""
    return math.log10(1.0 + float(value))


def _dense_float(X):
    """X as a float64 ndarray (X was accepted by the call, so it converts)."""
    return X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)


def _overflow_possible(net, theta, X, Y=None, sample_weight=None, alpha=0.0):
    """Whether a worst-case bound allows the exact forward pass (and, with Y, the exact
    loss or gradient) to exceed what the network's dtype holds (with a 100x margin).

    What the code promises (fastbp/_network.py): the Network entry points refuse NaN and
    infinity in theta, X, Y and sample_weight (and values too large for the dtype), but
    they do not check their results. So finite but large inputs can give a result whose
    exact value does not fit the dtype, and then an infinity (or a NaN from inf - inf) is
    the honest answer. That does not take |values| > 1e100: exp(800) in a Poisson output,
    a squared error of (1e160)^2 or a float32 gradient of (1e20)^2 overflow from moderate
    or float32-sized inputs. So instead of a fixed threshold on the inputs, a non-finite
    result is accepted only where this bound says the exact result may not fit the dtype;
    everywhere else (nearly all fuzzed cases) it fails the test.

    The exact fixed-point sums of the full-batch kernels (_core.pyx, FASTBP_FX_LIMIT)
    hold block sums below 2**116 (8.3e34) in magnitude; beyond, the whole loss and
    gradient are NaN (documented in the README, and reported as divergence by the
    solvers). So for the loss and the gradient the bound uses that limit where it is
    below the dtype's.

    The bound, in log10: every pre-activation is at most |input| * max column abs-sum of
    W + max |b|; logistic and tanh outputs are at most 1; every activation derivative is at
    most 1, so backpropagation grows the output error by at most the max row abs-sum of
    each W. The loss is a weighted mean (weights / sum(weights) <= 1), plus the penalty.
    """
    theta = np.array(theta, dtype=np.float64)
    coefs, intercepts = net.unpack(theta)
    X = _dense_float(X)
    limit = math.log10(np.finfo(net.dtype).max) - 2
    act = _log10_1p(np.abs(X).max()) if X.size else 0.0
    peak = act       # the largest activation or pre-activation
    growth = 0.0     # how much backpropagation can amplify the output error
    for W, b in zip(coefs, intercepts):
        z = act + _log10_1p(np.abs(W).sum(axis=0).max() + np.abs(b).max())
        growth += _log10_1p(np.abs(W).sum(axis=1).max())
        peak = max(peak, z)
        act = min(z, math.log10(2)) if net.activation in ("logistic", "tanh") else z
    if peak >= limit:
        return True
    z_out = 10.0 ** z - 1.0  # z is the output pre-activation bound, now known to be finite
    m = net.layer_sizes[-1]
    exp_out = z_out * math.log10(math.e)  # log10 of exp(z_out)
    if net.output == "exp" and exp_out >= limit:
        return True
    if Y is None:
        return False
    y = _log10_1p(np.abs(np.asarray(Y, dtype=np.float64)).max()) if np.size(Y) else 0.0
    log_m = math.log10(m + 1)
    # log10 bounds on the output error |dloss/dz| and on the per-sample loss.
    error, loss = {
        "identity": (z + y, 2 * (z + y) + log_m),
        "exp": (max(exp_out, y) + math.log10(2), max(exp_out, y + z, 2 * y) + log_m + 1),
        "softmax": (y + log_m, y + z + 2 * log_m + 1),
        "logistic": (y + math.log10(2), y + z + log_m + 1),
    }[net.output]
    gradient = peak + error + growth
    w_sum = (X.shape[0] if sample_weight is None
             else float(np.sum(np.asarray(sample_weight, dtype=np.float64))))
    if alpha > 0 and w_sum > 0:
        w_max = max(np.abs(W).max() for W in coefs)
        penalty = math.log10(alpha) + 2 * _log10_1p(w_max) + math.log10(net.n_params)
        penalty -= math.log10(w_sum)
        loss = max(loss, penalty)
        gradient = max(gradient, math.log10(alpha) + _log10_1p(w_max) - math.log10(w_sum))
    sums = min(limit, 116 * math.log10(2) - 2)  # the exact sums' range, with a margin
    return gradient >= sums or loss >= sums


# ---------------------------------------------------------------------------------------
# Strategies
#
# Every strategy takes ``wild``: False draws only valid input (so that the fuzz reaches
# the kernels and checks results), True draws anything. A test first draws which of its
# inputs are wild: none, one, or several (``wild_parts``).

# Ordinary values, and the values that break numerical code.
ordinary = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
special = st.sampled_from([NAN, INF, -INF, 1e300, -1e300, 1e-300, 5e-324, -0.0, 1e20])


@st.composite
def wild_parts(draw, parts):
    """Which of ``parts`` get wild input: none, exactly one, or several."""
    mode = draw(st.sampled_from(["none", "one", "several"]))
    if mode == "none":
        return frozenset()
    if mode == "one":
        return frozenset([draw(st.sampled_from(parts))])
    return frozenset(draw(st.sets(st.sampled_from(parts), min_size=2)))


@st.composite
def numbers(draw, count, wild=True):
    """``count`` floats: ordinary, or (when wild, half of the time) with special values."""
    elements = st.one_of(ordinary, special) if wild and draw(st.booleans()) else ordinary
    return draw(st.lists(elements, min_size=count, max_size=count))


@st.composite
def data_matrices(draw, wild, n_rows=None, n_cols=None):
    """An X. Valid: a 2-D float64/float32 array or CSR matrix of ordinary values. Wild:
    also 0 rows or columns, int64, bool, object strings, complex, 1-D or 3-D, and
    special values."""
    n = draw(st.integers(0 if wild else 1, 30)) if n_rows is None else n_rows
    d = draw(st.integers(0 if wild else 1, 5) if n_cols is None else n_cols)
    dtypes = ["float64"] * 4 + ["float32"] * 2
    dtype = draw(st.sampled_from(dtypes + ["int64", "bool", "object", "complex"]
                                 if wild else dtypes))
    size = n * d
    if dtype == "int64":
        X = np.array(draw(st.lists(st.integers(-5, 5) | st.just(2**62), min_size=size,
                                   max_size=size)), dtype=np.int64)
    elif dtype == "bool":
        X = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    elif dtype == "object":  # strings, some of which parse as numbers
        X = np.array(draw(st.lists(st.sampled_from(["a", "1.5", "", "nan", "-2"]),
                                   min_size=size, max_size=size)), dtype=object)
    elif dtype == "complex":
        with np.errstate(invalid="ignore"):  # 1j * inf
            X = np.array(draw(numbers(size))) + 1j * np.array(draw(numbers(size)))
    else:
        with np.errstate(over="ignore"):  # 1e300 becomes inf in float32, on purpose
            X = np.array(draw(numbers(size, wild)), dtype=dtype)
    X = X.reshape(n, d)
    layouts = ["2-D"] * 6 + ["csr"]
    layout = draw(st.sampled_from(layouts + ["1-D", "3-D"] if wild else layouts))
    if layout == "1-D":
        return X.ravel()
    if layout == "3-D":
        return X.reshape(n, d, 1)
    if layout == "csr" and X.dtype.kind in "fib":
        return sp.csr_matrix(X)
    return X


def _rows(X):
    return X.shape[0]


def _lengths(n, wild):
    """A length for y or sample_weight: n, or when wild sometimes off by one."""
    return st.sampled_from([n] * 4 + [max(n - 1, 0), n + 1]) if wild else st.just(n)


@st.composite
def class_labels(draw, n, wild):
    """Labels: ints, strings or a multilabel indicator; when wild also one class, float
    labels with NaN, a wrong length."""
    length = draw(_lengths(n, wild))
    kinds = ["int"] * 3 + ["str"] * 2 + ["multilabel"]
    kind = draw(st.sampled_from(kinds + ["one-class", "float-nan"] if wild else kinds))
    if kind == "int":
        return np.array(draw(st.lists(st.integers(0, 2), min_size=length,
                                      max_size=length)), dtype=np.int64)
    if kind == "str":
        return np.array(draw(st.lists(st.sampled_from(["cat", "dog", "eel"]),
                                      min_size=length, max_size=length)))
    if kind == "one-class":
        return np.full(length, 7)
    if kind == "float-nan":
        return np.array(draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, NAN]),
                                      min_size=length, max_size=length)))
    return np.array(draw(st.lists(st.integers(0, 1), min_size=3 * length,
                                  max_size=3 * length))).reshape(length, 3)


@st.composite
def regression_targets(draw, n, wild):
    """Targets: one or two columns of floats; when wild with special values or a wrong
    length."""
    length = draw(_lengths(n, wild))
    outputs = draw(st.sampled_from([1, 1, 1, 2]))
    y = np.array(draw(numbers(length * outputs, wild)), dtype=np.float64)
    return y if outputs == 1 else y.reshape(length, outputs)


@st.composite
def sample_weights(draw, n, wild):
    """None or positive weights; when wild also negative, zero, NaN, infinite, huge
    or tiny weights, or a wrong length."""
    if draw(st.booleans()):
        return None
    length = draw(_lengths(n, wild))
    elements = (st.one_of(st.floats(0, 5), st.sampled_from([-1.0, 0.0, NAN, INF, 1e300,
                                                            1e-300]))
                if wild else st.floats(0.1, 5))
    return np.array(draw(st.lists(elements, min_size=length, max_size=length)))


def _pick(draw, usual, unusual, wild):
    """One of ``usual``; when wild, sometimes one of ``unusual`` (invalid or extreme)."""
    return draw(st.sampled_from(usual * 3 + unusual if wild else usual))


@st.composite
def hyperparameters(draw, wild):
    """Keyword arguments of an estimator, always fast (max_iter <= 5). Valid values
    include extreme ones (alpha=1e300, learning_rate_init=1e6); wild ones are invalid
    (hidden layers of 0 or -1 units, a made-up activation, negative or NaN values,
    max_iter=0)."""
    hidden = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
    if wild and draw(st.integers(0, 4)) == 0:
        hidden[draw(st.integers(0, len(hidden) - 1))] = draw(st.sampled_from([0, -1]))
    return {
        "solver": draw(st.sampled_from(SOLVERS)),
        "hidden_layer_sizes": tuple(hidden),
        "activation": _pick(draw, ACTIVATIONS, ["softplus"], wild),
        "alpha": _pick(draw, [1e-4, 0.0, 1.0, 1e6, 1e300], [-1.0, NAN], wild),
        "learning_rate_init": _pick(draw, [1e-3, 0.1, 10.0, 1e6], [0.0, -1.0], wild),
        "learning_rate": draw(st.sampled_from(["constant", "invscaling", "adaptive"])),
        "max_iter": _pick(draw, [1, 2, 3, 5], [0], wild),
        "batch_size": draw(st.integers(1, 50) | st.just("auto")),
        "tol": _pick(draw, [1e-4, 0.0, 1.0], [-1.0], wild),
        "early_stopping": draw(st.sampled_from([False] * 4 + [True])),
        "curvature": draw(st.sampled_from(["gauss-newton", "hessian"])),
        "random_state": 0,
    }


# ---------------------------------------------------------------------------------------
# 1. The estimators


def _proba_tolerance(est):
    return 1e-4 if est._net.dtype == np.float32 else 1e-6


def _check_predictions(est, X, strict):
    """predict (and predict_proba) on X, which the model accepted for training or for
    prediction. ``strict``: X is the training X, whose outputs must be finite; otherwise
    non-finite outputs are accepted only where ``_overflow_possible`` allows them."""
    n = _rows(X)
    pred = est.predict(X)
    assert len(pred) == n
    finite_expected = strict or not _overflow_possible(est._net, est._theta, _dense_float(X))
    if isinstance(est, MLPRegressor):
        assert pred.shape[1:] == (() if est.n_outputs_ == 1 else (est.n_outputs_,))
        if finite_expected:
            assert np.isfinite(pred).all(), f"non-finite predictions {pred}"
        return
    multilabel = est._label_binarizer.y_type_ == "multilabel-indicator"
    if multilabel:
        assert pred.shape == (n, len(est.classes_)) and np.isin(pred, [0, 1]).all()
    else:
        assert np.isin(pred, est.classes_).all()
    proba = est.predict_proba(X)
    assert proba.shape == (n, max(2, est.n_outputs_))
    if finite_expected:
        assert np.isfinite(proba).all(), f"non-finite probabilities {proba}"
        assert ((proba >= 0) & (proba <= 1)).all()
        if not multilabel:  # multilabel columns are independent probabilities
            np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0,
                                       atol=_proba_tolerance(est))


def _check_fitted(est, X, X_other):
    """The properties of a fit that succeeded."""
    assert np.isfinite(est._theta).all()
    for array in est.coefs_ + est.intercepts_:
        assert np.isfinite(array).all()
    _check_predictions(est, X, strict=True)
    # A random X: refused cleanly, or predicted with the same guarantees.
    if _clean_or_valid(lambda: est.predict(X_other)) is not None:
        _check_predictions(est, X_other, strict=False)


def _fuzz_estimator(data, cls):
    wild = data.draw(wild_parts(["params", "X", "y", "sample_weight", "X_other"]),
                     label="wild")
    params = data.draw(hyperparameters("params" in wild), label="params")
    if cls is MLPRegressor:
        params["loss"] = data.draw(st.sampled_from(["squared_error"] * 3 + ["poisson"]),
                                   label="loss")
    X = data.draw(data_matrices("X" in wild), label="X")
    n = _rows(X)
    y = data.draw(class_labels(n, "y" in wild) if cls is MLPClassifier
                  else regression_targets(n, "y" in wild), label="y")
    sample_weight = data.draw(sample_weights(n, "sample_weight" in wild),
                              label="sample_weight")
    width = X.shape[1] if X.ndim > 1 else 1
    X_other = data.draw(data_matrices("X_other" in wild, n_cols=st.sampled_from(
        [width] * 3 + [0, 1, 6] if "X_other" in wild else [width])), label="X_other")
    est = cls(**params)
    with _quiet():
        if _clean_or_valid(lambda: est.fit(X, y, sample_weight=sample_weight)) is None:
            event("fit refused")
            return
        event("fit succeeded")
        _check_fitted(est, X, X_other)


@_fuzz_settings(max_examples=250)
@given(data=st.data())
def test_fuzz_classifier_fit_predict(data):
    _fuzz_estimator(data, MLPClassifier)


@_fuzz_settings(max_examples=250)
@given(data=st.data())
def test_fuzz_regressor_fit_predict(data):
    _fuzz_estimator(data, MLPRegressor)


def test_estimator_harness_sanity():
    """The harness refuses a bad fit, accepts a good one, and its checks can fail."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    y = (X[:, 0] > 0).astype(int)
    params = {"hidden_layer_sizes": (4,), "solver": "lbfgs", "max_iter": 5,
              "random_state": 0}
    with _quiet():
        X_nan = X.copy()
        X_nan[3, 1] = NAN
        assert _clean_or_valid(lambda: MLPClassifier(**params).fit(X_nan, y)) is None
        assert _clean_or_valid(lambda: MLPRegressor(**params).fit(X, y * NAN)) is None
        assert _clean_or_valid(lambda: MLPClassifier(**params, alpha=-1).fit(X, y)) is None
        clf = _clean_or_valid(lambda: MLPClassifier(**params).fit(X, y))
        reg = _clean_or_valid(lambda: MLPRegressor(**params).fit(X, X[:, 0]))
        assert clf is not None and reg is not None
        _check_fitted(clf, X, X[:5, :2])  # the narrow X is refused cleanly
        _check_fitted(reg, X, X[:5] * 2)
        # A model with a NaN weight, or an exception that is not a clean refusal, fails.
        clf._theta[0] = NAN
        with pytest.raises(AssertionError):
            _check_fitted(clf, X, X)
    with pytest.raises(ZeroDivisionError):
        _clean_or_valid(lambda: 1 / 0)


# ---------------------------------------------------------------------------------------
# 2. The Network


@st.composite
def network_arguments(draw, wild):
    """(layer_sizes, activation, output, dtype, valid). Wild: sometimes a layer of 0, -1
    or 2.5 units, a made-up activation or output, an integer dtype."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    if wild and draw(st.integers(0, 3)) == 0:
        sizes[draw(st.integers(0, len(sizes) - 1))] = draw(st.sampled_from([0, -1, 2.5]))
    activation = _pick(draw, ACTIVATIONS, ["softplus"], wild)
    output = _pick(draw, OUTPUTS, ["sigmoid"], wild)
    dtype = _pick(draw, [np.float64, np.float32], [np.int64, "float16"], wild)
    valid = (all(isinstance(s, int) and s > 0 for s in sizes) and activation in ACTIVATIONS
             and output in OUTPUTS and dtype in (np.float64, np.float32))
    return sizes, activation, output, dtype, valid


@st.composite
def parameter_vectors(draw, net, wild):
    """theta from init_params: as it is, scaled up, some entries set to finite values
    up to 1e30, or a list. Wild: also NaN, infinities, 1e100 and 1e300, the wrong
    length, strings, complex, 2-D, None."""
    theta = net.init_params(random_state=0)
    valid = ["as-is"] * 2 + ["perturbed", "scaled", "list"]
    how = draw(st.sampled_from(valid + ["short", "long", "strings", "complex", "2-D", "none"]
                               if wild else valid))
    if how == "perturbed":
        where = draw(st.lists(st.integers(0, net.n_params - 1), min_size=1, max_size=3))
        values = [1e30, 1e10, -1e5, 5e-324, 0.0]
        with np.errstate(over="ignore"):
            theta[where] = draw(st.sampled_from(
                values + [NAN, INF, -INF, 1e300, 1e100] if wild else values))
    elif how == "scaled":
        theta = theta * draw(st.sampled_from([10.0, 100.0, 1e4]))
    elif how == "list":
        theta = theta.tolist()
    elif how == "short":
        theta = theta[:-1]
    elif how == "long":
        theta = np.append(theta, 0.0)
    elif how == "strings":
        theta = theta.astype(str)
    elif how == "complex":
        theta = theta + 0j
    elif how == "2-D":
        theta = theta.reshape(1, -1)
    elif how == "none":
        theta = None
    return theta


@st.composite
def targets(draw, n, n_outputs, output, wild):
    """Y: one-hot rows for softmax, 0/1 for logistic, counts for exp, reals for identity,
    or arbitrary reals. Wild: special values, the wrong shape."""
    rows = draw(_lengths(n, wild))
    cols = draw(st.sampled_from([n_outputs] * 4 + [n_outputs + 1]) if wild
                else st.just(n_outputs))
    style = draw(st.sampled_from(["natural"] * 3 + ["arbitrary"]))
    if style == "arbitrary" or output == "identity":
        Y = np.array(draw(numbers(rows * cols, wild)), dtype=np.float64)
    elif output == "softmax":
        Y = np.eye(cols)[draw(st.lists(st.integers(0, cols - 1), min_size=rows,
                                       max_size=rows))].ravel()
    elif output == "logistic":
        Y = np.array(draw(st.lists(st.integers(0, 1), min_size=rows * cols,
                                   max_size=rows * cols)), dtype=np.float64)
    else:
        Y = np.array(draw(st.lists(st.integers(0, 20), min_size=rows * cols,
                                   max_size=rows * cols)), dtype=np.float64)
    Y = Y.reshape(rows, cols)
    return Y.ravel() if cols == 1 and draw(st.booleans()) else Y


def _check_network_result(net, theta, X, Y, sample_weight, alpha, result):
    loss, grad = result
    assert isinstance(loss, float)
    assert isinstance(grad, np.ndarray)
    assert grad.shape == (net.n_params,) and grad.dtype == net.dtype
    if not _overflow_possible(net, theta, X, Y, sample_weight, alpha):
        assert math.isfinite(loss), f"loss {loss}"
        assert np.isfinite(grad).all(), f"gradient {grad}"


def _check_forward_result(net, theta, X, out):
    n_outputs = net.layer_sizes[-1]
    assert out.shape == (_rows(X), n_outputs) and out.dtype == net.dtype
    if _overflow_possible(net, theta, X):
        return
    assert np.isfinite(out).all(), f"forward {out}"
    if net.output in ("softmax", "logistic"):
        assert ((out >= 0) & (out <= 1)).all()
    if net.output == "softmax":
        atol = 1e-4 if net.dtype == np.float32 else 1e-6
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=0, atol=atol)
    if net.output == "exp":
        assert (out >= 0).all()


@_fuzz_settings(max_examples=600)
@given(data=st.data())
def test_fuzz_network_loss_grad_and_forward(data):
    wild = data.draw(wild_parts(["net", "theta", "X", "Y", "sample_weight", "alpha"]),
                     label="wild")
    sizes, activation, output, dtype, valid = data.draw(network_arguments("net" in wild),
                                                        label="net")
    net = _clean_or_valid(lambda: Network(sizes, activation=activation, output=output,
                                          dtype=dtype))
    assert (net is not None) == valid, "Network accepted invalid or refused valid arguments"
    if net is None:
        return
    theta = data.draw(parameter_vectors(net, "theta" in wild), label="theta")
    n = data.draw(st.integers(0 if "X" in wild else 1, 30), label="n")
    n_inputs, n_outputs = net.layer_sizes[0], net.layer_sizes[-1]
    X = data.draw(data_matrices("X" in wild, n_rows=n, n_cols=st.sampled_from(
        [n_inputs] * 4 + [n_inputs + 1] if "X" in wild else [n_inputs])), label="X")
    Y = data.draw(targets(n, n_outputs, output, "Y" in wild), label="Y")
    sample_weight = data.draw(sample_weights(n, "sample_weight" in wild),
                              label="sample_weight")
    alpha = _pick(data.draw, [0.0, 1e-4, 1.0, 1e3], [1e300, -1.0, NAN, INF],
                  "alpha" in wild)
    with _quiet():
        result = _clean_or_valid(lambda: net.loss_grad(theta, X, Y, sample_weight, alpha))
        event(f"loss_grad {'refused' if result is None else 'returned'}")
        if result is not None:
            _check_network_result(net, theta, X, Y, sample_weight, alpha, result)
        out = _clean_or_valid(lambda: net.forward(theta, X))
        event(f"forward {'refused' if out is None else 'returned'}")
        if out is not None:
            _check_forward_result(net, theta, X, out)


def test_network_harness_sanity():
    """NaN input is refused, ordinary input gives a finite result, the overflow
    allowance applies only where the exact result may overflow, and the checks can
    fail."""
    net = Network([3, 4, 2], activation="tanh", output="softmax")
    theta = net.init_params(random_state=0)
    X = np.random.default_rng(0).normal(size=(6, 3))
    Y = np.eye(2)[[0, 1, 1, 0, 1, 0]]
    X_nan = X.copy()
    X_nan[2, 2] = NAN
    assert _clean_or_valid(lambda: net.loss_grad(theta, X_nan, Y)) is None
    assert _clean_or_valid(lambda: net.loss_grad(theta[:-1], X, Y)) is None
    assert _clean_or_valid(lambda: net.forward(theta.astype(str), X)) is None
    result = _clean_or_valid(lambda: net.loss_grad(theta, X, Y, alpha=1e-4))
    assert result is not None
    _check_network_result(net, theta, X, Y, None, 1e-4, result)
    _check_forward_result(net, theta, X, net.forward(theta, X))
    # The overflow allowance: not for ordinary values, yes for values that overflow.
    assert not _overflow_possible(net, theta, X, Y, None, 1e-4)
    relu = Network([3, 4, 1], activation="relu", output="identity")
    assert _overflow_possible(relu, relu.init_params(0), X * 1e200, Y[:, :1])
    poisson = Network([3, 4, 1], output="exp")
    assert not _overflow_possible(poisson, poisson.init_params(0), X, Y[:, :1])
    assert _overflow_possible(poisson, poisson.init_params(0), X * 1e4, Y[:, :1])
    # The exact sums hold a squared error of 5e25 exactly; one of 5e39 is beyond their
    # 2**116 range, where NaN is the documented answer (see _overflow_possible).
    line = Network([1, 1], output="identity")
    loss, grad = line.loss_grad(np.array([1e13, 0.0]), np.ones((1, 1)), np.zeros((1, 1)))
    assert loss == 5e25 and grad.tolist() == [1e13, 1e13]
    assert _overflow_possible(line, np.array([1e20, 0.0]), np.ones((1, 1)),
                              np.zeros((1, 1)))
    assert np.isnan(line.loss_grad(np.array([1e20, 0.0]), np.ones((1, 1)),
                                   np.zeros((1, 1)))[0])
    # A non-finite result where none is allowed fails the check.
    with pytest.raises(AssertionError):
        _check_network_result(net, theta, X, Y, None, 1e-4, (NAN, result[1]))
    with pytest.raises(AssertionError):
        _check_forward_result(net, theta, X, np.full((6, 2), 0.7))  # rows sum to 1.4


# ---------------------------------------------------------------------------------------
# 3. load


def _saved_model():
    """The bytes of a small fitted classifier's model file, and data it predicts on."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    y = np.array(["a", "b", "c", "a"] * 5)
    with _quiet():
        clf = MLPClassifier((4,), solver="lbfgs", max_iter=10, random_state=0).fit(X, y)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.fbp")
        fastbp.save(clf, path)
        with open(path, "rb") as fh:
            return fh.read(), X


MODEL_BYTES, MODEL_X = _saved_model()


def _members(blob):
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _zip(arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


MODEL_ARRAYS = _members(MODEL_BYTES)
MODEL_META = json.loads(MODEL_ARRAYS["__fastbp__"].tobytes().decode("utf-8"))


def _paths(value, prefix=()):
    """Every path (tuple of keys and indices) to a value inside a JSON document."""
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 10) | st.integers() | st.floats() |
    st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=6)

DELETE = "<delete>"

# Byte offsets of 2-byte fields in a zip member's local header (signature PK\3\4) and
# in its central-directory entry (PK\1\2).
ZIP_FIELDS = {
    "local version needed": (b"PK\x03\x04", 4), "local flags": (b"PK\x03\x04", 6),
    "local method": (b"PK\x03\x04", 8), "central version made by": (b"PK\x01\x02", 4),
    "central version needed": (b"PK\x01\x02", 6), "central flags": (b"PK\x01\x02", 8),
    "central method": (b"PK\x01\x02", 10),
}

# A corruption of the model file is drawn as a small readable description, so that a
# failing example says what was done to the file; ``_corrupt`` applies it.
byte_corruptions = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, len(MODEL_BYTES) - 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, len(MODEL_BYTES) - 1),
                                                  st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.integers(0, len(MODEL_BYTES)),
              st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("random"), st.binary(min_size=1, max_size=2000)),
    st.just(("empty",)),
    # One 2-byte field of a zip header set to any value: the checksums do not cover
    # the headers. (entry index, field, value)
    st.tuples(st.just("zip-header"), st.integers(0, len(MODEL_ARRAYS) - 1),
              st.sampled_from(sorted(ZIP_FIELDS)), st.integers(0, 0xFFFF)),
)
# One JSON value in the metadata replaced or deleted (the archive stays valid).
metadata_edits = st.tuples(st.just("metadata"), st.sampled_from(list(_paths(MODEL_META))),
                           st.just(DELETE) | json_values)
# One array replaced (the archive stays valid).
array_edits = st.tuples(
    st.just("array"), st.sampled_from(sorted(MODEL_ARRAYS)),
    st.sampled_from(["drop", "empty", "strings", "2-D"]) |
    st.tuples(st.just("astype"), st.sampled_from(["float32", "float64", "int64", "uint8",
                                                  "bool", "complex128"])) |
    st.tuples(st.just("set"), st.integers(0, 40),
              st.sampled_from([NAN, INF, 1e300, 1e30, -7.0, 0.0])))
file_corruptions = st.one_of(byte_corruptions, metadata_edits, array_edits)


def _astype(array, dtype):
    """``array`` converted to ``dtype``, or zeros of its shape when it does not convert
    (the labels are strings)."""
    try:
        return array.astype(dtype)
    except ValueError:
        return np.zeros(array.shape, dtype)


def _corrupt(corruption):
    """The model file's bytes with ``corruption`` applied."""
    kind, *args = corruption
    blob = bytearray(MODEL_BYTES)
    if kind == "truncate":
        del blob[args[0]:]
    elif kind == "flip":
        for at, mask in args[0]:
            blob[at] ^= mask
    elif kind == "insert":
        blob[args[0]:args[0]] = args[1]
    elif kind == "random":
        blob = bytearray(args[0])
    elif kind == "empty":
        blob = bytearray()
    elif kind == "zip-header":
        entry, field, value = args
        signature, offset = ZIP_FIELDS[field]
        at = -1
        for _ in range(entry + 1):
            at = blob.find(signature, at + 1)
        blob[at + offset:at + offset + 2] = value.to_bytes(2, "little")
    elif kind == "metadata":
        path, value = args
        meta = json.loads(json.dumps(MODEL_META))
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        if value == DELETE and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        arrays = dict(MODEL_ARRAYS)
        # NaN and Infinity are written as such: Python's json reads them back.
        arrays["__fastbp__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
        blob = _zip(arrays)
    elif kind == "array":
        name, how = args
        arrays = dict(MODEL_ARRAYS)
        old = arrays[name]
        if how == "drop":
            del arrays[name]
        elif how == "empty":
            arrays[name] = old[:0]
        elif how == "strings":
            arrays[name] = np.array(["x", "yy"])
        elif how == "2-D":
            arrays[name] = old.reshape(1, -1)
        elif how[0] == "astype":
            arrays[name] = _astype(old, how[1])
        else:
            new = _astype(old, np.float64)
            if new.size:
                new.flat[how[1] % new.size] = how[2]
            arrays[name] = new
        blob = _zip(arrays)
    return bytes(blob)


def _load_bytes(blob):
    """fastbp.load on a file holding ``blob``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.fbp")
        with open(path, "wb") as fh:
            fh.write(blob)
        return fastbp.load(path)


def _check_loaded(model):
    """A loaded model must be usable: finite parameters, predictions for the data it was
    trained on, finite probabilities (where the bound does not allow overflow)."""
    est = model.steps[-1][1] if hasattr(model, "steps") else model
    assert np.isfinite(est._theta).all()
    pred = model.predict(MODEL_X)
    assert len(pred) == len(MODEL_X)
    if hasattr(model, "predict_proba"):
        proba = model.predict_proba(MODEL_X)
        assert proba.shape[0] == len(MODEL_X)
        X = model[:-1].transform(MODEL_X) if hasattr(model, "steps") else MODEL_X
        if not _overflow_possible(est._net, est._theta, X):
            assert np.isfinite(proba).all() and ((proba >= 0) & (proba <= 1)).all()
    else:
        assert np.isfinite(pred).all()


@_fuzz_settings(max_examples=800)
@given(corruption=file_corruptions)
# Minimal failing cases found by this fuzz (see its report); kept as explicit examples.
@example(corruption=("zip-header", 0, "central flags", 1))
@example(corruption=("zip-header", 0, "central method", 99))
@example(corruption=("metadata", ("layer_sizes",), []))
@example(corruption=("metadata", ("attributes", "n_outputs_"), DELETE))
@example(corruption=("metadata", ("attributes", "n_outputs_"), 1))
@example(corruption=("metadata", ("label_binarizer", "sparse_input_"), True))
def test_fuzz_load(corruption):
    blob = _corrupt(corruption)
    with _quiet():
        model = _clean_or_valid(lambda: _load_bytes(blob))
        event(f"load {'refused' if model is None else 'returned a model'}")
        if model is not None:
            _check_loaded(model)


def test_load_harness_sanity():
    """A truncated file is refused, the intact file loads, and the check can fail."""
    assert _clean_or_valid(lambda: _load_bytes(MODEL_BYTES[:100])) is None
    assert _clean_or_valid(lambda: _load_bytes(b"")) is None
    model = _clean_or_valid(lambda: _load_bytes(MODEL_BYTES))
    assert model is not None
    _check_loaded(model)
    model._theta[:] = NAN
    with pytest.raises(AssertionError):
        _check_loaded(model)
