"""The portable, dispatched build against a ``-march=native`` build, side by side.

Both are built here from the same sources with the same compiler: the default build
(kernels per ISA, the best chosen at import) and ``FASTBP_NATIVE=1`` (one variant,
``-march=native``). Each round runs one fresh process per build, in alternating order,
and each process times, after a warm-up:

- W1: workload 1 of the suite (20000x64, (128,), Adam, batch 32, float32, 3 epochs),
  with ``n_jobs=1`` and with two threads;
- ``Network.loss_grad`` on 20000x64, (64,) relu/softmax, float32 and float64.

Per round the ratio dispatched / native is taken, and the medians of those paired ratios
are reported (below 1: the dispatched build is faster). The target is within 5%.

Usage: python benchmarks/bench_build.py [--rounds 9] [--build-dir DIR] [--json out.json]
(``--build-dir`` keeps the two builds for later runs.)
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, warnings
import numpy as np
warnings.simplefilter("ignore")  # 3 epochs do not converge, by design
import fastbp
from fastbp import _bench, _core

def best_of(f, k):
    f()
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))

w = _bench.WORKLOADS[1]
X, y = _bench._data(w["n"], w["d"], w["k"], w["dtype"])
out = {"variant": _core.VARIANT, "isa": _core.build_info()["isa"]}
for n_jobs in (1, 2):
    def fit():
        fastbp.MLPClassifier(w["hidden"], solver="adam", batch_size=w["batch"],
                             max_iter=w["iters"], tol=0.0, n_iter_no_change=10**9,
                             random_state=0, n_jobs=n_jobs).fit(X, y)
    out[f"W1 n_jobs={n_jobs}"] = best_of(fit, 3)
Y = np.eye(10)[y]
for dtype in (np.float32, np.float64):
    net = fastbp.Network([64, 64, 10], activation="relu", output="softmax", dtype=dtype)
    theta = net.init_params(0)
    Xd, Yd = X.astype(dtype), Y.astype(dtype)
    grad = np.empty_like(theta)
    out[f"loss_grad {np.dtype(dtype).name}"] = best_of(
        lambda: net.loss_grad(theta, Xd, Yd, alpha=1e-4, out=grad), 21)
print(json.dumps(out))
"""


def build(dest, native):
    """Build the extension in a copy of the sources at dest (skipped if already built)."""
    dest = pathlib.Path(dest)
    if list((dest / "fastbp").glob("_core.*")) and any(
            p.suffix in (".so", ".pyd") for p in (dest / "fastbp").iterdir()):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "*.so", "*.pyd", "*.c", ".git", "__pycache__", "tests",
        "benchmarks"))
    env = dict(os.environ, FASTBP_NATIVE="1" if native else "0")
    env.pop("FASTBP_DEBUG", None)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                   env=env, check=True, capture_output=True)
    return dest


def measure(src):
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("FASTBP_KERNELS", None)
    run = subprocess.run([sys.executable, "-c", WORKER], env=env, cwd=src,
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    top = pathlib.Path(args.build_dir or tempfile.mkdtemp(prefix="fastbp-builds-"))
    builds = {"dispatched": build(top / "dispatched", native=False),
              "native": build(top / "native", native=True)}
    runs = {k: [] for k in builds}
    for r in range(args.rounds):
        order = list(builds) if r % 2 == 0 else list(builds)[::-1]
        for name in order:
            runs[name].append(measure(builds[name]))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{k} {runs['dispatched'][-1][k] / runs['native'][-1][k]:.3f}"
            for k in runs["native"][-1] if k not in ("variant", "isa")), flush=True)
    cases = [k for k in runs["native"][0] if k not in ("variant", "isa")]
    report = {"variants": {k: v[0]["variant"] + "/" + v[0]["isa"] for k, v in runs.items()},
              "rounds": args.rounds, "cases": {}}
    print(f"\ndispatched kernels: {report['variants']['dispatched']}; native: "
          f"{report['variants']['native']} (variant/compiled ISA); medians of "
          f"{args.rounds} interleaved rounds")
    print(f"{'case':22s} {'dispatched ms':>14s} {'native ms':>10s} {'ratio':>7s}")
    for c in cases:
        d = [x[c] for x in runs["dispatched"]]
        n = [x[c] for x in runs["native"]]
        ratio = float(np.median(np.array(d) / np.array(n)))
        report["cases"][c] = {"dispatched_s": float(np.median(d)),
                              "native_s": float(np.median(n)), "ratio": ratio}
        print(f"{c:22s} {1e3 * np.median(d):14.2f} {1e3 * np.median(n):10.2f} "
              f"{ratio:7.3f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
