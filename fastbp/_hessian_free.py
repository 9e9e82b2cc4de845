"""Hessian-free optimisation (Martens, 2010) over the flat parameter vector.

Each outer iteration:

1. draws a fixed curvature subsample S of the rows (all rows for small data sets), the
   same number from every block of rows (``draw_rows``);
2. builds the preconditioner ``M = (diag F_S + lambda + l2)^0.75`` from the diagonal of
   the empirical Fisher on S (one nogil kernel, ``_core.fisher_diag``);
3. solves ``(G_S + lambda I) p = -g`` approximately by preconditioned CG with
   Gauss-Newton products on S, warm-started from 0.95 x the previous solution, stopping
   on Martens' relative-progress test and keeping iterates on a 1.3^j schedule;
4. backtracks over the kept iterates (CG backtracking): the latest one whose full-batch
   loss is lowest;
5. adapts the damping lambda by the reduction ratio rho (x3/2 when rho < 1/4, x2/3 when
   rho > 3/4), then takes an Armijo step along the chosen direction.

The gradient and the loss are always full-batch; only the curvature is subsampled.
Vectors the solver keeps are float64; products run in the network's dtype.
"""
import math
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ._divergence import BestTracker, diverged
from ._objective import ObjectiveFailure


__all__ = ["HessianFreeState", "fit_hessian_free"]

# Rows of the curvature subsample: all rows up to this many, else a tenth of the rows
# (at least this many).
CURVATURE_MIN_ROWS = 4096
MAX_CG = 50  # CG iterations per outer iteration (Martens: 250; see the README)
CG_EPSILON = 5e-4  # relative-progress test
DECAY = 0.95  # warm start: CG starts from DECAY x the previous solution
PRECOND_EXPONENT = 0.75
ARMIJO = 1e-2
MAX_SHRINK = 30  # Armijo halvings (factor 0.8) before a step is rejected


class HessianFreeState:
    """What Hessian-free keeps between outer iterations and across warm starts: the
    damping ``lam`` and the previous CG solution ``direction``."""

    def __init__(self, n_params, lam=1.0):
        self.lam = float(lam)
        self.direction = np.zeros(n_params)

    def compatible(self, solver, n_params, dtype=None):
        return solver == "hessian-free" and self.direction.shape[0] == n_params


def draw_rows(rng, n, block, n_rows):
    """A curvature subsample of about ``n_rows`` rows, drawn evenly from every block.

    Every full block of ``block`` rows gives the same number k of random rows, the last
    (shorter) block proportionally fewer; the subsample is then processed in blocks of k
    rows, one per original block. So on a Dask cluster, where every chunk holds whole
    blocks, each chunk's share of the subsample forms the same blocks as in one process,
    and the curvature products are bitwise the same. Returns (sorted rows, k).
    """
    block = min(block, n)
    k = min(block, max(1, round(block * n_rows / n)))
    n_full, tail = divmod(n, block)
    keys = rng.random((n_full, block))
    rows = [np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)
            + (np.arange(n_full) * block)[:, None]] if n_full else []
    parts = [r.ravel() for r in rows]
    if tail:
        k_tail = min(tail, max(1, round(tail * k / block)))
        parts.append(n_full * block + np.sort(rng.permutation(tail)[:k_tail]))
    return np.concatenate(parts), k


def _cg_schedule(limit):
    """Iterations whose CG iterate is kept for backtracking: ceil(1.3^j)."""
    keep, j = set(), 0
    while True:
        i = math.ceil(1.3 ** j)
        if i > limit:
            return keep
        keep.add(i)
        j += 1



def _pcg(apply_a, g, x0, minv, max_iter):
    """Preconditioned CG on ``A x = -g`` from x0, with Martens' stopping test.

    Returns a list of ``(i, x_i, phi_i)`` for the kept iterates (the last one always
    included), where ``phi(x) = 0.5 x'Ax + g'x`` is the quadratic model's decrease.
    """
    keep = _cg_schedule(max_iter)
    b = -g
    x = x0.copy()
    r = b - apply_a(x) if x.any() else b.copy()
    phi = -0.5 * float(x @ (b + r))
    if phi >= 0:  # the warm start is no better than zero: start from zero
        x[...] = 0.0
        r = b.copy()
        phi = 0.0
    y = minv * r
    p = y.copy()
    ry = float(r @ y)
    phis = [phi]
    kept = []
    for i in range(1, max_iter + 1):
        ap = apply_a(p)
        pap = float(p @ ap)
        if not (pap > 0 and math.isfinite(pap)) or ry == 0.0:
            i -= 1
            break
        step = ry / pap
        x += step * p
        r -= step * ap
        phi = -0.5 * float(x @ (b + r))
        phis.append(phi)
        if i in keep:
            kept.append((i, x.copy(), phi))
        k = max(10, int(0.1 * i))
        if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * CG_EPSILON:
            break
        y = minv * r
        ry_new = float(r @ y)
        p = y + (ry_new / ry) * p
        ry = ry_new
    if not kept or kept[-1][0] != i:
        kept.append((i, x.copy(), phis[-1]))
    return kept


def fit_hessian_free(objective, theta, max_iter, tol, verbose, loss_curve,
                     progress=None, state=None, seed=0, curvature_rows=None):
    """Minimise a full-batch objective (``LocalObjective`` or ``DaskObjective``) from
    ``theta`` (updated in place) by Hessian-free optimisation. Returns
    ``(loss, n_iter, state)``.

    Stops when the largest gradient entry is at most ``tol`` (as L-BFGS's ``gtol``),
    after ``max_iter`` outer iterations (with a ConvergenceWarning), or when no step
    decreases the loss even under heavy damping. Appends the loss after each outer
    iteration to ``loss_curve`` and calls ``progress(n_iter, loss)``, which stops the
    solver by returning True. ``state`` (a
    ``HessianFreeState``) carries the damping and the last direction across warm
    starts. On Ctrl-C the best parameters evaluated so far are restored, with a warning.
    """
    net = objective.net
    n_params, n, dtype = net.n_params, objective.n_samples, net.dtype
    if state is None or not state.compatible("hessian-free", n_params):
        state = HessianFreeState(n_params)
    rng = np.random.default_rng(seed)
    if curvature_rows is None:
        curvature_rows = max(CURVATURE_MIN_ROWS, n // 10)
    curvature_rows = min(n, int(curvature_rows))
    n_coef = net._b_off[0]
    grad = np.empty(n_params, dtype=dtype)
    prod = np.empty(n_params, dtype=dtype)
    vec = np.empty(n_params, dtype=dtype)
    trial = np.empty(n_params, dtype=dtype)
    fisher = np.empty(n_params, dtype=dtype)
    best = BestTracker(theta)
    n_iter = 0
    converged = stalled = False

    try:
        with objective.blas_guard():
            loss = objective.loss_grad(theta, grad)
            if not math.isfinite(loss):
                raise diverged("at the starting point of hessian-free")
            best.offer(loss, theta)
            g = grad.astype(np.float64)
            while n_iter < max_iter:
                if np.abs(g).max() <= tol:
                    converged = True
                    break
                if curvature_rows < n:
                    rows, sub_block = draw_rows(rng, n, net._block_for(n), curvature_rows)
                    sub = objective.subsample(rows, sub_block)
                else:
                    sub = objective
                lam = state.lam
                diag = sub.fisher(theta, fisher).astype(np.float64)
                diag[:n_coef] += objective.l2  # the L2 term's curvature
                minv = (diag + lam) ** -PRECOND_EXPONENT

                def apply_a(v, lam=lam, sub=sub):
                    vec[...] = v
                    sub.curvature(theta, vec, False, prod)
                    return prod.astype(np.float64) + lam * v

                kept = _pcg(apply_a, g, DECAY * state.direction, minv, MAX_CG)
                state.direction = kept[-1][1]

                # CG backtracking: walk back from the last kept iterate while the
                # full-batch loss keeps falling.
                def loss_at(p, rate=1.0):
                    trial[...] = theta + rate * p
                    f = objective.loss_grad(trial, None)
                    best.offer(f, trial)
                    return f

                j = len(kept) - 1
                f_j = loss_at(kept[j][1])
                while j > 0:
                    f_prev = loss_at(kept[j - 1][1])
                    if not (f_prev < f_j) and math.isfinite(f_j):
                        break
                    j, f_j = j - 1, f_prev
                _, p, phi = kept[j]

                # Levenberg-Marquardt damping from the reduction ratio.
                rho = (f_j - loss) / phi if phi < 0 and math.isfinite(f_j) else -math.inf
                if rho < 0.25:
                    state.lam *= 1.5
                elif rho > 0.75:
                    state.lam *= 2.0 / 3.0

                # Armijo step along p.
                slope = float(g @ p)
                rate, f_new = 1.0, f_j
                for _ in range(MAX_SHRINK):
                    if math.isfinite(f_new) and f_new <= loss + ARMIJO * rate * slope:
                        break
                    rate *= 0.8
                    f_new = loss_at(p, rate)
                else:
                    rate = 0.0
                n_iter += 1
                if rate > 0.0 and slope < 0:
                    theta += (rate * p).astype(dtype)
                    loss = objective.loss_grad(theta, grad)
                    best.offer(loss, theta)
                    g = grad.astype(np.float64)
                else:
                    # No decrease: damp harder and restart CG from zero.
                    state.lam *= 1.5 ** 3
                    state.direction[...] = 0.0
                    if state.lam > 1e12:
                        stalled = True
                loss_curve.append(float(loss))
                if verbose:
                    print(f"Iteration {n_iter}, loss = {loss:.8f}, damping = "
                          f"{state.lam:.3g}, CG iterations = {kept[-1][0]}")
                if progress is not None and progress(n_iter, float(loss)):
                    break  # asked to stop: keep this iterate
                if stalled:
                    break
    except KeyboardInterrupt:
        warnings.warn("Training interrupted by user; the model keeps the best "
                      "parameters found so far.", UserWarning)
        theta[...] = best.theta
        return best.loss, n_iter, state
    except ObjectiveFailure:
        theta[...] = best.theta
        raise
    if not (math.isfinite(loss) and np.isfinite(theta).all()):
        theta[...] = best.theta
        raise diverged(f"during hessian-free (iteration {n_iter})")
    if not converged and n_iter >= max_iter or stalled:
        warnings.warn(
            f"hessian-free failed to converge after {n_iter} iteration(s): "
            + ("no step decreased the loss even with heavy damping."
               if stalled else "maximum number of iterations reached.")
            + " Increase max_iter, or scale the data.", ConvergenceWarning)
    return loss, n_iter, state
