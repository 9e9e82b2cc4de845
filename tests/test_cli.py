"""Tests of the ``fastbp`` command: ``fastbp train`` and ``fastbp predict``.

Every command runs in a subprocess (``python -m fastbp.cli``, and the installed ``fastbp``
console script), the way a user runs it. Starting Python with scikit-learn takes about two
seconds, so the runs are prepared up front by module-scoped fixtures and executed two at
a time; each test then checks the outcome of its runs.
"""
import concurrent.futures
import contextlib
import csv
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import dump_svmlight_file, load_digits, load_svmlight_file
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import fastbp
from fastbp import MLPClassifier, MLPRegressor
from fastbp.cli import main

TIMEOUT = 300
WORKERS = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------
# Running the command


def _console_script():
    """The installed ``fastbp`` script, preferring the one next to this interpreter."""
    bindir = os.path.dirname(sys.executable)
    return shutil.which("fastbp", path=bindir + os.pathsep + os.environ.get("PATH", ""))


def _command(args, script=False):
    if script:
        assert _console_script(), "the fastbp console script is not on PATH: pip install ."
    head = [_console_script()] if script else [sys.executable, "-m", "fastbp.cli"]
    return head + [str(a) for a in args]


def cli(args, cwd, *, script=False, env=None):
    return subprocess.run(_command(args, script), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def cli_with_terminal_stderr(args, cwd):
    """Run with stderr on a pseudo-terminal (100 columns); returns (rc, stdout, tty text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(_command(args), cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], TIMEOUT)
            if not ready:
                proc.kill()
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read()
        proc.wait(timeout=TIMEOUT)
    finally:
        os.close(master)
        proc.stdout.close()
    return proc.returncode, out.decode(), b"".join(chunks).decode("utf-8", "replace")


def run_concurrently(jobs):
    """Run callables two at a time; returns name -> Future (result() re-raises)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return {name: pool.submit(job) for name, job in jobs.items()}


# ---------------------------------------------------------------------------------------
# Files and output


def num(v):
    """A number as CSV text that reads back exactly."""
    return repr(float(v))


def write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def read_csv(path_or_text):
    if isinstance(path_or_text, Path):
        path_or_text = path_or_text.read_text()
    rows = list(csv.reader(io.StringIO(path_or_text)))
    return rows[0], rows[1:]


def reported(stdout, label):
    """The number printed after ``label:`` (e.g. 'test accuracy'), as text."""
    m = re.search(rf"^{re.escape(label)}:\s+(-?[0-9.]+)\s*$", stdout, re.M)
    assert m, f"no {label!r} line in:\n{stdout}"
    return m.group(1)


def columns(header, rows, names, conv=float):
    idx = [header.index(n) for n in names]
    return np.array([[conv(r[j]) for j in idx] for r in rows])


def assert_ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\n" \
                                f"stderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr


def assert_one_line_error(res, *needles):
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{res.stderr}"
    assert lines[0].startswith("fastbp: error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert res.returncode == 2, (res.returncode, res.stderr)


def assert_png(path, min_size=100):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] >= min_size and img.shape[1] >= min_size
    assert float(img[..., :3].min()) < float(img[..., :3].max())  # not a blank canvas
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
        assert im.size == (img.shape[1], img.shape[0])


def final_step(model):
    assert isinstance(model, Pipeline)
    assert [type(s) for _, s in model.steps][0] is StandardScaler
    return model.steps[-1][1]


# ---------------------------------------------------------------------------------------
# Data sets


def _animals(n=150, seed=0):
    """Three well-separated string classes; columns length, weight, height."""
    rng = np.random.default_rng(seed)
    names = np.array(["bird", "cat", "dog"])
    k = rng.integers(0, 3, n)
    centers = np.array([[1.0, 0.2, 0.5], [3.0, 4.0, 1.5], [6.0, 20.0, 3.0]])
    X = centers[k] + rng.normal(scale=[0.3, 1.0, 0.2], size=(n, 3))
    return X, names[k]


def _houses(n=160, seed=1):
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.integers(1, 7, n), rng.uniform(30, 200, n),
                         rng.uniform(0, 80, n)]).astype(float)
    price = 20 * X[:, 0] + 1.5 * X[:, 1] - 0.8 * X[:, 2] + rng.normal(scale=2.0, size=n)
    return X, price


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The successful runs, each scenario in its own directory, two at a time."""
    base = tmp_path_factory.mktemp("cli")
    jobs = {}

    def scenario(name):
        d = base / name
        d.mkdir()
        return d

    # Done-when check: defaults on digits, through the console script.
    d_digits = scenario("digits")

    def digits():
        train = cli(["train", "--test-data-out", "heldout.csv"], d_digits, script=True)
        predict = cli(["predict", "model.fbp", "heldout.csv", "--output", "preds.csv"],
                      d_digits)
        return d_digits, train, predict
    jobs["digits"] = digits

    # CSV with string labels; prediction input with its columns reordered plus extras.
    d_str = scenario("strings")
    X, y = _animals()
    write_csv(d_str / "animals.csv", ["length", "weight", "height", "species"],
              [[*map(num, r), lab] for r, lab in zip(X, y)])
    X_new, _ = _animals(n=30, seed=5)
    write_csv(d_str / "new.csv", ["id", "height", "length", "note", "weight"],
              [[i, num(r[2]), num(r[0]), 7.5, num(r[1])] for i, r in enumerate(X_new)])

    def strings():
        train = cli(["train", "animals.csv", "--target", "species", "--solver", "lbfgs",
                     "--hidden", "8", "--max-iter", "300", "--output", "animals.fbp",
                     "--test-data-out", "held.csv"], d_str)
        predict = cli(["predict", "animals.fbp", "new.csv"], d_str)
        proba = cli(["predict", "animals.fbp", "new.csv", "--proba", "--output",
                     "proba.csv"], d_str)
        held = cli(["predict", "animals.fbp", "held.csv"], d_str)
        return d_str, train, predict, proba, held
    jobs["strings"] = strings

    # Regression CSV, with a plot; predicting on the training file itself (its target
    # column is ignored).
    d_reg = scenario("regression")
    X, price = _houses()
    write_csv(d_reg / "houses.csv", ["rooms", "area", "age", "price"],
              [[*map(num, r), num(p)] for r, p in zip(X, price)])

    def regression():
        train = cli(["train", "houses.csv", "--solver", "lbfgs", "--hidden", "8",
                     "--max-iter", "300", "--output", "houses.fbp", "--plot",
                     "curve.png"], d_reg)
        predict = cli(["predict", "houses.fbp", "houses.csv"], d_reg)
        return d_reg, train, predict
    jobs["regression"] = regression

    # --target naming a middle column of integer labels; the last column is continuous.
    d_mid = scenario("middle")
    rng = np.random.default_rng(2)
    Xm = rng.normal(size=(120, 3))
    ym = (Xm[:, 0] - Xm[:, 2] > 0).astype(int)
    write_csv(d_mid / "mid.csv", ["a", "label", "b", "c"],
              [[num(r[0]), int(t), num(r[1]), num(r[2])] for r, t in zip(Xm, ym)])

    def middle():
        train = cli(["train", "mid.csv", "--target", "label", "--solver", "lbfgs",
                     "--hidden", "6", "--max-iter", "200", "--test-size", "0.25",
                     "--test-data-out", "mid_test.csv", "--output", "mid.fbp"], d_mid)
        predict = cli(["predict", "mid.fbp", "mid_test.csv", "--output", "preds.csv"],
                      d_mid)
        return d_mid, train, predict
    jobs["middle"] = middle

    # NPZ input and output, with every training option set.
    d_npz = scenario("npz")
    rng = np.random.default_rng(3)
    Xn = rng.normal(size=(200, 5))
    yn = np.digitize(Xn[:, 0] + Xn[:, 1], [-0.6, 0.6])
    np.savez(d_npz / "data.npz", X=Xn, y=yn)

    def npz():
        train = cli(["train", "data.npz", "--hidden", "8,4", "--activation", "tanh",
                     "--solver", "sgd", "--alpha", "0.01", "--batch-size", "16",
                     "--random-state", "3", "--max-iter", "40", "--task", "classification",
                     "--test-data-out", "held.npz", "--output", "net.fbp"], d_npz)
        predict = cli(["predict", "net.fbp", "held.npz", "--output", "preds.csv"], d_npz)
        return d_npz, train, predict
    jobs["npz"] = npz

    # svmlight input (sparse); prediction from a .txt svmlight file.
    d_svm = scenario("svmlight")
    rng = np.random.default_rng(4)
    Xs = rng.normal(size=(150, 6)) * (rng.random((150, 6)) < 0.5)
    ys = (Xs[:, 0] + Xs[:, 1] - Xs[:, 2] > 0).astype(int)
    dump_svmlight_file(Xs, ys, str(d_svm / "train.svm"))
    dump_svmlight_file(Xs[:20], ys[:20], str(d_svm / "new.txt"))

    def svmlight():
        train = cli(["train", "train.svm", "--solver", "lbfgs", "--hidden", "6",
                     "--max-iter", "200", "--output", "svm.fbp"], d_svm)
        predict = cli(["predict", "svm.fbp", "new.txt"], d_svm)
        return d_svm, train, predict
    jobs["svmlight"] = svmlight

    # --task regression on integer targets, --quiet.
    d_int = scenario("intreg")
    rng = np.random.default_rng(5)
    Xi = rng.uniform(0, 1, size=(100, 2))
    yi = np.round(4 * Xi[:, 0] * Xi[:, 1]).astype(int)
    write_csv(d_int / "counts.csv", ["x1", "x2", "count"],
              [[num(r[0]), num(r[1]), int(t)] for r, t in zip(Xi, yi)])

    def intreg():
        train = cli(["train", "counts.csv", "--task", "regression", "--solver", "lbfgs",
                     "--hidden", "4", "--max-iter", "100", "--quiet", "--output",
                     "counts.fbp"], d_int)
        return d_int, train
    jobs["intreg"] = intreg

    # --plot with early stopping (the regression scenario plots without).
    d_es = scenario("plot_es")

    def plot_es():
        return d_es, cli(["train", "--hidden", "16", "--max-iter", "30", "--early-stopping",
                          "--plot", "es.png", "--output", "es.fbp", "--quiet"], d_es)
    jobs["plot_es"] = plot_es

    # --plot when matplotlib cannot be imported.
    d_nompl = scenario("no_matplotlib")
    fake = d_nompl / "fake_site"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text(
        'raise ImportError("No module named \'matplotlib\' (hidden by the test)")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(fake)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))

    def no_matplotlib():
        return d_nompl, cli(["train", "--hidden", "4", "--max-iter", "3", "--quiet",
                             "--plot", "curve.png", "--output", "m.fbp"], d_nompl, env=env)
    jobs["no_matplotlib"] = no_matplotlib

    # The progress bar, when stderr is a terminal.
    d_tty = scenario("tty")

    def tty():
        return d_tty, cli_with_terminal_stderr(["train", "--hidden", "16", "--max-iter",
                                                "30", "--output", "tty.fbp"], d_tty)
    jobs["tty"] = tty

    return run_concurrently(jobs)


# ---------------------------------------------------------------------------------------
# fastbp train with no DATA, then fastbp predict: the done-when check


def test_console_script_is_installed():
    script = _console_script()
    assert script is not None, "the fastbp console script is not on PATH"
    assert os.access(script, os.X_OK)


def test_default_training_on_digits(runs):
    d, train, _ = runs["digits"].result()
    assert_ok(train)
    assert train.stderr == ""  # stderr is not a terminal: no progress bar
    out = train.stdout
    assert "digits" in out and "classification" in out
    # The default (Adam, 100 relu units, 200 epochs) scores 0.972 to 0.983 on this split
    # over random_state 0 to 8, and 0.972 with every thread count from 1 to 12 (the
    # default n_jobs follows the CPU count; it changes rounding only): 0.95 leaves 8 of
    # the 360 test rows below the worst of those.
    assert float(reported(out, "test accuracy")) >= 0.95
    assert float(reported(out, "training accuracy")) >= 0.95
    assert re.search(r"^training time:\s+[0-9.]+ s\b", out, re.M), out
    assert re.search(r"^model saved to model\.fbp$", out, re.M), out
    model, meta = fastbp.load(d / "model.fbp", return_metadata=True)
    mlp = final_step(model)
    assert isinstance(mlp, MLPClassifier)
    assert mlp.hidden_layer_sizes == (100,)
    assert (mlp.activation, mlp.solver, mlp.max_iter, mlp.alpha, mlp.random_state) == (
        "relu", "adam", 200, 1e-4, 0)
    assert mlp.n_features_in_ == 64
    assert list(mlp.classes_) == list(range(10))
    assert f"{meta['test_accuracy']:.4f}" == reported(out, "test accuracy")
    assert f"{meta['train_accuracy']:.4f}" == reported(out, "training accuracy")
    # The held-out rows: 20 % of digits, each one a digits row.
    header, rows = read_csv(d / "heldout.csv")
    assert len(header) == 65 and len(rows) == 360
    X_all, _ = load_digits(return_X_y=True)
    X_test = np.array([[float(v) for v in r[:-1]] for r in rows])
    known = {tuple(r) for r in X_all}
    assert all(tuple(r) in known for r in X_test)


def test_predict_reproduces_the_reported_test_accuracy(runs):
    d, train, predict = runs["digits"].result()
    assert_ok(train)
    assert_ok(predict)
    assert "360 predictions written to preds.csv" in predict.stderr
    header, rows = read_csv(d / "heldout.csv")
    X_test = np.array([[float(v) for v in r[:-1]] for r in rows])
    y_test = np.array([int(r[-1]) for r in rows])
    p_header, p_rows = read_csv(d / "preds.csv")
    assert p_header == ["prediction"]
    preds = np.array([int(r[0]) for r in p_rows])
    assert preds.shape == y_test.shape
    accuracy = float(np.mean(preds == y_test))
    assert f"{accuracy:.4f}" == reported(train.stdout, "test accuracy")
    model, meta = fastbp.load(d / "model.fbp", return_metadata=True)
    assert accuracy == meta["test_accuracy"]
    assert np.array_equal(preds, model.predict(X_test))


# ---------------------------------------------------------------------------------------
# Data formats and options


def test_train_csv_with_string_labels(runs):
    d, train, *_ = runs["strings"].result()
    assert_ok(train)
    assert train.stderr == ""
    assert "classification" in train.stdout
    assert float(reported(train.stdout, "test accuracy")) >= 0.9
    model, meta = fastbp.load(d / "animals.fbp", return_metadata=True)
    mlp = final_step(model)
    assert isinstance(mlp, MLPClassifier)
    assert list(mlp.classes_) == ["bird", "cat", "dog"]
    assert meta["feature_names"] == ["length", "weight", "height"]
    assert meta["target"] == "species"
    header, rows = read_csv(d / "held.csv")
    assert header == ["length", "weight", "height", "species"]
    assert len(rows) == 30
    assert {r[-1] for r in rows} <= {"bird", "cat", "dog"}


def test_predict_selects_csv_columns_by_name(runs):
    d, _, predict, *_ = runs["strings"].result()
    assert_ok(predict)
    assert predict.stderr == ""
    header, rows = read_csv(predict.stdout)
    assert header == ["prediction"]
    n_header, n_rows = read_csv(d / "new.csv")
    X_new = columns(n_header, n_rows, ["length", "weight", "height"])
    expected = fastbp.load(d / "animals.fbp").predict(X_new)
    assert [r[0] for r in rows] == list(expected)


def test_predict_proba(runs):
    d, _, predict, proba, _ = runs["strings"].result()
    assert_ok(proba)
    header, rows = read_csv(d / "proba.csv")
    assert header == ["proba_bird", "proba_cat", "proba_dog"]
    P = np.array([[float(v) for v in r] for r in rows])
    assert P.shape == (30, 3)
    assert ((P >= 0) & (P <= 1)).all()
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    n_header, n_rows = read_csv(d / "new.csv")
    X_new = columns(n_header, n_rows, ["length", "weight", "height"])
    model = fastbp.load(d / "animals.fbp")
    assert np.array_equal(P, model.predict_proba(X_new))  # repr() round-trips exactly
    labels = [r[0] for r in read_csv(predict.stdout)[1]]
    assert list(np.array(["bird", "cat", "dog"])[P.argmax(axis=1)]) == labels


def test_predict_ignores_a_string_target_column(runs):
    # The held-out CSV written by --test-data-out still has the (string) target column:
    # predict selects the features by name and ignores it.
    d, train, *_, held = runs["strings"].result()
    assert_ok(held)
    header, rows = read_csv(d / "held.csv")
    preds = [r[0] for r in read_csv(held.stdout)[1]]
    X = columns(header, rows, ["length", "weight", "height"])
    assert preds == list(fastbp.load(d / "animals.fbp").predict(X))
    accuracy = float(np.mean(np.array(preds) == np.array([r[-1] for r in rows])))
    assert f"{accuracy:.4f}" == reported(train.stdout, "test accuracy")


def test_train_regression_csv_prints_r2(runs):
    d, train, predict = runs["regression"].result()
    assert_ok(train)
    assert "regression" in train.stdout
    assert "accuracy" not in train.stdout
    assert float(reported(train.stdout, "training R^2")) > 0.9
    assert float(reported(train.stdout, "test R^2")) > 0.9
    model, meta = fastbp.load(d / "houses.fbp", return_metadata=True)
    assert isinstance(final_step(model), MLPRegressor)
    assert meta["target"] == "price"
    assert f"{meta['test_r2']:.4f}" == reported(train.stdout, "test R^2")
    # Predicting on the training file: the price column is ignored.
    assert_ok(predict)
    header, rows = read_csv(predict.stdout)
    assert header == ["prediction"] and len(rows) == 160
    preds = np.array([float(r[0]) for r in rows])
    h, r = read_csv(d / "houses.csv")
    assert np.array_equal(preds, model.predict(columns(h, r, ["rooms", "area", "age"])))


def test_target_in_a_middle_column(runs):
    d, train, predict = runs["middle"].result()
    assert_ok(train)
    assert "classification" in train.stdout  # not the continuous last column
    assert "90 training rows, 30 test rows" in train.stdout  # --test-size 0.25
    model, meta = fastbp.load(d / "mid.fbp", return_metadata=True)
    mlp = final_step(model)
    assert mlp.n_features_in_ == 3
    assert list(mlp.classes_) == [0, 1]
    assert meta["feature_names"] == ["a", "b", "c"] and meta["target"] == "label"
    header, rows = read_csv(d / "mid_test.csv")
    assert header == ["a", "b", "c", "label"] and len(rows) == 30
    assert_ok(predict)
    preds = np.array([int(r[0]) for r in read_csv(d / "preds.csv")[1]])
    assert np.array_equal(preds, model.predict(columns(header, rows, ["a", "b", "c"])))
    y = np.array([int(r[-1]) for r in rows])
    assert f"{np.mean(preds == y):.4f}" == reported(train.stdout, "test accuracy")


def test_npz_input_and_training_options(runs):
    d, train, predict = runs["npz"].result()
    assert_ok(train)
    assert "network 5-8-4-3 with sgd" in train.stdout
    assert "160 training rows, 40 test rows" in train.stdout
    model = fastbp.load(d / "net.fbp")
    mlp = final_step(model)
    assert isinstance(mlp, MLPClassifier)
    assert mlp.hidden_layer_sizes == (8, 4)
    assert (mlp.activation, mlp.solver, mlp.alpha, mlp.batch_size, mlp.random_state,
            mlp.max_iter) == ("tanh", "sgd", 0.01, 16, 3, 40)
    assert 1 <= mlp.n_iter_ <= 40
    assert f"({mlp.n_iter_} epochs)" in train.stdout
    assert [c.shape for c in mlp.coefs_] == [(5, 8), (8, 4), (4, 3)]
    with np.load(d / "held.npz") as held:
        X_test, y_test = held["X"], held["y"]
    assert X_test.shape == (40, 5) and y_test.shape == (40,)
    assert_ok(predict)
    preds = np.array([int(r[0]) for r in read_csv(d / "preds.csv")[1]])
    assert np.array_equal(preds, model.predict(X_test))
    assert f"{np.mean(preds == y_test):.4f}" == reported(train.stdout, "test accuracy")


def test_svmlight_input(runs):
    d, train, predict = runs["svmlight"].result()
    assert_ok(train)
    assert "classification" in train.stdout
    assert float(reported(train.stdout, "test accuracy")) >= 0.8
    model = fastbp.load(d / "svm.fbp")
    mlp = final_step(model)
    assert mlp.n_features_in_ == 6
    assert model.steps[0][1].with_mean is False  # sparse input is not centred
    assert_ok(predict)
    header, rows = read_csv(predict.stdout)
    assert header == ["prediction"] and len(rows) == 20
    X_new, _ = load_svmlight_file(str(d / "new.txt"), n_features=6)
    expected = model.predict(X_new)
    assert [float(r[0]) for r in rows] == [float(v) for v in expected]


def test_task_regression_on_integer_targets_quiet(runs):
    d, train = runs["intreg"].result()
    assert_ok(train)
    lines = train.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"test R\^2: -?[0-9.]+", lines[0]), lines
    assert train.stderr == ""
    model, meta = fastbp.load(d / "counts.fbp", return_metadata=True)
    assert isinstance(final_step(model), MLPRegressor)
    assert meta["task"] == "regression"


def test_plot_writes_a_png(runs):
    d, train, _ = runs["regression"].result()
    assert_ok(train)
    assert "loss curve written to curve.png" in train.stdout
    assert_png(d / "curve.png")


def test_plot_with_early_stopping(runs):
    d, train = runs["plot_es"].result()
    assert_ok(train)
    assert_png(d / "es.png")
    mlp = final_step(fastbp.load(d / "es.fbp"))
    assert mlp.early_stopping is True
    assert mlp.validation_scores_ and len(mlp.validation_scores_) == mlp.n_iter_


def test_plot_without_matplotlib(runs):
    d, res = runs["no_matplotlib"].result()
    assert_one_line_error(res, "matplotlib")
    assert not (d / "curve.png").exists()


def test_progress_bar_on_a_terminal(runs):
    d, (rc, out, tty) = runs["tty"].result()
    assert rc == 0, tty
    assert "test accuracy" in out
    assert "training" in tty and "/30" in tty and "loss=" in tty  # the tqdm bar
    assert "Traceback" not in tty
    # The bar went to the terminal (stderr), not to stdout.
    assert "it/s" not in out and "/30" not in out


# ---------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, never a traceback


class _Payload:
    """Unpickling this object creates ``marker``."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """A directory of bad (and a few good) input files, and models made in-process."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2))
    y = (X[:, 0] > 0).astype(int)
    write_csv(d / "clf.csv", ["a", "b", "y"],
              [[num(r[0]), num(r[1]), int(t)] for r, t in zip(X, y)])
    write_csv(d / "reg.csv", ["a", "b", "y"],
              [[num(r[0]), num(r[1]), num(r[0] * 2.5 + 0.1)] for r in X])
    write_csv(d / "labels.csv", ["a", "b", "kind"],
              [[num(r[0]), num(r[1]), "up" if t else "down"] for r, t in zip(X, y)])
    write_csv(d / "text_feature.csv", ["a", "colour", "y"],
              [[1.0, "red", 0], [2.0, "blue", 1], [3.0, "red", 0]])
    write_csv(d / "one_class.csv", ["a", "b", "y"], [[i, i + 1, 1] for i in range(10)])
    write_csv(d / "nan.csv", ["a", "b", "y"], [[1, 2, 0], [3, "nan", 1], [5, 6, 0]])
    write_csv(d / "only_a.csv", ["a", "y"], [[1, 0], [2, 1]])
    write_csv(d / "single_column.csv", ["a"], [[1], [2], [3]])
    (d / "empty.csv").write_bytes(b"")
    (d / "header_only.csv").write_text("a,b,y\n")
    (d / "ragged.csv").write_text("a,b,y\n1,2,0\n3,4\n")
    (d / "binary.csv").write_bytes(b"\xff\xfe\x00\x81\x93garbage\n\x00\xff")
    (d / "a_directory").mkdir()
    np.savez(d / "only_x.npz", X=X)
    np.savez(d / "x_1d.npz", X=X[:, 0], y=y)
    np.savez(d / "wide.npz", X=rng.normal(size=(5, 7)), y=np.arange(5))
    np.savez(d / "objects.npz", X=np.array([[1, None]], dtype=object), y=np.array([1]))
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04" + rng.bytes(500))
    (d / "corrupt.svm").write_text("this is not\nsvmlight at all\n")
    (d / "garbage.fbp").write_bytes(rng.bytes(2000))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(d / "clf.csv"), "--hidden", "4", "--max-iter", "5",
                     "--quiet", "--output", str(d / "clf.fbp")]) == 0
        assert main(["train", str(d / "reg.csv"), "--hidden", "4", "--max-iter", "5",
                     "--quiet", "--output", str(d / "reg.fbp")]) == 0
    raw = (d / "clf.fbp").read_bytes()
    (d / "truncated.fbp").write_bytes(raw[: len(raw) // 2])
    with np.load(d / "clf.fbp") as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["__fastbp__"].tobytes())
    meta["version"] = 999
    newer = dict(arrays, __fastbp__=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with open(d / "newer.fbp", "wb") as fh:
        np.savez(fh, **newer)
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(d / "pickle_ran.marker")
    with open(d / "pickled.fbp", "wb") as fh:
        np.savez(fh, **dict(arrays, theta=payload))
    return d


SMALL = ["--hidden", "3", "--max-iter", "3", "--quiet"]

# (id, argv, words expected in the error line)
BAD_INPUTS = [
    ("missing-file", ["train", "nothere.csv"], ["nothere.csv"]),
    ("missing-target", ["train", "clf.csv", "--target", "nope"], ["nope"]),
    ("non-numeric-feature", ["train", "text_feature.csv"], ["colour", "numeric"]),
    ("empty-file", ["train", "empty.csv"], ["empty.csv", "empty"]),
    ("single-class", ["train", "one_class.csv"], ["class"]),
    ("hidden-not-integers", ["train", "--hidden", "10,x"], ["--hidden"]),
    ("test-size-out-of-range", ["train", "--test-size", "1.5"], ["--test-size"]),
    ("test-size-not-a-number", ["train", "--test-size", "abc"], ["test-size"]),
    ("unwritable-output", ["train", "clf.csv", *SMALL, "--output", "no_dir/m.fbp"],
     ["no_dir"]),
    ("directory-as-data", ["train", "a_directory"], ["a_directory", "directory"]),
    ("npz-without-y", ["train", "only_x.npz"], ["only_x.npz", "y"]),
    ("classification-on-continuous-target",
     ["train", "reg.csv", "--task", "classification", *SMALL], []),
    ("unwritable-test-data-out",
     ["train", "clf.csv", *SMALL, "--output", "ok.fbp", "--test-data-out",
      "no_dir/test.csv"], ["no_dir"]),
    ("predict-missing-model", ["predict", "nothere.fbp", "clf.csv"], ["nothere.fbp"]),
    ("predict-corrupt-model", ["predict", "garbage.fbp", "clf.csv"],
     ["garbage.fbp", "not a valid fastbp model file"]),
    ("predict-pickle-bearing-model", ["predict", "pickled.fbp", "clf.csv"],
     ["not a valid fastbp model file"]),
    ("predict-missing-column", ["predict", "clf.fbp", "only_a.csv"], ["missing", "b"]),
    ("predict-unwritable-output",
     ["predict", "clf.fbp", "clf.csv", "--output", "no_dir/p.csv"], ["no_dir"]),
]


@pytest.fixture(scope="module")
def bad_runs(bad_dir):
    return run_concurrently({case: (lambda argv=argv: cli(argv, bad_dir))
                             for case, argv, _ in BAD_INPUTS})


@pytest.mark.parametrize("case,argv,needles", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_subprocess(case, argv, needles, bad_runs, bad_dir):
    res = bad_runs[case].result()
    assert_one_line_error(res, *needles)
    if case == "predict-pickle-bearing-model":
        assert not (bad_dir / "pickle_ran.marker").exists()


# Further bad input, run in-process (the same code path; no interpreter start-up).
MORE_BAD_INPUTS = [
    ("hidden-zero", ["train", "--hidden", "0"], ["--hidden"]),
    ("nan-features", ["train", "nan.csv"], ["nan"]),
    ("regression-on-string-labels", ["train", "labels.csv", "--task", "regression"],
     ["numeric"]),
    ("predict-text-as-model", ["predict", "clf.csv", "clf.csv"],
     ["not a valid fastbp model file"]),
    ("predict-truncated-model", ["predict", "truncated.fbp", "clf.csv"],
     ["truncated.fbp", "not a valid fastbp model file"]),
    ("predict-newer-model", ["predict", "newer.fbp", "clf.csv"], ["version"]),
    ("predict-missing-data", ["predict", "clf.fbp", "nothere.csv"], ["nothere.csv"]),
    ("predict-wrong-width", ["predict", "clf.fbp", "wide.npz"], ["7", "2"]),
    ("predict-proba-regression", ["predict", "reg.fbp", "reg.csv", "--proba"],
     ["--proba"]),
    ("header-only", ["train", "header_only.csv"], ["no data rows"]),
    ("ragged-rows", ["train", "ragged.csv"], ["line 3"]),
    ("binary-csv", ["train", "binary.csv"], ["binary.csv"]),
    ("one-column-csv", ["train", "single_column.csv"], ["single_column.csv"]),
    ("npz-1d-x", ["train", "x_1d.npz"], ["2-D"]),
    ("npz-object-array", ["train", "objects.npz"], ["objects.npz"]),
    ("npz-corrupt", ["train", "corrupt.npz"], ["corrupt.npz"]),
    ("svmlight-corrupt", ["train", "corrupt.svm"], ["corrupt.svm"]),
    ("max-iter-zero", ["train", "clf.csv", "--max-iter", "0", "--quiet"], ["max_iter"]),
    ("alpha-negative", ["train", "clf.csv", "--alpha", "-1", "--quiet"], ["alpha"]),
    ("unwritable-plot", ["train", "clf.csv", *SMALL, "--output", "ok2.fbp", "--plot",
                         "no_dir/c.png"], ["no_dir"]),
    ("output-is-a-directory", ["train", "clf.csv", *SMALL, "--output", "a_directory"],
     ["a_directory"]),
    ("predict-directory-as-model", ["predict", "a_directory", "clf.csv"],
     ["a_directory"]),
    ("predict-directory-as-data", ["predict", "clf.fbp", "a_directory"], ["a_directory"]),
    ("predict-empty-data", ["predict", "clf.fbp", "empty.csv"], ["empty"]),
    ("predict-empty-model", ["predict", "empty.csv", "clf.csv"],
     ["not a valid fastbp model file"]),
]


@pytest.mark.parametrize("case,argv,needles", MORE_BAD_INPUTS,
                         ids=[c[0] for c in MORE_BAD_INPUTS])
def test_bad_input_in_process(case, argv, needles, bad_dir, capsys, monkeypatch):
    monkeypatch.chdir(bad_dir)
    rc = main(argv)
    captured = capsys.readouterr()
    res = subprocess.CompletedProcess(argv, rc, captured.out, captured.err)
    assert_one_line_error(res, *needles)


def test_train_with_hessian_free_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--solver", "hessian-free", "--hidden", "16", "--max-iter", "15",
               "--random-state", "0", "--quiet", "--output", "hf.fbp"])
    out = capsys.readouterr().out
    assert rc == 0, out
    acc = float(re.search(r"test accuracy\D*([0-9.]+)", out, re.I).group(1))
    # 0.964 to 0.972 over random_state 0 to 4 (full-batch exact sums: the same for any
    # thread count): 0.9 leaves 23 of the 360 test rows.
    assert acc >= 0.9
    model = fastbp.load(tmp_path / "hf.fbp")
    assert model[-1].solver == "hessian-free"
