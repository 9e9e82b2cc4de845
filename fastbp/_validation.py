"""Input validation and target encoding, for local and Dask training.

Every check of what a user passes to ``fit`` and ``partial_fit`` lives here, and so does
the conversion of targets to the network's form (one-hot rows or one 0/1 column for
classes, 2-D float columns for regression) and back. The local path validates NumPy and
SciPy input with scikit-learn's ``validate_data``; the Dask path runs the same checks on
the cluster in one pass over the chunks (finiteness, weights, classes), so nothing but a
few numbers comes back, and builds the targets per chunk. Both give the same errors.

``validate_fit`` routes a ``fit``/``partial_fit`` call: it returns either local arrays or
``DaskData``, whose ``objective`` is the Dask objective the full-batch drivers take.
"""
import functools
import math
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
from sklearn.base import is_classifier
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight
from sklearn.utils.multiclass import (_check_partial_fit_first_call, type_of_target,
                                      unique_labels)
from sklearn.utils.validation import (_check_sample_weight, check_array, column_or_1d,
                                      validate_data)

from ._network import _max_abs, block_rows
from .distributed import DaskObjective, get_client, is_dask_collection

__all__ = ["NonFiniteInput", "check_finite_top", "defers_finite_check", "validate_fit",
           "validate_local", "validate_dask", "validate_val", "fitted_label_binarizer",
           "checked_sample_weight", "class_weight_rows",
           "check_two_classes", "hidden_sizes", "start_classes", "decode_targets",
           "encode_targets", "dropout_rates",
           "DaskData", "STOCHASTIC"]

STOCHASTIC = ("sgd", "adam")

# scikit-learn's input checks look for dataframe libraries on their first call (narwhals
# reads the installed packages' entry points for its plugins): 2-3 ms, once per process,
# 2.5 ms of a 5.3 ms first fit of a small network measured. Paid here, at import, so that
# a process's first fit costs about what later ones do.
check_array(np.zeros((1, 1)))

_POISSON_NEGATIVE = "loss='poisson' needs non-negative targets; y has negative values."


def hidden_sizes(hidden_layer_sizes):
    """``hidden_layer_sizes`` as a list of positive ints (an int means one layer)."""
    sizes = hidden_layer_sizes
    if not hasattr(sizes, "__iter__"):
        sizes = [sizes]
    sizes = list(sizes)
    if any(not isinstance(s, (Integral, np.integer)) or s <= 0 for s in sizes):
        raise ValueError(f"hidden_layer_sizes must be positive integers, got {sizes}.")
    return sizes


def dropout_rates(dropout, n_hidden, solver):
    """``dropout`` (one rate, or one per hidden layer) as a float64 array with one rate
    per hidden layer, or None when every rate is 0."""
    rates = list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * n_hidden
    if len(rates) != n_hidden:
        raise ValueError(f"dropout lists {len(rates)} rate(s), but the network has "
                         f"{n_hidden} hidden layer(s): give one per hidden layer, or one "
                         "float for all")
    for k, rate in enumerate(rates):
        if (isinstance(rate, bool) or not isinstance(rate, (Real, np.number))
                or not 0 <= float(rate) < 1):
            raise ValueError(f"dropout rates must be numbers in [0, 1); hidden layer {k} "
                             f"has {rate!r}")
    if not any(float(r) > 0 for r in rates):
        return None
    if solver not in STOCHASTIC:
        raise ValueError(
            f"dropout needs solver='sgd' or 'adam', not {solver!r}: full-batch solvers "
            "need a deterministic objective (line searches and curvature products compare "
            "evaluations of one function), and dropout draws a different network for every "
            "evaluation. Set dropout=0, or use a stochastic solver.")
    return np.asarray(rates, dtype=np.float64)


def checked_sample_weight(sample_weight, X):
    """Validated float64 weights for X's rows (None stays None)."""
    if sample_weight is None:
        return None
    sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64,
                                         ensure_non_negative=True)
    if sample_weight.sum() <= 0:
        raise ValueError("sample_weight sums to zero: at least one must be positive.")
    return sample_weight


def check_two_classes(classes):
    """A classifier needs two classes or more."""
    if len(classes) < 2:
        label = classes[0].item() if hasattr(classes[0], "item") else classes[0]
        raise ValueError(
            "MLPClassifier needs samples of at least 2 classes in the data, but y holds "
            f"a single class: {label!r}. A classifier has nothing to learn from one "
            "class.")


def validate_fit(est, X, y, sample_weight, client, incremental, first_pass, defer=False):
    """Check a ``fit``/``partial_fit`` call's input. Returns ``(X, Y, sample_weight,
    None, x_max)`` for local training, x_max being max |X| as the finite check found it
    (for ``Network.prepare``, which then needs no pass of its own; None with ``defer``,
    see ``defers_finite_check``), or ``(None, None, None, DaskData, None)`` for Dask
    training (Dask input, or ``backend='dask'``)."""
    if est.n_jobs == 0:
        raise ValueError("n_jobs == 0 has no meaning: use None for the OpenMP default, "
                         "-1 for every CPU, "
                         "or a positive number of threads.")
    on_dask = any(is_dask_collection(a) for a in (X, y, sample_weight))
    if getattr(est, "_reconstructs", False) and on_dask:
        raise ValueError(f"{type(est).__name__} trains in one process: compute the Dask "
                         "arrays first")
    if on_dask or est.backend == "dask":
        if incremental:
            raise ValueError("partial_fit does not take Dask arrays (nor "
                             "backend='dask'): minibatch training runs in one process.")
        if est.solver in STOCHASTIC:
            raise ValueError(
                f"solver={est.solver!r} does not train on a Dask cluster: Dask "
                "training is full-batch. Use solver='lbfgs' (or 'tnc', 'newton-cg', "
                "'trust-krylov', 'hessian-free'), or compute the arrays and fit "
                "locally.")
        return None, None, None, validate_dask(est, X, y, sample_weight, client,
                                               first_pass, on_dask), None
    X, Y, y, x_max = validate_local(est, X, y, incremental, reset=first_pass, defer=defer)
    return X, Y, _weighted(est, y, checked_sample_weight(sample_weight, X),
                           incremental), None, x_max


def _weighted(est, y, sample_weight, incremental=False):
    """Sample weights times the rows' class weights (either may be None)."""
    class_rows = class_weight_rows(est, y, sample_weight, incremental)
    if class_rows is None:
        return sample_weight
    weights = class_rows if sample_weight is None else sample_weight * class_rows
    if not weights.sum() > 0:
        raise ValueError("class_weight times sample_weight is zero for every sample: at "
                         "least one sample must keep a positive weight.")
    return weights


def validate_local(est, X, y, incremental, reset, defer=False):
    """Validated X (float32 or float64, dense or CSR/CSC), 2-D targets Y in X's dtype,
    the validated y as given (labels), for a classifier or a regressor, and max |X| (of
    its stored values), which the check for NaN and infinity found (None when ``defer``
    leaves a dense X's check to the first epoch)."""
    if is_classifier(est):
        return _validate_classes(est, X, y, incremental, reset, defer)
    if getattr(est, "_reconstructs", False):
        return _validate_reconstruction(est, X, reset)
    return _validate_regression(est, X, y, reset, defer)


class NonFiniteInput(ValueError):
    """X holds NaN or infinity (the estimators' ValueError, with scikit-learn's
    messages); its own class so that a fit that found it late can tell it apart."""


def _finite_X(est, X, defer=False):
    """max |X|, checked for NaN and infinity with scikit-learn's messages, in one vectorized
    pass over its (stored) values. The fit paths call validate_data with
    ``ensure_all_finite=False`` and this instead: scikit-learn's check of a large dense
    float X took 2.6x as long (8.7 ms against 3.3 ms on 30000 x 784 float32).

    With ``defer``, a dense X is left unchecked (None): the first epoch of a minibatch fit
    finds max |X| as it gathers the rows, and the fit calls ``check_finite_top`` then
    (see ``defers_finite_check``)."""
    data = X.data if sp.issparse(X) else X
    if defer and not sp.issparse(X):
        return None
    top = _max_abs(data)
    check_finite_top(est, top, data.dtype)
    return top


def check_finite_top(est, top, dtype):
    """Raise NonFiniteInput when max |X| ``top`` is NaN or infinity."""
    if math.isnan(top):
        raise NonFiniteInput(
            f"Input X contains NaN.\n{type(est).__name__} does not accept missing "
            "values: impute them first (sklearn.impute, in a pipeline) or drop the rows "
            "that have them.")
    if math.isinf(top):
        raise NonFiniteInput(
            f"Input X contains infinity or a value too large for {np.dtype(dtype)!r}.")


def defers_finite_check(est, X, client, first_fit):
    """Whether the check of X for NaN and infinity may wait for the first epoch: a
    minibatch fit (no early stopping split, whose held-out rows no epoch gathers) of a
    never fitted estimator (which a late error leaves as it was, see the estimators'
    ``_fit``) on local dense X, with no scikit-learn callbacks (which would have seen the
    fit begin). It spares a pass over X (5 ms of a 185 ms one-epoch fit of 30000 x 784
    float32)."""
    return (first_fit and est.solver in STOCHASTIC and not est.early_stopping
            and client is None and getattr(est, "backend", None) != "dask"
            and not sp.issparse(X) and not getattr(est, "_reconstructs", False)
            and not getattr(est, "_skl_callbacks", None))


def _validate_reconstruction(est, X, reset):
    """An autoencoder's input; its targets are X itself (a sparse X as CSR, which the
    kernels read row by row, never densified whole)."""
    X = validate_data(est, X, accept_sparse=["csr", "csc"],
                      dtype=(np.float64, np.float32), reset=reset,
                      ensure_all_finite=False)
    x_max = _finite_X(est, X)
    if sp.issparse(X):
        X = X.tocsr()  # one CSR copy of a CSC X, shared by inputs and targets
        return X, X, X, x_max
    Y = np.ascontiguousarray(X)
    return X, Y, Y, x_max


def _validate_classes(est, X, y, incremental, reset, defer=False):
    X, y = validate_data(est, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                         dtype=(np.float64, np.float32), reset=reset,
                         ensure_all_finite=False)
    x_max = _finite_X(est, X, defer)
    if y.ndim == 2 and y.shape[1] == 1:
        y = column_or_1d(y, warn=True)
    codes = None
    if (not hasattr(est, "classes_")) or (not est.warm_start and not incremental):
        counted = _count_integer_labels(y)
        if counted is None:
            est._label_binarizer = LabelBinarizer().fit(y)
        else:  # the same fitted state as fit(y), from the classes alone
            classes, codes = counted
            est._label_binarizer = fitted_label_binarizer(
                classes, "binary" if len(classes) <= 2 else "multiclass")
        if est._label_binarizer.y_type_ != "multilabel-indicator":
            check_two_classes(est._label_binarizer.classes_)
        est.classes_ = est._label_binarizer.classes_
    else:
        classes = unique_labels(y)
        if est.warm_start:
            if set(classes) != set(est.classes_):
                raise ValueError(
                    "warm_start can only be used where `y` has the same classes as in "
                    f"the previous call to fit. Previously got {est.classes_}, `y` "
                    f"has {classes}")
        elif len(np.setdiff1d(classes, est.classes_, assume_unique=True)):
            raise ValueError(f"`y` has classes not in `self.classes_`. "
                             f"`self.classes_` has {est.classes_}. 'y' has {classes}.")
    return X, _encode_labels(est._label_binarizer, y, X.dtype, codes), y, x_max


@functools.lru_cache(maxsize=None)
def _label_binarizer_state_is_known():
    """Whether a fitted LabelBinarizer holds just the attributes fitted_label_binarizer
    sets (asked once per process)."""
    fitted = vars(LabelBinarizer().fit([0, 1, 2]))
    return sorted(k for k in fitted if k.endswith("_")) == [
        "classes_", "sparse_input_", "y_type_"]


def fitted_label_binarizer(classes, y_type):
    """A LabelBinarizer (neg_label 0, pos_label 1, dense output) in the state ``fit``
    leaves for dense labels of type ``y_type`` ('binary', 'multiclass' or
    'multilabel-indicator') with the sorted ``classes``, set directly: ``fit`` checks
    the labels again (0.5 ms of a 30 ms fit), and a loaded model has only its classes.
    Once per process, a fitted LabelBinarizer's attributes are compared with the ones
    set here; should a scikit-learn release hold others, ``fit`` on the classes is used
    instead (for integer or string classes, the same state)."""
    lb = LabelBinarizer()
    if not _label_binarizer_state_is_known() and y_type != "multilabel-indicator":
        return lb.fit(classes)
    lb.classes_ = classes
    lb.y_type_ = y_type
    lb.sparse_input_ = False
    return lb


def _count_integer_labels(y):
    """(classes, codes) of 1-D integer labels by counting, O(n) time and memory: classes
    sorted, codes[i] the index of y[i] among them. None for other labels, which take
    LabelBinarizer's path: strings, floats, booleans, 2-D, empty, a range of values
    wider than n + 1024 (the counts would outgrow the labels), or values beyond
    +-2^62 (int64 offsets must not overflow). Integer labels are 'binary' or
    'multiclass' by their count of classes alone, so LabelBinarizer fitted on the
    classes holds the state it would hold fitted on y."""
    if y.ndim != 1 or y.dtype.kind not in "iu" or not len(y):
        return None
    lo, hi = int(y.min()), int(y.max())
    if hi - lo > len(y) + 1024 or lo < -2**62 or hi > 2**62:
        return None
    offsets = y.astype(np.int64)
    offsets -= lo
    present = np.bincount(offsets) > 0
    classes = (np.flatnonzero(present) + lo).astype(y.dtype)
    lookup = np.cumsum(present, dtype=np.intp)
    lookup -= 1
    return classes, lookup[offsets]


def _check_weight_dict(weights, where, classes):
    if not isinstance(weights, dict):
        raise ValueError(f"{where} must be a dict {{class: weight}}, got "
                         f"{type(weights).__name__}")
    unknown = [k for k in weights if not np.isin(np.asarray([k], dtype=object),
                                                 np.asarray(classes, dtype=object))[0]]
    if unknown:
        raise ValueError(f"{where} names {unknown}, which are not classes of y; the "
                         f"classes are {list(np.asarray(classes).tolist())}")
    for label, w in weights.items():
        if (isinstance(w, bool) or not isinstance(w, (Real, np.number))
                or not math.isfinite(float(w)) or w < 0):
            raise ValueError(f"{where} gives class {label!r} the weight {w!r}: class "
                             "weights must be finite non-negative numbers")


def _balanced(labels, sample_weight):
    """'balanced' weights of each row's class, as scikit-learn's compute_class_weight
    computes them: sum(w) / (n_classes * sum of w over the class), w the sample weights
    (ones without them), so that a weight of 2 is a repeated row."""
    classes, idx = np.unique(labels, return_inverse=True)
    w = np.ones(len(labels)) if sample_weight is None else sample_weight
    return _per_class_balanced(np.bincount(idx, weights=w))[idx]


def _per_class_balanced(counts):
    """sum / (n_classes * count) per class; 0 for a class whose rows all weigh 0."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(counts > 0, counts.sum() / (len(counts) * counts), 0.0)


def class_weight_rows(est, y, sample_weight=None, incremental=False):
    """Each row's weight from ``est.class_weight`` (None when it is None), with
    scikit-learn's semantics (``LogisticRegression``'s): a dict {class: weight} (classes
    not in it weigh 1), or 'balanced', ``sum(w) / (n_classes * sum of w over the
    class)`` with w the sample weights (``n_samples / (n_classes * count)`` without
    them). Multilabel targets take one dict per output, or 'balanced' per output, as
    ``compute_sample_weight`` does; the rows' weights are the product over outputs."""
    if not is_classifier(est):
        return None
    class_weight = getattr(est, "class_weight", None)
    if class_weight is None:
        return None
    if incremental and isinstance(class_weight, str):
        raise ValueError(
            "class_weight='balanced' does not work with partial_fit: one batch's class "
            "frequencies are not the data's. Compute the weights once, with "
            "sklearn.utils.class_weight.compute_class_weight('balanced', classes=classes, "
            "y=y) on the whole target (or a large sample of it), and pass them as a dict.")
    lb = est._label_binarizer
    if lb.y_type_ == "multilabel-indicator":
        if isinstance(class_weight, dict):
            raise ValueError(
                "multilabel targets take class_weight as a list with one dict per output "
                f"({len(lb.classes_)} here, each {{0: weight, 1: weight}}), or 'balanced'")
        if isinstance(class_weight, list):
            if len(class_weight) != len(lb.classes_):
                raise ValueError(f"class_weight has {len(class_weight)} dicts, but y has "
                                 f"{len(lb.classes_)} outputs: give one dict per output")
            for k, weights in enumerate(class_weight):
                _check_weight_dict(weights, f"class_weight[{k}]", [0, 1])
            return compute_sample_weight(class_weight, y).astype(np.float64)
        return np.prod([_balanced(y[:, k], sample_weight) for k in range(y.shape[1])],
                       axis=0)
    if isinstance(class_weight, list):
        raise ValueError("a list of dicts as class_weight is for multilabel targets; "
                         "with one output, pass one dict {class: weight} or 'balanced'")
    if isinstance(class_weight, dict):
        _check_weight_dict(class_weight, "class_weight", lb.classes_)
    if isinstance(class_weight, str):
        return _balanced(y, sample_weight)
    per_class = compute_class_weight(class_weight, classes=lb.classes_, y=y)
    return np.asarray(per_class, dtype=np.float64)[np.searchsorted(lb.classes_, y)]


def _encode_labels(lb, y, dtype, codes=None):
    """One-hot (or, for two classes, one 0/1 column) targets, as LabelBinarizer's
    transform gives them; 1-D labels take one search instead of its label checks, or
    none when ``codes`` (each label's index among ``lb.classes_``) are given. A single
    class (which fit refuses anyway) is left to LabelBinarizer, which gives a column of
    zeros."""
    if y.ndim == 1 and lb.y_type_ in ("binary", "multiclass") and len(y) and len(
            lb.classes_) > 1:
        classes = lb.classes_
        idx = np.searchsorted(classes, y) if codes is None else codes
        if codes is not None or (idx.max() < len(classes)
                                 and np.array_equal(classes[idx], y)):
            if len(classes) == 2:
                return (idx == 1).astype(dtype).reshape(-1, 1)
            Y = np.zeros((len(y), len(classes)), dtype=dtype)
            Y[np.arange(len(y)), idx] = 1
            return Y
    return lb.transform(y).astype(dtype)


def _validate_regression(est, X, y, reset, defer=False):
    X, y = validate_data(est, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                         y_numeric=True, dtype=(np.float64, np.float32), reset=reset,
                         ensure_all_finite=False)
    x_max = _finite_X(est, X, defer)
    if y.ndim == 2 and y.shape[1] == 1:
        y = column_or_1d(y, warn=True)
    if est.loss == "poisson" and (y < 0).any():
        raise ValueError(_POISSON_NEGATIVE)
    Y = y.reshape(-1, 1) if y.ndim == 1 else y
    return X, np.asarray(Y, dtype=X.dtype), y, x_max


def validate_val(est, X_val, y_val, sample_weight_val, dtype):
    """The user's validation set, checked against the fitted training input (features,
    classes, outputs), in the training dtype, or None when not given. Returns
    ``(X_val, y_val, sample_weight_val)`` with y_val in the user's form (what ``score``
    takes) and the weights times the class weights."""
    if X_val is None and y_val is None:
        if sample_weight_val is not None:
            raise ValueError("sample_weight_val was given without X_val and y_val")
        return None
    if X_val is None or y_val is None:
        given, missing = ("X_val", "y_val") if y_val is None else ("y_val", "X_val")
        raise ValueError(f"{given} was given without {missing}: a validation set needs "
                         "both")
    if any(is_dask_collection(a) for a in (X_val, y_val, sample_weight_val)):
        raise TypeError("X_val, y_val and sample_weight_val must be in memory (NumPy or "
                        "SciPy): validation scores are computed in this process; call "
                        ".compute() on them first")
    if getattr(est, "_reconstructs", False):  # the targets are X_val itself
        X_val = validate_data(est, X_val, accept_sparse=["csr", "csc"], dtype=dtype,
                              reset=False)
        return X_val, None, checked_sample_weight(sample_weight_val, X_val)
    X_val, y_val = validate_data(est, X_val, y_val, accept_sparse=["csr", "csc"],
                                 multi_output=True, dtype=dtype, reset=False,
                                 y_numeric=not is_classifier(est))
    if y_val.ndim == 2 and y_val.shape[1] == 1:
        y_val = column_or_1d(y_val)
    if is_classifier(est):
        lb = est._label_binarizer
        if lb.y_type_ == "multilabel-indicator":
            if (type_of_target(y_val) != "multilabel-indicator"
                    or y_val.shape[1] != len(lb.classes_)):
                raise ValueError(f"y_val must be a multilabel indicator matrix with "
                                 f"{len(lb.classes_)} columns, like y")
        else:
            if y_val.ndim != 1:
                raise ValueError("y_val must hold one label per row, like y")
            unknown = np.setdiff1d(unique_labels(y_val), est.classes_)
            if len(unknown):
                raise ValueError(f"y_val has classes {unknown.tolist()} that are not in "
                                 f"the training classes {est.classes_.tolist()}")
    else:
        outputs = 1 if y_val.ndim == 1 else y_val.shape[1]
        if outputs != est.n_outputs_:
            raise ValueError(f"y_val has {outputs} outputs, but y has {est.n_outputs_}")
        if est.loss == "poisson" and (y_val < 0).any():
            raise ValueError("loss='poisson' needs non-negative targets; y_val has "
                             "negative values.")
    sample_weight_val = _weighted(est, y_val, checked_sample_weight(sample_weight_val,
                                                                     X_val))
    return X_val, y_val, sample_weight_val


def encode_targets(est, y, dtype):
    """A fitted estimator's targets y in the network's form (one-hot rows, 0/1 columns
    or 2-D values), after checking them against what it was fitted on; for inspection,
    which must not change the estimator."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if not is_classifier(est):
        Y = y.reshape(-1, 1) if y.ndim == 1 else y
        if Y.shape[1] != est.n_outputs_:
            raise ValueError(f"y has {Y.shape[1]} outputs, but the model has "
                             f"{est.n_outputs_}")
        return np.ascontiguousarray(Y, dtype=dtype)
    lb = est._label_binarizer
    if lb.y_type_ == "multilabel-indicator":
        if y.ndim != 2 or y.shape[1] != len(lb.classes_):
            raise ValueError(f"y must be an indicator matrix with {len(lb.classes_)} "
                             "columns, like the training targets")
    else:
        unknown = np.setdiff1d(unique_labels(y), est.classes_)
        if len(unknown):
            raise ValueError(f"y has classes {unknown.tolist()} that are not in the "
                             f"model's classes {est.classes_.tolist()}")
    return _encode_labels(lb, y, dtype)


def start_classes(est, y, classes):
    """``partial_fit``'s first call: the classes come from ``classes`` (or, for
    multilabel targets, from y)."""
    if _check_partial_fit_first_call(est, classes):
        est._label_binarizer = LabelBinarizer()
        if type_of_target(y).startswith("multilabel"):
            est._label_binarizer.fit(y)
        else:
            check_two_classes(np.unique(classes))
            est._label_binarizer.fit(classes)


def decode_targets(est, Y):
    """The network's 2-D targets (or outputs) back in the user's form: class labels, or
    1-D values for a single regression target."""
    if is_classifier(est):
        return est._label_binarizer.inverse_transform(Y)
    if sp.issparse(Y):  # an autoencoder's sparse X
        return Y
    return Y.ravel() if Y.shape[1] == 1 else Y


# Dask ----------------------------------------------------------------------------------

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
    "y non-negative": _POISSON_NEGATIVE,
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
    X, Y, y, _ = validate_local(est, X, y, False, reset=first_pass)
    sample_weight = _weighted(est, y, checked_sample_weight(sample_weight, X))
    # One chunk per worker thread, in whole blocks of rows.
    n_threads = max(1, sum(client.nthreads().values()))
    block = block_rows(X.shape[0])
    rows = max(1, math.ceil(math.ceil(X.shape[0] / block) / n_threads)) * block
    X = da.from_array(np.ascontiguousarray(X), chunks=(rows, -1))
    Y = da.from_array(np.ascontiguousarray(Y), chunks=(rows, -1))
    if sample_weight is not None:
        sample_weight = da.from_array(sample_weight, chunks=rows)
    return DaskData(client, X, Y, sample_weight)


def validate_dask(est, X, y, sample_weight, client, first_pass, on_dask):
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
        class_weight = getattr(est, "class_weight", None)
        if isinstance(class_weight, list):
            raise ValueError("a list of dicts as class_weight is for multilabel targets; "
                             "with one output, pass one dict {class: weight} or "
                             "'balanced'")
        if class_weight == "balanced":
            checks["classes"], checks["class counts"] = da.unique(y, return_counts=True)
        else:
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
        counts = results.get("class counts")  # for class_weight='balanced'

        check_two_classes(classes)
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
        if est.class_weight is not None:
            sample_weight = _dask_class_weights(client, est.class_weight, y, classes,
                                                counts, sample_weight)
    else:
        Y = y.astype(dtype)
        if Y.ndim == 1:
            Y = Y[:, None]
        Y = Y.rechunk({1: -1})
    return DaskData(client, X, Y, sample_weight)


def _row_weights(block, classes, per_class):
    return per_class[np.searchsorted(classes, block)]


def _class_index(block, classes):
    return np.searchsorted(classes, block)


def _dask_class_weights(client, class_weight, y, classes, counts, sample_weight):
    """Sample weights times the class weights of the rows, as a Dask array."""
    if counts is not None:  # 'balanced', from the class counts computed with the checks
        counts = np.asarray(counts, dtype=np.float64)
        if sample_weight is not None:  # weighted counts: one more pass over y and w
            import dask.array as da

            index = y.map_blocks(_class_index,
                                 classes, dtype=np.intp)
            counts = client.compute(da.bincount(index, weights=sample_weight,
                                                minlength=len(classes))).result()
        per_class = _per_class_balanced(counts)
    else:  # a dict: y only matters for 'balanced'
        _check_weight_dict(class_weight, "class_weight", classes)
        per_class = compute_class_weight(class_weight, classes=classes, y=classes)
    rows = y.map_blocks(_row_weights, classes, per_class, dtype=np.float64)
    weights = rows if sample_weight is None else sample_weight * rows
    if (per_class == 0).any() and not client.compute(weights.sum()).result() > 0:
        raise ValueError("class_weight times sample_weight is zero for every sample: at "
                         "least one sample must keep a positive weight.")
    return weights
