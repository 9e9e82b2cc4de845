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

import scipy
import sklearn
from scipy.linalg import blas as scipy_blas
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from threadpoolctl import threadpool_info

from ._config import show_config
from ._estimators import MLPClassifier
from ._network import Network
from ._stochastic import StochasticOptimizer
from ._threads import flops_per_sample as _flops_per_sample
from ._version import __version__

__all__ = ["WORKLOADS", "run", "markdown", "gemm_peak"]


def _data(n, d, k, dtype, seed=0, spread=2.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * (3.0 / np.sqrt(d)) * spread
    y = rng.integers(0, k, n)
    X = (centers[y] + rng.normal(size=(n, d))).astype(dtype)
    return X, y


def gemm_peak(dtype=np.float32, n=2048, rounds=3):
    """GFLOP/s of a large square GEMM on all cores: the best of SciPy's BLAS and NumPy's
    (each process may bundle its own OpenBLAS, built for different kernels), best of
    ``rounds``."""
    rng = np.random.default_rng(0)
    a = np.asfortranarray(rng.random((n, n), dtype=dtype))
    b = np.ascontiguousarray(a)
    f = scipy_blas.sgemm if dtype == np.float32 else scipy_blas.dgemm
    best = np.inf
    for call in (lambda: f(1.0, a, a), lambda: np.matmul(b, b)):
        call()
        for _ in range(rounds):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# Runners: each returns (seconds, training accuracy, optimizer steps) for one fit.

def _fastbp_fit(w, X, y):
    clf = MLPClassifier(hidden_layer_sizes=w["hidden"], solver=w["solver"],
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
    clf = SkMLPClassifier(hidden_layer_sizes=w["hidden"], solver=w["solver"],
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
            dtype=np.float32, iters=3, target=">= 10x scikit-learn, >= 25x PyTorch"),
    2: dict(name="adam-mnist-like", n=30000, d=784, k=10, hidden=(256, 128), solver="adam",
            batch=128, dtype=np.float32, iters=1,
            target=">= 2x the faster of scikit-learn and PyTorch"),
    3: dict(name="lbfgs", n=20000, d=64, k=10, hidden=(64,), solver="lbfgs",
            dtype=np.float64, iters=100, target=">= 8x scikit-learn"),
    4: dict(name="adam-wide", n=8192, d=1024, k=10, hidden=(2048, 2048), solver="adam",
            batch=1024, dtype=np.float32, iters=1, target=">= 1.2x scikit-learn, >= 85% of the sgemm peak"),
}

QUICK = {1: dict(iters=1), 3: dict(iters=30)}


def _run_workload(w, rounds, peers, settle, log):
    X, y = _data(w["n"], w["d"], w["k"], w["dtype"])
    # In each round the peers run first, then fastbp: their thread pools are warm when
    # fastbp runs, as in a real program that uses NumPy (and PyTorch) too.
    runners = {"scikit-learn": _sklearn_fit}
    if "pytorch" in peers:
        runners["pytorch"] = _torch_fit
    runners["fastbp"] = _fastbp_fit
    times = {k: [] for k in runners}
    acc, steps = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(rounds):
            for name, fit in runners.items():
                gc.collect()
                _settle(settle)
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
    sizes = [64, 256, 256, 10]
    X, y = _data(n, 64, 10, np.float64)
    Y = np.eye(10)[y]
    nets = {j: Network(sizes, dtype=np.float64, n_jobs=j) for j in (1, 2)}
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


def _python(code, *args):
    """Run ``code`` in a fresh interpreter that imports this very fastbp (its package's
    parent directory first on the path and as the working directory, so that a source
    checkout without compiled kernels in the caller's directory is never picked up);
    return its standard output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                         text=True, cwd=root, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{run.stderr}")
    return run.stdout


def _settle(seconds):
    """Wait between runs with this core busy: other libraries' idle threads stop
    spinning meanwhile, but the core does not fall into a sleep state that the next run,
    if short, would pay to leave (0.5 s of sleep made a 35 ms fit 15% slower and twice
    as variable on the development machine)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _interleaved(cases, rounds, settle, log, label):
    """Run ``cases`` ({name: callable returning seconds}) in turn for ``rounds`` rounds;
    return the median seconds of each."""
    times = {k: [] for k in cases}
    for r in range(rounds):
        for name, case in cases.items():
            gc.collect()
            _settle(settle)
            times[name].append(case())
            log(f"  round {r + 1}/{rounds} {label} {name:28s} {times[name][-1]:8.3f} s")
    return {k: float(np.median(v)) for k, v in times.items()}


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _grid_data():
    """The digits, four times over with a little noise: 7188 x 64."""
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    X = np.vstack([X / 16.0 + rng.normal(scale=0.05, size=X.shape) for _ in range(4)])
    return X, np.tile(y, 4)


def _gridsearch(rounds, settle, log):
    """GridSearchCV over each library's MLPClassifier, n_jobs=1 and 2 (12 fits each)."""
    X, y = _grid_data()
    grid = {"hidden_layer_sizes": [(32,), (64,)], "alpha": [1e-4, 1e-2]}
    params = dict(max_iter=30, random_state=0)

    def search(est, n_jobs):
        return lambda: _timed(lambda: GridSearchCV(est(**params), grid, cv=3,
                                                   n_jobs=n_jobs).fit(X, y))
    # Start the workers once, as a program that searches more than once has them: worker
    # start-up (importing NumPy, SciPy, scikit-learn) is not what this row measures.
    old = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore"  # for the workers' ConvergenceWarnings
    try:
        for est in (SkMLPClassifier, MLPClassifier):
            GridSearchCV(est(max_iter=1), {"alpha": [1e-4, 1e-3]}, cv=2, n_jobs=2).fit(
                X[:400], y[:400])
        med = _interleaved({"scikit-learn n_jobs=1": search(SkMLPClassifier, 1),
                            "scikit-learn n_jobs=2": search(SkMLPClassifier, 2),
                            "fastbp n_jobs=1": search(MLPClassifier, 1),
                            "fastbp n_jobs=2": search(MLPClassifier, 2)},
                           rounds, settle, log, "GridSearchCV")
    finally:
        if old is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = old
    return {"workload": "gridsearch", "shape": "7188x64", "hidden": [32, 64],
            "seconds": med,
            "speedup": {"fastbp n_jobs=2 vs n_jobs=1":
                        med["fastbp n_jobs=1"] / med["fastbp n_jobs=2"],
                        "scikit-learn": med["scikit-learn n_jobs=2"] / med["fastbp n_jobs=2"]},
            "target": "n_jobs=2 >= 1.25x n_jobs=1, >= 2x scikit-learn n_jobs=2"}


def _sklearn_defaults(rounds, settle, log, with_torch=False):
    """scikit-learn's default MLPClassifier settings on 5000 x 784 (float64), to
    convergence; test accuracy on 1250 held-out rows."""
    X, y = _data(6250, 784, 10, np.float64, seed=1, spread=1.0)
    Xtr, ytr, Xte, yte = X[:5000], y[:5000], X[5000:], y[5000:]
    acc, epochs = {}, {}

    def run(name, est):
        def case():
            clf = est(random_state=0)
            sec = _timed(lambda: clf.fit(Xtr, ytr))
            acc[name], epochs[name] = float(clf.score(Xte, yte)), int(clf.n_iter_)
            return sec
        return case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        med = _interleaved({"scikit-learn": run("scikit-learn", SkMLPClassifier),
                            "fastbp": run("fastbp", MLPClassifier)},
                           rounds, settle, log, "defaults")
    return {"workload": "sklearn-defaults", "shape": "5000x784", "hidden": [100],
            "solver": "adam", "dtype": "float64", "batch": 200, "seconds": med,
            "speedup": {"scikit-learn": med["scikit-learn"] / med["fastbp"]},
            "accuracy": acc, "epochs": epochs,
            "target": ">= 3x scikit-learn at equal test accuracy"}


def _fixed_cost(rounds, settle, log):
    """A fit's fixed cost (validation, allocation, thread start, checks) against one
    epoch, measured inside the same fits: each fit's wall time less the time spent in its
    epochs (the compiled epoch calls, timed around each call); medians over rounds of
    3-epoch fits."""
    original = StochasticOptimizer.epoch
    spent = []

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)
    rows = []
    StochasticOptimizer.epoch = timed
    try:
        for k in (1, 2):
            w = WORKLOADS[k]
            X, y = _data(w["n"], w["d"], w["k"], w["dtype"])
            fixed, epochs = [], []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for r in range(rounds):
                    clf = MLPClassifier(
                        hidden_layer_sizes=w["hidden"], batch_size=w["batch"], max_iter=3,
                        tol=0.0, n_iter_no_change=10**9, random_state=0)
                    gc.collect()
                    _settle(settle)
                    spent.clear()
                    total = _timed(lambda: clf.fit(X, y))
                    fixed.append(total - sum(spent))
                    epochs.extend(spent)
            row = {"workload": w["name"], "epoch_seconds": float(np.median(epochs)),
                   "fixed_seconds": float(np.median(fixed))}
            row["fixed_over_epoch"] = row["fixed_seconds"] / row["epoch_seconds"]
            log(f"  {w['name']}: fixed {1000 * row['fixed_seconds']:.1f} ms, epoch "
                f"{1000 * row['epoch_seconds']:.1f} ms")
            rows.append(row)
    finally:
        StochasticOptimizer.epoch = original
    first = _first_fit(log)
    return {"workload": "fixed-cost", "rows": rows, "first_fit": first,
            "target": "fixed cost small next to one epoch; first fit <= 1.2x a later one"}


_FIRST_SCRIPT = r"""
import time, warnings, numpy as np, fastbp
from fastbp._bench import WORKLOADS, _data
warnings.simplefilter("ignore")
w = WORKLOADS[1]
X, y = _data(w["n"], w["d"], w["k"], w["dtype"])
ts = []
for _ in range(4):
    clf = fastbp.MLPClassifier(hidden_layer_sizes=w["hidden"], batch_size=w["batch"],
                               max_iter=w["iters"], tol=0.0, n_iter_no_change=10**9,
                               random_state=0)
    t0 = time.perf_counter()
    clf.fit(X, y)
    ts.append(time.perf_counter() - t0)
print(ts[0], float(np.median(ts[1:])))
"""


def _first_fit(log, processes=7):
    """The first fit in a fresh process (after ``import fastbp``) against later ones:
    median over processes of first / median(later three), on the adam-small workload."""
    ratios = []
    for _ in range(processes):
        out = _python(_FIRST_SCRIPT).split()
        first, later = map(float, out)
        ratios.append(first / later)
    ratio = float(np.median(ratios))
    log(f"  first fit / later fit: {ratio:.2f} (median of {processes} processes)")
    return {"ratio": ratio, "ratios": ratios}


_CORES_SCRIPT = r"""
import sys, time, warnings, numpy as np, fastbp
from threadpoolctl import threadpool_limits
from fastbp._bench import WORKLOADS, _data
warnings.simplefilter("ignore")
w = WORKLOADS[3]
X, y = _data(w["n"], w["d"], w["k"], w["dtype"])
def fit():
    clf = fastbp.MLPClassifier(hidden_layer_sizes=w["hidden"], solver="lbfgs", max_iter=60,
                               tol=0.0, random_state=0)
    c0, t0 = time.process_time(), time.perf_counter()
    clf.fit(X, y)
    return (time.process_time() - c0) / (time.perf_counter() - t0)
fit()
if sys.argv[1] == "limit":
    with threadpool_limits(1, user_api="openmp"):
        print(fit())
else:
    print(fit())
"""


def _cores_used(log):
    """Cores a full-batch fit keeps busy (process CPU time / wall time), with and without
    ``threadpool_limits(1, user_api="openmp")``; each in a fresh process."""
    used = {}
    for case in ("limit", "none"):
        out = _python(_CORES_SCRIPT, case)
        used[case] = float(out.split()[-1])
    log(f"  cores used by an L-BFGS fit: {used['none']:.2f}; under "
        f"threadpool_limits(1, 'openmp'): {used['limit']:.2f}")
    return {"workload": "openmp-limit", "cores_used": used,
            "target": "one core under the limit, all of them without"}


def _contention(rounds, settle, log):
    """n_jobs=2 against n_jobs=1 while another process keeps one core busy."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        res = {}
        for k in (1, 2):
            w = WORKLOADS[k]
            X, y = _data(w["n"], w["d"], w["k"], w["dtype"])

            def fit(n_jobs):
                clf = MLPClassifier(hidden_layer_sizes=w["hidden"], n_jobs=n_jobs,
                                    batch_size=w["batch"], max_iter=w["iters"],
                                    tol=0.0, n_iter_no_change=10**9, random_state=0)
                return lambda: _timed(lambda: clf.fit(X, y))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                med = _interleaved({"n_jobs=1": fit(1), "n_jobs=2": fit(2)}, rounds, settle,
                                   log, w["name"] + " (busy core)")
            res[w["name"]] = {"seconds": med, "n_jobs=2 / n_jobs=1":
                              med["n_jobs=2"] / med["n_jobs=1"]}
    finally:
        hog.kill()
        hog.wait()
    return {"workload": "contention", "cases": res,
            "target": "n_jobs=2 not slower than n_jobs=1 beyond noise"}


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
    out = _python(_RSS_SCRIPT, str(n)).split()
    before, after, xbytes, ybytes = map(int, out)
    log(f"  peak RSS at {n} rows: {after / 2**20:.0f} MiB (X {xbytes / 2**20:.0f} MiB, "
        f"growth during loss_grad {(after - before) / 2**20:.0f} MiB)")
    return {"workload": "loss_grad-memory", "shape": f"{n}x64", "peak_rss_bytes": after,
            "rss_before_bytes": before, "x_bytes": xbytes, "y_bytes": ybytes,
            "peak_rss_over_x": after / xbytes, "growth_over_x": (after - before) / xbytes,
            "target": "peak RSS < 1.5x the size of X"}


def run(quick=False, rounds=None, settle=0.5, log=print, workloads=None, with_torch=True):
    """Run the suite and return a dict of results (see the module docstring)."""

    peers = ["scikit-learn"] + (["pytorch"] if with_torch and _have_torch() else [])
    rounds = rounds or (2 if quick else 3)
    chosen = workloads or ([1, 3, 5] if quick else [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    log("measuring the GEMM peak ...")
    peak = {"sgemm": gemm_peak(np.float32), "dgemm": gemm_peak(np.float64)}
    log(f"  sgemm {peak['sgemm']:.1f} GFLOP/s, dgemm {peak['dgemm']:.1f} GFLOP/s")
    results = []
    extra = {6: ("scikit-learn's default MLPClassifier on 5000x784",
                 lambda: _sklearn_defaults(rounds, settle, log)),
             7: ("GridSearchCV, n_jobs 1 and 2", lambda: _gridsearch(rounds, settle, log)),
             8: ("fixed cost per fit, first fit", lambda: _fixed_cost(max(rounds, 5), settle,
                                                                      log)),
             9: ("cores used under threadpool_limits", lambda: _cores_used(log)),
             10: ("n_jobs=2 against 1 next to a busy core",
                  lambda: _contention(rounds, settle, log))}
    for k in chosen:
        if k in extra:
            log(f"workload {k}: {extra[k][0]}")
            results.append(extra[k][1]())
            continue
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
    versions = {"fastbp": __version__, "numpy": np.__version__,
                "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}
    if "pytorch" in peers:
        import torch
        versions["torch"] = torch.__version__
        versions["torch_threads"] = torch.get_num_threads()
    return {"date": time.strftime("%Y-%m-%d"), "machine": _machine(),
            "versions": versions, "blas": [(i["internal_api"], i["num_threads"])
                                           for i in threadpool_info()],
            "config": show_config(mode="dicts"),
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


_SMALL_PATH = {"own": "fastbp's loops", "blas": "BLAS"}


def markdown(report):
    """The results as a Markdown table."""
    lines = [f"Measured {report['date']} on {report['machine']}; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
             + f"; GEMM peak sgemm {report['gemm_peak_gflops']['sgemm']:.1f}, dgemm "
             f"{report['gemm_peak_gflops']['dgemm']:.1f} GFLOP/s"
             + (f"; fastbp kernels {report['config']['kernels']['variant']}"
                if "config" in report else "")
             + (f", small products in {_SMALL_PATH[report['config']['kernels']['small_products']]}"
                if "small_products" in report.get("config", {}).get("kernels", {}) else "")
             + ".", "",
             "| workload | fastbp s | scikit-learn s | PyTorch s | speed-up vs sklearn | "
             "speed-up vs PyTorch | fastbp GFLOP/s (% peak) | accuracy fastbp / sklearn / "
             "PyTorch | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in report["results"]:
        if r["workload"] in _EXTRA_ROWS:
            row, note = _EXTRA_ROWS[r["workload"]](r)
            if row:
                lines.append(row)
            notes.extend(note)
            continue
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
    return "\n".join(lines + ([""] + notes if notes else []))


def _md_defaults(r):
    s, a, e = r["seconds"], r["accuracy"], r["epochs"]
    return (f"| sklearn-defaults {r['shape']} (100,) adam float64, to convergence | "
            f"{s['fastbp']:.3f} | {s['scikit-learn']:.3f} | | "
            f"{r['speedup']['scikit-learn']:.1f}x | | | test {a['fastbp']:.3f} / "
            f"{a['scikit-learn']:.3f} ({e['fastbp']} / {e['scikit-learn']} epochs) | "
            f"{r['target']} |"), []


def _md_grid(r):
    s, sp = r["seconds"], r["speedup"]
    return (f"| GridSearchCV 12 fits, digits x4 {r['shape']}, n_jobs=2 | "
            f"{s['fastbp n_jobs=2']:.3f} (n_jobs=1 {s['fastbp n_jobs=1']:.3f}) | "
            f"{s['scikit-learn n_jobs=2']:.3f} (n_jobs=1 {s['scikit-learn n_jobs=1']:.3f}) | "
            f"| {sp['scikit-learn']:.1f}x | | | | {sp['fastbp n_jobs=2 vs n_jobs=1']:.2f}x "
            f"from n_jobs=1 to 2 ({r['target']}) |"), []


def _md_fixed(r):
    notes = ["Fixed cost per fit (validation, allocation, thread start, checks: a fit's "
             "time outside its epochs, median of 3-epoch fits): "
             + "; ".join(f"{x['workload']} {1000 * x['fixed_seconds']:.1f} ms against "
                         f"{1000 * x['epoch_seconds']:.1f} ms per epoch "
                         f"({x['fixed_over_epoch']:.2f} epoch)" for x in r["rows"])
             + f". First fit in a fresh process / a later one: {r['first_fit']['ratio']:.2f}."]
    return None, notes


def _md_cores(r):
    c = r["cores_used"]
    return None, [f"Cores kept busy by an L-BFGS fit (CPU time / wall time): {c['none']:.2f}; "
                  f"under `threadpool_limits(1, user_api='openmp')`: {c['limit']:.2f}."]


def _md_contention(r):
    parts = [f"{name} {v['seconds']['n_jobs=2']:.3f} s against {v['seconds']['n_jobs=1']:.3f} s"
             f" ({v['n_jobs=2 / n_jobs=1']:.2f}x)" for name, v in r["cases"].items()]
    return None, ["With another process keeping one core busy, n_jobs=2 against n_jobs=1: "
                  + "; ".join(parts) + "."]


_EXTRA_ROWS = {"sklearn-defaults": _md_defaults, "gridsearch": _md_grid,
               "fixed-cost": _md_fixed, "openmp-limit": _md_cores,
               "contention": _md_contention}


def plot(report, path):
    """A bar chart of the speed-ups, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in report["results"] if r["workload"] not in (
        "loss_grad-memory", "fixed-cost", "openmp-limit", "contention")]
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
    show_config()
    print()
    report = run(quick=True, log=log)
    print(markdown(report))
    return report
