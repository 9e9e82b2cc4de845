"""Cost of the curvature products relative to one loss_grad, side by side.

Setup (issue 6): 8192x256 float64 input, a 256-512-256-10 tanh/softmax net. "cached" is
a further product at the same theta (the forward activations are reused, as Newton-CG
and CG do); "cold" includes the forward pass. Medians of interleaved rounds.

Usage: python benchmarks/bench_curvature.py [--rounds 7]
"""
import argparse
import time

import numpy as np

import fastbp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = 8192
    X = rng.normal(size=(n, 256))
    Y = np.eye(10)[rng.integers(0, 10, n)]
    net = fastbp.Network([256, 512, 256, 10], "tanh", "softmax")
    theta = net.init_params(random_state=0)
    d = net.prepare(X, Y)
    grad, out = np.empty(net.n_params), np.empty(net.n_params)
    v = rng.normal(size=net.n_params)

    def cold(exact):
        d.acts_theta = None
        net._curvature(theta, v, d, 1e-4, exact, out)

    cases = {
        "loss_grad": lambda: net._loss_grad(theta, d, 1e-4, grad),
        "Gv cached": lambda: net._curvature(theta, v, d, 1e-4, False, out),
        "Hv cached": lambda: net._curvature(theta, v, d, 1e-4, True, out),
        "Gv cold": lambda: cold(False),
        "Hv cold": lambda: cold(True),
    }
    times = {k: [] for k in cases}
    for f in cases.values():
        f()
    for _ in range(args.rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"8192x256 float64, 256-512-256-10 tanh/softmax, {net._threads(8)} threads, "
          f"median of {args.rounds} rounds (targets: Gv <= 1.5x, Hv <= 2.3x)")
    for k, t in med.items():
        print(f"{k:10s} {1e3 * t:8.1f} ms {t / med['loss_grad']:6.2f}x")


if __name__ == "__main__":
    main()
