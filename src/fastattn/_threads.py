"""Thread policy: fastattn's own thread count, and the BLAS held to one thread inside kernels.

fastattn runs its parallel work on its own OpenMP threads and calls BLAS on tiles from
inside them, so the BLAS behind ``scipy.linalg.cython_blas`` must not start threads of its
own there.  OpenBLAS's thread count is global (in its pthreads builds, which SciPy ships,
even ``openblas_set_num_threads_local`` sets the global count), so ``blas_guard`` holds it
at one while any kernel runs, with one save/restore shared by all concurrent callers.
"""
import os
import threading
import warnings

from . import _kernel

__all__ = ["get_num_threads", "set_num_threads", "blas_guard"]


MAX_THREADS = 4096      # more would only be OpenMP threads waiting on each other


def _default_threads():
    """FASTATTN_NUM_THREADS, else OMP_NUM_THREADS (its first entry), else the usable cores.
    A variable that is not an integer in [1, MAX_THREADS] is ignored with a warning."""
    for name in ("FASTATTN_NUM_THREADS", "OMP_NUM_THREADS"):
        text = os.environ.get(name, "").strip()
        if not text:
            continue
        try:
            n = int(text.split(",")[0])
        except ValueError:
            n = 0
        if 1 <= n <= MAX_THREADS:
            return n
        warnings.warn(f"fastattn: {name}={text!r} ignored: not an integer in "
                      f"[1, {MAX_THREADS}]", RuntimeWarning, stacklevel=2)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_num_threads = _default_threads()
BLAS_PATH = _kernel.blas_init()
BLAS_CONTROL = _kernel.blas_get_global() > 0     # the library's thread count is reachable


# GNU OpenMP's thread pool does not survive fork(): in a child forked after the parent ran a
# parallel region, the child's next region waits forever for threads fork did not copy.  Such
# a child runs every call on its calling thread (PyTorch does the same).
_pool_started = False       # a parallel region may have run in this process
_pool_lost = False          # this process is a fork of one where it had


def _after_fork_in_child():
    global _pool_lost, _num_threads
    if _pool_started:
        _pool_lost = True
        _num_threads = 1
    blas_guard._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def parallel_threads(n):
    """The thread count a parallel region of n threads may really use (1 in a forked child
    whose OpenMP pool was lost); notes that a pool may now exist."""
    global _pool_started
    if n > 1:
        if _pool_lost:
            return 1
        _pool_started = True
    return n


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
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    n = n.__index__()
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name} must lie in [1, {MAX_THREADS}], got {n}")
    return n


class _BlasGuard:
    """``with blas_guard:`` holds the BLAS library's global thread count at one.

    Nested and concurrent holders share one save/restore: the first to enter saves the
    count, the last to leave restores it, so no caller restores a count another one set.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = {}          # thread ident -> how many holds it has open
        self._saved = -1

    def __enter__(self):
        if BLAS_CONTROL:
            me = threading.get_ident()
            with self._lock:
                if not self._holders:
                    self._saved = _kernel.blas_set_global(1)
                self._holders[me] = self._holders.get(me, 0) + 1
        return self

    def __exit__(self, *exc):
        if BLAS_CONTROL:
            me = threading.get_ident()
            with self._lock:
                self._holders[me] -= 1
                if not self._holders[me]:
                    del self._holders[me]
                self._restore_if_free()
        return False

    def _restore_if_free(self):
        if not self._holders and self._saved > 1:
            _kernel.blas_set_global(self._saved)

    def _after_fork(self):
        """In a forked child only the forking thread lives on: the other threads' holds (and
        the lock, if one of them had it at the fork) go with them."""
        self._lock = threading.Lock()
        me = threading.get_ident()
        held = bool(self._holders)
        self._holders = {me: self._holders[me]} if me in self._holders else {}
        if held and BLAS_CONTROL:
            self._restore_if_free()


blas_guard = _BlasGuard()
