"""Side-by-side training benchmarks: fastbp, scikit-learn's MLP and PyTorch (CPU, eager).

Every workload runs each library on the same data, architecture, solver and number of
optimizer steps, interleaved in one process, for several rounds; the report gives median
seconds, speed-ups (peer time / fastbp time, from the same run), the training accuracy
reached, achieved GFLOP/s and the fraction of the machine's GEMM peak, measured in the same
run with a large SciPy BLAS GEMM on all cores. PyTorch is optional: without it its
columns are empty.

``fastbp bench`` runs the quick subset; ``python benchmarks/suite.py`` runs everything and
writes JSON, a Markdown table and a PNG plot.
"""
import gc
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np

__all__ = ["WORKLOADS", "run", "markdown", "gemm_peak"]


def _flops_per_sample(sizes):
    """Multiply-adds x 2 of one forward + backward pass for one sample: forward and dW
    for every layer, and dX for every layer but the first."""
    mm = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 2 * (3 * sum(mm) - mm[0])


def _data(n, d, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * (3.0 / np.sqrt(d)) * 2
    y = rng.integers(0, k, n)
    X = (centers[y] + rng.normal(size=(n, d))).astype(dtype)
    return X, y


def gemm_peak(dtype=np.float32, n=2048, rounds=3):
    """GFLOP/s of a large square GEMM through SciPy's BLAS on all cores (best of rounds)."""
    from scipy.linalg import blas
    a = np.asfortranarray(np.random.default_rng(0).random((n, n), dtype=dtype))
    f = blas.sgemm if dtype == np.float32 else blas.dgemm
    f(1.0, a, a)
    best = np.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        f(1.0, a, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# Runners: each returns (seconds, training accuracy, optimizer steps) for one fit.

def _fastbp_fit(w, X, y):
    import fastbp
    from fastbp._network import Network
    clf = fastbp.MLPClassifier(hidden_layer_sizes=w["hidden"], solver=w["solver"],
                               batch_size=w.get("batch", "auto"), max_iter=w["iters"],
                               tol=0.0, n_iter_no_change=10**9, random_state=0)
    # Count full-batch evaluations (L-BFGS), for the achieved GFLOP/s.
    evals = [0]
    original = Network._loss_grad

    def counted(self, *args, **kwargs):
        evals[0] += 1
        return original(self, *args, **kwargs)
    Network._loss_grad = counted
    try:
        t0 = time.perf_counter()
        clf.fit(X, y)
        sec = time.perf_counter() - t0
    finally:
        Network._loss_grad = original
    w.setdefault("_evals", {})["fastbp"] = evals[0]
    return sec, float(clf.score(X, y)), clf.n_iter_


def _sklearn_fit(w, X, y):
    from sklearn.neural_network import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=w["hidden"], solver=w["solver"],
                        batch_size=w.get("batch", "auto"), max_iter=w["iters"], tol=0.0,
                        n_iter_no_change=10**9, random_state=0)
    t0 = time.perf_counter()
    clf.fit(X, y)
    sec = time.perf_counter() - t0
    return sec, float(clf.score(X, y)), clf.n_iter_


def _torch_fit(w, X, y):
    import torch
    torch.manual_seed(0)
    dt = torch.float32 if X.dtype == np.float32 else torch.float64
    Xt = torch.from_numpy(X).to(dt)
    yt = torch.from_numpy(y.astype(np.int64))
    sizes = [X.shape[1], *w["hidden"], int(y.max()) + 1]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(dt)
    lossf = torch.nn.CrossEntropyLoss()
    n = X.shape[0]
    t0 = time.perf_counter()
    if w["solver"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        bs = w["batch"]
        for _ in range(w["iters"]):
            perm = torch.randperm(n)
            for s in range(0, n, bs):
                idx = perm[s:s + bs]
                opt.zero_grad()
                loss = lossf(model(Xt[idx]), yt[idx])
                loss.backward()
                opt.step()
        steps = w["iters"]
    else:
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=w["iters"],
                                history_size=10, tolerance_grad=0, tolerance_change=0,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = lossf(model(Xt), yt)
            loss.backward()
            return loss
        opt.step(closure)
        steps = opt.state[opt._params[0]]["n_iter"]
        w.setdefault("_evals", {})["pytorch"] = opt.state[opt._params[0]]["func_evals"]
    sec = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(Xt).argmax(1) == yt).double().mean())
    return sec, acc, steps


def _have_torch():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


WORKLOADS = {
    1: dict(name="adam-small", n=20000, d=64, k=10, hidden=(128,), solver="adam", batch=32,
            dtype=np.float32, iters=3, target="fastbp >= 10x scikit-learn, >= 40x PyTorch"),
    2: dict(name="adam-mnist-like", n=30000, d=784, k=10, hidden=(256, 128), solver="adam",
            batch=128, dtype=np.float32, iters=1,
            target=">= 2x the faster of scikit-learn and PyTorch"),
    3: dict(name="lbfgs", n=20000, d=64, k=10, hidden=(64,), solver="lbfgs",
            dtype=np.float64, iters=100, target=">= 4x scikit-learn"),
    4: dict(name="adam-wide", n=8192, d=1024, k=10, hidden=(2048, 2048), solver="adam",
            batch=1024, dtype=np.float32, iters=1, target=">= 85% of the sgemm peak"),
}

QUICK = {1: dict(iters=1), 3: dict(iters=30)}


def _run_workload(w, rounds, peers, settle, log):
    X, y = _data(w["n"], w["d"], w["k"], w["dtype"])
    runners = {"fastbp": _fastbp_fit, "scikit-learn": _sklearn_fit}
    if "pytorch" in peers:
        runners["pytorch"] = _torch_fit
    times = {k: [] for k in runners}
    acc, steps = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(rounds):
            for name, fit in runners.items():
                gc.collect()
                time.sleep(settle)  # let other libraries' spinning BLAS threads park
                sec, a, st = fit(w, X, y)
                times[name].append(sec)
                acc[name], steps[name] = a, st
                log(f"  round {r + 1}/{rounds} {name:12s} {sec:8.3f} s  acc {a:.4f}")
    med = {k: float(np.median(v)) for k, v in times.items()}
    sizes = [w["d"], *w["hidden"], w["k"]]
    res = {"workload": w["name"], "shape": f"{w['n']}x{w['d']}", "hidden": list(w["hidden"]),
           "solver": w["solver"], "dtype": np.dtype(w["dtype"]).name,
           "batch": w.get("batch"), "iters": w["iters"], "seconds": med,
           "accuracy": acc, "steps": {k: int(v) for k, v in steps.items()},
           "target": w["target"]}
    res["speedup"] = {k: med[k] / med["fastbp"] for k in med if k != "fastbp"}
    if w["solver"] != "lbfgs":
        flops = _flops_per_sample(sizes) * w["n"] * w["iters"]
        res["gflops"] = {k: flops / v / 1e9 for k, v in med.items()}
    else:  # full-batch evaluations counted where the library exposes them
        evals = w.get("_evals", {})
        res["evaluations"] = dict(evals)
        res["gflops"] = {k: _flops_per_sample(sizes) * w["n"] * e / med[k] / 1e9
                         for k, e in evals.items()}
    return res


def _loss_grad_speedup(n, rounds, log):
    """Workload 5a: full-batch loss_grad, n_jobs=1 against n_jobs=2, same process."""
    import fastbp
    sizes = [64, 256, 256, 10]
    X, y = _data(n, 64, 10, np.float64)
    Y = np.eye(10)[y]
    nets = {j: fastbp.Network(sizes, dtype=np.float64, n_jobs=j) for j in (1, 2)}
    theta = nets[1].init_params(random_state=0)
    times = {1: [], 2: []}
    for r in range(rounds):
        for j, net in nets.items():
            t0 = time.perf_counter()
            net.loss_grad(theta, X, Y, alpha=1e-4)
            times[j].append(time.perf_counter() - t0)
    med = {j: float(np.median(v)) for j, v in times.items()}
    flops = _flops_per_sample(sizes) * n
    log(f"  loss_grad {n}x64: n_jobs=1 {med[1]:.3f} s, n_jobs=2 {med[2]:.3f} s")
    return {"workload": "loss_grad-threads", "shape": f"{n}x64", "hidden": [256, 256],
            "dtype": "float64", "seconds": {"n_jobs=1": med[1], "n_jobs=2": med[2]},
            "speedup": {"n_jobs=2 vs 1": med[1] / med[2]},
            "gflops": {"n_jobs=1": flops / med[1] / 1e9, "n_jobs=2": flops / med[2] / 1e9},
            "target": ">= 1.8x from 1 to 2 threads"}


_RSS_SCRIPT = r"""
import resource, sys, numpy as np, fastbp
n = int(sys.argv[1])
rng = np.random.default_rng(0)
X = rng.normal(size=(n, 64))
Y = np.eye(10)[rng.integers(0, 10, n)]
net = fastbp.Network([64, 256, 256, 10], dtype=np.float64)
theta = net.init_params(random_state=0)
net.loss_grad(theta, X[:4096], Y[:4096])       # import and warm-up costs before the mark
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
net.loss_grad(theta, X, Y, alpha=1e-4)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before * 1024, after * 1024, X.nbytes, Y.nbytes)
"""


def _peak_rss(n, log):
    """Workload 5b: peak resident memory of a process doing one loss_grad on n rows."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(n)], capture_output=True,
                         text=True, check=True).stdout.split()
    before, after, xbytes, ybytes = map(int, out)
    log(f"  peak RSS at {n} rows: {after / 2**20:.0f} MiB (X {xbytes / 2**20:.0f} MiB, "
        f"growth during loss_grad {(after - before) / 2**20:.0f} MiB)")
    return {"workload": "loss_grad-memory", "shape": f"{n}x64", "peak_rss_bytes": after,
            "rss_before_bytes": before, "x_bytes": xbytes, "y_bytes": ybytes,
            "peak_rss_over_x": after / xbytes, "growth_over_x": (after - before) / xbytes,
            "target": "peak RSS < 1.5x the size of X"}


def run(quick=False, rounds=None, settle=0.5, log=print, workloads=None, with_torch=True):
    """Run the suite and return a dict of results (see the module docstring)."""
    import fastbp
    import scipy
    import sklearn
    from threadpoolctl import threadpool_info

    peers = ["scikit-learn"] + (["pytorch"] if with_torch and _have_torch() else [])
    rounds = rounds or (2 if quick else 3)
    chosen = workloads or ([1, 3, 5] if quick else [1, 2, 3, 4, 5])
    log("measuring the GEMM peak ...")
    peak = {"sgemm": gemm_peak(np.float32), "dgemm": gemm_peak(np.float64)}
    log(f"  sgemm {peak['sgemm']:.1f} GFLOP/s, dgemm {peak['dgemm']:.1f} GFLOP/s")
    results = []
    for k in chosen:
        if k == 5:
            log("workload 5: full-batch loss_grad, threads and memory")
            results.append(_loss_grad_speedup(50000 if quick else 200000,
                                              3 if quick else 5, log))
            if not quick:
                results.append(_peak_rss(2_000_000, log))
            continue
        w = dict(WORKLOADS[k], **(QUICK.get(k, {}) if quick else {}))
        w.pop("_evals", None)
        log(f"workload {k}: {w['name']} ({w['n']}x{w['d']}, {w['hidden']}, {w['solver']})")
        res = _run_workload(w, rounds, peers, settle, log)
        peak_key = "sgemm" if w["dtype"] == np.float32 else "dgemm"
        if "gflops" in res:
            res["peak_fraction"] = {k2: v / peak[peak_key] for k2, v in res["gflops"].items()}
        results.append(res)
    versions = {"fastbp": fastbp.__version__, "numpy": np.__version__,
                "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}
    if "pytorch" in peers:
        import torch
        versions["torch"] = torch.__version__
        versions["torch_threads"] = torch.get_num_threads()
    return {"date": time.strftime("%Y-%m-%d"), "machine": _machine(),
            "versions": versions, "blas": [(i["internal_api"], i["num_threads"])
                                           for i in threadpool_info()],
            "config": fastbp.show_config(mode="dicts"),
            "gemm_peak_gflops": peak, "quick": quick, "rounds": rounds,
            "results": results}


def _machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cpus} CPUs, {platform.system()} {platform.machine()}"


def markdown(report):
    """The results as a Markdown table."""
    lines = [f"Measured {report['date']} on {report['machine']}; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
             + f"; GEMM peak sgemm {report['gemm_peak_gflops']['sgemm']:.1f}, dgemm "
             f"{report['gemm_peak_gflops']['dgemm']:.1f} GFLOP/s"
             + (f"; fastbp kernels {report['config']['kernels']['variant']}"
                if "config" in report else "") + ".", "",
             "| workload | fastbp s | scikit-learn s | PyTorch s | speed-up vs sklearn | "
             "speed-up vs PyTorch | fastbp GFLOP/s (% peak) | accuracy fastbp / sklearn / "
             "PyTorch | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if r["workload"] == "loss_grad-memory":
            lines.append(f"| {r['workload']} {r['shape']} | | | | | | | | peak RSS "
                         f"{r['peak_rss_over_x']:.2f}x X ({r['target']}) |")
            continue
        if r["workload"] == "loss_grad-threads":
            s = r["seconds"]
            lines.append(f"| {r['workload']} {r['shape']} | n_jobs=1 {s['n_jobs=1']:.3f} / "
                         f"n_jobs=2 {s['n_jobs=2']:.3f} | | | | | "
                         f"{r['gflops']['n_jobs=2']:.1f} | | "
                         f"{r['speedup']['n_jobs=2 vs 1']:.2f}x ({r['target']}) |")
            continue
        s, sp, acc = r["seconds"], r["speedup"], r["accuracy"]
        g = r.get("gflops", {}).get("fastbp")
        pf = r.get("peak_fraction", {}).get("fastbp")
        gtxt = f"{g:.1f} ({100 * pf:.0f}%)" if g is not None else ""
        has_pt = "pytorch" in s
        pt_s = f"{s['pytorch']:.3f}" if has_pt else ""
        pt_sp = f"{sp['pytorch']:.1f}x" if has_pt else ""
        pt_acc = f" / {acc['pytorch']:.3f}" if has_pt else ""
        lines.append(
            f"| {r['workload']} {r['shape']} {tuple(r['hidden'])} {r['solver']} "
            f"{r['dtype']} | {s['fastbp']:.3f} | {s['scikit-learn']:.3f} | {pt_s} | "
            f"{sp['scikit-learn']:.1f}x | {pt_sp} | {gtxt} | {acc['fastbp']:.3f} / "
            f"{acc['scikit-learn']:.3f}{pt_acc} | {r['target']} |")
    return "\n".join(lines)


def plot(report, path):
    """A bar chart of the speed-ups, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in report["results"] if r["workload"] not in ("loss_grad-memory",)]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, x = [], 0
    for r in rows:
        for peer, v in r["speedup"].items():
            ax.bar(x, v, color={"scikit-learn": "tab:blue", "pytorch": "tab:orange"}.get(
                peer, "tab:green"))
            labels.append(f"{r['workload']}\nvs {peer}")
            x += 1
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speed-up of fastbp (x)")
    ax.set_title(f"fastbp speed-ups, {report['date']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main_quick(log=print):
    """``fastbp bench``: the quick subset, printed as a table under the configuration
    (kernel variant, BLAS, threads) it ran with."""
    import fastbp
    fastbp.show_config()
    print()
    report = run(quick=True, log=log)
    print(markdown(report))
    return report
