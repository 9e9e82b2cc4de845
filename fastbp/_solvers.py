"""Solvers: they drive the kernels over the model's one flat parameter vector.

- ``fit_full_batch``: SciPy's L-BFGS-B, TNC, Newton-CG or trust-krylov with
  ``jac=True`` on the flat vector (the last two with exact curvature products as
  ``hessp``). SciPy works in float64; a float32 model converts at that boundary only.
- ``StochasticOptimizer``: SGD (momentum, Nesterov) or Adam state, and ``epoch``, which
  runs a whole epoch (shuffle, minibatch gather, forward, backward, update) in one nogil
  kernel call.

Solvers never pack or unpack: they write into ``theta`` in place, so the estimator's
``coefs_``/``intercepts_`` views stay valid.
"""
import math
import warnings

import numpy as np
import scipy.optimize
from sklearn.exceptions import ConvergenceWarning

from . import _core
from ._objective import ObjectiveFailure
from ._threads import team_for_now

__all__ = ["fit_full_batch", "StochasticOptimizer", "DivergenceError", "FULL_BATCH"]

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


def _diverged(where):
    return DivergenceError(
        f"Training diverged: the loss became non-finite {where}. The model keeps its "
        "last finite parameters. Scale the inputs (for example with StandardScaler) or "
        "lower learning_rate_init."
    )


class _BestTracker:
    """Remembers the parameters with the lowest finite loss seen so far."""

    def __init__(self, theta):
        self.loss = math.inf
        self.theta = theta.copy()

    def offer(self, loss, theta):
        if loss < self.loss and math.isfinite(loss):
            self.loss = loss
            self.theta[...] = theta


class _NonFinite(Exception):
    """Raised from an evaluation whose loss or product is not finite."""


class _StopSolver(Exception):
    """Raised from a callback to end a SciPy solver after max_iter iterations."""


# SciPy's name and settings for each full-batch solver. 'tol' maps to the solver's own
# gradient (or, for Newton-CG, step) tolerance.
FULL_BATCH = {
    "lbfgs": dict(method="L-BFGS-B", hessp=False),
    "tnc": dict(method="TNC", hessp=False),
    "newton-cg": dict(method="Newton-CG", hessp=True),
    "trust-krylov": dict(method="trust-krylov", hessp=True),
}


def fit_full_batch(solver, objective, theta, max_iter, max_fun, tol, verbose,
                   loss_curve, progress=None, curvature="gauss-newton"):
    """Minimise a full-batch objective (``LocalObjective`` or ``DaskObjective``) with
    one of SciPy's solvers, from ``theta``.

    ``theta`` is updated in place. SciPy works in float64: a float32 model converts at
    this boundary only (TNC refuses a float32 x0). Newton-CG and trust-krylov get exact
    curvature products as ``hessp`` (Gauss-Newton by default, or the Hessian); repeated
    products at one point reuse the cached forward pass. Appends the loss after each
    iteration to ``loss_curve`` and calls ``progress(n_iter, loss)`` when given. On
    Ctrl-C, restores the best parameters evaluated so far and warns. Returns
    ``(loss, n_iter)``.
    """
    spec = FULL_BATCH[solver]
    net = objective.net
    f32 = net.dtype == np.float32
    work_theta = np.empty_like(theta) if f32 else None
    grad = np.empty(net.n_params, dtype=net.dtype)
    prod = np.empty(net.n_params, dtype=net.dtype)
    vec = np.empty(net.n_params, dtype=net.dtype)
    best = _BestTracker(theta)
    last = {"x": None, "loss": math.inf}
    n_iter = 0

    def point(x):
        if f32:
            work_theta[...] = x
            return work_theta
        return np.ascontiguousarray(x, dtype=np.float64)

    def fun(x):
        p = point(x)
        if not np.isfinite(p).all():
            # SciPy's own breakdown (a NaN step from trust-krylov's Lanczos): answer NaN
            # and let it reject the point, as it does.
            grad.fill(np.nan)
            return math.nan, grad.astype(np.float64, copy=True)
        loss = objective.loss_grad(p, grad)
        # Checked per evaluation: stop, keep the best. The gradient too: a float32
        # gradient can overflow where the float64 loss does not.
        if not (math.isfinite(loss) and np.isfinite(grad).all()):
            raise _NonFinite
        best.offer(loss, p)
        if solver == "tnc":  # only TNC's callback needs the loss at its x
            last["x"], last["loss"] = np.array(x, dtype=np.float64), loss
        # A fresh float64 gradient per call: SciPy keeps references to earlier ones.
        return loss, grad.astype(np.float64, copy=True)

    def hessp(x, v):
        vec[...] = v
        objective.curvature(point(x), vec, curvature == "hessian", prod)
        # A non-finite direction is SciPy's own (trust-krylov's Lanczos can break down
        # near convergence) and it copes with the NaN it gets back; a non-finite product
        # of a finite direction means the model diverged.
        if not np.isfinite(prod).all() and np.isfinite(v).all():
            raise _NonFinite
        return prod.astype(np.float64, copy=True)

    def record(x, loss):
        nonlocal n_iter
        n_iter += 1
        if loss is None:
            loss = (last["loss"] if last["x"] is not None and np.array_equal(last["x"], x)
                    else objective.loss_grad(point(x), grad))
        loss_curve.append(float(loss))
        if verbose:
            print(f"Iteration {n_iter}, loss = {loss:.8f}")
        if progress is not None:
            progress(n_iter, float(loss))
        if n_iter >= max_iter and solver == "tnc":
            raise _StopSolver  # TNC has no iteration limit of its own

    if solver == "tnc":
        # TNC calls back with x only (and lets an exception from the callback escape).
        def callback(xk):
            record(xk, None)
    else:
        def callback(intermediate_result):
            record(intermediate_result.x, intermediate_result.fun)

    options = {"lbfgs": {"maxiter": max_iter, "maxfun": max_fun, "gtol": tol},
               "tnc": {"maxfun": max_fun, "gtol": tol},
               "newton-cg": {"maxiter": max_iter, "xtol": max(tol, 1e-12)},
               "trust-krylov": {"maxiter": max_iter, "gtol": tol}}[solver]
    x0 = theta.astype(np.float64, copy=True)
    res = None
    try:
        with objective.blas_guard():
            res = scipy.optimize.minimize(
                fun, x0, method=spec["method"], jac=True, callback=callback,
                hessp=hessp if spec["hessp"] else None, options=options)
    except _StopSolver:
        pass
    except KeyboardInterrupt:
        warnings.warn("Training interrupted by user; the model keeps the best "
                      "parameters found so far.", UserWarning)
        theta[...] = best.theta
        return best.loss, n_iter
    except ObjectiveFailure:
        theta[...] = best.theta
        raise
    except _NonFinite:
        theta[...] = best.theta
        raise _diverged(f"during {solver} (iteration {n_iter + 1})") from None
    if res is None:  # stopped at max_iter from the callback: keep the last iterate
        x_final, loss_final = last["x"], last["loss"]
        status, message = 1, "maximum number of iterations reached"
    else:
        x_final, loss_final = res.x, float(res.fun)
        status, message = res.status, res.message
    if not (math.isfinite(loss_final) and np.isfinite(x_final).all()):
        theta[...] = best.theta
        raise _diverged(f"during {solver} (iteration {n_iter})")
    theta[...] = x_final
    # TNC's statuses 1 and 2 are convergence in f and in x.
    converged = res is not None and (status == 0 or (solver == "tnc" and status in (1, 2)))
    if not converged:
        warnings.warn(
            f"{solver} failed to converge after {n_iter} iteration(s) (status={status}): "
            f"{message}. Increase max_iter or max_fun, or scale the data.",
            ConvergenceWarning,
        )
    return loss_final, n_iter


class StochasticOptimizer:
    """SGD or Adam state over the flat vector (scikit-learn's update formulas).

    Parameters
    ----------
    solver : {'sgd', 'adam'}
    n_params : int
    dtype : numpy dtype
    learning_rate_init, lr_schedule, momentum, nesterov, power_t : SGD settings.
    beta_1, beta_2, epsilon : Adam settings.
    """

    def __init__(self, solver, n_params, dtype, learning_rate_init, lr_schedule="constant",
                 momentum=0.9, nesterov=True, power_t=0.5, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8):
        self.solver = solver
        self.set_hyperparameters(learning_rate_init, lr_schedule, momentum, nesterov,
                                 power_t, beta_1, beta_2, epsilon)
        # SGD: state_1 is the velocity. Adam: first and second moments.
        self.state_1 = np.zeros(n_params, dtype=dtype)
        self.state_2 = np.zeros(n_params if solver == "adam" else 1, dtype=dtype)
        self.step = np.zeros(1, dtype=np.longlong)  # Adam's t

    def set_hyperparameters(self, learning_rate_init, lr_schedule, momentum, nesterov,
                            power_t, beta_1, beta_2, epsilon):
        """Take new settings (the state arrays are kept); the rate restarts at its
        initial value."""
        self.learning_rate_init = float(learning_rate_init)
        self.learning_rate = float(learning_rate_init)
        self.lr_schedule = lr_schedule
        self.momentum = float(momentum) if self.solver == "sgd" else 0.0
        self.nesterov = bool(nesterov)
        self.power_t = float(power_t)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def compatible(self, solver, n_params, dtype):
        return (self.solver == solver and self.state_1.shape[0] == n_params
                and self.state_1.dtype == dtype)

    def _buffers(self, net, n_chunks, batch_size, sparse):
        """Per-chunk gradient and intercept-sum rows and per-thread workspaces (at most
        one thread per chunk), reused across epochs."""
        per_chunk = -(-batch_size // n_chunks)
        key = (n_chunks, per_chunk, net.layer_sizes, sparse)
        if getattr(self, "_buf_key", None) != key:
            ws = _core.workspace_size(net._sizes, per_chunk, not sparse)
            self._grads = np.empty((n_chunks, net.n_params), dtype=net.dtype)
            self._work = np.empty((n_chunks, ws), dtype=net.dtype)
            self._dacc = np.empty((n_chunks, net._n_intercepts), dtype=np.float64)
            self._buf_key = key
        return self._grads, self._work, self._dacc

    def epoch(self, net, theta, data, order, shuffle, seed, batch_size, alpha, n_chunks=1):
        """One pass over ``order``'s rows; returns the sum of batch loss x batch size.

        With ``n_chunks`` > 1 every minibatch is cut into that many chunks of rows, shared
        by a team of up to n_chunks threads (fewer while other work keeps cores busy; the
        result depends on n_chunks only); BLAS should then be limited to one thread (see
        ``_threads.minibatch_plan``).
        """
        grads, work, dacc = self._buffers(net, n_chunks, batch_size, data.X is None)
        n_threads, spin = team_for_now(n_chunks)
        total, n_batches = _core.run_epoch(
            theta, grads, data.X, data.data, data.indices, data.indptr, data.Y,
            data.sample_weight, net._sizes, net._w_off, net._b_off, net._act, net._out,
            work, dacc, order, shuffle, seed, batch_size, float(alpha),
            _core.SOLVERS[self.solver], self.learning_rate, self.momentum, self.nesterov,
            self.beta_1, self.beta_2, self.epsilon, self.state_1, self.state_2, self.step,
            n_chunks, n_threads, spin)
        return total

    def iteration_ends(self, time_step):
        """Learning-rate schedule at the end of an epoch (``time_step``: samples seen)."""
        if self.solver == "sgd" and self.lr_schedule == "invscaling":
            self.learning_rate = self.learning_rate_init / (time_step + 1) ** self.power_t

    def trigger_stopping(self, msg, verbose):
        """True when training should stop; 'adaptive' SGD divides the rate by 5 first."""
        if self.solver != "sgd" or self.lr_schedule != "adaptive":
            if verbose:
                print(msg + " Stopping.")
            return True
        if self.learning_rate <= 1e-6:
            if verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self.learning_rate /= 5.0
        if verbose:
            print(msg + f" Setting learning rate to {self.learning_rate:f}")
        return False
