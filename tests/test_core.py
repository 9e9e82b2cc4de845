"""Tests of fastbp's low-level core.

Covers ``fastbp.Network`` (flat layout, initialisation, objective, gradient, forward pass,
input handling, workspaces, thread safety, validation) and the flat-vector optimiser steps
``fastbp._core.sgd_update`` / ``fastbp._core.adam_update``.

The kernels are checked three independent ways: against central finite differences,
against a short pure-NumPy reference implementation (``ref_loss_grad`` below) and against
two small examples worked out by hand.
"""
import concurrent.futures

import numpy as np
import pytest
import scipy.sparse as sp

from fastbp import Network
from fastbp import _core

ACTIVATIONS = ["identity", "logistic", "tanh", "relu"]
OUTPUTS = ["softmax", "logistic", "identity", "exp"]


# ---------------------------------------------------------------------------------------
# Pure-NumPy reference: forward and backward pass in float64, in the flat layout.

def ref_unpack(sizes, theta):
    """scikit-learn packing: every coef (fan_in, fan_out) row-major, then every intercept."""
    coefs, intercepts, pos = [], [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        coefs.append(theta[pos:pos + fan_in * fan_out].reshape(fan_in, fan_out))
        pos += fan_in * fan_out
    for fan_out in sizes[1:]:
        intercepts.append(theta[pos:pos + fan_out])
        pos += fan_out
    assert pos == theta.size
    return coefs, intercepts


# Hidden activation f(z), and its derivative written in terms of a = f(z).
HIDDEN = {
    "identity": (lambda z: z, lambda a: np.ones_like(a)),
    "logistic": (lambda z: 1.0 / (1.0 + np.exp(-z)), lambda a: a * (1.0 - a)),
    "tanh": (np.tanh, lambda a: 1.0 - a ** 2),
    "relu": (lambda z: np.maximum(z, 0.0), lambda a: (a > 0).astype(np.float64)),
}


def ref_output(z, output):
    if output == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if output == "logistic":
        return 1.0 / (1.0 + np.exp(-z))
    if output == "exp":
        return np.exp(z)
    return z


def ref_sample_loss(P, Y, output):
    """Per-sample loss from the output activations P (the textbook formulas)."""
    def ylogx(y, x):  # y * log(x) with 0 * log(0) = 0
        return np.where(y == 0, 0.0, y * np.log(np.where(y == 0, 1.0, x)))
    if output == "softmax":
        return -ylogx(Y, P).sum(axis=1)
    if output == "logistic":
        return -(ylogx(Y, P) + ylogx(1 - Y, 1 - P)).sum(axis=1)
    if output == "exp":
        return (P - ylogx(Y, P) + ylogx(Y, Y) - Y).sum(axis=1)
    return 0.5 * ((P - Y) ** 2).sum(axis=1)


def ref_loss_grad(sizes, activation, output, theta, X, Y, sample_weight=None, alpha=0.0):
    """(loss, flat gradient, output activations), all in float64."""
    theta, X, Y = (np.asarray(a, dtype=np.float64) for a in (theta, X, Y))
    Y = Y.reshape(len(X), -1)
    w = np.ones(len(X)) if sample_weight is None else np.asarray(sample_weight, float)
    coefs, intercepts = ref_unpack(sizes, theta)
    f, df = HIDDEN[activation]
    L = len(coefs)
    acts = [X]
    for l in range(L):
        z = acts[l] @ coefs[l] + intercepts[l]
        acts.append(f(z) if l < L - 1 else ref_output(z, output))
    P = acts[-1]
    wsum = w.sum()
    penalty = 0.5 * alpha * sum((W ** 2).sum() for W in coefs) / wsum
    loss = (w * ref_sample_loss(P, Y, output)).sum() / wsum + penalty
    # Canonical links: d loss_i / d z_out = P - Y for every output (for softmax this
    # needs rows of Y summing to one, which all targets used here do).
    delta = (P - Y) * w[:, None] / wsum
    gW, gb = [None] * L, [None] * L
    for l in reversed(range(L)):
        gW[l] = acts[l].T @ delta + alpha * coefs[l] / wsum
        gb[l] = delta.sum(axis=0)
        if l > 0:
            delta = (delta @ coefs[l].T) * df(acts[l])
    return loss, np.concatenate([g.ravel() for g in gW + gb]), P


# ---------------------------------------------------------------------------------------
# Helpers.

def make_targets(output, n, k, rng):
    if output == "softmax":
        return np.eye(k)[rng.integers(0, k, size=n)]
    if output == "logistic":
        return rng.integers(0, 2, size=(n, k)).astype(np.float64)
    if output == "exp":
        return rng.poisson(1.5, size=(n, k)).astype(np.float64)  # includes zeros
    return rng.normal(size=(n, k))


def make_problem(sizes, output, n, seed, weighted=True, theta_scale=0.6):
    """Random (theta, X, Y, sample_weight) valid for ``output``, all float64."""
    rng = np.random.default_rng(seed)
    n_params = sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) + sum(sizes[1:])
    theta = rng.normal(0.0, theta_scale, size=n_params)
    X = rng.normal(size=(n, sizes[0]))
    Y = make_targets(output, n, sizes[-1], rng)
    sw = None
    if weighted:
        sw = rng.uniform(0.2, 3.0, size=n)
        sw[1] = 0.0  # a zero weight must be allowed (and have no effect)
    return theta, X, Y, sw


def fd_gradient(fun, theta, rel_step=1e-6):
    """Central differences, step rel_step * max(1, |theta_i|)."""
    g = np.empty_like(theta)
    for i in range(theta.size):
        h = rel_step * max(1.0, abs(theta[i]))
        tp, tm = theta.copy(), theta.copy()
        tp[i] += h
        tm[i] -= h
        g[i] = (fun(tp) - fun(tm)) / (tp[i] - tm[i])
    return g


def rel_err(a, b):
    return np.linalg.norm(np.asarray(a, float) - b) / np.linalg.norm(b)


def assert_grad_close(g, g_ref, rtol):
    """Elementwise agreement to rtol, with an absolute floor of rtol * max|g_ref|."""
    g_ref = np.asarray(g_ref, dtype=np.float64)
    scale = np.abs(g_ref).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(g, np.float64), g_ref, rtol=rtol,
                               atol=rtol * scale)


def check_fd(net, theta, X, Y, sw, alpha):
    loss, grad = net.loss_grad(theta, X, Y, sample_weight=sw, alpha=alpha)
    assert np.isfinite(loss)
    fd = fd_gradient(lambda t: net.loss_grad(t, X, Y, sample_weight=sw, alpha=alpha)[0],
                     theta)
    assert np.linalg.norm(fd) > 1e-3  # a meaningful, non-degenerate gradient
    assert rel_err(grad, fd) < 1e-6


# ---------------------------------------------------------------------------------------
# 1. Finite differences.

@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_finite_differences(activation, output, weighted, alpha):
    sizes = [3, 5, 4, 3]
    # block_size 5 with 12 rows: three blocks, the last one short.
    net = Network(sizes, activation=activation, output=output, block_size=5)
    theta, X, Y, sw = make_problem(sizes, output, n=12, seed=7, weighted=weighted)
    check_fd(net, theta, X, Y, sw, alpha)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_hidden", [0, 1, 2, 3, 5])
def test_gradient_finite_differences_random_architectures(n_hidden, seed):
    rng = np.random.default_rng(100 + 10 * n_hidden + seed)
    activation = ACTIVATIONS[(n_hidden + seed) % 4]
    output = OUTPUTS[(n_hidden + 2 * seed) % 4]
    n_out = int(rng.integers(2, 5)) if output == "softmax" else int(rng.integers(1, 4))
    sizes = ([int(rng.integers(1, 6))] + [int(h) for h in rng.integers(1, 7, n_hidden)]
             + [n_out])
    net = Network(sizes, activation=activation, output=output,
                  block_size=int(rng.integers(1, 12)))
    assert net.n_layers == n_hidden + 1
    theta, X, Y, sw = make_problem(sizes, output, n=11, seed=seed, weighted=seed != 1)
    check_fd(net, theta, X, Y, sw, alpha=[0.0, 0.05, 1.0][seed])


@pytest.mark.parametrize("output", OUTPUTS)
def test_reference_itself_matches_finite_differences(output):
    # The reference is used as an oracle below, so check it independently too.
    sizes = [2, 3, 3]
    theta, X, Y, sw = make_problem(sizes, output, n=6, seed=3)
    for activation in ACTIVATIONS:
        _, g, _ = ref_loss_grad(sizes, activation, output, theta, X, Y, sw, alpha=0.2)
        fd = fd_gradient(
            lambda t: ref_loss_grad(sizes, activation, output, t, X, Y, sw, 0.2)[0], theta)
        assert rel_err(g, fd) < 1e-6


@pytest.mark.parametrize("output", ["logistic", "exp"])
def test_gradient_finite_differences_soft_targets(output):
    # Fractional targets: probabilities in [0, 1] for logistic, non-negative reals for exp.
    sizes = [3, 4, 2]
    theta, X, _, sw = make_problem(sizes, output, n=10, seed=12)
    rng = np.random.default_rng(12)
    Y = rng.uniform(0, 1, (10, 2)) if output == "logistic" else rng.gamma(2.0, size=(10, 2))
    Y[0, 0] = 0.0
    net = Network(sizes, activation="tanh", output=output, block_size=3)
    check_fd(net, theta, X, Y, sw, alpha=0.1)
    ref_loss, ref_grad, _ = ref_loss_grad(sizes, "tanh", output, theta, X, Y, sw, 0.1)
    loss, grad = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert_grad_close(grad, ref_grad, 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_losses_exact_for_extreme_logits(dtype):
    # Losses come from the pre-activations, so they stay exact (and finite) where the
    # probabilities round to 0 or 1.
    # softmax, z = (1000, 0, -1000), y = (0, 1, 0): loss = logsumexp(z) - z_1 = 1000;
    # gradient p - y = (1, -1, 0) for both the coefficients (x = 1) and the intercepts.
    net = Network([1, 3], output="softmax", dtype=dtype)
    loss, grad = net.loss_grad([1000.0, 0.0, -1000.0, 0.0, 0.0, 0.0], [[1.0]], [[0, 1, 0]])
    assert loss == pytest.approx(1000.0, rel=1e-12)
    np.testing.assert_array_equal(grad, [1, -1, 0, 1, -1, 0])
    # logistic, z = +800 and -800, both y = 0: losses softplus(800) = 800 and
    # softplus(-800) ~ 0, mean 400; deltas (1 - 0)/2 and (0 - 0)/2.
    net = Network([1, 1], output="logistic", dtype=dtype)
    loss, grad = net.loss_grad([800.0, 0.0], [[1.0], [-1.0]], [0, 0])
    assert loss == pytest.approx(400.0, rel=1e-12)
    np.testing.assert_array_equal(grad, [0.5, 0.5])


# ---------------------------------------------------------------------------------------
# 2. The NumPy reference: 1e-12 in float64, 1e-5 in float32, block streaming.

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(activation, output, dtype):
    sizes = [4, 6, 5, 3]
    theta, X, Y, sw = make_problem(sizes, output, n=50, seed=11)
    alpha = 0.25
    net = Network(sizes, activation=activation, output=output, dtype=dtype, block_size=7)
    if dtype == np.float32:
        # The float64 reference evaluated at the float32-rounded inputs.
        theta, X, Y = (a.astype(np.float32) for a in (theta, X, Y))
    ref_loss, ref_grad, ref_P = ref_loss_grad(sizes, activation, output, theta, X, Y, sw,
                                              alpha)
    loss, grad = net.loss_grad(theta, X, Y, sample_weight=sw, alpha=alpha)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert isinstance(loss, float)
    assert grad.dtype == dtype and grad.shape == (net.n_params,)
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert_grad_close(grad, ref_grad, tol)
    assert_grad_close(net.forward(theta, X), ref_P, tol)


ARCHITECTURES = [[3, 2], [3, 1], [1, 4, 1], [5, 3, 2, 4, 2], [2, 8, 1, 6, 3]]


@pytest.mark.parametrize("sizes,output", [
    (sizes, output) for sizes in ARCHITECTURES for output in OUTPUTS
    if not (output == "softmax" and sizes[-1] == 1)  # softmax needs two outputs
])
def test_matches_reference_architectures(sizes, output):
    theta, X, Y, sw = make_problem(sizes, output, n=50, seed=sum(sizes))
    for activation, block in zip(ACTIVATIONS, [7, 1, 49, 50]):
        net = Network(sizes, activation=activation, output=output, block_size=block)
        ref_loss, ref_grad, _ = ref_loss_grad(sizes, activation, output, theta, X, Y, sw,
                                              0.1)
        loss, grad = net.loss_grad(theta, X, Y, sample_weight=sw, alpha=0.1)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        assert_grad_close(grad, ref_grad, 1e-12)


def test_single_output_accepts_1d_targets():
    sizes = [3, 4, 1]
    theta, X, Y, sw = make_problem(sizes, "identity", n=20, seed=5)
    net = Network(sizes, "tanh", "identity", block_size=6)
    loss2, grad2 = net.loss_grad(theta, X, Y, sw)
    loss1, grad1 = net.loss_grad(theta, X, Y.ravel(), sw)
    assert loss1 == loss2
    np.testing.assert_array_equal(grad1, grad2)


def test_result_independent_of_block_size():
    sizes = [4, 7, 3]
    theta, X, Y, sw = make_problem(sizes, "softmax", n=50, seed=2)
    results = [Network(sizes, "tanh", "softmax", block_size=b).loss_grad(
        theta, X, Y, sw, alpha=0.01) for b in (1, 3, 7, 50, 4096)]
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-12)
        assert_grad_close(grad, results[0][1], 1e-12)


# ---------------------------------------------------------------------------------------
# Semantics of the weights and of the penalty.

def test_unit_weights_equal_no_weights():
    sizes = [3, 4, 2]
    theta, X, Y, _ = make_problem(sizes, "logistic", n=30, seed=4, weighted=False)
    net = Network(sizes, "relu", "logistic", block_size=8)
    a = net.loss_grad(theta, X, Y, alpha=0.5)
    b = net.loss_grad(theta, X, Y, sample_weight=np.ones(30), alpha=0.5)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_weights_are_normalised_and_act_like_repeated_rows():
    sizes = [3, 4, 2]
    theta, X, Y, _ = make_problem(sizes, "exp", n=12, seed=6, weighted=False)
    net = Network(sizes, "tanh", "exp", block_size=5)
    counts = np.array([1, 2, 0, 3, 1, 1, 4, 0, 2, 1, 1, 2])
    loss, grad = net.loss_grad(theta, X, Y, sample_weight=counts, alpha=0.3)
    # Scaling all weights by c leaves the data term unchanged; the penalty is divided by
    # the weight sum, so the objective is unchanged when alpha is scaled by c too.
    loss_s, grad_s = net.loss_grad(theta, X, Y, sample_weight=2.5 * counts,
                                   alpha=0.3 * 2.5)
    assert loss_s == pytest.approx(loss, rel=1e-12)
    assert_grad_close(grad_s, grad, 1e-12)
    # Integer weights are the same as repeating rows (zero weight = row dropped).
    rep = np.repeat(np.arange(12), counts)
    loss_r, grad_r = net.loss_grad(theta, X[rep], Y[rep], alpha=0.3)
    assert loss_r == pytest.approx(loss, rel=1e-12)
    assert_grad_close(grad_r, grad, 1e-12)


def test_penalty_only_on_coefficients():
    sizes = [3, 4, 2, 2]
    theta, X, Y, sw = make_problem(sizes, "softmax", n=25, seed=8)
    net = Network(sizes, "logistic", "softmax", block_size=4)
    wsum = sw.sum()
    alpha = 0.7
    loss0, grad0 = net.loss_grad(theta, X, Y, sw, alpha=0.0)
    loss1, grad1 = net.loss_grad(theta, X, Y, sw, alpha=alpha)
    coefs, _ = ref_unpack(sizes, theta)
    n_coef = sum(c.size for c in coefs)
    w_flat = theta[:n_coef]
    assert loss1 - loss0 == pytest.approx(0.5 * alpha * (w_flat @ w_flat) / wsum, rel=1e-10)
    np.testing.assert_allclose(grad1[:n_coef] - grad0[:n_coef], alpha * w_flat / wsum,
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(grad1[n_coef:], grad0[n_coef:])


# ---------------------------------------------------------------------------------------
# 3. Worked by hand.

def test_hand_worked_relu_identity():
    # layer_sizes [2, 1, 1], relu hidden unit, identity output.
    #   W1 = [[1], [-2]], W2 = [[3]], b1 = [0.5], b2 = [-1]
    #   flat: [W1[0,0], W1[1,0], W2[0,0], b1[0], b2[0]] = [1, -2, 3, 0.5, -1]
    # Two samples, weights w = [1, 3] (sum 4), alpha = 0.5.
    #   x1 = (2, 0.5), y1 = 4:  z = 2*1 + 0.5*(-2) + 0.5 = 1.5,  h = relu(1.5) = 1.5
    #                           yhat = 3*1.5 - 1 = 3.5,  r = yhat - y = -0.5
    #                           loss1 = 0.5 * 0.25 = 0.125
    #   x2 = (1, 1),   y2 = 0:  z = 1 - 2 + 0.5 = -0.5,  h = relu(-0.5) = 0
    #                           yhat = 3*0 - 1 = -1,  r = -1,  loss2 = 0.5
    # data term  = (1*0.125 + 3*0.5) / 4 = 1.625 / 4 = 0.40625
    # penalty    = 0.5 * alpha * (1 + 4 + 9) / 4 = 0.5 * 0.5 * 14 / 4 = 0.875
    # loss       = 0.40625 + 0.875 = 1.28125
    # Output deltas r_i * w_i / 4:  d1 = -0.5*1/4 = -0.125,  d2 = -1*3/4 = -0.75
    #   dW2 = h1*d1 + h2*d2 + alpha*W2/4 = 1.5*(-0.125) + 0 + 0.5*3/4
    #       = -0.1875 + 0.375 = 0.1875
    #   db2 = d1 + d2 = -0.875
    # Hidden deltas d_i * W2 * relu'(z_i):  e1 = -0.125*3*1 = -0.375,  e2 = -0.75*3*0 = 0
    #   dW1 = x1*e1 + x2*e2 + alpha*W1/4 = (2*(-0.375), 0.5*(-0.375)) + (0.125, -0.25)
    #       = (-0.75 + 0.125, -0.1875 - 0.25) = (-0.625, -0.4375)
    #   db1 = e1 + e2 = -0.375
    # flat gradient = [-0.625, -0.4375, 0.1875, -0.375, -0.875]
    # (every number is a short binary fraction, so the float64 result is exact)
    net = Network([2, 1, 1], activation="relu", output="identity")
    theta = np.array([1.0, -2.0, 3.0, 0.5, -1.0])
    X = np.array([[2.0, 0.5], [1.0, 1.0]])
    Y = np.array([[4.0], [0.0]])
    loss, grad = net.loss_grad(theta, X, Y, sample_weight=[1.0, 3.0], alpha=0.5)
    assert loss == 1.28125
    np.testing.assert_array_equal(grad, [-0.625, -0.4375, 0.1875, -0.375, -0.875])
    np.testing.assert_array_equal(net.forward(theta, X), [[3.5], [-1.0]])


def test_hand_worked_logistic_no_hidden_layer():
    # layer_sizes [2, 1], logistic output; flat theta = [w1, w2, b] = [1, -1, 0].
    #   x1 = (1, 1), y1 = 1:  z = 0, p = 0.5, loss1 = -log(0.5) = log 2
    #   x2 = (3, 3), y2 = 0:  z = 0, p = 0.5, loss2 = -log(1 - 0.5) = log 2
    # loss = (log 2 + log 2) / 2 = log 2 = 0.6931471805599453
    # deltas (p - y) / 2:  d1 = -0.25,  d2 = 0.25
    #   dW = x1*d1 + x2*d2 = (-0.25 + 0.75, -0.25 + 0.75) = (0.5, 0.5);  db = 0
    net = Network([2, 1], activation="relu", output="logistic")
    theta = np.array([1.0, -1.0, 0.0])
    loss, grad = net.loss_grad(theta, [[1.0, 1.0], [3.0, 3.0]], [1, 0])
    assert loss == pytest.approx(0.6931471805599453, rel=1e-15)
    np.testing.assert_allclose(grad, [0.5, 0.5, 0.0], rtol=0, atol=1e-16)


# ---------------------------------------------------------------------------------------
# 4. Input variants.

VARIANT_CASES = [("relu", "softmax"), ("tanh", "logistic"), ("logistic", "identity"),
                 ("identity", "exp")]


@pytest.fixture(params=VARIANT_CASES, ids=["-".join(c) for c in VARIANT_CASES])
def problem(request):
    activation, output = request.param
    sizes = [6, 5, 3]
    theta, X, Y, sw = make_problem(sizes, output, n=50, seed=21)
    net = Network(sizes, activation=activation, output=output, block_size=7)
    return net, theta, X, Y, sw


def test_float32_agrees_with_float64(problem):
    net, theta, X, Y, sw = problem
    net32 = Network(net.layer_sizes, net.activation, net.output, dtype=np.float32,
                    block_size=7)
    loss64, grad64 = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    loss32, grad32 = net32.loss_grad(theta, X, Y, sw, alpha=0.1)  # converted to float32
    assert grad32.dtype == np.float32
    assert loss32 == pytest.approx(loss64, rel=1e-4)
    assert_grad_close(grad32, grad64, 1e-4)
    out32 = net32.forward(theta, X)
    assert out32.dtype == np.float32
    assert_grad_close(out32, net.forward(theta, X), 1e-4)


def test_read_only_inputs(problem):
    net, theta, X, Y, sw = problem
    loss, grad = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    out = net.forward(theta, X)
    ro = [a.copy() for a in (theta, X, Y, sw)]
    for a in ro:
        a.setflags(write=False)
    loss_ro, grad_ro = net.loss_grad(*ro, alpha=0.1)
    assert loss_ro == loss
    np.testing.assert_array_equal(grad_ro, grad)
    np.testing.assert_array_equal(net.forward(ro[0], ro[1]), out)
    # Read-only float32 too (the arrays then go to the kernel without conversion).
    net32 = Network(net.layer_sizes, net.activation, net.output, dtype=np.float32)
    ro32 = [a.astype(np.float32) for a in (theta, X, Y)]
    ref32 = net32.loss_grad(*ro32, sw)
    for a in ro32:
        a.setflags(write=False)
    res32 = net32.loss_grad(*ro32, ro[3])
    assert res32[0] == ref32[0]
    np.testing.assert_array_equal(res32[1], ref32[1])


def test_fortran_ordered_X(problem):
    net, theta, X, Y, sw = problem
    loss, grad = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    XF = np.asfortranarray(X)
    assert XF.flags.f_contiguous and not XF.flags.c_contiguous
    loss_f, grad_f = net.loss_grad(theta, XF, Y, sw, alpha=0.1)
    assert loss_f == pytest.approx(loss, rel=1e-12)
    assert_grad_close(grad_f, grad, 1e-12)
    assert_grad_close(net.forward(theta, XF), net.forward(theta, X), 1e-12)


def test_fortran_ordered_X_float32(problem):
    net, theta, X, Y, sw = problem
    net32 = Network(net.layer_sizes, net.activation, net.output, dtype=np.float32,
                    block_size=7)
    X32 = X.astype(np.float32)
    loss, grad = net32.loss_grad(theta, X32, Y, sw, alpha=0.1)
    loss_f, grad_f = net32.loss_grad(theta, np.asfortranarray(X32), Y, sw, alpha=0.1)
    assert loss_f == pytest.approx(loss, rel=1e-6)
    assert_grad_close(grad_f, grad, 1e-6)
    assert_grad_close(net32.forward(theta, np.asfortranarray(X32)),
                      net32.forward(theta, X32), 1e-6)


def test_fortran_column_slice_X(problem):
    # F-ordered with a leading dimension larger than the row count.
    net, theta, X, Y, sw = problem
    big = np.asfortranarray(np.hstack([X, np.full((len(X), 3), np.nan)]))
    XF = big[:, :X.shape[1]]
    assert XF.flags.f_contiguous and XF.strides[1] == 8 * len(X)
    loss, grad = net.loss_grad(theta, X, Y, sw)
    loss_f, grad_f = net.loss_grad(theta, XF, Y, sw)
    assert loss_f == pytest.approx(loss, rel=1e-12)
    assert_grad_close(grad_f, grad, 1e-12)


def test_non_contiguous_X(problem):
    net, theta, X, Y, sw = problem
    loss, grad = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    # Every other column of a wider array.
    wide = np.empty((X.shape[0], 2 * X.shape[1]))
    wide[:, ::2] = X
    wide[:, 1::2] = np.nan
    Xs = wide[:, ::2]
    assert not (Xs.flags.c_contiguous or Xs.flags.f_contiguous)
    loss_s, grad_s = net.loss_grad(theta, Xs, Y, sw, alpha=0.1)
    assert loss_s == loss
    np.testing.assert_array_equal(grad_s, grad)
    np.testing.assert_array_equal(net.forward(theta, Xs), net.forward(theta, X))
    # A strided theta.
    theta_s = np.repeat(theta, 2)[::2]
    assert not theta_s.flags.c_contiguous
    loss_t, grad_t = net.loss_grad(theta_s, X, Y, sw, alpha=0.1)
    assert loss_t == loss
    np.testing.assert_array_equal(grad_t, grad)
    # Every other row, against its contiguous copy; also a non-contiguous Y.
    tall = np.repeat(X, 2, axis=0)
    tall[1::2] = np.nan
    Ytall = np.repeat(Y, 2, axis=0)
    sub = slice(None, None, 2)
    loss_r, grad_r = net.loss_grad(theta, tall[sub], Ytall[sub], sw)
    loss_c, grad_c = net.loss_grad(theta, X.copy(), Y.copy(), sw)
    assert loss_r == loss_c
    np.testing.assert_array_equal(grad_r, grad_c)


def test_other_numeric_and_list_inputs(problem):
    net, theta, X, Y, sw = problem
    Xi = np.round(X * 4).astype(np.int64)
    loss, grad = net.loss_grad(theta, Xi.astype(np.float64), Y, sw)
    loss_i, grad_i = net.loss_grad(theta, Xi, Y, sw)
    assert loss_i == loss
    np.testing.assert_array_equal(grad_i, grad)
    loss_l, grad_l = net.loss_grad(list(theta), Xi.tolist(), Y.tolist(), list(sw))
    assert loss_l == loss
    np.testing.assert_array_equal(grad_l, grad)


def sparse_version_of(X, rng):
    Xs = X.copy()
    Xs[rng.random(X.shape) < 0.6] = 0.0
    Xs[3] = 0.0  # an empty row
    return Xs


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_sparse_X_matches_dense(problem, fmt):
    net, theta, X, Y, sw = problem
    Xd = sparse_version_of(X, np.random.default_rng(0))
    Xsp = sp.csr_matrix(Xd).asformat(fmt)
    loss, grad = net.loss_grad(theta, Xd, Y, sw, alpha=0.2)
    loss_s, grad_s = net.loss_grad(theta, Xsp, Y, sw, alpha=0.2)
    assert loss_s == pytest.approx(loss, rel=1e-12)
    assert_grad_close(grad_s, grad, 1e-12)
    assert_grad_close(net.forward(theta, Xsp), net.forward(theta, Xd), 1e-12)
    # Read-only sparse arrays, with int32 and int64 index arrays.
    for idx_dtype in (np.int32, np.int64):
        A = sp.csr_matrix(Xd)
        A.indices, A.indptr = A.indices.astype(idx_dtype), A.indptr.astype(idx_dtype)
        for a in (A.data, A.indices, A.indptr):
            a.setflags(write=False)
        loss_ro, grad_ro = net.loss_grad(theta, A, Y, sw, alpha=0.2)
        assert loss_ro == pytest.approx(loss, rel=1e-12)
        assert_grad_close(grad_ro, grad, 1e-12)
    # Sparse arrays (not matrices) as well.
    loss_a, grad_a = net.loss_grad(theta, sp.csr_array(Xd), Y, sw, alpha=0.2)
    assert loss_a == loss_s
    np.testing.assert_array_equal(grad_a, grad_s)


def test_sparse_float32_and_edge_structures():
    sizes = [6, 4, 2]
    theta, X, Y, sw = make_problem(sizes, "logistic", n=20, seed=31)
    rng = np.random.default_rng(1)
    Xd = sparse_version_of(X, rng)
    net32 = Network(sizes, "tanh", "logistic", dtype=np.float32, block_size=6)
    l_d, g_d = net32.loss_grad(theta, Xd, Y, sw)
    l_s, g_s = net32.loss_grad(theta, sp.csr_matrix(Xd), Y, sw)
    assert l_s == pytest.approx(l_d, rel=1e-5)
    assert_grad_close(g_s, g_d, 1e-5)
    assert_grad_close(net32.forward(theta, sp.csc_matrix(Xd)), net32.forward(theta, Xd),
                      1e-5)

    net = Network(sizes, "tanh", "logistic", block_size=6)
    # Duplicate entries and unsorted indices: summed, as scipy's own semantics say.
    data = np.array([1.0, 2.0, -0.5, 3.0, 0.25])
    indices = np.array([4, 1, 4, 0, 5])
    indptr = np.array([0, 3, 3, 5] + [5] * 17)
    Xdup = sp.csr_matrix((data, indices, indptr), shape=(20, 6))
    assert not Xdup.has_canonical_format
    l_dup, g_dup = net.loss_grad(theta, Xdup, Y, sw)
    l_den, g_den = net.loss_grad(theta, Xdup.toarray(), Y, sw)
    assert l_dup == pytest.approx(l_den, rel=1e-12)
    assert_grad_close(g_dup, g_den, 1e-12)
    # No stored values at all.
    Xz = sp.csr_matrix((20, 6))
    l_z, g_z = net.loss_grad(theta, Xz, Y, sw)
    l_zd, g_zd = net.loss_grad(theta, np.zeros((20, 6)), Y, sw)
    assert l_z == pytest.approx(l_zd, rel=1e-12)
    assert_grad_close(g_z, g_zd, 1e-12)
    np.testing.assert_array_equal(g_z[:24], 0.0)  # dL/dW1 = X^T delta = 0


# ---------------------------------------------------------------------------------------
# 5. Layout and initialisation.

def test_layout_literal():
    net = Network([3, 2, 1], output="identity")
    assert net.n_params == 3 * 2 + 2 * 1 + 2 + 1 == 11
    assert net.n_layers == 2 and net.layer_sizes == (3, 2, 1)
    theta = np.arange(11.0)
    coefs, intercepts = net.unpack(theta)
    np.testing.assert_array_equal(coefs[0], [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(coefs[1], [[6], [7]])
    np.testing.assert_array_equal(intercepts[0], [8, 9])
    np.testing.assert_array_equal(intercepts[1], [10])
    assert Network([4, 8, 3]).n_params == 67


@pytest.mark.parametrize("sizes", [[2, 3], [4, 8, 3], [3, 5, 1, 2], [1, 2, 3, 4, 5]])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unpack_views_and_hstack(sizes, dtype):
    net = Network(sizes, dtype=dtype)
    assert net.n_params == (sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
                            + sum(sizes[1:]))
    theta = net.init_params(random_state=3)
    assert theta.shape == (net.n_params,) and theta.dtype == dtype
    coefs, intercepts = net.unpack(theta)
    assert [c.shape for c in coefs] == list(zip(sizes[:-1], sizes[1:]))
    assert [b.shape for b in intercepts] == [(s,) for s in sizes[1:]]
    np.testing.assert_array_equal(np.hstack([c.ravel() for c in coefs + intercepts]),
                                  theta)
    for a in coefs + intercepts:
        assert a.base is theta or np.shares_memory(a, theta)
        assert a.dtype == dtype
    # Writing through the views writes theta, at the packing offsets.
    coefs[-1][-1, -1] = 123.0
    n_coef = sum(c.size for c in coefs)
    assert theta[n_coef - 1] == 123.0
    intercepts[0][0] = -7.0
    assert theta[n_coef] == -7.0
    intercepts[-1][-1] = 9.0
    assert theta[-1] == 9.0
    # The gradient has the same layout: unpack works on it too.
    g_coefs, g_int = net.unpack(np.zeros(net.n_params, dtype=dtype))
    assert [c.shape for c in g_coefs] == [c.shape for c in coefs]


def sklearn_style_init(sizes, activation, seed, dtype):
    """scikit-learn's _init_coef loop, written out."""
    rng = np.random.RandomState(seed)
    factor = 2.0 if activation == "logistic" else 6.0
    coefs, intercepts = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = np.sqrt(factor / (fan_in + fan_out))
        coefs.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(dtype))
        intercepts.append(rng.uniform(-bound, bound, fan_out).astype(dtype))
    return coefs, intercepts


# The last sizes exceed init_params' draws at a time (2^15): 300 x 400 takes blocks of
# 81 rows, the last one short; 3 x 40000 one row at a time; 40000 x 2 three blocks.
@pytest.mark.parametrize("sizes", [[5, 7, 4, 3], [300, 400, 3], [3, 40000, 2]])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_init_params_glorot_like_sklearn(activation, dtype, sizes):
    net = Network(sizes, activation=activation, output="softmax", dtype=dtype)
    for seed in (0, 42):
        theta = net.init_params(random_state=seed)
        coefs, intercepts = sklearn_style_init(sizes, activation, seed, dtype)
        np.testing.assert_array_equal(theta,
                                      np.hstack([c.ravel() for c in coefs + intercepts]))
        # The same draws from a RandomState instance.
        np.testing.assert_array_equal(
            net.init_params(random_state=np.random.RandomState(seed)), theta)
        # Bounds.
        got_c, got_i = net.unpack(theta)
        factor = 2.0 if activation == "logistic" else 6.0
        for W, b, (fi, fo) in zip(got_c, got_i, zip(sizes[:-1], sizes[1:])):
            bound = np.sqrt(factor / (fi + fo))
            assert np.abs(W).max() <= bound and np.abs(b).max() <= bound
            assert np.abs(W).max() > 0.5 * bound  # really uses the bound
    assert not np.array_equal(net.init_params(0), net.init_params(1))


def sklearn_one_step(Est, sizes, activation, X, y, sample_weight, alpha,
                     learning_rate_init, seed, **params):
    """scikit-learn's own MLP, through its public API only, after one plain gradient
    step from its initial parameters: SGD without momentum on one unshuffled batch of
    all rows, for one epoch. Returns (parameters after the step, in the flat layout;
    loss_curve_[0], which scikit-learn computes at the initial parameters, before the
    step). The step is theta_1 = theta_0 - learning_rate_init * gradient(theta_0),
    rounded once per entry (momentum 0: the velocity 0 * 0 - lr * g is exact)."""
    from sklearn.exceptions import ConvergenceWarning
    est = Est(hidden_layer_sizes=tuple(sizes[1:-1]), activation=activation, alpha=alpha,
              solver="sgd", learning_rate_init=learning_rate_init, momentum=0.0,
              nesterovs_momentum=False, batch_size=len(X), shuffle=False, max_iter=1,
              random_state=seed, **params)
    with pytest.warns(ConvergenceWarning):  # one epoch is max_iter
        est.fit(X, y, sample_weight=sample_weight)
    return np.hstack([a.ravel() for a in est.coefs_ + est.intercepts_]), est.loss_curve_[0]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_init_params_equals_sklearn_mlp(activation):
    # Cross-check against scikit-learn's own initialisation, read off a fitted model
    # (public API): one gradient step of 1e-300 leaves every parameter as it was drawn.
    # fl(theta - d) == theta whenever |d| < ulp(theta) / 2, i.e. below |theta| * 2**-54;
    # with |gradient| < 1e10 and |theta| > 1e-270 (both asserted) the step d is at most
    # 1e-290, far below that. So the equality below is exact by construction.
    from sklearn.neural_network import MLPRegressor
    sizes = [4, 6, 3, 2]
    rng = np.random.default_rng(17)
    X, Y = rng.normal(size=(10, 4)), rng.normal(size=(10, 2))
    sk_theta, _ = sklearn_one_step(MLPRegressor, sizes, activation, X, Y, None, 1e-4,
                                   1e-300, seed=17)
    net = Network(sizes, activation=activation, output="identity")
    theta = net.init_params(17)
    assert np.abs(theta).min() > 1e-270
    assert np.abs(net.loss_grad(theta, X, Y, alpha=1e-4)[1]).max() < 1e10
    np.testing.assert_array_equal(theta, sk_theta)


@pytest.mark.parametrize("output", OUTPUTS)
def test_objective_equals_sklearn_backprop(output):
    # Cross-check of the loss and the gradient with scikit-learn's MLPs, through their
    # public API (sklearn_one_step): sklearn reports its loss at its initial parameters
    # theta_0 in loss_curve_[0], and one plain gradient step of 1.0 gives
    # theta_1 = fl(theta_0 - g), so g = theta_0 - theta_1 up to two roundings. sklearn
    # averages squared error over outputs, so identity/exp use a single output here.
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    sizes = [3, 5, 4] if output in ("softmax", "logistic") else [3, 5, 1]
    _, X, Y, sw = make_problem(sizes, output, n=20, seed=9)
    if output == "softmax":  # class labels 0..3, all present: sklearn's one-hot is Y
        Est, y, params = MLPClassifier, Y.argmax(axis=1), {}
        assert set(y) == {0, 1, 2, 3}
    elif output == "logistic":  # a multilabel indicator: a logistic output per column
        Est, y, params = MLPClassifier, Y.astype(int), {}
    else:
        Est, y = MLPRegressor, Y[:, 0]
        params = {"loss": "poisson" if output == "exp" else "squared_error"}
    args = (Est, sizes, "tanh", X, y, sw, 0.3)
    theta_0, sk_loss = sklearn_one_step(*args, learning_rate_init=1e-300, seed=5,
                                        **params)  # theta_0 exactly (see above)
    theta_1, sk_loss_1 = sklearn_one_step(*args, learning_rate_init=1.0, seed=5, **params)
    assert sk_loss_1 == sk_loss  # the same theta_0, and the same loss there
    sk_grad = theta_0 - theta_1
    loss, grad = Network(sizes, "tanh", output).loss_grad(theta_0, X, Y, sw, alpha=0.3)
    # The loss: the same float64 formula summed in another order (fastbp exactly,
    # sklearn over 20 rows), a few transcendental functions per row, and sklearn's
    # batch_loss * 20 / 20: a few tens of ulps, 1e-12 leaves a margin of over 1000.
    assert loss == pytest.approx(sk_loss, rel=1e-12)
    # The gradient: the same 1e-12 (times the largest entry: the reference's own
    # summation differences), plus the read-off's two roundings, fl(theta_0 - g) and
    # then theta_0 - theta_1: at most eps * (|theta_1| + |g|) per entry.
    eps = np.finfo(np.float64).eps
    atol = 1e-12 * np.abs(sk_grad).max() + eps * (np.abs(theta_1) + np.abs(sk_grad))
    assert np.abs(sk_grad).max() > 1e-2  # a meaningful step
    assert (np.abs(grad - sk_grad) <= atol).all(), np.abs(grad - sk_grad) / atol


# ---------------------------------------------------------------------------------------
# 6. Forward pass.

@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_matches_reference(activation, output):
    sizes = [3, 6, 4, 3]
    theta, X, Y, _ = make_problem(sizes, output, n=50, seed=13)
    net = Network(sizes, activation=activation, output=output, block_size=7)
    out = net.forward(theta, X)
    _, _, P = ref_loss_grad(sizes, activation, output, theta, X, Y)
    assert out.shape == (50, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out, P, rtol=1e-12, atol=1e-14)
    if output == "softmax":
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-14)
        assert (out > 0).all()
    elif output == "logistic":
        assert ((out > 0) & (out < 1)).all()
    elif output == "exp":
        assert (out > 0).all()
    else:
        # Identity output is affine in the output intercepts: shifting them shifts out.
        shifted = theta.copy()
        shifted[-3:] += [1.0, -2.0, 0.5]
        np.testing.assert_allclose(net.forward(shifted, X) - out, [[1.0, -2.0, 0.5]] * 50,
                                   rtol=1e-12, atol=1e-12)
    # float32 kernels against the reference at float32-rounded inputs.
    net32 = Network(sizes, activation=activation, output=output, dtype=np.float32,
                    block_size=7)
    t32, X32 = theta.astype(np.float32), X.astype(np.float32)
    _, _, P32 = ref_loss_grad(sizes, activation, output, t32, X32, Y)
    out32 = net32.forward(t32, X32)
    assert out32.dtype == np.float32
    assert_grad_close(out32, P32, 1e-5)


def test_forward_consistent_with_loss():
    # The identity-output loss is 0.5 * mean ||forward - Y||^2.
    sizes = [4, 5, 2]
    theta, X, Y, _ = make_problem(sizes, "identity", n=30, seed=14, weighted=False)
    net = Network(sizes, "relu", "identity", block_size=4)
    out = net.forward(theta, X)
    loss, _ = net.loss_grad(theta, X, Y)
    assert loss == pytest.approx(0.5 * ((out - Y) ** 2).sum(axis=1).mean(), rel=1e-12)


def test_forward_no_rows():
    net = Network([3, 4, 2], "tanh", "softmax")
    out = net.forward(net.init_params(0), np.empty((0, 3)))
    assert out.shape == (0, 2)


# ---------------------------------------------------------------------------------------
# 7. out= and workspace reuse.

def test_out_argument_used():
    sizes = [4, 5, 3]
    theta, X, Y, sw = make_problem(sizes, "softmax", n=40, seed=15)
    net = Network(sizes, "relu", "softmax", block_size=9)
    loss, grad = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    out = np.full(net.n_params, np.nan)  # garbage in out must not leak into the result
    loss2, grad2 = net.loss_grad(theta, X, Y, sw, alpha=0.1, out=out)
    assert grad2 is out
    assert loss2 == loss
    np.testing.assert_array_equal(out, grad)
    # Reused out: overwritten, not accumulated.
    loss3, grad3 = net.loss_grad(theta, X, Y, sw, alpha=0.1, out=out)
    assert grad3 is out and loss3 == loss
    np.testing.assert_array_equal(out, grad)


@pytest.mark.parametrize("bad_out", [
    np.empty(10),                                  # wrong length
    np.empty(43, dtype=np.float32),                # wrong dtype
    np.empty(86)[::2],                             # not contiguous
    np.empty((43, 1)),                             # 2-D
    [0.0] * 43,                                    # not an array
])
def test_out_argument_rejected(bad_out):
    sizes = [4, 5, 3]
    net = Network(sizes, "relu", "softmax")
    assert net.n_params == 43
    theta, X, Y, _ = make_problem(sizes, "softmax", n=5, seed=15)
    with pytest.raises(ValueError, match="out must be a writable C-contiguous float64"):
        net.loss_grad(theta, X, Y, out=bad_out)


def test_out_argument_read_only_rejected():
    net = Network([2, 2], output="identity")
    out = np.zeros(net.n_params)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out must be a writable"):
        net.loss_grad(np.zeros(net.n_params), [[1.0, 2.0]], [[0.0, 1.0]], out=out)


def test_workspaces_reused_and_clean():
    sizes = [4, 6, 3]
    theta, X, Y, sw = make_problem(sizes, "logistic", n=40, seed=16)
    theta2, X2, Y2, sw2 = make_problem(sizes, "logistic", n=40, seed=17)
    net = Network(sizes, "tanh", "logistic", block_size=16)
    first = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    forward1 = net.forward(theta, X)
    # One pooled buffer set per (block, threads, exact, kind), handed out again.
    lg_keys = [k for k in net._pool if k[0] == 16 and k[2] > 0]
    assert len(lg_keys) == 1 and len(net._pool[lg_keys[0]]) == 1
    key = lg_keys[0]
    work_id = id(net._pool[key][0]["work"])
    # Other data (and a smaller block: 5 rows), then the first problem again.
    net.loss_grad(theta2, X2, Y2, sw2, alpha=0.3)
    net.loss_grad(theta2, X2[:5], Y2[:5], sw2[:5])
    assert len(net._pool[key]) == 1 and id(net._pool[key][0]["work"]) == work_id
    again = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    assert again[0] == first[0]
    np.testing.assert_array_equal(again[1], first[1])
    np.testing.assert_array_equal(net.forward(theta, X), forward1)
    # Poison the pooled buffers: nothing may be read before it is written.
    for sets in net._pool.values():
        for bufs in sets:
            for name in ("work", "tgrad", "tdacc", "acc"):
                if name in bufs:
                    bufs[name].fill(-7 if name == "acc" else np.nan)
    poisoned = net.loss_grad(theta, X, Y, sw, alpha=0.1)
    assert poisoned[0] == first[0]
    np.testing.assert_array_equal(poisoned[1], first[1])
    # And a brand-new network gives the same numbers.
    fresh = Network(sizes, "tanh", "logistic", block_size=16).loss_grad(theta, X, Y, sw,
                                                                          alpha=0.1)
    assert fresh[0] == first[0]
    np.testing.assert_array_equal(fresh[1], first[1])


# ---------------------------------------------------------------------------------------
# 8. Thread safety.

@pytest.mark.parametrize("same_size", [True, False], ids=["same-block", "mixed-blocks"])
def test_concurrent_calls(same_size):
    sizes = [20, 32, 16, 5]
    net = Network(sizes, "tanh", "softmax", block_size=256)
    problems = []
    for k in range(4):
        n = 1500 if same_size else [1500, 700, 90, 1100][k]
        theta, X, Y, sw = make_problem(sizes, "softmax", n=n, seed=40 + k)
        problems.append((theta, X, Y, sw, 0.1 * k))

    def run(p):
        theta, X, Y, sw, alpha = p
        loss, grad = net.loss_grad(theta, X, Y, sw, alpha=alpha)
        return loss, grad, net.forward(theta, X)

    expected = [run(p) for p in problems]
    jobs = problems * 6
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(run, jobs))
    for i, (loss, grad, out) in enumerate(results):
        exp_loss, exp_grad, exp_out = expected[i % 4]
        assert loss == exp_loss
        np.testing.assert_array_equal(grad, exp_grad)
        np.testing.assert_array_equal(out, exp_out)


# ---------------------------------------------------------------------------------------
# 9. Optimiser steps.

def np_sgd(theta, grad, velocity, lr, momentum, nesterov):
    velocity[:] = momentum * velocity - lr * grad
    if nesterov:
        theta += momentum * velocity - lr * grad
    else:
        theta += velocity


def np_adam(theta, grad, m, v, t, lr, b1, b2, eps):
    m[:] = b1 * m + (1 - b1) * grad
    v[:] = b2 * v + (1 - b2) * grad ** 2
    lr_t = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    theta -= lr_t * m / (np.sqrt(v) + eps)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True),
                                               (0.5, True)])
def test_sgd_update(dtype, momentum, nesterov):
    rng = np.random.default_rng(0)
    n = 37
    theta = rng.normal(size=n).astype(dtype)
    velocity = np.zeros(n, dtype=dtype)
    theta_ref, vel_ref = theta.astype(np.float64), velocity.astype(np.float64)
    start = theta.copy()
    for _ in range(6):
        grad = rng.normal(size=n).astype(dtype)
        assert _core.sgd_update(theta, grad, velocity, 0.05, momentum, nesterov) is None
        np_sgd(theta_ref, grad.astype(np.float64), vel_ref, 0.05, momentum, nesterov)
    tol = 1e-13 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(theta, theta_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(velocity, vel_ref, rtol=tol, atol=tol)
    assert theta.dtype == dtype and velocity.dtype == dtype
    assert np.abs(theta - start).max() > 0.05  # it moved


def test_sgd_update_literal():
    theta = np.array([1.0, -2.0])
    velocity = np.array([0.5, 0.0])
    grad = np.array([2.0, -4.0])
    # v = 0.5 * [0.5, 0] - 0.25 * [2, -4] = [0.25 - 0.5, 0 + 1] = [-0.25, 1]
    _core.sgd_update(theta, grad, velocity, 0.25, 0.5, False)
    np.testing.assert_array_equal(velocity, [-0.25, 1.0])
    np.testing.assert_array_equal(theta, [0.75, -1.0])
    # Nesterov: v = 0.5*[-0.25, 1] - 0.25*[2, -4] = [-0.625, 1.5];
    # theta += 0.5*v - 0.25*g = [-0.3125 - 0.5, 0.75 + 1] = [-0.8125, 1.75]
    _core.sgd_update(theta, grad, velocity, 0.25, 0.5, True)
    np.testing.assert_array_equal(velocity, [-0.625, 1.5])
    np.testing.assert_array_equal(theta, [0.75 - 0.8125, -1.0 + 1.75])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("b1,b2,eps", [(0.9, 0.999, 1e-8), (0.5, 0.9, 1e-3)])
def test_adam_update(dtype, b1, b2, eps):
    rng = np.random.default_rng(1)
    n = 41
    theta = rng.normal(size=n).astype(dtype)
    m, v = np.zeros(n, dtype=dtype), np.zeros(n, dtype=dtype)
    theta_ref, m_ref, v_ref = theta.astype(np.float64), np.zeros(n), np.zeros(n)
    for t in range(1, 9):
        grad = rng.normal(size=n).astype(dtype)
        assert _core.adam_update(theta, grad, m, v, t, 0.01, b1, b2, eps) is None
        np_adam(theta_ref, grad.astype(np.float64), m_ref, v_ref, t, 0.01, b1, b2, eps)
    tol = 1e-13 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(theta, theta_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(m, m_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(v, v_ref, rtol=tol, atol=tol)
    assert theta.dtype == m.dtype == v.dtype == dtype


def test_adam_first_step_literal():
    # t = 1: m = 0.1 g, v = 0.001 g^2, lr_t = lr * sqrt(0.001) / 0.1, so with eps = 0
    # the step is lr * sign(g) exactly (up to rounding).
    theta = np.array([1.0, 2.0, 3.0])
    m, v = np.zeros(3), np.zeros(3)
    _core.adam_update(theta, np.array([0.5, -3.0, 1e-3]), m, v, 1, 0.1, 0.9, 0.999, 0.0)
    np.testing.assert_allclose(theta, [0.9, 2.1, 2.9], rtol=1e-14)
    np.testing.assert_allclose(m, [0.05, -0.3, 1e-4], rtol=1e-15)


def _sum_squares_reference(x):
    """The kernels' order for sum(x^2) in float64: 32 partial sums over blocks of 32,
    folded pairwise (32 -> 16 -> ... -> 2 -> 1), then the sequential tail."""
    x = np.asarray(x, dtype=np.float64)
    n32 = len(x) - len(x) % 32
    acc = np.zeros(32)
    for i0 in range(0, n32, 32):
        acc = acc + x[i0:i0 + 32] * x[i0:i0 + 32]
    tail = 0.0
    for v in x[n32:]:
        tail += float(v) * float(v)
    width = 16
    while width >= 1:
        acc = acc[:width] + acc[width:2 * width]
        width //= 2
    return float(acc[0]) + tail


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,n_l2", [(1, 1), (31, 31), (32, 32), (33, 33), (100, 64),
                                    (1024, 1024), (1024, 1000), (1057, 1043), (50, 0)])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_step_takes_the_l2_term_and_the_sum_of_squares_in_its_pass(solver, n, n_l2,
                                                                   dtype):
    # The epoch kernel steps with the L2 term and takes the coefficients' sum of squares
    # (the minibatch loss's penalty) in one pass. Both must be bitwise what two passes
    # give: the sum in _sum_squares' fixed order, then a plain step on grad + a theta.
    rng = np.random.default_rng(n + n_l2)
    theta = (rng.normal(size=n) * 3).astype(dtype)
    start = theta.copy()
    grad = rng.normal(size=n).astype(dtype)
    state = [rng.random(n).astype(dtype) for _ in range(2)]
    a = 0.37
    expected_sq = _sum_squares_reference(theta[:n_l2])
    ref_grad = grad.copy()
    ref_grad[:n_l2] = grad[:n_l2] + dtype(a) * theta[:n_l2]
    ref = [theta.copy(), ref_grad, *[s.copy() for s in state]]
    if solver == "adam":
        sq = _core.adam_update(theta, grad, *state, 3, 0.01, 0.9, 0.999, 1e-8, n_l2, a)
        assert _core.adam_update(*ref, 3, 0.01, 0.9, 0.999, 1e-8) is None
    else:
        sq = _core.sgd_update(theta, grad, state[0], 0.05, 0.9, True, n_l2, a)
        assert _core.sgd_update(ref[0], ref[1], ref[2], 0.05, 0.9, True) is None
    if n_l2 == 0:
        assert sq is None
    else:
        assert sq == expected_sq
        # ... which is the sum of squares, to float64 rounding (n terms, all positive:
        # each sum is within n_l2 units of 2^-53 of the exact one).
        squares = start[:n_l2].astype(np.float64) ** 2
        assert sq == pytest.approx(squares.sum(), rel=2 * n_l2 * 2.0**-53)
    for got, want in zip([theta, grad, *state], ref):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="n_l2"):
        _core.sgd_update(theta, grad, state[0], 0.05, 0.9, True, n + 1, a)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_step_sum_of_squares_is_the_full_batch_penalty_bitwise(dtype):
    # The same sum as the kernels' own _sum_squares, which the full-batch loss uses for
    # its penalty: on one row of zeros whose target is the output's intercept, the data
    # term is 0 and the loss with alpha = 2 is exactly sum(W^2).
    rng = np.random.default_rng(7)
    for k in (1, 31, 32, 33, 1000, 1024, 1057, 4099):
        net = Network([k, 1], output="identity", dtype=dtype)
        theta = (rng.normal(size=k + 1) * 5).astype(dtype)
        X = np.zeros((1, k), dtype=dtype)
        Y = theta[-1:].reshape(1, 1)
        penalty = net.loss_grad(theta, X, Y, alpha=2.0)[0]
        zeros = [np.zeros(k + 1, dtype=dtype) for _ in range(3)]
        sq = _core.adam_update(theta.copy(), *zeros, 1, 0.01, 0.9, 0.999, 1e-8, k, 0.0)
        assert sq == penalty, k


def test_optimizers_match_sklearn():
    from sklearn.neural_network._stochastic_optimizers import (AdamOptimizer,
                                                               SGDOptimizer)
    rng = np.random.default_rng(2)
    sizes = [3, 4, 2]
    theta0 = rng.normal(size=Network(sizes).n_params)
    grads = [rng.normal(size=theta0.size) for _ in range(5)]
    for kind in ["sgd", "nesterov", "adam"]:
        theta = theta0.copy()
        coefs, intercepts = ref_unpack(sizes, theta0)
        params = [a.copy() for a in coefs + intercepts]  # sklearn's list of arrays
        if kind == "adam":
            opt = AdamOptimizer(params, learning_rate_init=0.01)
            m, v = np.zeros_like(theta), np.zeros_like(theta)
        else:
            opt = SGDOptimizer(params, learning_rate_init=0.05, momentum=0.8,
                               nesterov=kind == "nesterov")
            vel = np.zeros_like(theta)
        for t, g in enumerate(grads, start=1):
            gc, gi = ref_unpack(sizes, g)
            opt.update_params(params, gc + gi)
            if kind == "adam":
                _core.adam_update(theta, g, m, v, t, 0.01, 0.9, 0.999, 1e-8)
            else:
                _core.sgd_update(theta, g, vel, 0.05, 0.8, kind == "nesterov")
        np.testing.assert_allclose(theta, np.hstack([p.ravel() for p in params]),
                                   rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------
# 10. Bad inputs.

@pytest.fixture
def small():
    sizes = [3, 4, 2]
    net = Network(sizes, "relu", "softmax")
    theta, X, Y, sw = make_problem(sizes, "softmax", n=6, seed=0)
    return net, theta, X, Y, sw


def test_bad_theta(small):
    net, theta, X, Y, sw = small
    with pytest.raises(ValueError, match=r"theta must have shape \(26,\)"):
        net.loss_grad(theta[:-1], X, Y)
    with pytest.raises(ValueError, match=r"theta must have shape \(26,\)"):
        net.forward(np.append(theta, 0.0), X)
    with pytest.raises(ValueError, match=r"theta must have shape"):
        net.loss_grad(theta.reshape(2, 13), X, Y)
    with pytest.raises(ValueError, match="theta must be a 1-D numpy array"):
        net.unpack(list(theta))
    with pytest.raises(ValueError, match="C-contiguous"):
        net.unpack(np.repeat(theta, 2)[::2])


def test_bad_X(small):
    net, theta, X, Y, sw = small
    with pytest.raises(ValueError, match="X has 4 features, but the network expects 3"):
        net.loss_grad(theta, np.hstack([X, X[:, :1]]), Y)
    with pytest.raises(ValueError, match="X has 2 features, but the network expects 3"):
        net.forward(theta, X[:, :2])
    with pytest.raises(ValueError, match="X has 5 features, but the network expects 3"):
        net.loss_grad(theta, sp.random(6, 5, density=0.5, format="csr"), Y)
    with pytest.raises(ValueError, match="X must be 2-D"):
        net.loss_grad(theta, X[0], Y[:1])
    with pytest.raises(ValueError, match="X must be 2-D"):
        net.forward(theta, X[None])
    with pytest.raises(TypeError, match="X must hold numbers"):
        net.loss_grad(theta, "abc", Y)
    with pytest.raises(TypeError, match="X must hold numbers"):
        net.forward(theta, X.astype(str))
    with pytest.raises(TypeError, match="X must hold numbers"):
        net.forward(theta, np.array([[None, 1.0, 2.0]], dtype=object))


def test_bad_Y(small):
    net, theta, X, Y, sw = small
    with pytest.raises(ValueError, match=r"Y must have shape \(6, 2\), got \(5, 2\)"):
        net.loss_grad(theta, X, Y[:5])
    with pytest.raises(ValueError, match=r"Y must have shape \(6, 2\), got \(6, 3\)"):
        net.loss_grad(theta, X, np.hstack([Y, Y[:, :1]]))
    with pytest.raises(ValueError, match=r"Y must have shape \(6, 2\), got \(6,\)"):
        net.loss_grad(theta, X, Y[:, 0])  # 1-D only allowed for one output
    with pytest.raises(TypeError, match="Y must hold numbers"):
        net.loss_grad(theta, X, Y.astype(str))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda sw: -sw, ValueError, "sample_weight must be non-negative"),
    (lambda sw: np.where(np.arange(6) == 2, -1e-3, sw), ValueError,
     "sample_weight must be non-negative"),
    (lambda sw: np.zeros(6), ValueError, "sample_weight sums to zero"),
    (lambda sw: np.where(np.arange(6) == 0, np.nan, sw), ValueError, "NaN or infinity"),
    (lambda sw: np.where(np.arange(6) == 0, np.inf, sw), ValueError, "NaN or infinity"),
    (lambda sw: sw[:5], ValueError, r"sample_weight must have shape \(6,\), got \(5,\)"),
    (lambda sw: np.append(sw, 1.0), ValueError, r"sample_weight must have shape \(6,\)"),
    (lambda sw: sw.reshape(6, 1), ValueError, r"sample_weight must have shape \(6,\)"),
    (lambda sw: sw.astype(str), TypeError, "sample_weight must hold numbers"),
])
def test_bad_sample_weight(small, bad, exc, match):
    net, theta, X, Y, sw = small
    with pytest.raises(exc, match=match):
        net.loss_grad(theta, X, Y, sample_weight=bad(sw))


@pytest.mark.parametrize("alpha", [-1e-3, -1.0, np.nan, np.inf])
def test_bad_alpha(small, alpha):
    net, theta, X, Y, sw = small
    with pytest.raises(ValueError, match="alpha must be a non-negative finite number"):
        net.loss_grad(theta, X, Y, alpha=alpha)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(activation="sigmoid"), ValueError, "activation must be one of"),
    (dict(activation="softmax"), ValueError, "activation must be one of"),
    (dict(output="relu"), ValueError, "output must be one of"),
    (dict(output="poisson"), ValueError, "output must be one of"),
    (dict(dtype=np.int64), ValueError, "dtype must be float32 or float64"),
    (dict(dtype=np.float16), ValueError, "dtype must be float32 or float64"),
    (dict(block_size=0), ValueError, "block_size must be a positive integer"),
    (dict(block_size=2.5), ValueError, "block_size must be a positive integer"),
])
def test_bad_constructor_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Network([3, 4, 2], **kwargs)


@pytest.mark.parametrize("sizes,exc,match", [
    ([3, 0, 2], ValueError, "layer_sizes must be positive integers"),
    ([0, 2], ValueError, "layer_sizes must be positive integers"),
    ([3, 4, 0], ValueError, "layer_sizes must be positive integers"),
    ([3, -4, 2], ValueError, "layer_sizes must be positive integers"),
    ([3, 2.5, 2], ValueError, "layer_sizes must be positive integers"),
    ([3], ValueError, "at least two entries"),
    ([], ValueError, "at least two entries"),
    (None, TypeError, "layer_sizes must be a sequence of integers"),
    (["a", 2], TypeError, "layer_sizes must be a sequence of integers"),
])
def test_bad_layer_sizes(sizes, exc, match):
    with pytest.raises(exc, match=match):
        Network(sizes)


def test_constructor_accepts_numpy_integers():
    net = Network(np.array([3, 4, 2]), block_size=np.int64(5))
    assert net.layer_sizes == (3, 4, 2) and net.n_params == 26
    assert all(type(s) is int for s in net.layer_sizes)
