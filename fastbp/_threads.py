"""Thread counts and BLAS thread limits, in one place."""
import os

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


def single_threaded_blas():
    """A context that limits every BLAS library to one thread until it exits.

    The limits apply when this is called. Finding the loaded BLAS libraries is the slow
    part of threadpoolctl, so it is done once per process.
    """
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def threads_for_batch(n_jobs, batch_size):
    """Threads that split one minibatch: at most n_jobs, at least 16 rows each."""
    return max(1, min(effective_n_jobs(n_jobs), batch_size // MIN_ROWS_PER_THREAD))
