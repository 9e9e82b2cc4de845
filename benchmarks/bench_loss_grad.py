"""One full-batch ``Network.loss_grad`` against the GEMMs it contains, side by side.

The floor is ``_core.gemm_only``: exactly the GEMM calls that ``loss_grad`` makes (same
shapes, blocks, threads and buffers), and nothing else. Both run with BLAS
single-threaded and fastbp's threads on the cores, as ``loss_grad`` always does. The ratio is the cost of everything
that is not a GEMM: bias + activation, the output loss and delta, derivative passes,
intercept sums, the L2 term and the Python call. Rounds are interleaved; medians reported.

Usage: python benchmarks/bench_loss_grad.py [--rounds 31] [--json out.json]
"""
import argparse
import json
import time

import numpy as np
from threadpoolctl import threadpool_info

import fastbp
from fastbp import _core
from fastbp._threads import single_threaded_blas


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--n-samples", type=int, default=20000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n, sizes = args.n_samples, [64, 64, 10]
    X = rng.normal(size=(n, sizes[0]))
    Y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], n)]
    net = fastbp.Network(sizes, activation="relu", output="softmax")
    theta = net.init_params(random_state=0)
    grad = np.empty(net.n_params)
    data = net.prepare(X, Y)
    key, bufs = net._acquire(n, True)  # the same buffer shapes loss_grad uses
    block, threads = bufs["block"], bufs["threads"]
    work, tgrad = bufs["work"].copy(), bufs["tgrad"].copy()
    net._release(key, bufs)

    def run_loss_grad():
        net.loss_grad(theta, X, Y, alpha=1e-4, out=grad)

    def run_prepared():
        net._loss_grad(theta, data, 1e-4, grad)

    def run_gemms():
        with single_threaded_blas():
            _core.gemm_only(theta, X, net._sizes, net._w_off, work, tgrad, block,
                            threads)

    cases = {"gemm_only": run_gemms, "loss_grad (prepared)": run_prepared,
             "Network.loss_grad": run_loss_grad}
    times = {k: [] for k in cases}
    for f in cases.values():  # warm up
        f()
    for _ in range(args.rounds):
        for name, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    flops = 2 * n * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) * 3
    flops -= 2 * n * sizes[0] * sizes[1]  # no Delta_0 = Delta_1 W_1^T for the input layer
    print(f"loss_grad on {n}x{sizes[0]} float64, net {sizes} relu/softmax, "
          f"block {block}, {threads} threads, median of {args.rounds} interleaved rounds")
    print(f"BLAS: {[(i['internal_api'], i['num_threads']) for i in threadpool_info()]}")
    print(f"{'what':24s} {'ms':>8s} {'GFLOP/s':>8s} {'x gemm':>7s}")
    for k, v in med.items():
        print(f"{k:24s} {1e3 * v:8.3f} {flops / v / 1e9:8.2f} {v / med['gemm_only']:7.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"median_seconds": med, "flops": flops, "n_samples": n,
                       "sizes": sizes, "block": block, "threads": threads}, fh, indent=2)


if __name__ == "__main__":
    main()
