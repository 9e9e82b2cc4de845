"""The hidden activations beyond scikit-learn's four, and one activation per hidden layer.

'leaky_relu', 'elu', 'gelu', 'silu' and 'softplus', alone and mixed per layer with each
other and with the original four, are checked against:

- a short NumPy reference of the forward pass, the backward pass and the R-operator
  (Pearlmutter's Hessian-vector product and the Gauss-Newton product), written from the
  textbook formulas in z (the kernels write most derivatives in terms of f(z) instead);
- central differences (the loss along random directions; the gradient along random
  directions for hessp; the Jacobian of the output pre-activations for gnvp);
- PyTorch's autograd (gradient) and double backward (Hessian-vector product);

in float32 and float64, dense and CSR input, with and without sample weights. Then:
overflow-free softplus, gelu and silu at large |z|; fits with Adam (one thread, and a
team of two) and L-BFGS; reproducibility; minibatch epochs independent of the number of
threads running a fixed number of chunks; the workspace sizes of the layers that keep
their pre-activations (gelu, silu); the loss bound; clear errors for bad activations;
model files and the command line.

Tolerances come from the arithmetic, never from a run (see ``rounding_tol`` and
``fd_tol``): a wrong derivative formula errs by O(1) relative to the gradient, orders of
magnitude above any of them.
"""
import math
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import erf, expit

import fastbp
from fastbp import MLPClassifier, MLPRegressor, Network, _core, _threads
from fastbp._stochastic import StochasticOptimizer

NEW = ["leaky_relu", "elu", "gelu", "silu", "softplus"]
OLD = ["identity", "logistic", "tanh", "relu"]
# (activation, output) for a network with two hidden layers: every new activation on both
# layers, and per-layer lists that mix new and old ones (and both kinds of layer: those
# whose derivatives come from f(z), and gelu/silu, which keep z).
CONFIGS = [
    ("leaky_relu", "softmax"), ("elu", "identity"), ("gelu", "logistic"),
    ("silu", "exp"), ("softplus", "softmax"),
    (("gelu", "elu"), "identity"), (("softplus", "silu"), "softmax"),
    (("leaky_relu", "tanh"), "logistic"), (("relu", "gelu"), "exp"),
]
IDS = ["-".join(a) if isinstance(a, tuple) else a for a, _ in CONFIGS]
SIZES = [5, 7, 6, 3]
N = 40


# ---------------------------------------------------------------------------------------
# The NumPy reference, float64, in z.

SQRT2PI = math.sqrt(2 * math.pi)


def f(name, z):
    if name == "identity":
        return z
    if name == "logistic":
        return expit(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z >= 0, z, 0.01 * z)
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))
    if name == "gelu":
        return 0.5 * z * (1 + erf(z / math.sqrt(2)))
    if name == "silu":
        return z * expit(z)
    assert name == "softplus"
    return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))


def df(name, z):
    if name == "identity":
        return np.ones_like(z)
    if name == "logistic":
        return expit(z) * (1 - expit(z))
    if name == "tanh":
        return 1 - np.tanh(z) ** 2
    if name == "relu":
        return (z > 0).astype(float)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, 0.01)
    if name == "elu":
        return np.where(z > 0, 1.0, np.exp(np.minimum(z, 0.0)))
    if name == "gelu":
        return 0.5 * (1 + erf(z / math.sqrt(2))) + z * np.exp(-z * z / 2) / SQRT2PI
    if name == "silu":
        s = expit(z)
        return s * (1 + z * (1 - s))
    assert name == "softplus"
    return expit(z)


def d2f(name, z):
    if name in ("identity", "relu", "leaky_relu"):
        return np.zeros_like(z)
    if name == "logistic":
        s = expit(z)
        return s * (1 - s) * (1 - 2 * s)
    if name == "tanh":
        t = np.tanh(z)
        return -2 * t * (1 - t * t)
    if name == "elu":
        return np.where(z > 0, 0.0, np.exp(np.minimum(z, 0.0)))
    if name == "gelu":
        return np.exp(-z * z / 2) / SQRT2PI * (2 - z * z)
    if name == "silu":
        s = expit(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    assert name == "softplus"
    s = expit(z)
    return s * (1 - s)


def per_layer(activation, n_hidden):
    return tuple(activation) if isinstance(activation, tuple) else (activation,) * n_hidden


def unpack(sizes, theta):
    coefs, intercepts, pos = [], [], 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        coefs.append(theta[pos:pos + a * b].reshape(a, b))
        pos += a * b
    for b in sizes[1:]:
        intercepts.append(theta[pos:pos + b])
        pos += b
    return coefs, intercepts


def output(name, z):
    if name == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if name == "logistic":
        return expit(z)
    if name == "exp":
        return np.exp(z)
    return z


def sample_loss(name, z, Y):
    """Per-sample loss from the output pre-activations z (exact forms)."""
    if name == "softmax":
        m = z.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        return Y.sum(axis=1) * lse - (Y * z).sum(axis=1)
    if name == "logistic":
        return (np.logaddexp(0, z) - Y * z).sum(axis=1)
    if name == "exp":
        ylogy = np.where(Y > 0, Y * np.log(np.where(Y > 0, Y, 1)), 0)
        return (np.exp(z) - Y * z - Y + ylogy).sum(axis=1)
    return 0.5 * ((z - Y) ** 2).sum(axis=1)


def output_curvature(name, z, r):
    """H_out(z) r per row, H_out the Hessian of the loss in z (rows of Y sum to 1)."""
    p = output(name, z)
    if name == "softmax":
        return p * (r - (p * r).sum(axis=1, keepdims=True))
    if name == "logistic":
        return p * (1 - p) * r
    if name == "exp":
        return p * r
    return r


def reference(sizes, activation, out, theta, X, Y, sw=None, alpha=0.0, v=None,
              exact=True):
    """(loss, gradient) or, with a direction v, the Hessian (exact) or Gauss-Newton
    product with v; all float64, by the textbook formulas in z."""
    theta, X, Y = (np.asarray(a, dtype=np.float64) for a in (theta, X, Y))
    w = np.ones(len(X)) if sw is None else np.asarray(sw, dtype=np.float64)
    ws = w.sum()
    acts = per_layer(activation, len(sizes) - 2)
    W, b = unpack(sizes, theta)
    L = len(W)
    A, Z = [X], []
    for l in range(L):
        Z.append(A[l] @ W[l] + b[l])
        A.append(f(acts[l], Z[l]) if l < L - 1 else output(out, Z[l]))
    D = (A[-1] - Y) * (w / ws)[:, None]
    if v is None:
        loss = (w * sample_loss(out, Z[-1], Y)).sum() / ws
        loss += 0.5 * alpha * sum((Wl ** 2).sum() for Wl in W) / ws
        gW, gb = [None] * L, [None] * L
        for l in reversed(range(L)):
            gW[l] = A[l].T @ D + alpha * W[l] / ws
            gb[l] = D.sum(axis=0)
            if l:
                D = (D @ W[l].T) * df(acts[l - 1], Z[l - 1])
        return loss, np.concatenate([g.ravel() for g in gW + gb])
    V, c = unpack(sizes, np.asarray(v, dtype=np.float64))
    RA, RZ = [np.zeros_like(X)], []
    for l in range(L):
        RZ.append(RA[l] @ W[l] + A[l] @ V[l] + c[l])
        RA.append(df(acts[l], Z[l]) * RZ[l] if l < L - 1 else None)
    RD = output_curvature(out, Z[-1], RZ[-1]) * (w / ws)[:, None]
    hW, hb = [None] * L, [None] * L
    for l in reversed(range(L)):
        hW[l] = A[l].T @ RD + alpha * V[l] / ws
        if exact and l:
            hW[l] = hW[l] + RA[l].T @ D
        hb[l] = RD.sum(axis=0)
        if l:
            d1, d2 = df(acts[l - 1], Z[l - 1]), d2f(acts[l - 1], Z[l - 1])
            if exact:
                RD = (RD @ W[l].T + D @ V[l].T) * d1 + (D @ W[l].T) * d2 * RZ[l - 1]
            else:
                RD = (RD @ W[l].T) * d1
            D = (D @ W[l].T) * d1
    return np.concatenate([h.ravel() for h in hW + hb])


# ---------------------------------------------------------------------------------------
# Problems and tolerances.

def problem(out, seed, sizes=SIZES, n=N):
    """(theta, X, Y, sample weights), float64: O(1) pre-activations of both signs."""
    rng = np.random.default_rng(seed)
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    theta = rng.normal(0.0, 0.6, n_params)
    X = rng.normal(size=(n, sizes[0])) * 1.5
    X[rng.random(X.shape) < 0.4] = 0.0  # zeros, so that CSR stores part of X
    k = sizes[-1]
    if out == "softmax":
        Y = np.eye(k)[rng.integers(0, k, n)]
    elif out == "logistic":
        Y = rng.integers(0, 2, (n, k)).astype(float)
    elif out == "exp":
        Y = rng.poisson(1.0, (n, k)).astype(float)
    else:
        Y = rng.normal(size=(n, k))
    sw = rng.uniform(0.2, 3.0, n)
    sw[1] = 0.0  # a zero weight is allowed and has no effect
    return theta, X, Y, sw


def rounding_tol(dtype, sizes=SIZES, n=N, passes=1):
    """Relative error allowed against exact arithmetic, measured against the largest
    entry. Each result is a sum of at most k = n + sum(sizes) rounded products: its
    rounding error is at most about k eps times the sum of the terms' magnitudes
    (Higham's gamma_k); every layer, and every extra pass (the R-forward and R-backward of
    a curvature product), compounds it once; a factor 10 covers cancellation (the sum of
    magnitudes over the largest entry) and libm's errors of a few ulps (erfc, expm1,
    log1p, exp). For float64 that is about 4e-13, for float32 2e-4: far below the O(1)
    error of a wrong formula."""
    eps = float(np.finfo(dtype).eps)
    return 10 * passes * (len(sizes) - 1) * (n + sum(sizes)) * eps


def assert_close(got, ref, tol):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = np.abs(ref).max()
    assert scale > 0
    err = np.abs(got - ref).max()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.3g} x {scale:.3g}"


def fd_tol(dtype, loss, n_terms=N + sum(SIZES), m3=1e3):
    """(step h, absolute tolerance) for a central difference (F(h) - F(-h)) / 2h along a
    unit direction, F computed with relative rounding error k eps (k = n_terms, as in
    ``rounding_tol``). The error is at most h^2 / 6 * M3 (truncation; M3 bounds the third
    derivative along unit directions: for these problems, |x| <= 6, weights of about 0.6,
    outputs up to exp(4) for the exp output, it stays below 1e3) plus k eps (|F| + 1) / h
    (rounding). h = (3 k eps / M3)^(1/3) minimizes the sum; the tolerance is 4 times it:
    float64 about 5e-8, float32 3e-2 (a coarse check; the reference check is the tight
    one). A relu or leaky_relu kink within the step adds an error of order h: rare at
    these steps, and the seeds are fixed, so that would fail on every machine alike."""
    keps = n_terms * float(np.finfo(dtype).eps)
    h = (3 * keps / m3) ** (1 / 3)
    return h, 4 * (h * h / 6 * m3 + keps * (abs(loss) + 1) / h)


def kink_free_direction(rng, activation, theta, X, h, sizes=SIZES):
    """A random unit direction v along which no relu, leaky_relu or elu unit changes sides
    between theta - h v and theta + h v. Across a relu or leaky_relu kink the gradient
    jumps (f' does), and a central difference of the gradient errs by the jump over 2h;
    across elu's, f'' jumps, and it errs by up to half of that jump's share of Hv: an
    error of order 1, not h^2, which no tolerance from fd_tol covers. (A kink costs a
    difference of the loss only O(h), within fd_tol.)"""
    acts = per_layer(activation, len(sizes) - 2)
    theta = np.asarray(theta, dtype=np.float64)
    for _ in range(100):
        v = unit(rng, theta.size)
        signs = []
        for t in (theta - h * v, theta + h * v):
            W, b = unpack(sizes, t)
            A, side = np.asarray(X, dtype=np.float64), []
            for l, name in enumerate(acts):
                z = A @ W[l] + b[l]
                side.append(z > 0 if name in ("relu", "leaky_relu", "elu") else None)
                A = f(name, z)
            signs.append(side)
        if all(s0 is None or np.array_equal(s0, s1) for s0, s1 in zip(*signs)):
            return v
    raise AssertionError("no kink-free direction in 100 draws")


def as_input(X, kind, dtype):
    X = X.astype(dtype)
    return sp.csr_matrix(X) if kind == "csr" else X


def unit(rng, n):
    v = rng.normal(size=n)
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------------------------------
# 1. The reference itself, against central differences (it is the oracle below).

@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_reference_matches_central_differences(config):
    activation, out = config
    theta, X, Y, sw = problem(out, seed=1)
    rng = np.random.default_rng(2)
    loss, grad = reference(SIZES, activation, out, theta, X, Y, sw, 0.2)
    h, tol = fd_tol(np.float64, loss)
    for _ in range(3):
        v = kink_free_direction(rng, activation, theta, X, h)
        fd = (reference(SIZES, activation, out, theta + h * v, X, Y, sw, 0.2)[0]
              - reference(SIZES, activation, out, theta - h * v, X, Y, sw, 0.2)[0]) / (2 * h)
        assert abs(fd - grad @ v) <= tol
        Hv = reference(SIZES, activation, out, theta, X, Y, sw, 0.2, v=v)
        fd_g = (reference(SIZES, activation, out, theta + h * v, X, Y, sw, 0.2)[1]
                - reference(SIZES, activation, out, theta - h * v, X, Y, sw, 0.2)[1]) / (2 * h)
        assert np.abs(fd_g - Hv).max() <= tol


# ---------------------------------------------------------------------------------------
# 2. Loss and gradient: the reference, and central differences along random directions.

@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_loss_and_gradient(config, dtype, kind, weighted):
    activation, out = config
    theta, X, Y, sw = problem(out, seed=3)
    sw = sw if weighted else None
    if dtype == np.float32:  # the reference at the float32-rounded inputs
        theta, X, Y = (a.astype(np.float32).astype(np.float64) for a in (theta, X, Y))
    net = Network(SIZES, activation=activation, output=out, dtype=dtype, block_size=16)
    data = as_input(X, kind, dtype)
    loss, grad = net.loss_grad(theta, data, Y, sw, alpha=0.2)
    assert grad.dtype == dtype
    ref_loss, ref_grad = reference(SIZES, activation, out, theta, X, Y, sw, 0.2)
    tol = rounding_tol(dtype)
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert_close(grad, ref_grad, tol)
    # Central differences of the network's own loss along random unit directions.
    h, fd_abs = fd_tol(dtype, loss)
    rng = np.random.default_rng(4)
    for _ in range(3):
        v = unit(rng, theta.size)
        t_plus, t_minus = (theta + h * v).astype(dtype), (theta - h * v).astype(dtype)
        step = (t_plus.astype(np.float64) - t_minus.astype(np.float64)) @ v / 2
        fd = (net.loss_grad(t_plus, data, Y, sw, 0.2)[0]
              - net.loss_grad(t_minus, data, Y, sw, 0.2)[0]) / (2 * step)
        assert abs(fd - float(grad.astype(np.float64) @ v)) <= fd_abs


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_forward_matches_reference(config):
    activation, out = config
    theta, X, _, _ = problem(out, seed=5)
    net = Network(SIZES, activation=activation, output=out, block_size=16)
    W, b = unpack(SIZES, theta)
    acts = per_layer(activation, 2)
    A = X
    for l in range(3):
        z = A @ W[l] + b[l]
        A = f(acts[l], z) if l < 2 else z
    assert_close(net.forward(theta, X, raw=True), A, rounding_tol(np.float64))
    assert_close(net.forward(theta, sp.csr_matrix(X), raw=True), A, rounding_tol(np.float64))


# ---------------------------------------------------------------------------------------
# 3. Curvature: hessp and gnvp.

@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_curvature_products_match_reference(config, dtype, kind, weighted):
    activation, out = config
    theta, X, Y, sw = problem(out, seed=6)
    sw = sw if weighted else None
    if dtype == np.float32:
        theta, X, Y = (a.astype(np.float32).astype(np.float64) for a in (theta, X, Y))
    net = Network(SIZES, activation=activation, output=out, dtype=dtype, block_size=16)
    data = as_input(X, kind, dtype)
    rng = np.random.default_rng(7)
    v = unit(rng, theta.size).astype(dtype).astype(np.float64)
    tol = rounding_tol(dtype, passes=2)
    Hv = net.hessp(theta, v, data, Y, sw, alpha=0.2)
    Gv = net.gnvp(theta, v, data, Y, sw, alpha=0.2)
    assert Hv.dtype == Gv.dtype == dtype
    assert_close(Hv, reference(SIZES, activation, out, theta, X, Y, sw, 0.2, v=v), tol)
    assert_close(Gv, reference(SIZES, activation, out, theta, X, Y, sw, 0.2, v=v,
                               exact=False), tol)
    # The Fisher diagonal: sum_i w_i (grad loss_i)^2 / sum(w), from per-row gradients.
    d = net.prepare(data, Y, sw)
    fisher = net._fisher(theta.astype(dtype), d, np.empty(net.n_params, dtype=dtype))
    w = np.ones(N) if sw is None else sw
    rows = [reference(SIZES, activation, out, theta, X[i:i + 1], Y[i:i + 1])[1]
            for i in range(N)]
    ref_fisher = sum(w[i] * rows[i] ** 2 for i in range(N)) / w.sum()
    assert_close(fisher, ref_fisher, tol)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_hessp_matches_central_differences_of_the_gradient(config, dtype, weighted):
    activation, out = config
    theta, X, Y, sw = problem(out, seed=8)
    sw = sw if weighted else None
    theta, X = theta.astype(dtype), X.astype(dtype)
    net = Network(SIZES, activation=activation, output=out, dtype=dtype, block_size=16)
    rng = np.random.default_rng(9)
    loss, grad = net.loss_grad(theta, X, Y, sw, 0.2)
    # The gradient's entries carry the rounding error that fd_tol assumes of F.
    h, tol = fd_tol(dtype, max(abs(loss), float(np.abs(grad).max())))
    for _ in range(2):
        v = kink_free_direction(rng, activation, theta, X, h)
        t_plus, t_minus = (theta + h * v).astype(dtype), (theta - h * v).astype(dtype)
        step = (t_plus.astype(np.float64) - t_minus.astype(np.float64)) @ v / 2
        fd = (net.loss_grad(t_plus, X, Y, sw, 0.2)[1].astype(np.float64)
              - net.loss_grad(t_minus, X, Y, sw, 0.2)[1]) / (2 * step)
        assert np.abs(net.hessp(theta, v, X, Y, sw, 0.2) - fd).max() <= tol
        assert np.abs(net.hessp(theta, v, sp.csr_matrix(X), Y, sw, 0.2) - fd).max() <= tol


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gnvp_matches_central_differences_of_the_jacobian(config):
    # G = sum_i w_i J_i^T H_i J_i / sum(w) + alpha / sum(w) on the coefficients, with J
    # the Jacobian of the output pre-activations by central differences of forward(raw).
    activation, out = config
    sizes = [3, 4, 3, 2]
    theta, X, Y, sw = problem(out, seed=10, sizes=sizes, n=9)
    net = Network(sizes, activation=activation, output=out, block_size=4)
    Zf = lambda t: net.forward(t, X, raw=True)  # noqa: E731
    h, _ = fd_tol(np.float64, 1.0, n_terms=9 + sum(sizes))
    J = np.stack([(Zf(theta + h * e) - Zf(theta - h * e)) / (2 * h)
                  for e in np.eye(net.n_params)], axis=-1)  # (n, m, n_params)
    z = Zf(theta)
    m = sizes[-1]
    G = sum(sw[i] * J[i].T @ output_curvature(out, z[i:i + 1], np.eye(m)) @ J[i]
            for i in range(len(X))) / sw.sum()
    n_coef = net._b_off[0]
    G[np.arange(n_coef), np.arange(n_coef)] += 0.3 / sw.sum()
    # J's entries are O(1), and each errs by fd_tol's bound, h^2 / 6 * M3 + k eps / h:
    # about 3e-9 (k = 30 terms, M3 <= 1e3, h = 2.7e-6). G v multiplies two such factors
    # through H (entries <= 1, or exp(z) for the exp output, z of order 1) and sums
    # n_params = 37 of them: a normwise error below 1e-6 leaves a margin of over 10.
    rng = np.random.default_rng(11)
    for _ in range(3):
        v = unit(rng, net.n_params)
        Gv = net.gnvp(theta, v, X, Y, sw, alpha=0.3)
        assert np.linalg.norm(Gv - G @ v) <= 1e-6 * np.linalg.norm(G @ v)


# ---------------------------------------------------------------------------------------
# 4. PyTorch's autograd as an independent oracle (float64).

def _torch_loss(torch, sizes, activation, out, t, X, Y, sw, alpha):
    F = torch.nn.functional
    fns = {"leaky_relu": lambda z: F.leaky_relu(z, negative_slope=0.01),
           "elu": F.elu, "gelu": lambda z: F.gelu(z, approximate="none"),
           "silu": F.silu, "softplus": F.softplus, "relu": F.relu, "tanh": torch.tanh,
           "logistic": torch.sigmoid, "identity": lambda z: z}
    acts = per_layer(activation, len(sizes) - 2)
    W, b, pos = [], [], 0
    for a, c in zip(sizes[:-1], sizes[1:]):
        W.append(t[pos:pos + a * c].reshape(a, c))
        pos += a * c
    for c in sizes[1:]:
        b.append(t[pos:pos + c])
        pos += c
    h = torch.tensor(X)
    for l in range(len(W)):
        z = h @ W[l] + b[l]
        h = fns[acts[l]](z) if l < len(W) - 1 else z
    Y, w = torch.tensor(Y), torch.tensor(sw)
    if out == "softmax":
        per = -(Y * torch.log_softmax(h, dim=1)).sum(dim=1)
    elif out == "logistic":
        per = F.binary_cross_entropy_with_logits(h, Y, reduction="none").sum(dim=1)
    elif out == "exp":
        ylogy = torch.where(Y > 0, Y * torch.log(torch.where(Y > 0, Y, 1.0)), 0.0)
        per = (torch.exp(h) - Y * h - Y + ylogy).sum(dim=1)
    else:
        per = 0.5 * ((h - Y) ** 2).sum(dim=1)
    return (w * per).sum() / w.sum() + 0.5 * alpha * sum((Wl ** 2).sum() for Wl in W) / w.sum()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradient_and_hessp_equal_pytorch_autograd(config):
    torch = pytest.importorskip("torch")
    activation, out = config
    theta, X, Y, sw = problem(out, seed=12)
    net = Network(SIZES, activation=activation, output=out, block_size=16)
    v = unit(np.random.default_rng(13), theta.size)
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    loss_t = _torch_loss(torch, SIZES, activation, out, t, X, Y, sw, 0.2)
    (g_t,) = torch.autograd.grad(loss_t, t, create_graph=True)
    (hv_t,) = torch.autograd.grad(g_t @ torch.tensor(v), t)
    loss, grad = net.loss_grad(theta, X, Y, sw, alpha=0.2)
    assert loss == pytest.approx(loss_t.item(), rel=rounding_tol(np.float64))
    assert_close(grad, g_t.detach().numpy(), rounding_tol(np.float64))
    assert_close(net.hessp(theta, v, X, Y, sw, alpha=0.2), hv_t.numpy(),
                 rounding_tol(np.float64, passes=2))


# ---------------------------------------------------------------------------------------
# 5. Large pre-activations: no overflow.

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation", ["softplus", "gelu", "silu", "elu", "leaky_relu"])
def test_large_pre_activations_stay_finite(activation, dtype):
    # One hidden unit, z = x (W_1 = 1, b_1 = 0), identity output y_hat = a - 1000 (W_2 = 1,
    # b_2 = -1000), target 0. At x = +1000 every activation gives a = 1000 with f' = 1, so
    # the residual is 0; at x = -1000, a = f(-1000) (0 for softplus, gelu, silu; -1 for
    # elu; -10 for leaky_relu), f' = 0 (0.01 for leaky_relu), and softplus, gelu and silu
    # must not overflow on the way (e^1000 does).
    net = Network([1, 1, 1], activation=activation, output="identity", dtype=dtype)
    theta = np.array([1.0, 1.0, 0.0, -1000.0])
    X = np.array([[1000.0], [-1000.0]])
    Y = np.zeros((2, 1))
    a_neg = {"elu": -1.0, "leaky_relu": -10.0}.get(activation, 0.0)
    d_neg = 0.01 if activation == "leaky_relu" else 0.0
    loss, grad = net.loss_grad(theta, X, Y)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    r = a_neg - 1000.0  # the second row's residual; the first row's is 0
    assert loss == pytest.approx(0.25 * r * r, rel=1e-6)
    # grad: W_1 = mean(r_i W_2 f'(z_i) x_i), b_1 = mean(r_i W_2 f'), W_2 = mean(r_i a_i),
    # b_2 = mean(r_i).
    expected = [0.5 * r * d_neg * -1000.0, 0.5 * r * a_neg, 0.5 * r * d_neg, 0.5 * r]
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
    v = np.array([0.5, -0.25, 1.0, 0.75])
    for product in (net.hessp(theta, v, X, Y), net.gnvp(theta, v, X, Y)):
        assert np.isfinite(product).all()
    d = net.prepare(X, Y)
    assert np.isfinite(net._fisher(theta.astype(dtype), d, np.empty(4, dtype))).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softplus_forward_is_exact_at_the_extremes(dtype):
    net = Network([1, 1, 1], activation="softplus", output="identity", dtype=dtype)
    theta = np.array([1.0, 1.0, 0.0, 0.0])  # y_hat = softplus(x)
    x = np.array([[1000.0], [-1000.0], [40.0], [-40.0], [0.0]])
    np.testing.assert_allclose(net.forward(theta, x)[:, 0],
                               [1000.0, 0.0, 40.0, math.exp(-40.0), math.log(2.0)],
                               rtol=4 * np.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------------------------------
# 6. Training.

def _blobs(n=400, d=20, k=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = (rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))).astype(dtype)
    return X, y


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("solver,n_jobs", [("adam", 1), ("adam", 2), ("lbfgs", None)])
@pytest.mark.parametrize("activation", NEW)
def test_every_new_activation_trains(activation, solver, n_jobs):
    X, y = _blobs()
    hidden = (64, 32)
    if solver == "adam" and n_jobs == 2:  # the team path: minibatches split over 2 threads
        assert _threads.minibatch_plan(2, 200, (20, *hidden, 3), 8) == ("team", 2)
    clf = MLPClassifier(hidden, activation=activation, solver=solver, max_iter=15,
                        n_jobs=n_jobs, random_state=0).fit(X, y)
    curve = np.array(clf.loss_curve_)
    assert np.isfinite(curve).all() and np.isfinite(clf._theta).all()
    assert curve[-1] < 0.5 * curve[0]
    assert clf.score(X, y) > 0.8


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_per_layer_list_fit_is_reproducible():
    X, y = _blobs(seed=1)
    fits = [MLPClassifier((64, 32), activation=["gelu", "softplus"], max_iter=5, n_jobs=2,
                          random_state=3).fit(X, y) for _ in range(2)]
    np.testing.assert_array_equal(fits[0]._theta, fits[1]._theta)
    assert fits[0].loss_curve_ == fits[1].loss_curve_
    # And the list is really per layer: another order trains another model.
    other = MLPClassifier((64, 32), activation=["softplus", "gelu"], max_iter=5, n_jobs=2,
                          random_state=3).fit(X, y)
    assert not np.array_equal(other._theta, fits[0]._theta)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_epoch_depends_on_chunks_not_threads(dtype, sparse):
    X, y = _blobs(n=500, d=12, dtype=dtype)
    if sparse:
        X[np.abs(X) < 0.8] = 0
    net = Network([12, 24, 16, 3], activation=["gelu", "silu"], dtype=dtype)
    data = net.prepare(sp.csr_matrix(X) if sparse else X, np.eye(3, dtype=dtype)[y])
    results = []
    for threads in (1, 2):
        theta = net.init_params(random_state=0)
        opt = StochasticOptimizer("adam", net.n_params, net.dtype, 1e-3, "constant", 0.9,
                                  True, 0.5, 0.9, 0.999, 1e-8)
        grads, work, dacc = opt._buffers(net, 2, 64, sparse)
        total, _ = _core.run_epoch(
            theta, grads, data.X, data.data, data.indices, data.indptr, data.Y, None,
            net._sizes, net._w_off, net._b_off, net._acts, net._out, work, dacc,
            np.arange(500, dtype=np.intp), True, 7, 64, 1e-4, _core.SOLVERS["adam"], 1e-3,
            0.9, True, 0.9, 0.999, 1e-8, opt.state_1, opt.state_2, opt.step, 2, threads,
            threads == 1)
        results.append((total, theta))
    assert np.isfinite(results[0][0])
    assert results[1][0] == results[0][0]
    np.testing.assert_array_equal(results[1][1], results[0][1])


# ---------------------------------------------------------------------------------------
# 7. Per-layer lists: normalisation, equivalence with a string, layouts.

def test_activation_is_normalized():
    assert Network([3, 4, 2], activation="gelu").activation == "gelu"
    net = Network([3, 4, 5, 2], activation=["gelu", "tanh"])
    assert net.activation == ("gelu", "tanh")
    assert "activation=('gelu', 'tanh')" in repr(net)
    assert Network([3, 2], activation=[]).activation == ()
    back = pickle.loads(pickle.dumps(net))
    assert back.activation == ("gelu", "tanh")
    theta, X, Y, _ = problem("softmax", seed=14, sizes=[3, 4, 5, 2], n=10)
    np.testing.assert_array_equal(back.loss_grad(theta, X, Y)[1],
                                  net.loss_grad(theta, X, Y)[1])


@pytest.mark.parametrize("name", OLD + NEW)
def test_a_list_of_one_name_is_the_string(name):
    sizes = [4, 6, 5, 3]
    theta, X, Y, sw = problem("softmax", seed=15, sizes=sizes, n=30)
    one, listed = (Network(sizes, activation=a, block_size=8) for a in (name, [name] * 2))
    np.testing.assert_array_equal(one.init_params(0), listed.init_params(0))
    v = unit(np.random.default_rng(0), theta.size)
    for method in ("gnvp", "hessp"):
        np.testing.assert_array_equal(getattr(one, method)(theta, v, X, Y, sw),
                                      getattr(listed, method)(theta, v, X, Y, sw))
    a, b = one.loss_grad(theta, X, Y, sw), listed.loss_grad(theta, X, Y, sw)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_no_hidden_layer_takes_an_empty_list():
    theta, X, Y, sw = problem("softmax", seed=16, sizes=[4, 3], n=20)
    for activation in ([], ()):
        net = Network([4, 3], activation=activation)
        ref = Network([4, 3], activation="relu")
        v = unit(np.random.default_rng(1), theta.size)
        np.testing.assert_array_equal(net.loss_grad(theta, X, Y, sw)[1],
                                      ref.loss_grad(theta, X, Y, sw)[1])
        np.testing.assert_array_equal(net.hessp(theta, v, X, Y, sw),
                                      ref.hessp(theta, v, X, Y, sw))


def test_init_params_logistic_factor_per_layer():
    # scikit-learn's Glorot bound: sqrt(2 / (fan_in + fan_out)) for logistic, else
    # sqrt(6 / ...). The output layer takes the logistic one when every hidden layer is
    # logistic, as with the string.
    sizes = [30, 40, 50, 20]
    for activation, logistic in ((["logistic", "relu"], [True, False, False]),
                                 (["relu", "logistic"], [False, True, False]),
                                 (["logistic", "logistic"], [True, True, True])):
        coefs, _ = Network(sizes, activation=activation).unpack(
            Network(sizes, activation=activation).init_params(0))
        for W, is_logistic in zip(coefs, logistic):
            bound = math.sqrt((2.0 if is_logistic else 6.0) / sum(W.shape))
            assert np.abs(W).max() <= bound
            assert np.abs(W).max() > 0.95 * bound


def test_workspaces_count_the_kept_pre_activations():
    sizes = np.array([7, 11, 13, 5, 3], dtype=np.intp)
    codes = lambda names: np.array([_core.ACTIVATIONS[a] for a in names],  # noqa: E731
                                   dtype=np.intc)
    relu = codes(["relu"] * 3)
    # gelu, silu and softplus layers keep a second array (f'(z), or z for curvature).
    for names, kept in ((["gelu", "relu", "relu"], 11), (["relu", "silu", "gelu"], 18),
                        (["elu", "softplus", "leaky_relu"], 13),
                        (["elu", "tanh", "leaky_relu"], 0), (["gelu"] * 3, 29)):
        acts = codes(names)
        for gather in (False, True):
            assert (_core.workspace_size(sizes, acts, 16, gather)
                    - _core.workspace_size(sizes, relu, 16, gather)) == 16 * kept
        assert (_core.fisher_workspace_size(sizes, acts, 16)
                - _core.fisher_workspace_size(sizes, relu, 16)) == 16 * kept
        assert (_core.acts_size(sizes, acts, 100, 16)
                - _core.acts_size(sizes, relu, 100, 16)) == 7 * 16 * kept
    with pytest.raises(ValueError, match="one activation code per hidden layer"):
        _core.workspace_size(sizes, codes(["gelu"]), 16)


def test_kernels_refuse_bad_codes_and_small_workspaces():
    net = Network([3, 4, 5, 2], activation=["gelu", "silu"], block_size=8)
    theta, X, Y, _ = problem("softmax", seed=17, sizes=[3, 4, 5, 2], n=8)
    d = net.prepare(X, Y)
    key, b = net._acquire(8, True, block=8)
    args = lambda acts, work: (  # noqa: E731
        theta, np.empty(net.n_params), d.X, None, None, None, d.Y, None, net._sizes,
        net._w_off, net._b_off, acts, net._out, work, b["tgrad"], b["tdacc"], b["acc"],
        8, 1 / 8, 0.0, 1)
    try:
        loss = _core.loss_grad(*args(net._acts, b["work"]))
        assert loss == net.loss_grad(theta, X, Y)[0]
        with pytest.raises(ValueError, match="one activation code per hidden layer"):
            _core.loss_grad(*args(net._acts[:1].copy(), b["work"]))
        with pytest.raises(ValueError, match="activation code 99"):
            _core.loss_grad(*args(np.array([6, 99], dtype=np.intc), b["work"]))
        with pytest.raises(ValueError, match="workspace is too small"):
            _core.loss_grad(*args(net._acts, b["work"][:, :-1]))
    finally:
        net._release(key, b)


# ---------------------------------------------------------------------------------------
# 8. The loss bound.

@pytest.mark.parametrize("activation", NEW + [("softplus", "elu"), ("gelu", "tanh")],
                         ids=lambda a: "-".join(a) if isinstance(a, tuple) else a)
def test_loss_bound_certifies_ordinary_parameters_and_is_sound(activation):
    X, y = _blobs(n=200, d=8)
    for output, Y in (("softmax", np.eye(3)[y]), ("identity", np.eye(3)[y] * 5.0)):
        for dtype in (np.float64, np.float32):
            net = Network([8, 16, 12, 3], activation=activation, output=output, dtype=dtype)
            data = net.prepare(X, Y)
            theta = net.init_params(random_state=0)
            assert net.loss_is_surely_finite(theta, data)
            certified = 0
            for factor in (1e2, 1e4, 1e8, 1e16, 1e150):
                big = theta.astype(np.float64) * factor
                if np.abs(big).max() >= np.finfo(dtype).max:
                    continue
                big = big.astype(dtype)
                if net.loss_is_surely_finite(big, data):
                    certified += 1
                    loss = net.loss_grad(big, X, Y)[0]
                    assert np.isfinite(loss), (activation, output, dtype, factor)
            assert certified >= 1


def test_loss_bound_counts_the_offset_of_softplus():
    # Every z is 0 (x = 0, b_1 = 0), but softplus(0) = log 2: with an output weight of
    # 1e300 the output is 6.9e299 and its square overflows. A bound that took |a| <= |z|
    # (as for relu) would certify it.
    X, Y = np.zeros((4, 1)), np.zeros((4, 1))
    net = Network([1, 1, 1], activation="softplus", output="identity")
    data = net.prepare(X, Y)
    huge = np.array([1.0, 1e300, 0.0, 0.0])
    assert not np.isfinite(net.loss_grad(huge, X, Y)[0])
    assert not net.loss_is_surely_finite(huge, data)
    ordinary = np.array([1.0, 1e3, 0.0, 0.0])
    assert net.loss_is_surely_finite(ordinary, data)
    assert net.loss_grad(ordinary, X, Y)[0] == pytest.approx(0.5 * (1e3 * math.log(2)) ** 2)


# ---------------------------------------------------------------------------------------
# 9. Bad activations: clear errors, from Network and from the estimators.

BAD = [
    ("swish", r"activation must be one of .*got 'swish'"),
    (["relu"], r"activation lists 1 name\(s\), but the network has 2 hidden layer\(s\)"),
    ([], r"activation lists 0 name\(s\), but the network has 2 hidden layer\(s\)"),
    (["relu", "tanh", "gelu"], r"lists 3 name\(s\), but the network has 2"),
    (["relu", 3], r"activation\[1\] must be a string, one of .*got 3 of type int"),
    ([None, "relu"], r"activation\[0\] must be a string"),
    (["gelu", "swish"], r"activation\[1\] must be one of .*got 'swish'"),
    (("gelu", "Relu"), r"activation\[1\] must be one of .*got 'Relu'"),
    (5, r"activation must be one of .*or a list or tuple of them.*got 5 of type int"),
    ({"relu": 1}, r"activation must be one of .*got \{'relu': 1\} of type dict"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_network_refuses_bad_activations(bad, message):
    with pytest.raises(ValueError, match=message):
        Network([3, 4, 5, 2], activation=bad)


@pytest.mark.parametrize("bad,message", BAD)
@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor])
def test_estimators_refuse_bad_activations(Est, bad, message):
    X, y = _blobs(n=40, d=3)
    est = Est(hidden_layer_sizes=(4, 5), activation=bad, max_iter=2)
    if not isinstance(bad, (list, tuple)):
        # scikit-learn's parameter validation: an InvalidParameterError (a ValueError)
        message = r"'activation' parameter .* must be a str among .*" \
                  r"an instance of 'list' or an instance of 'tuple'"
    with pytest.raises(ValueError, match=message):
        est.fit(X, y)
    assert not hasattr(est, "coefs_")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_warm_start_compares_per_layer_activations():
    X, y = _blobs(n=60, d=3)
    est = MLPClassifier((4, 5), activation=["relu", "relu"], solver="lbfgs", max_iter=3,
                        warm_start=True, random_state=0).fit(X, y)
    est.set_params(activation="relu").fit(X, y)          # the same network: continues
    est.set_params(activation=("relu", "relu")).fit(X, y)
    with pytest.raises(ValueError, match="needs the same network"):
        est.set_params(activation=["relu", "gelu"]).fit(X, y)
    est.set_params(activation=["relu"])
    with pytest.raises(ValueError, match=r"lists 1 name\(s\)"):
        est.fit(X, y)


# ---------------------------------------------------------------------------------------
# 10. The command line (model files: tests/test_io.py).

def _cli(args, cwd):
    """``python -m fastbp.cli`` in a fresh process that imports this fastbp, run outside
    the checkout (whose uncompiled sources would shadow the built package)."""
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(fastbp.__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "fastbp.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_cli_trains_with_new_and_per_layer_activations(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 5))
    y = np.digitize(X[:, 0] + X[:, 1], [-0.6, 0.6])
    np.savez(tmp_path / "data.npz", X=X, y=y)
    run = _cli(["train", "data.npz", "--hidden", "8,6", "--activation", "gelu,silu",
                "--solver", "lbfgs", "--max-iter", "50", "--quiet", "--output", "m.fbp"],
               tmp_path)
    assert run.returncode == 0, run.stderr
    model = fastbp.load(tmp_path / "m.fbp")
    assert model[-1].activation == ("gelu", "silu")
    assert model[-1]._net.activation == ("gelu", "silu")
    accuracy = float(run.stdout.split("test accuracy:")[1].split()[0])
    assert accuracy > 0.7


def test_cli_refuses_bad_activations(capsys):
    from fastbp.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--activation", "swish"])
    assert exit_.value.code == 2
    assert "'swish' is not an activation" in capsys.readouterr().err
    assert main(["train", "--hidden", "8", "--activation", "gelu,silu", "--quiet"]) == 2
    assert "--activation lists 2 activations for 1 hidden layers" in capsys.readouterr().err
