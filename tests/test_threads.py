"""Threads (shared/reliability.md): 1 vs 2 kernel threads bitwise equal, and many Python
threads calling at once get exactly what a lone single-threaded caller gets.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastattn
from conftest import rand

THREAD_CASES = [
    # (name, q shape, k shape, v shape, options)
    ("decode_mha", (1, 32, 1, 4096, 128), (1, 32, 1, 4096, 128), (1, 32, 1, 4096, 128), {}),
    ("decode_gqa_split", (1, 32, 1, 4096), (1, 4, 1, 4096), None, {}),
    ("decode_mqa_split_causal", (1, 8, 1, 8192), (1, 1, 1, 8192), None,
     dict(key_lengths=np.array([5000]), causal=True)),
    ("decode_batch_lengths", (3, 8, 1, 3000), (3, 2, 1, 3000), None,
     dict(key_lengths=np.array([3000, 1, 2047]))),
    ("prefill_causal", (2, 4, 700, 700), (2, 4, 700, 700), None, dict(causal=True)),
    ("prefill_gqa_window_mask", (1, 6, 600, 1100), (1, 2, 600, 1100), None,
     dict(window=(300, 10), mask="bool")),
    ("small_serial", (1, 2, 5, 9), (1, 2, 5, 9), None, {}),
    ("weights", (2, 2, 300, 520), (2, 1, 300, 520), None, dict(return_weights=True)),
]


def _make(case, rng, dtype=np.float32):
    name, qs, ks, vs, kw = case
    if len(qs) == 5:               # (B, H, Lq, Lk, D) spelled out
        b, h, lq, lk, d = qs
        q, k, v = rand(rng, (b, h, lq, d), dtype), rand(rng, (b, h, lk, d), dtype), \
            rand(rng, (b, h, lk, d), dtype)
    else:
        b, hq, lq, lk = qs
        hkv = ks[1]
        q = rand(rng, (b, hq, lq, 64), dtype)
        k = rand(rng, (b, hkv, lk, 64), dtype)
        v = rand(rng, (b, hkv, lk, 48), dtype)
    kw = dict(kw)
    if kw.get("mask") == "bool":
        kw["mask"] = rng.random((q.shape[-2], k.shape[-2])) < 0.8
    return q, k, v, kw


def _same(a, b):
    if isinstance(a, tuple):
        return all(np.array_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("case", THREAD_CASES, ids=[c[0] for c in THREAD_CASES])
def test_one_vs_two_kernel_threads_bitwise(case, dtype, rng):
    """threads: num_threads=1 and 2 give bitwise equal results (decode shapes where the kernel
    splits the KV axis, GQA, prefill, weights; float16 K/V read in place)."""
    q, k, v, kw = _make(case, rng, dtype)
    one = fastattn.attention(q, k, v, num_threads=1, **kw)
    two = fastattn.attention(q, k, v, num_threads=2, **kw)
    assert _same(one, two)
    assert _same(one, fastattn.attention(q, k, v, num_threads=1, **kw))   # deterministic


def test_default_threads_follow_set_num_threads(rng):
    """threads: num_threads=None uses set_num_threads' value (and the result does not change)."""
    q, k, v, kw = _make(THREAD_CASES[1], rng)
    ref = fastattn.attention(q, k, v, num_threads=1)
    prev = fastattn.set_num_threads(1)
    try:
        assert fastattn.get_num_threads() == 1
        assert np.array_equal(fastattn.attention(q, k, v), ref)
        fastattn.set_num_threads(2)
        assert np.array_equal(fastattn.attention(q, k, v), ref)
        with pytest.raises(ValueError, match="num_threads"):
            fastattn.set_num_threads(0)
        assert fastattn.get_num_threads() == 2
    finally:
        fastattn.set_num_threads(prev)


def _hammer(n_threads, calls_per_thread, rng):
    """n_threads Python threads each make calls_per_thread calls over a mix of problems
    (kernel threads 1 or 2, some raising); returns (calls, mismatches, unexpected errors)."""
    cases = [_make(c, rng) for c in THREAD_CASES if c[0] not in ("decode_mha", "prefill_causal")]
    cases.append((rand(rng, (2, 4, 30, 16)), rand(rng, (2, 2, 90, 16)), rand(rng, (2, 2, 90, 8)),
                  dict(causal=True, softcap=3.0)))
    expected = [fastattn.attention(q, k, v, num_threads=1, **kw) for q, k, v, kw in cases]
    lock = threading.Lock()
    stats = dict(calls=0, mismatches=0, errors=0)
    start = threading.Barrier(n_threads)

    def worker(t):
        start.wait()
        calls = bad = err = 0
        for i in range(calls_per_thread):
            j = (t * 7 + i) % (len(cases) + 1)
            if j == len(cases):               # a call that raises, interleaved
                try:
                    fastattn.attention(cases[0][0], cases[0][1], cases[0][2], softcap=-1.0)
                    err += 1
                except ValueError:
                    pass
                continue
            q, k, v, kw = cases[j]
            out = None
            if i % 3 == 0 and not kw.get("return_weights"):
                out = np.empty_like(expected[j])
            got = fastattn.attention(q, k, v, num_threads=1 + (t + i) % 2, out=out, **kw)
            calls += 1
            if not _same(got, expected[j]):
                bad += 1
        with lock:
            stats["calls"] += calls
            stats["mismatches"] += bad
            stats["errors"] += err

    with ThreadPoolExecutor(n_threads) as ex:
        list(ex.map(worker, range(n_threads)))
    return stats


def test_python_threads_concurrent_bitwise_quick(rng):
    """threads: 8 Python threads x 25 calls at once equal the single-threaded results."""
    s = _hammer(8, 25, rng)
    assert s["mismatches"] == 0 and s["errors"] == 0, s


@pytest.mark.slow
def test_python_threads_concurrent_bitwise_many(rng):
    """threads: 8 Python threads x 400 calls at once (kernel threads 1 and 2, out=, calls
    that raise) equal the single-threaded results bitwise."""
    s = _hammer(8, 400, rng)
    print(f"\nthreads: 8 threads x 400 calls = {s['calls']} checked calls, "
          f"{s['mismatches']} mismatches")
    assert s["mismatches"] == 0 and s["errors"] == 0, s


def test_blas_thread_count_restored_after_concurrent_calls(rng):
    """threads: the BLAS libraries' thread counts are the same after concurrent calls as before
    (fastattn holds BLAS to one thread only inside its kernels)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()
              if i["user_api"] == "blas"]
    _hammer(4, 10, rng)
    after = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()
             if i["user_api"] == "blas"]
    assert before == after


# the end of each fork script: wait for the child (a hang fails the test, not the suite)
JOIN_CHILD = """
    p.join(60)
    if p.is_alive():
        p.kill()
        sys.exit("the forked child hung")
    print(a.recv())
"""


def _fork_script(tmp_path, text):
    """Run a fork script in a fresh interpreter; its printed result."""
    import subprocess
    import sys
    script = tmp_path / "fork_script.py"
    script.write_text(text + JOIN_CHILD)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


FORK_CHILD = """
import multiprocessing as mp, sys
import numpy as np, fastattn
fastattn.set_num_threads(2)
x = np.ones((64, 256), np.float32); w = np.ones((512, 256), np.float32)
q = np.random.default_rng(0).standard_normal((2, 4, 256, 32)).astype(np.float32)
want = fastattn.linear(x, w), fastattn.attention(q, q, q, causal=True)   # the pool starts


def child(conn):
    got = fastattn.linear(x, w), fastattn.attention(q, q, q, causal=True, num_threads=2)
    conn.send((fastattn.get_num_threads(), all(np.array_equal(a, b) for a, b in zip(got, want))))


if __name__ == "__main__":
    a, b = mp.Pipe()
    p = mp.get_context("fork").Process(target=child, args=(b,))
    p.start()"""


def test_forked_child_runs_serially_instead_of_hanging(tmp_path):
    """threads: a child forked after the parent ran OpenMP threads (multiprocessing's default
    on Linux) runs its calls on one thread: GNU OpenMP's pool does not survive fork, and the
    child's first parallel region used to wait forever.  Same results, no hang."""
    assert _fork_script(tmp_path, FORK_CHILD) == "(1, True)"


@pytest.mark.parametrize("env,want", [
    (dict(FASTATTN_NUM_THREADS="abc", OMP_NUM_THREADS="1"), "1 warn"),
    (dict(FASTATTN_NUM_THREADS="3", OMP_NUM_THREADS="1"), "3"),
    (dict(OMP_NUM_THREADS="2,1"), "2"),
    (dict(OMP_NUM_THREADS="0"), "cores warn"),
    (dict(FASTATTN_NUM_THREADS="99999"), "cores warn"),
])
def test_thread_environment_variables(env, want):
    """threads: FASTATTN_NUM_THREADS wins over OMP_NUM_THREADS (its first entry); a value that
    is not an integer in [1, 4096] is ignored with a warning, not silently (nor does it hide
    the other variable)."""
    import os
    import subprocess
    import sys
    code = ("import warnings; warnings.simplefilter('always'); import os, fastattn; "
            "print(fastattn.get_num_threads(), len(os.sched_getaffinity(0)))")
    base = {k: v for k, v in os.environ.items()
            if k not in ("FASTATTN_NUM_THREADS", "OMP_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got, cores = r.stdout.split()
    expect, *warn = want.split()
    assert got == (cores if expect == "cores" else expect)
    assert ("ignored" in r.stderr) == bool(warn), r.stderr


FORK_GUARD = """
import multiprocessing as mp, sys, threading
import numpy as np, fastattn
from fastattn import _kernel
from fastattn._threads import blas_guard, BLAS_CONTROL
_kernel.blas_set_global(2)
inside, release = threading.Event(), threading.Event()


def hold():                     # another thread inside a guarded call at the fork
    with blas_guard:
        inside.set()
        release.wait()


def child(conn):
    before = _kernel.blas_get_global()
    with blas_guard:            # the lock is the child's own: no wait for a lost thread
        during = _kernel.blas_get_global()
    y = fastattn.EncoderLayer(16, 2, 32, seed=0)(np.ones((2, 3, 16), np.float32))
    conn.send((before, during, _kernel.blas_get_global(), bool(np.isfinite(y).all())))


if __name__ == "__main__":
    if not BLAS_CONTROL:
        print("(2, 1, 2, True)")
        sys.exit()
    t = threading.Thread(target=hold)
    t.start()
    inside.wait()
    a, b = mp.Pipe()
    with blas_guard._lock:      # held at the very moment of the fork, as by a thread mid-call
        p = mp.get_context("fork").Process(target=child, args=(b,))
        p.start()
    release.set()
    t.join()"""


def test_fork_while_another_thread_holds_the_blas_guard(tmp_path):
    """threads: a child forked while another thread is inside a guarded call (its lock even
    held at that moment) neither waits forever for the lost thread nor keeps the BLAS held at
    one thread on its behalf"""
    assert _fork_script(tmp_path, FORK_GUARD) == "(2, 1, 2, True)"
