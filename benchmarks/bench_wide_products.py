"""adam-wide against its own products: how much of the sgemm peak is left to reach.

The suite's adam-wide workload (8192 x 1024 float32, 1024-2048-2048-10, Adam, batch
1024, one epoch) is held to a share of the machine's sgemm peak. This script measures,
interleaved in one process, (a) the products of that epoch alone, called through SciPy's
BLAS with all of its threads on Fortran-ordered operands of the same shapes (per
minibatch: the three forward products, the weight gradient and the delta of the two
layers above the first, the first layer's weight gradient), and (b) a whole fastbp fit
of the workload. Both are reported as GFLOP/s and as a share of the peak measured in the
same process (``fastbp._bench.gemm_peak``), counting the same flops as the suite. The
products' share bounds what any fit calling this BLAS can reach.

Usage: python benchmarks/bench_wide_products.py [--rounds 7] [--json out.json]
"""
import argparse
import json
import time
import warnings

import numpy as np
from scipy.linalg import blas
from sklearn.exceptions import ConvergenceWarning

import fastbp
from fastbp import _bench
from fastbp._threads import flops_per_sample

N, D, H, K, BATCH = 8192, 1024, 2048, 10, 1024


def _operands(rng):
    def f32(*shape):
        return np.asfortranarray(rng.standard_normal(shape, dtype=np.float32))
    return dict(X=f32(BATCH, D), W1=f32(D, H), W2=f32(H, H), W3=f32(H, K),
                A1=f32(BATCH, H), A2=f32(BATCH, H), D1=f32(BATCH, H), D2=f32(BATCH, H),
                D3=f32(BATCH, K))


def _minibatch_products(o):
    g = blas.sgemm
    g(1.0, o["X"], o["W1"]), g(1.0, o["A1"], o["W2"]), g(1.0, o["A2"], o["W3"])
    g(1.0, o["A2"], o["D3"], trans_a=1), g(1.0, o["D3"], o["W3"], trans_b=1)
    g(1.0, o["A1"], o["D2"], trans_a=1), g(1.0, o["D2"], o["W2"], trans_b=1)
    g(1.0, o["X"], o["D1"], trans_a=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    X, y = _bench._data(N, D, K, np.float32)
    operands = _operands(np.random.default_rng(0))
    # The suite's flop count of one epoch: forward, and backward without the input delta.
    flops = N * flops_per_sample([D, H, H, K])

    def products():
        t0 = time.perf_counter()
        for _ in range(N // BATCH):
            _minibatch_products(operands)
        return time.perf_counter() - t0

    def fit():
        clf = fastbp.MLPClassifier((H, H), batch_size=BATCH, max_iter=1, random_state=0)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
        return time.perf_counter() - t0

    products(), fit()   # warm both
    times = {"products": [], "fit": []}
    for r in range(args.rounds):
        times["products"].append(products())
        times["fit"].append(fit())
        print(f"round {r + 1}: products {times['products'][-1]:.3f} s, "
              f"fit {times['fit'][-1]:.3f} s", flush=True)
    peak = _bench.gemm_peak(np.float32)
    report = {"peak_gflops": peak, "flops": flops}
    for name, ts in times.items():
        sec = float(np.median(ts))
        report[name] = {"seconds": sec, "gflops": flops / sec / 1e9,
                        "share_of_peak": flops / sec / 1e9 / peak}
        print(f"{name:9s} {sec:.3f} s  {flops / sec / 1e9:6.1f} GFLOP/s  "
              f"{flops / sec / 1e9 / peak:.1%} of the {peak:.1f} GFLOP/s sgemm peak")
    report["fit_over_products"] = report["fit"]["seconds"] / report["products"]["seconds"]
    print(f"fit / products: {report['fit_over_products']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
