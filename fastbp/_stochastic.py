"""The minibatch driver: SGD and Adam, one compiled call per epoch.

``StochasticOptimizer`` holds SGD's velocity or Adam's moments over the flat parameter
vector (scikit-learn's update formulas) and runs a whole epoch (shuffle, minibatch
gather, forward, backward, update) in one nogil kernel call (``_core.run_epoch``).

``fit_stochastic`` is the training loop around it: epochs, the divergence guard, the
no-improvement count with ``tol`` and ``n_iter_no_change``, early stopping on a
validation score, Ctrl-C, and the final check of the parameters. It takes an objective
(``_objective.LocalObjective``: network, prepared data, alpha), an optimizer and a
``TrainingRecord``; it knows nothing of estimators. Two hooks let a caller watch and
steer it: ``validation`` scores the current parameters after every epoch, and
``on_epoch`` is called after every epoch and may stop training by returning True.
"""
import math
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from . import _core
from ._divergence import DivergenceError, diverged
from ._network import _max_abs, aligned_empty, aligned_zeros
from ._threads import blas_threads, team_for_now, whole_lines

__all__ = ["StochasticOptimizer", "TrainingRecord", "fit_stochastic", "dropout_seed"]


class StochasticOptimizer:
    """SGD or Adam state over the flat vector (scikit-learn's update formulas).

    Parameters
    ----------
    solver : {'sgd', 'adam'}
    n_params : int
    dtype : numpy dtype
    learning_rate_init, lr_schedule, momentum, nesterov, power_t : SGD settings.
    beta_1, beta_2, epsilon : Adam settings.
    """

    def __init__(self, solver, n_params, dtype, learning_rate_init, lr_schedule="constant",
                 momentum=0.9, nesterov=True, power_t=0.5, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8):
        self.solver = solver
        self.set_hyperparameters(learning_rate_init, lr_schedule, momentum, nesterov,
                                 power_t, beta_1, beta_2, epsilon)
        # SGD: state_1 is the velocity. Adam: first and second moments.
        self.state_1 = aligned_zeros(n_params, dtype)
        self.state_2 = aligned_zeros(n_params if solver == "adam" else 1, dtype)
        self.step = np.zeros(1, dtype=np.longlong)  # Adam's t

    def set_hyperparameters(self, learning_rate_init, lr_schedule, momentum, nesterov,
                            power_t, beta_1, beta_2, epsilon):
        """Take new settings (the state arrays are kept); the rate restarts at its
        initial value."""
        self.learning_rate_init = float(learning_rate_init)
        self.learning_rate = float(learning_rate_init)
        self.lr_schedule = lr_schedule
        # 'cosine': minibatch steps taken on the schedule, and its length (set by the
        # loop from max_iter and the number of minibatches per epoch).
        self.cosine_step = 0
        self.cosine_steps = 0
        self.momentum = float(momentum) if self.solver == "sgd" else 0.0
        self.nesterov = bool(nesterov)
        self.power_t = float(power_t)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def compatible(self, solver, n_params, dtype):
        return (self.solver == solver and self.state_1.shape[0] == n_params
                and self.state_1.dtype == dtype)

    def release(self):
        """Free the scratch buffers (gradients per chunk, workspaces): a fit ends with
        it, ``partial_fit`` keeps them for its next call."""
        self._grads = self._work = self._dacc = self._buf_key = None

    def __getstate__(self):  # the scratch is not part of a pickled model
        state = dict(self.__dict__)
        for name in ("_grads", "_work", "_dacc", "_buf_key"):
            state.pop(name, None)
        return state

    def _buffers(self, net, n_chunks, batch_size, sparse, drop=None, units=False):
        """Per-chunk gradient and intercept-sum rows and per-thread workspaces (at most
        one thread per chunk), reused across epochs; split by ``units``, one gradient
        row and a workspace and intercept-sum row per part."""
        # Rows per chunk (a units part takes the whole minibatch): what the sizes depend on.
        per_chunk = batch_size if units else -(-batch_size // n_chunks)
        key = (n_chunks, per_chunk, net.layer_sizes, tuple(net._acts), sparse,
               None if drop is None else tuple(drop), units)
        if getattr(self, "_buf_key", None) != key:
            if units:  # each part's rows start on a cache line of their own
                ws = whole_lines(_core.units_workspace_size(
                    net._sizes, net._acts, batch_size, n_chunks), net.dtype.itemsize)
                n_int = whole_lines(net._n_intercepts, 8)
            else:
                ws = _core.workspace_size(net._sizes, net._acts, per_chunk, not sparse,
                                          drop)
                n_int = net._n_intercepts
            self._grads = aligned_empty((1 if units else n_chunks, net.n_params),
                                        net.dtype)
            self._work = aligned_empty((n_chunks, ws), net.dtype)
            self._dacc = aligned_empty((n_chunks, n_int), np.float64)
            self._buf_key = key
        return self._grads, self._work, self._dacc

    def epoch(self, net, theta, data, order, shuffle, seed, batch_size, alpha, n_chunks=1,
              dropout=None, keys=None, units=False, x_tops=None):
        """One pass over ``order``'s rows; returns the sum of batch loss x batch size.

        ``dropout``: None, or one rate in [0, 1) per hidden layer (float64 array) for
        inverted dropout, with masks drawn from ``seed`` and the rows' ``keys`` (see
        ``row_keys`` and ``_core.run_epoch``).

        With ``n_chunks`` > 1 every minibatch is cut into that many chunks of rows, shared
        by a team of up to n_chunks threads (fewer while other work keeps cores busy; the
        result depends on n_chunks only); BLAS should then be limited to one thread (see
        ``_threads.minibatch_plan``). With ``units`` (dense X, no dropout) the minibatch is
        split by the first hidden layer's units into n_chunks parts instead, the layers
        above replicated per thread (see ``_core.run_epoch``).

        ``x_tops`` (dense X; float64 zeros, one per chunk): receives max |x| of the rows
        as they are gathered (see ``_core.run_epoch``).
        """
        grads, work, dacc = self._buffers(net, n_chunks, batch_size, data.X is None,
                                          dropout, units)
        drop_seed = dropout_seed(seed)
        n_threads, spin = team_for_now(n_chunks)
        cosine = self.lr_schedule == "cosine"
        rate = self.learning_rate_init if cosine else self.learning_rate  # the kernel decays
        total, n_batches = _core.run_epoch(
            theta, grads, data.X, data.data, data.indices, data.indptr, data.Y,
            data.sample_weight, net._sizes, net._w_off, net._b_off, net._acts, net._out,
            work, dacc, order, shuffle, seed, batch_size, float(alpha),
            _core.SOLVERS[self.solver], rate, self.momentum, self.nesterov,
            self.beta_1, self.beta_2, self.epsilon, self.state_1, self.state_2, self.step,
            n_chunks, n_threads, spin, self.cosine_steps if cosine else 0,
            self.cosine_step if cosine else 0, dropout, drop_seed, keys, **data.targets(),
            units=units, x_tops=x_tops)
        if cosine:
            self.cosine_step += n_batches
            done = min(self.cosine_step, self.cosine_steps) / max(self.cosine_steps, 1)
            self.learning_rate = self.learning_rate_init * 0.5 * (1 + math.cos(math.pi
                                                                              * done))
        return total

    def iteration_ends(self, time_step):
        """Learning-rate schedule at the end of an epoch (``time_step``: samples seen)."""
        if self.solver == "sgd" and self.lr_schedule == "invscaling":
            self.learning_rate = self.learning_rate_init / (time_step + 1) ** self.power_t

    def trigger_stopping(self, msg, verbose):
        """True when training should stop; 'adaptive' SGD divides the rate by 5 first."""
        if self.solver != "sgd" or self.lr_schedule != "adaptive":
            if verbose:
                print(msg + " Stopping.")
            return True
        if self.learning_rate <= 1e-6:
            if verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self.learning_rate /= 5.0
        if verbose:
            print(msg + f" Setting learning rate to {self.learning_rate:f}")
        return False


def dropout_seed(seed):
    """The seed of an epoch's dropout masks: a function of the epoch's shuffling seed, so
    dropout draws nothing more from the estimator's random state (dropout=0 leaves a fit
    bitwise unchanged)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64


_KEY_ROWS = 512  # rows hashed at a time: a small temporary, kept in cache


def row_keys(data, n_features):
    """One uint64 key per row of prepared data, a hash of the row's features (its
    values' bits times per-column odd multipliers, in the values' width, summed mod
    2^64). Dropout keys its masks by it, so identical rows draw identical masks and a
    weight of 2 is a repeated row (scikit-learn's sample-weight semantics) also with
    dropout. O(n_features) per row, once per fit."""
    values = data.X if data.X is not None else data.data
    bits = np.uint64 if values.dtype == np.float64 else np.uint32
    rng = np.random.default_rng(0x5EED)
    mult = (rng.integers(1, np.iinfo(bits).max // 2, n_features, dtype=bits)
            * bits(2) + bits(1))
    n = data.n_samples
    keys = np.zeros(n, dtype=np.uint64)
    if data.X is None:  # CSR arrays
        vals = (data.data.view(bits) * mult[data.indices]).astype(np.uint64)
        nnz = np.diff(data.indptr)
        if vals.size:
            keys[nnz > 0] = np.add.reduceat(vals, data.indptr[:-1][nnz > 0])
        return keys
    for start in range(0, n, _KEY_ROWS):
        rows = np.ascontiguousarray(data.X[start:start + _KEY_ROWS]).view(bits)
        keys[start:start + len(rows)] = (rows * mult).sum(axis=1, dtype=np.uint64)
    return keys


class TrainingRecord:
    """What the loop reads and updates, kept by the caller across fits (warm start,
    ``partial_fit``): scikit-learn's fitted attributes without their trailing underscore.

    ``validation_scores`` is a list when a validation score is recorded, else None;
    ``best_loss`` is None while early stopping is used.
    """

    def __init__(self, loss_curve=None, t=0, best_loss=math.inf, validation_scores=None,
                 best_validation_score=None, no_improvement_count=0):
        self.n_iter = 0
        self.t = t
        self.loss = math.nan
        self.loss_curve = [] if loss_curve is None else loss_curve
        self.best_loss = best_loss
        self.validation_scores = validation_scores
        self.best_validation_score = best_validation_score
        self.no_improvement_count = no_improvement_count


class _Snapshots:
    """The copies of theta that a fit may restore, made from at most three buffers.

    - ``start``: theta before the fit (restored when the final parameters give a
      non-finite loss);
    - ``last_good``: theta before the epoch that is running (restored when it diverges);
    - ``best``: the parameters that early stopping, or Ctrl-C, restores; None while
      they are theta's current values.

    Each names a buffer, and often the same one: theta is copied before each epoch
    (not after, so never after the last), into the buffer of the previous copy unless
    ``start`` or ``best`` still needs it. A one-epoch fit copies theta once, a fit
    whose loss keeps improving once per epoch into one buffer after the second; a
    buffer is added only for a ``start`` or ``best`` that differs from the others.
    """

    def __init__(self, theta):
        self.theta = theta
        self.start = self.last_good = self.best = None
        self._buffers = []

    def before_epoch(self):
        buf = next((b for b in self._buffers
                    if b is not self.start and b is not self.best), None)
        if buf is None:
            buf = np.empty_like(self.theta)
            self._buffers.append(buf)
        buf[...] = self.theta
        self.last_good = buf
        if self.start is None:
            self.start = buf
        if self.best is None:
            self.best = buf

    def improved(self):
        """theta's current values are the best so far."""
        self.best = None

    def restore(self, which):
        """Put the ``which`` ('start', 'last_good' or 'best') snapshot back into theta;
        nothing to do while it has not been taken or is theta's current values."""
        saved = getattr(self, which)
        if saved is not None:
            self.theta[...] = saved


def fit_stochastic(objective, optimizer, theta, record, *, max_iter, batch_size, shuffle,
                   rng, plan, tol, n_iter_no_change, early_stopping=False, validation=None,
                   on_epoch=None, incremental=False, verbose=False, dropout=None):
    """Train ``theta`` (in place) with ``optimizer`` on ``objective``'s data.

    Parameters
    ----------
    objective : LocalObjective
        The network, its prepared training rows and alpha.
    optimizer : StochasticOptimizer
    theta : ndarray
        The flat parameter vector, updated in place.
    record : TrainingRecord
        Updated after every epoch.
    max_iter, batch_size, shuffle, tol, n_iter_no_change : as scikit-learn's MLP.
    rng : numpy.random.RandomState
        Draws each epoch's shuffling seed.
    plan : (mode, threads)
        From ``_threads.minibatch_plan``: 'team' splits every minibatch over ``threads``
        chunks of rows with single-threaded BLAS, 'units' over ``threads`` parts of the
        first hidden layer's units (dense X, no dropout), 'blas' gives BLAS the
        threads, 'serial' one.
    early_stopping : bool
        Count improvements of the validation score (``validation`` is then required) and
        end with the parameters that scored best; otherwise count the training loss.
    validation : callable or None
        ``validation()`` scores the current parameters (higher is better); recorded in
        ``record.validation_scores`` after every epoch.
    on_epoch : callable or None
        ``on_epoch(record)`` after every epoch; a true result ends training.
    incremental : bool
        One epoch (``partial_fit``), without the final check of the parameters.
    dropout : ndarray or None
        One dropout rate per hidden layer (float64), or None for no dropout.

    Raises
    ------
    DivergenceError
        When an epoch's loss or the parameters become non-finite (theta then holds the
        last finite parameters), or when the final parameters give a non-finite loss
        (theta then holds the parameters it started from).
    """
    if early_stopping and validation is None:
        raise ValueError("early_stopping needs a validation score")
    mode, n_threads = plan
    snaps = _Snapshots(theta)
    team = n_threads if mode in ("team", "units") else 1
    if optimizer.lr_schedule == "cosine":  # decays to 0 over max_iter epochs
        optimizer.cosine_steps = max_iter * -(-objective.n_samples // batch_size)
    with blas_threads(n_threads if mode == "blas" else 1):
        _run_epochs(objective, optimizer, theta, record, max_iter, batch_size, shuffle,
                    rng, team, tol, n_iter_no_change, early_stopping, validation,
                    on_epoch, incremental, verbose, snaps, dropout, mode == "units")
        if objective.data.x_max is None:   # (interrupted before the first epoch ended)
            _settle_x_max(objective.data, None, snaps)
        # Each epoch's loss is measured on the way, before each update. The final
        # parameters are certified from a bound (O(n_params)); only when the bound
        # cannot tell is the loss measured once more on the training rows.
        if (not incremental and not objective.surely_finite(theta)
                and not math.isfinite(objective.loss_grad(theta, None))):
            snaps.restore("start")
            raise DivergenceError(
                "Training diverged: the final parameters give a non-finite loss on "
                "the training data. The model keeps the parameters it had before "
                "this fit. Scale the inputs (for example with StandardScaler) or "
                "lower learning_rate_init.")


def _run_epochs(objective, opt, theta, record, max_iter, batch_size, shuffle, rng,
                n_threads, tol, n_iter_no_change, early_stopping, validation, on_epoch,
                incremental, verbose, snaps, dropout=None, units=False):
    net, data, n_samples = objective.net, objective.data, objective.n_samples
    order = np.arange(n_samples, dtype=np.intp)
    keys = None if dropout is None else row_keys(data, net.layer_sizes[0])
    best_train_loss = math.inf
    interrupted = False
    # max |X| left to the first epoch (see Network.prepare's x_check): found as it
    # gathers the rows.
    tops = np.zeros(max(n_threads, 1)) if data.x_max is None else None
    try:
        record.n_iter = 0
        for _ in range(max_iter):
            seed = int(rng.randint(0, 2**32, dtype=np.uint64)) << 32 | \
                int(rng.randint(0, 2**32, dtype=np.uint64))
            snaps.before_epoch()
            total = opt.epoch(net, theta, data, order, shuffle, seed, batch_size,
                              objective.alpha, n_threads, dropout, keys, units, tops)
            if tops is not None:  # every row was gathered unless the epoch stopped early
                _settle_x_max(data, tops if math.isfinite(total) else None, snaps)
                tops = None
            if not (math.isfinite(total) and math.isfinite(_core.max_abs(theta))):
                snaps.restore("last_good")
                raise diverged(f"in epoch {record.n_iter + 1} of {opt.solver}")
            record.n_iter += 1
            record.loss = total / n_samples
            record.t += n_samples
            record.loss_curve.append(record.loss)
            if verbose:
                print(f"Iteration {record.n_iter}, loss = {record.loss:.8f}")
            stop = bool(on_epoch(record)) if on_epoch is not None else False
            if not early_stopping and record.loss < best_train_loss:
                best_train_loss = record.loss
                snaps.improved()
            _count_no_improvement(record, snaps, tol, early_stopping, validation, verbose)
            opt.iteration_ends(record.t)
            if record.no_improvement_count > n_iter_no_change:
                measure = "Validation score" if early_stopping else "Training loss"
                msg = ("%s did not improve more than tol=%f for %d consecutive epochs."
                       % (measure, tol, n_iter_no_change))
                if opt.trigger_stopping(msg, verbose):
                    break
                record.no_improvement_count = 0
            if incremental or stop:
                break
            if record.n_iter == max_iter:
                warnings.warn(
                    "Stochastic Optimizer: Maximum iterations (%d) reached and the "
                    "optimization hasn't converged yet." % max_iter,
                    ConvergenceWarning)
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn("Training interrupted by user; the model keeps the best "
                      "parameters found so far.", UserWarning)
    if early_stopping or (interrupted and math.isfinite(best_train_loss)):
        snaps.restore("best")


def _settle_x_max(data, tops, snaps):
    """Set max |X| from a complete first epoch's ``tops`` (or, with None, from a pass
    over X) and check it: X with NaN or infinity restores the parameters the fit
    started from and raises the caller's error (``data.x_check``)."""
    top = float(np.max(tops)) if tops is not None else _max_abs(data.X)
    try:
        data.x_check(top)
    except BaseException:  # (Ctrl-C too: the fit then checks X again, by a pass)
        snaps.restore("start")
        raise
    data.x_max = top   # (only once checked)


def _count_no_improvement(record, snaps, tol, early_stopping, validation, verbose):
    """Record the validation score, and count epochs without a ``tol`` improvement of
    the validation score (early stopping) or of the training loss."""
    if validation is not None:
        score = validation()
        record.validation_scores.append(score)
        if verbose:
            print("Validation score: %f" % score)
    if early_stopping:
        if score < record.best_validation_score + tol:
            record.no_improvement_count += 1
        else:
            record.no_improvement_count = 0
        if score > record.best_validation_score:
            record.best_validation_score = score
            snaps.improved()
    else:
        if validation is not None and (record.best_validation_score is None
                                       or score > record.best_validation_score):
            record.best_validation_score = score
        if record.loss_curve[-1] > record.best_loss - tol:
            record.no_improvement_count += 1
        else:
            record.no_improvement_count = 0
        if record.loss_curve[-1] < record.best_loss:
            record.best_loss = record.loss_curve[-1]
