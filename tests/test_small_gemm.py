"""The kernels' GEMM entry point: small products skip BLAS (``_small_gemm.h``).

Every layout the kernels use (A B, A^T B, A B^T), with and without accumulation, on
shapes that take the small path (including every column tail) and shapes that do not,
against a float64 reference. The tolerance is the classical bound of a dot product of
length k computed in any order: |error| <= gamma_k * sum_p |a_ip| |b_pj| with
gamma_k = k u / (1 - k u), u the unit roundoff, plus one rounding of the final sum and of
the accumulation.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from fastbp import _core, _threads


@pytest.fixture(autouse=True)
def own_loops():
    """These tests are about fastbp's own loops, which some BLAS libraries make the
    process skip (see ``_threads.small_products``): take them whatever this machine's
    BLAS, and restore the process's choice afterwards."""
    before = _core.small_products_in_own_loops()
    _core.set_small_products(True)
    yield
    _core.set_small_products(before)


def _operands(rng, trans_a, trans_b, m, n, k, dtype):
    A = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    B = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    return A, B


def _check(trans_a, trans_b, m, n, k, dtype, beta, rng):
    A, B = _operands(rng, trans_a, trans_b, m, n, k, dtype)
    C0 = rng.standard_normal((m, n)).astype(dtype)
    # With beta = 0 whatever C held is ignored: NaN there must not reach the result.
    C = np.full((m, n), np.nan, dtype) if beta == 0 else C0.copy()
    small = _core.gemm_rowmajor(trans_a, trans_b, A, B, C, beta)
    a = (A.T if trans_a else A).astype(np.float64)
    b = (B.T if trans_b else B).astype(np.float64)
    exact = a @ b + beta * C0.astype(np.float64)
    u = np.finfo(dtype).eps / 2
    gamma = (k + 2) * u / (1 - (k + 2) * u)
    bound = gamma * (np.abs(a) @ np.abs(b) + abs(beta) * np.abs(C0.astype(np.float64)))
    err = np.abs(C.astype(np.float64) - exact)
    assert (err <= bound).all(), (err / np.maximum(bound, 1e-300)).max()
    return small


LAYOUTS = [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", LAYOUTS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_small_products_are_exact_to_rounding(dtype, trans_a, trans_b, beta):
    rng = np.random.default_rng(0)
    # Column counts cover every tail block (16, 8, 4, 2, 1 after the widest blocks).
    for n in (16, 17, 19, 23, 31, 32, 33, 47, 63, 64, 65, 100, 128):
        for m in (1, 3, 4, 5, 16, 32):
            k = 16
            assert _check(trans_a, trans_b, m, n, k, dtype, beta, rng), (m, n, k)
    # Narrow C (an output layer) with enough rows: computed transposed.
    for n in (1, 2, 3, 10, 15):
        for m in (16, 17, 33, 60):
            for k in (1, 10, 64):
                assert _check(trans_a, trans_b, m, n, k, dtype, beta, rng), (m, n, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", LAYOUTS)
def test_other_products_go_to_blas_and_are_exact_to_rounding(dtype, trans_a, trans_b):
    rng = np.random.default_rng(1)
    # Narrow and short (n, m < 16), too many multiply-adds, B beyond 32 KiB, beta not 0
    # or 1.
    assert not _check(trans_a, trans_b, 8, 10, 64, dtype, 0.0, rng)
    assert not _check(trans_a, trans_b, 128, 128, 64, dtype, 0.0, rng)
    assert not _check(trans_a, trans_b, 2, 512, 64, dtype, 1.0, rng)
    assert not _check(trans_a, trans_b, 8, 32, 16, dtype, 0.5, rng)


def test_small_path_ignores_what_c_held_when_beta_is_zero():
    rng = np.random.default_rng(2)
    A, B = _operands(rng, False, False, 4, 32, 8, np.float64)
    C = np.full((4, 32), np.nan)
    assert _core.gemm_rowmajor(False, False, A, B, C, 0.0)
    np.testing.assert_allclose(C, A @ B, rtol=1e-13)


def test_small_path_sums_in_a_fixed_order_whatever_the_blocking():
    # Row i of C does not depend on the other rows computed with it: the same row computed
    # alone (m = 1, the tail path) and inside blocks of four gives the same bits.
    rng = np.random.default_rng(3)
    A, B = _operands(rng, False, False, 7, 45, 33, np.float32)
    C = np.empty((7, 45), np.float32)
    assert _core.gemm_rowmajor(False, False, A, B, C, 0.0)
    for i in range(7):
        row = np.empty((1, 45), np.float32)
        _core.gemm_rowmajor(False, False, np.ascontiguousarray(A[i:i + 1]), B, row, 0.0)
        np.testing.assert_array_equal(row[0], C[i])


@pytest.mark.parametrize("trans_a,trans_b", LAYOUTS)
def test_narrow_products_equal_the_same_columns_of_a_wide_one(trans_a, trans_b):
    # Every element is summed in the same order on both paths: the first 10 columns of a
    # product computed along its columns equal the 10-column product computed transposed.
    rng = np.random.default_rng(4)
    A, B = _operands(rng, trans_a, trans_b, 24, 40, 20, np.float32)
    wide = np.empty((24, 40), np.float32)
    assert _core.gemm_rowmajor(trans_a, trans_b, A, B, wide, 0.0)
    Bn = np.ascontiguousarray(B[:10] if trans_b else B[:, :10])
    narrow = np.empty((24, 10), np.float32)
    assert _core.gemm_rowmajor(trans_a, trans_b, A, Bn, narrow, 0.0)
    np.testing.assert_array_equal(narrow, wide[:, :10])


def test_shape_mismatch_is_refused():
    A = np.ones((3, 4))
    with pytest.raises(ValueError, match="shapes"):
        _core.gemm_rowmajor(False, False, A, np.ones((5, 6)), np.empty((3, 6)), 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", LAYOUTS)
def test_with_own_loops_off_every_product_goes_to_blas(dtype, trans_a, trans_b):
    rng = np.random.default_rng(5)
    _core.set_small_products(False)
    assert not _core.small_products_in_own_loops()
    for m, n, k in ((4, 32, 16), (32, 128, 64), (60, 10, 64)):
        for beta in (0.0, 1.0):
            assert not _check(trans_a, trans_b, m, n, k, dtype, beta, rng), (m, n, k)
    _core.set_small_products(True)
    assert _check(trans_a, trans_b, 4, 32, 16, dtype, 0.0, rng)


def _lib(arch, path="/env/lib/python3/site-packages/scipy.libs/libscipy_openblas-1.so",
         api="openblas", version="0.3.30"):
    return {"user_api": "blas", "internal_api": api, "architecture": arch,
            "filepath": path, "version": version}


NUMPYS = "/env/lib/python3/site-packages/numpy.libs/libscipy_openblas64_-2.so"
MACOS = "/env/lib/python3/site-packages/scipy/.dylibs/libscipy_openblas.dylib"


@pytest.mark.parametrize("libraries,path", [
    ([_lib("SkylakeX")], "blas"),
    ([_lib("Cooperlake")], "blas"),
    ([_lib("SapphireRapids")], "blas"),
    ([_lib("Haswell")], "own"),
    ([_lib("Zen")], "own"),
    ([_lib(None, api="mkl")], "own"),
    ([], "own"),
    # The BLAS SciPy ships decides, not NumPy's.
    ([_lib("SkylakeX", NUMPYS), _lib("Haswell")], "own"),
    ([_lib("Haswell", NUMPYS), _lib("SkylakeX")], "blas"),
    # No BLAS in SciPy's directories (a system or conda SciPy): all of them must qualify.
    ([_lib("SkylakeX", "/usr/lib/libopenblas.so.0")], "blas"),
    ([_lib("SkylakeX", "/usr/lib/libopenblas.so.0"), _lib(None, "/usr/lib/libmkl_rt.so",
                                                           "mkl")], "own"),
    # ... and NumPy's wheel's BLAS is never SciPy's.
    ([_lib("SkylakeX", NUMPYS)], "own"),
    ([_lib("SkylakeX", NUMPYS), _lib(None, "/usr/lib/libblas.so.3", None)], "own"),
    # SciPy's wheel on macOS; a project directory whose name starts with "scipy" is not
    # SciPy's library directory.
    ([_lib("SkylakeX", MACOS), _lib("Haswell", NUMPYS)], "blas"),
    ([_lib("Haswell", "/home/u/scipy-dev/lib/libopenblas.so"), _lib("SkylakeX", NUMPYS)],
     "own"),
    # Releases before the small-matrix kernels, and a version that does not parse.
    ([_lib("SkylakeX", version="0.3.15")], "own"),
    ([_lib("SkylakeX", version="0.3.17")], "blas"),
    ([_lib("SkylakeX", version=None)], "own"),
])
def test_small_products_go_to_blas_only_with_openblas_small_matrix_kernels(libraries, path):
    assert _threads.small_products(libraries, environ={})[0] == path


def test_small_products_can_be_forced_and_a_bad_value_is_refused():
    assert _threads.small_products([_lib("SkylakeX")], {"FASTBP_SMALL_PRODUCTS": "own"}) \
        == ("own", "FASTBP_SMALL_PRODUCTS")
    assert _threads.small_products([], {"FASTBP_SMALL_PRODUCTS": " BLAS "})[0] == "blas"
    with pytest.raises(RuntimeError, match="FASTBP_SMALL_PRODUCTS='fast'"):
        _threads.small_products([], {"FASTBP_SMALL_PRODUCTS": "fast"})


def _child(code, cwd, **env):
    """Run ``code`` in a child that imports the very fastbp this test imported (from
    outside the checkout, whose sources would shadow an installed package)."""
    import fastbp
    root = str(os.path.dirname(os.path.dirname(os.path.abspath(fastbp.__file__))))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=root, **env), timeout=120,
                          cwd=cwd)


def test_the_choice_is_made_at_import_and_shown(tmp_path):
    code = ("import fastbp; from fastbp import _core, _threads; "
            "cfg = fastbp.show_config(mode='dicts')['kernels']; "
            "print(_threads.SMALL_PRODUCTS[0], _core.small_products_in_own_loops(), "
            "cfg['small_products'])")
    here = _child(code, tmp_path)
    assert here.returncode == 0, here.stderr
    path, own, shown = here.stdout.split()
    assert (path == "own") == (own == "True") and shown == path
    assert path == _threads.small_products()[0]
    for forced, own in (("own", "True"), ("blas", "False")):
        res = _child(code, tmp_path, FASTBP_SMALL_PRODUCTS=forced)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == [forced, own, forced]
    bad = _child("import fastbp", tmp_path, FASTBP_SMALL_PRODUCTS="fast")
    assert bad.returncode != 0 and "FASTBP_SMALL_PRODUCTS='fast'" in bad.stderr


# Products that BLAS gets whole or cut for its small-matrix kernels (own loops off): the
# layouts of block_pass on 2048-row blocks, an F-ordered input block (A^T), a weight
# gradient over a block (k = rows), a delta through a 10-wide output layer (D W^T: in
# BLAS's terms a transposed first operand with k = 10, which those kernels refuse, so W^T
# is copied first), the same for a 32-row minibatch (small already, one piece), a depth
# cut of a transposed B, and layers too wide to cut or to copy.
CUTS = [
    (False, False, 2048, 64, 64, "rows"),
    (False, False, 2048, 10, 64, "rows"),
    (True, False, 2048, 64, 64, "rows"),
    (True, False, 64, 64, 2048, "depth"),
    (True, False, 64, 10, 2047, "depth"),
    (False, True, 2048, 64, 10, "rows, B transposed"),
    (False, True, 2000, 64, 64, "rows, B transposed"),
    (False, True, 32, 128, 10, "rows, B transposed"),
    (False, True, 64, 10, 2048, "depth"),
    (False, True, 128, 256, 128, None),
    (False, False, 300, 784, 256, None),
]


@pytest.mark.parametrize("trans_a,trans_b,m,n,k,kind", CUTS)
def test_blas_products_are_cut_only_into_pieces_its_small_kernels_take(
        trans_a, trans_b, m, n, k, kind):
    # With fastbp's own loops on, nothing is cut: BLAS then has no small kernels.
    assert _core.gemm_cut(trans_a, trans_b, m, n, k) == (None, 0)
    _core.set_small_products(False)
    got, piece = _core.gemm_cut(trans_a, trans_b, m, n, k)
    assert got == kind
    if kind is None:
        assert piece == 0
        return
    cut = k if kind == "depth" else m
    others = m * n if kind == "depth" else n * k
    # The fewest pieces within M N K <= 100^3, of equal length (the last one shorter by
    # less than one per piece), none under 64 unless the product is whole.
    pieces = -(-cut // (100**3 // others))
    if pieces == 1:
        assert kind == "rows, B transposed" and piece == m
        return
    assert piece == -(-cut // pieces)
    assert 64 <= piece and piece * others <= 100**3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_cut_products_are_exact_to_rounding(dtype, beta):
    # The pieces after the first add to C (beta = 1): the bound of a k-term dot product
    # in any order still holds, for the rows and for the depth cut. With beta = 0 C starts
    # as NaN, which every piece of a rows cut and the first of a depth cut must ignore.
    rng = np.random.default_rng(6)
    _core.set_small_products(False)
    for trans_a, trans_b, m, n, k, kind in CUTS:
        assert not _check(trans_a, trans_b, m, n, k, dtype, beta, rng), (m, n, k)


def test_cut_sizes_are_checked():
    with pytest.raises(ValueError, match="positive"):
        _core.gemm_cut(False, False, 0, 4, 4)


def test_no_cut_makes_pieces_under_64_whatever_the_shape():
    # The fewest equal pieces can come out shorter than the longest allowed one (65 rows
    # where 64 fit: two pieces of 33): then the product is not cut.
    _core.set_small_products(False)
    rng = np.random.default_rng(8)
    shapes = [(65, 125, 125), (100, 100, 101), (129, 88, 88)]
    shapes += [tuple(int(v) for v in rng.integers(1, 3000, 3)) for _ in range(3000)]
    for trans_a, trans_b in LAYOUTS:
        for m, n, k in shapes:
            kind, piece = _core.gemm_cut(trans_a, trans_b, m, n, k)
            if kind is None:
                assert piece == 0
            elif piece != m or kind != "rows, B transposed":  # not the one-piece copy
                cut = k if kind == "depth" else m
                others = m * n if kind == "depth" else n * k
                assert 64 <= piece and piece * others <= 100**3, (m, n, k, kind, piece)
                assert piece < cut, (m, n, k, kind, piece)
