"""Inspection of fitted models: how each input feature moves a prediction.

``input_gradients`` returns, for every sample, the gradient of the model's output (or of
its loss) with respect to that sample's features: the basis of saliency maps. It runs on
the compiled kernels (``Network.input_gradient``): one backward pass, in the same blocks
and threads as the training gradient, for dense and sparse X.
"""
import numpy as np
from sklearn.base import is_classifier
from sklearn.utils.validation import check_is_fitted, validate_data

from ._autoencoder import MLPAutoencoder
from ._estimators import MLPClassifier, MLPRegressor
from ._validation import encode_targets

__all__ = ["input_gradients"]


def input_gradients(model, X, y=None):
    """Per-sample gradients of a fitted model with respect to its inputs.

    Parameters
    ----------
    model : MLPClassifier, MLPRegressor or MLPAutoencoder
        A fitted fastbp estimator.
    X : {array-like, sparse matrix} of shape (n_samples, n_features)
        The samples.
    y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
        Targets. Without them, the gradient of what the model predicts:

        - classifier: ``d log p(predicted class | x) / dx`` (for multilabel targets, the
          sum over labels of the log-probability of each predicted 0/1 label);
        - regressor: ``d sum_k yhat_k(x) / dx`` (the prediction itself for one output);
        - autoencoder: the gradient of the reconstruction loss ``0.5 ||f(x) - x||^2``
          with respect to the network's input (X held fixed as the target).

        With y, the gradient of each sample's loss (log-loss, squared error or Poisson
        deviance) at its target: ``d loss(x, y) / dx``, pointing uphill in the loss.

    Returns
    -------
    gradients : ndarray of shape (n_samples, n_features)
        One row per sample, dense (also for sparse X), in the model's dtype.

    Raises
    ------
    TypeError
        When ``model`` is not a fastbp estimator.
    ValueError
        When it is not fitted, or X or y do not fit it.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_digits
    >>> from fastbp import MLPClassifier
    >>> from fastbp.inspection import input_gradients
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = MLPClassifier((32,), max_iter=50, random_state=0).fit(X / 16, y)
    >>> saliency = input_gradients(clf, X[:5] / 16)
    >>> saliency.shape
    (5, 64)
    """
    if not isinstance(model, (MLPClassifier, MLPRegressor, MLPAutoencoder)):
        raise TypeError("input_gradients takes a fitted fastbp MLPClassifier, "
                        f"MLPRegressor or MLPAutoencoder, got {type(model).__name__}")
    check_is_fitted(model)
    net, theta = model._net, model._theta
    if isinstance(model, MLPAutoencoder):
        X = validate_data(model, X, accept_sparse=["csr", "csc"], reset=False,
                          dtype=net.dtype)
        return net.input_gradient(theta, X, X)
    if y is not None:  # the loss's gradient at the given targets, encoded as fit does
        X, y = validate_data(model, X, y, accept_sparse=["csr", "csc"], reset=False,
                             multi_output=True, dtype=net.dtype,
                             y_numeric=not is_classifier(model))
        return net.input_gradient(theta, X, encode_targets(model, y, net.dtype))
    X = validate_data(model, X, accept_sparse=["csr", "csc"], reset=False, dtype=net.dtype)
    out = net.forward(theta, X)
    if is_classifier(model):
        # -log p(predicted): the log-loss at the predicted labels; negated below.
        if model.out_activation_ == "softmax":
            Y = np.zeros_like(out)
            Y[np.arange(len(out)), out.argmax(axis=1)] = 1
        else:  # logistic columns: binary (one column) or multilabel
            Y = (out > 0.5).astype(out.dtype)
        return -net.input_gradient(theta, X, Y)
    if model.out_activation_ == "exp":
        # dloss/dz = yhat - y: with y = 0 it is yhat, so dloss/dx = d yhat/dx.
        return net.input_gradient(theta, X, np.zeros_like(out))
    # Squared error: dloss/dz = yhat - y = 1 at y = yhat - 1, so dloss/dx = d yhat/dx.
    return net.input_gradient(theta, X, out - 1)

