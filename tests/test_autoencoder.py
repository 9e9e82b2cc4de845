"""MLPAutoencoder: reconstruction with every solver, the code and its inverse, sparse
input, model files, and clear errors."""
import os
import tempfile
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit
from sklearn.datasets import load_digits
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import fastbp
from fastbp import MLPAutoencoder

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def digits():
    return load_digits().data / 16


def _numpy_forward(ae, X, upto):
    """A plain NumPy forward pass through the first ``upto`` weight layers."""
    acts = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "logistic": expit,
            "identity": lambda z: z}
    A = X
    for coef, intercept in list(zip(ae.coefs_, ae.intercepts_))[:upto]:
        A = acts[ae.activation](A @ coef + intercept)
    return A


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs", "tnc", "newton-cg",
                                    "trust-krylov", "hessian-free"])
def test_every_solver_learns_to_reconstruct(digits, solver):
    X = digits[:400]
    kw = dict(learning_rate_init=0.01) if solver in ("adam", "sgd") else {}
    ae = MLPAutoencoder((16, 8, 16), solver=solver, max_iter=60, random_state=0, **kw)
    ae.fit(X)
    start = MLPAutoencoder((16, 8, 16), solver=solver, max_iter=1, random_state=0, **kw)
    assert ae.score(X) > start.fit(X).score(X) + 0.05
    assert ae.loss_curve_[-1] < ae.loss_curve_[0]


@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "identity"])
@pytest.mark.parametrize("code_layer", [None, 0, 2])
def test_code_and_its_inverse(digits, activation, code_layer):
    X = digits[:200]
    ae = MLPAutoencoder((24, 6, 24), activation=activation, code_layer=code_layer,
                        solver="lbfgs", max_iter=30, random_state=0).fit(X)
    code = 1 if code_layer is None else code_layer
    Z = ae.transform(X)
    assert Z.shape == (200, (24, 6, 24)[code])
    np.testing.assert_allclose(Z, _numpy_forward(ae, X, code + 1), rtol=1e-10,
                               atol=1e-12)
    # Decoding the code gives the full network's reconstruction.
    np.testing.assert_allclose(ae.inverse_transform(Z), ae._forward(X), rtol=1e-10,
                               atol=1e-12)
    assert list(ae.get_feature_names_out()) == [f"mlpautoencoder{i}"
                                                for i in range(Z.shape[1])]


def test_score_is_variance_weighted_r2(digits):
    X = digits[:300]
    ae = MLPAutoencoder(solver="lbfgs", max_iter=40, random_state=0).fit(X)
    X_rec = ae.inverse_transform(ae.transform(X))
    expected = r2_score(X, X_rec, multioutput="variance_weighted")
    assert ae.score(X) == pytest.approx(expected, rel=1e-10)
    # Near-constant pixels would swamp a plain average of per-pixel R^2.
    assert expected != pytest.approx(r2_score(X, X_rec), rel=1e-3)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_score_runs_in_blocks_and_equals_r2_score(digits, fmt, monkeypatch):
    # Blocks of 7 rows (64 features): the reconstruction and the sums run block by
    # block, sparse blocks densified one at a time, and still give r2_score's number,
    # with and without weights; a constant column (pixel 0 is always 0) has no weight.
    from fastbp import _autoencoder
    X = digits[:301]
    ae = MLPAutoencoder((16, 4, 16), solver="lbfgs", max_iter=30, random_state=0).fit(X)
    X_rec = ae.inverse_transform(ae.transform(X))
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=len(X))
    Xf = X if fmt == "dense" else getattr(sp, f"{fmt}_matrix")(X)
    monkeypatch.setattr(_autoencoder, "_SCORE_BLOCK", 7 * X.shape[1])
    for weights in (None, w):
        expected = r2_score(X, X_rec, sample_weight=weights,
                            multioutput="variance_weighted")
        assert ae.score(Xf, sample_weight=weights) == pytest.approx(expected, rel=1e-10)
    # All columns constant: 1 when reconstructed exactly, 0 otherwise, as r2_score says.
    assert _autoencoder._variance_weighted_r2(np.zeros(3), np.zeros(3)) == 1.0
    assert _autoencoder._variance_weighted_r2(np.array([0.0, 1e-3, 0]), np.zeros(3)) == 0.0


def test_sparse_input_trains_the_same_model(digits):
    X = digits[:200]
    dense = MLPAutoencoder((16, 4, 16), solver="lbfgs", max_iter=20,
                           random_state=0).fit(X)
    sparse = MLPAutoencoder((16, 4, 16), solver="lbfgs", max_iter=20,
                            random_state=0).fit(sp.csr_matrix(X))
    # The first layer's sums run in another order for CSR rows: equal to rounding,
    # amplified by 20 L-BFGS iterations.
    np.testing.assert_allclose(sparse._theta, dense._theta, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sparse.transform(sp.csr_matrix(X)), dense.transform(X),
                               atol=1e-6)


def test_float32_trains_in_float32(digits):
    ae = MLPAutoencoder(max_iter=5, random_state=0).fit(digits.astype(np.float32))
    assert ae._theta.dtype == np.float32
    assert ae.transform(digits[:3].astype(np.float32)).dtype == np.float32


def test_validation_set_and_early_stopping(digits):
    X, X_val = digits[:1200], digits[1200:]
    ae = MLPAutoencoder(max_iter=200, early_stopping=True, n_iter_no_change=3,
                        learning_rate_init=0.01, random_state=0)
    ae.fit(X, X_val=X_val)
    assert len(ae.validation_scores_) == ae.n_iter_ < 200
    assert ae.best_validation_score_ == max(ae.validation_scores_)
    assert ae.score(X_val) == pytest.approx(ae.best_validation_score_, rel=1e-12)
    assert ae.t_ == ae.n_iter_ * len(X)  # nothing was held out of X


def test_partial_fit_and_pipeline(digits):
    ae = MLPAutoencoder((16, 4, 16), random_state=0)
    for k in range(3):
        ae.partial_fit(digits[k * 300:(k + 1) * 300])
    assert ae.n_iter_ == 1 and ae.t_ == 900
    pipe = make_pipeline(StandardScaler(), MLPAutoencoder((16, 4, 16), max_iter=20,
                                                          random_state=0))
    assert pipe.fit_transform(digits).shape == (len(digits), 4)


def test_model_file_round_trip(digits):
    ae = MLPAutoencoder((16, 4, 16), code_layer=0, solver="lbfgs", max_iter=20,
                        random_state=0).fit(digits)
    path = os.path.join(tempfile.mkdtemp(), "ae.fbp")
    fastbp.save(ae, path)
    loaded = fastbp.load(path)
    assert isinstance(loaded, MLPAutoencoder) and loaded.code_layer == 0
    np.testing.assert_array_equal(loaded.transform(digits), ae.transform(digits))
    np.testing.assert_array_equal(loaded.inverse_transform(ae.transform(digits)),
                                  ae.inverse_transform(ae.transform(digits)))


def test_bad_input(digits):
    with pytest.raises(ValueError, match="code_layer=3, but there are 3 hidden layers"):
        MLPAutoencoder(code_layer=3).fit(digits)
    ae = MLPAutoencoder((16, 4, 16), max_iter=2, random_state=0).fit(digits)
    with pytest.raises(ValueError, match="the code layer has 4 units"):
        ae.inverse_transform(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="features"):
        ae.transform(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        MLPAutoencoder().fit(np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match="code_layer"):
        MLPAutoencoder(code_layer=-1).fit(digits)
    # y is accepted and ignored, as for any transformer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = MLPAutoencoder((8, 2, 8), max_iter=2, random_state=0).fit(digits, np.ones(len(digits)))
        b = MLPAutoencoder((8, 2, 8), max_iter=2, random_state=0).fit(digits)
    np.testing.assert_array_equal(a._theta, b._theta)


def test_dask_input_is_refused(digits):
    da = pytest.importorskip("dask.array")
    with pytest.raises(ValueError, match="trains in one process"):
        MLPAutoencoder(solver="lbfgs").fit(da.from_array(digits, chunks=(500, -1)))


# ---------------------------------------------------------------------------------------
# Sparse targets: the kernels read an autoencoder's sparse X as its targets row by row.

def _sparse_problem(dtype, fmt="csr", output="identity"):
    rng = np.random.default_rng(3)
    X = sp.random(150, 12, density=0.25, random_state=3, format=fmt, dtype=np.float64)
    X.data = rng.normal(size=X.nnz)  # signed, so no stored value is confused with zero
    net = fastbp.Network([12, 7, 5, 12], activation=["gelu", "tanh"], output=output,
                         dtype=dtype, block_size=32)
    return net, net.init_params(random_state=1), X.astype(dtype), rng.random(150)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_sparse_targets_give_bitwise_the_dense_targets_results(dtype, fmt):
    net, theta, X, w = _sparse_problem(dtype, fmt)
    D = X.toarray()
    v = np.random.default_rng(4).normal(size=net.n_params).astype(dtype)
    for args in ((), (w,)):
        ld, gd = net.loss_grad(theta, X, D, *args, alpha=1e-3)
        ls, gs = net.loss_grad(theta, X, X, *args, alpha=1e-3)
        assert ld == ls and np.array_equal(gd, gs)
        np.testing.assert_array_equal(net.gnvp(theta, v, X, D, *args),
                                      net.gnvp(theta, v, X, X, *args))
        np.testing.assert_array_equal(net.hessp(theta, v, X, D, *args),
                                      net.hessp(theta, v, X, X, *args))
        for a, b in zip(net.deltas(theta, X, D, *args), net.deltas(theta, X, X, *args)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(net.input_gradient(theta, X, D, *args),
                                      net.input_gradient(theta, X, X, *args))
    fd = np.empty(net.n_params, dtype=dtype)
    fs = np.empty(net.n_params, dtype=dtype)
    net._fisher(theta, net.prepare(X, D), fd)
    net._fisher(theta, net.prepare(X, X), fs)
    np.testing.assert_array_equal(fd, fs)
    # And the loss is the reconstruction error it should be: 0.5 * mean ||yhat - x||^2.
    rec = net.forward(theta, X).astype(np.float64)
    expected = 0.5 * ((rec - D) ** 2).sum(axis=1).mean()
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(net.loss_grad(theta, X, X)[0], expected, rtol=rtol)


def test_sparse_targets_with_duplicates_and_bad_shapes():
    net, theta, X, _ = _sparse_problem(np.float64)
    X = X.tocsr()
    # Every stored value split in two halves, stored twice in its row: duplicates sum,
    # as they do for toarray().
    dup = sp.csr_matrix((np.repeat(X.data / 2, 2), np.repeat(X.indices, 2),
                         X.indptr * 2), shape=X.shape)
    assert not dup.has_canonical_format
    np.testing.assert_allclose(net.loss_grad(theta, X, dup)[1],
                               net.loss_grad(theta, X, X.toarray())[1], rtol=1e-13,
                               atol=1e-15)
    assert not dup.has_canonical_format  # the caller's matrix is left alone
    with pytest.raises(ValueError, match="Y must have shape"):
        net.loss_grad(theta, X, X[:, :5])
    with pytest.raises(ValueError, match="Y must have shape"):
        net.loss_grad(theta, X, X[:10])
    bad = X.tocsr(copy=True)
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        net.loss_grad(theta, X, bad)
    with pytest.raises(TypeError, match="must hold numbers"):
        net.loss_grad(theta, X, X.astype(np.complex128))


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs", "hessian-free", "newton-cg"])
def test_fit_never_densifies_a_sparse_x(digits, solver, monkeypatch):
    X = sp.csr_matrix(digits[:300] * (digits[:300] > 0.3))
    reference = MLPAutoencoder((16, 4, 16), solver=solver, max_iter=5, random_state=0,
                               batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The same kernels with the targets densified first: the model fit must match.
        dense_targets = fastbp.Network.prepare

        def prepare(self, X_, Y=None, sample_weight=None, **kwargs):
            return dense_targets(self, X_, Y.toarray() if sp.issparse(Y) else Y,
                                 sample_weight, **kwargs)

        monkeypatch.setattr(fastbp.Network, "prepare", prepare)
        expected = reference.fit(X)._theta.copy()
        monkeypatch.undo()

        def refuse(self, *args, **kwargs):
            raise AssertionError("fit densified the sparse X")

        for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):
            monkeypatch.setattr(cls, "toarray", refuse)
            monkeypatch.setattr(cls, "todense", refuse)
        ae = MLPAutoencoder((16, 4, 16), solver=solver, max_iter=5, random_state=0,
                            batch_size=64).fit(X)
    np.testing.assert_array_equal(ae._theta, expected)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("output", ["softmax", "logistic", "exp"])
def test_every_output_reads_sparse_targets_as_dense_ones(dtype, output):
    # The softmax output takes dense targets 8 rows at a time and sparse ones (which
    # share one scattered row) one at a time: each row's sums run in the same order
    # either way, so the two agree bit for bit (150 rows in blocks of 32: groups of 8
    # and a last one of 6). Signed targets are fine for the kernels' losses.
    net, theta, X, w = _sparse_problem(dtype, output=output)
    if output == "exp":
        X = abs(X)   # Poisson targets are non-negative
    D = X.toarray()
    for args in ((), (w,)):
        ld, gd = net.loss_grad(theta, X, D, *args, alpha=1e-3)
        ls, gs = net.loss_grad(theta, X, X, *args, alpha=1e-3)
        assert np.isfinite(ld) and ld == ls and np.array_equal(gd, gs)


def test_the_kernels_refuse_corrupt_sparse_targets():
    """Direct callers of the compiled entry points get errors, not out-of-bounds writes."""
    net, theta, X, _ = _sparse_problem(np.float64)
    grad = np.empty(net.n_params)
    for field, index, value, match in [("y_indices", 0, 12, "outside"),
                                       ("y_indices", -1, -1, "outside"),
                                       ("y_indptr", 5, 10**6, "non-decreasing|match"),
                                       ("y_indptr", -1, 3, "do not match")]:
        d = net.prepare(X, X)
        arr = getattr(d, field).copy()
        arr[index] = value
        setattr(d, field, arr)
        with pytest.raises(ValueError, match=match):
            net._loss_grad(theta, d, 0.0, grad)
    d = net.prepare(X, X)
    d.y_indptr = d.y_indptr[:0]
    with pytest.raises(ValueError, match="give Y"):
        net._loss_grad(theta, d, 0.0, grad)
