"""MLPAutoencoder: an unsupervised network that learns to reconstruct its input.

It is an MLP whose targets are its inputs: an identity output and the squared error,
trained by the same drivers and kernels as the other estimators (every solver). The
code is the activation of one hidden layer (``code_layer``, the middle one by default):
``transform`` runs the encoder half of the network and ``inverse_transform`` the decoder
half, each as a network of its own over a slice of the fitted parameters.
"""
from numbers import Integral

import numpy as np
import scipy.sparse as sp
from scipy.special import erf, expit
from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ._estimators import _COMMON_ATTRS_DOC, _BaseMLP
from ._network import Network
from ._validation import hidden_sizes

__all__ = ["MLPAutoencoder"]

# Entries per block when scoring: the reconstruction is dense, so a large or sparse X is
# reconstructed and compared one block of rows at a time.
_SCORE_BLOCK = 1 << 20


def _variance_weighted_r2(num, den):
    """1 - sum(num) / sum(den) over the columns, as r2_score(..., multioutput=
    "variance_weighted") combines them: a constant column counts 1 when reconstructed
    exactly and 0 otherwise, and all-constant data scores 1 or 0 likewise."""
    if not (den != 0).any():
        return 1.0 if not (num != 0).any() else 0.0
    scores = np.ones_like(num)
    valid = den != 0
    scores[valid] = 1 - num[valid] / den[valid]
    return float(np.average(scores, weights=den))


def _activate(name, Z):
    """A hidden activation on an array, in place where possible (NumPy, for transform)."""
    if name == "identity":
        return Z
    if name == "logistic":
        return expit(Z, out=Z)
    if name == "tanh":
        return np.tanh(Z, out=Z)
    if name == "relu":
        return np.maximum(Z, 0, out=Z)
    if name == "leaky_relu":
        return np.where(Z >= 0, Z, Z * Z.dtype.type(0.01))
    if name == "elu":
        return np.where(Z > 0, Z, np.expm1(np.minimum(Z, 0)))
    if name == "gelu":
        return Z * (0.5 * (1 + erf(Z / np.sqrt(Z.dtype.type(2)))))
    if name == "silu":
        return Z * expit(Z)
    if name == "softplus":
        return np.logaddexp(Z.dtype.type(0), Z)
    raise ValueError(f"unknown activation {name!r}")


class MLPAutoencoder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, _BaseMLP):
    __doc__ = """Autoencoder: an MLP trained to reconstruct its input, as a transformer.

    ``fit(X)`` minimises the squared reconstruction error ``0.5 * ||f(x) - x||^2`` (mean
    over samples, plus the L2 term) with any of fastbp's solvers; ``transform`` returns
    the activations of the code layer, ``inverse_transform`` decodes them, and ``score``
    is the reconstruction R^2 over all entries, variance-weighted (as ``r2_score(X,
    X_hat, multioutput="variance_weighted")``: near-constant features would swamp a
    plain average).

    Parameters
    ----------
    hidden_layer_sizes : array-like of shape (n_layers - 2,), default=(32, 8, 32)
        Units of the hidden layers: the encoder, the code, the decoder.
    activation : str, default='relu'
        Activation of the hidden layers (see :class:`MLPRegressor`).
    code_layer : int or None, default=None
        Index (among the hidden layers) of the code layer; None: the middle one,
        ``len(hidden_layer_sizes) // 2``.
    solver, alpha, batch_size, learning_rate, learning_rate_init, power_t, max_iter,
    shuffle, random_state, tol, verbose, warm_start, momentum, nesterovs_momentum,
    early_stopping, validation_fraction, beta_1, beta_2, epsilon, n_iter_no_change,
    max_fun, n_jobs, curvature, dropout
        As for :class:`MLPRegressor`; early stopping scores the reconstruction R^2.

    Attributes
    ----------""" + _COMMON_ATTRS_DOC + """
    Notes
    -----
    Dense and sparse X are accepted, and a sparse X is never densified whole: ``fit``'s
    kernels read its targets (X itself) one sparse row at a time, and ``score`` (and the
    validation scores of early stopping) reconstruct X in blocks of rows, densifying one
    block of a sparse X at a time. Training runs in one process (no ``backend='dask'``).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from fastbp import MLPAutoencoder
    >>> X = load_digits().data / 16
    >>> ae = MLPAutoencoder((32, 8, 32), solver="lbfgs", max_iter=200,
    ...                     random_state=0).fit(X)
    >>> ae.transform(X[:3]).shape
    (3, 8)
    >>> bool(ae.score(X) > 0.5)
    True
    """

    _parameter_constraints: dict = {
        **{k: v for k, v in _BaseMLP._parameter_constraints.items() if k != "backend"},
        "code_layer": [None, Interval(Integral, 0, None, closed="left")],
    }
    _reconstructs = True

    def __init__(self, hidden_layer_sizes=(32, 8, 32), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, max_fun=15000, n_jobs=None,
                 curvature="gauss-newton", code_layer=None, dropout=0.0):
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver,
            alpha=alpha, batch_size=batch_size, learning_rate=learning_rate,
            learning_rate_init=learning_rate_init, power_t=power_t, max_iter=max_iter,
            loss="squared_error", shuffle=shuffle, random_state=random_state, tol=tol,
            verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun,
            n_jobs=n_jobs, curvature=curvature, backend=None, dropout=dropout)
        self.code_layer = code_layer

    def _out_activation(self):
        return "identity"

    def _code_index(self):
        hidden = hidden_sizes(self.hidden_layer_sizes)
        code = len(hidden) // 2 if self.code_layer is None else self.code_layer
        if code >= len(hidden):
            raise ValueError(f"code_layer={code}, but there are {len(hidden)} hidden layers "
                             f"(indices 0 to {len(hidden) - 1})")
        return code

    def _activations(self):
        n_hidden = self.n_layers_ - 2
        act = self._net.activation
        return [act] * n_hidden if isinstance(act, str) else list(act)

    def _subnet(self, first, last):
        """The network of weight layers [first, last) and its packed parameters."""
        sizes = self._net.layer_sizes[first:last + 1]
        acts = self._activations()[first:last - 1]
        net = Network(sizes, activation=(acts[0] if len(set(acts)) == 1 else acts)
                      if acts else "identity", output="identity", dtype=self._net.dtype,
                      n_jobs=self.n_jobs)
        theta = np.concatenate([c.ravel() for c in self.coefs_[first:last]]
                               + list(self.intercepts_[first:last]))
        return net, theta

    @property
    def _n_features_out(self):
        return self._net.layer_sizes[self._code_index() + 1]

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None, *, X_val=None, sample_weight_val=None):
        """Learn to reconstruct X.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The data (also the targets). float32 trains in float32.
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.
        X_val : {array-like, sparse matrix} of shape (n_val, n_features), default=None
            Your own validation set: its reconstruction R^2 is recorded every epoch (or
            full-batch iteration), and early stopping uses it.
        sample_weight_val : array-like of shape (n_val,), default=None
            Weights of the validation samples.

        Returns
        -------
        self : object
            The fitted autoencoder.
        """
        self._code_index()
        return self._fit(X, None, sample_weight=sample_weight, incremental=False,
                         val=(X_val, X_val, sample_weight_val))

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y=None, sample_weight=None):
        """One epoch over X with 'sgd' or 'adam'.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The data.
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        self : object
            The updated autoencoder.
        """
        self._validate_params()
        self._code_index()
        return self._fit(X, None, sample_weight=sample_weight, incremental=True)

    def transform(self, X):
        """The code: activations of the code layer.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The data.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_code_units)
            The code layer's activations.
        """
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False,
                          dtype=(np.float64, np.float32))
        code = self._code_index()
        net, theta = self._subnet(0, code + 1)
        Z = net.forward(theta, X)
        return _activate(self._activations()[code], Z)

    def inverse_transform(self, X):
        """Decode codes back to the input space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_code_units)
            Codes, as ``transform`` returns them.

        Returns
        -------
        X_rec : ndarray of shape (n_samples, n_features)
            The reconstruction.
        """
        check_is_fitted(self)
        code = self._code_index()
        units = self._net.layer_sizes[code + 1]
        X = check_array(X, dtype=(np.float64, np.float32))
        if X.shape[1] != units:
            raise ValueError(f"X has {X.shape[1]} columns, but the code layer has {units} "
                             "units")
        net, theta = self._subnet(code + 1, self._net.n_layers)
        return net.forward(theta, X)

    def _reconstruct(self, X, check_input=True):
        return self._forward(X, check_input=check_input)

    def _score(self, X, y=None, sample_weight=None):
        """r2_score(X, reconstruction, multioutput="variance_weighted"), reconstructed
        and summed in blocks of rows, so that neither a sparse X nor the (dense)
        reconstruction is ever held whole."""
        n, d = X.shape
        w = (np.ones(n) if sample_weight is None
             else np.asarray(sample_weight, dtype=np.float64))
        if sp.issparse(X):
            X = X.tocsr()
            mean = np.asarray(X.T @ w).ravel() / w.sum()
        else:
            mean = np.average(X, axis=0, weights=w)
        num = np.zeros(d)
        den = np.zeros(d)
        step = max(1, _SCORE_BLOCK // max(d, 1))
        for start in range(0, n, step):
            block = X[start:start + step]
            rec = self._reconstruct(block, check_input=False)
            if not np.isfinite(rec).all():
                return np.nan
            dense = block.toarray() if sp.issparse(block) else np.asarray(block)
            wb = w[start:start + step, None]
            num += (wb * (dense - rec) ** 2).sum(axis=0)
            den += (wb * (dense - mean) ** 2).sum(axis=0)
        return _variance_weighted_r2(num, den)

    def score(self, X, y=None, sample_weight=None):
        """Reconstruction R^2 over all entries, variance-weighted.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The data.
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        score : float
            ``r2_score(X, reconstruction, multioutput="variance_weighted")``.
        """
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False,
                          dtype=(np.float64, np.float32))
        return self._score(X, None, sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        return tags
