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


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("make", ["classifier", "regressor", "autoencoder"])
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_a_fit_passes_over_X_once(make, solver, monkeypatch):
    # The input check's max |X| serves Network.prepare too: one pass over X per fit. A
    # float64 X for a float32 network (warm start) is converted, and checked again.
    import fastbp
    est = {"classifier": fastbp.MLPClassifier, "regressor": fastbp.MLPRegressor,
           "autoencoder": fastbp.MLPAutoencoder}[make](
        hidden_layer_sizes=(4,), solver=solver, max_iter=2, random_state=0)
    rng = np.random.default_rng(3)
    X = rng.random((60, 5)).astype(np.float32)
    y = np.arange(60) % 2 if make == "classifier" else rng.random(60)
    passes = []
    original = _core.max_abs

    def counted(a):
        passes.append(a.size)
        return original(a)

    monkeypatch.setattr(_core, "max_abs", counted)
    fit = (lambda X: est.fit(X)) if make == "autoencoder" else (lambda X: est.fit(X, y))
    fit(X)
    assert passes.count(X.size) == 1  # an autoencoder's targets (X) reuse X's pass
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
