"""Thread policy: fastattn's own thread count, and the BLAS held to one thread inside kernels.

fastattn runs all of its parallel work on its own OpenMP threads and calls BLAS on small
tiles from inside them, so the BLAS behind ``scipy.linalg.cython_blas`` must not start
threads of its own there.  Where OpenBLAS has ``openblas_set_num_threads_local`` (0.3.27+)
the kernel sets it on each of its threads (no shared state, no cost).  Otherwise the global
count is held at one while any kernel runs, by a counted guard.
"""
import os
import threading
from contextlib import contextmanager

from . import _kernel

__all__ = ["get_num_threads", "set_num_threads", "blas_guard"]


def _default_threads():
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    env = os.environ.get("FASTATTN_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if env:
        try:
            n = max(1, int(env.split(",")[0]))
        except ValueError:
            pass
    return n


_num_threads = _default_threads()
BLAS_PATH = _kernel.blas_init()
_HAS_LOCAL = _kernel.blas_has_local()
_lock = threading.Lock()
_active = 0
_saved = -1


def get_num_threads():
    """The number of threads fastattn's kernels use when a call does not say."""
    return _num_threads


def set_num_threads(n):
    """Set the default thread count of fastattn's kernels; returns the previous one."""
    global _num_threads
    n = check_num_threads(n)
    prev, _num_threads = _num_threads, n
    return prev


def check_num_threads(n, name="num_threads"):
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    n = int(n.__index__()) if not isinstance(n, int) else n
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


@contextmanager
def blas_guard():
    """Hold the BLAS library's global thread count at one while the body runs.

    A no-op where the kernel can limit its own threads (openblas_set_num_threads_local).
    Nested and concurrent guards share one save/restore, so a caller never restores a
    count another caller set.
    """
    global _active, _saved
    if _HAS_LOCAL:
        yield
        return
    with _lock:
        if _active == 0:
            _saved = _kernel.blas_set_global(1)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _saved > 0:
                _kernel.blas_set_global(_saved)
