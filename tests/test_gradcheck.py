"""fastbp.check_gradients: small errors for the real kernels, large ones for wrong
derivatives, clear errors for bad arguments."""
import numpy as np
import pytest
import scipy.sparse as sp

import fastbp
from fastbp import Network, check_gradients

OUTPUTS = {"softmax": lambda rng, n: np.eye(3)[rng.integers(0, 3, n)],
           "logistic": lambda rng, n: (rng.random((n, 3)) > 0.5).astype(float),
           "identity": lambda rng, n: rng.normal(size=(n, 3)),
           "exp": lambda rng, n: rng.poisson(2.0, size=(n, 3)).astype(float)}


def _problem(output, activation="tanh", dtype=np.float64, n=40):
    rng = np.random.default_rng(0)
    net = Network([4, 6, 5, 3], activation=activation, output=output, dtype=dtype)
    theta = net.init_params(random_state=0)
    return net, theta, rng.normal(size=(n, 4)), OUTPUTS[output](rng, n)


@pytest.mark.parametrize("output", sorted(OUTPUTS))
@pytest.mark.parametrize("activation", ["tanh", "logistic", "relu", "identity"])
def test_real_kernels_pass_in_float64(output, activation):
    net, theta, X, Y = _problem(output, activation)
    w = np.linspace(0.5, 2.0, len(X))
    report = check_gradients(net, theta, X, Y, w, alpha=1e-3, n_directions=4)
    # Central differences with step h ~ 1e-5 have O(h^2) truncation and O(eps/h)
    # rounding: about 1e-10 relative; relu's kinks are rarely crossed at this step.
    assert report.loss_grad < 1e-6 and report.gnvp < 1e-5 and report.hessp < 1e-5
    assert report.n_directions == 4 and report.worst == max(
        report.loss_grad, report.gnvp, report.hessp)


def test_float32_and_sparse_networks_report_their_own_rounding():
    net, theta, X, Y = _problem("softmax", dtype=np.float32)
    report = check_gradients(net, theta, sp.csr_matrix(X), Y)
    # float32 products carry about sqrt(n_terms) * 6e-8 relative rounding per layer.
    assert report.worst < 1e-3
    assert report.worst > 1e-9  # the float32 kernels, not a float64 copy, were checked


def test_sparse_targets_are_checked_as_dense_ones():
    """An autoencoder's sparse X as its own targets: the same report as dense targets
    (the kernels read sparse targets row by row, with bitwise the dense results)."""
    X = sp.random(40, 4, density=0.5, random_state=0, format="csr")
    net = Network([4, 3, 4], activation="tanh", output="identity")
    theta = net.init_params(random_state=0)
    sparse = check_gradients(net, theta, X, X, alpha=1e-3)
    dense = check_gradients(net, theta, X, X.toarray(), alpha=1e-3)
    assert sparse == dense
    assert sparse.worst < 1e-5


def test_wrong_derivatives_are_reported(monkeypatch):
    net, theta, X, Y = _problem("softmax")
    original = Network.loss_grad

    def scaled(self, *args, **kwargs):
        loss, grad = original(self, *args, **kwargs)
        return loss, grad * 1.01 if self is net else grad
    monkeypatch.setattr(Network, "loss_grad", scaled)
    assert check_gradients(net, theta, X, Y).loss_grad > 5e-3
    monkeypatch.undo()
    # The Gauss-Newton product is not the Hessian of a non-convex network.
    monkeypatch.setattr(Network, "hessp", Network.gnvp)
    assert check_gradients(net, theta, X, Y, alpha=0.0).hessp > 1e-3


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n_directions=0), ValueError, "n_directions"),
    (dict(n_directions=True), ValueError, "n_directions"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=2.0), ValueError, "eps"),
    (dict(eps="small"), ValueError, "eps"),
])
def test_bad_arguments(kwargs, error, match):
    net, theta, X, Y = _problem("identity")
    with pytest.raises(error, match=match):
        check_gradients(net, theta, X, Y, **kwargs)


def test_bad_network_and_theta():
    net, theta, X, Y = _problem("identity")
    with pytest.raises(TypeError, match="fastbp.Network"):
        check_gradients("net", theta, X, Y)
    with pytest.raises(ValueError, match="theta must have shape"):
        check_gradients(net, theta[:-1], X, Y)
    with pytest.raises(ValueError, match="NaN"):
        check_gradients(net, np.full_like(theta, np.nan), X, Y)


def test_public():
    assert fastbp.check_gradients is check_gradients
    assert "check_gradients" in fastbp.__all__ and "GradientReport" in fastbp.__all__
