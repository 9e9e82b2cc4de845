"""fastbp: a Cython backpropagation core for multilayer perceptrons.

Public names: :class:`Network` (the low-level core), :class:`MLPClassifier` and
:class:`MLPRegressor` (scikit-learn estimators), :class:`MLPAutoencoder` (a
transformer), :class:`DivergenceError`,
:func:`save`/:func:`load` for pickle-free model files, :func:`show_config`, and
:func:`check_gradients` (with its :class:`GradientReport`) for kernel work, and
:func:`to_onnx` (with the ``onnx`` extra).
"""
from ._autoencoder import MLPAutoencoder
from ._estimators import MLPClassifier, MLPRegressor
from ._config import show_config
from ._io import load, save
from ._network import Network
from ._divergence import DivergenceError
from ._gradcheck import GradientReport, check_gradients
from ._onnx import to_onnx
from . import inspection
from ._version import __version__

__all__ = ["Network", "MLPClassifier", "MLPRegressor", "MLPAutoencoder", "DivergenceError", "save", "load",
           "show_config", "check_gradients", "GradientReport", "to_onnx"]
