"""The largest |value| of an input (``_core.max_abs``), which ``Network.prepare`` takes to
check X and Y for NaN and infinity and to bound the loss: one pass over the bits of the
values (an integer maximum of the bits with the sign cleared)."""
import numpy as np
import pytest

from fastbp import _core
from fastbp._network import _max_abs

SIZES = [1, 15, 16, 17, 65535, 65536, 65537, 3 * 65536 + 5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
def test_equals_numpy(dtype, n):
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(dtype)
    expected = float(np.abs(a).max())
    assert _core.max_abs(a) == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_infinity_anywhere(dtype):
    n = 2 * 65536 + 37
    for where in (0, 15, 16, 65535, 65536, n - 1):
        for bad, check in ((np.nan, np.isnan), (np.inf, np.isposinf), (-np.inf, np.isposinf)):
            a = np.ones(n, dtype)
            a[where] = bad
            assert check(_core.max_abs(a)), (where, bad)
    # A NaN wins over an infinity, whatever their order.
    a = np.zeros(n, dtype)
    a[3], a[n - 2] = np.inf, np.nan
    assert np.isnan(_core.max_abs(a))
    a[3], a[n - 2] = np.nan, -np.inf
    assert np.isnan(_core.max_abs(a))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_signs_zeros_and_subnormals(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    assert _core.max_abs(np.array([-0.0, 0.0, -0.0], dtype)) == 0.0
    assert _core.max_abs(np.array([-0.0, tiny, -2 * tiny], dtype)) == 2 * tiny
    big = np.finfo(dtype).max
    assert _core.max_abs(np.array([1.0, -big, 2.0], dtype)) == big
    assert _core.max_abs(np.empty(0, dtype)) == 0.0


def test_any_layout_gives_the_same_answer():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 70))
    assert _max_abs(a) == float(np.abs(a).max())                    # C order: kernel
    assert _max_abs(np.asfortranarray(a)) == float(np.abs(a).max())  # F order: kernel
    strided = a[::2, ::3]                                                 # NumPy's reductions
    assert _max_abs(strided) == float(np.abs(strided).max())
    ints = (a * 100).astype(np.int64)
    assert _max_abs(ints) == float(np.abs(ints).max())
    b = a.copy()
    b[6, 6] = np.nan
    assert np.isnan(_max_abs(b[::2, :]))
    assert np.isnan(_max_abs(np.asfortranarray(b)))


@pytest.mark.parametrize("make", ["classifier", "regressor", "autoencoder"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sparse", [False, True])
def test_fit_refuses_non_finite_X_with_scikit_learns_messages(make, bad, sparse):
    # The fit paths check X with this pass instead of scikit-learn's, and keep its words.
    import scipy.sparse as sp
    import fastbp
    est = {"classifier": fastbp.MLPClassifier, "regressor": fastbp.MLPRegressor,
           "autoencoder": fastbp.MLPAutoencoder}[make](max_iter=3)
    X = np.random.default_rng(2).random((20, 3)).astype(np.float32)
    X[4, 2] = bad
    X = sp.csr_matrix(X) if sparse else X
    words = "NaN" if np.isnan(bad) else "infinity or a value too large for dtype.'float32'."
    with pytest.raises(ValueError, match=f"^Input X contains {words}") as info:
        est.fit(X) if make == "autoencoder" else est.fit(X, np.arange(20) % 2)
    if np.isnan(bad):  # and says what to do about missing values
        assert f"{type(est).__name__} does not accept missing values" in str(info.value)


def _recorded(monkeypatch, owner, name, what):
    """Replace ``owner.name`` (a max |a| function) by one that also records ``what(a)``
    of each array it is called on; returns the list of records."""
    records = []
    original = getattr(owner, name)

    def recording(a):
        records.append(what(a))
        return original(a)
    monkeypatch.setattr(owner, name, recording)
    return records


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("make", ["classifier", "regressor", "autoencoder"])
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_a_fit_passes_over_X_once(make, solver, monkeypatch):
    # The input check's max |X| serves Network.prepare too: one pass over X per fit. A
    # float64 X for a float32 network (warm start) is converted, and checked again. A
    # never fitted estimator's minibatch fit takes none: its first epoch finds max |X|.
    import fastbp
    est = {"classifier": fastbp.MLPClassifier, "regressor": fastbp.MLPRegressor,
           "autoencoder": fastbp.MLPAutoencoder}[make](
        hidden_layer_sizes=(4,), solver=solver, max_iter=2, random_state=0)
    rng = np.random.default_rng(3)
    X = rng.random((60, 5)).astype(np.float32)
    y = np.arange(60) % 2 if make == "classifier" else rng.random(60)
    passes = _recorded(monkeypatch, _core, "max_abs", lambda a: a.size)
    fit = (lambda X: est.fit(X)) if make == "autoencoder" else (lambda X: est.fit(X, y))
    fit(X)
    deferred = solver == "adam" and make != "autoencoder"
    # An autoencoder's targets (X) reuse X's pass.
    assert passes.count(X.size) == (0 if deferred else 1)
    assert est._net.dtype == np.float32
    passes.clear()
    est.set_params(warm_start=True)
    fit(X.astype(np.float64))
    # Checked as given, then as converted to float32 (a float64 value beyond float32's
    # range would become infinite there).
    assert passes.count(X.size) == (3 if make == "autoencoder" else 2)
    if solver == "adam" and make != "autoencoder":
        # Early stopping trains on a part of X: that part takes a pass of its own.
        passes.clear()
        est.set_params(warm_start=False, early_stopping=True, validation_fraction=0.25)
        fit(X)
        assert passes.count(X.size) == 1 and passes.count(45 * 5) == 1


# --- The check a never fitted estimator's minibatch fit leaves to its first epoch ------

# (hidden, batch, n_jobs) -> the plan that fit takes (asserted below): every way a
# minibatch epoch gathers its rows.
PLANS = {"serial": ((16,), 96, 1), "team": ((32,), 256, 2), "units": ((192,), 96, 2),
         "units-deep": ((192, 24), 96, 2)}


def _rows(dtype=np.float32, order="C", n=1000, d=64):
    rng = np.random.default_rng(7)
    X = np.asarray(rng.standard_normal((n, d)), dtype=dtype, order=order)
    y = (X[:, 0] + X[:, 1] > 0).astype(int) + 2 * (X[:, 2] > 0.5)
    return X, y


def _watch_settle(monkeypatch):
    """Record each (tops, x_max) of _settle_x_max, and make the pass that stands in for
    an incomplete first epoch fail the test."""
    from fastbp import _stochastic
    seen = []
    original = _stochastic._settle_x_max

    def settle(data, tops, snaps):
        try:
            return original(data, tops, snaps)
        finally:
            seen.append((None if tops is None else tops.copy(), data.x_max))

    def no_pass(a):
        raise AssertionError("a pass of its own over X")
    monkeypatch.setattr(_stochastic, "_settle_x_max", settle)
    monkeypatch.setattr(_stochastic, "_max_abs", no_pass)
    return seen


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("dtype, order", [(np.float32, "C"), (np.float64, "C"),
                                          (np.float32, "F")])
@pytest.mark.parametrize("where", [0, 517, 999])
def test_first_epoch_finds_max_abs_of_every_row(plan, dtype, order, where, monkeypatch):
    from fastbp import MLPClassifier
    import fastbp._estimators as est_module
    X, y = _rows(dtype, order)
    X[where, 5] = -40.25   # the largest |x|, in one row only
    hidden, batch, n_jobs = PLANS[plan]
    kw = dict(hidden_layer_sizes=hidden, batch_size=batch, n_jobs=n_jobs, max_iter=2,
              random_state=0)
    seen = _watch_settle(monkeypatch)
    clf = MLPClassifier(**kw).fit(X, y)
    assert clf.parallelism_["mode"] == plan.split("-")[0]
    assert len(seen) == 1
    tops, x_max = seen[0]
    assert x_max == 40.25 and np.nanmax(tops) == 40.25
    # The same model as with the check first.
    monkeypatch.undo()
    monkeypatch.setattr(est_module, "defers_finite_check", lambda *a: False)
    eager = MLPClassifier(**kw).fit(X, y)
    for a, b in zip(clf.coefs_ + clf.intercepts_, eager.coefs_ + eager.intercepts_):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("bad, message", [(np.nan, "Input X contains NaN"),
                                          (np.inf, "Input X contains infinity"),
                                          (-np.inf, "Input X contains infinity")])
@pytest.mark.parametrize("where", [0, 999])
def test_first_epoch_refuses_non_finite_X_and_leaves_the_estimator_unfitted(
        plan, bad, message, where, monkeypatch):
    import warnings
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted
    from fastbp import MLPClassifier
    import fastbp._estimators as est_module
    X, y = _rows()
    X[where, 3] = bad
    hidden, batch, n_jobs = PLANS[plan]
    kw = dict(hidden_layer_sizes=hidden, batch_size=batch, n_jobs=n_jobs, max_iter=1,
              random_state=0)

    def failed(call, eager=False):
        """The estimator's attributes after ``call`` refused X."""
        with monkeypatch.context() as m:
            if eager:
                m.setattr(est_module, "defers_finite_check", lambda *a: False)
            clf = MLPClassifier(**kw)
            with pytest.raises(ValueError, match=message):
                call(clf)
        return clf
    # fit: as unfitted as a new estimator.
    clf = failed(lambda c: c.fit(X, y))
    assert vars(clf).keys() == vars(MLPClassifier(**kw)).keys()
    with pytest.raises(NotFittedError):
        check_is_fitted(clf)
    # partial_fit: the classes it was given stay, as when the check comes first (which
    # leaves n_features_in_ too).
    first = lambda c: c.partial_fit(X, y, classes=[0, 1, 2, 3])   # noqa: E731
    part = failed(first)
    assert vars(part).keys() <= vars(failed(first, eager=True)).keys()
    np.testing.assert_array_equal(part.classes_, [0, 1, 2, 3])
    assert not hasattr(part, "coefs_")
    # Both then train as a new estimator would.
    X[where, 3] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = MLPClassifier(**kw).fit(X, y)
        clf.fit(X, y)
        part.partial_fit(X, y)
        fresh_part = MLPClassifier(**kw).partial_fit(X, y, classes=[0, 1, 2, 3])
    np.testing.assert_array_equal(clf.coefs_[0], fresh.coefs_[0])
    np.testing.assert_array_equal(part.coefs_[0], fresh_part.coefs_[0])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_fitted_estimator_checks_X_first_and_keeps_its_model():
    from fastbp import MLPRegressor
    X, y = _rows()
    reg = MLPRegressor(hidden_layer_sizes=(16,), max_iter=2, random_state=0).fit(X, y)
    kept = [a.copy() for a in reg.coefs_ + reg.intercepts_]
    X[10, 0] = np.nan
    for call in (lambda: reg.fit(X, y), lambda: reg.partial_fit(X, y)):
        with pytest.raises(ValueError, match="Input X contains NaN"):
            call()
        for a, b in zip(kept, reg.coefs_ + reg.intercepts_):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_chunks, units", [(1, False), (2, False), (2, True)])
def test_epoch_notes_every_gathered_row(dtype, n_chunks, units):
    """The kernel itself: x_tops holds max |x| of the rows gathered, NaN once one is."""
    from fastbp import Network
    from fastbp._stochastic import StochasticOptimizer
    X, y = _rows(dtype, n=301)
    net = Network([64, 64, 4], dtype=dtype)
    order = np.arange(301, dtype=np.intp)
    # Unshuffled, row 300 ends the last, short (13-row) minibatch.
    for planted in (None, 99.5, np.nan):
        if planted is not None:
            X[300, 63] = planted
        data = net.prepare(X, np.eye(4, dtype=dtype)[y], x_check=lambda top: None)
        assert data.x_max is None   # left to the epoch
        opt = StochasticOptimizer("adam", net.n_params, dtype, 1e-3)
        tops = np.zeros(n_chunks)
        opt.epoch(net, net.init_params(random_state=0), data, order, False, 5, 32, 0.0,
                  n_chunks, units=units, x_tops=tops)
        if planted is np.nan:
            assert np.isnan(tops).any()
            continue
        assert tops.max() == np.abs(X).max() == (planted or tops.max())
        # A units split notes every row once, in slot 0; chunks each their own rows.
        assert (tops[1:] == 0).all() if units else (tops > 0).all()
    with pytest.raises(ValueError, match="one slot per chunk"):
        opt.epoch(net, net.init_params(random_state=0), data, order, False, 5, 32, 0.0,
                  2, x_tops=np.zeros(1))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_an_interrupted_first_epoch_checks_X_by_a_pass(monkeypatch):
    """Ctrl-C before the first epoch's max |X| is taken: the fit checks X by a pass."""
    from fastbp import MLPClassifier
    from fastbp._stochastic import StochasticOptimizer
    original = StochasticOptimizer.epoch

    def interrupted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(StochasticOptimizer, "epoch", interrupted)
    X, y = _rows()
    with pytest.warns(UserWarning, match="interrupted"):
        clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)
    assert clf.n_iter_ == 0
    X[400, 2] = np.inf
    with pytest.warns(UserWarning, match="interrupted"):
        with pytest.raises(ValueError, match="Input X contains infinity"):
            MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)


def _refused(fit):
    with pytest.raises(ValueError, match="Input X contains NaN"):
        fit()


@pytest.mark.parametrize("seed", ["instance", "global"])
def test_a_refused_fit_puts_back_the_draws_of_its_random_state(seed):
    from fastbp import MLPClassifier
    X, y = _rows()
    X[123, 4] = np.nan
    rs = np.random.RandomState(5) if seed == "instance" else None
    watched = rs if rs is not None else np.random.mtrand._rand
    before = watched.get_state()
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=rs)
    _refused(lambda: clf.fit(X, y))
    after = watched.get_state()
    np.testing.assert_array_equal(after[1], before[1])   # the key, and where it is at
    assert after[2:] == before[2:]


def test_a_refused_fit_puts_back_attributes_it_reassigned():
    # partial_fit's classes stay after it refuses X (as when X is checked first); a fit
    # refusing X then must not leave the classes of its own y in their place.
    from fastbp import MLPClassifier
    X, y = _rows()
    X[0, 0] = np.nan
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0)
    _refused(lambda: clf.partial_fit(X, y, classes=[0, 1, 2, 3]))
    kept = dict(vars(clf))
    _refused(lambda: clf.fit(X, y + 5))
    assert vars(clf).keys() == kept.keys()
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2, 3])


@pytest.mark.parametrize("n_jobs, hidden", [(1, (16,)), (2, (32,)), (2, (192,))])
def test_a_first_epoch_stopped_early_checks_X_by_a_pass(n_jobs, hidden, monkeypatch):
    # Unshuffled, the first rows overflow the loss, and the epoch stops before it reaches
    # the last row's NaN: the fit must find it by a pass over X, not report divergence.
    from fastbp import MLPRegressor, _stochastic
    passes = _recorded(monkeypatch, _stochastic, "_max_abs", lambda a: a.shape)
    X, _ = _rows()
    y = X[:, 0].astype(np.float64)
    X[:50] = 3e38
    X[999, 0] = np.nan
    reg = MLPRegressor(hidden_layer_sizes=hidden, batch_size=256, n_jobs=n_jobs,
                       max_iter=3, shuffle=False, random_state=0)
    _refused(lambda: reg.fit(X, y))
    assert passes == [X.shape]
    assert not hasattr(reg, "coefs_")


def test_ctrl_c_during_the_check_still_refuses_X(monkeypatch):
    # Ctrl-C while the first epoch's max |X| is checked: the fit checks X again by a
    # pass, so a NaN is still refused (never a divergence report or a fitted model).
    import fastbp._estimators as est_module
    from fastbp import MLPClassifier
    original = est_module.check_finite_top
    calls = []

    def interrupted_once(est, top, dtype):
        calls.append(top)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(est, top, dtype)
    monkeypatch.setattr(est_module, "check_finite_top", interrupted_once)
    X, y = _rows()
    X[3, 3] = np.nan
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0)
    with pytest.warns(UserWarning, match="interrupted"):
        _refused(lambda: clf.fit(X, y))
    assert len(calls) == 2 and not hasattr(clf, "coefs_")
