"""The network: layer sizes, the flat parameter layout, workspaces and the objective.

The Python side validates, converts and allocates; the compiled kernels in ``_core``
compute. Solvers and estimators prepare their data once (``Network.prepare``) and then call
the kernels through ``Network._loss_grad`` without any per-call validation.
"""
import contextlib
import math
import threading
from numbers import Integral

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state

from . import _core
from ._threads import CACHE_LINE, effective_n_jobs, single_threaded_blas

__all__ = ["Network", "ACTIVATION_NAMES", "check_activation"]

_DTYPES = (np.float32, np.float64)
# Rows per block for full-batch passes. Fixed (it never depends on the thread count), so
# results are reproducible; large enough that the GEMMs run near peak, small enough that a
# block's activations stay in cache-friendly sizes and peak memory is bounded.
DEFAULT_BLOCK = 2048
# Small data sets: at most this many blocks, of at least MIN_BLOCK rows.
MAX_SPLIT = 8
MIN_BLOCK = 256


def aligned_empty(shape, dtype):
    """An uninitialised C-ordered array whose data starts on a cache line (64 bytes).
    Threads that own neighbouring ranges of such an array (the 'units' split of a
    minibatch) then share no cache line when their ranges start on line boundaries."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + CACHE_LINE, dtype=np.uint8)
    skip = -raw.ctypes.data % CACHE_LINE
    return raw[skip:skip + count * dtype.itemsize].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype):
    """``aligned_empty``, filled with zeros."""
    out = aligned_empty(shape, dtype)
    out[...] = 0
    return out


def block_rows(n_samples, block_size=DEFAULT_BLOCK):
    """Rows per block for a full-batch pass over n_samples rows: block_size, but small
    data sets are cut into up to 8 blocks of at least 256 rows, so that every core has
    work while BLAS is single-threaded. Depends on n_samples only (never on the thread
    count), so results do not depend on the number of threads."""
    return max(1, min(n_samples, block_size, max(MIN_BLOCK, -(-n_samples // MAX_SPLIT))))


_INIT_VALUES = 1 << 15  # weights drawn at a time by init_params (256 KiB of float64)


def _max_abs(a):
    """max |a|: NaN or infinity when a holds one; 0 if empty. A contiguous float32 or
    float64 array takes one pass of the kernels, any other array two NumPy reductions
    (max and min propagate NaN). No temporary array either way."""
    if a.size == 0:
        return 0.0
    if a.dtype in (np.float32, np.float64) and (a.flags.c_contiguous or a.flags.f_contiguous):
        return _core.max_abs(a.ravel(order="K"))
    return max(abs(float(a.max())), abs(float(a.min())))


# The hidden activations, in the kernels' code order.
ACTIVATION_NAMES = tuple(sorted(_core.ACTIVATIONS, key=_core.ACTIVATIONS.get))


def check_activation(activation, n_hidden):
    """Validate ``activation`` for a network with ``n_hidden`` hidden layers.

    A string names the activation of every hidden layer; a list or tuple gives one name
    per hidden layer. Returns ``(normalized, per_layer)``: the string as it is, or the
    names as a tuple; and the tuple of ``n_hidden`` names, layer by layer. Raises
    ValueError, naming what is wrong: an unknown name, an entry that is not a string, or
    a list of the wrong length.
    """
    known = sorted(ACTIVATION_NAMES)
    if isinstance(activation, str):
        if activation not in _core.ACTIVATIONS:
            raise ValueError(f"activation must be one of {known} (or a list of them, one "
                             f"per hidden layer), got {activation!r}")
        return str(activation), (str(activation),) * n_hidden
    if not isinstance(activation, (list, tuple)):
        raise ValueError(f"activation must be one of {known}, or a list or tuple of them "
                         f"with one per hidden layer; got {activation!r} of type "
                         f"{type(activation).__name__}")
    if len(activation) != n_hidden:
        raise ValueError(f"activation lists {len(activation)} name(s), but the network has "
                         f"{n_hidden} hidden layer(s): give one name per hidden layer, or "
                         "one string for all of them")
    names = []
    for i, name in enumerate(activation):
        if not isinstance(name, str):
            raise ValueError(f"activation[{i}] must be a string, one of {known}; got "
                             f"{name!r} of type {type(name).__name__}")
        if name not in _core.ACTIVATIONS:
            raise ValueError(f"activation[{i}] must be one of {known}, got {name!r}")
        names.append(str(name))
    return tuple(names), tuple(names)


class _Data:
    """Kernel-ready (X, Y, sample_weight): converted once, reused by every evaluation.

    Targets are dense ``Y``, or CSR arrays ``y_data``, ``y_indices``, ``y_indptr`` (with
    Y None): the kernels read sparse targets one row at a time (an autoencoder of sparse
    X never densifies it)."""

    __slots__ = ("X", "data", "indices", "indptr", "Y", "sample_weight", "n_samples",
                 "weight_sum", "acts", "acts_theta", "block", "x_max", "y_max",
                 "y_data", "y_indices", "y_indptr", "x_check")

    def targets(self):
        """The sparse-target keyword arguments of the kernel entry points."""
        return {"y_data": self.y_data, "y_indices": self.y_indices,
                "y_indptr": self.y_indptr}

    def target_rows(self, rows, n_outputs):
        """Targets of ``rows`` (an index array): dense rows, or a CSR matrix of them."""
        if self.Y is not None:
            return self.Y[rows]
        return sp.csr_matrix((self.y_data, self.y_indices, self.y_indptr),
                             shape=(self.n_samples, n_outputs))[rows]


class Network:
    """A dense multilayer perceptron over one flat parameter vector.

    The parameters of all layers live in one contiguous 1-D array ``theta``, in
    scikit-learn's packing order: each layer's coefficient matrix of shape
    ``(fan_in, fan_out)``, row-major, layer by layer, then each intercept vector, layer by
    layer. So ``theta`` and ``np.hstack([c.ravel() for c in coefs + intercepts])`` are
    interchangeable, and the gradient has the same layout.

    Parameters
    ----------
    layer_sizes : sequence of int
        Units per layer, input and output included: ``(n_features, *hidden, n_outputs)``.
        At least two entries; a network with no hidden layer is a linear model.
    activation : str or list of str, default='relu'
        Activation of the hidden layers: 'identity', 'logistic', 'tanh', 'relu',
        'leaky_relu' (``x``, or ``0.01 x`` below 0), 'elu' (``x``, or ``e^x - 1`` below
        0), 'gelu' (``x Phi(x)``, exact, with erf), 'silu' (``x sigmoid(x)``) or
        'softplus' (``log(1 + e^x)``, computed without overflow). A string applies to
        every hidden layer; a list or tuple gives one name per hidden layer, in order
        (``len(layer_sizes) - 2`` names). Gradients, curvature products and the Fisher
        diagonal are exact for each of them.
    output : {'softmax', 'logistic', 'identity', 'exp'}, default='softmax'
        Output activation, which fixes the loss: multinomial log-loss, binary log-loss per
        column, squared error, or half Poisson deviance.
    dtype : {numpy.float64, numpy.float32}, default=numpy.float64
        Precision of the parameters and of the kernels. Losses and intercept-gradient
        sums are always accumulated in float64.
    block_size : int, default=2048
        Rows per block in full-batch passes; memory use grows with it, results do not
        depend on it beyond floating-point rounding.
    n_jobs : int or None, default=None
        Threads for full-batch passes (``loss_grad``, ``forward``). None: as many as
        OpenMP may use (``omp_get_max_threads()``: ``OMP_NUM_THREADS``, threadpoolctl's
        ``openmp`` limits, joblib's worker limits), or the Dask worker's thread count
        inside a Dask worker; -1: every CPU this process may run on; -2: all but one,
        and so on. Threads take blocks of
        rows; each block's sums are added exactly into fixed-point accumulators (32
        bytes per parameter and thread), so the results are bitwise identical for any
        ``n_jobs``, and for any split of the rows at block boundaries (Dask chunks).
        While more than one block is processed,
        BLAS runs single-threaded (the threads are fastbp's), so cores are never
        oversubscribed.

    Attributes
    ----------
    layer_sizes : tuple of int
    activation : str or tuple of str
        As given: a string, or a tuple of one name per hidden layer.
    n_layers : int
        Number of weight layers (``len(layer_sizes) - 1``).
    n_params : int
        Length of the flat parameter vector.

    Notes
    -----
    The objective is scikit-learn's: the sample-weighted mean of the per-sample loss plus
    ``0.5 * alpha * sum(||W_l||^2) / sum(weights)``; intercepts are not penalised. Per
    sample, the losses are:

    - softmax: ``-sum_k y_k log p_k``;
    - logistic: ``-sum_k [y_k log p_k + (1 - y_k) log(1 - p_k)]``;
    - identity: ``0.5 * sum_k (yhat_k - y_k)^2``, summed (not averaged) over outputs.
      For one output this equals scikit-learn's ``squared_error``; with several outputs
      scikit-learn reports the mean over outputs but steps along the gradient of the sum,
      so fastbp's loss is the sum, whose exact gradient is the step scikit-learn takes;
    - exp: ``sum_k [yhat_k - y_k log yhat_k + y_k log y_k - y_k]`` (half Poisson deviance).

    The losses are computed from the pre-activations (log-sum-exp, softplus), so they are
    exact where scikit-learn clips probabilities.

    Examples
    --------
    >>> import numpy as np
    >>> import fastbp
    >>> net = fastbp.Network([4, 8, 3], activation="tanh", output="softmax")
    >>> net.n_params
    67
    >>> theta = net.init_params(random_state=0)
    >>> X = np.random.default_rng(0).normal(size=(5, 4))
    >>> Y = np.eye(3)[[0, 1, 2, 1, 0]]
    >>> loss, grad = net.loss_grad(theta, X, Y, alpha=1e-4)
    >>> grad.shape
    (67,)
    >>> net.forward(theta, X).sum(axis=1).round(6)
    array([1., 1., 1., 1., 1.])

    One activation per hidden layer:

    >>> deep = fastbp.Network([4, 8, 6, 3], activation=["gelu", "tanh"])
    >>> deep.activation
    ('gelu', 'tanh')
    >>> loss, grad = deep.loss_grad(deep.init_params(random_state=0), X, Y)
    >>> grad.shape
    (115,)
    """

    def __init__(self, layer_sizes, activation="relu", output="softmax",
                 dtype=np.float64, block_size=DEFAULT_BLOCK, n_jobs=None):
        try:
            sizes = [int(s) for s in layer_sizes]
        except (TypeError, ValueError):
            raise TypeError(
                f"layer_sizes must be a sequence of integers, got {layer_sizes!r}"
            ) from None
        if len(sizes) < 2:
            raise ValueError(
                "layer_sizes needs at least two entries (inputs and outputs), "
                f"got {sizes}"
            )
        if any(s < 1 for s in sizes) or any(
            not isinstance(s, (Integral, np.integer)) and s != int(s)
            for s in layer_sizes
        ):
            raise ValueError(f"layer_sizes must be positive integers, got {sizes}")
        activation, per_layer = check_activation(activation, len(sizes) - 2)
        if output not in _core.OUTPUTS:
            raise ValueError(
                f"output must be one of {sorted(_core.OUTPUTS)}, got {output!r}"
            )
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if not isinstance(block_size, (Integral, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if n_jobs is not None and (not isinstance(n_jobs, (Integral, np.integer))
                                   or n_jobs == 0):
            raise ValueError(f"n_jobs must be None or a non-zero integer, got {n_jobs!r}")

        self.layer_sizes = tuple(sizes)
        self.activation = activation
        self.output = output
        self.dtype = dtype
        self.block_size = int(block_size)
        self.n_jobs = n_jobs
        self.n_layers = len(sizes) - 1

        n_coef = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        self._sizes = np.asarray(sizes, dtype=np.intp)
        self._w_off = np.cumsum([0] + [a * b for a, b in zip(sizes[:-1], sizes[1:])],
                                dtype=np.intp)[:-1]
        self._b_off = n_coef + np.cumsum([0] + sizes[1:], dtype=np.intp)[:-1]
        self.n_params = int(n_coef + sum(sizes[1:]))
        self._n_intercepts = self.n_params - n_coef
        # One activation per hidden layer: the names, and the kernels' int array of codes.
        self._layer_activations = per_layer
        self._acts = np.array([_core.ACTIVATIONS[a] for a in self._layer_activations],
                              dtype=np.intc)
        self._out = _core.OUTPUTS[output]
        self._pool = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        # Workspaces and the lock are per-process scratch: not pickled.
        state = self.__dict__.copy()
        del state["_pool"], state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_acts" not in state:  # pickled before per-layer codes: one code, `_act`
            self.__dict__.pop("_act", None)
            self._layer_activations = (self.activation,) * (self.n_layers - 1)
            self._acts = np.array([_core.ACTIVATIONS[a] for a in self._layer_activations],
                                  dtype=np.intc)
        self._pool = {}
        self._lock = threading.Lock()

    def __repr__(self):
        return (f"Network({list(self.layer_sizes)}, activation={self.activation!r}, "
                f"output={self.output!r}, dtype=np.{self.dtype.name})")

    # The flat layout --------------------------------------------------------------------

    def init_params(self, random_state=None):
        """Draw initial parameters: Glorot-uniform, exactly as scikit-learn's MLP does.

        Each layer draws its coefficients, then its intercepts, from
        ``U(-b, b)`` with ``b = sqrt(6 / (fan_in + fan_out))`` (``sqrt(2 / ...)`` for
        the logistic activation), in scikit-learn's order, so the same ``random_state``
        gives scikit-learn's initial weights. With one activation per hidden layer, a
        hidden layer takes the logistic factor when its own activation is logistic, the
        output layer when every hidden layer's is (as for ``activation='logistic'``).

        Parameters
        ----------
        random_state : None, int or numpy.random.RandomState
            Seed or generator.

        Returns
        -------
        theta : ndarray of shape (n_params,)
            The flat parameter vector, in the network's dtype.

        Examples
        --------
        >>> import fastbp
        >>> net = fastbp.Network([3, 2, 1], output="identity")
        >>> theta = net.init_params(random_state=0)
        >>> theta.shape, theta.dtype
        ((11,), dtype('float64'))
        """
        rng = check_random_state(random_state)
        theta = aligned_empty(self.n_params, self.dtype)
        coefs, intercepts = self.unpack(theta)
        names = self._layer_activations
        out_logistic = self.activation == "logistic" or (
            bool(names) and all(a == "logistic" for a in names))
        for l, (W, b) in enumerate(zip(coefs, intercepts)):
            logistic = names[l] == "logistic" if l < len(names) else out_logistic
            factor = 2.0 if logistic else 6.0
            fan_in, fan_out = W.shape
            bound = np.sqrt(factor / (fan_in + fan_out))
            # Rows at a time: the same draws, without a float64 temporary of the whole
            # matrix (32 MB for a 2048 x 2048 layer) that every fit would page in anew.
            rows = max(1, _INIT_VALUES // fan_out)
            for r in range(0, fan_in, rows):
                W[r:r + rows] = rng.uniform(-bound, bound, (min(rows, fan_in - r), fan_out))
            b[...] = rng.uniform(-bound, bound, fan_out)
        return theta

    def unpack(self, theta):
        """Views of the coefficient matrices and intercept vectors inside ``theta``.

        Parameters
        ----------
        theta : ndarray of shape (n_params,)
            A flat parameter (or gradient) vector, C-contiguous.

        Returns
        -------
        coefs : list of ndarray
            ``coefs[l]`` has shape ``(layer_sizes[l], layer_sizes[l + 1])``.
        intercepts : list of ndarray
            ``intercepts[l]`` has shape ``(layer_sizes[l + 1],)``.
            Both are views: writing to them writes to ``theta``.

        Examples
        --------
        >>> import numpy as np
        >>> import fastbp
        >>> net = fastbp.Network([3, 2, 1], output="identity")
        >>> theta = np.arange(net.n_params, dtype=float)
        >>> coefs, intercepts = net.unpack(theta)
        >>> coefs[1].ravel(), intercepts[0]
        (array([6., 7.]), array([8., 9.]))
        >>> coefs[0][0, 0] = -1.0
        >>> float(theta[0])
        -1.0
        """
        theta = self._check_theta(theta, writable_view=True)
        s = self.layer_sizes
        coefs = [theta[o:o + s[l] * s[l + 1]].reshape(s[l], s[l + 1])
                 for l, o in enumerate(self._w_off)]
        intercepts = [theta[o:o + s[l + 1]] for l, o in enumerate(self._b_off)]
        return coefs, intercepts

    # Validation and conversion -----------------------------------------------------------

    def _check_theta(self, theta, writable_view=False):
        if writable_view:
            if not isinstance(theta, np.ndarray) or theta.ndim != 1:
                raise ValueError("theta must be a 1-D numpy array")
            if not theta.flags.c_contiguous:
                raise ValueError("theta must be C-contiguous to unpack it into views")
        theta = np.asarray(theta)
        if theta.ndim != 1 or theta.shape[0] != self.n_params:
            raise ValueError(
                f"theta must have shape ({self.n_params},) for this network, "
                f"got {theta.shape}"
            )
        if writable_view:
            return theta
        if theta.dtype.kind not in "fiub":
            raise TypeError(f"theta must hold numbers, got dtype {theta.dtype}")
        theta = np.ascontiguousarray(theta, dtype=self.dtype)
        if not np.isfinite(theta).all():
            raise ValueError("theta contains NaN or infinity (or values too large for "
                             f"{np.dtype(self.dtype).name})")
        return theta

    def prepare(self, X, Y=None, sample_weight=None, x_max=None, x_check=None):
        """Convert data once into the form the kernels take (internal, for solvers).

        Copies only when it must: a C- or F-contiguous array of the network's dtype is
        used as it is; CSR is used as it is (CSC and other sparse formats become CSR).
        ``x_max``: max |X| when the caller has just found it on this very (dense) X, as
        the estimators' input checks do; it spares a pass over X, and is not used when
        X must be converted.
        ``x_check``: with x_max None and dense X whose targets are not X itself, leaves
        max |X| to be found later (``x_max`` None): a minibatch fit's first epoch finds
        it and calls ``x_check(top)``, which raises for NaN or infinity.
        """
        d = _Data()
        d.x_check = None
        n_features = self.layer_sizes[0]
        # An autoencoder's targets are its inputs: Y then reuses X's checked arrays.
        targets_are_inputs = Y is not None and Y is X
        if sp.issparse(X):
            if X.ndim != 2:
                raise ValueError(f"X must be 2-D, got {X.ndim}-D")
            X = sp.csr_matrix(X, dtype=self.dtype)
            d.X = None
            d.data, d.indices, d.indptr, d.x_max = self._csr_arrays(X, "X")
        else:
            X = np.asarray(X)
            if X.dtype.kind not in "fiub":
                raise TypeError(f"X must hold numbers, got dtype {X.dtype}")
            if X.ndim != 2:
                raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
            if X.dtype != self.dtype or not (X.flags.c_contiguous or X.flags.f_contiguous):
                X = np.ascontiguousarray(X, dtype=self.dtype)
                x_max = None
            # Finite, and the largest |x| for the bound of loss_is_surely_finite.
            if x_max is None and x_check is not None and not targets_are_inputs:
                d.x_max, d.x_check = None, x_check   # found by the first epoch
            else:
                d.x_max = _max_abs(X) if x_max is None else float(x_max)
            if d.x_max is not None and not math.isfinite(d.x_max):
                raise ValueError("X contains NaN or infinity (or values too large for "
                                 f"{np.dtype(self.dtype).name})")
            d.X = X
            d.data = d.indices = d.indptr = None
        if X.shape[1] != n_features:
            raise ValueError(
                f"X has {X.shape[1]} features, but the network expects {n_features}"
            )
        d.n_samples = X.shape[0]
        d.acts = d.acts_theta = None  # forward activations cached by curvature products
        d.block = None  # rows per block: the network's block size unless set
        d.Y = d.sample_weight = d.y_data = d.y_indices = d.y_indptr = None
        d.y_max = 0.0
        d.weight_sum = float(d.n_samples)
        if Y is not None:
            sparse_y = sp.issparse(Y)
            if not sparse_y:
                Y = np.asarray(Y)
            if Y.dtype.kind not in "fiub":
                raise TypeError(f"Y must hold numbers, got dtype {Y.dtype}")
            n_outputs = self.layer_sizes[-1]
            if not sparse_y and Y.ndim == 1 and n_outputs == 1:
                Y = Y.reshape(-1, 1)
            if Y.ndim != 2 or Y.shape != (d.n_samples, n_outputs):
                raise ValueError(
                    f"Y must have shape ({d.n_samples}, {n_outputs}), got {Y.shape}"
                )
            if sparse_y:
                d.y_data, d.y_indices, d.y_indptr, d.y_max = (
                    (d.data, d.indices, d.indptr, d.x_max) if targets_are_inputs
                    else self._csr_arrays(Y, "Y"))
            else:
                d.Y = np.ascontiguousarray(Y, dtype=self.dtype)
                d.y_max = d.x_max if targets_are_inputs else _max_abs(d.Y)
                if not math.isfinite(d.y_max):
                    raise ValueError("Y contains NaN or infinity (or values too large for "
                                     f"{np.dtype(self.dtype).name})")
        if sample_weight is not None:
            sw = np.asarray(sample_weight)
            if sw.dtype.kind not in "fiub":
                raise TypeError(f"sample_weight must hold numbers, got {sw.dtype}")
            sw = np.ascontiguousarray(sw, dtype=np.float64)
            if sw.shape != (d.n_samples,):
                raise ValueError(
                    f"sample_weight must have shape ({d.n_samples},), got {sw.shape}"
                )
            if not np.isfinite(sw).all():
                raise ValueError("sample_weight contains NaN or infinity")
            if (sw < 0).any():
                raise ValueError("sample_weight must be non-negative")
            # Exactly summed: the same for any split into chunks (Dask).
            d.weight_sum = float(_core.words_value(_core.sum_words(sw)))
            if d.n_samples and d.weight_sum <= 0:
                raise ValueError("sample_weight sums to zero: at least one must be positive")
            d.sample_weight = sw
        return d

    def _csr_arrays(self, M, name):
        """A sparse X or Y as the kernels take it: CSR data (the network's dtype),
        int32 indices and intp indptr, checked whole, and a bound on its largest |value|.
        Duplicate entries stay: the kernels add them, as ``toarray`` does, so the bound is
        then the largest sum of |duplicates| (in float64)."""
        M = sp.csr_matrix(M, dtype=self.dtype)
        if M.nnz > np.iinfo(np.int32).max:
            raise ValueError(f"sparse {name} has too many stored values (more than 2**31-1)")
        M.check_format(full_check=True)
        data = np.ascontiguousarray(M.data, dtype=self.dtype)
        top = _max_abs(data)
        if not math.isfinite(top):
            raise ValueError(f"{name} contains NaN or infinity (or values too large for "
                             f"{np.dtype(self.dtype).name})")
        if not M.has_canonical_format:  # may hold duplicates
            # (sum_duplicates works in place: on copies of the index arrays, which M,
            # and the caller's matrix, may share)
            sums = sp.csr_matrix((np.abs(data).astype(np.float64), M.indices.copy(),
                                  M.indptr.copy()), shape=M.shape)
            sums.sum_duplicates()
            top = max(top, _max_abs(sums.data))
        return (data, np.ascontiguousarray(M.indices, dtype=np.int32),
                np.ascontiguousarray(M.indptr, dtype=np.intp), top)

    def loss_is_surely_finite(self, theta, data, alpha=0.0):
        """True when the loss at ``theta`` on ``data`` (with L2 penalty ``alpha``) is
        certainly finite, from the parameters alone (O(n_params), no pass over the rows);
        False when it cannot tell.

        Propagates a bound on every |z| and |a| through the layers: with |a_{l-1}| <= A
        elementwise, |z_l[j]| <= A * sum_i |W_l[i, j]| + |b_l[j]|, widened for the
        rounding of a sum of fan_in + 1 terms. Each hidden layer's activation then bounds
        |a_l| by: 1 (tanh, logistic); the bound of z (relu, identity, leaky_relu, silu:
        |f(z)| <= |z|, also after rounding; gelu: the same, widened by 4 ulps for the
        rounding of Phi); max(z, 1) (elu); z + log 2, widened by 4 ulps (softplus). The loss (computed in float64 from z, see the
        kernels) is finite when every z and the output differences stay far below the
        dtype's overflow threshold, and, for the exp output, when exp(z) cannot overflow.
        ``data`` carries max |x| and max |y| from ``prepare``.
        """
        info = np.finfo(self.dtype)
        limit = float(info.max) / 8
        bound = float(data.x_max)
        coefs, intercepts = self.unpack(theta)
        n_layers = len(coefs)
        sq = 0.0  # sum(W^2) for the L2 term, added in float64 to the loss
        for l, (W, b) in enumerate(zip(coefs, intercepts)):
            # One pass over W: sum_i |W[i, j]| per column, and the columns' squares. A
            # NaN or infinity in W, or sums too large for float64, leave a column's sum
            # non-finite: "cannot tell", as for a non-finite intercept.
            col = np.empty(W.shape[1])
            sq_col = np.empty(W.shape[1])
            _core.column_sums(W, col, sq_col)
            if not (np.isfinite(col).all() and math.isfinite(_max_abs(b))):
                return False
            with np.errstate(over="ignore"):  # infinity: "cannot tell", below
                sq += float(sq_col.sum())
                z = float(np.max(bound * col + np.abs(b))) if W.shape[1] else 0.0
            z *= 1 + 2 * (W.shape[0] + 1) * float(info.eps)
            if not z <= limit:
                return False
            name = self._layer_activations[l] if l < n_layers - 1 else "identity"
            if name in ("tanh", "logistic"):
                bound = 1.0
            elif name == "softplus":
                bound = (z + math.log(2.0)) * (1 + 4 * float(info.eps))
            elif name == "elu":
                bound = max(z, 1.0)
            elif name == "gelu":
                bound = z * (1 + 4 * float(info.eps))
            else:  # relu, identity, leaky_relu, silu: |f(z)| <= |z|, rounded too
                bound = z
        # The L2 term: 0.5 alpha sum(W^2) / weight sum.
        if alpha and not 0.5 * alpha * sq < 2.0 ** 1000:
            return False
        # A bound on one row's loss (see the kernels' output_loss_backward), then on the
        # weighted sum over the rows, which must stay inside the exact accumulators'
        # range (2^116, with room to spare: 2^100).
        m, y_max = self.layer_sizes[-1], float(data.y_max)
        if self.output == "exp":
            if not bound < math.log(float(info.max)) - 1:
                return False
            # y log y is at least -1/e, at most y_max log y_max.
            row = m * (math.exp(bound) + y_max * bound + y_max + 1.0
                       + y_max * math.log(max(y_max, 1.0)))
        elif self.output == "identity":
            if not bound + y_max <= limit:
                return False
            row = 0.5 * m * (bound + y_max) * (bound + y_max)
        elif self.output == "logistic":
            row = m * (bound + math.log(2.0) + y_max * bound)
        else:  # softmax: sum(y) logsumexp(z) - y.z
            row = m * y_max * (2 * bound + math.log(m))
        return row * data.weight_sum < 2.0 ** 100

    # Workspaces --------------------------------------------------------------------------

    def _threads(self, units):
        return max(1, min(effective_n_jobs(self.n_jobs), units))

    def _acquire(self, n_samples, exact, kind="grad", block=None):
        """Buffers for a full-batch pass over n_samples rows, reused across calls (one
        set per concurrent caller): per-thread workspaces and, with ``exact``, per-thread
        block results and exact accumulators. Full-batch passes read rows in place, so
        the workspaces have no gather buffer. ``kind`` ('grad', 'curvature' or 'fisher')
        sizes the workspaces for that kernel; ``block`` overrides the block size."""
        block = self._block_for(n_samples) if block is None else int(block)
        n_blocks = -(-n_samples // block)
        threads = self._threads(n_blocks)
        key = (block, threads, exact, kind)
        with self._lock:
            free = self._pool.get(key)
            if free:
                return key, free.pop()
        ws = {"grad": lambda: _core.workspace_size(self._sizes, self._acts, block, False),
              "curvature": lambda: _core.rop_workspace_size(self._sizes, block),
              "fisher": lambda: _core.fisher_workspace_size(self._sizes, self._acts,
                                                            block)}[kind]()
        bufs = {"work": np.empty((threads, ws), dtype=self.dtype), "block": block,
                "threads": threads, "n_blocks": n_blocks}
        if exact:
            bufs["tgrad"] = np.empty((threads, self.n_params), dtype=self.dtype)
            bufs["tdacc"] = np.empty((threads, self._n_intercepts), dtype=np.float64)
            bufs["acc"] = np.empty((threads, _core.accumulator_size(self.n_params)),
                                   dtype=np.int64)
        return key, bufs

    def _release(self, key, bufs):
        with self._lock:
            self._pool.setdefault(key, []).append(bufs)

    def _block_for(self, n_samples):
        return block_rows(n_samples, self.block_size)

    def _blas_guard(self, bufs, limit_blas):
        # The cores are fastbp's threads'; BLAS gets one thread. Exact passes (loss,
        # gradient, curvature) always do this, even over one block, so that their GEMMs
        # round the same way in every process (the Dask workers' BLAS is single-threaded).
        if limit_blas and (bufs["n_blocks"] > 1 or "acc" in bufs):
            return single_threaded_blas()
        return contextlib.nullcontext()

    # The objective -----------------------------------------------------------------------

    @staticmethod
    def _scale(d, scale):
        if scale is not None:  # a share of a larger sum (a chunk of distributed data)
            return float(scale)
        return 1.0 / d.weight_sum if d.weight_sum > 0 else 0.0

    def _loss_grad(self, theta, d, alpha, grad, limit_blas=True, scale=None, acc=None):
        """Objective on prepared data; theta is contiguous in the network's dtype.

        ``scale`` replaces ``1 / sum(weights)``. With ``acc`` (an int64 array of
        ``_core.accumulator_size(n_params)``) the exact sums are copied there and not
        finished (a chunk's share of a sum over more rows; see ``_core.finish_loss_grad``).
        """
        scale = self._scale(d, scale)
        key, b = self._acquire(d.n_samples, True, block=d.block)
        try:
            with self._blas_guard(b, limit_blas):
                loss = _core.loss_grad(
                    theta, grad, d.X, d.data, d.indices, d.indptr, d.Y, d.sample_weight,
                    self._sizes, self._w_off, self._b_off, self._acts, self._out,
                    b["work"], b["tgrad"], b["tdacc"], b["acc"], b["block"], scale,
                    float(alpha), b["threads"], acc is None, **d.targets())
                if acc is not None:
                    acc[...] = b["acc"][0]
        finally:
            self._release(key, b)
        return loss

    def _forward(self, theta, d, raw=False):
        out = np.empty((d.n_samples, self.layer_sizes[-1]), dtype=self.dtype)
        if d.n_samples == 0:
            return out
        key, b = self._acquire(d.n_samples, False, block=d.block)
        try:
            with self._blas_guard(b, True):
                _core.forward(theta, out, d.X, d.data, d.indices, d.indptr, self._sizes,
                              self._w_off, self._b_off, self._acts,
                              _core.OUTPUTS["identity"] if raw else self._out, b["work"],
                              b["block"], b["threads"])
        finally:
            self._release(key, b)
        return out

    def _curvature(self, theta, v, d, alpha, exact, out, scale=None, acc=None):
        """Gauss-Newton (or exact Hessian) product on prepared data.

        The forward activations are cached on ``d``: further products at the same theta
        (as Newton-CG and CG make) skip the forward pass. ``scale`` and ``acc`` as for
        _loss_grad (see ``_core.finish_product``).
        """
        scale = self._scale(d, scale)
        key, b = self._acquire(d.n_samples, True, kind="curvature", block=d.block)
        size = _core.acts_size(self._sizes, self._acts, d.n_samples, b["block"])
        if d.acts is None or d.acts.shape[0] != max(size, 1) or d.acts.dtype != self.dtype:
            d.acts = np.empty(max(size, 1), dtype=self.dtype)
            d.acts_theta = None
        have = d.acts_theta is not None and np.array_equal(d.acts_theta, theta)
        try:
            with self._blas_guard(b, True):
                _core.curvature_product(
                    theta, v, out, d.X, d.data, d.indices, d.indptr, d.Y, d.sample_weight,
                    self._sizes, self._w_off, self._b_off, self._acts, self._out,
                    b["work"], b["tgrad"], b["tdacc"], b["acc"], d.acts, have, b["block"],
                    scale, float(alpha), exact, b["threads"], acc is None, **d.targets())
                if acc is not None:
                    acc[...] = b["acc"][0]
        finally:
            self._release(key, b)
        if not have:
            d.acts_theta = theta.copy()
        return out

    def _fisher(self, theta, d, out, scale=None, acc=None):
        """Diagonal of the empirical Fisher on prepared data (no L2 term), into out.
        ``scale`` and ``acc`` as for _loss_grad (see ``_core.finish_sums``)."""
        scale = self._scale(d, scale)
        key, b = self._acquire(d.n_samples, True, kind="fisher", block=d.block)
        try:
            with self._blas_guard(b, True):
                _core.fisher_diag(
                    theta, out, d.X, d.data, d.indices, d.indptr, d.Y, d.sample_weight,
                    self._sizes, self._w_off, self._b_off, self._acts, self._out,
                    b["work"], b["tgrad"], b["tdacc"], b["acc"], b["block"], scale,
                    b["threads"], acc is None, **d.targets())
                if acc is not None:
                    acc[...] = b["acc"][0]
        finally:
            self._release(key, b)
        return out

    def _product(self, theta, v, X, Y, sample_weight, alpha, exact):
        theta = self._check_theta(theta)
        v = np.asarray(v)
        if v.shape != (self.n_params,):
            raise ValueError(f"v must have shape ({self.n_params},), got {v.shape}")
        v = np.ascontiguousarray(v, dtype=self.dtype)
        alpha = float(alpha)
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a non-negative finite number, got {alpha}")
        d = self.prepare(X, Y, sample_weight)
        if d.n_samples == 0:
            raise ValueError("X has no rows: the objective is a mean over samples")
        return self._curvature(theta, v, d, alpha, exact,
                               np.empty(self.n_params, dtype=self.dtype))

    def gnvp(self, theta, v, X, Y, sample_weight=None, alpha=0.0):
        """Gauss-Newton matrix times a vector (Schraudolph's product), exactly.

        ``G = J^T H_out J + alpha / sum(w) * I_W``, with J the Jacobian of the output
        pre-activations and H_out the Hessian of the loss in them (already weighted and
        divided by the weight sum). G is symmetric positive semi-definite.

        Parameters
        ----------
        theta, v : array-like of shape (n_params,)
            The point and the direction, in the flat layout.
        X, Y, sample_weight, alpha
            As for :meth:`loss_grad`.

        Returns
        -------
        Gv : ndarray of shape (n_params,)

        Examples
        --------
        >>> import numpy as np
        >>> import fastbp
        >>> net = fastbp.Network([3, 4, 2], activation="tanh", output="softmax")
        >>> theta = net.init_params(random_state=0)
        >>> X = np.random.default_rng(0).normal(size=(6, 3))
        >>> Y = np.eye(2)[[0, 1, 1, 0, 1, 0]]
        >>> v = np.ones(net.n_params)
        >>> bool(v @ net.gnvp(theta, v, X, Y) >= 0)   # positive semi-definite
        True
        """
        return self._product(theta, v, X, Y, sample_weight, alpha, exact=False)

    def hessp(self, theta, v, X, Y, sample_weight=None, alpha=0.0):
        """Exact Hessian of the objective times a vector (Pearlmutter's R-operator).

        Parameters
        ----------
        theta, v : array-like of shape (n_params,)
            The point and the direction, in the flat layout.
        X, Y, sample_weight, alpha
            As for :meth:`loss_grad`.

        Returns
        -------
        Hv : ndarray of shape (n_params,)

        Examples
        --------
        >>> import numpy as np
        >>> import fastbp
        >>> net = fastbp.Network([3, 4, 2], activation="tanh", output="softmax")
        >>> theta = net.init_params(random_state=0)
        >>> X = np.random.default_rng(0).normal(size=(6, 3))
        >>> Y = np.eye(2)[[0, 1, 1, 0, 1, 0]]
        >>> v = np.random.default_rng(1).normal(size=net.n_params)
        >>> g = lambda t: net.loss_grad(t, X, Y)[1]
        >>> fd = (g(theta + 1e-6 * v) - g(theta - 1e-6 * v)) / 2e-6
        >>> bool(np.allclose(net.hessp(theta, v, X, Y), fd, atol=1e-6))
        True
        """
        return self._product(theta, v, X, Y, sample_weight, alpha, exact=True)

    def forward(self, theta, X, raw=False):
        """Output-layer activations for ``X``.

        Parameters
        ----------
        theta : array-like of shape (n_params,)
            Flat parameters.
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs. CSR and CSC matrices are multiplied directly, never densified.
        raw : bool, default=False
            Return the output layer's pre-activations (logits) instead.

        Returns
        -------
        out : ndarray of shape (n_samples, n_outputs)
            Softmax probabilities, logistic probabilities, identity or exp outputs (or the
            pre-activations, with ``raw=True``).

        Examples
        --------
        >>> import numpy as np
        >>> import fastbp
        >>> net = fastbp.Network([2, 1], output="identity")
        >>> theta = np.array([1.0, 2.0, 0.5])   # W = [[1], [2]], b = [0.5]
        >>> net.forward(theta, np.array([[1.0, 1.0]]))
        array([[3.5]])
        """
        theta = self._check_theta(theta)
        return self._forward(theta, self.prepare(X), raw=raw)

    def _inspect(self, theta, X, Y, sample_weight, deltas, input_grad):
        theta = self._check_theta(theta)
        d = self.prepare(X, Y, sample_weight)
        n = d.n_samples
        flat = np.empty(n * sum(self.layer_sizes[1:]), dtype=self.dtype) if deltas \
            else None
        grad_x = np.empty((n, self.layer_sizes[0]), dtype=self.dtype) if input_grad \
            else None
        if n:
            key, b = self._acquire(n, False, block=d.block)
            try:
                dacc = np.zeros((b["threads"], self._n_intercepts))
                with self._blas_guard(b, True):
                    _core.layer_deltas(theta, d.X, d.data, d.indices, d.indptr, d.Y,
                                       d.sample_weight, self._sizes, self._w_off,
                                       self._b_off, self._acts, self._out, b["work"], dacc,
                                       flat, grad_x, b["block"], b["threads"],
                                       **d.targets())
            finally:
                self._release(key, b)
        if not deltas:
            return grad_x
        out, offset = [], 0
        for units in self.layer_sizes[1:]:
            out.append(flat[offset:offset + n * units].reshape(n, units))
            offset += n * units
        return out

    def deltas(self, theta, X, Y, sample_weight=None):
        """Per-sample backpropagated errors: each layer's ``dloss_i/dz_l``.

        These are the error contributions backpropagation is defined by, before the
        objective's averaging: for sample i, ``w_i * dloss_i / dz_l[i]`` with w_i its
        weight (1 without weights) and z_l the layer's pre-activations. They come from
        the same compiled backward pass as ``loss_grad``, in blocks of rows over the
        threads; each row's values depend on that row only.

        Parameters
        ----------
        theta : array-like of shape (n_params,)
            Flat parameters.
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs.
        Y : {array-like, sparse matrix} of shape (n_samples, n_outputs)
            Targets in the network's form (one-hot rows, 0/1 columns or values).
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        deltas : list of ndarray
            ``deltas[l]`` has shape (n_samples, layer_sizes[l + 1]): hidden layers first,
            the output layer last (where it is ``w_i (yhat_i - y_i)`` for every
            canonical output and loss).

        Examples
        --------
        >>> import numpy as np
        >>> import fastbp
        >>> net = fastbp.Network([3, 4, 2], activation="tanh", output="softmax")
        >>> theta = net.init_params(random_state=0)
        >>> X = np.random.default_rng(0).normal(size=(5, 3))
        >>> Y = np.eye(2)[[0, 1, 1, 0, 1]]
        >>> d_hidden, d_out = net.deltas(theta, X, Y)
        >>> d_hidden.shape, d_out.shape
        ((5, 4), (5, 2))
        >>> bool(np.allclose(d_out, net.forward(theta, X) - Y))
        True
        """
        return self._inspect(theta, X, Y, sample_weight, True, False)

    def input_gradient(self, theta, X, Y, sample_weight=None):
        """Per-sample gradients of the loss with respect to the inputs.

        For sample i, ``w_i * dloss_i / dx_i`` (w_i its weight, 1 without weights): one
        backward pass through the compiled kernels, in the blocks and threads of
        ``loss_grad``. Dense also for sparse X.

        Parameters
        ----------
        theta : array-like of shape (n_params,)
            Flat parameters.
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs.
        Y : {array-like, sparse matrix} of shape (n_samples, n_outputs)
            Targets in the network's form.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        gradient : ndarray of shape (n_samples, n_features)
            One row per sample.

        Examples
        --------
        >>> import numpy as np
        >>> import fastbp
        >>> net = fastbp.Network([2, 1], output="identity")
        >>> theta = np.array([1.0, 2.0, 0.5])   # yhat = x1 + 2 x2 + 0.5
        >>> X, Y = np.array([[1.0, 1.0]]), np.array([[2.5]])
        >>> net.input_gradient(theta, X, Y)     # (yhat - y) * W^T = 1 * [1, 2]
        array([[1., 2.]])
        """
        return self._inspect(theta, X, Y, sample_weight, False, True)

    def loss_grad(self, theta, X, Y, sample_weight=None, alpha=0.0, out=None):
        """The objective and its exact gradient.

        Parameters
        ----------
        theta : array-like of shape (n_params,)
            Flat parameters.
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs, in any memory layout.
        Y : {array-like, sparse matrix} of shape (n_samples, n_outputs)
            Targets: one-hot rows for softmax, 0/1 columns for logistic, real values for
            identity, non-negative counts for exp. A sparse Y (an autoencoder's sparse X,
            say) is read one row at a time, never densified whole.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights, not all zero. None weighs every sample 1.
        alpha : float, default=0.0
            L2 penalty on the coefficients (not the intercepts).
        out : ndarray of shape (n_params,), default=None
            Where to write the gradient (contiguous, network dtype); allocated if None.

        Returns
        -------
        loss : float
            ``sum_i w_i loss_i / sum_i w_i + 0.5 * alpha * sum ||W||^2 / sum_i w_i``,
            accumulated in float64.
        grad : ndarray of shape (n_params,)
            Its gradient, in the flat layout and the network's dtype.

        Examples
        --------
        >>> import numpy as np
        >>> import fastbp
        >>> net = fastbp.Network([2, 1], output="identity")
        >>> theta = np.array([1.0, 2.0, 0.5])
        >>> loss, grad = net.loss_grad(theta, [[1.0, 1.0]], [[3.0]])
        >>> loss, grad        # residual 0.5: loss 0.5 * 0.5**2, grad 0.5 * [x, 1]
        (0.125, array([0.5, 0.5, 0.5]))
        """
        theta = self._check_theta(theta)
        alpha = float(alpha)
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a non-negative finite number, got {alpha}")
        d = self.prepare(X, Y, sample_weight)
        if d.n_samples == 0:
            raise ValueError("X has no rows: the objective is a mean over samples")
        if out is None:
            out = np.empty(self.n_params, dtype=self.dtype)
        elif (not isinstance(out, np.ndarray) or out.shape != (self.n_params,)
              or out.dtype != self.dtype or not out.flags.c_contiguous
              or not out.flags.writeable):
            raise ValueError(
                f"out must be a writable C-contiguous {self.dtype.name} array of shape "
                f"({self.n_params},)"
            )
        loss = self._loss_grad(theta, d, alpha, out)
        return loss, out
