"""fastbp: a Cython backpropagation core for multilayer perceptrons.

Public names: :class:`Network` (the low-level core), :class:`MLPClassifier` and
:class:`MLPRegressor` (scikit-learn estimators), :class:`DivergenceError`, and
:func:`save`/:func:`load` for pickle-free model files.
"""
from ._estimators import MLPClassifier, MLPRegressor
from ._io import load, save
from ._network import Network
from ._solvers import DivergenceError

__all__ = ["Network", "MLPClassifier", "MLPRegressor", "DivergenceError", "save", "load"]
__version__ = "0.1.0"
