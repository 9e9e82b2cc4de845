"""Thread counts and BLAS thread limits, in one place."""
import contextlib
import os
import threading

from threadpoolctl import ThreadpoolController

__all__ = ["effective_n_jobs", "threads_for_batch", "single_threaded_blas"]

# Fewer rows than this per thread and splitting a minibatch costs more than it saves.
MIN_ROWS_PER_THREAD = 16


def effective_n_jobs(n_jobs):
    """Threads to use: None means every CPU this process may run on; -1 too; -2 all
    but one, and so on."""
    try:
        n_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n_cpus = os.cpu_count() or 1
    if n_jobs is None:
        return n_cpus
    if n_jobs < 0:
        return max(1, n_cpus + 1 + n_jobs)
    return max(1, int(n_jobs))


_CONTROLLER = None
_LOCK = threading.Lock()
_DEPTH = 0
_LIMITER = None


@contextlib.contextmanager
def single_threaded_blas():
    """A context that limits every BLAS library to one thread until it exits.

    Reentrant and shared by all threads of the process: the first context to enter sets
    the limit, the last to leave restores the original limits (BLAS limits are
    process-wide), and nested contexts cost almost nothing. Finding the loaded BLAS
    libraries is the slow part of threadpoolctl, so it is done once per process.
    """
    global _CONTROLLER, _DEPTH, _LIMITER
    with _LOCK:
        if _DEPTH == 0:
            if _CONTROLLER is None:
                _CONTROLLER = ThreadpoolController()
            _LIMITER = _CONTROLLER.limit(limits=1, user_api="blas")
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _LIMITER.restore_original_limits()
                _LIMITER = None


def threads_for_batch(n_jobs, batch_size):
    """Threads that split one minibatch: at most n_jobs, at least 16 rows each."""
    return max(1, min(effective_n_jobs(n_jobs), batch_size // MIN_ROWS_PER_THREAD))
