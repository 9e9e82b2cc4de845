"""fastbp: a Cython backpropagation core for multilayer perceptrons."""
from ._network import Network

__all__ = ["Network"]
__version__ = "0.1.0"
