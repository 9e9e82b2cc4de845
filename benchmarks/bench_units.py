"""Minibatch parallelism per shape: one thread, a team over rows, and the units split.

For networks whose first hidden layer has h units and minibatches of b rows, each round
fits the same model (Adam, 2 epochs, same start) three ways, interleaved: 'serial' (one
thread), 'team' (the minibatch's rows cut over two threads, their gradients reduced) and
'units' (the first hidden layer's units cut over two threads, the layers above on each
thread's copy, no reduction). Medians are reported with the ratios units / team and
units / serial, and the plan fastbp picks by itself (``minibatch_plan``: units when
h >= b and the layers above the second are small). Needs 2 CPUs to say anything.

Usage: python benchmarks/bench_units.py [--rounds 5] [--json out.json]
"""
import argparse
import json
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

import fastbp
from fastbp import _bench, _estimators, _threads

# (inputs, hidden layers, classes, batch, dtype, rows): from h / b = 0.16 to 4, then
# deeper networks (adam-mnist-like's shapes; one whose layers above the second are as
# big as the first two, which the plan leaves to the team).
SHAPES = [(64, (32,), 10, 200, "float64", 4794), (64, (64,), 10, 200, "float64", 4794),
          (784, (100,), 10, 200, "float64", 5000), (64, (128,), 10, 200, "float32", 20000),
          (64, (128,), 10, 32, "float32", 20000), (64, (256,), 10, 64, "float32", 20000),
          (784, (256,), 10, 128, "float32", 10000), (20, (64,), 2, 32, "float64", 10000),
          (100, (512,), 10, 256, "float32", 10000),
          (784, (256, 128), 10, 128, "float32", 10000),
          (64, (128, 64), 10, 32, "float32", 20000),
          (784, (256, 128, 64), 10, 128, "float32", 10000),
          (64, (128, 128, 128), 10, 32, "float32", 20000)]
PLANS = [("serial", 1), ("team", 2), ("units", 2)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    chosen_by = _estimators.minibatch_plan
    rows = []
    print(f"{'shape':>42} {'serial ms':>10} {'team ms':>8} {'units ms':>9} "
          f"{'units/team':>10} {'units/serial':>12}  plan")
    try:
        for d, hidden, k, b, dtype, n in SHAPES:
            X, y = _bench._data(n, d, k, np.dtype(dtype))
            times = {p[0]: [] for p in PLANS}
            for _ in range(args.rounds):
                for plan in PLANS:
                    _estimators.minibatch_plan = lambda *a, _p=plan, **kw: _p
                    clf = fastbp.MLPClassifier(hidden, batch_size=b, max_iter=2, tol=0.0,
                                               n_iter_no_change=10**9, random_state=0)
                    t0 = time.perf_counter()
                    clf.fit(X, y)
                    times[plan[0]].append(time.perf_counter() - t0)
            med = {name: float(np.median(v)) for name, v in times.items()}
            picked = _threads.minibatch_plan(2, b, [d, *hidden, k],
                                             np.dtype(dtype).itemsize, units_ok=True)
            shape = "->".join(map(str, [d, *hidden, k])) + f", batch {b}, {dtype}"
            rows.append({"shape": shape, "h_over_b": hidden[0] / b, "seconds": med,
                         "units_over_team": med["units"] / med["team"],
                         "units_over_serial": med["units"] / med["serial"],
                         "plan": picked[0]})
            print(f"{shape:>42} {med['serial'] * 1e3:10.1f} {med['team'] * 1e3:8.1f} "
                  f"{med['units'] * 1e3:9.1f} {rows[-1]['units_over_team']:10.2f} "
                  f"{rows[-1]['units_over_serial']:12.2f}  {picked[0]}", flush=True)
    finally:
        _estimators.minibatch_plan = chosen_by
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"fastbp": fastbp.__version__, "rounds": args.rounds,
                       "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
