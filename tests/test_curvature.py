"""Exact curvature products: Gauss-Newton (Schraudolph) and Hessian (Pearlmutter)."""
import numpy as np
import pytest
import scipy.sparse as sp

from fastbp import Network

ACTS = ["identity", "logistic", "tanh", "relu"]
OUTS = ["softmax", "logistic", "identity", "exp"]


def _problem(sizes, out, n=20, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, sizes[0]))
    m = sizes[-1]
    if out == "softmax":
        Y = np.eye(m)[rng.integers(0, m, n)]
    elif out == "logistic":
        Y = rng.integers(0, 2, (n, m)).astype(float)
    elif out == "exp":
        Y = rng.poisson(1.0, (n, m)).astype(float)
    else:
        Y = rng.normal(size=(n, m))
    return X, Y, rng.uniform(0.5, 2.0, n), rng


def _rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("weighted", [False, True])
def test_hessp_matches_central_differences_of_the_gradient(act, out, weighted):
    sizes = [3, 5, 4, 3]
    X, Y, sw, rng = _problem(sizes, out, seed=ACTS.index(act) * 4 + OUTS.index(out))
    sw = sw if weighted else None
    net = Network(sizes, act, out, block_size=7)
    theta = net.init_params(random_state=1)
    v = rng.normal(size=net.n_params)
    grad = lambda t: net.loss_grad(t, X, Y, sw, alpha=0.1)[1]  # noqa: E731
    eps = 1e-5
    fd = (grad(theta + eps * v) - grad(theta - eps * v)) / (2 * eps)
    assert _rel(net.hessp(theta, v, X, Y, sw, alpha=0.1), fd) < 1e-7


def _output_hessian(out, z, y):
    """Hessian of the per-sample loss in the output pre-activations z."""
    if out == "softmax":
        p = np.exp(z - z.max())
        p /= p.sum()
        return y.sum() * (np.diag(p) - np.outer(p, p))
    if out == "logistic":
        p = 1 / (1 + np.exp(-z))
        return np.diag(p * (1 - p))
    if out == "exp":
        return np.diag(np.exp(z))
    return np.eye(len(z))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("out", OUTS)
def test_gnvp_equals_explicit_jt_h_j(act, out):
    sizes = [2, 4, 3]
    X, Y, sw, rng = _problem(sizes, out, n=9, seed=7)
    net = Network(sizes, act, out, block_size=4)
    theta = net.init_params(random_state=2)
    alpha = 0.3
    # Jacobian of the output pre-activations by central differences (smooth in theta).
    eps = 1e-6
    Z = lambda t: net.forward(t, X, raw=True)  # noqa: E731
    J = np.stack([(Z(theta + eps * e) - Z(theta - eps * e)) / (2 * eps)
                  for e in np.eye(net.n_params)], axis=-1)          # (n, m, n_params)
    z0 = Z(theta)
    G = sum(sw[i] * J[i].T @ _output_hessian(out, z0[i], Y[i]) @ J[i]
            for i in range(len(X))) / sw.sum()
    n_coef = net._b_off[0]
    G[np.arange(n_coef), np.arange(n_coef)] += alpha / sw.sum()
    for _ in range(3):
        v = rng.normal(size=net.n_params)
        assert _rel(net.gnvp(theta, v, X, Y, sw, alpha=alpha), G @ v) < 1e-7


@pytest.mark.parametrize("out", OUTS)
def test_gauss_newton_symmetric_psd_and_hessian_symmetric(out):
    sizes = [4, 6, 5, 3]
    X, Y, sw, rng = _problem(sizes, out, n=30, seed=11)
    net = Network(sizes, "tanh", out, block_size=8)
    theta = net.init_params(random_state=3)
    for _ in range(5):
        u, v = rng.normal(size=(2, net.n_params))
        Gu, Gv = net.gnvp(theta, u, X, Y, sw, 0.01), net.gnvp(theta, v, X, Y, sw, 0.01)
        assert v @ Gu == pytest.approx(u @ Gv, rel=1e-10)
        assert v @ Gv >= 0 and u @ Gu >= 0
        Hu, Hv = net.hessp(theta, u, X, Y, sw, 0.01), net.hessp(theta, v, X, Y, sw, 0.01)
        assert v @ Hu == pytest.approx(u @ Hv, rel=1e-10)


@pytest.mark.parametrize("sizes", [[3, 2], [3, 4, 2], [2, 3, 3, 3, 2]])
def test_architectures_float32_threads_and_sparse(sizes):
    X, Y, sw, rng = _problem(sizes, "softmax", n=50, seed=5)
    v = rng.normal(size=Network(sizes).n_params)
    ref = Network(sizes, "tanh", "softmax", block_size=6, n_jobs=1)
    theta = ref.init_params(random_state=0)
    for method in ("gnvp", "hessp"):
        r64 = getattr(ref, method)(theta, v, X, Y, sw, 0.05)
        two = Network(sizes, "tanh", "softmax", block_size=6, n_jobs=2)
        np.testing.assert_array_equal(getattr(two, method)(theta, v, X, Y, sw, 0.05), r64)
        r_sp = getattr(ref, method)(theta, v, sp.csr_matrix(X), Y, sw, 0.05)
        np.testing.assert_allclose(r_sp, r64, rtol=1e-12, atol=1e-14)
        n32 = Network(sizes, "tanh", "softmax", dtype=np.float32, block_size=6)
        r32 = getattr(n32, method)(theta, v, X, Y, sw, 0.05)
        assert r32.dtype == np.float32
        np.testing.assert_allclose(r32, r64, rtol=1e-3, atol=1e-4 * np.abs(r64).max())


def test_curvature_bad_inputs():
    net = Network([2, 3, 2])
    theta = net.init_params(0)
    X, Y = np.zeros((4, 2)), np.eye(2)[[0, 1, 0, 1]]
    with pytest.raises(ValueError, match="v must have shape"):
        net.gnvp(theta, np.zeros(3), X, Y)
    with pytest.raises(ValueError, match="alpha"):
        net.hessp(theta, np.zeros(net.n_params), X, Y, alpha=-1)
    with pytest.raises(ValueError, match="features"):
        net.hessp(theta, np.zeros(net.n_params), np.zeros((4, 3)), Y)


def test_forward_cache_reused_at_same_theta_and_refreshed_when_theta_changes():
    sizes = [4, 6, 3]
    X, Y, sw, rng = _problem(sizes, "softmax", n=40, seed=21)
    net = Network(sizes, "tanh", "softmax", block_size=16)
    theta = net.init_params(random_state=0)
    theta2 = theta + 0.1 * rng.normal(size=theta.shape)
    v = rng.normal(size=net.n_params)
    d = net.prepare(X, Y, sw)
    out = np.empty(net.n_params)
    cold = net._curvature(theta, v, d, 0.1, True, out).copy()
    assert d.acts_theta is not None and np.array_equal(d.acts_theta, theta)
    # Same theta: the cached forward state gives bitwise the same product.
    np.testing.assert_array_equal(net._curvature(theta, v, d, 0.1, True, out), cold)
    # Poison the cache: a reused state would now give NaN, a refreshed one would not.
    d.acts.fill(np.nan)
    assert np.isnan(net._curvature(theta, v, d, 0.1, True, out)).all()
    # A new theta (even after that) recomputes the forward pass.
    fresh = Network(sizes, "tanh", "softmax", block_size=16).hessp(theta2, v, X, Y, sw, 0.1)
    np.testing.assert_array_equal(net._curvature(theta2, v, d, 0.1, True, out), fresh)
    np.testing.assert_array_equal(net._curvature(theta2, v, d, 0.1, False, out),
                                  net.gnvp(theta2, v, X, Y, sw, 0.1))
