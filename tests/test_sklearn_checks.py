"""scikit-learn's estimator checks, on both estimators, with nothing skipped or xfailed.

The instances are configured the way scikit-learn configures its own MLPs for these
checks: a short run (``max_iter=100``), and the deterministic full-batch solver, so that
the sample-weight equivalence checks (integer weights == repeated rows) hold, as they do
for scikit-learn's own MLPs. Every other check runs as scikit-learn defines it.

Those checks compare two fits whose gradients differ by rounding only (the rows are summed
in another order), to ``rtol=1e-7, atol=1e-9``. A classifier or regressor converges in
12-32 L-BFGS iterations, and its fits agree to about 1e-14. The L-BFGS autoencoder does
not converge: its code is identified only up to an invertible map of the code layer, so
two paths that start a rounding error apart drift apart along solutions of equal loss.
Measured on the check's data (2026-12-02, an AVX-512 Xeon, OpenBLAS's SkylakeX kernels),
the drift in units of the tolerance was 5e-7 after 10 iterations, 1e-5 after 30, 1e-4
after 50, 0.1 after 80, 1.5 after 100 (a failure) and 1e7 after 200: about tenfold every
ten iterations. The growth is the problem's; only its start is the CPU's. With OpenBLAS's
Haswell kernels, which earlier machines ran, the drift was 5e-6 after 30 iterations and
0.19 after 100: the check passed there by luck. The autoencoder's L-BFGS instance
therefore stops at 30 iterations, 1e5 below the tolerance, with its loss at 0.39 (1.14
after 5 iterations); a fit that ignored the weights misses by 1e9.

The suite runs SciPy in its default mode (see conftest.py). scikit-learn's array-API
checks (for estimators that do not declare array-API support, as ours: with
``array_api_dispatch`` on, NumPy input must still fit and predict) need SciPy's array-API
mode, which SciPy fixes at import from ``SCIPY_ARRAY_API``; in default mode scikit-learn
skips them. So they run, for every estimator, in one subprocess started with
``SCIPY_ARRAY_API=1``, and each one's test item asserts that it passed there. A check
that scikit-learn skips (``SkipTest``) fails its item: nothing is skipped silently.
"""
import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import SkipTest

import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import estimator_checks_generator, parametrize_with_checks

from fastbp import MLPAutoencoder, MLPClassifier, MLPRegressor

ESTIMATORS = [
    MLPClassifier(solver="lbfgs", max_iter=100, random_state=0),
    MLPRegressor(solver="lbfgs", max_iter=100, random_state=0),
    MLPClassifier(max_iter=100, random_state=0),
    MLPRegressor(max_iter=100, random_state=0),
    # Features scikit-learn's MLP lacks, each checked as scikit-learn checks its own.
    MLPClassifier(solver="lbfgs", max_iter=100, random_state=0, class_weight="balanced"),
    MLPClassifier(max_iter=100, random_state=0, learning_rate="cosine"),
    MLPClassifier(solver="lbfgs", max_iter=100, random_state=0, activation="gelu"),
    MLPRegressor(solver="lbfgs", max_iter=100, random_state=0, hidden_layer_sizes=(8, 6),
                 activation=["silu", "elu"]),
    MLPClassifier(max_iter=100, random_state=0, dropout=0.1),
    MLPAutoencoder(solver="lbfgs", max_iter=30, random_state=0),
    MLPAutoencoder(max_iter=100, random_state=0),
]


def _check_name(check):
    """'check_x(key=value, ...)': the check function and its keyword arguments."""
    keywords = {}
    while isinstance(check, functools.partial):
        keywords = {**check.keywords, **keywords}
        check = check.func
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(keywords.items()))
    return f"{check.__name__}({args})"


def _key(estimator, check):
    """Names one (estimator, check) pair the same way in this process and the child."""
    return f"{estimator!r} {_check_name(check)}"


def _needs_scipy_array_api(check):
    return _check_name(check).startswith("check_array_api")


def _run(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


ARRAY_API_SCRIPT = """
import importlib.util, json, sys, traceback
from unittest import SkipTest
from sklearn.utils.estimator_checks import estimator_checks_generator
spec = importlib.util.spec_from_file_location("checks", sys.argv[1])
checks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checks)
outcomes = {}
for estimator in checks.ESTIMATORS:
    for est, check in estimator_checks_generator(estimator, legacy=True, mark=None):
        if not checks._needs_scipy_array_api(check):
            continue
        try:
            checks._run(est, check)
        except SkipTest as exc:
            outcome = f"skipped: {exc}"
        except Exception:
            outcome = "failed:\\n" + traceback.format_exc()
        else:
            outcome = "passed"
        outcomes[checks._key(est, check)] = outcome
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def array_api_outcomes(tmp_path_factory):
    """Outcome of every array-API check, run in a child with SCIPY_ARRAY_API=1."""
    script = tmp_path_factory.mktemp("array_api") / "run_checks.py"
    script.write_text(ARRAY_API_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(Path(__file__).resolve())],
                         env=dict(os.environ, SCIPY_ARRAY_API="1"), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def _sklearn_before_1_8():
    import sklearn
    return tuple(int(x) for x in sklearn.__version__.split(".")[:2]) < (1, 8)


def test_array_api_checks_exist_and_scipy_runs_in_default_mode_here():
    # The split above only means something if scikit-learn yields array-API checks for
    # our estimators, and if this process really is in SciPy's default mode.
    keys = [_key(e, c) for est in ESTIMATORS
            for e, c in estimator_checks_generator(est, legacy=True, mark=None)
            if _needs_scipy_array_api(c)]
    # scikit-learn 1.8 and later yield one per estimator; 1.7 (the last for Python 3.10)
    # yields none for estimators that do not declare array-API support, and then there is
    # nothing to split off.
    assert len(set(keys)) == len(keys)
    assert len(keys) >= len(ESTIMATORS) or (not keys and _sklearn_before_1_8())
    assert "SCIPY_ARRAY_API" not in os.environ
    import scipy._lib._array_api as scipy_array_api  # where SciPy keeps its mode
    assert not scipy_array_api.SCIPY_ARRAY_API


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check, request):
    if _needs_scipy_array_api(check):
        outcomes = request.getfixturevalue("array_api_outcomes")
        key = _key(estimator, check)
        assert key in outcomes, f"the SCIPY_ARRAY_API=1 run did not run {key}"
        assert outcomes[key] == "passed", outcomes[key]
        return
    try:
        _run(estimator, check)
    except SkipTest as exc:
        pytest.fail(f"scikit-learn skipped this check: {exc}")
