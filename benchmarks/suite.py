"""The full benchmark suite (issue: performance): fastbp against scikit-learn and PyTorch.

Writes ``benchmarks/results/results.json``, ``results.md`` (the table) and
``speedups.png``. PyTorch is optional (``pip install torch==2.13.0``); without it, its
columns are empty. ``fastbp bench`` runs a quick subset.

Workloads: 1-4 training side by side (adam-small, adam-mnist-like, lbfgs, adam-wide), 5
full-batch threads and memory, 6 scikit-learn's default MLPClassifier on 5000x784, 7
GridSearchCV with n_jobs 1 and 2, 8 fixed cost per fit and the first fit, 9 cores used
under threadpool_limits, 10 n_jobs=2 against 1 next to a busy core.

Usage: python benchmarks/suite.py [--quick] [--rounds N] [--workloads 1,2,6,7]
"""
import argparse
import json
import os

from fastbp import _bench


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--workloads", default=None, help="comma-separated, e.g. 1,3,5")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    chosen = [int(k) for k in args.workloads.split(",")] if args.workloads else None
    report = _bench.run(quick=args.quick, rounds=args.rounds, workloads=chosen,
                        with_torch=not args.no_torch)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    table = _bench.markdown(report)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(table + "\n")
    _bench.plot(report, os.path.join(args.out, "speedups.png"))
    print(table)


if __name__ == "__main__":
    main()
