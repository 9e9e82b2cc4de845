"""ONNX export (fastbp.to_onnx, the 'onnx' extra): onnxruntime gives predict and
predict_proba's answers."""
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits, make_multilabel_classification
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import fastbp
from fastbp import MLPAutoencoder, MLPClassifier, MLPRegressor, _core

pytest.importorskip("skl2onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

ACTIVATIONS = sorted(_core.ACTIVATIONS)


def _run(onx, X):
    session = ort.InferenceSession(onx.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"X": X})


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16).astype(np.float32), y


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return ((X - X.mean(0)) / X.std(0)).astype(np.float32), (y / y.std()).astype(np.float32)


# float32 graphs: onnxruntime's and fastbp's sums differ in order; outputs are probabilities
# (bounded by 1) or targets of unit scale, so 1e-5 absolute leaves ~100 ulps of margin.
TOL32 = 1e-5


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_classifier_every_activation(digits, activation):
    X, y = digits
    clf = MLPClassifier((24,), activation=activation, max_iter=15, random_state=0).fit(X, y)
    labels, proba = _run(fastbp.to_onnx(clf, X[:2]), X)
    np.testing.assert_allclose(proba, clf.predict_proba(X), rtol=0, atol=TOL32)
    # Labels: argmax of the same probabilities (ties within rounding aside).
    margin = np.sort(proba, axis=1)[:, -1] - np.sort(proba, axis=1)[:, -2]
    clear = margin > 1e-4
    np.testing.assert_array_equal(labels[clear], clf.predict(X)[clear])
    assert clear.mean() > 0.95


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", ["squared_error", "poisson"])
def test_regressor_every_activation(diabetes, activation, loss):
    X, y = diabetes
    y = np.abs(y) if loss == "poisson" else y
    reg = MLPRegressor(loss=loss, hidden_layer_sizes=(16, 8), activation=activation,
                       max_iter=20, random_state=0).fit(X, y)
    (out,) = _run(fastbp.to_onnx(reg, X[:2]), X)
    np.testing.assert_allclose(out.ravel(), reg.predict(X), rtol=TOL32, atol=TOL32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autoencoder_code(digits, activation):
    X, _ = digits
    ae = MLPAutoencoder((24, 6, 24), activation=activation, max_iter=10,
                        random_state=0).fit(X)
    (code,) = _run(fastbp.to_onnx(ae, X[:2]), X)
    np.testing.assert_allclose(code, ae.transform(X), rtol=TOL32, atol=TOL32)
    pipe = make_pipeline(StandardScaler(), MLPAutoencoder(
        (16, 4, 16), activation=activation, code_layer=0, max_iter=5,
        random_state=0)).fit(X)
    (code,) = _run(fastbp.to_onnx(pipe, X[:2]), X)
    np.testing.assert_allclose(code, pipe.transform(X), rtol=TOL32, atol=TOL32)


def test_float64_graph_is_exact_to_rounding(digits):
    X, y = digits
    X64 = X.astype(np.float64)
    clf = MLPClassifier((24,), solver="lbfgs", max_iter=30, random_state=0).fit(X64, y)
    labels, proba = _run(fastbp.to_onnx(clf, X64[:2]), X64)
    np.testing.assert_allclose(proba, clf.predict_proba(X64), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(labels, clf.predict(X64))


def test_pipeline_with_a_scaler(digits):
    X, y = digits
    X = X * 16 + 3
    pipe = make_pipeline(StandardScaler(), MLPClassifier((16,), max_iter=10,
                                                         random_state=0)).fit(X, y)
    labels, proba = _run(fastbp.to_onnx(pipe, X[:2]), X)
    np.testing.assert_allclose(proba, pipe.predict_proba(X), rtol=0, atol=TOL32)
    assert (labels == pipe.predict(X)).mean() > 0.99


def test_binary_string_labels_and_integral_float_labels(digits):
    X, y = digits
    names = np.where(y > 4, "big", "small")
    clf = MLPClassifier((8,), max_iter=10, random_state=0).fit(X, names)
    labels, proba = _run(fastbp.to_onnx(clf, X[:2]), X)
    np.testing.assert_allclose(proba, clf.predict_proba(X), rtol=0, atol=TOL32)
    assert proba.shape == (len(X), 2)
    assert (labels.astype(str) == clf.predict(X)).mean() > 0.99
    floats = MLPClassifier((8,), max_iter=10, random_state=0).fit(X, (y > 4) * 1.0)
    labels, _ = _run(fastbp.to_onnx(floats, X[:2]), X)
    assert (labels == floats.predict(X)).mean() > 0.99


def test_multilabel(digits):
    X, Y = make_multilabel_classification(300, 10, n_classes=4, random_state=0)
    X = X.astype(np.float32)
    clf = MLPClassifier((16,), max_iter=30, random_state=0).fit(X, Y)
    labels, proba = _run(fastbp.to_onnx(clf, X[:2]), X)
    np.testing.assert_allclose(proba, clf.predict_proba(X), rtol=0, atol=TOL32)
    clear = (np.abs(proba - 0.5) > 1e-4).all(axis=1)
    np.testing.assert_array_equal(labels[clear], clf.predict(X)[clear])


@pytest.mark.parametrize("model, X_sample, error, match", [
    ("unfitted", "ok", ValueError, "not fitted"),
    ("scaler", "ok", TypeError, "fastbp MLPClassifier, MLPRegressor or MLPAutoencoder"),
    ("fitted", "1d", ValueError, "2-D float32 or float64"),
    ("fitted", "int", ValueError, "2-D float32 or float64"),
    ("fitted", "narrow", ValueError, "features"),
])
def test_bad_arguments(digits, model, X_sample, error, match):
    X, y = digits
    models = {"unfitted": MLPClassifier(), "scaler": StandardScaler().fit(X),
              "fitted": MLPClassifier((4,), max_iter=2, random_state=0).fit(X, y)}
    samples = {"ok": X[:2], "1d": X[0], "int": X[:2].astype(int), "narrow": X[:2, :5]}
    with pytest.raises(error, match=match):
        fastbp.to_onnx(models[model], samples[X_sample])


def test_cli_writes_an_onnx_model(tmp_path):
    onnx_path, model_path = tmp_path / "model.onnx", tmp_path / "model.fbp"
    run = subprocess.run([sys.executable, "-m", "fastbp.cli", "train", "--quiet",
                          "--max-iter", "5", "--hidden", "16", "--output", str(model_path),
                          "--onnx", str(onnx_path)],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    X, _ = load_digits(return_X_y=True)
    labels, proba = _run_file(onnx_path, X.astype(np.float32))
    model = fastbp.load(model_path)
    np.testing.assert_allclose(proba, model.predict_proba(X), rtol=0, atol=TOL32)


def _run_file(path, X):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": X})
