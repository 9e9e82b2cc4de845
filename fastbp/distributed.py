"""Data-parallel full-batch training on a Dask cluster.

The rows stay on the workers, in the chunks of a Dask array, rechunked so that every
chunk holds whole blocks of rows (2048 by default). Every evaluation the solver asks for
(loss and gradient, a curvature product, the Fisher diagonal) scatters theta to the
workers once, runs fastbp's kernels on every chunk, and brings back one exact sum per
chunk: the same fixed-point accumulator the kernels use between threads (32 bytes per
parameter). The driver merges them exactly and finishes them with the same compiled code
as a local evaluation, so the result is bitwise the one process would compute: same
losses, same gradients, same fit. Chunks are produced by tasks, so a worker that dies
costs their recomputation from the task graph, not the fit.

Estimators use this module when ``X`` is a Dask array or ``backend='dask'``; see
:class:`DaskObjective` for direct use.
"""
import asyncio
import contextlib
import time
import uuid

import numpy as np

from . import _core
from ._objective import ObjectiveFailure
from ._network import Network
from ._threads import _dask_worker_threads

__all__ = ["ClusterError", "DaskObjective", "is_dask_collection", "get_client",
           "block_aligned_chunks"]

# Seconds without any worker before an evaluation gives up (the cluster is unusable).
WORKER_TIMEOUT = 60.0
# How often a waiting evaluation checks on the cluster, in seconds.
POLL = 1.0
# Times an evaluation is resubmitted after its scattered inputs were lost.
RETRIES = 3
# With more chunks than this, chunk sums are merged pairwise on the workers first.
TREE_FANIN = 4


class _Lost(Exception):
    """An evaluation's scattered inputs died with their last worker: resubmit."""


def _describe(exc):
    """An exception in one line: its type, and its first line or, for cancelled
    futures, why they were cancelled (Dask's own text lists every future)."""
    reasons = sorted({str(g.reason) for g in getattr(exc, "error_groups", ())})
    text = (f"futures cancelled ({', '.join(reasons)})" if reasons
            else (str(exc).splitlines() or [""])[0])
    return f"{type(exc).__name__}: {text}"


class ClusterError(ObjectiveFailure):
    """The Dask cluster could not finish an evaluation.

    Raised by ``fit`` when the scheduler is gone, no worker has been alive for
    ``fastbp.distributed.WORKER_TIMEOUT`` seconds, or a task failed on every worker it
    was tried on. The model keeps the best parameters evaluated before the failure.

    Attributes
    ----------
    args : tuple
        The message: what failed, and that the model keeps its best parameters.

    Examples
    --------
    >>> from fastbp.distributed import ClusterError
    >>> issubclass(ClusterError, RuntimeError)
    True
    """


def _stopped(what):
    """The ClusterError for ``what`` went wrong: training stops, the model keeps its best
    parameters (the estimators restore them)."""
    return ClusterError(f"{what}; training stopped and the model keeps its best parameters "
                        "so far")


def is_dask_collection(x):
    """True for a Dask array (without importing Dask when it is not loaded).

    Parameters
    ----------
    x : object

    Returns
    -------
    bool

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

    Parameters
    ----------
    client : distributed.Client or None

    Returns
    -------
    distributed.Client

    Raises
    ------
    ValueError
        When there is no client to use.

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


def _worker_net(spec):
    net = _NETS.get(spec)
    if net is None:
        sizes, activation, output, dtype = spec
        # The nanny limits BLAS and OpenMP to one thread by default; fastbp's own threads
        # (one per thread the worker was given) still use the worker's cores.
        net = _NETS[spec] = Network(list(sizes), activation=activation, output=output,
                                    dtype=dtype, n_jobs=_dask_worker_threads())
    return net


def _part(net, token, index, sub, x, y, sw, rows, block):
    """Prepared data of one chunk (or of its rows ``rows`` of the curvature subsample
    ``sub``, in blocks of ``block`` rows), cached for the fit ``token``."""
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
        d.block = block
        if sub is not None:  # keep the full chunk and the current subsample only
            for key in [k for k in cache if k is not None]:
                del cache[key]
        cache[sub] = d
    return d


def _chunk_task(kind, spec, token, index, sub, rows, block, x, y, sw, theta, v, scale,
                exact):
    """One chunk's exact share of an evaluation (kind: 'loss', 'grad', 'curvature',
    'fisher' or 'weight'): accumulator words, see ``_core.accumulator_size``."""
    net = _worker_net(spec)
    d = _part(net, token, index, sub, x, y, sw, rows, block)
    if kind == "weight":
        if d.sample_weight is None:
            return _core.sum_words(np.array([float(d.n_samples)]))
        return _core.sum_words(d.sample_weight)
    acc = np.empty(_core.accumulator_size(net.n_params), dtype=np.int64)
    out = np.empty(net.n_params, dtype=net.dtype)
    if kind == "loss":
        net._loss_grad(theta, d, 0.0, None, scale=scale, acc=acc)
        return acc[-2 * _core.ACC_WORDS:]  # the loss and the failure count only
    if kind == "grad":
        net._loss_grad(theta, d, 0.0, out, scale=scale, acc=acc)
    elif kind == "curvature":
        net._curvature(theta, v, d, 0.0, exact, out, scale=scale, acc=acc)
    else:
        net._fisher(theta, d, out, scale=scale, acc=acc)
    return acc


def _merge_task(a, b):
    out = np.array(a, copy=True)
    _core.merge_accumulators(out, b)
    return out


def _forget(token):
    for key in [k for k in _PARTS if k[0] == token]:
        del _PARTS[key]


# --- Driver side --------------------------------------------------------------------------

def block_aligned_chunks(chunks, block):
    """Row chunk sizes near ``chunks`` whose boundaries fall on multiples of ``block``.

    Parameters
    ----------
    chunks : tuple of int
        A Dask array's row chunks.
    block : int
        Rows per block.

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> from fastbp.distributed import block_aligned_chunks
    >>> block_aligned_chunks((3000, 3000, 1000), 2048)
    (2048, 4096, 856)
    """
    n = int(sum(chunks))
    cuts = set()
    for c in np.cumsum(chunks)[:-1]:
        cut = int(round(c / block)) * block
        if 0 < cut < n:
            cuts.add(cut)
    bounds = [0] + sorted(cuts) + [n]
    return tuple(int(b - a) for a, b in zip(bounds, bounds[1:]))


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
        # Whole blocks per chunk: every chunk's blocks are then the blocks one process
        # would form, and the sums agree bitwise.
        self._block = net._block_for(X.shape[0])  # as one process would cut the rows
        row_chunks = block_aligned_chunks(X.chunks[0], self._block)
        X = X.rechunk({0: row_chunks, 1: -1})
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
        self.weight_sum = self._exact_sum(self._map("weight"))
        self.l2 = self.alpha / self.weight_sum

    # Evaluations -------------------------------------------------------------------------

    def blas_guard(self):
        """A do-nothing context: the driver does no heavy work (workers limit BLAS)."""
        return contextlib.nullcontext()

    def _scatter(self, arr):
        """Send arr to every worker. Scattering needs a worker: give up with a
        ClusterError after WORKER_TIMEOUT seconds without one."""
        arr = np.ascontiguousarray(arr)
        deadline = time.monotonic() + WORKER_TIMEOUT
        while True:
            # A client that knows its scheduler is gone would still try to reach it
            # for Dask's whole connect timeout: give up at once instead.
            self._check_scheduler()
            try:
                # The scheduler waits for a worker up to the timeout (Dask's default is
                # the client's connect timeout, not WORKER_TIMEOUT).
                return self.client.scatter(
                    arr, broadcast=True, hash=False,
                    timeout=max(0.01, deadline - time.monotonic()))
            except Exception as exc:  # no worker yet, or one left while we sent
                self._check_scheduler(exc)
                if time.monotonic() >= deadline:
                    raise _stopped(f"the Dask cluster has had no workers for "
                                   f"{WORKER_TIMEOUT:g} s") from None
                time.sleep(POLL)

    def _check_scheduler(self, exc=None):
        """Raise ClusterError when the client has lost its scheduler (an O(1) check of
        the client's state). Dask then cancels every future of the fit, the data chunks
        too, so resubmitting cannot help."""
        if self.client.status != "running":
            cause = f" ({_describe(exc)})" if exc is not None else ""
            raise _stopped(f"lost the Dask scheduler during training{cause}") from exc

    def _theta(self, theta):
        # theta is scattered once per point: repeated products at one point reuse it.
        if self._theta_key is None or not np.array_equal(self._theta_key[0], theta):
            self._theta_key = (theta.copy(), self._scatter(theta))
        return self._theta_key[1]

    def _map(self, kind, theta=None, v=None, exact=False):
        """Run kind on every chunk; returns the results in chunk order.

        Chunks lost with a worker are recomputed by the scheduler. Scattered vectors lost
        with the last worker holding them are scattered again (up to RETRIES times)."""
        scale = self._scale() if kind != "weight" else None
        for attempt in range(RETRIES + 1):
            t = self._theta(theta) if theta is not None else None
            vf = self._scatter(v) if v is not None else None
            futures = [
                self.client.submit(_chunk_task, kind, self._spec, self._token, i,
                                   self._sub, self._rows[i], self._block, self._x[i],
                                   self._y[i], self._sw[i], t, vf, scale, exact,
                                   pure=False)
                for i in range(self.n_chunks)]
            if kind != "weight":
                futures = self._tree(futures)
            try:
                return self._gather(futures)
            except _Lost:
                self._theta_key = None
                if attempt == RETRIES:
                    times = "once" if RETRIES == 0 else f"{RETRIES + 1} times"
                    raise _stopped(f"the Dask cluster lost this evaluation's inputs "
                                   f"{times} (workers keep dying)") from None

    def _tree(self, futures):
        """Merge chunk sums pairwise on the workers while more than TREE_FANIN remain:
        the driver then receives at most TREE_FANIN accumulators, whatever the number of
        chunks (exact sums merge in any order)."""
        while len(futures) > TREE_FANIN:
            pairs = [futures[i:i + 2] for i in range(0, len(futures), 2)]
            futures = [self.client.submit(_merge_task, *p, pure=False) if len(p) == 2
                       else p[0] for p in pairs]
        return futures

    def _gather(self, futures):
        from distributed import wait
        from distributed.client import FuturesCancelledError as CancelledError
        alone_since = None
        while True:
            try:
                done = wait(futures, timeout=POLL, return_when="ALL_COMPLETED")
            except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
                done = None
            except CancelledError as exc:
                # Cancelled by the client because it lost its scheduler, or by the
                # scheduler because scattered inputs died with their last worker.
                self._check_scheduler(exc)
                raise _Lost from None
            except Exception as exc:  # the client lost its scheduler
                raise _stopped(f"the Dask cluster failed during training "
                               f"({_describe(exc)})") from exc
            if done is not None:
                break
            self._check_scheduler()
            try:
                workers = self.client.scheduler_info().get("workers", {})
            except Exception as exc:
                raise _stopped(f"lost the Dask scheduler during training "
                               f"({_describe(exc)})") from exc
            if workers:
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > WORKER_TIMEOUT:
                raise _stopped(f"the Dask cluster has had no workers for "
                               f"{WORKER_TIMEOUT:g} s")
        failed = [f for f in futures if f.status != "finished"]
        if any(f.status == "cancelled" for f in failed):
            self._check_scheduler()
            raise _Lost
        if failed:
            exc = failed[0].exception()
            raise _stopped(f"a Dask task failed on the cluster ({_describe(exc)})")
        return self.client.gather(futures)

    def _scale(self):
        return 1.0 / self.weight_sum if self.weight_sum > 0 else 0.0

    @staticmethod
    def _exact_sum(words):
        total = np.zeros(_core.ACC_WORDS, dtype=np.int64)
        for w in words:
            _core.merge_accumulators(total, w)
        return float(_core.words_value(total))

    def _merge(self, parts):
        total = np.zeros(_core.accumulator_size(self.net.n_params), dtype=np.int64)
        tail = total[-len(parts[0]):]  # loss-only parts: the last two entries
        for p in parts:
            _core.merge_accumulators(tail, p)
        return total

    def loss_grad(self, theta, grad):
        """The loss at theta; the gradient into grad (network dtype) unless None.
        Bitwise what ``Network._loss_grad`` gives on all the rows in one process."""
        total = self._merge(self._map("grad" if grad is not None else "loss", theta))
        dacc = np.empty(self.net._n_intercepts)
        return float(_core.finish_loss_grad(total, theta, grad, dacc, self.net._sizes,
                                            self.net._w_off, self.net._b_off,
                                            self._scale(), self.alpha))

    def curvature(self, theta, v, exact, out):
        """Gauss-Newton (or Hessian) times v into out, with the L2 term."""
        total = self._merge(self._map("curvature", theta, v=v, exact=exact))
        dacc = np.empty(self.net._n_intercepts)
        _core.finish_product(total, v, out, dacc, self.net._sizes, self.net._w_off,
                             self.net._b_off, self._scale(), self.l2 * self.weight_sum)
        return out

    def fisher(self, theta, out):
        """Diagonal of the empirical Fisher of the data term into out."""
        _core.finish_sums(self._merge(self._map("fisher", theta)), out)
        return out

    def subsample(self, rows, block=None):
        """The objective on the rows ``rows`` (sorted global indices), in blocks of
        ``block`` rows: every chunk takes its own rows; curvature and Fisher are then
        averaged over these rows."""
        sub = DaskObjective(self.client, self.net, None, None, None, 0.0, _parent=self)
        sub._token, sub._x, sub._y, sub._sw = self._token, self._x, self._y, self._sw
        sub._offsets, sub.n_chunks = self._offsets, self.n_chunks
        sub.n_samples, sub.l2 = len(rows), self.l2
        sub._block = block if block is not None else self.net._block_for(len(rows))
        cuts = np.searchsorted(rows, self._offsets)
        sub._rows = [rows[cuts[i]:cuts[i + 1]] - self._offsets[i]
                     for i in range(self.n_chunks)]
        sub._sub = uuid.uuid4().hex
        sub.weight_sum = sub._exact_sum(sub._map("weight"))
        if not sub.weight_sum > 0:  # a draw of zero weights only: weigh rows equally
            sub._sw = [None] * self.n_chunks
            sub._sub = uuid.uuid4().hex
            sub.weight_sum = float(len(rows))
        return sub

    def close(self):
        """Drop the cached chunks on the workers and release the data."""
        # Without its scheduler the client would try to reach it for Dask's whole
        # connect timeout; the workers' caches are then gone or unreachable anyway.
        if self.client.status == "running":
            try:
                self.client.run(_forget, self._token)
            except Exception:  # the cluster may already be gone
                pass
        self._x = self._y = self._sw = []
        self._theta_key = None
