"""Dropout: the exact gradient of the dropped network, reproducible masks that depend on
the seed only, the inverted-dropout expectation, and clear errors."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fastbp import MLPAutoencoder, MLPClassifier, MLPRegressor, Network, _core
from fastbp._stochastic import StochasticOptimizer, dropout_seed, row_keys

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16, y


from scipy.special import erf, expit

# Each activation as (f(z), f'(z)) in NumPy, float64.
_ACT = {
    "identity": (lambda z: z, lambda z: np.ones_like(z)),
    "logistic": (expit, lambda z: expit(z) * (1 - expit(z))),
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
    "leaky_relu": (lambda z: np.where(z > 0, z, 0.01 * z),
                   lambda z: np.where(z > 0, 1.0, 0.01)),
    "elu": (lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
            lambda z: np.where(z > 0, 1.0, np.exp(np.minimum(z, 0)))),
    "gelu": (lambda z: z * (1 + erf(z / np.sqrt(2))) / 2,
             lambda z: (1 + erf(z / np.sqrt(2))) / 2
             + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)),
    "silu": (lambda z: z * expit(z), lambda z: expit(z) * (1 + z * (1 - expit(z)))),
    "softplus": (lambda z: np.logaddexp(0, z), expit),
}


def _problem(acts, dtype=np.float64):
    rng = np.random.default_rng(0)
    net = Network([5, 7, 6, 3], activation=list(acts), output="softmax", dtype=dtype)
    theta = net.init_params(random_state=0)
    X = rng.normal(size=(40, 5)).astype(dtype)
    Y = np.eye(3, dtype=dtype)[rng.integers(0, 3, 40)]
    return net, theta, X, Y


def _one_sgd_step(rates, n_chunks=1, sparse=False, threads=None, monkeypatch=None,
                  acts=("tanh", "tanh"), dtype=np.float64):
    """One full-batch SGD step (lr 0.5, no momentum) through run_epoch, with dropout."""
    net, theta, X, Y = _problem(acts, dtype)
    data = net.prepare(X, Y)
    opt = StochasticOptimizer("sgd", net.n_params, dtype, 0.5, momentum=0.0)
    if threads is not None:
        monkeypatch.setattr("fastbp._stochastic.team_for_now", lambda c: (threads, True))
    order = np.arange(40, dtype=np.intp)
    opt.epoch(net, theta, data, order, False, 12345, 40, 1e-3, n_chunks,
              None if rates is None else np.asarray(rates, dtype=np.float64),
              row_keys(data, 5))
    return net, theta, X, Y


def _reference_step(rates, acts=("tanh", "tanh"), dtype=np.float64):
    """The same step in NumPy, in float64 from the problem in ``dtype``, with the masks
    run_epoch draws (_core.dropout_keep; the row keys hash the rows' bytes)."""
    net, theta, X, Y = _problem(acts, dtype)
    rows = row_keys(net.prepare(X, Y), 5)
    theta, X, Y = (a.astype(np.float64) for a in (theta, X, Y))
    (W1, W2, W3), (b1, b2, b3) = Network(net.layer_sizes).unpack(theta)
    seed = dropout_seed(12345)
    M = [_core.dropout_keep(seed, rows, l + 1, (7, 6)[l], rates[l]) / (1 - rates[l])
         for l in range(2)]
    (f1, d1), (f2, d2) = _ACT[acts[0]], _ACT[acts[1]]
    Z1 = X @ W1 + b1
    A1d = f1(Z1) * M[0]
    Z2 = A1d @ W2 + b2
    A2d = f2(Z2) * M[1]
    Z3 = A2d @ W3 + b3
    P = np.exp(Z3 - Z3.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    D3 = (P - Y) / 40
    D2 = (D3 @ W3.T) * M[1] * d2(Z2)
    D1 = (D2 @ W2.T) * M[0] * d1(Z1)
    grads = [X.T @ D1 + 1e-3 / 40 * W1, A1d.T @ D2 + 1e-3 / 40 * W2,
             A2d.T @ D3 + 1e-3 / 40 * W3, D1.sum(0), D2.sum(0), D3.sum(0)]
    g = np.concatenate([a.ravel() for a in grads])
    return theta - 0.5 * g


def test_step_is_the_exact_gradient_of_the_dropped_network():
    rates = [0.3, 0.5]
    _, theta, _, _ = _one_sgd_step(rates)
    # Float64 products over <= 40 terms and one step: ~1e-15; 1e-12 leaves margin.
    np.testing.assert_allclose(theta, _reference_step(rates), rtol=0, atol=1e-12)
    _, plain, _, _ = _one_sgd_step(None)
    assert np.abs(plain - theta).max() > 1e-4  # the masks changed the step


@pytest.mark.parametrize("acts", [("relu", "gelu"), ("softplus", "elu"),
                                  ("silu", "leaky_relu"), ("logistic", "identity"),
                                  ("gelu", "tanh")])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_activation_drops_with_its_exact_derivative(acts, dtype):
    """The backward pass multiplies by the derivative and mask the forward pass stored:
    right for activations that keep K and for those whose f' comes from f(z)."""
    rates = [0.3, 0.5]
    theta = _one_sgd_step(rates, acts=acts, dtype=dtype)[1]
    ref = _reference_step(rates, acts, dtype)
    # Float64: as above. Float32: each step entry is theta (|theta| < 1) minus 0.5 times
    # a gradient entry summed over 40 rows of products of O(1) factors through three
    # layers; float32 rounding (6e-8 relative) of those terms stays below ~1e-5.
    atol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(theta, ref, rtol=0, atol=atol)
    # Dropout changed the step by far more than that.
    assert np.abs(ref - _reference_step([0.0, 0.0], acts, dtype)).max() > 100 * atol


def test_workspace_keeps_a_masked_derivative_only_where_no_k_serves():
    sizes = np.array([5, 7, 6, 3], dtype=np.intp)
    codes = lambda names: np.array([_core.ACTIVATIONS[a] for a in names], dtype=np.intc)
    drop = np.array([0.3, 0.5])
    base = _core.workspace_size(sizes, codes(["tanh", "relu"]), 16, False)
    assert _core.workspace_size(sizes, codes(["tanh", "relu"]), 16, False,
                                drop) - base == 16 * (7 + 6)
    # A gelu layer's K holds its masked derivative: no M for it.
    gelu = _core.workspace_size(sizes, codes(["gelu", "relu"]), 16, False)
    assert _core.workspace_size(sizes, codes(["gelu", "relu"]), 16, False,
                                drop) - gelu == 16 * 6
    assert _core.workspace_size(sizes, codes(["gelu", "relu"]), 16, False,
                                np.array([0.3, 0.0])) == gelu


def test_masks_depend_on_the_seed_not_on_chunks_or_threads(monkeypatch):
    rates = [0.3, 0.5]
    one = _one_sgd_step(rates, n_chunks=2, threads=1, monkeypatch=monkeypatch)[1]
    two = _one_sgd_step(rates, n_chunks=2, threads=2, monkeypatch=monkeypatch)[1]
    np.testing.assert_array_equal(one, two)
    # Another chunking sums the gradient in another order, with the same masks.
    np.testing.assert_allclose(one, _reference_step(rates), rtol=0, atol=1e-12)


def test_identical_rows_draw_identical_masks_so_weights_are_repeated_rows(digits):
    X, y = digits
    net = Network([64, 8, 10])
    keys = row_keys(net.prepare(np.vstack([X[:5], X[:5]]), np.eye(10)[np.tile(y[:5], 2)]),
                    64)
    assert (keys[:5] == keys[5:]).all() and len(set(keys[:5].tolist())) == 5
    import scipy.sparse as sp
    skeys = row_keys(net.prepare(sp.csr_matrix(X[:50]), np.eye(10)[y[:50]]), 64)
    assert len(set(skeys.tolist())) == len(set(map(bytes, X[:50])))
    # A weight of 2 and a repeated row give the same fit, with dropout (one minibatch).
    kw = dict(hidden_layer_sizes=(16,), dropout=0.3, batch_size=1000, max_iter=3,
              shuffle=False, random_state=0)
    w = np.ones(60)
    w[:10] = 2
    a = MLPClassifier(**kw).fit(X[:60], y[:60], sample_weight=w)
    b = MLPClassifier(**kw).fit(np.vstack([X[:60], X[:10]]), np.concatenate([y[:60], y[:10]]))
    np.testing.assert_allclose(a._theta, b._theta, rtol=0, atol=1e-12)


def test_inverted_dropout_keeps_the_expectation():
    rows = np.arange(20000, dtype=np.uint64)
    for rate in (0.1, 0.5, 0.9):
        keep = _core.dropout_keep(7, rows, 1, 50, rate)
        n = keep.size
        kept = keep.mean()
        # Binomial: 5 standard deviations.
        assert abs(kept - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
        scaled = keep / (1 - rate)  # E[mask / (1 - rate)] = 1
        assert abs(scaled.mean() - 1) < 5 * np.sqrt(rate / (1 - rate) / n)
    # Layers, units and seeds draw independently.
    a = _core.dropout_keep(7, rows[:2000], 1, 50, 0.5)
    assert abs((a == _core.dropout_keep(7, rows[:2000], 2, 50, 0.5)).mean() - 0.5) < 0.02
    assert abs((a == _core.dropout_keep(8, rows[:2000], 1, 50, 0.5)).mean() - 0.5) < 0.02
    assert abs((a[:, :-1] == a[:, 1:]).mean() - 0.5) < 0.02


def test_fits_are_reproducible_and_zero_dropout_is_no_dropout(digits):
    X, y = digits
    kw = dict(hidden_layer_sizes=(32, 16), max_iter=4, random_state=0)
    a = MLPClassifier(dropout=0.2, **kw).fit(X, y)
    b = MLPClassifier(dropout=0.2, **kw).fit(X, y)
    np.testing.assert_array_equal(a._theta, b._theta)
    c = MLPClassifier(dropout=0.2, **dict(kw, random_state=1)).fit(X, y)
    assert not np.array_equal(a._theta, c._theta)
    plain = MLPClassifier(**kw).fit(X, y)
    for zero in (0.0, 0, [0.0, 0.0], (0, 0.0)):
        np.testing.assert_array_equal(MLPClassifier(dropout=zero, **kw).fit(X, y)._theta,
                                      plain._theta)
    per_layer = MLPClassifier(dropout=[0.2, 0.0], **kw).fit(X, y)
    assert not np.array_equal(per_layer._theta, a._theta)


def test_prediction_never_drops(digits):
    X, y = digits
    clf = MLPClassifier((32,), dropout=0.5, max_iter=5, random_state=0).fit(X, y)
    p1, p2 = clf.predict_proba(X), clf.predict_proba(X)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(p1, clf._net.forward(clf._theta, X))


@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor, MLPAutoencoder])
def test_every_estimator_trains_with_dropout(digits, Est):
    X, y = digits
    target = () if Est is MLPAutoencoder else (y,)
    est = Est(hidden_layer_sizes=(32, 8, 32), dropout=0.1, solver="adam", max_iter=15,
              learning_rate_init=0.01, random_state=0).fit(X, *target)
    assert est.loss_curve_[-1] < est.loss_curve_[0]
    assert np.isfinite(est._theta).all()


def test_team_path_with_dropout_and_float32(digits):
    X, y = digits
    X = np.tile(X, (3, 1)).astype(np.float32)
    y = np.tile(y, 3)
    est = MLPClassifier((256,), dropout=0.2, batch_size=512, max_iter=2, n_jobs=2,
                        random_state=0).fit(X, y)
    assert est.parallelism_["mode"] == "team"
    assert est._theta.dtype == np.float32 and np.isfinite(est._theta).all()


@pytest.mark.parametrize("dropout, message", [
    (1.0, "dropout"), (-0.1, "dropout"), ("half", "dropout"), (True, "dropout"),
    ([0.1], "lists 1 rate"), ([0.1, 1.0], r"\[0, 1\)"), ([0.1, "a"], r"\[0, 1\)"),
    ([0.1, float("nan")], r"\[0, 1\)"),
])
def test_bad_dropout(digits, dropout, message):
    X, y = digits
    with pytest.raises(ValueError, match=message):
        MLPClassifier((8, 4), dropout=dropout, max_iter=1).fit(X, y)


@pytest.mark.parametrize("solver", ["lbfgs", "tnc", "newton-cg", "trust-krylov",
                                    "hessian-free"])
def test_full_batch_solvers_refuse_dropout(digits, solver):
    X, y = digits
    with pytest.raises(ValueError, match="deterministic objective"):
        MLPClassifier((8,), solver=solver, dropout=0.1).fit(X, y)
    MLPClassifier((8,), solver=solver, dropout=0.0, max_iter=2).fit(X, y)  # allowed
