"""The ``fastbp`` command: train a network on your data, predict with a saved model.

``fastbp train [DATA]`` reads CSV (header row; the target is ``--target`` or the last
column), NPZ (arrays ``X`` and ``y``) or svmlight/libsvm files; with no DATA it trains on
the digits data set bundled with scikit-learn. It standardizes the features, holds out a
test split, trains with a progress bar, prints the scores and saves the model (scaler
included). ``fastbp predict MODEL DATA`` writes predictions as CSV.

Bad input ends with one line on stderr and exit status 2, never a traceback.
"""
import argparse
import asyncio
import csv
import os
import sys
import time
import warnings

import numpy as np
from sklearn.datasets import load_digits, load_svmlight_file
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from . import _bench
from ._estimators import MLPClassifier, MLPRegressor
from ._io import load, save
from ._network import ACTIVATION_NAMES
from ._onnx import to_onnx

__all__ = ["main"]

# A numeric target with at most this many distinct integer values is taken for class
# labels by --task auto.
MAX_AUTO_CLASSES = 50


class CLIError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


# Reading data --------------------------------------------------------------------------

def _fmt(path):
    ext = os.path.splitext(str(path))[1].lower()
    if ext == ".npz":
        return "npz"
    if ext in (".svm", ".svmlight", ".libsvm", ".txt"):
        return "svmlight"
    return "csv"


def _read_csv(path, target, need_target, features=None):
    """Returns (X float64, y column as str list or None, feature names, target name).

    With ``features`` (column names), only those columns are read as features, in that
    order; other columns are ignored (a target column among them, say).
    """
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise CLIError(f"{path}: not a text CSV file") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise CLIError(f"{path}: the file is empty")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if not body:
        raise CLIError(f"{path}: no data rows after the header")
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise CLIError(f"{path}: line {i} has {len(r)} fields, the header has "
                           f"{len(header)}")
    t_idx = None
    if target is not None:
        if target not in header:
            raise CLIError(f"{path}: no column named {target!r} (columns: "
                           f"{', '.join(header)})")
        t_idx = header.index(target)
    elif need_target:
        t_idx = len(header) - 1
    if need_target and len(header) < 2:
        raise CLIError(f"{path}: needs at least one feature column and a target column")
    if features is not None:
        missing = [f for f in features if f not in header]
        if missing:
            raise CLIError(f"{path}: missing feature columns {', '.join(missing)}")
        feat_idx = [header.index(f) for f in features]
    else:
        feat_idx = [j for j in range(len(header)) if j != t_idx]
    X = np.empty((len(body), len(feat_idx)))
    for i, r in enumerate(body):
        for k, j in enumerate(feat_idx):
            try:
                X[i, k] = float(r[j])
            except ValueError:
                raise CLIError(f"{path}: column {header[j]!r} is not numeric (line {i + 2}: "
                               f"{r[j]!r}); features must be numbers") from None
    y = [r[t_idx].strip() for r in body] if t_idx is not None else None
    return X, y, [header[j] for j in feat_idx], (header[t_idx] if t_idx is not None
                                                 else None)


def _read_npz(path, need_target):
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            if "X" not in files or (need_target and "y" not in files):
                raise CLIError(f"{path}: an NPZ file needs arrays 'X' and 'y' (found: "
                               f"{', '.join(sorted(files)) or 'none'})")
            X = npz["X"]
            y = npz["y"] if "y" in files else None
    except CLIError:
        raise
    except ValueError as exc:
        raise CLIError(f"{path}: cannot read the NPZ file ({exc})") from None
    except Exception as exc:  # zipfile errors and the like
        raise CLIError(f"{path}: not a readable NPZ file ({exc})") from None
    if X.ndim != 2:
        raise CLIError(f"{path}: X must be 2-D, got shape {X.shape}")
    if X.dtype.kind not in "biuf":
        raise CLIError(f"{path}: X must be numeric, got dtype {X.dtype}")
    return X.astype(np.float64), y, None, None


def _read_svmlight(path, n_features=None):
    try:
        X, y = load_svmlight_file(str(path), n_features=n_features)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(f"{path}: not a readable svmlight/libsvm file ({exc})") from None
    return X, y, None, None


def read_data(path, target=None, need_target=True, n_features=None, features=None):
    """Load DATA for the command: (X, y, feature names or None, target name or None)."""
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CLIError(f"{path}: is a directory, not a data file")
    fmt = _fmt(path)
    if fmt == "npz":
        X, y, names, tname = _read_npz(path, need_target)
    elif fmt == "svmlight":
        X, y, names, tname = _read_svmlight(path, n_features)
    else:
        X, y, names, tname = _read_csv(path, target, need_target, features)
    if X.shape[0] == 0:
        raise CLIError(f"{path}: no rows")
    data = X.data if hasattr(X, "data") else X
    if not np.isfinite(data).all():
        raise CLIError(f"{path}: the features contain NaN or infinite values")
    return X, y, names, tname


def _task(y, task):
    """Decide classification or regression; returns (task, y converted)."""
    y = np.asarray(y)
    numeric = y.dtype.kind in "biuf"
    if not numeric:
        try:
            y_num = y.astype(np.float64)
            numeric = True
        except ValueError:
            y_num = None
    else:
        y_num = y.astype(np.float64)
    if task == "auto":
        if not numeric:
            task = "classification"
        else:
            integral = np.all(np.isfinite(y_num)) and np.all(y_num == np.round(y_num))
            task = ("classification" if integral and len(np.unique(y_num))
                    <= MAX_AUTO_CLASSES else "regression")
    if task == "regression":
        if not numeric:
            raise CLIError("the target is not numeric: regression needs numbers (use "
                           "--task classification for labels)")
        if not np.isfinite(y_num).all():
            raise CLIError("the target contains NaN or infinite values")
        return task, y_num
    if numeric and y.dtype.kind not in "biuf":
        # CSV labels that are numbers: keep them numbers (1 rather than '1').
        if np.all(y_num == np.round(y_num)):
            return task, y_num.astype(np.int64)
        return task, y_num
    return task, y


# Commands ------------------------------------------------------------------------------

def _activation(text):
    """--activation: one name for every hidden layer, or comma-separated names, one per
    hidden layer (a tuple)."""
    names = [s.strip() for s in text.split(",")]
    for name in names:
        if name not in ACTIVATION_NAMES:
            raise argparse.ArgumentTypeError(
                f"{name!r} is not an activation (choose from {', '.join(ACTIVATION_NAMES)}; "
                "or give one per hidden layer, comma-separated)")
    return names[0] if len(names) == 1 else tuple(names)


def _parse_hidden(text):
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise CLIError(f"--hidden must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise CLIError(f"--hidden must list positive layer sizes, got {text!r}")
    return sizes


class _Progress:
    """A tqdm bar over epochs/iterations showing the running loss."""

    def __init__(self, total, enabled):
        self.bar = None
        if enabled:
            # disable=None: no bar when stderr is not a terminal (logs, pipes).
            self.bar = tqdm(total=total, desc="training", unit="it", file=sys.stderr,
                            dynamic_ncols=True, leave=False, disable=None)

    def __call__(self, n_iter, loss):
        if self.bar is not None:
            self.bar.update(n_iter - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.5g}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _plot(path, est, quiet):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'fastbp[plot]' (or pip "
                       "install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(est.loss_curve_) + 1), est.loss_curve_, label="training loss")
    ax.set_xlabel("epoch" if est.solver in ("adam", "sgd") else "iteration")
    ax.set_ylabel("loss")
    if est.validation_scores_:
        ax2 = ax.twinx()
        ax2.plot(np.arange(1, len(est.validation_scores_) + 1), est.validation_scores_,
                 color="tab:orange", label="validation score")
        ax2.set_ylabel("validation score")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("fastbp training curve")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise CLIError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    if not quiet:
        print(f"loss curve written to {path}")


def _export_onnx(model, X, path, quiet):
    """``--onnx``: the fitted Pipeline as an ONNX file (float32 input)."""
    if hasattr(X, "tocsr"):
        raise CLIError("--onnx needs dense input data; this data set is sparse")
    try:
        onx = to_onnx(model, np.asarray(X[:1], dtype=np.float32))
    except ImportError as exc:
        raise CLIError(f"--onnx: {exc}") from None
    except ValueError as exc:
        raise CLIError(f"--onnx: {exc}") from None
    try:
        with open(path, "wb") as fh:
            fh.write(onx.SerializeToString())
    except OSError as exc:
        raise CLIError(f"{path}: cannot write the ONNX model ({exc.strerror or exc})") \
            from None
    if not quiet:
        print(f"ONNX model written to {path}")


def _connect(address):
    """A Dask client for ``--scheduler``, or a one-line error."""
    try:
        from distributed import Client
    except ImportError:
        raise CLIError("--scheduler needs dask.distributed: pip install "
                       "\"fastbp[dask]\"") from None
    try:
        return Client(address, timeout="5s")
    except (OSError, TimeoutError, asyncio.TimeoutError, ValueError) as exc:
        raise CLIError(f"cannot connect to the Dask scheduler at {address}: "
                       f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None


def cmd_train(args):
    hidden = _parse_hidden(args.hidden)
    if isinstance(args.activation, tuple) and len(args.activation) != len(hidden):
        raise CLIError(f"--activation lists {len(args.activation)} activations for "
                       f"{len(hidden)} hidden layers (--hidden {args.hidden}): give one per "
                       "hidden layer, or one for all")
    if args.solver is None:  # a cluster trains full-batch
        args.solver = "lbfgs" if args.scheduler else "adam"
    if args.scheduler and args.solver in ("adam", "sgd"):
        raise CLIError(f"--scheduler trains full-batch: --solver {args.solver} runs in one "
                       "process; use lbfgs, tnc, newton-cg, trust-krylov or hessian-free")
    if not 0 < args.test_size < 1:
        raise CLIError(f"--test-size must be between 0 and 1, got {args.test_size}")
    if args.data is None:
        X, y = load_digits(return_X_y=True)
        names, tname, source = None, None, "digits (bundled with scikit-learn)"
    else:
        X, y, names, tname = read_data(args.data, args.target)
        source = args.data
    if y is None:
        raise CLIError(f"{args.data}: no target")
    task, y = _task(y, args.task)
    if task == "classification" and len(np.unique(y)) < 2:
        raise CLIError("the target has a single class: classification needs at least two")
    stratify = y if task == "classification" and np.min(np.unique(y, return_counts=True)[1]) > 1 else None
    try:
        X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=args.test_size,
                                                  random_state=args.random_state,
                                                  stratify=stratify)
    except ValueError as exc:
        raise CLIError(f"cannot split the data: {exc}") from None
    Est = MLPClassifier if task == "classification" else MLPRegressor
    client = _connect(args.scheduler) if args.scheduler else None
    est = Est(hidden_layer_sizes=hidden, activation=args.activation, solver=args.solver,
              max_iter=args.max_iter, batch_size=args.batch_size, alpha=args.alpha,
              random_state=args.random_state, early_stopping=args.early_stopping,
              backend="dask" if client is not None else None)
    scaler = StandardScaler(with_mean=not hasattr(X, "tocsr"))
    model = Pipeline([("scaler", scaler), ("mlp", est)])
    progress = _Progress(args.max_iter, not args.quiet)
    est._progress_callback = progress
    if not args.quiet:
        n_out = len(np.unique(y)) if task == "classification" else 1
        n_out = 1 if n_out == 2 else n_out
        print(f"training a {task} network {X.shape[1]}-{'-'.join(map(str, hidden))}-"
              f"{n_out} with {args.solver} on {source}: "
              f"{X_tr.shape[0]} training rows, {X_te.shape[0]} test rows")
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(X_tr, y_tr)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"training failed: {first}") from None
    except RuntimeError as exc:  # the Dask cluster failed (ClusterError)
        raise CLIError(f"training failed: {exc}") from None
    finally:
        progress.close()
        del est._progress_callback
        if client is not None:
            client.close()
            est.backend = None  # the saved model predicts and refits locally
    seconds = time.perf_counter() - t0
    notes = sorted({str(w.message).split("\n")[0] for w in caught
                    if "converge" in str(w.message)})
    metric = "accuracy" if task == "classification" else "R^2"
    train_score = model.score(X_tr, y_tr)
    test_score = model.score(X_te, y_te)
    meta = {"task": task, "feature_names": names, "target": tname, "source": str(source),
            "test_size": args.test_size, "random_state": args.random_state,
            "train_" + ("accuracy" if task == "classification" else "r2"): train_score,
            "test_" + ("accuracy" if task == "classification" else "r2"): test_score}
    try:
        save(model, args.output, metadata=meta)
    except OSError as exc:
        raise CLIError(f"{args.output}: cannot write the model ({exc.strerror or exc})") \
            from None
    if args.onnx:
        _export_onnx(model, X_tr, args.onnx, args.quiet)
    if args.test_data_out:
        try:
            _write_split(args.test_data_out, X_te, y_te, names, tname)
        except OSError as exc:
            raise CLIError(f"{args.test_data_out}: cannot write the test split "
                           f"({exc.strerror or exc}); the model was saved to "
                           f"{args.output}") from None
    if not args.quiet:
        for note in notes:
            print(f"note: {note}")
        print(f"training {metric}: {train_score:.4f}")
        print(f"test {metric}:     {test_score:.4f}")
        print(f"training time:     {seconds:.2f} s ({est.n_iter_} "
              f"{'epochs' if args.solver in ('adam', 'sgd') else 'iterations'})")
        print(f"model saved to {args.output}")
        if args.test_data_out:
            print(f"test split written to {args.test_data_out}")
    else:
        print(f"test {metric}: {test_score:.4f}")
    if args.plot:
        _plot(args.plot, est, args.quiet)
    return 0


def _write_split(path, X, y, names, tname):
    X = X.toarray() if hasattr(X, "toarray") else X
    if _fmt(path) == "npz":
        np.savez(path, X=X, y=np.asarray(y))
        return
    names = names or [f"x{j}" for j in range(X.shape[1])]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(names) + [tname or "target"])
        for row, label in zip(X, y):
            w.writerow([repr(float(v)) for v in row] + [label])


def cmd_predict(args):
    try:
        model, meta = load(args.model, return_metadata=True)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    est = model.steps[-1][1] if isinstance(model, Pipeline) else model
    n_features = est.n_features_in_
    fmt = _fmt(args.data)
    names = meta.get("feature_names")
    if fmt == "csv" and names:
        X, _, _, _ = read_data(args.data, need_target=False, features=names)
    else:
        X, _, _, _ = read_data(args.data, need_target=False,
                               n_features=n_features if fmt == "svmlight" else None)
        if fmt == "csv" and X.shape[1] == n_features + 1 and meta.get("target") is None:
            X = X[:, :n_features]  # a CSV with the target as its last column
    if X.shape[1] != n_features:
        raise CLIError(f"{args.data}: {X.shape[1]} feature columns, the model expects "
                       f"{n_features}")
    is_clf = isinstance(est, MLPClassifier)
    if args.proba and not is_clf:
        raise CLIError("--proba needs a classification model")
    if args.proba:
        P = model.predict_proba(X)
        header = [f"proba_{c}" for c in est.classes_]
        rows = [[repr(float(v)) for v in p] for p in P]
    else:
        pred = model.predict(X)
        if pred.ndim == 1:
            header = ["prediction"]
            rows = [[_cell(v)] for v in pred]
        else:
            header = [f"prediction_{j}" for j in range(pred.shape[1])]
            rows = [[_cell(v) for v in r] for r in pred]
    try:
        out = open(args.output, "w", newline="") if args.output else sys.stdout
    except OSError as exc:
        raise CLIError(f"{args.output}: cannot write ({exc.strerror or exc})") from None
    try:
        w = csv.writer(out)
        w.writerow(header)
        w.writerows(rows)
    except OSError as exc:
        raise CLIError(f"{args.output}: cannot write ({exc.strerror or exc})") from None
    finally:
        if args.output:
            out.close()
    if args.output and not args.quiet:
        print(f"{len(rows)} predictions written to {args.output}", file=sys.stderr)
    return 0


def _cell(v):
    """A prediction as CSV text: floats round-trip exactly (repr), labels as they are."""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors reported like every other error: one line, exit 2."""

    def error(self, message):
        self.exit(2, f"fastbp: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    """The argument parser of the ``fastbp`` command."""
    p = _Parser(prog="fastbp", description="Train and use multilayer "
                "perceptrons with fastbp's compiled backprop core.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a network on DATA (default: digits)",
                       description="Train a network on DATA (CSV with a header, NPZ with X "
                       "and y, or svmlight); with no DATA, on the digits data set bundled "
                       "with scikit-learn.")
    t.add_argument("data", nargs="?", default=None, metavar="DATA")
    t.add_argument("--target", default=None,
                   help="CSV target column (default: the last column)")
    t.add_argument("--hidden", default="100", help="hidden layer sizes, e.g. 100,50")
    t.add_argument("--activation", default="relu", type=_activation,
                   metavar="{" + ",".join(ACTIVATION_NAMES) + "}",
                   help="hidden activation; or one per hidden layer, comma-separated, "
                   "e.g. gelu,tanh (default: relu)")
    t.add_argument("--solver", default=None,
                   choices=["adam", "sgd", "lbfgs", "tnc", "newton-cg", "trust-krylov",
                            "hessian-free"])
    t.add_argument("--max-iter", type=int, default=200)
    t.add_argument("--batch-size", type=_batch_size, default="auto")
    t.add_argument("--alpha", type=float, default=1e-4)
    t.add_argument("--random-state", type=int, default=0)
    t.add_argument("--test-size", type=float, default=0.2)
    t.add_argument("--task", default="auto", choices=["auto", "classification",
                                                      "regression"])
    t.add_argument("--early-stopping", action="store_true")
    t.add_argument("--output", default="model.fbp", help="model file (default: model.fbp)")
    t.add_argument("--test-data-out", default=None, metavar="FILE",
                   help="also write the held-out test rows (CSV or .npz)")
    t.add_argument("--plot", default=None, metavar="PNG", help="write the loss curve")
    t.add_argument("--onnx", default=None, metavar="FILE",
                   help="also export the model (scaler included) as ONNX (needs the "
                        "'onnx' extra)")
    t.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="train data-parallel on this Dask scheduler (tcp://host:8786); "
                        "the solver defaults to lbfgs")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("predict", help="predict with a saved model",
                       description="Write predictions (or class probabilities) for DATA as "
                       "CSV. The model's scaler is applied.")
    r.add_argument("model", metavar="MODEL")
    r.add_argument("data", metavar="DATA")
    r.add_argument("--output", default=None, help="CSV file (default: standard output)")
    r.add_argument("--proba", action="store_true", help="class probabilities")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_predict)

    b = sub.add_parser("bench", help="a quick side-by-side benchmark (under 2 minutes)",
                       description="Quick subset of the benchmark suite: fastbp against "
                       "scikit-learn (and PyTorch when installed) on the same workloads, "
                       "interleaved in one process; prints the table.")
    b.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args):
    _bench.main_quick(log=lambda msg: print(msg, file=sys.stderr))
    return 0


def _batch_size(text):
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got "
                                          f"{text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def main(argv=None):
    """Run the ``fastbp`` command.

    Parameters
    ----------
    argv : list of str, default=None
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    status : int
        0 on success, 2 on bad input (after one line on stderr).

    Examples
    --------
    >>> import os, tempfile
    >>> from fastbp.cli import main
    >>> path = os.path.join(tempfile.mkdtemp(), "m.fbp")
    >>> main(["train", "--hidden", "16", "--max-iter", "20", "--quiet",
    ...       "--output", path])  # doctest: +ELLIPSIS
    test accuracy: 0.9...
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"fastbp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastbp: interrupted", file=sys.stderr)
        return 130


def main_entry():
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
