"""Data-parallel full-batch training on a Dask cluster.

The rows stay on the workers, in the chunks of a Dask array. Every evaluation the solver
asks for (loss and gradient, a curvature product, the Fisher diagonal) scatters theta to
the workers once, runs fastbp's kernels on every chunk, and brings back one float64
vector per chunk: that chunk's share of the sum, already divided by the total sample
weight. The driver adds the shares in chunk order (the same order every time), adds the
L2 term, and runs the optimizer. Chunks are produced by tasks, so a worker that dies
costs their recomputation from the task graph, not the fit.

Estimators use this module when ``X`` is a Dask array or ``backend='dask'``; see
:class:`DaskObjective` for direct use.
"""
import time
import uuid

import numpy as np

from ._objective import ObjectiveFailure
from ._network import Network

__all__ = ["ClusterError", "DaskObjective", "is_dask_collection", "get_client"]

# Seconds without any worker before an evaluation gives up (the cluster is unusable).
WORKER_TIMEOUT = 60.0
# How often a waiting evaluation checks on the cluster, in seconds.
POLL = 1.0


class ClusterError(ObjectiveFailure):
    """The Dask cluster could not finish an evaluation.

    Raised by ``fit`` when the scheduler is gone, no worker has been alive for
    ``fastbp.distributed.WORKER_TIMEOUT`` seconds, or a task failed on every worker it
    was tried on. The model keeps the best parameters evaluated before the failure.

    Examples
    --------
    >>> from fastbp.distributed import ClusterError
    >>> issubclass(ClusterError, RuntimeError)
    True
    """


def is_dask_collection(x):
    """True for a Dask array (without importing Dask when it is not loaded).

    Examples
    --------
    >>> import numpy as np
    >>> from fastbp.distributed import is_dask_collection
    >>> is_dask_collection(np.zeros(3))
    False
    """
    mod = type(x).__module__
    return mod.startswith("dask.") and hasattr(x, "__dask_graph__")


def get_client(client=None):
    """The client to use: the one given, else the active ``dask.distributed`` client.

    Examples
    --------
    >>> from fastbp.distributed import get_client
    >>> try:
    ...     get_client()
    ... except ValueError as exc:
    ...     print("no client:", "Client" in str(exc))
    no client: True
    """
    try:
        from distributed import default_client
    except ImportError as exc:  # pragma: no cover - dask is a declared extra
        raise ImportError("Dask training needs dask.distributed: "
                          "pip install 'fastbp[dask]'") from exc
    if client is not None:
        return client
    try:
        return default_client()
    except ValueError:
        raise ValueError(
            "Dask training needs a dask.distributed Client: create one "
            "(distributed.Client(address)) or pass client= to fit") from None


# --- Worker side --------------------------------------------------------------------------
# Each worker process keeps one Network per architecture (with its workspaces) and the
# prepared chunks of the running fits (with the forward-activation caches of curvature
# products), so that repeated evaluations allocate nothing new.

_NETS = {}
_PARTS = {}


def _worker_threads():
    try:
        from distributed import get_worker
        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return None


def _worker_net(spec):
    net = _NETS.get(spec)
    if net is None:
        sizes, activation, output, dtype = spec
        # The nanny limits BLAS and OpenMP to one thread by default; fastbp's own threads
        # (one per thread the worker was given) still use the worker's cores.
        net = _NETS[spec] = Network(list(sizes), activation=activation, output=output,
                                    dtype=dtype, n_jobs=_worker_threads())
    return net


def _part(net, token, index, sub, x, y, sw, rows):
    """Prepared data of one chunk (or of its rows ``rows`` of the curvature subsample
    ``sub``), cached for the fit ``token``."""
    cache = _PARTS.setdefault((token, index), {})
    d = cache.get(sub)
    if d is None:
        if rows is not None:
            x, y = x[rows], y[rows]
            sw = None if sw is None else sw[rows]
        zero = sw is not None and not np.asarray(sw).sum() > 0
        d = net.prepare(x, y, None if zero else sw)
        if zero:  # rows of weight zero only: a valid chunk that adds nothing
            d.sample_weight = np.zeros(d.n_samples)
            d.weight_sum = 0.0
        if sub is not None:  # keep the full chunk and the current subsample only
            for key in [k for k in cache if k is not None]:
                del cache[key]
        cache[sub] = d
    return d


def _chunk_task(kind, spec, token, index, sub, rows, x, y, sw, theta, v, scale, exact):
    """One chunk's float64 share of an evaluation (kind: 'loss', 'grad', 'curvature',
    'fisher' or 'weight')."""
    net = _worker_net(spec)
    d = _part(net, token, index, sub, x, y, sw, rows)
    if kind == "weight":
        return d.weight_sum if d.sample_weight is not None else float(d.n_samples)
    if kind == "loss":
        return net._loss_grad(theta, d, 0.0, None, scale=scale)
    out = np.empty(net.n_params, dtype=net.dtype)
    if kind == "grad":
        loss = net._loss_grad(theta, d, 0.0, out, scale=scale)
        return loss, out.astype(np.float64)
    if kind == "curvature":
        net._curvature(theta, v, d, 0.0, exact, out, scale=scale)
    else:
        net._fisher(theta, d, out, scale=scale)
    return out.astype(np.float64)


def _forget(token):
    for key in [k for k in _PARTS if k[0] == token]:
        del _PARTS[key]


# --- Driver side --------------------------------------------------------------------------

class DaskObjective:
    """The full-batch objective over row-chunked Dask arrays, evaluated on the cluster.

    Parameters
    ----------
    client : distributed.Client
    net : fastbp.Network
    X : dask.array.Array of shape (n_samples, n_features)
        Chunked along rows only (other chunkings are rechunked).
    Y : dask.array.Array of shape (n_samples, n_outputs)
        Targets in the network's form (one-hot rows for softmax, and so on).
    sample_weight : dask.array.Array of shape (n_samples,) or None
    alpha : float
        L2 penalty, as for ``Network.loss_grad``.

    Attributes
    ----------
    n_samples, weight_sum : int, float
    n_chunks : int

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from distributed import Client, LocalCluster
    >>> import fastbp
    >>> from fastbp.distributed import DaskObjective
    >>> with LocalCluster(n_workers=1, processes=False) as cluster, \\
    ...         Client(cluster) as client:
    ...     net = fastbp.Network([3, 1], output="identity")
    ...     theta = net.init_params(random_state=0)
    ...     X = np.random.default_rng(0).normal(size=(40, 3)); Y = X[:, :1] * 2.0
    ...     obj = DaskObjective(client, net, da.from_array(X, chunks=10),
    ...                         da.from_array(Y, chunks=10), None, alpha=0.0)
    ...     loss = obj.loss_grad(theta, None)
    ...     obj.close()
    >>> bool(np.isclose(loss, net.loss_grad(theta, X, Y)[0]))
    True
    """

    def __init__(self, client, net, X, Y, sample_weight, alpha, _parent=None):
        self.client = client
        self.net = net
        self.alpha = float(alpha)
        self._spec = (tuple(net.layer_sizes), net.activation, net.output,
                      np.dtype(net.dtype).name)
        self._theta_key = None
        if _parent is not None:  # a curvature subsample (see subsample)
            return
        self._token = uuid.uuid4().hex
        X = X.rechunk({1: -1})
        row_chunks = X.chunks[0]
        Y = Y.rechunk({0: row_chunks, 1: -1})
        parts = [X.to_delayed().ravel().tolist(), Y.to_delayed().ravel().tolist()]
        if sample_weight is not None:
            parts.append(sample_weight.rechunk({0: row_chunks}).to_delayed().ravel()
                         .tolist())
        # Futures of computed chunks: rebuilt from the graph if their worker dies.
        futures = client.compute(sum(parts, []))
        n = len(row_chunks)
        self._x, self._y = futures[:n], futures[n:2 * n]
        self._sw = futures[2 * n:] if sample_weight is not None else [None] * n
        self._offsets = np.concatenate([[0], np.cumsum(row_chunks)])
        self.n_samples = int(self._offsets[-1])
        self.n_chunks = n
        self._rows = [None] * n
        self._sub = None
        self.weight_sum = float(sum(self._map("weight")))
        self.l2 = self.alpha / self.weight_sum

    # Evaluations -------------------------------------------------------------------------

    def blas_guard(self):
        import contextlib
        return contextlib.nullcontext()  # the driver does no heavy work

    def _scatter(self, arr):
        return self.client.scatter(np.ascontiguousarray(arr), broadcast=True, hash=False)

    def _theta(self, theta):
        # theta is scattered once per point: repeated products at one point reuse it.
        if self._theta_key is None or not np.array_equal(self._theta_key[0], theta):
            self._theta_key = (theta.copy(), self._scatter(theta))
        return self._theta_key[1]

    def _map(self, kind, theta=None, v=None, exact=False):
        """Run kind on every chunk; returns the results in chunk order."""
        scale = 1.0 / self.weight_sum if kind != "weight" else None
        t = self._theta(theta) if theta is not None else None
        vf = self._scatter(v) if v is not None else None
        futures = [
            self.client.submit(_chunk_task, kind, self._spec, self._token, i, self._sub,
                               self._rows[i], self._x[i], self._y[i], self._sw[i], t, vf,
                               scale, exact, pure=False)
            for i in range(self.n_chunks)]
        return self._gather(futures)

    def _gather(self, futures):
        from distributed import wait
        alone_since = None
        while True:
            try:
                done = wait(futures, timeout=POLL, return_when="ALL_COMPLETED")
            except TimeoutError:
                done = None
            except Exception as exc:  # the client lost its scheduler
                raise ClusterError(f"the Dask cluster failed during training: {exc!r}") \
                    from exc
            if done is not None:
                break
            try:
                workers = self.client.scheduler_info().get("workers", {})
            except Exception as exc:
                raise ClusterError(f"lost the Dask scheduler during training: {exc!r}") \
                    from exc
            if workers:
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > WORKER_TIMEOUT:
                raise ClusterError(
                    f"the Dask cluster has had no workers for {WORKER_TIMEOUT:g} s; "
                    "training stopped and the model keeps its best parameters so far")
        failed = [f for f in futures if f.status != "finished"]
        if failed:
            exc = failed[0].exception()
            raise ClusterError(f"a Dask task failed ({failed[0].status}): {exc!r}")
        return self.client.gather(futures)

    def _add(self, parts):
        out = np.array(parts[0], dtype=np.float64)
        for p in parts[1:]:
            out += p
        return out

    def loss_grad(self, theta, grad):
        """The loss at theta; the gradient into grad (network dtype) unless None."""
        n_coef = self.net._b_off[0]
        w = theta[:n_coef].astype(np.float64)
        penalty = 0.5 * self.alpha / self.weight_sum * float(w @ w)
        if grad is None:
            return sum(self._map("loss", theta)) + penalty
        parts = self._map("grad", theta)
        loss = 0.0
        for part_loss, _ in parts:
            loss += part_loss
        g = self._add([p for _, p in parts])
        g[:n_coef] += self.l2 * w
        grad[...] = g
        return loss + penalty

    def curvature(self, theta, v, exact, out):
        """Gauss-Newton (or Hessian) times v into out: summed chunk products plus the
        L2 term."""
        n_coef = self.net._b_off[0]
        prod = self._add(self._map("curvature", theta, v=v, exact=exact))
        prod[:n_coef] += self.l2 * v[:n_coef]
        out[...] = prod
        return out

    def fisher(self, theta, out):
        """Diagonal of the empirical Fisher of the data term into out."""
        out[...] = self._add(self._map("fisher", theta))
        return out

    def subsample(self, rows):
        """The objective on the rows ``rows`` (sorted global indices): every chunk takes
        its own rows; curvature and Fisher are then averaged over these rows."""
        sub = DaskObjective(self.client, self.net, None, None, None, 0.0, _parent=self)
        sub._token, sub._x, sub._y, sub._sw = self._token, self._x, self._y, self._sw
        sub._offsets, sub.n_chunks = self._offsets, self.n_chunks
        sub.n_samples, sub.l2 = len(rows), self.l2
        cuts = np.searchsorted(rows, self._offsets)
        sub._rows = [rows[cuts[i]:cuts[i + 1]] - self._offsets[i]
                     for i in range(self.n_chunks)]
        sub._sub = uuid.uuid4().hex
        sub.weight_sum = float(sum(sub._map("weight")))
        if not sub.weight_sum > 0:  # a draw of zero weights only: weigh rows equally
            sub._sw = [None] * self.n_chunks
            sub._sub = uuid.uuid4().hex
            sub.weight_sum = float(len(rows))
        return sub

    def close(self):
        """Drop the cached chunks on the workers and release the data."""
        try:
            self.client.run(_forget, self._token)
        except Exception:  # the cluster may already be gone
            pass
        self._x = self._y = self._sw = []
        self._theta_key = None
