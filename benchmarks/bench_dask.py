"""Per-evaluation overhead of Dask training against the local path, on this machine.

One evaluation = loss and gradient at one theta (what L-BFGS asks for per iteration,
about). Local: ``LocalObjective`` with fastbp's threads on every core. Dask: a
``LocalCluster`` of 2 worker processes x 1 thread on the same cores, the rows in one
chunk per worker, through ``DaskObjective`` (scatter theta, one task per chunk, exact
sums back, merge and finish on the driver). Rounds interleave the two; medians reported,
with the bytes that cross the network per evaluation.

Usage: python benchmarks/bench_dask.py [--rounds 15]
"""
import argparse
import time

import numpy as np

import fastbp
from fastbp import _core
from fastbp._objective import LocalObjective
from fastbp import distributed as fdist
from fastbp.distributed import DaskObjective


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    import dask.array as da
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(0)
    cases = [(2_000, (64,)), (200_000, (64,)), (200_000, (256, 256))]
    print("| rows | net | params | local ms | Dask ms | overhead ms | Dask / local | "
          "bytes out / in per evaluation |")
    print("|---|---|---|---|---|---|---|---|")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        for n, hidden in cases:
            X = rng.normal(size=(n, 64))
            Y = np.eye(10)[rng.integers(0, 10, n)]
            net = fastbp.Network([64, *hidden, 10], activation="relu", output="softmax")
            theta = net.init_params(random_state=0)
            grad = np.empty(net.n_params)
            local = LocalObjective(net, net.prepare(X, Y), 1e-4)
            chunk = -(-n // 2)
            remote = DaskObjective(client, net, da.from_array(X, chunks=(chunk, 64)),
                                   da.from_array(Y, chunks=(chunk, 10)), None, 1e-4)
            times = {"local": [], "dask": []}
            for r in range(args.rounds + 1):
                theta[0] += 1e-9  # a new point every round: theta is scattered again
                for name, obj in (("local", local), ("dask", remote)):
                    t0 = time.perf_counter()
                    with obj.blas_guard():
                        obj.loss_grad(theta, grad)
                    if r:  # round 0 warms up (and builds the workers' chunks)
                        times[name].append(time.perf_counter() - t0)
            loc, dsk = (1e3 * float(np.median(times[k])) for k in ("local", "dask"))
            out_bytes = 8 * net.n_params * remote.n_chunks  # theta to each worker
            in_bytes = (8 * _core.accumulator_size(net.n_params)
                        * min(remote.n_chunks, fdist.TREE_FANIN))
            print(f"| {n:,} | {'-'.join(map(str, [64, *hidden, 10]))} | {net.n_params:,} | "
                  f"{loc:.1f} | {dsk:.1f} | {dsk - loc:.1f} | {dsk / loc:.2f} | "
                  f"{out_bytes / 1e3:.0f} kB / {in_bytes / 1e3:.0f} kB |")
            remote.close()


if __name__ == "__main__":
    main()
