"""fastbp: a Cython backpropagation core for multilayer perceptrons.

Public names: :class:`Network` (the low-level core), :class:`MLPClassifier` and
:class:`MLPRegressor` (scikit-learn estimators) and :class:`DivergenceError`.
"""
from ._estimators import MLPClassifier, MLPRegressor
from ._network import Network
from ._solvers import DivergenceError

__all__ = ["Network", "MLPClassifier", "MLPRegressor", "DivergenceError"]
__version__ = "0.1.0"
