"""scikit-learn's callback protocol (sklearn.callback, scikit-learn >= 1.9) on both
estimators: one subtask per epoch or full-batch iteration, early stops, and the
estimators without it on older scikit-learn."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning

from fastbp import MLPClassifier, MLPRegressor

callback = pytest.importorskip("sklearn.callback")

SOLVERS = ["adam", "sgd", "lbfgs", "tnc", "hessian-free"]


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return (X - X.mean(0)) / X.std(0), y


class Recorder:
    """A FitCallback that records every hook call and can ask to stop."""

    def __init__(self, stop_after=None):
        self.stop_after = stop_after
        self.events = []

    def setup(self, estimator, context):
        self.events.append(("setup", None))

    def teardown(self, estimator, context):
        self.events.append(("teardown", None))

    def on_fit_task_begin(self, estimator, context, *, fitted_estimator=None):
        self.events.append(("begin", context.task_name))

    def on_fit_task_end(self, estimator, context, *, fitted_estimator=None, X=None,
                        y=None):
        score = None if fitted_estimator is None or X is None else \
            fitted_estimator.score(X, y)
        self.events.append(("end", context.task_name, score))
        ends = sum(1 for e in self.events if e[0] == "end" and e[1] == "epoch")
        return self.stop_after is not None and ends >= self.stop_after


def _est(solver, **kw):
    return MLPClassifier((8,), solver=solver, max_iter=6, tol=0.0, n_iter_no_change=100,
                         random_state=0, **kw)


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_subtask_per_epoch_with_that_epochs_model(iris, solver):
    X, y = iris
    rec = Recorder()
    est = _est(solver).set_callbacks(rec)
    scores = []
    est._progress_callback = lambda n, loss: scores.append(est.score(X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    del est._progress_callback
    assert rec.events[0] == ("setup", None) and rec.events[-1] == ("teardown", None)
    begins = [e for e in rec.events if e[0] == "begin"]
    ends = [e for e in rec.events if e[0] == "end"]
    assert len(begins) == len(ends)  # every task that begins ends
    epoch_ends = [e for e in ends if e[1] == "epoch" and e[2] is not None]
    assert len(epoch_ends) == est.n_iter_ == len(scores)
    # The fitted estimator a callback gets holds that epoch's parameters.
    np.testing.assert_allclose([e[2] for e in epoch_ends], scores)
    # The root task ends last, with the fitted model.
    assert ends[-1][1] == "fit" and ends[-1][2] == est.score(X, y)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_callback_stops_training(iris, solver):
    X, y = iris
    est = _est(solver).set_callbacks(Recorder(stop_after=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a requested stop is no failure
        est.fit(X, y)
    assert est.n_iter_ == 3 and len(est.loss_curve_) == 3


def test_callbacks_do_not_change_the_model(iris):
    X, y = iris
    plain = _est("adam").fit(X, y)
    watched = _est("adam").set_callbacks(Recorder()).fit(X, y)
    np.testing.assert_array_equal(plain._theta, watched._theta)
    assert plain.loss_curve_ == watched.loss_curve_


def test_scoring_monitor_records_a_score_per_epoch(iris):
    X, y = iris
    monitor = callback.ScoringMonitor(scoring="accuracy")
    reg_monitor = callback.ScoringMonitor(scoring="r2")
    est = _est("adam").set_callbacks(monitor)
    scores = []
    est._progress_callback = lambda n, loss: scores.append(est.score(X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
        reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=4, random_state=0)
        reg.set_callbacks(reg_monitor).fit(X[:, 1:], X[:, 0])
    logs = monitor.get_logs()
    rows = logs.data if hasattr(logs, "data") else logs
    epoch_scores = [r["accuracy"] for r in rows if r["task_name"] == "epoch"]
    np.testing.assert_allclose(epoch_scores, scores)
    reg_logs = reg_monitor.get_logs()
    reg_rows = reg_logs.data if hasattr(reg_logs, "data") else reg_logs
    assert len([r for r in reg_rows if r["task_name"] == "epoch"]) == 4


def test_progress_bar_runs_and_leaves_the_model_alone(iris):
    X, y = iris  # ProgressBar needs rich, a test requirement
    plain = _est("lbfgs").fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        shown = _est("lbfgs").set_callbacks(callback.ProgressBar()).fit(X, y)
    np.testing.assert_array_equal(plain._theta, shown._theta)


def test_set_callbacks_rejects_what_is_not_a_callback():
    with pytest.raises(TypeError, match="FitCallback"):
        MLPClassifier().set_callbacks(object())


def test_partial_fit_does_not_run_callbacks(iris):
    X, y = iris
    rec = Recorder()
    MLPClassifier((8,), random_state=0).set_callbacks(rec).partial_fit(
        X, y, classes=[0, 1, 2])
    assert [e for e in rec.events if e[0] in ("begin", "end")] == []


def test_estimators_work_without_the_callback_module(tmp_path):
    # scikit-learn before 1.9 has no sklearn.callback: fastbp imports, fits, and has no
    # set_callbacks. Simulated in a fresh interpreter where the protocol's mixin is gone
    # before fastbp is imported (scikit-learn 1.9 itself imports the module).
    code = (
        "import sklearn.base, sklearn.callback, sklearn.datasets, sklearn.metrics\n"
        "import sklearn.model_selection, sklearn.neural_network, sklearn.pipeline\n"
        "import sklearn.preprocessing, sklearn.utils.class_weight\n"
        "del sklearn.callback.CallbackSupportMixin\n"
        "import numpy as np, fastbp\n"
        "X = np.random.default_rng(0).normal(size=(60, 3)); y = (X[:, 0] > 0).astype(int)\n"
        "clf = fastbp.MLPClassifier((4,), solver='lbfgs', max_iter=20).fit(X, y)\n"
        "print(hasattr(clf, 'set_callbacks'), clf.score(X, y) > 0.8)\n")
    import fastbp
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastbp.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [pkg_parent] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                        else [])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_x_with_nan_is_refused_before_any_callback_hook(iris, solver):
    # A minibatch fit may leave the check of X to its first epoch (see test_max_abs),
    # but not with callbacks: they must not see a fit begin that X ends.
    X, y = iris
    X = X.copy()
    X[7, 1] = np.nan
    rec = Recorder()
    est = _est(solver).set_callbacks(rec)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est.fit(X, y)
    assert rec.events == []
    assert not hasattr(est, "coefs_")
