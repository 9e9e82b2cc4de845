"""The full-batch driver over SciPy's optimizers.

``fit_full_batch`` runs SciPy's L-BFGS-B, TNC, Newton-CG or trust-krylov with
``jac=True`` on the flat parameter vector (the last two with exact curvature products as
``hessp``), on any full-batch objective (``_objective.LocalObjective`` or
``distributed.DaskObjective``). SciPy works in float64; a float32 model converts at that
boundary only.

Drivers never pack or unpack: they write into ``theta`` in place, so the estimator's
``coefs_``/``intercepts_`` views stay valid. The other drivers are ``_hessian_free``
(full batch) and ``_stochastic`` (minibatch SGD and Adam).
"""
import math
import warnings

import numpy as np
import scipy.optimize
from sklearn.exceptions import ConvergenceWarning

from ._divergence import BestTracker, diverged
from ._objective import ObjectiveFailure

__all__ = ["fit_full_batch", "FULL_BATCH"]


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
    iteration to ``loss_curve`` and calls ``progress(n_iter, loss)`` when given, with
    ``theta`` holding that iteration's parameters; a true result stops the solver there
    (without a convergence warning). On
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
    best = BestTracker(theta)
    last = {"x": None, "loss": math.inf, "stop": False}
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
            theta[...] = x  # the model shows this iterate to whoever watches
            if progress(n_iter, float(loss)):
                last["x"], last["loss"], last["stop"] = np.array(x, dtype=np.float64), \
                    loss, True
                raise _StopSolver
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
        raise diverged(f"during {solver} (iteration {n_iter + 1})") from None
    if res is None:  # stopped from the callback: keep the last iterate
        x_final, loss_final = last["x"], last["loss"]
        status, message = 1, "maximum number of iterations reached"
        if last["stop"]:
            status, message = 0, "stopped at progress's request"
    else:
        x_final, loss_final = res.x, float(res.fun)
        status, message = res.status, res.message
    if not (math.isfinite(loss_final) and np.isfinite(x_final).all()):
        theta[...] = best.theta
        raise diverged(f"during {solver} (iteration {n_iter})")
    theta[...] = x_final
    # TNC's statuses 1 and 2 are convergence in f and in x.
    converged = (last["stop"] or res is not None
                 and (status == 0 or (solver == "tnc" and status in (1, 2))))
    if not converged:
        warnings.warn(
            f"{solver} failed to converge after {n_iter} iteration(s) (status={status}): "
            f"{message}. Increase max_iter or max_fun, or scale the data.",
            ConvergenceWarning,
        )
    return loss_final, n_iter
