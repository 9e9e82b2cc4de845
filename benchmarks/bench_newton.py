"""Time-to-loss: each full-batch solver against L-BFGS, on two problems.

1. shallow: standardized digits, MLPClassifier((32,)), relu.
2. deep autoencoder: standardized digits, MLPRegressor predicting X from X through
   64-32-16-8-16-32-64 tanh, a badly conditioned deep net.

Every solver runs from the same initial weights (random_state=0) for the same wall-clock
budget (then it is stopped the way Ctrl-C stops it, keeping its best parameters); the
loss after each iteration is timestamped. The target is 1.1x (shallow) or 1.05x (deep)
the lowest loss any solver reached; the table gives the seconds each solver needed to get
there (or "-" when it never did within the budget), its final loss and iterations.

Usage: python benchmarks/bench_newton.py [--budget 6]
"""
import argparse
import time
import warnings

from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

import fastbp

SOLVERS = [("lbfgs", "gauss-newton"), ("tnc", "gauss-newton"),
           ("newton-cg", "gauss-newton"), ("newton-cg", "hessian"),
           ("trust-krylov", "gauss-newton"), ("trust-krylov", "hessian"),
           ("hessian-free", "gauss-newton")]


def trace(est, X, y, budget):
    """Fit for at most ``budget`` seconds, returning [(seconds, loss)] per iteration."""
    points = []
    t0 = time.perf_counter()

    def progress(n_iter, loss):
        points.append((time.perf_counter() - t0, loss))
        if points[-1][0] > budget:
            raise KeyboardInterrupt  # the solver keeps its best parameters, as on Ctrl-C
    est._progress_callback = progress
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    return points


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per solver")
    args = ap.parse_args()
    X = StandardScaler().fit_transform(load_digits().data)
    y = load_digits().target
    problems = {
        "shallow (digits, (32,))": (lambda s, c: fastbp.MLPClassifier(
            (32,), solver=s, curvature=c, max_iter=100000, tol=0.0,
            random_state=0), X, y, 1.1),
        "deep autoencoder (64-32-16-8-16-32-64 tanh)": (lambda s, c: fastbp.MLPRegressor(
            hidden_layer_sizes=(32, 16, 8, 16, 32), activation="tanh", solver=s,
            curvature=c, max_iter=100000, tol=0.0, random_state=0), X, X, 1.05),
    }
    print(f"time-to-loss, {args.budget:g} s per solver")
    for name, (make, Xp, yp, slack) in problems.items():
        traces = {f"{s} ({c})" if s in ("newton-cg", "trust-krylov") else s:
                  trace(make(s, c), Xp, yp, args.budget) for s, c in SOLVERS}
        best = min(min(loss for _, loss in pts) for pts in traces.values() if pts)
        target = slack * best
        print(f"\n{name}: target loss {target:.5g} ({slack}x the best reached, {best:.5g})")
        print("| solver | seconds to target | final loss | iterations | total s |")
        print("|---|---|---|---|---|")
        for solver, pts in traces.items():
            hit = next((t for t, loss in pts if loss <= target), None)
            print(f"| {solver} | {'-' if hit is None else f'{hit:.2f}'} | "
                  f"{pts[-1][1]:.5g} | {len(pts)} | {pts[-1][0]:.2f} |")


if __name__ == "__main__":
    main()
