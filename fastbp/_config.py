"""``fastbp.show_config()``: which kernels, BLAS and thread counts this process uses."""
import json
import os
import platform
import sys

from threadpoolctl import threadpool_info

from . import _core
from ._threads import (MAX_UNITS_BATCH, MIN_ROWS_PER_THREAD, MIN_TEAM_WORK, SMALL_PRODUCTS,
                       effective_n_jobs, last_level_cache_bytes)
from ._version import __version__

__all__ = ["show_config"]


def _config():
    build = _core.build_info()
    libraries = threadpool_info()  # scans the loaded libraries: once
    blas = [{k: lib.get(k) for k in ("internal_api", "version", "num_threads",
                                     "threading_layer", "architecture", "filepath")}
            for lib in libraries if lib.get("user_api") == "blas"]
    openmp = [{k: lib.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
              for lib in libraries if lib.get("user_api") == "openmp"]
    return {
        "fastbp": {"version": __version__, "python": sys.version.split()[0],
                   "platform": platform.platform(), "machine": platform.machine()},
        "kernels": {"variant": _core.VARIANT, "compiled_isa": build["isa"],
                    "forced": os.environ.get("FASTBP_KERNELS") or None,
                    "built": list(_core.built_variants()),
                    "cpu_features": list(_core.cpu_features()),
                    "openmp_version": build["openmp"],
                    **_small_products()},
        "threads": {"n_jobs_default": effective_n_jobs(None),
                    "openmp_max_threads": _core.openmp_max_threads(),
                    "cpus_usable": _usable_cpus()},
        # What minibatch_plan decides from (a fitted estimator's parallelism_ says what
        # it decided): see fastbp/_threads.py.
        "minibatch_plan": {"last_level_cache_bytes": last_level_cache_bytes(),
                           "min_rows_per_thread": MIN_ROWS_PER_THREAD,
                           "min_team_work_flops": MIN_TEAM_WORK,
                           "max_units_batch": MAX_UNITS_BATCH},
        "blas": blas,
        "openmp": openmp,
    }


def _small_products():
    """Where small products go now (the kernels' flag, which tests may have changed since
    the import-time choice), and why."""
    path = "own" if _core.small_products_in_own_loops() else "blas"
    reason = SMALL_PRODUCTS[1] if path == SMALL_PRODUCTS[0] else "set_small_products"
    return {"small_products": path, "small_products_reason": reason}


def _usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _text(cfg):
    k, t, m = cfg["kernels"], cfg["threads"], cfg["minibatch_plan"]
    lines = [f"fastbp {cfg['fastbp']['version']} on Python {cfg['fastbp']['python']}, "
             f"{cfg['fastbp']['platform']}",
             f"kernels: {k['variant']}" + (" (forced by FASTBP_KERNELS)" if k["forced"]
                                            else " (best this CPU runs)")
             + f"; built: {', '.join(k['built'])}; "
             f"CPU: {', '.join(k['cpu_features']) or 'no AVX'}",
             f"small products (at most 2^18 multiply-adds): "
             f"{'fastbp' if k['small_products'] == 'own' else 'BLAS'} "
             f"({k['small_products_reason']})"
             + ("; larger products with two small sides cut for BLAS's small-matrix "
                "kernels" if k["small_products"] == "blas" else ""),
             f"OpenMP: {'version ' + str(k['openmp_version']) if k['openmp_version'] else 'none (one thread)'}",
             f"threads: n_jobs=None uses {t['n_jobs_default']}; OpenMP max "
             f"{t['openmp_max_threads']}; usable CPUs {t['cpus_usable']}",
             f"minibatches ('sgd'/'adam'; a fit's parallelism_ says which): split by "
             f"the first hidden layer's units when it is at least as wide as a minibatch "
             f"of at most {m['max_units_batch']} rows (and the layers above the second "
             f"are small); else by rows over a team (at least "
             f"{m['min_rows_per_thread']} rows and {m['min_team_work_flops']:,} flops per "
             f"thread) while the weights and per-thread gradients fit the "
             f"{m['last_level_cache_bytes'] / 2**20:g} MiB last-level cache; else one "
             f"thread with BLAS threads"]
    for lib in cfg["blas"]:
        lines.append(f"BLAS: {lib['internal_api']} {lib['version']} "
                     f"({lib['architecture'] or lib['threading_layer']}), "
                     f"{lib['num_threads']} threads, {lib['filepath']}")
    if not cfg["blas"]:
        lines.append("BLAS: none found by threadpoolctl")
    return "\n".join(lines)


def show_config(mode="stdout"):
    """Show the kernel variant, the BLAS and the thread counts fastbp uses here.

    Worth including in a bug report or a benchmark: fastbp picks its kernels for the
    running CPU at import (see ``FASTBP_KERNELS`` in the README), and its speed depends
    on the BLAS library SciPy ships and on the thread limits of the process.

    Parameters
    ----------
    mode : {'stdout', 'dicts', 'json'}, default='stdout'
        ``'stdout'`` prints a short summary and returns None; ``'dicts'`` returns the
        configuration as nested dicts; ``'json'`` returns it as a JSON string.

    Returns
    -------
    None, dict or str
        Sections ``fastbp``, ``kernels`` (``variant``, ``compiled_isa``, ``forced``,
        ``built``, ``cpu_features``, ``openmp_version``, ``small_products``: 'own' when
        small products run in fastbp's loops, 'blas' when BLAS computes them, and then
        larger products whose other two sides are small are cut into pieces for its
        small-matrix kernels; ``small_products_reason``), ``threads``
        (``n_jobs_default``, ``openmp_max_threads``, ``cpus_usable``),
        ``minibatch_plan`` (what the choice between the units split, a team of rows and
        BLAS threads for 'sgd'/'adam' depends on: ``last_level_cache_bytes``,
        ``min_rows_per_thread``, ``min_team_work_flops``, ``max_units_batch``; a fitted
        estimator's ``parallelism_`` says what was chosen), ``blas`` and ``openmp``
        (threadpoolctl's view of the loaded libraries).

    Examples
    --------
    >>> import fastbp
    >>> cfg = fastbp.show_config(mode="dicts")
    >>> cfg["kernels"]["variant"] in cfg["kernels"]["built"]
    True
    >>> cfg["threads"]["n_jobs_default"] >= 1
    True
    """
    if mode not in ("stdout", "dicts", "json"):
        raise ValueError(f"mode must be 'stdout', 'dicts' or 'json', got {mode!r}")
    cfg = _config()
    if mode == "dicts":
        return cfg
    if mode == "json":
        return json.dumps(cfg, indent=2)
    print(_text(cfg))
    return None
