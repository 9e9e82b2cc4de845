"""Estimator input for Dask training: validation on the cluster, targets per chunk.

The estimators call ``validate`` when ``X``, ``y`` or ``sample_weight`` is a Dask array,
or when ``backend='dask'``. Everything is checked in one pass over the chunks on the
workers (finiteness, weights, classes); nothing but those few numbers comes back.
"""
import math

import numpy as np
import scipy.sparse as sp
from sklearn.base import is_classifier
from sklearn.preprocessing import LabelBinarizer

from ._estimators import _check_two_classes, _checked_sample_weight
from ._network import block_rows
from .distributed import DaskObjective, get_client, is_dask_collection

__all__ = ["validate"]


class DaskData:
    """Validated Dask arrays: X (n, n_features), Y (n, n_outputs), sample weights."""

    def __init__(self, client, X, Y, sample_weight):
        self.client, self.X, self.Y, self.sample_weight = client, X, Y, sample_weight
        self.n_features = X.shape[1]
        self.n_outputs = Y.shape[1]
        self.dtype = X.dtype

    def cast(self, dtype):
        self.X, self.Y, self.dtype = self.X.astype(dtype), self.Y.astype(dtype), dtype

    def objective(self, net, alpha):
        return DaskObjective(self.client, net, self.X, self.Y, self.sample_weight, alpha)


# What each failed check on the cluster means.
_MESSAGES = {
    "X finite": "Input X contains NaN or infinity.",
    "y finite": "Input y contains NaN or infinity.",
    "y non-negative": "loss='poisson' needs non-negative targets; y has negative values.",
    "sample_weight finite": "sample_weight contains NaN or infinity.",
    "sample_weight non-negative": "Negative values in data passed to `sample_weight`.",
}


def _binarize(block, binarizer, dtype):
    return binarizer.transform(block).astype(dtype, copy=False)


def _numpy_to_dask(est, X, y, sample_weight, client, first_pass):
    """backend='dask' with in-memory input: validate locally, then split into about one
    chunk per worker thread (whole blocks of rows). The chunks are built by tasks from the graph, so a lost worker's
    share is rebuilt."""
    import dask.array as da
    if sp.issparse(X):
        raise ValueError("backend='dask' takes dense X; sparse input trains locally "
                         "(backend=None)")
    X, Y = est._validate_input(X, y, False, reset=first_pass)
    sample_weight = _checked_sample_weight(sample_weight, X)
    # One chunk per worker thread, in whole blocks of rows.
    n_threads = max(1, sum(client.nthreads().values()))
    block = block_rows(X.shape[0])
    rows = max(1, math.ceil(math.ceil(X.shape[0] / block) / n_threads)) * block
    X = da.from_array(np.ascontiguousarray(X), chunks=(rows, -1))
    Y = da.from_array(np.ascontiguousarray(Y), chunks=(rows, -1))
    if sample_weight is not None:
        sample_weight = da.from_array(sample_weight, chunks=rows)
    return DaskData(client, X, Y, sample_weight)


def validate(est, X, y, sample_weight, client, first_pass, on_dask):
    """Check the input on the cluster and return ``DaskData`` with targets in the
    network's form. Sets ``n_features_in_`` (and ``classes_`` for a classifier)."""
    import dask.array as da
    client = get_client(client)
    if not on_dask:
        return _numpy_to_dask(est, X, y, sample_weight, client, first_pass)
    if not is_dask_collection(X):
        raise TypeError("with a Dask y or sample_weight, X must be a Dask array too")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got {X.ndim}-D")
    if any(math.isnan(c) for c in X.chunks[0]):
        raise ValueError("X has unknown chunk sizes: call X.compute_chunk_sizes() first")
    if X.dtype.kind not in "fiub":
        raise TypeError(f"X must hold numbers, got dtype {X.dtype}")
    n, n_features = X.shape
    if n == 0 or n_features == 0:
        raise ValueError(f"X is empty: shape {X.shape}")
    if not first_pass and n_features != est.n_features_in_:
        raise ValueError(f"X has {n_features} features, but {type(est).__name__} is "
                         f"expecting {est.n_features_in_} features as input.")
    dtype = np.float32 if X.dtype == np.float32 else np.float64
    X = X.astype(dtype)

    def as_dask(a, name):
        if not is_dask_collection(a):
            a = np.asarray(a)
            a = da.from_array(a, chunks=(X.chunks[0],) + tuple((s,) for s in a.shape[1:]))
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} rows but X has {n}")
        if any(math.isnan(c) for c in a.chunks[0]):
            raise ValueError(f"{name} has unknown chunk sizes: call "
                             f"{name}.compute_chunk_sizes() first")
        return a.rechunk({0: X.chunks[0]})

    y = as_dask(y, "y")
    checks = {"X finite": da.isfinite(X).all()}
    classifier = is_classifier(est)
    if classifier:
        if y.ndim != 1:
            raise ValueError("Dask training of a classifier takes 1-D class labels "
                             "(multilabel targets train locally)")
        checks["classes"] = da.unique(y)
        if y.dtype.kind == "f":
            checks["y finite"] = da.isfinite(y).all()
    else:
        if y.ndim not in (1, 2):
            raise ValueError(f"y must be 1-D or 2-D, got {y.ndim}-D")
        if y.dtype.kind not in "fiub":
            raise ValueError(f"y must hold numbers for regression, got dtype {y.dtype}")
        checks["y finite"] = da.isfinite(y).all()
        if est.loss == "poisson":
            checks["y non-negative"] = (y >= 0).all()
    if sample_weight is not None:
        sample_weight = as_dask(sample_weight, "sample_weight")
        if sample_weight.ndim != 1 or sample_weight.dtype.kind not in "fiub":
            raise ValueError("sample_weight must be a 1-D array of numbers")
        sample_weight = sample_weight.astype(np.float64)
        checks["sample_weight finite"] = da.isfinite(sample_weight).all()
        checks["sample_weight non-negative"] = (sample_weight >= 0).all()
        checks["sample_weight sum"] = sample_weight.sum()
    results = dict(zip(checks, client.gather(client.compute(list(checks.values())))))
    for name, message in _MESSAGES.items():
        if name in results and not results[name]:
            raise ValueError(message)
    if sample_weight is not None and not results["sample_weight sum"] > 0:
        raise ValueError("sample_weight sums to zero: at least one must be positive.")

    if first_pass:
        est.n_features_in_ = n_features
    if classifier:
        classes = np.asarray(results["classes"])
        _check_two_classes(classes)
        if first_pass:
            est._label_binarizer = LabelBinarizer().fit(classes)
            est.classes_ = est._label_binarizer.classes_
        elif set(classes) != set(est.classes_):
            raise ValueError(
                "warm_start can only be used where `y` has the same classes as in the "
                f"previous call to fit. Previously got {est.classes_}, `y` has {classes}")
        lb = est._label_binarizer
        k = 1 if lb.y_type_ == "binary" else len(lb.classes_)
        Y = y.map_blocks(_binarize, lb, dtype, dtype=dtype, new_axis=1,
                         chunks=(y.chunks[0], (k,)))
    else:
        Y = y.astype(dtype)
        if Y.ndim == 1:
            Y = Y[:, None]
        Y = Y.rechunk({1: -1})
    return DaskData(client, X, Y, sample_weight)
