"""``check_gradients``: the kernels' derivatives against central differences.

For anyone extending the kernels (a new activation, output or loss): it compares
``Network.loss_grad``, ``Network.gnvp`` and ``Network.hessp`` with central differences
of the loss and of the gradient along random directions, and reports relative errors.

The Gauss-Newton product has no finite-difference form of its own, but for fastbp's
canonical output/loss pairs the Hessian is ``G + sum_i (yhat_i - y_i) d2z_i``: with the
targets set to the network's own outputs the second term vanishes, and G does not depend
on the targets. So ``gnvp`` is checked against central differences of the gradient
taken with ``Y = net.forward(theta, X)``.

Differences are always taken in float64 (a float32 network is copied to a float64 one),
so a float32 network's report measures its own rounding, not the differences'.
"""
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state

from ._network import Network

__all__ = ["GradientReport", "check_gradients"]


@dataclass(frozen=True)
class GradientReport:
    """Relative errors of a network's derivatives against central differences.

    Attributes
    ----------
    loss_grad : float
        Largest relative error of the directional derivative ``grad . d``.
    gnvp : float
        Largest relative error (2-norm) of the Gauss-Newton product.
    hessp : float
        Largest relative error (2-norm) of the Hessian product.
    n_directions : int
        Random directions tried.
    eps : float
        The central-difference step, relative to ``max(1, ||theta||)``.

    Examples
    --------
    >>> import numpy as np
    >>> import fastbp
    >>> net = fastbp.Network([3, 5, 2], activation="tanh", output="softmax")
    >>> theta = net.init_params(random_state=0)
    >>> X = np.random.default_rng(0).normal(size=(20, 3))
    >>> report = fastbp.check_gradients(net, theta, X, np.eye(2)[[0, 1] * 10])
    >>> report.worst < 1e-6
    True
    """

    loss_grad: float
    gnvp: float
    hessp: float
    n_directions: int
    eps: float

    @property
    def worst(self):
        """The largest of the three errors."""
        return max(self.loss_grad, self.gnvp, self.hessp)


def _relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def check_gradients(net, theta, X, Y, sample_weight=None, *, alpha=0.0, n_directions=3,
                    eps=None, random_state=0):
    """Compare a network's gradient and curvature products with central differences.

    Parameters
    ----------
    net : Network
        The network to check.
    theta : ndarray of shape (net.n_params,)
        Where to check (float32 or float64, as ``net.dtype``).
    X : {ndarray, sparse matrix} of shape (n_samples, layer_sizes[0])
        Inputs.
    Y : {ndarray, sparse matrix} of shape (n_samples, layer_sizes[-1])
        Targets in the network's form (one-hot rows, 0/1 columns, values; sparse, for
        instance an autoencoder's sparse X).
    sample_weight : ndarray of shape (n_samples,), default=None
        Sample weights.
    alpha : float, default=0.0
        L2 penalty.
    n_directions : int, default=3
        Random unit directions to try; the report keeps the worst error.
    eps : float, default=None
        Central-difference step relative to ``max(1, ||theta||)``; None: ``1e-5`` (near
        float64's optimum, ``eps_machine ** (1/3)``, for the loss's O(eps^2) truncation).
    random_state : int, RandomState instance or None, default=0
        Draws the directions.

    Returns
    -------
    report : GradientReport
        Relative errors of ``loss_grad``, ``gnvp`` and ``hessp``.

    Raises
    ------
    TypeError
        When ``net`` is not a :class:`fastbp.Network`.
    ValueError
        For a bad ``n_directions`` or ``eps``; the network checks the arrays.

    Examples
    --------
    >>> import numpy as np
    >>> import fastbp
    >>> net = fastbp.Network([4, 6, 1], activation="logistic", output="identity")
    >>> theta = net.init_params(random_state=0)
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 1))
    >>> report = fastbp.check_gradients(net, theta, X, y, alpha=1e-3)
    >>> bool(report.loss_grad < 1e-7 and report.hessp < 1e-6)
    True
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be a fastbp.Network, got {type(net).__name__}")
    if (isinstance(n_directions, bool) or not isinstance(n_directions, (int, np.integer))
            or n_directions < 1):
        raise ValueError(f"n_directions must be a positive integer, got {n_directions!r}")
    eps = 1e-5 if eps is None else eps
    if isinstance(eps, bool) or not isinstance(eps, (float, int)) or not 0 < eps < 1:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    net._check_theta(theta)
    ref = Network(net.layer_sizes, activation=net.activation, output=net.output,
                  dtype=np.float64, block_size=net.block_size, n_jobs=net.n_jobs)
    theta64 = np.asarray(theta, dtype=np.float64)
    Y = Y if sp.issparse(Y) else np.asarray(Y)
    Y64 = Y.astype(np.float64)
    X64 = X.astype(np.float64) if hasattr(X, "astype") else np.asarray(X, np.float64)
    X_net = X.astype(net.dtype) if hasattr(X, "astype") else np.asarray(X, net.dtype)
    own = ref.forward(theta64, X64, raw=False)  # targets that make H = G
    rng = check_random_state(random_state)
    step = eps * max(1.0, float(np.linalg.norm(theta64)))
    kw = dict(sample_weight=sample_weight, alpha=alpha)
    _, grad = net.loss_grad(theta, X_net, Y.astype(net.dtype), **kw)
    errors = {"loss_grad": 0.0, "gnvp": 0.0, "hessp": 0.0}
    for _ in range(n_directions):
        d = rng.normal(size=net.n_params)
        d /= np.linalg.norm(d)
        plus, minus = theta64 + step * d, theta64 - step * d
        lp, gp = ref.loss_grad(plus, X64, Y64, **kw)
        lm, gm = ref.loss_grad(minus, X64, Y64, **kw)
        fd = (lp - lm) / (2 * step)
        errors["loss_grad"] = max(errors["loss_grad"], _relative(grad @ d, fd))
        hv = net.hessp(theta, d.astype(net.dtype), X_net, Y.astype(net.dtype), **kw)
        errors["hessp"] = max(errors["hessp"], _relative(hv, (gp - gm) / (2 * step)))
        _, gp = ref.loss_grad(plus, X64, own, **kw)
        _, gm = ref.loss_grad(minus, X64, own, **kw)
        gv = net.gnvp(theta, d.astype(net.dtype), X_net, Y.astype(net.dtype), **kw)
        errors["gnvp"] = max(errors["gnvp"], _relative(gv, (gp - gm) / (2 * step)))
    return GradientReport(n_directions=int(n_directions), eps=float(eps), **errors)
