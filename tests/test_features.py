"""The MLP features scikit-learn's module will not add: class weights, the cosine
learning-rate schedule, a validation set of one's own."""
import math
import os
import tempfile

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.datasets import load_iris, make_multilabel_classification
from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight

import fastbp
from fastbp import MLPClassifier, MLPRegressor, Network

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return (X - X.mean(0)) / X.std(0), y


def _lbfgs(**kw):
    return MLPClassifier((8,), solver="lbfgs", max_iter=60, random_state=0, **kw)


# class_weight ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sparse", [False, True])
def test_class_weight_dict_is_the_equivalent_sample_weight(iris, dtype, sparse):
    X, y = iris
    X = X.astype(dtype)
    X = sp.csr_matrix(X) if sparse else X
    yb = (y > 0).astype(int)
    a = _lbfgs(class_weight={0: 2, 1: 1}).fit(X, yb)
    b = _lbfgs().fit(X, yb, sample_weight=np.where(yb == 0, 2.0, 1.0))
    # The same weights reach the same kernels: the same model, to rounding.
    tol = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(a._theta, b._theta, rtol=0, atol=tol)
    # ... and not the unweighted one.
    c = _lbfgs().fit(X, yb)
    assert np.abs(a._theta - c._theta).max() > 1e-3


def test_class_weight_multiplies_sample_weight(iris):
    X, y = iris
    sw = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    a = _lbfgs(class_weight={0: 3.0, 2: 0.5}).fit(X, y, sample_weight=sw)
    rows = np.array([3.0, 1.0, 0.5])[y]
    b = _lbfgs().fit(X, y, sample_weight=sw * rows)
    np.testing.assert_allclose(a._theta, b._theta, rtol=0, atol=1e-10)


def test_class_weight_balanced_matches_scikit_learn_formula(iris):
    X, y = iris
    X, y = X[:120], y[:120]  # 50 / 50 / 20: unbalanced
    a = _lbfgs(class_weight="balanced").fit(X, y)
    counts = np.bincount(y)
    expected = (len(y) / (3 * counts))[y]
    np.testing.assert_allclose(expected, compute_sample_weight("balanced", y))
    b = _lbfgs().fit(X, y, sample_weight=expected)
    np.testing.assert_allclose(a._theta, b._theta, rtol=0, atol=1e-10)


def test_class_weight_balanced_counts_weighted_samples(iris):
    # As LogisticRegression: 'balanced' counts each class's sample weights, so that a
    # weight of 2 is a repeated row (scikit-learn's sample-weight equivalence check).
    X, y = iris
    X, y = X[:120], y[:120]
    sw = np.random.default_rng(1).integers(0, 3, len(y)).astype(float)
    a = _lbfgs(class_weight="balanced").fit(X, y, sample_weight=sw)
    per_class = sw.sum() / (3 * np.bincount(y, weights=sw))
    b = _lbfgs().fit(X, y, sample_weight=sw * per_class[y])
    np.testing.assert_allclose(a._theta, b._theta, rtol=0, atol=1e-10)
    rows = np.repeat(np.arange(len(y)), sw.astype(int))
    c = _lbfgs(class_weight="balanced").fit(X[rows], y[rows])
    np.testing.assert_allclose(a._theta, c._theta, rtol=0, atol=1e-8)


def test_class_weight_with_string_labels(iris):
    X, y = iris
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    a = _lbfgs(class_weight={"virginica": 4.0}).fit(X, names)
    b = _lbfgs().fit(X, names, sample_weight=np.where(y == 2, 4.0, 1.0))
    np.testing.assert_allclose(a._theta, b._theta, rtol=0, atol=1e-10)


@pytest.mark.parametrize("class_weight", ["balanced", [{0: 1, 1: 3}, {0: 2, 1: 1},
                                                       {1: 0.5}]])
def test_class_weight_multilabel_is_per_output(class_weight):
    X, Y = make_multilabel_classification(120, 6, n_classes=3, random_state=0)
    a = _lbfgs(class_weight=class_weight).fit(X, Y)
    b = _lbfgs().fit(X, Y, sample_weight=compute_sample_weight(class_weight, Y))
    np.testing.assert_allclose(a._theta, b._theta, rtol=0, atol=1e-10)


def test_class_weight_in_stochastic_training_is_the_sample_weight(iris):
    X, y = iris
    kw = dict(solver="adam", max_iter=5, random_state=0, batch_size=16)
    a = MLPClassifier((8,), class_weight={1: 2.0}, **kw).fit(X, y)
    b = MLPClassifier((8,), **kw).fit(X, y, sample_weight=np.where(y == 1, 2.0, 1.0))
    np.testing.assert_array_equal(a._theta, b._theta)


def test_partial_fit_takes_a_dict_but_not_balanced(iris):
    X, y = iris
    with pytest.raises(ValueError, match="'balanced' does not work with partial_fit"):
        MLPClassifier((8,), class_weight="balanced").partial_fit(X, y, classes=[0, 1, 2])
    a = MLPClassifier((8,), solver="sgd", random_state=0, class_weight={2: 3.0})
    b = MLPClassifier((8,), solver="sgd", random_state=0)
    for k in range(3):
        rows = slice(50 * k, 50 * k + 50)
        a.partial_fit(X[rows], y[rows], classes=[0, 1, 2])
        b.partial_fit(X[rows], y[rows], classes=[0, 1, 2],
                      sample_weight=np.where(y[rows] == 2, 3.0, 1.0))
    np.testing.assert_array_equal(a._theta, b._theta)


@pytest.mark.parametrize("class_weight, message", [
    ({0: -1.0}, "finite non-negative"),
    ({0: float("nan")}, "finite non-negative"),
    ({0: "heavy"}, "finite non-negative"),
    ({0: True}, "finite non-negative"),
    ({7: 2.0}, r"names \[7\], which are not classes"),
    ([{0: 1.0}], "list of dicts as class_weight is for multilabel"),
    ({0: 0.0, 1: 0.0, 2: 0.0}, "zero for every sample"),
    ("often", "class_weight"),
    (3.0, "class_weight"),
])
def test_bad_class_weight_gets_a_clear_error(iris, class_weight, message):
    X, y = iris
    with pytest.raises(ValueError, match=message):
        _lbfgs(class_weight=class_weight).fit(X, y)


@pytest.mark.parametrize("class_weight, message", [
    ({0: 1.0, 1: 2.0}, "one dict per output"),
    ([{0: 1.0}], "has 1 dicts, but y has 3 outputs"),
    ([{0: 1.0}, {2: 1.0}, {}], r"names \[2\]"),
])
def test_bad_multilabel_class_weight_gets_a_clear_error(class_weight, message):
    X, Y = make_multilabel_classification(60, 4, n_classes=3, random_state=0)
    with pytest.raises(ValueError, match=message):
        _lbfgs(class_weight=class_weight).fit(X, Y)


@pytest.mark.parametrize("class_weight", [{0: 2, 1: 1}, {"a": 0.5},
                                          [{0: 1, 1: 2}, {0: 3, 1: 1}]])
def test_class_weight_survives_a_model_file(class_weight):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    if isinstance(class_weight, list):
        y = (rng.random((40, 2)) > 0.5).astype(int)
    elif "a" in class_weight:
        y = np.where(X[:, 0] > 0, "a", "b")
    else:
        y = (X[:, 0] > 0).astype(int)
    est = _lbfgs(class_weight=class_weight).fit(X, y)
    path = os.path.join(tempfile.mkdtemp(), "cw.fbp")
    fastbp.save(est, path)
    loaded = fastbp.load(path)
    assert loaded.class_weight == class_weight
    assert type(next(iter((class_weight if isinstance(class_weight, dict)
                           else class_weight[0])))) is type(next(iter(
                               loaded.class_weight if isinstance(class_weight, dict)
                               else loaded.class_weight[0])))
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))


def test_class_weight_on_dask_equals_local(iris):
    distributed = pytest.importorskip("distributed")
    da = pytest.importorskip("dask.array")
    X, y = iris
    X, y = X[:130], y[:130]
    with distributed.Client(n_workers=1, threads_per_worker=2, processes=False,
                            dashboard_address=None) as client:
        sw = np.linspace(0.2, 2.0, len(y))
        for cw in ("balanced", {0: 2.0, 2: 0.5}):
            for weights in (None, sw):
                local = _lbfgs(class_weight=cw).fit(X, y, sample_weight=weights)
                remote = _lbfgs(class_weight=cw).fit(
                    da.from_array(X, chunks=(40, -1)), da.from_array(y, chunks=40),
                    sample_weight=None if weights is None else da.from_array(weights,
                                                                             chunks=40),
                    client=client)
                np.testing.assert_allclose(remote._theta, local._theta, rtol=0,
                                           atol=1e-10)
        with pytest.raises(ValueError, match="not classes of y"):
            _lbfgs(class_weight={9: 1.0}).fit(da.from_array(X, chunks=(40, -1)),
                                              da.from_array(y, chunks=40), client=client)


def test_class_weight_balanced_is_scikit_learns_compute_class_weight(iris):
    X, y = iris
    y = y[:110]
    per_class = compute_class_weight("balanced", classes=np.unique(y), y=y)
    np.testing.assert_allclose(per_class, len(y) / (3 * np.bincount(y)))


# learning_rate='cosine' ------------------------------------------------------------------

def _cosine_reference(X, Y, lr, n_epochs, batch_size, adam=False):
    """SGD without momentum, or Adam, with the cosine schedule: a NumPy loop over the
    same minibatches, from the estimator's initial parameters, with fastbp's own
    loss_grad as the gradient."""
    net = Network([X.shape[1], 6, Y.shape[1]], activation="tanh", output="softmax",
                  dtype=np.float64)
    theta = net.init_params(np.random.RandomState(0))
    batches = [np.arange(k, min(k + batch_size, len(X)))
               for k in range(0, len(X), batch_size)]
    total = n_epochs * len(batches)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    s = 0
    for _ in range(n_epochs):
        for rows in batches:
            rate = lr * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
            _, grad = net.loss_grad(theta, X[rows], Y[rows], alpha=1e-4)
            s += 1
            if adam:
                m = 0.9 * m + 0.1 * grad
                v = 0.999 * v + 0.001 * grad * grad
                rate_t = rate * math.sqrt(1 - 0.999 ** s) / (1 - 0.9 ** s)
                theta -= rate_t * m / (np.sqrt(v) + 1e-8)
            else:
                theta -= rate * grad
    return theta, total


@pytest.mark.parametrize("solver", ["sgd", "adam"])
@pytest.mark.parametrize("batch_size", [150, 40])
def test_cosine_schedule_decays_per_step(iris, solver, batch_size):
    X, y = iris
    lr = 0.5 if solver == "sgd" else 0.05
    est = MLPClassifier((6,), activation="tanh", solver=solver, learning_rate="cosine",
                        learning_rate_init=lr, momentum=0.0, batch_size=batch_size,
                        shuffle=False, max_iter=4, tol=0.0, n_iter_no_change=100,
                        random_state=0).fit(X, y)
    expected, total = _cosine_reference(X, np.eye(3)[y], lr, 4, batch_size,
                                        adam=solver == "adam")
    # Same arithmetic in another order (NumPy's sums against the kernels' fused loops):
    # agreement to a few hundred ulps of the parameters' size, over at most 16 steps.
    np.testing.assert_allclose(est._theta, expected, rtol=0, atol=1e-11)
    assert est._optimizer.cosine_step == total
    assert est._optimizer.learning_rate == pytest.approx(0.0, abs=1e-15)
    # The schedule matters: a constant rate ends elsewhere.
    const = MLPClassifier((6,), activation="tanh", solver=solver, learning_rate_init=lr,
                          momentum=0.0, batch_size=batch_size, shuffle=False, max_iter=4,
                          tol=0.0, n_iter_no_change=100, random_state=0).fit(X, y)
    assert np.abs(const._theta - est._theta).max() > 1e-3


def test_cosine_restarts_with_warm_start_and_continues_with_partial_fit(iris):
    X, y = iris
    est = MLPClassifier((6,), solver="sgd", learning_rate="cosine", max_iter=3,
                        batch_size=50, warm_start=True, random_state=0).fit(X, y)
    assert est._optimizer.cosine_step == 9
    est.fit(X, y)
    assert est._optimizer.cosine_step == 9  # restarted, then 3 epochs again
    p = MLPClassifier((6,), solver="sgd", learning_rate="cosine", max_iter=2,
                      batch_size=50, random_state=0)
    for _ in range(3):
        p.partial_fit(X, y, classes=[0, 1, 2])
    assert p._optimizer.cosine_step == 9
    assert p._optimizer.learning_rate == 0.0  # past the schedule's end: no more steps


def test_cosine_is_validated_and_trains_regressors(iris):
    X, y = iris
    with pytest.raises(ValueError, match="learning_rate"):
        MLPClassifier(learning_rate="cosinus").fit(X, y)
    reg = MLPRegressor(hidden_layer_sizes=(4,), learning_rate="cosine", max_iter=2, random_state=0)
    reg.fit(X, X[:, 0])
    assert np.isfinite(reg.loss_)


# Your own validation set -------------------------------------------------------------------

@pytest.fixture(scope="module")
def split(iris):
    X, y = iris
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    return X[idx[:110]], y[idx[:110]], X[idx[110:]], y[idx[110:]]


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs", "hessian-free"])
def test_validation_scores_are_recorded_every_epoch(split, solver):
    X, y, Xv, yv = split
    est = MLPClassifier((8,), solver=solver, max_iter=6, random_state=0, tol=0.0,
                        n_iter_no_change=100)
    scores = []

    def record(n_iter, loss):  # the estimator's own per-iteration hook, seen from here
        scores.append(est.score(Xv, yv))
    est._progress_callback = record
    est.fit(X, y, X_val=Xv, y_val=yv)
    del est._progress_callback
    assert len(est.validation_scores_) == est.n_iter_ == len(scores)
    np.testing.assert_allclose(est.validation_scores_, scores)
    # Each score is that iteration's model's: the last one is the fitted model's, and
    # the scores move as the model learns.
    assert est.validation_scores_[-1] == est.score(Xv, yv)
    assert len(set(est.validation_scores_)) > 1
    assert est.best_validation_score_ == max(scores)
    # Without early stopping, training still stops on the training loss only.
    assert est.best_loss_ == min(est.loss_curve_)


def test_early_stopping_uses_the_given_validation_set_and_restores_its_best(split):
    X, y, Xv, yv = split
    snapshots, scores = [], []
    est = MLPClassifier((8,), solver="adam", learning_rate_init=0.05, max_iter=200,
                        early_stopping=True, n_iter_no_change=3, tol=0.0, random_state=0)

    def record(n_iter, loss):
        snapshots.append(est._theta.copy())
        scores.append(est.score(Xv, yv))
    est._progress_callback = record
    est.fit(X, y, X_val=Xv, y_val=yv)
    del est._progress_callback
    # No rows were held out of X: every epoch saw all 110 rows.
    assert est.t_ == 110 * est.n_iter_
    np.testing.assert_allclose(est.validation_scores_, scores)
    best = int(np.argmax(scores))  # the first epoch with the best score
    np.testing.assert_array_equal(est._theta, snapshots[best])
    assert est.best_validation_score_ == scores[best]
    assert est.n_iter_ < 200


def test_validation_set_with_weights_and_class_weights(split):
    X, y, Xv, yv = split
    swv = np.linspace(0.5, 2.0, len(yv))
    est = MLPClassifier((8,), solver="lbfgs", max_iter=5, random_state=0,
                        class_weight={0: 3.0}).fit(X, y, X_val=Xv, y_val=yv,
                                                   sample_weight_val=swv)
    expected = est.score(Xv, yv, sample_weight=swv * np.where(yv == 0, 3.0, 1.0))
    assert est.validation_scores_[-1] == pytest.approx(expected)


def test_regressor_validation_set_records_r2(split):
    X, y, Xv, yv = split
    est = MLPRegressor(hidden_layer_sizes=(8,), solver="adam", max_iter=4,
                       random_state=0).fit(X[:, 1:], X[:, 0], X_val=Xv[:, 1:],
                                           y_val=Xv[:, 0])
    assert est.validation_scores_[-1] == pytest.approx(est.score(Xv[:, 1:], Xv[:, 0]))


def test_validation_set_through_a_pipeline(split):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    X, y, Xv, yv = split
    X, Xv = X * 10 + 3, Xv * 10 + 3
    with sklearn.config_context(enable_metadata_routing=True):
        mlp = MLPClassifier((8,), solver="adam", max_iter=5, random_state=0)
        mlp.set_fit_request(X_val=True, y_val=True)
        pipe = Pipeline([("scale", StandardScaler()), ("mlp", mlp)],
                        transform_input=["X_val"]).fit(X, y, X_val=Xv, y_val=yv)
    scaler = StandardScaler().fit(X)
    direct = MLPClassifier((8,), solver="adam", max_iter=5, random_state=0).fit(
        scaler.transform(X), y, X_val=scaler.transform(Xv), y_val=yv)
    assert pipe[-1].validation_scores_ == direct.validation_scores_
    assert pipe[-1].validation_scores_[-1] == pytest.approx(pipe.score(Xv, yv))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(X_val="given"), ValueError, "X_val was given without y_val"),
    (dict(y_val="given"), ValueError, "y_val was given without X_val"),
    (dict(sample_weight_val=np.ones(40)), ValueError, "sample_weight_val was given"),
    (dict(X_val=np.ones((40, 3)), y_val="given"), ValueError, "features"),
    (dict(X_val="given", y_val=np.zeros(39)), ValueError, "inconsistent numbers"),
    (dict(X_val="given", y_val=np.full(40, 7)), ValueError, r"classes \[7\]"),
    (dict(X_val="given", y_val="given", sample_weight_val=-np.ones(40)), ValueError,
     "Negative"),
    (dict(X_val=np.full((40, 4), np.nan), y_val="given"), ValueError, "NaN"),
])
def test_bad_validation_set_gets_a_clear_error(split, kwargs, error, message):
    X, y, Xv, yv = split
    kwargs = {k: (Xv if k == "X_val" else yv) if isinstance(v, str) else v
              for k, v in kwargs.items()}
    with pytest.raises(error, match=message):
        MLPClassifier((4,), max_iter=2).fit(X, y, **kwargs)


def test_validation_set_outputs_must_match_for_regression(split):
    X, y, Xv, yv = split
    with pytest.raises(ValueError, match="y_val has 2 outputs, but y has 1"):
        MLPRegressor(hidden_layer_sizes=(4,), max_iter=2).fit(
            X, X[:, 0], X_val=Xv, y_val=Xv[:, :2])
