"""Full-batch work is bitwise identical for any number of threads.

Each block's sums are added exactly into fixed-point accumulators, so ``n_jobs`` changes
who computes a block, never the result; and rows split into chunks at block boundaries
(as on a Dask cluster) give bitwise the same sums.
"""
import numpy as np
import pytest
import scipy.sparse as sp

import fastbp
from fastbp import MLPClassifier, MLPRegressor, Network


def _problem(n, sizes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    Y = np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], n)]
    sw = rng.uniform(0.1, 2.0, n)
    return X, Y, sw


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sparse", [False, True])
def test_loss_grad_and_forward_identical_for_any_thread_count(dtype, sparse):
    sizes = [12, 16, 8, 5]
    X, Y, sw = _problem(5000, sizes, dtype)  # 10 blocks of 512 rows
    if sparse:
        X = sp.random(5000, 12, density=0.3, format="csr", random_state=0, dtype=dtype)
    results = []
    for n_jobs in (1, 2, 3, -1):
        net = Network(sizes, activation="tanh", output="softmax", dtype=dtype,
                      block_size=512, n_jobs=n_jobs)
        theta = net.init_params(random_state=1)
        loss, grad = net.loss_grad(theta, X, Y, sample_weight=sw, alpha=0.01)
        results.append((loss, grad, net.forward(theta, X)))
    for loss, grad, out in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])
        np.testing.assert_array_equal(out, results[0][2])


def test_threads_match_the_single_block_reference():
    """Blocks change only rounding: compare with one big block."""
    sizes = [6, 10, 3]
    X, Y, sw = _problem(3000, sizes, np.float64, seed=3)
    one = Network(sizes, "relu", "softmax", block_size=10**6, n_jobs=1)
    many = Network(sizes, "relu", "softmax", block_size=100, n_jobs=2)
    theta = one.init_params(random_state=0)
    l1, g1 = one.loss_grad(theta, X, Y, sw, alpha=0.1)
    l2, g2 = many.loss_grad(theta, X, Y, sw, alpha=0.1)
    assert l2 == pytest.approx(l1, rel=1e-13)
    np.testing.assert_allclose(g2, g1, rtol=1e-11, atol=1e-14)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor])
def test_lbfgs_fit_identical_for_any_thread_count(Est):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, 8))
    y = (X[:, 0] + X[:, 1] ** 2 > 1).astype(int) if Est is MLPClassifier else \
        X[:, 0] - X[:, 1] * X[:, 2]
    fits = [Est(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=30, random_state=0, tol=0.0,
                n_jobs=n_jobs).fit(X, y) for n_jobs in (1, 2)]
    np.testing.assert_array_equal(fits[0]._theta, fits[1]._theta)
    assert fits[0].loss_ == fits[1].loss_
    assert fits[0].loss_curve_ == fits[1].loss_curve_


def test_bad_n_jobs_rejected():
    with pytest.raises(ValueError, match="n_jobs"):
        Network([2, 1], output="identity", n_jobs=0)
    with pytest.raises(ValueError, match="n_jobs"):
        fastbp.MLPRegressor(n_jobs=0).fit([[0.0], [1.0]], [0.0, 1.0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["loss_grad", "gnvp", "hessp", "fisher"])
def test_chunk_sums_merge_to_the_whole(dtype, kind):
    """Chunks cut at block boundaries, summed exactly in any order, give bitwise the
    result of one pass over all rows (what the Dask path relies on)."""
    from fastbp import _core
    sizes = [7, 9, 4]
    X, Y, sw = _problem(2300, sizes, dtype, seed=5)
    net = Network(sizes, activation="tanh", output="softmax", dtype=dtype, block_size=256)
    theta = net.init_params(random_state=2)
    v = np.random.default_rng(9).normal(size=net.n_params).astype(dtype)
    whole = net.prepare(X, Y, sw)
    scale = 1.0 / whole.weight_sum
    p = net.n_params
    size = _core.accumulator_size(p)

    def run(d, acc=None, out=None):
        out = np.empty(p, dtype=dtype) if out is None else out
        if kind == "loss_grad":
            loss = net._loss_grad(theta, d, 0.3, out, scale=scale, acc=acc)
            return loss, out
        if kind == "fisher":
            return 0.0, net._fisher(theta, d, out, scale=scale, acc=acc)
        net._curvature(theta, v, d, 0.3, kind == "hessp", out, scale=scale, acc=acc)
        return 0.0, out
    ref_loss, ref = run(whole)
    total = np.zeros(size, dtype=np.int64)
    cuts = [0, 512, 768, 2048, 2300]  # block boundaries (blocks of 256 rows)
    for a, b in reversed(list(zip(cuts, cuts[1:]))):
        part = np.empty(size, dtype=np.int64)
        run(net.prepare(X[a:b], Y[a:b], sw[a:b]), acc=part)
        _core.merge_accumulators(total, part)
    out = np.empty(p, dtype=dtype)
    dacc = np.empty(net._n_intercepts)
    if kind == "loss_grad":
        loss = _core.finish_loss_grad(total, theta, out, dacc, net._sizes, net._w_off,
                                      net._b_off, scale, 0.3)
        assert loss == ref_loss
    elif kind == "fisher":
        _core.finish_sums(total, out)
    else:
        _core.finish_product(total, v, out, dacc, net._sizes, net._w_off, net._b_off,
                             scale, 0.3)
    np.testing.assert_array_equal(out, ref)


def _grid_words(values):
    """The exact accumulator words for ``values``: each |x| truncated to the 2^-128
    grid, signed, summed as an integer modulo 2^256, split into four int64 words, the
    most significant first (Python's exact integers, independent of the kernels)."""
    from fractions import Fraction
    total = 0
    for x in values:
        units = int(Fraction(abs(float(x))) * 2**128)  # floor: truncation toward zero
        total += -units if x < 0 else units
    total %= 2**256
    words = [(total >> (64 * (3 - k))) & (2**64 - 1) for k in range(4)]
    return np.array(words, dtype=np.uint64).view(np.int64)


@pytest.mark.parametrize("case", ["wide", "tiny", "signs", "edges"])
def test_exact_sum_words_are_the_truncated_grid_values(case):
    # The fixed-point accumulator holds sum(sign(x) floor(|x| 2^128)) mod 2^256, bit for
    # bit, whatever the exponent: values spanning the grid's words, bits below 2^-128,
    # subnormals, signed zeros and magnitudes just below the 2^116 limit.
    from fastbp import _core
    rng = np.random.default_rng({"wide": 1, "tiny": 2, "signs": 3, "edges": 4}[case])
    if case == "wide":
        x = rng.uniform(-3.9, 3.9, 400) * 2.0 ** rng.integers(-140, 115, 400)  # < 2^116
    elif case == "tiny":
        x = rng.normal(size=400) * 2.0 ** rng.integers(-190, -120, 400)
    elif case == "signs":
        x = rng.choice([-1.0, 1.0], 400) * rng.random(400) * 2.0 ** rng.integers(-70, 70, 400)
    else:
        big = np.nextafter(2.0**116, 0)
        x = np.array([0.0, -0.0, 5e-324, -5e-324, 2.0**-128, -(2.0**-128), 2.0**-129,
                      1.5 * 2.0**-128, -(1.5 * 2.0**-128), big, -big, big, 2.0**64,
                      -(2.0**64), 2.0**63 + 2.0**11, 1.0, -1.0, 2.0**-64, 3 * 2.0**-65])
    np.testing.assert_array_equal(_core.sum_words(x), _grid_words(x))
    # Any order, any split into parts merged afterwards: the same words.
    perm = rng.permutation(len(x))
    np.testing.assert_array_equal(_core.sum_words(x[perm]), _grid_words(x))
    total = _core.sum_words(x[perm[: len(x) // 3]])
    _core.merge_accumulators(total, _core.sum_words(x[perm[len(x) // 3:]]))
    np.testing.assert_array_equal(total, _grid_words(x))


def test_exact_sums_are_accurate_and_refuse_non_finite():
    from fastbp import _core
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000) * 10.0 ** rng.integers(-12, 12, 5000)
    import math
    assert _core.words_value(_core.sum_words(x)) == pytest.approx(math.fsum(x),
                                                                  rel=1e-15)
    assert _core.words_value(_core.sum_words(np.array([-2.5, 1.25]))) == -1.25
    with pytest.raises(ValueError, match="finite"):
        _core.sum_words(np.array([1.0, np.inf]))
    # A non-finite block result poisons the whole result (the solvers then report
    # divergence) instead of being dropped.
    net = Network([2, 3, 1], activation="relu", output="identity", block_size=2)
    theta = net.init_params(random_state=0)
    theta[0] = 1e300
    loss, grad = net.loss_grad(theta, np.ones((5, 2)), np.ones((5, 1)))
    assert math.isnan(loss) and np.isnan(grad).all()
