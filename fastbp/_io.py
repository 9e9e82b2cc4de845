"""Model files: NumPy arrays plus JSON metadata in one zip (``.npz``), never pickle.

Format (version 1)
------------------
A zip archive as written by ``numpy.savez``. Every member is a ``.npy`` array of a plain
numeric, boolean or fixed-width string dtype (object arrays are never written, and
reading uses ``allow_pickle=False``, so nothing in a file can execute code):

``__fastbp__``
    UTF-8 JSON as a uint8 array: ``{"format": "fastbp-model", "version": 1,
    "estimator": "MLPClassifier" | "MLPRegressor" | "MLPAutoencoder", "params": {...constructor parameters},
    "attributes": {...scalar fitted attributes}, "dtype": "float32" | "float64",
    "layer_sizes": [...], "activation": "name" | ["name per hidden layer", ...],
    "scaler": true | false, "feature_names": [...] or null,
    "label_binarizer": {...} (classifier only)}``.
``theta``
    The flat parameter vector (scikit-learn's packing order), in the model's dtype.
``classes``
    The classifier's ``classes_``.
``loss_curve``, ``validation_scores``
    The training curves.
``scaler_mean``, ``scaler_scale``, ``scaler_var``
    A ``StandardScaler`` in front of the network (``fastbp train`` saves one).
``feature_names_in``
    ``feature_names_in_``, when the model was fitted on named columns.

``load`` checks the format name and version, every array's dtype and shape against the
metadata, and refuses anything else with a ``ValueError`` naming the problem.
"""
import json
import zipfile
import zlib

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ._autoencoder import MLPAutoencoder
from ._estimators import MLPClassifier, MLPRegressor
from ._network import Network, check_activation
from ._validation import fitted_label_binarizer, hidden_sizes

__all__ = ["save", "load", "FORMAT_VERSION"]

FORMAT = "fastbp-model"
FORMAT_VERSION = 1
_ESTIMATORS = {"MLPClassifier": MLPClassifier, "MLPRegressor": MLPRegressor,
               "MLPAutoencoder": MLPAutoencoder}
_SCALAR_ATTRS = ("n_features_in_", "n_iter_", "t_", "n_layers_", "n_outputs_",
                 "out_activation_", "loss_", "best_loss_", "best_validation_score_")


def _split(model):
    if isinstance(model, Pipeline):
        steps = [s for _, s in model.steps if s != "passthrough" and s is not None]
        if (len(steps) == 2 and isinstance(steps[0], StandardScaler)
                and isinstance(steps[1], tuple(_ESTIMATORS.values()))):
            return steps[0], steps[1]
        raise TypeError("save supports a fastbp estimator, or a Pipeline of a "
                        "StandardScaler and a fastbp estimator")
    if isinstance(model, tuple(_ESTIMATORS.values())):
        return None, model
    raise TypeError("save needs a fitted fastbp MLPClassifier, MLPRegressor or "
                    f"MLPAutoencoder, got {type(model).__name__}")


def _json_value(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (tuple, list, np.ndarray)):
        return [_json_value(x) for x in v]
    return v


def _class_weight_to_json(cw):
    """A class_weight dict keeps its keys' types (JSON objects take strings only): each
    dict is stored as ``{"items": [[class, weight], ...]}``."""
    if isinstance(cw, dict):
        return {"items": [[_json_value(k), _json_value(v)] for k, v in cw.items()]}
    if isinstance(cw, list):
        return [_class_weight_to_json(d) for d in cw]
    return cw


def _class_weight_from_json(cw):
    if isinstance(cw, dict):
        items = cw.get("items")
        if set(cw) != {"items"} or not isinstance(items, list) or not all(
                isinstance(p, list) and len(p) == 2 for p in items):
            raise ValueError("class_weight is not a list of [class, weight] pairs")
        return {k: v for k, v in items}
    if isinstance(cw, list):
        return [_class_weight_from_json(d) for d in cw]
    return cw


def _plain_array(a, what):
    a = np.asarray(a)
    if a.dtype == object:
        try:
            a = a.astype(str) if all(isinstance(x, str) for x in a.ravel()) else a
        except TypeError:
            pass
    if a.dtype == object or a.dtype.kind not in "biufU":
        raise ValueError(f"cannot save {what} of dtype {a.dtype}: only numbers, booleans "
                         "and strings can be stored without pickle")
    return a


def save(model, path, *, metadata=None):
    """Save a fitted model to ``path`` in fastbp's pickle-free format.

    Parameters
    ----------
    model : MLPClassifier, MLPRegressor, MLPAutoencoder, or Pipeline
        A fitted fastbp estimator, or a ``Pipeline`` of a fitted ``StandardScaler`` and a
        fitted fastbp estimator (what ``fastbp train`` produces).
    path : str or path-like
        Where to write. The file is a zip of ``.npy`` arrays with JSON metadata (see the
        module documentation for the format).
    metadata : dict, default=None
        Extra JSON-serialisable information stored with the model (``fastbp train``
        stores the feature and target column names); ``load(path,
        return_metadata=True)`` returns it.

    Examples
    --------
    >>> import os, tempfile
    >>> from sklearn.datasets import load_iris
    >>> import fastbp
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = fastbp.MLPClassifier((8,), solver="lbfgs", random_state=0).fit(X, y)
    >>> path = os.path.join(tempfile.mkdtemp(), "iris.fbp")
    >>> fastbp.save(clf, path)
    >>> (fastbp.load(path).predict(X) == clf.predict(X)).all()
    np.True_
    """
    scaler, est = _split(model)
    if not hasattr(est, "_theta"):
        raise ValueError("the model is not fitted: call fit before save")
    params = {k: _json_value(v) for k, v in est.get_params().items()}
    if "class_weight" in params:
        params["class_weight"] = _class_weight_to_json(est.class_weight)
    if params.get("random_state") is not None and not isinstance(params["random_state"],
                                                                 int):
        params["random_state"] = None
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "estimator": type(est).__name__,
        "params": params,
        "attributes": {k: _json_value(getattr(est, k)) for k in _SCALAR_ATTRS
                       if hasattr(est, k)},
        "dtype": est._net.dtype.name,
        "layer_sizes": list(est._net.layer_sizes),
        "activation": est._net.activation,
        "scaler": scaler is not None,
        "user": {} if metadata is None else metadata,
    }
    try:
        json.dumps(meta["user"])
    except TypeError as exc:
        raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
    arrays = {"theta": est._theta,
              "loss_curve": np.asarray(est.loss_curve_ or [], dtype=np.float64)}
    if est.validation_scores_ is not None:
        arrays["validation_scores"] = np.asarray(est.validation_scores_, dtype=np.float64)
    if hasattr(est, "feature_names_in_"):
        arrays["feature_names_in"] = _plain_array(est.feature_names_in_, "feature names")
    if isinstance(est, MLPClassifier):
        lb = est._label_binarizer
        arrays["classes"] = _plain_array(est.classes_, "classes_")
        meta["label_binarizer"] = {"y_type_": lb.y_type_, "neg_label": lb.neg_label,
                                   "pos_label": lb.pos_label,
                                   "sparse_input_": bool(lb.sparse_input_)}
    if scaler is not None:
        if not hasattr(scaler, "scale_"):
            raise ValueError("the StandardScaler is not fitted")
        n = scaler.n_features_in_
        arrays["scaler_mean"] = (np.zeros(n) if scaler.mean_ is None
                                 else np.asarray(scaler.mean_, dtype=np.float64))
        arrays["scaler_scale"] = (np.ones(n) if scaler.scale_ is None
                                  else np.asarray(scaler.scale_, dtype=np.float64))
        arrays["scaler_var"] = (np.ones(n) if scaler.var_ is None
                                else np.asarray(scaler.var_, dtype=np.float64))
        meta["scaler_params"] = {"with_mean": bool(scaler.with_mean),
                                 "with_std": bool(scaler.with_std),
                                 "n_samples_seen_": _json_value(scaler.n_samples_seen_)}
        if hasattr(scaler, "feature_names_in_"):
            arrays["scaler_feature_names_in"] = _plain_array(scaler.feature_names_in_,
                                                             "feature names")
    arrays["__fastbp__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _bad(path, why):
    return ValueError(f"{path}: not a valid fastbp model file: {why}")


def _read(path):
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise _bad(path, "it is a single array, not a model archive")
        with npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model file") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, RuntimeError,
            NotImplementedError, zlib.error) as exc:
        # RuntimeError/NotImplementedError: zipfile on encrypted or unknown members.
        raise _bad(path, f"unreadable or truncated ({exc})") from None
    except ValueError as exc:
        if "not a valid fastbp" in str(exc):
            raise
        raise _bad(path, f"it holds data that needs pickle or is corrupt ({exc})") from None


def load(path, *, return_metadata=False):
    """Load a model saved by :func:`save`.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save` (or by ``fastbp train``).
    return_metadata : bool, default=False
        Also return the ``metadata`` dict given to :func:`save`.

    Returns
    -------
    model : MLPClassifier, MLPRegressor, MLPAutoencoder, or Pipeline
        The fitted model; its predictions are bitwise equal to the saved model's.
    metadata : dict
        Only with ``return_metadata=True``.

    Raises
    ------
    ValueError
        The file is corrupt, truncated, not a fastbp model, from a newer format version,
        or inconsistent (an array of the wrong shape or dtype). Nothing in the file is
        ever executed: arrays are read with ``allow_pickle=False`` and metadata is JSON.
    FileNotFoundError
        There is no such file.

    Examples
    --------
    >>> import os, tempfile
    >>> from sklearn.datasets import load_diabetes
    >>> import fastbp
    >>> X, y = load_diabetes(return_X_y=True)
    >>> reg = fastbp.MLPRegressor(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=500,
    ...                           random_state=0)
    >>> reg = reg.fit(X, y / 100)
    >>> path = os.path.join(tempfile.mkdtemp(), "diabetes.fbp")
    >>> fastbp.save(reg, path)
    >>> again = fastbp.load(path)
    >>> bool((again.predict(X) == reg.predict(X)).all())
    True
    """
    arrays = _read(path)
    if "__fastbp__" not in arrays:
        raise _bad(path, "it has no fastbp metadata")
    raw = arrays["__fastbp__"]
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
        raise _bad(path, "its metadata is not a byte string")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"its metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, "its metadata does not name the fastbp-model format")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise _bad(path, f"unknown format version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer fastbp (model format version "
                         f"{version}; this fastbp reads up to {FORMAT_VERSION}). "
                         "Upgrade fastbp to load it.")
    try:
        model = _build(meta, arrays)
        user = meta.get("user", {})
        if not isinstance(user, dict):
            raise ValueError("user metadata is not a mapping")
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(path, f"inconsistent contents ({type(exc).__name__}: {exc})") from None
    return (model, user) if return_metadata else model


def _array(arrays, name, kinds, shape=None):
    a = arrays[name]
    if not isinstance(a, np.ndarray):
        raise ValueError(f"member {name!r} is not a .npy array")
    if a.dtype.kind not in kinds:
        raise ValueError(f"array {name!r} has dtype {a.dtype}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"array {name!r} has shape {a.shape}, expected {shape}")
    return a


def _build(meta, arrays):
    cls = _ESTIMATORS[meta["estimator"]]
    params = dict(meta["params"])
    if isinstance(params.get("hidden_layer_sizes"), list):
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
    if isinstance(params.get("activation"), list):  # one name per hidden layer
        params["activation"] = tuple(params["activation"])
    if "class_weight" in params:
        params["class_weight"] = _class_weight_from_json(params["class_weight"])
    valid = cls().get_params()
    unknown = set(params) - set(valid)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}")
    est = cls(**params)
    est._validate_params()
    dtype = np.dtype(meta["dtype"])
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype {dtype}")
    attrs = meta["attributes"]
    raw_sizes = meta["layer_sizes"]
    if (not isinstance(raw_sizes, list) or len(raw_sizes) < 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in raw_sizes)):
        raise ValueError(f"layer sizes {raw_sizes!r} are not a list of at least two "
                         "positive integers")
    sizes = list(raw_sizes)
    expected = [sizes[0]] + hidden_sizes(est.hidden_layer_sizes) + [sizes[-1]]
    if sizes != expected or sizes[0] != attrs["n_features_in_"]:
        raise ValueError(f"layer sizes {sizes} do not match the parameters")
    missing = [k for k in _SCALAR_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"attributes {missing} are missing")
    if attrs["n_outputs_"] != sizes[-1] or attrs["n_layers_"] != len(sizes):
        raise ValueError("n_outputs_/n_layers_ do not match the layer sizes")
    allowed = (("softmax", "logistic") if cls is MLPClassifier
               else ("exp",) if est.loss == "poisson" else ("identity",))
    if attrs.get("out_activation_") not in allowed:
        raise ValueError(f"output activation {attrs.get('out_activation_')!r} does not fit "
                         f"a {meta['estimator']}")
    net = Network(sizes, activation=est.activation, output=attrs["out_activation_"],
                  dtype=dtype, n_jobs=est.n_jobs)
    stored = meta.get("activation", net.activation)
    if check_activation(tuple(stored) if isinstance(stored, list) else stored,
                        len(sizes) - 2)[1] != net._layer_activations:
        raise ValueError(f"the network's activation {stored!r} does not match the "
                         f"parameters' {est.activation!r}")
    theta = _array(arrays, "theta", "f", (net.n_params,))
    if theta.dtype != dtype:
        raise ValueError(f"theta has dtype {theta.dtype}, metadata says {dtype}")
    if not np.isfinite(theta).all():
        raise ValueError("theta holds non-finite values")
    est._net = net
    est._theta = np.array(theta, dtype=dtype, copy=True, order="C")
    est._set_views()
    for k in _SCALAR_ATTRS:
        if k in attrs:
            setattr(est, k, attrs[k])
    est.loss_curve_ = [float(v) for v in _array(arrays, "loss_curve", "f")]
    est.validation_scores_ = ([float(v) for v in _array(arrays, "validation_scores", "f")]
                              if "validation_scores" in arrays else None)
    if "feature_names_in" in arrays:
        names = _array(arrays, "feature_names_in", "U", (sizes[0],))
        est.feature_names_in_ = names.astype(object)
    est._optimizer = None
    est._no_improvement_count = 0
    if cls is MLPClassifier:
        lbm = meta["label_binarizer"]
        classes = _array(arrays, "classes", "biufU")
        if classes.ndim != 1:
            raise ValueError("classes must be 1-D")
        n_out = sizes[-1]
        y_type = lbm["y_type_"]
        ok = {"binary": n_out == 1 and len(classes) <= 2,
              "multiclass": n_out == len(classes) and len(classes) > 2,
              "multilabel-indicator": n_out == len(classes)}
        if not ok.get(y_type, False):
            raise ValueError(f"{len(classes)} classes do not fit a {y_type!r} model with "
                             f"{n_out} outputs")
        if (lbm["neg_label"], lbm["pos_label"], lbm["sparse_input_"]) != (0, 1, False):
            raise ValueError("the label binarizer is not the one fastbp's classifier uses")
        est._label_binarizer = fitted_label_binarizer(classes, y_type)
        est.classes_ = classes
    if not meta.get("scaler"):
        return est
    n = sizes[0]
    scaler = StandardScaler(with_mean=bool(meta["scaler_params"]["with_mean"]),
                            with_std=bool(meta["scaler_params"]["with_std"]))
    scaler.mean_ = _array(arrays, "scaler_mean", "f", (n,)).astype(np.float64)
    scaler.scale_ = _array(arrays, "scaler_scale", "f", (n,)).astype(np.float64)
    scaler.var_ = _array(arrays, "scaler_var", "f", (n,)).astype(np.float64)
    scaler.n_features_in_ = n
    scaler.n_samples_seen_ = meta["scaler_params"]["n_samples_seen_"]
    if "scaler_feature_names_in" in arrays:
        names = _array(arrays, "scaler_feature_names_in", "U", (n,))
        scaler.feature_names_in_ = names.astype(object)
    if not (np.isfinite(scaler.mean_).all() and np.isfinite(scaler.scale_).all()
            and (scaler.scale_ > 0).all()):
        raise ValueError("the scaler holds non-finite or non-positive values")
    return Pipeline([("scaler", scaler), ("mlp", est)])
