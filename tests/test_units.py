"""The 'units' split of a minibatch (the first hidden layer's units cut into parts that
threads own, the layers above replicated per thread): the same model whatever the
number of threads, the serial model up to summation order, every output and
activation, one to three hidden layers, empty parts, partial_fit, and clear errors
where the split cannot run."""
import numpy as np
import pytest
import scipy.sparse as sp

from fastbp import DivergenceError, MLPClassifier, MLPRegressor, Network, _core
from fastbp._network import aligned_empty, aligned_zeros
from fastbp._stochastic import StochasticOptimizer

pytestmark = [pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
              pytest.mark.filterwarnings("ignore:Got `batch_size`:UserWarning")]


def _data(n=300, d=12, k=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = (rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))).astype(dtype)
    return X, y


def _fit(monkeypatch, plan, threads, est, X, y, sample_weight=None, **kw):
    """Fit with the minibatch plan ``plan`` forced, on at most ``threads`` threads."""
    monkeypatch.setattr("fastbp._estimators.minibatch_plan", lambda *a, **k: plan)
    monkeypatch.setattr("fastbp._stochastic.team_for_now",
                        lambda chunks: (min(threads, chunks), True))
    kw = dict(dict(batch_size=32, max_iter=2, random_state=0, tol=0.0), **kw)
    return est(**kw).fit(X, y, sample_weight=sample_weight)


def _params(model):
    return model.coefs_ + model.intercepts_


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "gelu"])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
@pytest.mark.parametrize("parts", [2, 3])
def test_the_model_does_not_depend_on_the_threads(monkeypatch, dtype, activation, solver,
                                                  parts):
    # 40 units: float32 parts are whole cache lines of 16 units (32 + 8, or 16 + 16 + 8),
    # float64 ones of 8 (24 + 16, or 16 + 16 + 8). gelu keeps its derivative beside A.
    X, y = _data(dtype=dtype)
    kw = dict(hidden_layer_sizes=(40,), activation=activation, solver=solver)
    one = _fit(monkeypatch, ("units", parts), 1, MLPClassifier, X, y, **kw)
    two = _fit(monkeypatch, ("units", parts), 2, MLPClassifier, X, y, **kw)
    assert one.parallelism_ == two.parallelism_ == {"mode": "units", "threads": parts}
    for a, b in zip(_params(one), _params(two)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    assert one.loss_curve_ == two.loss_curve_


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["relu", "gelu", "softplus"])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
@pytest.mark.parametrize("hidden", [(40, 24), (40, 24, 17)])
def test_deeper_models_do_not_depend_on_the_threads(monkeypatch, dtype, activation,
                                                    solver, hidden):
    # The layers above the first run on each thread's own copy of their parameters:
    # the copies take the same steps, so 1 or 2 threads running 3 parts give the same
    # model bit for bit. gelu and softplus keep their derivatives in the copies' layers
    # too.
    X, y = _data(dtype=dtype)
    kw = dict(hidden_layer_sizes=hidden, activation=activation, solver=solver)
    one = _fit(monkeypatch, ("units", 3), 1, MLPClassifier, X, y, **kw)
    two = _fit(monkeypatch, ("units", 3), 2, MLPClassifier, X, y, **kw)
    assert one.parallelism_ == two.parallelism_ == {"mode": "units", "threads": 3}
    for a, b in zip(_params(one), _params(two)):
        np.testing.assert_array_equal(a, b)
    assert one.loss_curve_ == two.loss_curve_


# SGD in float64: the units split sums each output over the parts in turn and each
# coefficient's square in another order than one GEMM and one pass do, a difference of a
# few units in the last place (2^-52, 2e-16) of each sum. SGD's step is linear in the
# gradient, and 2 epochs of 10 small steps (lr 1e-3) cannot grow those differences past
# 1e-12 relative; 1e-9 leaves three orders of magnitude for other CPUs' BLAS kernels.
SGD = dict(solver="sgd", learning_rate_init=1e-3, momentum=0.9)


@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "gelu", "softplus"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("hidden", [(48,), (48, 20)])
def test_the_classifier_agrees_with_the_serial_fit(monkeypatch, activation, weighted,
                                                   hidden):
    X, y = _data()
    sw = np.random.default_rng(1).uniform(0.5, 2.0, len(y)) if weighted else None
    kw = dict(hidden_layer_sizes=hidden, activation=activation, **SGD)
    serial = _fit(monkeypatch, ("serial", 1), 1, MLPClassifier, X, y, sw, **kw)
    units = _fit(monkeypatch, ("units", 2), 2, MLPClassifier, X, y, sw, **kw)
    for a, b in zip(_params(serial), _params(units)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(units.loss_curve_, serial.loss_curve_, rtol=1e-9)
    # ... and the two epochs moved the weights: a fit of one epoch differs from both.
    once = _fit(monkeypatch, ("serial", 1), 1, MLPClassifier, X, y, sw, max_iter=1, **kw)
    assert not np.allclose(_params(units)[0], _params(once)[0], rtol=1e-6)


@pytest.mark.parametrize("target", ["multilabel", "regression", "poisson"])
@pytest.mark.parametrize("hidden", [(40,), (40, 16)])
def test_every_output_agrees_with_the_serial_fit(monkeypatch, target, hidden):
    # Logistic outputs per column, squared error, Poisson deviance: each output layer's
    # loss and delta run on the summed parts.
    X, y = _data(k=4)
    if target == "multilabel":
        est, Y, kw = MLPClassifier, np.eye(4)[y] + np.eye(4)[(y + 1) % 4], {}
    elif target == "regression":
        est, Y, kw = MLPRegressor, np.c_[X[:, 0] + X[:, 1] ** 2, X[:, 2]], {}
    else:
        est, Y, kw = MLPRegressor, np.exp(0.3 * X[:, :2]), {"loss": "poisson"}
    serial = _fit(monkeypatch, ("serial", 1), 1, est, X, Y, hidden_layer_sizes=hidden,
                  **SGD, **kw)
    units = _fit(monkeypatch, ("units", 2), 2, est, X, Y, hidden_layer_sizes=hidden,
                 **SGD, **kw)
    for a, b in zip(_params(serial), _params(units)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("hidden", [(64,), (64, 24)])
def test_adam_in_float32_agrees_with_the_serial_fit(monkeypatch, hidden):
    # Adam divides by the gradient's scale, so a rounding difference in a tiny gradient
    # can change its step by up to the largest step an Adam update takes,
    # lr (1 - beta_1) / sqrt(1 - beta_2) < 3.2 lr per step: 20 steps of lr 1e-3 keep the
    # two fits within 2 x 20 x 3.2e-3 of each other whatever the rounding. That bound
    # holds for any gradients; what tells a wrong split from a right one is the loss:
    # the summation orders change a float32 loss near 0.1 by about 1e-7, a wrong output
    # sum or gradient by far more than 1e-4.
    X, y = _data(dtype=np.float32)
    kw = dict(hidden_layer_sizes=hidden, solver="adam")
    serial = _fit(monkeypatch, ("serial", 1), 1, MLPClassifier, X, y, **kw)
    units = _fit(monkeypatch, ("units", 2), 2, MLPClassifier, X, y, **kw)
    assert serial.t_ == units.t_ == 2 * 300
    for a, b in zip(_params(serial), _params(units)):
        np.testing.assert_allclose(b, a, rtol=0, atol=2 * 20 * 3.2e-3)
    assert abs(units.loss_curve_[-1] - serial.loss_curve_[-1]) < 1e-4


@pytest.mark.parametrize("layout", ["F-ordered", "read-only", "strided"])
def test_every_input_layout_agrees_with_the_serial_fit(monkeypatch, layout):
    # The split gathers each minibatch's rows itself: from an F-ordered X (column by
    # column, in place), a read-only one, or a view that is neither C- nor F-ordered
    # (which Network.prepare copies first).
    X, y = _data()
    if layout == "F-ordered":
        X = np.asfortranarray(X)
    elif layout == "read-only":
        X = X.copy()
        X.flags.writeable = False
    else:
        X = np.repeat(X, 2, axis=1)[:, ::2]
        assert not X.flags.c_contiguous and not X.flags.f_contiguous
    _check_sgd_agrees(monkeypatch, X, y, 40)


def test_the_penalty_covers_every_layer(monkeypatch):
    # A strong penalty (alpha 0.5): the loss counts the squares of every coefficient,
    # the split layers' (summed by their parts) and the copies' (W_3, summed by part 0's
    # thread). Leaving W_3's out would lower each loss by 0.5 x alpha x |W_3|^2 / n
    # (about 1e-4 here), far past the 1e-9 that summation order allows (see SGD).
    X, y = _data()
    kw = dict(hidden_layer_sizes=(40, 16), alpha=0.5, **SGD)
    serial = _fit(monkeypatch, ("serial", 1), 1, MLPClassifier, X, y, **kw)
    units = _fit(monkeypatch, ("units", 2), 2, MLPClassifier, X, y, **kw)
    np.testing.assert_allclose(units.loss_curve_, serial.loss_curve_, rtol=1e-9)
    w3 = 0.5 * 0.5 * np.sum(serial.coefs_[2] ** 2) / 32
    assert w3 > 1e4 * 1e-9 * serial.loss_curve_[-1]


def test_an_empty_part_is_harmless(monkeypatch):
    # 8 units in parts of whole float64 lines (8 units): the second part is empty.
    X, y = _data()
    _check_sgd_agrees(monkeypatch, X, y, 8)


def _check_sgd_agrees(monkeypatch, X, y, hidden):
    """A float64 SGD fit split in 2 parts on 2 threads against the serial fit (see SGD)."""
    serial = _fit(monkeypatch, ("serial", 1), 1, MLPClassifier, X, y,
                  hidden_layer_sizes=(hidden,), **SGD)
    units = _fit(monkeypatch, ("units", 2), 2, MLPClassifier, X, y,
                 hidden_layer_sizes=(hidden,), **SGD)
    for a, b in zip(_params(serial), _params(units)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("hidden", [(40,), (40, 12)])
def test_partial_fit_keeps_going(monkeypatch, hidden):
    # Calls of 149, 150 and 300 rows with batch_size=200: the minibatch, and so the
    # units split's workspace, grows from call to call (149 and 150 rows give the same
    # rows per chunk of a team, not the same workspace for the split).
    X, y = _data()
    monkeypatch.setattr("fastbp._stochastic.team_for_now", lambda chunks: (chunks, True))
    models = []
    for plan in [("serial", 1), ("units", 2)]:
        monkeypatch.setattr("fastbp._estimators.minibatch_plan", lambda *a, **k: plan)
        clf = MLPClassifier(hidden, batch_size=200, random_state=0, **SGD)
        for rows in (149, 150, 300):
            clf.partial_fit(X[:rows], y[:rows], classes=[0, 1, 2])
        models.append(clf)
    assert models[1].parallelism_["mode"] == "units"
    for a, b in zip(_params(models[0]), _params(models[1])):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["sparse", "dropout", "no hidden layer"])
def test_the_split_refuses_what_it_cannot_split(monkeypatch, case):
    # The plan never asks for these; if a caller does, run_epoch refuses sparse X and
    # dropout, and units_workspace_size (sizing the buffers first) a network without a
    # hidden layer.
    X, y = _data()
    kw = dict(hidden_layer_sizes=(40,))
    if case == "sparse":
        X = sp.csr_matrix(X)
    elif case == "dropout":
        kw["dropout"] = 0.2
    else:
        kw["hidden_layer_sizes"] = ()
    with pytest.raises(ValueError, match="'units' split needs a (network with a )?hidden"):
        _fit(monkeypatch, ("units", 2), 2, MLPClassifier, X, y, **kw)


def test_workspace_size():
    relu = np.array([3], dtype=np.intc)
    with pytest.raises(ValueError, match="needs a network with a hidden layer"):
        _core.units_workspace_size(np.array([12, 3], dtype=np.intp), relu[:0], 32, 2)
    sizes = np.array([12, 40, 3], dtype=np.intp)
    with pytest.raises(ValueError, match="parts >= 1"):
        _core.units_workspace_size(sizes, relu, 32, 0)
    with pytest.raises(ValueError, match="one activation code per hidden layer"):
        _core.units_workspace_size(np.array([12, 40, 20, 3], dtype=np.intp), relu, 32, 2)
    one, two = (_core.units_workspace_size(sizes, relu, 32, p) for p in (1, 2))
    assert two < one  # half the units per part (40 -> parts of 32 float32 units)
    # A second hidden layer adds block_pass's workspace and the thread's four copies of
    # theta[w_off[2]:] (W_3, then b_1, b_2, b_3: 20 x 3 + 40 + 20 + 3 = 123 values).
    deep = _core.units_workspace_size(np.array([12, 40, 20, 3], dtype=np.intp),
                                      np.array([3, 3], dtype=np.intc), 32, 2)
    assert deep >= two + 4 * 123 + 32 * (40 + 20 + 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameter_arrays_start_on_a_cache_line(dtype):
    for shape in [(5,), (3, 7), (1,), (2, 0)]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.size == 0 or a.ctypes.data % 64 == 0
    z = aligned_zeros((4, 5), dtype)
    assert z.ctypes.data % 64 == 0 and not z.any()
    theta = Network([12, 40, 3], dtype=dtype).init_params(random_state=0)
    assert theta.ctypes.data % 64 == 0


@pytest.mark.parametrize("parts, threads", [(2, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("sizes", [[12, 48, 3], [12, 48, 20, 3]])
def test_an_overflowing_minibatch_stops_the_epoch_where_the_serial_one_stops(parts,
                                                                            threads,
                                                                            sizes):
    # Adam with a rate of 1e30 in float32: the first step moves every weight by about
    # 1e30, and the next minibatch's outputs overflow, so its loss is not finite. The
    # epoch stops there, after that minibatch's step, in every mode: every thread forms
    # the same loss and stops at the same minibatch, and each part's block of W_1 is
    # stored back into theta (and thread 0's copy of the layers above the first).
    X, y = _data(n=320, dtype=np.float32)
    Y = np.eye(3, dtype=np.float32)[y]
    net = Network(sizes, dtype=np.float32)
    data = net.prepare(X, Y)
    runs = []
    for units, chunks in [(False, 1), (True, parts)]:
        theta = net.init_params(random_state=0)
        opt = StochasticOptimizer("adam", net.n_params, np.float32, 1e30)
        order = np.arange(320, dtype=np.intp)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("fastbp._stochastic.team_for_now", lambda c: (min(threads, c), True))
            total = opt.epoch(net, theta, data, order, True, 7, 32, 1e-4, chunks,
                              units=units)
        runs.append((theta, opt.step[0], total))
    (serial, t_serial, total_serial), (split, t_split, total_split) = runs
    assert 1 < t_serial == t_split < 10   # stopped after its second minibatch or so
    assert not np.isfinite(total_serial) and not np.isfinite(total_split)
    # The overflowing minibatch's step left W_1 non-finite in the serial fit; the split
    # stored its blocks back into theta, so its W_1 is non-finite in the same places
    # (without the store it would still hold the finite values it was loaded with).
    w1 = slice(0, 12 * 48)
    assert not np.isfinite(serial[w1]).any()
    if len(sizes) == 3:
        np.testing.assert_array_equal(np.isfinite(split), np.isfinite(serial))
    else:
        # Past the first layer, which sums overflow depends on their order (the serial
        # GEMM's or the parts' partial sums), so only the layers that overflow whole
        # are compared: W_1 (the parts' blocks) and W_3 (thread 0's copy, stored back).
        w3 = slice(net._w_off[2], net._b_off[0])
        assert not np.isfinite(serial[w3]).any()
        assert not np.isfinite(split[w1]).any() and not np.isfinite(split[w3]).any()
