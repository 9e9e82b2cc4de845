"""Per-sample error contributions (Network.deltas, Network.input_gradient) and
fastbp.inspection.input_gradients: exact against a NumPy reference, central differences
and PyTorch autograd."""
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.datasets import load_digits

import fastbp
from fastbp import MLPAutoencoder, MLPClassifier, MLPRegressor, Network
from fastbp.inspection import input_gradients

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

ACT = {"tanh": (np.tanh, lambda a: 1 - a * a),
       "relu": (lambda z: np.maximum(z, 0), lambda a: (a > 0).astype(a.dtype)),
       "logistic": (lambda z: 1 / (1 + np.exp(-z)), lambda a: a * (1 - a))}


def _reference(net, theta, X, Y, w):
    """Deltas (w_i dloss_i/dz_l) and input gradients, by a plain NumPy backward pass."""
    coefs, intercepts = net.unpack(theta)
    f, df = ACT[net.activation]
    A = [X]
    for k, (W, b) in enumerate(zip(coefs, intercepts)):
        Z = A[-1] @ W + b
        if k < len(coefs) - 1:
            A.append(f(Z))
        elif net.output == "softmax":
            E = np.exp(Z - Z.max(axis=1, keepdims=True))
            A.append(E / E.sum(axis=1, keepdims=True))
        elif net.output == "logistic":
            A.append(1 / (1 + np.exp(-Z)))
        elif net.output == "exp":
            A.append(np.exp(Z))
        else:
            A.append(Z)
    D = [(A[-1] - Y) * w[:, None]]
    for k in range(len(coefs) - 1, 0, -1):
        D.insert(0, (D[0] @ coefs[k].T) * df(A[k]))
    return D, D[0] @ coefs[0].T


def _problem(output, activation, n=50, seed=0):
    rng = np.random.default_rng(seed)
    net = Network([5, 7, 6, 3], activation=activation, output=output)
    theta = net.init_params(random_state=seed)
    X = rng.normal(size=(n, 5))
    Y = {"softmax": np.eye(3)[rng.integers(0, 3, n)],
         "logistic": (rng.random((n, 3)) > 0.5).astype(float),
         "identity": rng.normal(size=(n, 3)),
         "exp": rng.poisson(1.5, size=(n, 3)).astype(float)}[output]
    return net, theta, X, Y, rng.uniform(0.5, 2.0, n)


@pytest.mark.parametrize("output", ["softmax", "logistic", "identity", "exp"])
@pytest.mark.parametrize("activation", sorted(ACT))
@pytest.mark.parametrize("weighted", [False, True])
def test_deltas_and_input_gradient_match_numpy(output, activation, weighted):
    net, theta, X, Y, w = _problem(output, activation)
    w = w if weighted else np.ones(len(X))
    D_ref, G_ref = _reference(net, theta, X, Y, w)
    D = net.deltas(theta, X, Y, w if weighted else None)
    G = net.input_gradient(theta, X, Y, w if weighted else None)
    assert [d.shape for d in D] == [(50, 7), (50, 6), (50, 3)]
    # Three layers of float64 products over <= 7 terms: ~1e-15 relative; 1e-12 of margin.
    for d, d_ref in zip(D, D_ref):
        np.testing.assert_allclose(d, d_ref, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(G, G_ref, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_input_gradient_is_the_per_sample_loss_gradient(dtype):
    net64, theta, X, Y, w = _problem("softmax", "tanh", n=12)
    net = Network(net64.layer_sizes, activation="tanh", output="softmax", dtype=dtype)
    G = net.input_gradient(theta.astype(dtype), X.astype(dtype), Y.astype(dtype), w)
    assert G.dtype == dtype
    h = 1e-6
    for i in (0, 5, 11):
        for j in range(5):
            e = np.zeros(5)
            e[j] = h
            lp = net64.loss_grad(theta, (X[i] + e)[None], Y[i:i + 1])[0]
            lm = net64.loss_grad(theta, (X[i] - e)[None], Y[i:i + 1])[0]
            fd = w[i] * (lp - lm) / (2 * h)
            # central differences: O(h^2) + O(eps / h) ~ 1e-10; float32: ~1e-6 relative.
            tol = 1e-7 if dtype == np.float64 else 1e-4
            assert G[i, j] == pytest.approx(fd, abs=tol, rel=tol * 10)


def test_sparse_blocks_and_threads_give_the_same_rows():
    net, theta, X, Y, w = _problem("softmax", "relu", n=5000)
    G = net.input_gradient(theta, X, Y, w)
    Xs = sp.csr_matrix(np.where(np.abs(X) > 0.5, X, 0))
    Gs = net.input_gradient(theta, Xs, Y, w)
    Gd = net.input_gradient(theta, Xs.toarray(), Y, w)
    np.testing.assert_allclose(Gs, Gd, rtol=1e-12, atol=1e-14)
    # Each row depends on itself only: any row subset and thread count agree.
    one = Network(net.layer_sizes, activation="relu", output="softmax", n_jobs=1,
                  block_size=64)
    np.testing.assert_allclose(one.input_gradient(theta, X, Y, w), G, rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(net.input_gradient(theta, X[100:300], Y[100:300],
                                                  w[100:300]), G[100:300], rtol=1e-12,
                               atol=1e-14)
    D = net.deltas(theta, X, Y, w)
    np.testing.assert_allclose(D[-1], (net.forward(theta, X) - Y) * w[:, None],
                               rtol=1e-12, atol=1e-15)


def test_against_pytorch_autograd():
    torch = pytest.importorskip("torch")
    net, theta, X, Y, w = _problem("softmax", "tanh", n=20)
    coefs, intercepts = net.unpack(theta)
    x = torch.tensor(X, requires_grad=True)
    a = x
    zs = []
    for k, (W, b) in enumerate(zip(coefs, intercepts)):
        z = a @ torch.tensor(W) + torch.tensor(b)
        z.retain_grad()
        zs.append(z)
        a = torch.tanh(z) if k < 2 else z
    per_sample = -(torch.tensor(Y) * torch.log_softmax(a, dim=1)).sum(dim=1)
    (per_sample * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(net.input_gradient(theta, X, Y, w), x.grad.numpy(),
                               rtol=1e-10, atol=1e-13)
    for d, z in zip(net.deltas(theta, X, Y, w), zs):
        np.testing.assert_allclose(d, z.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_bad_input_to_the_network_methods():
    net, theta, X, Y, w = _problem("softmax", "tanh")
    with pytest.raises(ValueError, match="theta"):
        net.deltas(theta[:-1], X, Y)
    with pytest.raises(ValueError):
        net.input_gradient(theta, X[:, :4], Y)
    with pytest.raises(ValueError):
        net.input_gradient(theta, X, Y[:, :2])
    with pytest.raises(ValueError):
        net.deltas(theta, X, Y, w[:3])
    with pytest.raises(ValueError, match="NaN"):
        net.input_gradient(theta, np.full_like(X, np.nan), Y)


# fastbp.inspection.input_gradients --------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16, y


def test_classifier_saliency_is_the_log_probability_gradient(digits):
    X, y = digits
    clf = MLPClassifier((32,), activation="tanh", solver="lbfgs", max_iter=50,
                        random_state=0).fit(X, y)
    S = input_gradients(clf, X[:10])
    pred = clf.predict(X[:10])
    h = 1e-6
    for i in range(3):
        for j in (20, 36, 43):
            e = np.zeros(64)
            e[j] = h
            lp = np.log(clf.predict_proba((X[i] + e)[None]))[0, pred[i]]
            lm = np.log(clf.predict_proba((X[i] - e)[None]))[0, pred[i]]
            assert S[i, j] == pytest.approx((lp - lm) / (2 * h), abs=1e-6)
    # With y, the gradient of each sample's loss: minus the log-probability's at y.
    L = input_gradients(clf, X[:10], pred)
    np.testing.assert_allclose(L, -S, rtol=1e-12, atol=1e-15)


def test_binary_multilabel_regressor_and_autoencoder(digits):
    X, y = digits
    binary = MLPClassifier((16,), max_iter=20, random_state=0).fit(X, y > 4)
    S = input_gradients(binary, X[:5])
    h = 1e-6
    e = np.zeros(64)
    e[30] = h
    p = binary.predict(X[:1])[0]
    col = int(p)
    fd = (np.log(binary.predict_proba(X[:1] + e))[0, col]
          - np.log(binary.predict_proba(X[:1] - e))[0, col]) / (2 * h)
    assert S[0, 30] == pytest.approx(fd, abs=1e-6)
    reg = MLPRegressor(hidden_layer_sizes=(16,), max_iter=20, random_state=0).fit(X, y)
    R = input_gradients(reg, X[:5])
    fd = (reg.predict(X[:1] + e)[0] - reg.predict(X[:1] - e)[0]) / (2 * h)
    assert R[0, 30] == pytest.approx(fd, abs=1e-6)
    pois = MLPRegressor(loss="poisson", hidden_layer_sizes=(16,), max_iter=20,
                        random_state=0).fit(X, y)
    P = input_gradients(pois, X[:5])
    fd = (pois.predict(X[:1] + e)[0] - pois.predict(X[:1] - e)[0]) / (2 * h)
    assert P[0, 30] == pytest.approx(fd, rel=1e-5, abs=1e-6)
    ae = MLPAutoencoder((16, 4, 16), max_iter=10, random_state=0).fit(X)
    A = input_gradients(ae, X[:5])
    assert A.shape == (5, 64) and np.isfinite(A).all()
    sparse = input_gradients(binary, sp.csr_matrix(X[:5]))
    np.testing.assert_allclose(sparse, S, rtol=1e-12, atol=1e-15)


def test_inspection_errors(digits):
    X, y = digits
    clf = MLPClassifier((8,), max_iter=5, random_state=0).fit(X, y)
    with pytest.raises(TypeError, match="fastbp MLPClassifier"):
        input_gradients("model", X)
    with pytest.raises(ValueError, match="not fitted|NotFitted|fitted"):
        input_gradients(MLPClassifier(), X)
    with pytest.raises(ValueError, match=r"classes \[11\]"):
        input_gradients(clf, X[:3], [1, 2, 11])
    with pytest.raises(ValueError, match="features"):
        input_gradients(clf, X[:3, :10])
    reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=5, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="outputs"):
        input_gradients(reg, X[:3], np.ones((3, 2)))


def test_saliency_example_draws_its_picture(tmp_path):
    pytest.importorskip("matplotlib")  # a test requirement
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "docs" / "saliency.py"
    out = tmp_path / "saliency.png"
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                         text=True, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    import matplotlib.image
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 200 and image.shape[1] > 900  # two rows of ten panels
