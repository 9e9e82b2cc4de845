"""The vectorizable float32 math of fastbp/_vmath.h, against float64 references (and
its double exp, at the end, against a 40-digit decimal reference).

The kernels of float32 layers compute exp, expm1, log1p, tanh, sigmoid, GELU's
normal cdf and pdf, and softplus with its derivative with these functions instead of the
C library's, so that their loops vectorize. They are plain IEEE arithmetic (no FMA, no
tables, no estimate instructions), so their results are the same on every CPU and in
every kernel variant (tests/test_dispatch.py); the bounds below are therefore properties
of the code, not of this machine. Each is the worst error measured by a C harness over a
regular sample of all floats (units in the last place; every 997th float: exp 0.98,
expm1 1.35, log1p 1.44, tanh 2.47; every 61st: normal cdf 7.38, from its
degree-9 polynomial in float arithmetic near z = 0, pdf 2.06, softplus 1.91, its
derivative and sigmoid 2.68), rounded up with a margin for the arguments not sampled.
The float64 references (NumPy, SciPy) are accurate to about 1e-16, which is 1e-9 of a
float32 ulp, so they count as exact here.
"""
import numpy as np
import pytest
from scipy import special

from fastbp import _core

REFERENCE = {"exp": np.exp, "expm1": np.expm1, "log1p": np.log1p, "tanh": np.tanh,
             "normal_cdf": special.ndtr,
             "normal_pdf": lambda x: np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi),
             "softplus": lambda x: np.logaddexp(0.0, x), "softplus_deriv": special.expit,
             "sigmoid": special.expit}
BOUND_ULP = {"exp": 1.5, "expm1": 2.0, "log1p": 2.0, "tanh": 3.0,
             "normal_cdf": 8.0, "normal_pdf": 3.0, "softplus": 2.5, "softplus_deriv": 3.5,
             "sigmoid": 3.5}
FLT_MAX = np.finfo(np.float32).max


def _vmath(name, x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _core.vmath_float32(name, x, out)
    return out


def _ulp_errors(name, x):
    """|f(x) - ref(x)| in units of the last place of ref(x) as a float32, where ref(x)
    rounds to a finite float32; the arguments whose ref(x) overflows float32 are checked
    by the caller."""
    with np.errstate(all="ignore"):
        ref = REFERENCE[name](x.astype(np.float64))
        got = _vmath(name, x).astype(np.float64)
        finite = np.isfinite(ref.astype(np.float32))
        unit = np.spacing(np.abs(ref[finite]).astype(np.float32)).astype(np.float64)
        return np.abs(got[finite] - ref[finite]) / unit, x[finite]


def _all_floats(stride, offset):
    bits = np.arange(offset, 2**32, stride, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    return x[~np.isnan(x)]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_accuracy_over_the_whole_float_range(name):
    x = _all_floats(1009, 7)
    # Include the region where each function does its real work densely.
    dense = np.linspace(-20, 20, 2_000_001, dtype=np.float32)
    x = np.concatenate([x, dense])
    err, at = _ulp_errors(name, x)
    worst = int(np.argmax(err))
    assert err[worst] <= BOUND_ULP[name], (
        f"{name}({at[worst]!r}) is {err[worst]:.2f} ulp off (bound {BOUND_ULP[name]})")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_overflow_and_underflow_thresholds(name):
    # Arguments around the points where the float32 result overflows, becomes subnormal
    # or underflows to zero, and around 0: every one within the bound, or exactly the
    # infinity or zero that the correctly rounded result is.
    edges = {"exp": (88.72284, -87.33654, -103.27893, -103.97208),
             "expm1": (88.72284, -17.32868),
             "log1p": (-1.0, 3.4e38, 1e-30),
             "tanh": (9.01, -9.01, 1e-30),
             "normal_cdf": (-13.5, -14.5, 5.42),
             "normal_pdf": (14.5, -13.6, 13.0),
             "softplus": (88.7, -87.3, -103.9),
             "softplus_deriv": (88.7, -87.3, -103.9),
             "sigmoid": (88.7, -87.3, -103.9, 16.7)}[name]
    x = np.concatenate([np.array([e], np.float32) + np.arange(-300, 301, dtype=np.float32)
                        * np.spacing(np.float32(e)) for e in edges + (0.0,)])
    x = x[np.isfinite(x)]
    with np.errstate(all="ignore"):
        ref = REFERENCE[name](x.astype(np.float64)).astype(np.float32)
    got = _vmath(name, x)
    overflow = np.isinf(ref) | np.isinf(got)
    np.testing.assert_array_equal(got[overflow], ref[overflow])
    err, at = _ulp_errors(name, x)
    assert err.max() <= BOUND_ULP[name], at[np.argmax(err)]


@pytest.mark.parametrize("name, x, expected", [
    ("exp", [0.0, -0.0, np.inf, -np.inf, 89.0, -110.0], [1, 1, np.inf, 0, np.inf, 0]),
    ("expm1", [0.0, -0.0, np.inf, -np.inf, 100.0, -40.0], [0, -0.0, np.inf, -1, np.inf, -1]),
    ("log1p", [0.0, -0.0, np.inf, -1.0, -2.0, 1e-45],
     [0, -0.0, np.inf, -np.inf, np.nan, 1e-45]),
    ("tanh", [0.0, -0.0, np.inf, -np.inf, 20.0, -1e-45], [0, -0.0, 1, -1, 1, -1e-45]),
    ("normal_cdf", [0.0, np.inf, -np.inf, 20.0, -20.0], [0.5, 1, 0, 1, 0]),
    ("normal_pdf", [np.inf, -np.inf, 20.0, -20.0], [0, 0, 0, 0]),
    ("softplus", [np.inf, -np.inf, 1e30, -200.0], [np.inf, 0, 1e30, 0]),
    ("softplus_deriv", [np.inf, -np.inf, 200.0, -200.0], [1, 0, 1, 0]),
    ("sigmoid", [0.0, np.inf, -np.inf, 200.0, -200.0], [0.5, 1, 0, 1, 0]),
])
def test_special_values(name, x, expected):
    got = _vmath(name, np.array(x + [np.nan], np.float32))
    expected = np.array(expected + [np.nan], np.float32)
    np.testing.assert_array_equal(got, expected)
    # Signed zeros keep their sign.
    zero = expected == 0
    np.testing.assert_array_equal(np.signbit(got[zero]), np.signbit(expected[zero]))


def test_the_vector_loop_and_its_scalar_remainder_agree():
    # The same arguments at every offset of a vector: lanes and the loop's scalar tail
    # must return the same bits.
    x = np.random.default_rng(0).normal(scale=6, size=67).astype(np.float32)
    for name in REFERENCE:
        whole = _vmath(name, x)
        for k in range(1, 17):
            np.testing.assert_array_equal(_vmath(name, x[k:]), whole[k:])


def test_bad_arguments_are_refused():
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="must be one of"):
        _core.vmath_float32("sin", x, np.empty_like(x))
    with pytest.raises(ValueError, match="has 2 elements"):
        _core.vmath_float32("exp", x, np.empty(2, np.float32))


# The double exp (fbp_exp), which float64 layers use: the softmax output spends most of its
# time there. The reference is Python's decimal exp at 40 digits, exact for this purpose.
# Bound: the last addition rounds (0.5 ulp); the rounding of r = x - n ln2 moves e^r by
# up to 2^-55 relative, a quarter of an ulp of a result in [1/2, 1), and the rounding of
# r^2 q(r) and the polynomial's truncation (below 4e-18) add a few hundredths; the
# scaling by 2^n is exact, or rounds once more into a subnormal. 1 ulp (faithful
# rounding) covers these; the worst measured on 5.4 million arguments is 0.82 ulp (the
# C library's exp: 0.70 on the same sample).

def _exp64(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    _core.vmath_exp_float64(x, out)
    return out


def test_double_exp_is_faithful_over_the_whole_range():
    import decimal
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.uniform(-745.13, 709.78, 12000), rng.uniform(-1, 1, 6000),
                        rng.uniform(-40, 0, 6000), rng.uniform(-745.13, -708.3, 3000),
                        rng.uniform(709.0, 709.78, 1000), rng.normal(scale=1e-8, size=1000)])
    got = _exp64(x)
    ctx = decimal.Context(prec=40)
    worst = 0.0
    for xi, gi in zip(x.tolist(), got.tolist()):
        ref = ctx.exp(decimal.Decimal(xi))
        unit = decimal.Decimal(float(np.spacing(float(ref))))
        worst = max(worst, float(abs(decimal.Decimal(gi) - ref) / unit))
    assert worst <= 1.0, worst


def test_double_exp_special_values():
    x = [0.0, -0.0, 1e-300, -1e-300, np.inf, -np.inf, np.nan, 709.782712893384,
         709.7827128933841, -745.1332191019411, -745.1332191019412, 1000.0, -1000.0]
    expected = [1, 1, 1, 1, np.inf, 0, np.nan, 1.7976931348622732e308, np.inf, 5e-324, 0,
                np.inf, 0]
    np.testing.assert_array_equal(_exp64(x), expected)
    assert not np.signbit(_exp64([-np.inf, -1000.0])).any()


def test_double_exp_vector_loop_and_scalar_remainder_agree():
    x = np.random.default_rng(12).normal(scale=30, size=67)
    whole = _exp64(x)
    for k in range(1, 9):
        np.testing.assert_array_equal(_exp64(x[k:]), whole[k:])
    with pytest.raises(ValueError, match="has 2 elements"):
        _core.vmath_exp_float64(x[:3].copy(), np.empty(2))
