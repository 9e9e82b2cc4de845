"""The minibatch driver on its own: an objective, an optimizer and a record, no estimator."""
import math

import numpy as np
import pytest

from fastbp import DivergenceError, Network
from fastbp._objective import LocalObjective
from fastbp._stochastic import StochasticOptimizer, TrainingRecord, fit_stochastic

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _problem(seed=0, n=240):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    net = Network([5, 8, 2], activation="tanh", output="softmax", dtype=np.float64)
    return net, LocalObjective(net, net.prepare(X, np.eye(2)[y]), 1e-4)


def _fit(objective, record, theta, **kw):
    opt = StochasticOptimizer("adam", objective.net.n_params, np.float64, 1e-2)
    settings = dict(max_iter=6, batch_size=32, shuffle=True,
                    rng=np.random.RandomState(0), plan=("serial", 1), tol=0.0,
                    n_iter_no_change=100)
    settings.update(kw)
    fit_stochastic(objective, opt, theta, record, **settings)
    return opt


def test_record_tracks_every_epoch_and_loss_decreases():
    net, objective = _problem()
    theta = net.init_params(random_state=0)
    start_loss = objective.loss_grad(theta, None)
    record = TrainingRecord()
    _fit(objective, record, theta)
    assert record.n_iter == 6 and record.t == 6 * 240
    assert len(record.loss_curve) == 6 and record.loss == record.loss_curve[-1]
    assert record.loss_curve[-1] < start_loss
    assert record.best_loss == min(record.loss_curve)


def test_on_epoch_sees_each_epoch_and_can_stop_training():
    net, objective = _problem()
    theta = net.init_params(random_state=0)
    seen = []

    def hook(record):
        seen.append((record.n_iter, record.loss_curve[-1]))
        return record.n_iter == 3

    record = TrainingRecord()
    _fit(objective, record, theta, on_epoch=hook)
    assert [s[0] for s in seen] == [1, 2, 3]
    assert record.n_iter == 3 and [s[1] for s in seen] == record.loss_curve


def test_validation_scores_are_recorded_with_and_without_early_stopping():
    net, objective = _problem()
    calls = []

    def score():
        calls.append(1)
        return -float(len(calls))  # gets worse every epoch

    theta = net.init_params(random_state=0)
    record = TrainingRecord(validation_scores=[])
    _fit(objective, record, theta, validation=score)
    assert record.validation_scores == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]

    # With early stopping the score decides: it never improves after the first epoch,
    # so training stops after n_iter_no_change + 1 more epochs, with epoch 1's parameters.
    calls.clear()
    theta = net.init_params(random_state=0)
    snapshots = []
    record = TrainingRecord(validation_scores=[], best_validation_score=-np.inf,
                            best_loss=None)
    _fit(objective, record, theta, validation=score, early_stopping=True,
         n_iter_no_change=2, on_epoch=lambda r: snapshots.append(theta.copy()))
    assert record.n_iter == 4 and record.best_validation_score == -1.0
    np.testing.assert_array_equal(theta, snapshots[0])


def test_early_stopping_needs_a_validation_score():
    net, objective = _problem()
    with pytest.raises(ValueError, match="validation score"):
        _fit(objective, TrainingRecord(), net.init_params(random_state=0),
             early_stopping=True)


def test_divergence_restores_the_last_finite_parameters():
    X = np.random.default_rng(0).normal(size=(50, 2))
    net = Network([2, 8, 1], activation="relu", output="identity", dtype=np.float64)
    objective = LocalObjective(net, net.prepare(X, X[:, :1] * 1e3), 0.0)
    theta = net.init_params(random_state=0)
    opt = StochasticOptimizer("sgd", net.n_params, np.float64, 10.0)
    before = []
    record = TrainingRecord()
    with pytest.raises(DivergenceError, match="epoch"):
        fit_stochastic(objective, opt, theta, record, max_iter=50, batch_size=32,
                       shuffle=True, rng=np.random.RandomState(0), plan=("serial", 1),
                       tol=0.0, n_iter_no_change=100,
                       on_epoch=lambda r: before.append(theta.copy()))
    assert np.isfinite(theta).all()
    # The last finite parameters: those after the last completed epoch (or the start).
    expected = before[-1] if before else net.init_params(random_state=0)
    np.testing.assert_array_equal(theta, expected)
    assert all(math.isfinite(v) for v in record.loss_curve)


def test_snapshots_restore_what_eager_copies_would_with_few_buffers():
    # Random runs of epochs (theta changes in each; some improve) against a reference
    # that copies theta eagerly: before the fit, before each epoch, and at each
    # improvement. Every snapshot restores exactly the reference's values.
    from fastbp._stochastic import _Snapshots
    rng = np.random.default_rng(0)
    for trial in range(300):
        theta = rng.normal(size=7)
        snaps = _Snapshots(theta)
        ref = {"start": theta.copy(), "best": theta.copy()}
        always_improves = trial % 3 == 0
        for epoch in range(int(rng.integers(1, 8))):
            snaps.before_epoch()
            ref["last_good"] = theta.copy()
            theta += rng.normal(size=7)  # the epoch
            if always_improves or rng.random() < 0.5:
                snaps.improved()
                ref["best"] = theta.copy()
            assert len(snaps._buffers) <= 3
        n_epochs = epoch + 1
        if n_epochs == 1:
            assert len(snaps._buffers) == 1
        elif always_improves:
            assert len(snaps._buffers) == 2  # start, and one reused for last_good
        end = theta.copy()
        for which in ("last_good", "best", "start"):
            snaps.restore(which)
            np.testing.assert_array_equal(theta, ref[which])
            theta[...] = end  # restore() writes into theta in place


def test_a_one_epoch_fit_copies_theta_once(monkeypatch):
    net, objective = _problem()
    theta = net.init_params(random_state=0)
    copies = []
    original = np.empty_like

    def counted(a, *args, **kwargs):
        copies.append(a is theta)
        return original(a, *args, **kwargs)

    monkeypatch.setattr(np, "empty_like", counted)
    _fit(objective, TrainingRecord(), theta, max_iter=1)
    assert copies == [True]
    copies.clear()
    record = TrainingRecord()
    _fit(objective, record, theta, max_iter=5)
    assert np.all(np.diff(record.loss_curve) < 0)
    assert copies == [True, True]  # start, and one buffer for every later epoch
