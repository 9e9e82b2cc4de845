"""MLPClassifier and MLPRegressor: scikit-learn's estimators, on fastbp's kernels.

Names, defaults and behaviour follow ``sklearn.neural_network``. The differences, each an
improvement, are listed in the class docstrings under Notes.
"""
import functools
import math
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import (BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context,
                          is_classifier)
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from ._divergence import DivergenceError, diverged
from ._hessian_free import HessianFreeState, fit_hessian_free
from ._network import ACTIVATION_NAMES, Network, check_activation
from ._objective import LocalObjective
from ._solvers import fit_full_batch
from ._stochastic import StochasticOptimizer, TrainingRecord, fit_stochastic
from ._threads import effective_n_jobs, minibatch_plan
from ._validation import (STOCHASTIC, NonFiniteInput, check_finite_top, decode_targets,
                          defers_finite_check, dropout_rates, hidden_sizes, start_classes,
                          validate_fit, validate_val)

try:  # scikit-learn >= 1.9: its callback protocol (set_callbacks, sklearn.callback)
    from sklearn.callback import CallbackSupportMixin as _CallbackSupport
except ImportError:  # older versions: the estimators work without set_callbacks
    class _CallbackSupport:
        pass

__all__ = ["MLPClassifier", "MLPRegressor"]


class _FitCallbacks:
    """scikit-learn's callbacks (``set_callbacks``) around one ``fit``: the fit is the
    root task, each epoch (or full-batch iteration) one subtask. A callback's
    ``on_fit_task_end`` returning True stops training after that epoch. Callbacks that
    ask for a ``fitted_estimator`` get a copy holding that moment's parameters."""

    def __init__(self, est, X, y, sample_weight, max_iter):
        self.est, self.X, self.y, self.max_iter = est, X, y, max_iter
        self.metadata = None if sample_weight is None else {"sample_weight": sample_weight}
        self.ctx = est._init_callback_context(max_subtasks=max_iter)
        self.ctx.call_on_fit_task_begin(estimator=est, X=X, y=y, metadata=self.metadata)
        self.n_iter = 0
        self.task = self._begin()

    def _snapshot(self):
        theta = self.est._theta.copy()
        coefs, intercepts = self.est._net.unpack(theta)
        return {"_theta": theta, "coefs_": coefs, "intercepts_": intercepts,
                "n_iter_": self.n_iter, "loss_curve_": list(self.est.loss_curve_)}

    def _begin(self):
        task = self.ctx.subcontext(task_name="epoch")
        task.call_on_fit_task_begin(estimator=self.est, X=self.X, y=self.y,
                                    metadata=self.metadata,
                                    reconstruction_attributes=self._snapshot)
        return task

    def iteration_done(self, n_iter, loss):
        """End this epoch's subtask; True when a callback asks to stop."""
        self.n_iter = n_iter
        stop = self.task.call_on_fit_task_end(estimator=self.est, X=self.X, y=self.y,
                                              metadata=self.metadata,
                                              reconstruction_attributes=self._snapshot)
        self.task = None if stop or n_iter >= self.max_iter else self._begin()
        return stop

    def finish(self):
        if self.task is not None:  # begun, but training ended before it ran
            self.task.call_on_fit_task_end(estimator=self.est)
        self.ctx.call_on_fit_task_end(estimator=self.est, X=self.X, y=self.y,
                                      metadata=self.metadata, reconstruction_attributes={})


class _BaseMLP(_CallbackSupport, BaseEstimator):
    """Shared fitting machinery. Do not use directly."""

    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(ACTIVATION_NAMES)), list, tuple],
        "solver": [StrOptions({"lbfgs", "sgd", "adam", "tnc", "newton-cg",
                               "trust-krylov", "hessian-free"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "invscaling", "adaptive", "cosine"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "power_t": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [Interval(Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "momentum": [Interval(Real, 0, 1, closed="both")],
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "beta_1": [Interval(Real, 0, 1, closed="left")],
        "beta_2": [Interval(Real, 0, 1, closed="left")],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left"),
                             Options(Real, {np.inf})],
        "max_fun": [Interval(Integral, 1, None, closed="left")],
        "n_jobs": [None, Integral],
        "curvature": [StrOptions({"gauss-newton", "hessian"})],
        "backend": [None, StrOptions({"dask"})],
        "dropout": [Interval(Real, 0, 1, closed="left"), list, tuple],
    }

    def __init__(self, hidden_layer_sizes, activation, solver, alpha, batch_size,
                 learning_rate, learning_rate_init, power_t, max_iter, loss, shuffle,
                 random_state, tol, verbose, warm_start, momentum, nesterovs_momentum,
                 early_stopping, validation_fraction, beta_1, beta_2, epsilon,
                 n_iter_no_change, max_fun, n_jobs, curvature, backend, dropout=0.0):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.loss = loss
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.n_jobs = n_jobs
        self.curvature = curvature
        self.backend = backend
        self.dropout = dropout

    # Persistence: coefs_/intercepts_ are views into one flat vector; pickle the vector
    # once and rebuild the views on load.

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("coefs_", None)
        state.pop("intercepts_", None)
        return state

    def __setstate__(self, state):
        state = dict(state)
        state.pop("_best_theta", None)  # kept by fits before 2026-12-03; no longer used
        super().__setstate__(state)
        if "_theta" in self.__dict__:
            self._set_views()

    def _set_views(self):
        self.coefs_, self.intercepts_ = self._net.unpack(self._theta)

    # Fitting -----------------------------------------------------------------------------

    def _out_activation(self):
        raise NotImplementedError

    def _initialize(self, n_features, n_outputs, dtype):
        layer_units = [n_features] + hidden_sizes(self.hidden_layer_sizes) + [n_outputs]
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = n_outputs
        self.n_layers_ = len(layer_units)
        self.out_activation_ = self._out_activation()
        self._net = Network(layer_units, activation=self.activation,
                            output=self.out_activation_, dtype=dtype, n_jobs=self.n_jobs)
        self._theta = self._net.init_params(self._random_state)
        self._set_views()
        self._optimizer = None
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if self.solver in STOCHASTIC and self.early_stopping:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.validation_scores_ = None
            self.best_validation_score_ = None
            self.best_loss_ = np.inf

    def _fit(self, X, y, sample_weight=None, incremental=False, client=None, val=None):
        # A never fitted estimator's minibatch fit leaves the check of X for NaN and
        # infinity to its first epoch; finding one there, it puts back its attributes
        # and its random state's draws, so that it is as it was before the call.
        defer = defers_finite_check(self, X, client, not hasattr(self, "coefs_"))
        if not defer:
            return self._fit_checked(X, y, sample_weight, incremental, client, val)
        before = dict(vars(self))
        # A shared generator (NumPy's global one for None, or the instance given) has
        # its draws put back; an integer seed's is the fit's own.
        shared = (None if isinstance(self.random_state, Integral)
                  else check_random_state(self.random_state))
        draws = None if shared is None else shared.get_state()
        try:
            return self._fit_checked(X, y, sample_weight, incremental, client, val, True)
        except NonFiniteInput:
            vars(self).clear()
            vars(self).update(before)
            if shared is not None:
                shared.set_state(draws)
            raise

    def _fit_checked(self, X, y, sample_weight, incremental, client, val, defer=False):
        raw = (X, y, sample_weight)  # as given, for callbacks
        hidden = hidden_sizes(self.hidden_layer_sizes)
        dropout = dropout_rates(self.dropout, len(hidden), self.solver)
        _, per_layer = check_activation(self.activation, len(hidden))
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, Y, sample_weight, data, x_max = validate_fit(self, X, y, sample_weight, client,
                                                        incremental, first_pass, defer)
        n_features, n_outputs = ((data.n_features, data.n_outputs) if data is not None
                                 else (X.shape[1], Y.shape[1]))
        dtype = data.dtype if data is not None else X.dtype
        self._random_state = check_random_state(self.random_state)
        if not first_pass:
            expected = [n_features] + hidden + [n_outputs]
            if (list(self._net.layer_sizes) != expected
                    or per_layer != self._net._layer_activations):
                raise ValueError(
                    "warm_start/partial_fit needs the same network as the previous fit: "
                    f"layers {list(self._net.layer_sizes)} with activation "
                    f"{self._net.activation!r}, got layers {expected} with "
                    f"{self.activation!r}."
                )
            if dtype != self._net.dtype:
                if data is not None:
                    data.cast(self._net.dtype)
                else:
                    X, x_max = X.astype(self._net.dtype), None
            self._net.n_jobs = self.n_jobs
        else:
            self._initialize(n_features, n_outputs, dtype)
        val = validate_val(self, *(val or (None, None, None)), dtype=self._net.dtype)
        if val is not None and self.validation_scores_ is None:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
        callbacks = (_FitCallbacks(self, *raw, self.max_iter)
                     if not incremental and getattr(self, "_skl_callbacks", None) else None)
        watch = self._watchers(callbacks)

        if data is not None:
            objective = data.objective(self._net, self.alpha)
            try:
                self._fit_full_batch(objective, val, watch)
            finally:
                objective.close()
        elif self.solver in STOCHASTIC:
            self._fit_stochastic(X, Y, sample_weight, incremental, val, watch, dropout,
                                 x_max, defer)
        else:
            self._fit_full_batch(LocalObjective(
                self._net, self._net.prepare(X, Y, sample_weight, x_max=x_max),
                self.alpha), val, watch)
        if not np.isfinite(self._theta).all():  # defensive: the solvers never leave these
            raise diverged("at the end of training")
        if callbacks is not None:
            callbacks.finish()
        return self

    def _watchers(self, callbacks):
        """What watches training after every epoch or iteration, as one
        ``watch(n_iter, loss) -> stop``: scikit-learn's callbacks, and
        ``_progress_callback(n_iter, loss)``, a private hook for front ends (the
        ``fastbp`` command's progress bar). None when nothing watches."""
        hooks = [h for h in (getattr(self, "_progress_callback", None),
                             callbacks and callbacks.iteration_done) if h]
        if not hooks:
            return None

        def watch(n_iter, loss):
            stop = False
            for hook in hooks:
                stop = bool(hook(n_iter, loss)) or stop
            return stop
        return watch

    def _fit_full_batch(self, objective, val=None, watch=None):
        client = getattr(objective, "client", None)  # a DaskObjective
        self.parallelism_ = (
            {"mode": "dask", "threads": max(1, sum(client.nthreads().values()))}
            if client is not None else
            {"mode": "blocks", "threads": effective_n_jobs(self.n_jobs)})
        curve = []
        callback = self._iteration_hook(watch, val)
        if self.solver == "hessian-free":
            # warm_start keeps the damping and the last CG direction.
            state = self._optimizer
            if not (isinstance(state, HessianFreeState)
                    and state.compatible(self.solver, self._net.n_params,
                                         self._net.dtype)):
                state = HessianFreeState(self._net.n_params)
            seed = int(self._random_state.randint(0, 2**31 - 1))
            self.loss_, n_iter, self._optimizer = fit_hessian_free(
                objective, self._theta, self.max_iter, self.tol, self.verbose, curve,
                progress=callback, state=state, seed=seed)
        else:
            self.loss_, n_iter = fit_full_batch(
                self.solver, objective, self._theta, self.max_iter, self.max_fun,
                self.tol, self.verbose, curve, progress=callback,
                curvature=self.curvature)
        self.loss_curve_.extend(curve)
        self.n_iter_ = n_iter
        self.t_ += n_iter * objective.n_samples
        finite = [c for c in self.loss_curve_ if math.isfinite(c)]
        self.best_loss_ = min(finite) if finite else self.loss_

    def _batch_size(self, n_samples):
        if self.batch_size == "auto":
            return min(200, n_samples)
        if self.batch_size > n_samples:
            warnings.warn("Got `batch_size` less than 1 or larger than sample size. "
                          "It is going to be clipped")
        return int(np.clip(self.batch_size, 1, n_samples))

    def _make_optimizer(self):
        return StochasticOptimizer(
            self.solver, self._net.n_params, self._net.dtype, self.learning_rate_init,
            self.learning_rate, self.momentum, self.nesterovs_momentum, self.power_t,
            self.beta_1, self.beta_2, self.epsilon)

    def _fit_stochastic(self, X, Y, sample_weight, incremental, val=None, watch=None,
                        dropout=None, x_max=None, defer=False):
        net, theta = self._net, self._theta
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        # warm_start and partial_fit keep the optimizer state (moments, velocities).
        opt = getattr(self, "_optimizer", None)
        if opt is None or not opt.compatible(self.solver, net.n_params, net.dtype):
            opt = self._optimizer = self._make_optimizer()
        elif not incremental:
            # A new fit (warm_start) keeps the moments and velocities but takes the
            # current hyperparameters, and restarts the learning-rate schedule.
            opt.set_hyperparameters(self.learning_rate_init, self.learning_rate,
                                    self.momentum, self.nesterovs_momentum, self.power_t,
                                    self.beta_1, self.beta_2, self.epsilon)

        validation = None
        if val is not None:
            validation = functools.partial(self._score, *val)
        elif self.early_stopping:
            stratify = Y if (is_classifier(self) and self.n_outputs_ == 1) else None
            split = train_test_split(
                X, Y, *([] if sample_weight is None else [sample_weight]),
                random_state=self._random_state, test_size=self.validation_fraction,
                stratify=stratify)
            X, X_val, Y, Y_val = split[:4]
            x_max = None  # of the whole X; the training part needs its own
            sample_weight, sw_val = (split[4], split[5]) if sample_weight is not None \
                else (None, None)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            y_val = decode_targets(self, Y_val)
            if self.validation_scores_ is None:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
            validation = functools.partial(self._score, X_val, y_val, sw_val)
        elif self.best_loss_ is None:
            self.best_loss_ = np.inf

        x_check = (functools.partial(check_finite_top, self, dtype=X.dtype) if defer
                   else None)
        objective = LocalObjective(
            net, net.prepare(X, Y, sample_weight, x_max=x_max, x_check=x_check), self.alpha)
        batch_size = self._batch_size(objective.n_samples)
        plan = minibatch_plan(self.n_jobs, batch_size, net.layer_sizes, net.dtype.itemsize,
                              units_ok=objective.data.X is not None and dropout is None)
        self.parallelism_ = {"mode": plan[0], "threads": plan[1]}
        record = TrainingRecord(
            loss_curve=self.loss_curve_, t=self.t_, best_loss=self.best_loss_,
            validation_scores=self.validation_scores_,
            best_validation_score=self.best_validation_score_,
            no_improvement_count=self._no_improvement_count)
        try:
            fit_stochastic(
                objective, opt, theta, record, max_iter=self.max_iter,
                batch_size=batch_size, shuffle=self.shuffle, rng=self._random_state,
                plan=plan, tol=self.tol, n_iter_no_change=self.n_iter_no_change,
                early_stopping=self.early_stopping, validation=validation,
                on_epoch=watch and (lambda r: watch(r.n_iter, r.loss_curve[-1])),
                incremental=incremental, verbose=self.verbose, dropout=dropout)
        except DivergenceError:
            self._optimizer = None  # its moments/velocities may be non-finite too
            raise
        finally:
            if not incremental and self._optimizer is not None:
                self._optimizer.release()
            self.n_iter_, self.t_ = record.n_iter, record.t
            if record.n_iter:
                self.loss_ = record.loss
            self.best_loss_ = record.best_loss
            self.best_validation_score_ = record.best_validation_score
            self._no_improvement_count = record.no_improvement_count

    def _iteration_hook(self, watch, val):
        """A full-batch solver's ``progress(n_iter, loss) -> stop``: records the
        validation score of each iteration when a validation set ``val`` was given,
        then asks ``watch``."""
        if val is None:
            return watch

        def hook(n_iter, loss):
            score = self._score(*val)
            self.validation_scores_.append(score)
            self.best_validation_score_ = max(self.best_validation_score_, score)
            return watch(n_iter, loss) if watch is not None else False
        return hook

    def _forward(self, X, check_input=True, raw=False):
        if check_input:
            X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False,
                              dtype=(np.float64, np.float32))
        return self._net.forward(self._theta, X, raw=raw)

    def _score_with(self, X, y, sample_weight, score_function):
        y_pred = self._predict(X, check_input=False)
        if np.issubdtype(y_pred.dtype, np.floating) and not np.isfinite(y_pred).all():
            return np.nan
        return score_function(y, y_pred, sample_weight=sample_weight)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, *, X_val=None, y_val=None,
            sample_weight_val=None, client=None):
        """Fit the model to data matrix X and target(s) y.

        Parameters
        ----------
        X : {ndarray, sparse matrix, dask array} of shape (n_samples, n_features)
            The input data. float32 input trains in float32 with every solver. A Dask
            array (chunked by rows) trains data-parallel on the Dask cluster, with a
            full-batch solver; so does NumPy input with ``backend='dask'``.
        y : {ndarray, dask array} of shape (n_samples,) or (n_samples, n_outputs)
            The target values (class labels in classification, real numbers in
            regression).
        sample_weight : {array-like, dask array} of shape (n_samples,), default=None
            Non-negative sample weights.
        X_val : {array-like, sparse matrix} of shape (n_val, n_features), default=None
            Your own validation set (not in scikit-learn's MLP; as
            ``HistGradientBoostingClassifier`` takes it). Its score (``score``'s metric)
            is recorded in ``validation_scores_`` after every epoch, or every iteration
            of a full-batch solver. With ``early_stopping=True`` ('sgd'/'adam'), stopping
            and the restored best parameters use it, and ``validation_fraction`` is not
            held out of X. In a Pipeline, ``transform_input=["X_val"]`` sends it through
            the preceding steps (with metadata routing enabled and
            ``set_fit_request(X_val=True, y_val=True)``).
        y_val : array-like of shape (n_val,) or (n_val, n_outputs), default=None
            Targets of ``X_val``; required with it.
        sample_weight_val : array-like of shape (n_val,), default=None
            Weights of the validation samples (times ``class_weight``'s).
        client : distributed.Client, default=None
            The Dask client for Dask training; None uses the active one.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=False,
                         client=client, val=(X_val, y_val, sample_weight_val))

    def _check_solver(self):
        if self.solver not in STOCHASTIC:
            raise AttributeError("partial_fit is only available for stochastic optimizers. "
                                 f"{self.solver} is not stochastic.")
        return True

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


_COMMON_PARAMS_DOC = """
    hidden_layer_sizes : array-like of shape (n_layers - 2,), default=(100,)
        The ith element is the number of neurons in the ith hidden layer.
    activation : str or list of str, default='relu'
        Activation function for the hidden layers: scikit-learn's 'identity',
        'logistic', 'tanh' and 'relu', and (not in scikit-learn) 'leaky_relu' (``x``, or
        ``0.01 x`` below 0), 'elu' (``x``, or ``e^x - 1`` below 0), 'gelu' (``x Phi(x)``,
        exact, with erf), 'silu' (``x sigmoid(x)``) and 'softplus' (``log(1 + e^x)``,
        computed without overflow). A list or tuple (not in scikit-learn) gives one name
        per hidden layer, e.g. ``hidden_layer_sizes=(64, 32),
        activation=['gelu', 'tanh']``; a string applies to every hidden layer.
    solver : {'lbfgs', 'sgd', 'adam', 'tnc', 'newton-cg', 'trust-krylov', \
'hessian-free'}, default='adam'
        Weight optimizer: minibatch SGD or Adam, or a full-batch solver on the flat
        parameter vector: L-BFGS-B, truncated Newton ('tnc'), Newton-CG and trust-krylov
        with exact curvature products (see ``curvature``), or Martens' Hessian-free
        (damped Gauss-Newton with preconditioned CG on a curvature subsample of
        ``max(4096, n_samples // 10)`` rows, drawn with ``random_state`` in every
        iteration). The last four are not in scikit-learn.
    alpha : float, default=0.0001
        Strength of the L2 penalty (divided by the sum of sample weights).
    batch_size : int or 'auto', default='auto'
        Minibatch size for 'sgd' and 'adam'; 'auto' is ``min(200, n_samples)``.
    learning_rate : {'constant', 'invscaling', 'adaptive', 'cosine'}, default='constant'
        Learning-rate schedule: 'invscaling' and 'adaptive' for 'sgd', as in
        scikit-learn; 'cosine' (not in scikit-learn) for 'sgd' and 'adam', decays the
        step size per minibatch from ``learning_rate_init`` to 0 over ``max_iter``
        epochs: ``learning_rate_init * (1 + cos(pi * s / S)) / 2`` at step s of S. A
        warm start restarts the schedule; ``partial_fit`` calls continue it, and it stays
        at 0 after S steps.
    learning_rate_init : float, default=0.001
        Initial step size for 'sgd' and 'adam'.
    power_t : float, default=0.5
        Exponent of 'invscaling'.
    max_iter : int, default=200
        Epochs for 'sgd'/'adam'; iterations for the full-batch solvers (outer,
        Gauss-Newton iterations for 'hessian-free').
    shuffle : bool, default=True
        Shuffle the samples in every epoch ('sgd'/'adam').
    random_state : int, RandomState instance or None, default=None
        Seeds the initial weights, the shuffling and the validation split.
    tol : float, default=1e-4
        Tolerance for the optimisation: the loss improvement for 'sgd'/'adam' (see
        ``n_iter_no_change``); the largest gradient entry for 'lbfgs', 'tnc',
        'trust-krylov' and 'hessian-free'; the step size for 'newton-cg'.
    verbose : bool, default=False
        Print progress, one line per epoch or L-BFGS iteration.
    warm_start : bool, default=False
        Start from the previous solution, and keep the optimizer's state.
    momentum : float, default=0.9
        Momentum of 'sgd'.
    nesterovs_momentum : bool, default=True
        Use Nesterov's momentum with 'sgd'.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the data and stop when its score stops
        improving ('sgd'/'adam').
    validation_fraction : float, default=0.1
        Share of the data held out for early stopping.
    beta_1, beta_2 : float, default=0.9, 0.999
        Adam's decay rates for the moment estimates.
    epsilon : float, default=1e-8
        Adam's numerical-stability constant.
    n_iter_no_change : int, default=10
        Epochs without ``tol`` improvement before stopping ('sgd'/'adam').
    max_fun : int, default=15000
        Maximum number of loss evaluations for 'lbfgs'.
    n_jobs : int or None, default=None
        Threads for training and prediction (not in scikit-learn). None: as many as
        OpenMP may use here (``omp_get_max_threads()``, which follows
        ``OMP_NUM_THREADS``, threadpoolctl's ``openmp`` limits and joblib's per-worker
        limits, so a ``GridSearchCV(n_jobs=k)`` does not oversubscribe the cores), or
        the worker's thread count inside a Dask worker. A positive number is used as
        given; -1: every CPU this process may run on, -2: all but one, and so on.
        Full-batch work (the full-batch solvers, predict) spreads blocks of rows over
        the threads and sums them exactly: bitwise the same result for any ``n_jobs``.
        'sgd'/'adam' use the threads one of three ways, chosen from the shapes
        (``parallelism_`` says which): with a first hidden layer at least as wide as the
        minibatch is long (at most 256 rows, dense X, no dropout, small layers above
        the second), each thread owns a part of that layer's units and their weights and
        keeps its own copy of the layers above ('units'); other small networks cut each
        minibatch into
        one chunk of rows per thread (at least 16 rows and 2^20 float32-equivalent flops
        each, else the minibatch runs on one thread) with single-threaded BLAS
        ('team'); networks whose weights and per-thread gradients would not fit the
        CPU's last-level cache run each minibatch on one thread with multi-threaded BLAS
        ('blas'). With chunks or parts, the result depends on their number (through
        floating-point summation order) but not on how many threads run them: on a busy
        machine fewer threads run the same chunks and give the same model.
    curvature : {'gauss-newton', 'hessian'}, default='gauss-newton'
        The curvature products 'newton-cg' and 'trust-krylov' use: the Gauss-Newton
        matrix (positive semi-definite) or the exact Hessian (not in scikit-learn).
    backend : {None, 'dask'}, default=None
        'dask' trains NumPy input data-parallel on the active Dask cluster (or the
        ``client`` passed to ``fit``), split into one chunk per worker thread; Dask
        arrays always train there. Full-batch solvers only (not in scikit-learn).
"""

_COMMON_ATTRS_DOC = """
    loss_ : float
        The current loss (objective) value.
    best_loss_ : float or None
        The lowest training loss seen (None while early stopping is used).
    loss_curve_ : list of float
        The loss after each epoch ('sgd'/'adam') or each iteration ('lbfgs').
    validation_scores_ : list of float or None
        Validation scores per epoch (or iteration), with early stopping or ``X_val``.
    best_validation_score_ : float or None
        Best validation score, with early stopping or ``X_val``.
    t_ : int
        Number of training samples seen by the solver.
    coefs_ : list of ndarray
        ``coefs_[i]`` has shape (n_units_i, n_units_i+1): views into the flat vector.
    intercepts_ : list of ndarray
        ``intercepts_[i]`` has shape (n_units_i+1,): views into the flat vector.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Feature names, when X had string column names.
    n_iter_ : int
        Iterations (epochs) the solver ran.
    n_layers_ : int
        Number of layers, input and output included.
    n_outputs_ : int
        Number of outputs.
    out_activation_ : str
        Name of the output activation.
"""

_NOTES_DOC = """
    Where fastbp differs from scikit-learn (each on purpose):

    - float32 input trains and predicts in float32 with every solver, 'lbfgs' included
      (SciPy's optimizer state is float64; parameters convert at that boundary only).
      scikit-learn upcasts 'lbfgs' to float64.
    - 'lbfgs' records ``loss_curve_`` and ``best_loss_``, and prints with ``verbose``.
    - ``warm_start=True`` and ``partial_fit`` keep the optimizer state (Adam moments,
      SGD velocities, Adam's step count) instead of resetting it.
    - Ctrl-C during any solver returns a usable model holding the best parameters seen so
      far, with a warning.
    - A non-finite loss stops training with a ``ValueError`` (``DivergenceError``); the
      model keeps its last finite parameters.
    - Losses are computed exactly from the pre-activations, without scikit-learn's
      probability clipping; multi-output squared error is summed over outputs (see
      :class:`fastbp.Network`).
    - A whole 'sgd'/'adam' epoch runs in one compiled call without the GIL.
    - Not in scikit-learn's MLP: ``class_weight`` (classifier), ``learning_rate='cosine'``,
      the activations 'leaky_relu', 'elu', 'gelu', 'silu' and 'softplus', one activation
      per hidden layer (``activation`` as a list), your own validation set
      (``fit(..., X_val=, y_val=, sample_weight_val=)``), and scikit-learn's callbacks
      (``set_callbacks``, scikit-learn >= 1.9) with one subtask per epoch or full-batch
      iteration.
"""


class MLPClassifier(ClassifierMixin, _BaseMLP):
    __doc__ = """Multi-layer perceptron classifier, a drop-in for scikit-learn's.

    Optimizes the log-loss (softmax for multiclass, logistic per column for binary and
    multilabel targets) with L-BFGS, SGD or Adam on fastbp's compiled kernels.

    Parameters
    ----------""" + _COMMON_PARAMS_DOC + """    class_weight : dict, list of dict, 'balanced' or None, default=None
        Weights of the classes (not in scikit-learn's MLP), with the semantics of
        ``SGDClassifier`` and ``LogisticRegression``: a dict ``{class: weight}``
        (classes not in it weigh 1), or 'balanced', ``n_samples / (n_classes *
        np.bincount(y))``. They multiply ``sample_weight``. Multilabel targets take a
        list with one dict ``{0: w0, 1: w1}`` per output, or 'balanced' per output, as
        ``sklearn.utils.class_weight.compute_sample_weight``. ``partial_fit`` takes a
        dict only: one batch's class frequencies are not the data's.

    Attributes
    ----------
    classes_ : ndarray or list of ndarray
        Class labels.""" + _COMMON_ATTRS_DOC + """
    Notes
    -----""" + _NOTES_DOC + """
    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from fastbp import MLPClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = MLPClassifier(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=300,
    ...                     random_state=0).fit(X, y)
    >>> clf.score(X, y) > 0.95
    True
    >>> clf.predict_proba(X[:2]).shape
    (2, 3)
    """

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, max_fun=15000, n_jobs=None,
                 curvature="gauss-newton", backend=None, class_weight=None,
                 dropout=0.0):
        self.class_weight = class_weight
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver,
            alpha=alpha, batch_size=batch_size, learning_rate=learning_rate,
            learning_rate_init=learning_rate_init, power_t=power_t, max_iter=max_iter,
            loss="log_loss", shuffle=shuffle, random_state=random_state, tol=tol,
            verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun,
            n_jobs=n_jobs, curvature=curvature, backend=backend, dropout=dropout)

    _parameter_constraints: dict = {
        **_BaseMLP._parameter_constraints,
        "class_weight": [None, dict, list, StrOptions({"balanced"})],
    }

    def _out_activation(self):
        if self._label_binarizer.y_type_ == "multiclass":
            return "softmax"
        return "logistic"

    def predict(self, X):
        """Predict class labels.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_classes)
            The predicted classes (an indicator matrix for multilabel targets).
        """
        check_is_fitted(self)
        return self._predict(X)

    def _predict(self, X, check_input=True):
        y_pred = self._forward(X, check_input=check_input)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        return self._label_binarizer.inverse_transform(y_pred)

    def _score(self, X, y, sample_weight=None):
        return self._score_with(X, y, sample_weight, accuracy_score)

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """Update the model with one epoch over the given data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.
        y : array-like of shape (n_samples,)
            The target values.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.
        classes : array of shape (n_classes,), default=None
            All classes across calls; required on the first call.

        Returns
        -------
        self : object
            The updated estimator.
        """
        self._validate_params()
        start_classes(self, y, classes)
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def decision_function(self, X):
        """Raw scores: the output layer's pre-activations (logits).

        ``predict_proba`` is their softmax (multiclass) or logistic sigmoid (binary and
        multilabel), so both rank samples identically. scikit-learn's MLPClassifier has
        no ``decision_function``; fastbp adds it.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            One column per class (multiclass) or label (multilabel); 1-D for binary
            targets, positive for ``classes_[1]``.

        Examples
        --------
        >>> from sklearn.datasets import load_breast_cancer
        >>> from fastbp import MLPClassifier
        >>> X, y = load_breast_cancer(return_X_y=True)
        >>> clf = MLPClassifier((8,), solver="lbfgs", random_state=0).fit(X / X.max(0), y)
        >>> scores = clf.decision_function(X[:3] / X.max(0))
        >>> bool(((scores > 0) == (clf.predict(X[:3] / X.max(0)) == 1)).all())
        True
        """
        check_is_fitted(self)
        scores = self._forward(X, raw=True)
        return scores.ravel() if self.n_outputs_ == 1 else scores

    def predict_log_proba(self, X):
        """Log of the class probabilities.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.

        Returns
        -------
        log_y_prob : ndarray of shape (n_samples, n_classes)
            ``log(predict_proba(X))``.
        """
        y_prob = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(y_prob, out=y_prob)

    def predict_proba(self, X):
        """Class probabilities.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.

        Returns
        -------
        y_prob : ndarray of shape (n_samples, n_classes)
            Probabilities, columns ordered as ``classes_``.
        """
        check_is_fitted(self)
        y_pred = self._forward(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        if y_pred.ndim == 1:
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    __doc__ = """Multi-layer perceptron regressor, a drop-in for scikit-learn's.

    Optimizes the squared error (identity output) or the half Poisson deviance (exp
    output) with L-BFGS, SGD or Adam on fastbp's compiled kernels.

    Parameters
    ----------
    loss : {'squared_error', 'poisson'}, default='squared_error'
        The loss: half squared error, or half Poisson deviance with an exp output (the
        targets must then be non-negative).""" + _COMMON_PARAMS_DOC + """
    Attributes
    ----------""" + _COMMON_ATTRS_DOC + """
    Notes
    -----""" + _NOTES_DOC + """
    Examples
    --------
    >>> import numpy as np
    >>> from fastbp import MLPRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.uniform(-1, 1, size=(200, 3))
    >>> y = X @ [1.0, -2.0, 0.5] + 0.1
    >>> reg = MLPRegressor(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=500,
    ...                    random_state=0).fit(X, y)
    >>> reg.score(X, y) > 0.99
    True
    """

    _parameter_constraints: dict = {
        **_BaseMLP._parameter_constraints,
        "loss": [StrOptions({"squared_error", "poisson"})],
    }

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu",
                 *, solver="adam", alpha=0.0001, batch_size="auto",
                 learning_rate="constant", learning_rate_init=0.001, power_t=0.5,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False,
                 warm_start=False, momentum=0.9, nesterovs_momentum=True,
                 early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, n_iter_no_change=10, max_fun=15000, n_jobs=None,
                 curvature="gauss-newton", backend=None, dropout=0.0):
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver,
            alpha=alpha, batch_size=batch_size, learning_rate=learning_rate,
            learning_rate_init=learning_rate_init, power_t=power_t, max_iter=max_iter,
            loss=loss, shuffle=shuffle, random_state=random_state, tol=tol,
            verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun,
            n_jobs=n_jobs, curvature=curvature, backend=backend, dropout=dropout)

    def _out_activation(self):
        return "exp" if self.loss == "poisson" else "identity"

    def predict(self, X):
        """Predict using the multi-layer perceptron model.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            The predicted values.
        """
        check_is_fitted(self)
        return self._predict(X)

    def _predict(self, X, check_input=True):
        y_pred = self._forward(X, check_input=check_input)
        return y_pred.ravel() if y_pred.shape[1] == 1 else y_pred

    def _score(self, X, y, sample_weight=None):
        return self._score_with(X, y, sample_weight, r2_score)

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, sample_weight=None):
        """Update the model with one epoch over the given data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            The target values.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        self : object
            The updated estimator.
        """
        self._validate_params()
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)
