"""Adam training per epoch: fastbp against scikit-learn's MLPClassifier, side by side.

Setup (issue 3): 20000 x 64 float32 data, 10 classes, hidden_layer_sizes=(128,),
batch_size=32, Adam, same hyperparameters and initial weights. Each round fits both for
``--epochs`` epochs (tol=0 so neither stops early), interleaved; medians reported.
Before each timed fit the process waits ``--settle`` seconds with its core busy: OpenBLAS's
worker threads busy-wait for a while after every call, and would otherwise steal the cores
from whichever library runs next, while a sleeping core would make the next short fit pay
to wake up (both sides get the same pause).

Usage: python benchmarks/bench_adam_epoch.py [--rounds 5] [--epochs 3] [--json out.json]
"""
import argparse
import json
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier as SkMLP
from threadpoolctl import threadpool_info

import fastbp
from fastbp._bench import _settle


def make_data(n=20000, d=64, k=10, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2
    y = rng.integers(0, k, n)
    X = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    X, y = make_data()
    params = dict(hidden_layer_sizes=(128,), solver="adam", batch_size=32,
                  max_iter=args.epochs, tol=0.0, n_iter_no_change=10**9, random_state=0)
    models = {"fastbp": lambda: fastbp.MLPClassifier(**params),
              "scikit-learn": lambda: SkMLP(**params)}
    times = {k: [] for k in models}
    acc = {}
    warnings.simplefilter("ignore", ConvergenceWarning)
    for _ in range(args.rounds):
        for name, make in models.items():
            m = make()
            _settle(args.settle)
            t0 = time.perf_counter()
            m.fit(X, y)
            times[name].append((time.perf_counter() - t0) / args.epochs)
            acc[name] = float(m.score(X, y))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"Adam, 20000x64 float32, (128,), batch 32, {args.epochs} epochs per fit, "
          f"median of {args.rounds} interleaved rounds")
    print(f"BLAS: {[(i['internal_api'], i['num_threads']) for i in threadpool_info()]}")
    print(f"{'library':14s} {'s/epoch':>9s} {'speed-up':>9s} {'train acc':>9s}")
    for k in models:
        print(f"{k:14s} {med[k]:9.4f} {med['scikit-learn'] / med[k]:9.1f} {acc[k]:9.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seconds_per_epoch": med, "accuracy": acc}, fh, indent=2)


if __name__ == "__main__":
    main()
