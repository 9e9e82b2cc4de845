"""What the activations and dropout cost per epoch, against ReLU without dropout.

Two shapes of the suite: W1 (20000 x 64 float32, (128,), Adam, batch 32) and W2
(30000 x 784 float32, (256, 128), Adam, batch 128). For each, every variant (each hidden
activation, and ReLU with ``dropout=0.1`` when the build has dropout) is fitted for
``--epochs`` epochs, interleaved with the ReLU baseline in every round; the figure is the
median over rounds of the paired ratio variant / ReLU (time per epoch), with a
distribution-free 95% confidence interval of that median. Target: at most 1.15 for
every variant. Single rounds on a shared machine scatter by +-30%; many short rounds
(``--rounds 151 --settle 0.05``) pin the median down to about +-2%.

Usage: python benchmarks/bench_features.py [--rounds 7] [--epochs 2] [--json out.json]
"""
import argparse
import inspect
import json
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

import fastbp
from fastbp import _core
from fastbp._bench import WORKLOADS, _data, _settle

TARGET = 1.15


def median_ci(values, z=1.96):
    """A distribution-free 95% confidence interval of the median: the order statistics
    n/2 -+ z sqrt(n)/2 (the binomial count of values below the median), so a reader
    sees how far the noise of a shared machine leaves the median from the target."""
    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    half = z * np.sqrt(n) / 2
    mid = (n - 1) / 2  # the median's (0-based) position
    lo = max(int(np.floor(mid - half)), 0)
    hi = min(int(np.ceil(mid + half)), n - 1)
    return [float(v[lo]), float(v[hi])]


def variants():
    out = {name: dict(activation=name) for name in sorted(_core.ACTIVATIONS)
           if name != "relu"}
    if "dropout" in inspect.signature(fastbp.MLPClassifier).parameters:
        out["relu, dropout=0.1"] = dict(activation="relu", dropout=0.1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--workloads", default="1,2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    report = {"date": time.strftime("%Y-%m-%d"), "target": f"<= {TARGET}x ReLU",
              "rounds": args.rounds, "epochs": args.epochs, "workloads": {}}
    for k in (int(w) for w in args.workloads.split(",")):
        w = WORKLOADS[k]
        X, y = _data(w["n"], w["d"], w["k"], w["dtype"])

        def fit(**extra):
            clf = fastbp.MLPClassifier(hidden_layer_sizes=w["hidden"], batch_size=w["batch"],
                                       max_iter=args.epochs, tol=0.0,
                                       n_iter_no_change=10**9, random_state=0, **extra)
            _settle(args.settle)
            t0 = time.perf_counter()
            clf.fit(X, y)
            return (time.perf_counter() - t0) / args.epochs

        fit()  # warm-up: first-fit costs are not what this measures
        ratios = {name: [] for name in variants()}
        base_times = []
        for r in range(args.rounds):
            for name, extra in variants().items():
                # Alternate which one runs first, so drift cancels in the pairs.
                if r % 2:
                    t_var, t_base = fit(**extra), fit()
                else:
                    t_base, t_var = fit(), fit(**extra)
                ratios[name].append(t_var / t_base)
                base_times.append(t_base)
        rows = {name: {"ratio": float(np.median(v)), "ci95": median_ci(v),
                       "min": float(np.min(v)), "max": float(np.max(v)),
                       "ratios": [float(x) for x in v]}
                for name, v in ratios.items()}
        report["workloads"][w["name"]] = {"relu_seconds_per_epoch":
                                          float(np.median(base_times)), "variants": rows}
        print(f"{w['name']} ({w['n']}x{w['d']}, {w['hidden']}, batch {w['batch']}): ReLU "
              f"{np.median(base_times):.4f} s/epoch, median of {args.rounds} paired rounds")
        for name, row in rows.items():
            flag = "ok" if row["ratio"] <= TARGET else "OVER"
            lo, hi = row["ci95"]
            print(f"  {name:20s} {row['ratio']:.3f}x  (95% CI {lo:.3f}-{hi:.3f}; rounds "
                  f"{row['min']:.3f}-{row['max']:.3f})  {flag}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
