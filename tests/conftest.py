"""Session set-up: SciPy runs in its default mode, the one users run.

SciPy fixes its array-API mode from ``SCIPY_ARRAY_API`` when it is first imported. The
variable is taken out of the environment here, before any test module imports SciPy, so
that neither the launcher's environment nor the subprocesses the tests start (they inherit
``os.environ``) switch that mode on. scikit-learn's array-API estimator check needs the
mode: test_sklearn_checks.py runs it in a subprocess of its own that sets the variable.
"""
import os
import sys

import pytest

os.environ.pop("SCIPY_ARRAY_API", None)

# A plugin may have imported SciPy before this file ran: its mode is then fixed.
_scipy_array_api = sys.modules.get("scipy._lib._array_api")
if _scipy_array_api is not None and getattr(_scipy_array_api, "SCIPY_ARRAY_API", False):
    raise pytest.UsageError(
        "SciPy was imported in array-API mode (SCIPY_ARRAY_API=1) before the tests' "
        "conftest.py ran; run the suite without SCIPY_ARRAY_API set.")


def pytest_report_header(config):
    """Which fastbp is under test (the installed package, not the checkout's sources)
    and which kernel variant, BLAS and thread counts it runs with."""
    import fastbp
    cfg = fastbp.show_config(mode="dicts")
    k, t = cfg["kernels"], cfg["threads"]
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']})"
                     for b in cfg["blas"])
    return [f"fastbp {fastbp.__version__} from {os.path.dirname(fastbp.__file__)}",
            f"kernels {k['variant']} (built: {', '.join(k['built'])}; CPU: "
            f"{', '.join(k['cpu_features']) or 'no AVX'}); BLAS {blas}; "
            f"n_jobs=None -> {t['n_jobs_default']} threads"]
