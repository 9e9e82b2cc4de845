"""What every training driver does when training goes wrong.

A driver keeps the best finite parameters it has evaluated (``BestTracker``) and, when the
loss becomes non-finite, puts them back and raises ``DivergenceError`` (built by
``diverged``), a ``ValueError`` that says where it happened and what to change. The
full-batch drivers (``_solvers``, ``_hessian_free``) and the minibatch loop
(``_stochastic``) share these, so every solver fails the same way.
"""
import math

__all__ = ["BestTracker", "DivergenceError", "diverged"]


class DivergenceError(ValueError):
    """Training produced a non-finite loss; the model keeps its last finite parameters.

    Raised by ``fit`` and ``partial_fit`` of both estimators. A ``ValueError``, so code
    that catches scikit-learn's errors catches it too.

    Attributes
    ----------
    args : tuple
        The message, which says where the loss became non-finite and what to change.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbp import DivergenceError, MLPRegressor
    >>> X = np.random.default_rng(0).normal(size=(50, 2))
    >>> y = X[:, 0] * 1e3
    >>> reg = MLPRegressor(solver="sgd", learning_rate_init=10.0, max_iter=5,
    ...                    random_state=0)
    >>> try:
    ...     reg.fit(X, y)
    ... except DivergenceError as exc:
    ...     print("diverged:", "non-finite" in str(exc))
    diverged: True
    >>> bool(np.isfinite(reg._theta).all())
    True
    """


def diverged(where):
    """The ``DivergenceError`` for a loss that became non-finite ``where``."""
    return DivergenceError(
        f"Training diverged: the loss became non-finite {where}. The model keeps its "
        "last finite parameters. Scale the inputs (for example with StandardScaler) or "
        "lower learning_rate_init."
    )


class BestTracker:
    """Remembers the parameters with the lowest finite loss seen so far."""

    def __init__(self, theta):
        self.loss = math.inf
        self.theta = theta.copy()

    def offer(self, loss, theta):
        if loss < self.loss and math.isfinite(loss):
            self.loss = loss
            self.theta[...] = theta
