"""The full-batch objective as the solvers see it.

A solver asks an objective for the loss and gradient, curvature products and the
empirical-Fisher diagonal at a point, and for the objective restricted to a subsample of
rows (Hessian-free's curvature batch). ``LocalObjective`` evaluates them in this process
with the kernels; ``fastbp.distributed.DaskObjective`` evaluates the same kernels on the
chunks of a Dask array and reduces the float64 sums in a fixed order. The solvers do not
know which one they drive.
"""
import scipy.sparse as sp

from ._threads import single_threaded_blas

__all__ = ["LocalObjective", "ObjectiveFailure"]


class ObjectiveFailure(RuntimeError):
    """The objective could not be evaluated (for example, the Dask cluster failed).

    Solvers catch it, put the best parameters evaluated so far back into the model and
    re-raise it.
    """


class LocalObjective:
    """``sum_i w_i loss_i / sum(w) + 0.5 * alpha * ||W||^2 / sum(w)`` on prepared data.

    ``l2`` is the curvature of the penalty (``alpha / sum(w)`` on the coefficients).
    ``subsample`` returns the objective on some rows whose data term is their weighted
    mean and whose penalty is the full objective's, so that its curvature approximates
    the full objective's.
    """

    def __init__(self, net, data, alpha, l2=None):
        self.net = net
        self.data = data
        self.alpha = float(alpha)
        self.n_samples = data.n_samples
        self.weight_sum = data.weight_sum
        self.l2 = self.alpha / data.weight_sum if l2 is None else float(l2)

    def blas_guard(self):
        """fastbp's threads use the cores, so BLAS gets one thread (set once for a
        whole run rather than per evaluation); see ``Network._blas_guard``."""
        return single_threaded_blas()

    def loss_grad(self, theta, grad):
        """The loss at theta (contiguous, network dtype); the gradient into grad unless
        grad is None."""
        return self.net._loss_grad(theta, self.data, self.alpha, grad)

    def surely_finite(self, theta):
        """True when a bound on the parameters (O(n_params), no pass over the data)
        proves the loss at theta finite; False means "cannot tell"."""
        return self.net.loss_is_surely_finite(theta, self.data, self.alpha)

    def curvature(self, theta, v, exact, out):
        """Gauss-Newton (or, with exact, Hessian) times v into out."""
        # The kernel's L2 term is alpha * scale: scale the penalty to this data's weights.
        return self.net._curvature(theta, v, self.data, self.l2 * self.weight_sum, exact,
                                   out)

    def fisher(self, theta, out):
        """Diagonal of the empirical Fisher of the data term, into out."""
        return self.net._fisher(theta, self.data, out)

    def subsample(self, rows, block=None):
        """The objective on ``rows`` (sorted indices), with this objective's penalty,
        processed in blocks of ``block`` rows (default: the network's)."""
        net, data = self.net, self.data
        if data.X is None:
            X = sp.csr_matrix((data.data, data.indices, data.indptr),
                              shape=(data.n_samples, net.layer_sizes[0]))[rows]
        else:
            X = data.X[rows]
        sw = None if data.sample_weight is None else data.sample_weight[rows]
        if sw is not None and not sw.sum() > 0:  # a draw of zero weights only
            sw = None
        sub = net.prepare(X, data.target_rows(rows, net.layer_sizes[-1]), sw)
        sub.block = block
        return LocalObjective(net, sub, 0.0, l2=self.l2)

    def close(self):
        """Nothing to release in this process."""
