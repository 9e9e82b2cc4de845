"""Thread counts, the parallelism plan of minibatch training, and BLAS thread limits.

fastbp is a guest in its user's process, so it counts threads the way scikit-learn's own
OpenMP code does: ``omp_get_max_threads()``, which reflects ``OMP_NUM_THREADS``,
threadpoolctl's ``openmp`` limits and the limits joblib/loky set in their workers. Inside
a Dask worker it uses the worker's thread count (the nanny sets OpenMP to one thread
there, while the worker was given its threads to use). An explicit ``n_jobs`` wins.
"""
import contextlib
import functools
import os
import sys
import threading

from threadpoolctl import ThreadpoolController

from . import _core

__all__ = ["cpu_count", "team_for_now", "effective_n_jobs", "minibatch_plan", "blas_threads",
           "single_threaded_blas", "small_products"]

# Fewer rows than this per thread and splitting a minibatch costs more than it saves.
MIN_ROWS_PER_THREAD = 16
CACHE_LINE = 64   # bytes (the kernels' _part_width assumes the same)


def whole_lines(count, itemsize):
    """``count`` elements of ``itemsize`` bytes, rounded up to whole cache lines."""
    per_line = CACHE_LINE // itemsize
    return -(-count // per_line) * per_line


def cpu_count():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _dask_worker_threads():
    """The thread count of the Dask worker running this code, or None elsewhere."""
    if "distributed" not in sys.modules:  # never import Dask just to ask
        return None
    try:
        from distributed import get_worker
        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return None


def effective_n_jobs(n_jobs):
    """Threads to use for ``n_jobs``.

    None: ``omp_get_max_threads()`` (so ``OMP_NUM_THREADS``, threadpoolctl's ``openmp``
    limits and joblib's per-worker limits are honoured), or the worker's thread count
    inside a Dask worker. A positive number is taken as given; -1 means every CPU this
    process may run on, -2 all but one, and so on.
    """
    if n_jobs is None:
        dask_threads = _dask_worker_threads()
        if dask_threads is not None:
            return dask_threads
        if not _core.build_info()["openmp"]:
            return cpu_count()  # a build without OpenMP: the threads are BLAS's only
        return max(1, min(_core.openmp_max_threads(), cpu_count()))
    if n_jobs < 0:
        return max(1, cpu_count() + 1 + n_jobs)
    return max(1, int(n_jobs))


def _own_runnable():
    """Threads of this process that are running or ready to run (Linux), the caller
    included: idle OpenMP or BLAS workers still spinning after their last task are ours,
    not other work."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                # The state follows the parenthesised command name.
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"R":
                    count += 1
        except (OSError, IndexError):
            continue
    return max(count, 1)


def _others_runnable():
    """Threads of other work ready to run right now on the machine (Linux's
    ``procs_running``, less this process's runnable threads), or None where no such
    instantaneous count exists (a load average would count fastbp's own past threads)."""
    try:
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"procs_running"):
                    return max(0, int(line.split()[1]) - _own_runnable())
    except (OSError, ValueError):
        pass
    return None


def _machine_cpus():
    """CPUs of the whole machine, which ``procs_running`` counts over."""
    return os.cpu_count() or cpu_count()


def team_for_now(chunks):
    """``(threads, spin)`` for a minibatch epoch cut into ``chunks`` chunks: as many
    threads as there are chunks when the cores are free, fewer when other work keeps some
    busy (the result depends on the chunks only, see ``run_epoch``), and whether barrier
    waiters may spin (only when no core is oversubscribed). Without a count of runnable
    threads (outside Linux) every chunk gets its thread."""
    if chunks <= 1:
        return 1, True
    others = _others_runnable()
    if others is None:
        return min(chunks, cpu_count()), True
    free = _machine_cpus() - others
    threads = int(max(1, min(chunks, cpu_count(), free)))
    return threads, threads + others <= _machine_cpus()


# --- Minibatch parallelism ----------------------------------------------------------------
# A minibatch can use several cores in three ways:
#   'team'  fastbp's threads split its rows, each calling single-threaded BLAS on its share,
#           then split the parameter vector to reduce their gradients and step. Everything
#           runs in parallel (the elementwise passes and the update too), at the price of
#           two barriers per minibatch and one gradient copy per thread.
#   'blas'  one thread runs the minibatch and BLAS uses the threads inside each GEMM. Only
#           the GEMMs run in parallel, but the threads share the packed weights, and there
#           is one gradient.
# The team wins while its working set (the weights plus one gradient per thread, read or
# written on every minibatch) stays in the last-level cache: past that, every thread
# streams its own copy of the weights and of its gradient from memory on every step, and
# the GEMMs, big by then, are what multi-threaded BLAS does best.
#   'units' (dense inputs, no dropout) fastbp's threads split the first hidden layer's
#           units: each owns a block of them with their weights, computes its share of
#           the second layer's inputs, and after one exchange of those (minibatch x
#           second-layer values) its complete gradient, and steps its own parameters. No
#           gradient copies, no reduction; every thread gathers the minibatch and runs the
#           layers above the first on its own copy of their parameters (the output layer
#           alone with one hidden layer).
# A team's overhead per minibatch grows with the parameters (it reduces and passes around
# whole gradients, h (d + k) values for h hidden units, d inputs and k outputs), the
# units split's with the minibatch (each thread gathers it and forms the outputs,
# about batch (d + k) values): the units split is chosen when the hidden layer is at
# least as wide as the minibatch is long, for minibatches of at most MAX_UNITS_BATCH rows,
# and when what every thread repeats (the products of the layers above the second) is at
# most an eighth of one part's share of the first two layers' products.
# Measured on 2 cores (benchmarks/bench_units.py, 2026-12-03), the units split took
# 0.65-0.86x the team's time for h / batch from 2 to 4 with up to 256 rows, and 1.04-1.14x
# for h / batch from 0.16 to 0.64. With long minibatches both overheads are small next to
# the products, and the team's products over all the units were faster: 256-2048-10 with
# 512 rows took 143 ms split by units against 89 ms for the team, 1024-1024-10 with 1024
# rows 204 ms against 159 ms (and 175 ms with multi-threaded BLAS); 784-4096-10 with 200
# rows 323 ms against 360 ms (336 ms with BLAS). 'serial' is one thread and one BLAS
# thread.

MAX_UNITS_BATCH = 256

_DEFAULT_LLC = 8 * 2**20   # when the OS does not say: a conservative last-level cache


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes():
    """Size of the largest CPU cache the OS reports (bytes), or 8 MiB when it reports none.
    Read once per process."""
    sizes = []
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            value = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if value and value > 0:
            sizes.append(value)
    if not sizes:
        base = "/sys/devices/system/cpu/cpu0/cache"
        try:
            entries = [e for e in os.listdir(base) if e.startswith("index")]
        except OSError:
            entries = []
        for entry in entries:
            try:
                with open(os.path.join(base, entry, "size")) as fh:
                    text = fh.read().strip()
                mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
                sizes.append(int(text.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                continue
    return max(sizes) if sizes else _DEFAULT_LLC


# A team pays two barrier crossings per minibatch: about a microsecond on a quiet machine,
# much more when the OS preempts one of its threads (a shared VM's vCPU, another busy
# process). It is worth that only with enough arithmetic per thread between crossings:
# 2^20 float32 flops (float64 ones count twice), about 10 microseconds of one current core.
MIN_TEAM_WORK = 2**20


def flops_per_sample(layer_sizes):
    """Flops of one forward and backward pass for one sample: forward and weight
    gradient for every layer, the input delta for every layer but the first."""
    mm = [a * b for a, b in zip(layer_sizes[:-1], layer_sizes[1:])]
    return 2 * (3 * sum(mm) - mm[0])


def _units_flops(layer_sizes):
    """Flops per sample of the units split: ``(split, repeated)``, those of the first two
    layers' products, which the parts share, and those of the layers above, which every
    thread repeats (forward, weight gradient and delta for each)."""
    mm = [a * b for a, b in zip(layer_sizes[:-1], layer_sizes[1:])]
    return 2 * (2 * mm[0] + 3 * mm[1]), 2 * 3 * sum(mm[2:])


def minibatch_plan(n_jobs, batch_size, layer_sizes, itemsize, units_ok=False):
    """How minibatch training uses the cores: ``(mode, threads)``.

    ``mode`` is 'serial', 'team', 'units' or 'blas' (see above); ``threads`` the team
    size (the number of chunks or parts of each minibatch) or the BLAS thread count.
    ``units_ok``: the data and settings allow the units split (dense inputs, no
    dropout). The choice depends on the shapes and the thread budget only (never on
    timings), so a given machine and thread count always make the same choice.
    """
    threads = effective_n_jobs(n_jobs)
    if threads == 1:
        return "serial", 1
    work = flops_per_sample(layer_sizes) * itemsize / 4 * batch_size
    if (units_ok and len(layer_sizes) >= 3 and layer_sizes[1] >= batch_size
            and batch_size <= MAX_UNITS_BATCH):
        # Parts of at least one cache line of units and an eighth of a team's minimum
        # work each: one barrier crossing and no reduction per minibatch (20->64->2 with
        # 32-row float64 minibatches, 3 eighths in all, took 0.78x one thread's time).
        h = layer_sizes[1]
        parts = min(threads, h * itemsize // CACHE_LINE,
                    int(work * 8 // MIN_TEAM_WORK))
        split, repeated = _units_flops(layer_sizes)
        if repeated:   # what every part repeats, at most an eighth of its share
            parts = min(parts, split // (8 * repeated))
        if parts > 1:
            # The kernel rounds each part up to whole lines (see _part_width): as many
            # parts as that width needs, so that none is left empty.
            width = whole_lines(-(-h // parts), itemsize)
            return "units", -(-h // width)
    n_params = sum(a * b + b for a, b in zip(layer_sizes[:-1], layer_sizes[1:]))
    team = max(1, min(threads, batch_size // MIN_ROWS_PER_THREAD))
    if (max(team, 2) + 1) * n_params * itemsize > last_level_cache_bytes():
        # BLAS gets no more threads than the process allows it (threadpool_limits).
        threads = min(threads, _blas_max_threads())
        return ("blas", threads) if threads > 1 else ("serial", 1)
    team = min(team, int(work // MIN_TEAM_WORK))
    return ("team", team) if team > 1 else ("serial", 1)


# --- BLAS thread limits -------------------------------------------------------------------
# BLAS limits are process-wide. Every fastbp computation that needs a limit registers it
# for its duration; the limit in force is the smallest registered one (a team that needs
# single-threaded BLAS is never disturbed by a concurrent 'blas' fit), and the last one to
# leave restores the original limits exactly. Finding the loaded BLAS libraries is
# threadpoolctl's slow part (10-20 ms in a process with NumPy, SciPy and scikit-learn): it
# happens once, at import, so that the first fit costs what later ones do. The BLAS that
# matters is SciPy's, which fastbp's kernels call and which is loaded by now.

_CONTROLLER = None
_LOCK = threading.Lock()
_ACTIVE = []        # limits registered by running computations
_LIMITER = None     # threadpoolctl's handle on the original limits
_IN_FORCE = None
_ORIGINAL_MAX = None


def _controller():
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController().select(user_api="blas")
    return _CONTROLLER


def _blas_limit_now():
    """The largest thread count the loaded BLAS libraries are allowed right now."""
    counts = [lib["num_threads"] for lib in _controller().info()]
    return max(counts) if counts else 1


def _blas_max_threads():
    """The largest thread count the loaded BLAS libraries are allowed, not counting the
    limits running fastbp computations set (those end with them)."""
    with _LOCK:
        return _ORIGINAL_MAX if _LIMITER is not None else _blas_limit_now()


def _apply():
    """Set the smallest registered limit, never above the limits found when the first
    registration came (a user's ``threadpool_limits`` stays in force), or restore the
    original limits when none is registered. Called under _LOCK."""
    global _LIMITER, _IN_FORCE, _ORIGINAL_MAX
    wanted = min(_ACTIVE) if _ACTIVE else None
    if wanted is not None:
        if _LIMITER is None:
            _ORIGINAL_MAX = _blas_limit_now()
        wanted = min(wanted, _ORIGINAL_MAX)
    if wanted == _IN_FORCE:
        return
    if _LIMITER is not None:
        _LIMITER.restore_original_limits()
        _LIMITER = None
    if wanted is not None:
        _LIMITER = _controller().limit(limits=wanted)
    _IN_FORCE = wanted


@contextlib.contextmanager
def blas_threads(n):
    """A context in which BLAS uses at most ``n`` threads (fewer if another running
    fastbp computation needs fewer, or if the process allowed fewer when the first such
    context entered); the original limits come back when the last one exits. Reentrant
    and thread-safe."""
    n = max(1, int(n))
    with _LOCK:
        _ACTIVE.append(n)
        try:
            _apply()
        except BaseException:
            _ACTIVE.remove(n)
            raise
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE.remove(n)
            _apply()


def single_threaded_blas():
    """``blas_threads(1)``: fastbp's own threads own the cores."""
    return blas_threads(1)


_controller()


# --- Small products -----------------------------------------------------------------------
# Products of at most 2^18 multiply-adds (a small minibatch's) skip BLAS by default: BLAS
# packs both operands on every call, which costs as much as such a product, and fastbp's
# own loops (_small_gemm.h) do not pack. OpenBLAS's SkylakeX kernels (and its Cooperlake
# and SapphireRapids ones, which build on them) have small-matrix kernels of their own,
# which do not pack either and use fused multiply-adds; fastbp's loops do not, so that
# every kernel variant rounds alike. There BLAS is the faster. OpenBLAS picks those
# kernels for AVX-512 Intel CPUs, and for AMD's Zen 4 and Zen 5 (whose speed on this path
# has not been measured here).
# Measured 2026-12-02 on an AVX-512 Xeon, 3-epoch minibatch fits, median of 7, own loops
# against BLAS: 20000x64, (128,), batch 32: 0.064 s against 0.050 s with OpenBLAS's
# SkylakeX kernels and 0.064 s against 0.072 s with its Haswell kernels (which AVX2 CPUs
# get, Zen 3 among them); float64 0.091 s against 0.079 s; batch 64: 0.033 s against
# 0.026 s.
# The choice depends on which BLAS is loaded, never on timings, so a given machine and
# library always take the same path (and give the same results); FASTBP_SMALL_PRODUCTS
# ('own' or 'blas') overrides it.

_BLAS_SMALL_KERNELS = ("skylakex", "cooperlake", "sapphirerapids")
_OPENBLAS_SMALL_SINCE = (0, 3, 17)   # small-matrix kernels in every release since


def _path_parts(lib):
    return os.path.normpath(str(lib.get("filepath") or "")).replace("\\", "/").split("/")


def _in_package(parts, package):
    """Whether a library's path lies in a wheel's library directory of ``package``:
    ``<package>.libs`` (Linux, Windows) or ``<package>/.dylibs`` (macOS)."""
    return (f"{package}.libs" in parts
            or any(a == package and b in (".dylibs", ".libs")
                   for a, b in zip(parts, parts[1:])))


def _scipy_blas(libraries):
    """threadpoolctl's records of the BLAS that SciPy's ``cython_blas`` calls: the ones
    SciPy's wheel ships, when there are such; else every BLAS loaded but the one NumPy's
    wheel ships (a system or conda SciPy links its BLAS from elsewhere)."""
    blas = [lib for lib in libraries if lib.get("user_api") == "blas"]
    own = [lib for lib in blas if _in_package(_path_parts(lib), "scipy")]
    return own or [lib for lib in blas if not _in_package(_path_parts(lib), "numpy")]


def _version(text):
    try:
        return tuple(int(x) for x in str(text).split(".")[:3])
    except ValueError:
        return ()


def small_products(libraries=None, environ=None):
    """Where the kernels compute small products: ``('own' or 'blas', reason)``.

    'blas' when the BLAS that SciPy loaded is OpenBLAS 0.3.17 or later running kernels
    with small-matrix paths (its SkylakeX, Cooperlake and SapphireRapids cores), 'own'
    otherwise (other OpenBLAS cores, MKL, an unknown BLAS), unless
    ``FASTBP_SMALL_PRODUCTS`` says 'own' or 'blas'. ``libraries`` (threadpoolctl's
    records) and ``environ`` default to this process's.
    """
    environ = os.environ if environ is None else environ
    forced = environ.get("FASTBP_SMALL_PRODUCTS", "").strip().lower()
    if forced:
        if forced not in ("own", "blas"):
            raise RuntimeError(f"FASTBP_SMALL_PRODUCTS={forced!r}: choose 'own' or 'blas'")
        return forced, "FASTBP_SMALL_PRODUCTS"
    if libraries is None:
        libraries = [dict(lib, user_api="blas") for lib in _controller().info()]
    blas = _scipy_blas(libraries)
    if blas and all(lib.get("internal_api") == "openblas"
                    and str(lib.get("architecture") or "").lower() in _BLAS_SMALL_KERNELS
                    and _version(lib.get("version")) >= _OPENBLAS_SMALL_SINCE
                    for lib in blas):
        return "blas", f"OpenBLAS {blas[0].get('architecture')} has small-matrix kernels"
    return "own", "no small-matrix kernels known in this BLAS"


SMALL_PRODUCTS = small_products()
_core.set_small_products(SMALL_PRODUCTS[0] == "own")
