"""scikit-learn's estimator checks, on both estimators, with nothing skipped or xfailed.

The instances are configured the way scikit-learn configures its own MLPs for these
checks: a short run (``max_iter=100``), and the deterministic full-batch solver, so that
the sample-weight equivalence checks (weights of 2 == repeated rows) hold exactly, as
they do for scikit-learn's own MLPs. Every other check runs as scikit-learn defines it.
"""
import warnings

from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from fastbp import MLPClassifier, MLPRegressor

ESTIMATORS = [
    MLPClassifier(solver="lbfgs", max_iter=100, random_state=0),
    MLPRegressor(solver="lbfgs", max_iter=100, random_state=0),
    MLPClassifier(max_iter=100, random_state=0),
    MLPRegressor(max_iter=100, random_state=0),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)
