"""Tests of fastbp's pickle-free model files: ``fastbp.save`` and ``fastbp.load``.

- round trips: every kind of fitted estimator (and the Pipeline ``fastbp train`` saves)
  comes back bitwise identical, with its fitted attributes, and can train again;
- the file format: a zip of plain ``.npy`` arrays with JSON metadata, no pickle;
- refusals: corrupt, truncated, foreign, newer-version and tampered files raise a clear
  ``ValueError``; a file carrying a pickle payload is refused without running it;
  ``save`` refuses what it cannot store faithfully.
"""
import json
import pathlib
import zipfile

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import sklearn.neural_network as sk_nn
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

import fastbp
import fastbp._io
from fastbp import MLPClassifier, MLPRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

INVALID = "not a valid fastbp model file"
SOLVERS = ["lbfgs", "sgd", "adam"]
DTYPES = [np.float32, np.float64]


# ---------------------------------------------------------------------------------------
# Data and models


def _data(task, n=80, seed=0):
    """(X, y) for one kind of target, small enough to fit in milliseconds."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    s = X[:, 0] + 0.5 * X[:, 1] - X[:, 2]
    if task == "binary-int":
        y = (s > 0).astype(np.int64)
    elif task == "binary-str":
        y = np.where(s > 0, "yes", "no")
    elif task == "multiclass-int":
        y = np.array([3, 5, 7])[np.digitize(s, [-0.7, 0.7])]
    elif task == "multiclass-str":
        y = np.array(["ant", "bee", "cat"])[np.digitize(s, [-0.7, 0.7])]
    elif task == "multilabel":
        y = np.column_stack([s > 0, X[:, 3] > 0, X[:, 0] * X[:, 1] > 0]).astype(np.int64)
    elif task == "regression":
        y = 2.0 * s + 0.3
    elif task == "regression-multi":
        y = np.column_stack([s, X[:, 3] - X[:, 0]])
    elif task == "poisson":
        y = rng.poisson(np.exp(0.4 * s)).astype(np.float64)
    else:
        raise AssertionError(task)
    return X, y


TASKS = ["binary-int", "binary-str", "multiclass-int", "multiclass-str", "multilabel",
         "regression", "regression-multi", "poisson"]


def _estimator(task, solver, **kw):
    params = dict(hidden_layer_sizes=(5,), solver=solver, max_iter=15, random_state=0)
    params.update(kw)
    if task in ("regression", "regression-multi"):
        return MLPRegressor(**params)
    if task == "poisson":
        return MLPRegressor(loss="poisson", **params)
    return MLPClassifier(**params)


def _fitted(task, solver="lbfgs", dtype=np.float64, **kw):
    X, y = _data(task)
    X = X.astype(dtype)
    return _estimator(task, solver, **kw).fit(X, y), X, y


def _roundtrip(model, tmp_path, name="model.fbp", **kw):
    path = tmp_path / name
    fastbp.save(model, path, **kw)
    assert path.is_file()
    return fastbp.load(path), path


def _assert_same_estimator(a, b, X):
    """b (loaded) is a, exactly: parameters, fitted attributes, outputs."""
    assert type(b) is type(a)
    assert b.get_params() == a.get_params()
    assert b._theta.dtype == a._theta.dtype
    assert np.array_equal(b._theta, a._theta)
    assert len(b.coefs_) == len(a.coefs_) and len(b.intercepts_) == len(a.intercepts_)
    for wa, wb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        assert wb.shape == wa.shape and wb.dtype == wa.dtype
        assert np.array_equal(wb, wa)
        assert np.shares_memory(wb, b._theta), "coefs_/intercepts_ must be views of _theta"
    for attr in ("n_features_in_", "n_outputs_", "n_layers_", "out_activation_", "n_iter_",
                 "t_", "loss_", "best_loss_", "best_validation_score_"):
        assert getattr(b, attr) == getattr(a, attr), attr
    assert b.loss_curve_ == a.loss_curve_
    assert b.validation_scores_ == a.validation_scores_
    if isinstance(a, MLPClassifier):
        assert b.classes_.dtype == a.classes_.dtype
        assert np.array_equal(b.classes_, a.classes_)
        proba_a, proba_b = a.predict_proba(X), b.predict_proba(X)
        assert proba_b.dtype == proba_a.dtype
        assert np.array_equal(proba_b, proba_a)
        assert np.array_equal(b.decision_function(X), a.decision_function(X))
    pred_a, pred_b = a.predict(X), b.predict(X)
    assert pred_b.dtype == pred_a.dtype
    assert pred_b.shape == pred_a.shape
    assert np.array_equal(pred_b, pred_a)


# ---------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("task", TASKS)
def test_roundtrip_is_exact(task, solver, dtype, tmp_path):
    est, X, _ = _fitted(task, solver, dtype)
    loaded, _ = _roundtrip(est, tmp_path)
    _assert_same_estimator(est, loaded, X)
    # Predictions on rows the model never saw, too.
    X_new = np.random.default_rng(7).normal(size=(25, X.shape[1])).astype(dtype)
    assert np.array_equal(loaded.predict(X_new), est.predict(X_new))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("task", ["multiclass-str", "regression"])
def test_loaded_model_fits_again(task, solver, tmp_path):
    est, X, y = _fitted(task, solver)
    loaded, _ = _roundtrip(est, tmp_path)
    # A fresh fit of the loaded model is the fit of the same parameters.
    loaded.fit(X, y)
    fresh = clone(est).fit(X, y)
    assert np.array_equal(loaded.predict(X), fresh.predict(X))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("task", ["multiclass-int", "regression"])
def test_loaded_model_continues_training_with_warm_start(task, solver, tmp_path):
    est, X, y = _fitted(task, solver)
    n_before = len(est.loss_curve_)
    loaded, _ = _roundtrip(est, tmp_path)
    loaded.set_params(warm_start=True, max_iter=5)
    loaded.fit(X, y)
    # Training continued from the saved parameters, it did not start over.
    assert len(loaded.loss_curve_) > n_before
    assert loaded.loss_curve_[:n_before] == est.loss_curve_
    assert loaded.loss_curve_[n_before] < est.loss_curve_[0]
    if solver == "lbfgs":
        # No optimizer state to lose: exactly what the original model does.
        est.set_params(warm_start=True, max_iter=5).fit(X, y)
        assert np.array_equal(loaded._theta, est._theta)


@pytest.mark.parametrize("solver", ["sgd", "adam"])
@pytest.mark.parametrize("task", ["multiclass-int", "regression"])
def test_loaded_model_partial_fit(task, solver, tmp_path):
    est, X, y = _fitted(task, solver)
    loaded, _ = _roundtrip(est, tmp_path)
    loaded.partial_fit(X, y)
    assert len(loaded.loss_curve_) == len(est.loss_curve_) + 1
    assert loaded.loss_curve_[-1] < est.loss_curve_[0]


@pytest.mark.parametrize("how", ["warm_start", "partial_fit", "early_stopping"])
def test_loaded_converged_model_continues_training(how, tmp_path):
    # A model saved after it stopped improving (here: a learning rate so small that
    # nothing changes): its next epoch improves by less than tol, which the
    # no-improvement counter must handle after a load as well.
    # With early stopping: a validation score that stopped improving. The validation
    # rows are ceil(0.1 * 80) = 8, so the accuracy moves in steps of 1/8 > tol: after
    # the first epoch it can improve at most 8 times, and n_iter_no_change + 1 = 11
    # epochs without improvement stop the run: at most 9 improving epochs, each followed
    # by at most 11 others, 9 * 12 = 108 < 500 epochs, whatever the rounding.
    if how == "early_stopping":
        est, X, y = _fitted("binary-int", "adam", max_iter=500, learning_rate_init=0.01,
                            early_stopping=True)
        assert est.best_validation_score_ == max(est.validation_scores_)
        # It learned: better than the majority class, 5 of the 8 validation rows (47 of
        # the 80 labels are 1, and the split is stratified).
        assert np.bincount(y).tolist() == [33, 47]
        assert est.best_validation_score_ > 5 / 8
    else:
        est, X, y = _fitted("multiclass-int", "adam", max_iter=200,
                            learning_rate_init=1e-7)
    assert est.n_iter_ < est.max_iter  # it stopped on its own
    loaded, _ = _roundtrip(est, tmp_path)
    if how == "partial_fit":
        loaded.partial_fit(X, y)
        assert loaded.n_iter_ == 1
    else:
        loaded.set_params(warm_start=True, max_iter=5).fit(X, y)
        assert 1 <= loaded.n_iter_ <= 5
    assert np.isfinite(loaded._theta).all()
    if how == "early_stopping":
        # The loaded model carries the saved scores on: the best never gets worse.
        assert loaded.validation_scores_[:len(est.validation_scores_)] == \
            est.validation_scores_
        assert loaded.best_validation_score_ == max(loaded.validation_scores_)
        assert loaded.best_validation_score_ >= est.best_validation_score_


@pytest.mark.parametrize("solver", ["sgd", "adam"])
@pytest.mark.parametrize("task", ["multiclass-str", "regression"])
def test_roundtrip_with_early_stopping(task, solver, tmp_path):
    est, X, _ = _fitted(task, solver, early_stopping=True, max_iter=20)
    assert est.validation_scores_ and est.best_validation_score_ is not None
    loaded, _ = _roundtrip(est, tmp_path)
    _assert_same_estimator(est, loaded, X)
    assert loaded.early_stopping is True


@pytest.mark.parametrize("task", ["multiclass-str", "binary-int", "regression"])
def test_roundtrip_keeps_dataframe_feature_names(task, tmp_path):
    X, y = _data(task)
    columns = ["height", "width", "depth", "mass"]
    df = pd.DataFrame(X, columns=columns)
    target = pd.Series(y) if y.ndim == 1 else y
    est = _estimator(task, "lbfgs").fit(df, target)
    loaded, _ = _roundtrip(est, tmp_path)
    assert list(loaded.feature_names_in_) == columns
    assert np.array_equal(loaded.feature_names_in_, est.feature_names_in_)
    assert np.array_equal(loaded.predict(df), est.predict(df))
    if isinstance(est, MLPClassifier):
        assert np.array_equal(loaded.predict_proba(df), est.predict_proba(df))
    # Column names are still checked.
    with pytest.raises(ValueError, match="feature names"):
        loaded.predict(df.rename(columns={"mass": "weight"}))


def test_roundtrip_hidden_layers_and_sparse_input(tmp_path):
    X, y = _data("multiclass-int")
    X[np.abs(X) < 0.8] = 0.0
    Xs = sp.csr_matrix(X)
    est = MLPClassifier(hidden_layer_sizes=(6, 4, 3), activation="tanh", solver="lbfgs",
                        max_iter=20, random_state=1).fit(Xs, y)
    loaded, _ = _roundtrip(est, tmp_path)
    _assert_same_estimator(est, loaded, Xs)
    assert [c.shape for c in loaded.coefs_] == [(4, 6), (6, 4), (4, 3), (3, 3)]


@pytest.mark.parametrize("activation", ["identity", "logistic", "tanh", "relu",
                                        "leaky_relu", "elu", "gelu", "silu", "softplus"])
def test_roundtrip_every_activation(activation, tmp_path):
    est, X, _ = _fitted("regression", "lbfgs", activation=activation)
    loaded, _ = _roundtrip(est, tmp_path)
    _assert_same_estimator(est, loaded, X)


@pytest.mark.parametrize("activation", [("gelu", "tanh", "softplus"),
                                        ["silu", "elu", "relu"]], ids=["tuple", "list"])
def test_roundtrip_one_activation_per_hidden_layer(activation, tmp_path):
    est, X, _ = _fitted("multiclass-int", "lbfgs", hidden_layer_sizes=(6, 5, 4),
                        activation=activation)
    loaded, path = _roundtrip(est, tmp_path)
    # JSON keeps the names as a list; loading gives the tuple, as for hidden_layer_sizes.
    assert _meta(_members(path))["activation"] == list(activation)
    assert loaded.activation == tuple(activation)
    assert loaded._net.activation == est._net.activation == tuple(activation)
    if isinstance(activation, tuple):
        _assert_same_estimator(est, loaded, X)
    else:
        np.testing.assert_array_equal(loaded._theta, est._theta)
        np.testing.assert_array_equal(loaded.predict_proba(X), est.predict_proba(X))
    # It trains on as the network it was (a warm start checks the activations).
    loaded.set_params(warm_start=True, max_iter=2).fit(X, _data("multiclass-int")[1])


@pytest.mark.parametrize("task", ["multiclass-str", "regression"])
def test_roundtrip_pipeline_as_saved_by_the_command(task, tmp_path):
    X, y = _data(task)
    X = X * [1.0, 10.0, 100.0, 0.1] + [0.0, 5.0, -3.0, 1.0]
    model = Pipeline([("scaler", StandardScaler()),
                      ("mlp", _estimator(task, "adam", max_iter=20))]).fit(X, y)
    meta = {"task": "x", "feature_names": ["a", "b", "c", "d"], "score": 0.5}
    loaded, path = _roundtrip(model, tmp_path, metadata=meta)
    assert isinstance(loaded, Pipeline)
    assert [name for name, _ in loaded.steps] == ["scaler", "mlp"]
    s0, s1 = model.named_steps["scaler"], loaded.named_steps["scaler"]
    assert isinstance(s1, StandardScaler)
    for attr in ("mean_", "scale_", "var_"):
        assert np.array_equal(getattr(s1, attr), getattr(s0, attr)), attr
    assert s1.n_samples_seen_ == s0.n_samples_seen_
    assert s1.n_features_in_ == s0.n_features_in_
    assert (s1.with_mean, s1.with_std) == (s0.with_mean, s0.with_std)
    _assert_same_estimator(model.named_steps["mlp"], loaded.named_steps["mlp"],
                           s0.transform(X))
    assert np.array_equal(loaded.predict(X), model.predict(X))
    if task != "regression":
        assert np.array_equal(loaded.predict_proba(X), model.predict_proba(X))
    again, user = fastbp.load(path, return_metadata=True)
    assert user == meta
    assert np.array_equal(again.predict(X), model.predict(X))


def test_roundtrip_pipeline_on_sparse_input_without_centering(tmp_path):
    X, y = _data("binary-int")
    X[np.abs(X) < 0.5] = 0.0
    Xs = sp.csr_matrix(X)
    model = Pipeline([("scaler", StandardScaler(with_mean=False)),
                      ("mlp", MLPClassifier((4,), solver="lbfgs", max_iter=20,
                                            random_state=0))]).fit(Xs, y)
    loaded, _ = _roundtrip(model, tmp_path)
    assert loaded.named_steps["scaler"].with_mean is False
    assert np.array_equal(loaded.named_steps["scaler"].scale_,
                          model.named_steps["scaler"].scale_)
    assert np.array_equal(loaded.predict(Xs), model.predict(Xs))
    assert np.array_equal(loaded.predict_proba(Xs), model.predict_proba(Xs))


def test_roundtrip_pipeline_fitted_on_dataframe(tmp_path):
    X, y = _data("multiclass-int")
    df = pd.DataFrame(X, columns=["p", "q", "r", "s"])
    model = Pipeline([("scaler", StandardScaler()),
                      ("mlp", MLPClassifier((4,), solver="lbfgs", max_iter=20,
                                            random_state=0))]).fit(df, y)
    loaded, _ = _roundtrip(model, tmp_path)
    assert list(loaded.named_steps["scaler"].feature_names_in_) == ["p", "q", "r", "s"]
    assert list(loaded.feature_names_in_) == ["p", "q", "r", "s"]
    assert np.array_equal(loaded.predict(df), model.predict(df))


def test_load_and_save_accept_str_and_pathlib(tmp_path):
    est, X, _ = _fitted("binary-int")
    fastbp.save(est, str(tmp_path / "a.fbp"))
    fastbp.save(est, tmp_path / "b.fbp")
    for p in (str(tmp_path / "a.fbp"), tmp_path / "b.fbp"):
        assert np.array_equal(fastbp.load(p).predict(X), est.predict(X))
    # The file is written where asked, with no extension added.
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.fbp", "b.fbp"]


def test_load_without_metadata_returns_empty_dict(tmp_path):
    est, _, _ = _fitted("regression")
    fastbp.save(est, tmp_path / "m.fbp")
    model, user = fastbp.load(tmp_path / "m.fbp", return_metadata=True)
    assert isinstance(model, MLPRegressor)
    assert user == {}


# ---------------------------------------------------------------------------------------
# The format


def _members(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write_members(path, arrays):
    # Through a file object: np.savez would append ".npz" to a str path.
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _meta(arrays):
    return json.loads(arrays["__fastbp__"].tobytes().decode("utf-8"))


def _with_meta(arrays, meta):
    out = dict(arrays)
    out["__fastbp__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return out


def test_file_is_a_zip_of_plain_npy_arrays_with_json_metadata(tmp_path):
    X, y = _data("multiclass-str")
    model = Pipeline([("scaler", StandardScaler()),
                      ("mlp", MLPClassifier((5,), solver="lbfgs", max_iter=10,
                                            random_state=0))]).fit(X, y)
    path = tmp_path / "m.fbp"
    fastbp.save(model, path, metadata={"target": "species"})
    assert zipfile.is_zipfile(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert names and all(n.endswith(".npy") for n in names)
    arrays = _members(path)  # every member loads without pickle
    assert all(a.dtype != object for a in arrays.values())
    assert {"__fastbp__", "theta", "classes", "loss_curve", "scaler_mean",
            "scaler_scale"} <= set(arrays)
    assert arrays["__fastbp__"].dtype == np.uint8
    meta = _meta(arrays)
    assert meta["format"] == "fastbp-model"
    assert meta["version"] == fastbp._io.FORMAT_VERSION == 1
    assert meta["estimator"] == "MLPClassifier"
    assert meta["user"] == {"target": "species"}
    mlp = model.named_steps["mlp"]
    assert np.array_equal(arrays["theta"], mlp._theta)
    assert arrays["classes"].tolist() == ["ant", "bee", "cat"]


# ---------------------------------------------------------------------------------------
# Files that load refuses


@pytest.fixture
def saved(tmp_path):
    """A valid model file (a multiclass classifier) and its arrays."""
    est, X, _ = _fitted("multiclass-int", "adam")
    path = tmp_path / "good.fbp"
    fastbp.save(est, path)
    return path, _members(path), est, X


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastbp.load(tmp_path / "nothere.fbp")


@pytest.mark.parametrize("kind", ["random-bytes", "truncated", "text", "empty",
                                  "foreign-npz", "single-npy", "member-not-npy",
                                  "bit-flipped"])
def test_load_refuses_files_that_are_not_models(kind, saved, tmp_path):
    good, arrays, _, _ = saved
    path = tmp_path / f"{kind}.fbp"
    raw = good.read_bytes()
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    elif kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "text":
        path.write_text("a,b,y\n1,2,0\n3,4,1\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign-npz":
        _write_members(path, {"a": np.arange(5.0), "theta": arrays["theta"]})
    elif kind == "single-npy":
        with open(path, "wb") as fh:
            np.save(fh, arrays["theta"])
    elif kind == "member-not-npy":
        # A well-formed zip whose theta member is not an .npy array.
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
            for name in zin.namelist():
                zout.writestr(name, b"garbage" if name == "theta.npy" else zin.read(name))
    elif kind == "bit-flipped":
        # Corrupt the stored bytes of the theta member: the zip CRC no longer matches.
        i = raw.find(b"theta.npy")
        assert i > 0
        data = bytearray(raw)
        j = i + 200
        data[j:j + 16] = bytes(b ^ 0xFF for b in data[j:j + 16])
        path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        fastbp.load(path)
    assert str(path) in str(info.value) or path.name in str(info.value)


def test_load_refuses_a_newer_format_version(saved, tmp_path):
    _, arrays, _, _ = saved
    meta = _meta(arrays)
    meta["version"] = 999
    path = tmp_path / "future.fbp"
    _write_members(path, _with_meta(arrays, meta))
    with pytest.raises(ValueError, match="version") as info:
        fastbp.load(path)
    assert "999" in str(info.value)


class _Payload:
    """Unpickling this object creates ``marker`` (a harmless, observable effect)."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _pickle_member(marker):
    a = np.empty(1, dtype=object)
    a[0] = _Payload(marker)
    return a


@pytest.mark.parametrize("member", ["extra", "__fastbp__", "theta", "classes"])
def test_load_never_unpickles(member, saved, tmp_path):
    _, arrays, _, _ = saved
    marker = tmp_path / "executed.marker"

    def build(path, marker):
        out = dict(arrays)
        out["payload" if member == "extra" else member] = _pickle_member(marker)
        _write_members(path, out)

    # The payload is live: loading that member the unsafe way runs it.
    probe_marker = tmp_path / "probe.marker"
    build(tmp_path / "probe.fbp", probe_marker)
    with np.load(tmp_path / "probe.fbp", allow_pickle=True) as npz:
        npz["payload" if member == "extra" else member]
    assert probe_marker.exists()

    path = tmp_path / "evil.fbp"
    build(path, marker)
    with pytest.raises(ValueError, match=INVALID):
        fastbp.load(path)
    with pytest.raises(ValueError, match=INVALID):
        fastbp.load(path, return_metadata=True)
    assert not marker.exists(), "load executed code from the file"


def test_load_refuses_a_standalone_pickle(tmp_path):
    import pickle
    marker = tmp_path / "executed.marker"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError):
        fastbp.load(path)
    assert not marker.exists()


def _tamper(kind, arrays, meta):
    arrays = dict(arrays)
    theta = arrays["theta"]
    if kind == "theta-too-short":
        arrays["theta"] = theta[:-1]
    elif kind == "theta-too-long":
        arrays["theta"] = np.append(theta, 0.5)
    elif kind == "theta-2d":
        arrays["theta"] = theta.reshape(1, -1)
    elif kind == "theta-float32":
        arrays["theta"] = theta.astype(np.float32)
    elif kind == "theta-int":
        arrays["theta"] = theta.astype(np.int64)
    elif kind == "theta-str":
        arrays["theta"] = theta.astype(str)
    elif kind == "theta-nan":
        arrays["theta"] = theta.copy()
        arrays["theta"][3] = np.nan
    elif kind == "theta-inf":
        arrays["theta"] = theta.copy()
        arrays["theta"][0] = np.inf
    elif kind == "theta-missing":
        del arrays["theta"]
    elif kind == "classes-extra":
        arrays["classes"] = np.append(arrays["classes"], 9)
    elif kind == "classes-fewer":
        arrays["classes"] = arrays["classes"][:2]
    elif kind == "classes-2d":
        arrays["classes"] = arrays["classes"].reshape(1, -1)
    elif kind == "classes-missing":
        del arrays["classes"]
    elif kind == "unknown-estimator":
        meta["estimator"] = "MLPTransformer"
    elif kind == "foreign-estimator":
        meta["estimator"] = "os.system"
    elif kind == "unknown-param":
        meta["params"]["bogus"] = 1
    elif kind == "invalid-param-value":
        meta["params"]["activation"] = "swish"
    elif kind == "activation-list-wrong-length":
        meta["params"]["activation"] = ["relu", "relu"]   # one hidden layer
    elif kind == "activation-not-a-name":
        meta["params"]["activation"] = [7]
    elif kind == "activation-mismatch":
        meta["activation"] = "gelu"   # the parameters say relu
    elif kind == "hidden-sizes-mismatch":
        meta["params"]["hidden_layer_sizes"] = [7]
    elif kind == "layer-sizes-mismatch":
        meta["layer_sizes"] = [4, 5, 4]
    elif kind == "n-features-mismatch":
        meta["attributes"]["n_features_in_"] = 3
    elif kind == "bad-dtype":
        meta["dtype"] = "int64"
    elif kind == "not-a-dtype":
        meta["dtype"] = "banana"
    elif kind == "bad-output-activation":
        meta["attributes"]["out_activation_"] = "eval"
    elif kind == "bad-label-type":
        meta["label_binarizer"]["y_type_"] = "continuous"
    elif kind == "wrong-format-name":
        meta["format"] = "something-else"
    elif kind == "version-zero":
        meta["version"] = 0
    elif kind == "version-string":
        meta["version"] = "1"
    elif kind == "params-not-a-dict":
        meta["params"] = [1, 2, 3]
    elif kind == "user-not-a-dict":
        meta["user"] = [1, 2]
    elif kind == "loss-curve-str":
        arrays["loss_curve"] = np.array(["a", "b"])
    elif kind == "feature-names-wrong-length":
        arrays["feature_names_in"] = np.array(["a", "b"])
    elif kind == "metadata-not-json":
        arrays["__fastbp__"] = np.frombuffer(b"{not json", dtype=np.uint8)
        return arrays
    elif kind == "metadata-not-utf8":
        arrays["__fastbp__"] = np.frombuffer(b"\xff\xfe\x00", dtype=np.uint8)
        return arrays
    elif kind == "metadata-not-bytes":
        arrays["__fastbp__"] = np.arange(10.0)
        return arrays
    elif kind == "metadata-not-an-object":
        arrays["__fastbp__"] = np.frombuffer(b"[1, 2]", dtype=np.uint8)
        return arrays
    else:
        raise AssertionError(kind)
    return _with_meta(arrays, meta)


TAMPERING = ["theta-too-short", "theta-too-long", "theta-2d", "theta-float32", "theta-int",
             "theta-str", "theta-nan", "theta-inf", "theta-missing", "classes-extra",
             "classes-fewer", "classes-2d", "classes-missing", "unknown-estimator",
             "foreign-estimator", "unknown-param", "invalid-param-value",
             "activation-list-wrong-length", "activation-not-a-name", "activation-mismatch",
             "hidden-sizes-mismatch", "layer-sizes-mismatch", "n-features-mismatch",
             "bad-dtype", "not-a-dtype", "bad-output-activation", "bad-label-type",
             "wrong-format-name", "version-zero", "version-string", "params-not-a-dict",
             "user-not-a-dict", "loss-curve-str", "feature-names-wrong-length",
             "metadata-not-json", "metadata-not-utf8", "metadata-not-bytes",
             "metadata-not-an-object"]


@pytest.mark.parametrize("kind", TAMPERING)
def test_load_refuses_tampered_files(kind, saved, tmp_path):
    _, arrays, _, _ = saved
    if kind == "feature-names-wrong-length":
        # Needs a model that stores feature names.
        X, y = _data("multiclass-int")
        est = MLPClassifier((5,), solver="lbfgs", max_iter=10, random_state=0).fit(
            pd.DataFrame(X, columns=list("abcd")), y)
        fastbp.save(est, tmp_path / "named.fbp")
        arrays = _members(tmp_path / "named.fbp")
    path = tmp_path / "tampered.fbp"
    _write_members(path, _tamper(kind, arrays, _meta(arrays)))
    with pytest.raises(ValueError, match=INVALID):
        fastbp.load(path)


@pytest.mark.parametrize("kind", ["scale-zero", "scale-nan", "mean-wrong-length",
                                  "mean-missing", "binary-with-three-classes"])
def test_load_refuses_inconsistent_pipelines(kind, tmp_path):
    X, y = _data("binary-int")
    model = Pipeline([("scaler", StandardScaler()),
                      ("mlp", MLPClassifier((4,), solver="lbfgs", max_iter=10,
                                            random_state=0))]).fit(X, y)
    fastbp.save(model, tmp_path / "good.fbp")
    arrays = _members(tmp_path / "good.fbp")
    if kind == "scale-zero":
        arrays["scaler_scale"] = np.zeros_like(arrays["scaler_scale"])
    elif kind == "scale-nan":
        arrays["scaler_scale"] = np.full_like(arrays["scaler_scale"], np.nan)
    elif kind == "mean-wrong-length":
        arrays["scaler_mean"] = arrays["scaler_mean"][:-1]
    elif kind == "mean-missing":
        del arrays["scaler_mean"]
    elif kind == "binary-with-three-classes":
        arrays["classes"] = np.array([0, 1, 2])
    path = tmp_path / "bad.fbp"
    _write_members(path, arrays)
    with pytest.raises(ValueError, match=INVALID):
        fastbp.load(path)


def test_untampered_copy_still_loads(saved, tmp_path):
    # The rewriting used by the tamper tests keeps a valid file valid.
    _, arrays, est, X = saved
    path = tmp_path / "copy.fbp"
    _write_members(path, _with_meta(arrays, _meta(arrays)))
    _assert_same_estimator(est, fastbp.load(path), X)


# ---------------------------------------------------------------------------------------
# What save refuses


def test_save_refuses_unfitted_estimators(tmp_path):
    for est in (MLPClassifier(), MLPRegressor(),
                Pipeline([("scaler", StandardScaler()), ("mlp", MLPClassifier())])):
        path = tmp_path / "unfitted.fbp"
        with pytest.raises((TypeError, ValueError), match="fit"):
            fastbp.save(est, path)
        assert not path.exists()


def test_save_refuses_a_pipeline_with_an_unfitted_scaler(tmp_path):
    est, _, _ = _fitted("binary-int")
    model = Pipeline([("scaler", StandardScaler()), ("mlp", est)])
    with pytest.raises(ValueError, match="fitted"):
        fastbp.save(model, tmp_path / "m.fbp")
    assert not (tmp_path / "m.fbp").exists()


def test_save_refuses_models_that_are_not_fastbp(tmp_path):
    X, y = _data("binary-int")
    sk = sk_nn.MLPClassifier((4,), max_iter=50, random_state=0).fit(X, y)
    est, _, _ = _fitted("binary-int")
    others = [
        sk,
        Pipeline([("scaler", StandardScaler()), ("mlp", sk)]).fit(X, y),
        Pipeline([("scaler", MinMaxScaler()), ("mlp", clone(est))]).fit(X, y),
        Pipeline([("a", StandardScaler()), ("b", StandardScaler()),
                  ("mlp", clone(est))]).fit(X, y),
        {"theta": est._theta},
        None,
    ]
    for other in others:
        path = tmp_path / "other.fbp"
        with pytest.raises((TypeError, ValueError)):
            fastbp.save(other, path)
        assert not path.exists()


def test_save_refuses_metadata_that_is_not_json(tmp_path):
    est, _, _ = _fitted("binary-int")
    with pytest.raises(TypeError, match="JSON"):
        fastbp.save(est, tmp_path / "m.fbp", metadata={"when": object()})
    assert not (tmp_path / "m.fbp").exists()
