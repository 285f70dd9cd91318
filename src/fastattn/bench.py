"""fastattn.bench: time fastattn against its peers and against the machine's own ceilings.

    python -m fastattn.bench                    # the default suite: the targets of issue 4, < 2 min
    python -m fastattn.bench --full             # more repeats, peers on the large shapes too
    python -m fastattn.bench --shapes 8,12,512,512,64 --causal --threads 1,2
    python -m fastattn.bench --decode           # the decode shapes (Lq = 1)
    python -m fastattn.bench --markdown bench/RESULTS.md

What is measured:
  * fastattn.attention against fastattn.reference_attention (small shapes only),
    torch.nn.functional.scaled_dot_product_attention and onnxruntime's ``Attention`` operator
    (ONNX opset 23), each where installed, on the same inputs, at each thread count
    (fastattn's ``num_threads``, ``torch.set_num_threads``, ORT's ``intra_op_num_threads``;
    the BLAS behind NumPy held to the same count with threadpoolctl when it is installed).
  * Repeats are interleaved (fastattn, peer 1, peer 2, fastattn, ...; the order rotates each
    round) and every figure is a median.  A sample is the mean of back-to-back calls lasting at
    least ``min_sample`` seconds (so tiny calls are timed over many calls).
  * Ceilings, measured in the same run: sgemm GF/s (scipy.linalg.blas.sgemm, square float32)
    and memory read bandwidth (the faster of two reductions over an array much larger than the
    L3 cache), each at every thread count.  Ceilings are the best sample; attention figures
    are medians.
  * flops = 2 * (D + Dv) * visible (query, key) pairs; causal and window calls count only the
    visible pairs (with fastattn's bottom-right alignment).  Decode (Lq = 1) is reported in
    GB/s of K and V read, each KV row counted once per KV head (q and the output ignored).
  * ratio vs a peer = peer time / fastattn time (> 1: fastattn is faster).
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

import fastattn
from fastattn import _kernel
from fastattn._threads import MAX_THREADS

__all__ = ["main", "Case", "suite", "run"]

PEERS = ("torch", "onnxruntime", "reference")
REFERENCE_MAX_WORK = 1 << 26      # reference_attention only where pairs * (D + Dv) is below this
PEER_MASK_MAX = 1 << 22           # peers get a materialised mask (window) only below Lq * Lk
TINY = (1, 1, 1, 1, 64)           # row e: a call that is all overhead
WARMUP_CALLS = 5                  # calls after the first that size a sample (time_interleaved)


def _all_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# cases

@dataclass
class Case:
    """One attention problem: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)."""
    B: int
    Hq: int
    Lq: int
    Lk: int
    D: int
    Dv: int = None
    Hkv: int = None
    dtype: str = "float32"
    causal: bool = False
    window: tuple = None
    target: str = ""               # the target row ("a".."h"), "" for custom runs
    peers: tuple = PEERS           # peers this case is compared with (when installed)
    kind: str = None               # "prefill" | "decode" (GB/s) | "small"; default from Lq

    def __post_init__(self):
        self.Dv = self.D if self.Dv is None else self.Dv
        self.Hkv = self.Hq if self.Hkv is None else self.Hkv
        if self.Hq % self.Hkv:
            raise ValueError(f"Hq ({self.Hq}) must be a multiple of Hkv ({self.Hkv})")
        if self.window is not None:
            self.window = tuple(self.window)
        if self.kind is None:
            self.kind = "decode" if self.Lq == 1 else "prefill"

    @property
    def decode(self):
        """Reported in GB/s of K and V read (a single query row streams the cache)."""
        return self.kind == "decode"

    @property
    def shape(self):
        h = f"{self.Hq}" if self.Hkv == self.Hq else f"{self.Hq}/{self.Hkv}"
        s = f"{self.B}x{h}x{self.Lq}x{self.Lk}x{self.D}"
        return s if self.Dv == self.D else s + f"x{self.Dv}"

    @property
    def mode(self):
        parts = []
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window({self.window[0]},{self.window[1]})".replace("None", "-"))
        if self.decode:
            parts.append("decode" if self.Hkv == self.Hq else "gqa-decode")
        elif self.kind == "small":
            parts.append("small")
        return "+".join(parts) or "full"

    def bounds(self):
        """(left, right) of the visible interval around each query position, None = unbounded."""
        left, right = (None, None) if self.window is None else self.window
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    def visible_keys(self):
        """Visible keys of each query row (bottom-right alignment, as fastattn.attention)."""
        left, right = self.bounds()
        p = np.arange(self.Lq, dtype=np.int64) + (self.Lk - self.Lq)
        lo = np.zeros_like(p) if left is None else np.maximum(p - left, 0)
        hi = np.full_like(p, self.Lk - 1) if right is None else np.minimum(p + right, self.Lk - 1)
        return np.maximum(hi - lo + 1, 0)

    def pairs(self):
        return int(self.visible_keys().sum()) * self.B * self.Hq

    def flops(self):
        return 2 * (self.D + self.Dv) * self.pairs()

    def kv_bytes(self):
        """Bytes of K and V a decode call must read: every visible KV row once per KV head."""
        left, right = self.bounds()
        vis = self.visible_keys()
        if self.Lq == 1:
            keys = int(vis[0])
        else:  # the union of the rows' intervals
            keys = min(self.Lk, int(vis.max()) + self.Lq - 1) if vis.max() > 0 else 0
        return self.B * self.Hkv * keys * (self.D + self.Dv) * np.dtype(self.dtype).itemsize

    def key(self):
        return (self.target, self.shape, self.dtype, self.mode)


def parse_shape(text):
    """'B,H,Lq,Lk,D[,Dv][,Hkv]' -> dict of Case fields (an empty Dv, as in 'B,H,Lq,Lk,D,,Hkv',
    means Dv = D; any other empty field is an error, not a shift of the fields after it)."""
    usage = f"bad shape {text!r}: expected B,H,Lq,Lk,D[,Dv][,Hkv]"
    fields = [x.strip() for x in text.replace("x", ",").split(",")]
    while fields and not fields[-1]:
        fields.pop()                                   # a trailing separator
    if len(fields) == 7 and not fields[5]:
        fields[5] = fields[4]                          # B,H,Lq,Lk,D,,Hkv: Dv = D
    try:
        nums = [int(x) for x in fields]
    except ValueError:
        raise argparse.ArgumentTypeError(usage + " (integers, no empty field)") from None
    if not 5 <= len(nums) <= 7 or min(nums) < 1:
        raise argparse.ArgumentTypeError(usage + " of positive integers")
    names = ("B", "Hq", "Lq", "Lk", "D", "Dv", "Hkv")
    if len(nums) == 7 and nums[1] % nums[6]:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: the query heads H = {nums[1]} "
                                         f"must be a multiple of the key/value heads Hkv = "
                                         f"{nums[6]}")
    return dict(zip(names, nums))


def _mem_available():
    """Bytes of memory available to a new allocation (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _input_bytes(case):
    """Peak bytes of one case's q, k, v (drawn in float32, then cast) and fastattn's output."""
    n_in = (case.B * case.Hq * case.Lq * case.D + case.B * case.Hkv * case.Lk * (case.D + case.Dv))
    n_out = case.B * case.Hq * case.Lq * case.Dv
    item = np.dtype(case.dtype).itemsize
    return n_in * item + (4 * n_in if item != 4 else 0) + n_out * item


PREFILL = [(8, 12, 512, 512, 64), (4, 8, 1024, 1024, 128), (1, 16, 2048, 2048, 64)]
DECODE = [dict(B=1, Hq=32, Lq=1, Lk=4096, D=128), dict(B=8, Hq=12, Lq=1, Lk=1024, D=64),
          dict(B=1, Hq=32, Hkv=8, Lq=1, Lk=8192, D=128)]
WINDOW_SHAPE = (1, 16, 4096, 4096, 64)


def suite(full=False):
    """The cases of issue 4's target table, rows a-f (g and h are measured separately)."""
    cases = []
    for s in PREFILL:
        cases.append(Case(*s, target="a"))
    for s in PREFILL:
        cases.append(Case(*s, causal=True, target="b"))
    # row c compares fastattn with itself; peers run this size only with --full (a causal
    # peer call at 4096 costs ~1 s, and a window needs a materialised mask for them)
    c_peers = ("torch", "onnxruntime") if full else ()
    cases.append(Case(*WINDOW_SHAPE, causal=True, target="c", peers=c_peers))
    cases.append(Case(*WINDOW_SHAPE, window=(256, 0), target="c", peers=()))
    for s in DECODE:
        cases.append(Case(**s, target="d"))
    cases.append(Case(*TINY, target="e", kind="small"))
    for dt in ("float64", "float16"):
        cases.append(Case(*PREFILL[0], dtype=dt, target="f"))
    return cases


# ----------------------------------------------------------------------------------------------
# runners: name -> zero-argument callable, built once per (case, threads)

def _inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.dtype(case.dtype)
    q = rng.standard_normal((case.B, case.Hq, case.Lq, case.D), np.float32).astype(dt, copy=False)
    k = rng.standard_normal((case.B, case.Hkv, case.Lk, case.D), np.float32).astype(dt, copy=False)
    v = rng.standard_normal((case.B, case.Hkv, case.Lk, case.Dv), np.float32).astype(dt, copy=False)
    return q, k, v


def _bool_mask(case):
    """The visible set as a (Lq, Lk) bool array (for peers without window / bottom-right)."""
    left, right = case.bounds()
    p = np.arange(case.Lq)[:, None] + (case.Lk - case.Lq)
    j = np.arange(case.Lk)[None, :]
    m = np.ones((case.Lq, case.Lk), bool)
    if left is not None:
        m &= j >= p - left
    if right is not None:
        m &= j <= p + right
    return m


def _peer_visibility(case):
    """('causal' | 'none' | 'mask' | None): how a top-left-causal peer expresses the case."""
    left, right = case.bounds()
    if left is None and right is None:
        return "none"
    if left is None and right == 0 and case.Lq == case.Lk:
        return "causal"
    if case.Lq * case.Lk <= PEER_MASK_MAX:
        return "mask"
    return None


def make_fastattn(case, n, q, k, v):
    kw = {}
    if case.causal:
        kw["causal"] = True
    if case.window is not None:
        kw["window"] = case.window
    att = fastattn.attention
    return lambda: att(q, k, v, num_threads=n, **kw)


def make_reference(case, n, q, k, v):
    if case.pairs() * (case.D + case.Dv) > REFERENCE_MAX_WORK:
        return None, None            # too large for the NumPy reference: not run
    kw = {}
    if case.causal:
        kw["causal"] = True
    if case.window is not None:
        kw["window"] = case.window
    ref = fastattn.reference_attention
    return (lambda: ref(q, k, v, **kw)), ""


def _scores_too_big(case):
    """Why a peer that materialises all B x H x Lq x Lk scores (onnxruntime's CPU Attention;
    torch's SDPA where it falls back to its math path, as with Dv != D: 288 MB at
    1x8x2048x2048x64x32) must not be asked for this case, or ''."""
    scores = case.B * case.Hq * case.Lq * case.Lk * max(4, np.dtype(case.dtype).itemsize)
    avail = _mem_available()
    if avail is not None and scores > avail // 4:
        return f"would materialise {scores / 1e9:.3g} GB of scores"
    return ""


def make_torch(case, n, q, k, v):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, "torch not installed"
    vis = _peer_visibility(case)
    if vis is None:
        return None, "needs a materialised mask"
    too_big = _scores_too_big(case) if case.Dv != case.D or vis == "mask" else ""
    if too_big:
        return None, too_big
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    kw = {}
    if vis == "causal":
        kw["is_causal"] = True
    elif vis == "mask":
        kw["attn_mask"] = torch.from_numpy(_bool_mask(case))
    if case.Hkv != case.Hq:
        try:
            F.scaled_dot_product_attention(tq[..., :1, :], tk[..., :1, :], tv[..., :1, :],
                                           enable_gqa=True)
            kw["enable_gqa"] = True
        except TypeError:  # older torch: expand the KV heads once, outside the timing
            g = case.Hq // case.Hkv
            tk, tv = tk.repeat_interleave(g, dim=1), tv.repeat_interleave(g, dim=1)
    torch.set_num_threads(n)
    sdpa = F.scaled_dot_product_attention

    def call():
        with torch.inference_mode():
            return sdpa(tq, tk, tv, **kw).numpy()
    return call, ""


_ORT_TYPES = {"float32": 1, "float16": 10, "float64": 11}   # onnx.TensorProto enum values


def _ort_model(case, vis):
    """An in-memory ONNX model: one Attention node (opset 23) over 4-D (B, H, L, D) inputs."""
    from onnx import helper
    t = _ORT_TYPES[case.dtype]
    ins = [helper.make_tensor_value_info("Q", t, [case.B, case.Hq, case.Lq, case.D]),
           helper.make_tensor_value_info("K", t, [case.B, case.Hkv, case.Lk, case.D]),
           helper.make_tensor_value_info("V", t, [case.B, case.Hkv, case.Lk, case.Dv])]
    names = ["Q", "K", "V"]
    if vis == "mask":
        ins.append(helper.make_tensor_value_info("M", 9, [case.Lq, case.Lk]))    # BOOL
        names.append("M")
    out = helper.make_tensor_value_info("Y", t, [case.B, case.Hq, case.Lq, case.Dv])
    node = helper.make_node("Attention", names, ["Y"], is_causal=int(vis == "causal"))
    graph = helper.make_graph([node], "attention", ins, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model.SerializeToString()


def make_onnxruntime(case, n, q, k, v):
    try:
        import onnxruntime as ort
        import onnx  # noqa: F401  (the model is built with onnx.helper)
    except ImportError as exc:
        return None, f"{exc.name} not installed"
    vis = _peer_visibility(case)
    if vis is None:
        return None, "needs a materialised mask"
    too_big = _scores_too_big(case)
    if too_big:
        return None, too_big
    so = ort.SessionOptions()
    so.intra_op_num_threads = n
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # idle workers block instead of spinning: spinning costs ORT nothing measurable here but
    # slowed the next library's 2-thread call by 1.4x (8x12x512x64) to 1.6x (GQA decode)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(_ort_model(case, vis), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # an onnxruntime without the opset-23 Attention kernel
        return None, f"no opset-23 Attention: {str(exc).splitlines()[0][:80]}"
    feeds = {"Q": q, "K": k, "V": v}
    if vis == "mask":
        feeds["M"] = _bool_mask(case)
    run = sess.run
    return (lambda: run(None, feeds)[0]), ""


MAKERS = {"torch": make_torch, "onnxruntime": make_onnxruntime, "reference": make_reference}


def peer_versions():
    """Installed peer versions, read from the package metadata (no import: torch is slow)."""
    from importlib import metadata
    out = {}
    for name in ("torch", "onnxruntime", "onnx", "threadpoolctl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------------------------
# timing

def _blas_limit(n, required=False):
    """A context holding the BLAS libraries (NumPy's, SciPy's) to n threads.  Without
    threadpoolctl: a context doing nothing, or None when `required`."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext
        return None if required else nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _blas1_ms(c):
    """The collision figure with NumPy's BLAS held to one thread, or why there is none."""
    t = c.get("after_matmul_blas1")
    return "n/a (threadpoolctl not installed)" if t is None else f"{t * 1e3:.2f} ms"


# NumPy's OpenBLAS workers spin for 2**28 cycles (~0.1 s here) after each threaded call; a
# kernel started meanwhile shares the cores with them.  After a sample of the NumPy reference,
# wait that long, so its threads do not slow whichever library is timed next.
OPENBLAS_SPIN_S = 0.15


def time_interleaved(calls, repeats, min_sample=0.02, settle=0.0, budget=None, min_repeats=3,
                     settle_after=None, capped=(), optional=(), errors=None):
    """Median seconds per call of each callable, repeats interleaved: round r runs them in
    an order rotated by r, reversed on odd rounds (rotation alone gave every callable the
    same predecessor in every round: fastattn at 2 threads always ran right after the NumPy
    reference and its 150 ms sleep, and the same-run 1-thread timing right after fastattn).

    settle: seconds of sleep before each sample; settle_after: {name: seconds} of sleep
    after each sample of that callable.  budget: seconds after which no new round starts
    (once there are min_repeats); capped: callables sampled min_repeats times only, whose
    time the budget does not count (the slow NumPy reference: it took the whole budget of
    the decode rows, which then had three samples each).  optional: callables (the peers)
    whose first call may raise: they are dropped and `errors` gets {name: message}.
    Returns ({name: median}, {name: [samples]}, {name: first output})."""
    settle_after = settle_after or {}
    names = list(calls)
    first, per = {}, {}
    errors = {} if errors is None else errors
    for name in names:                 # warm-up; also sizes the number of calls per sample
        t0 = time.perf_counter()
        try:
            first[name] = calls[name]()
        except Exception as exc:       # a peer that cannot run the call: n/a, not the run's end
            if name not in optional:
                raise
            errors[name] = (f"failed: {type(exc).__name__}: "
                            + (str(exc).strip().splitlines() or [""])[0][:120])
            continue
        dt = time.perf_counter() - t0
        # a first call can wait milliseconds for a sleeping thread or core to wake: a sample
        # sized by it alone holds a few calls, each paying that wake-up after the settle sleep
        # (a 50 us call timed at 5.8 ms).  The fastest of a few more calls sizes it.
        t_end = t0 + min_sample
        for _ in range(WARMUP_CALLS if dt < min_sample else 0):
            t0 = time.perf_counter()
            calls[name]()
            t1 = time.perf_counter()
            dt = min(dt, t1 - t0)
            if t1 > t_end:
                break
        per[name] = max(1, min(100000, int(math.ceil(min_sample / max(dt, 1e-7)))))
        if settle_after.get(name):     # else the first round's first sample pays for it
            time.sleep(settle_after[name])
    names = [name for name in names if name not in errors]
    samples = {name: [] for name in names}
    spent = 0.0                        # the time the budget counts
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order.reverse()
        for name in order:
            if name in capped and len(samples[name]) >= min_repeats:
                continue
            start = time.perf_counter()
            if settle:
                time.sleep(settle)
            f, k = calls[name], per[name]
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            samples[name].append((time.perf_counter() - t0) / k)
            if settle_after.get(name):
                time.sleep(settle_after[name])
            if name not in capped:
                spent += time.perf_counter() - start
        if budget is not None and r + 1 >= min_repeats and spent > budget:
            break
    return {n: float(np.median(s)) for n, s in samples.items()}, samples, first


def sgemm_ceiling(threads, n=1536, repeats=5):
    """Best GF/s of a square float32 GEMM through scipy.linalg.blas.sgemm, per thread count."""
    from scipy.linalg.blas import sgemm
    rng = np.random.default_rng(1)
    a = np.asfortranarray(rng.standard_normal((n, n), np.float32))
    b = np.asfortranarray(rng.standard_normal((n, n), np.float32))
    out = {}
    for t in threads:
        with _blas_limit(t):
            sgemm(1.0, a, b)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sgemm(1.0, a, b)
                ts.append(time.perf_counter() - t0)
        out[t] = {"gflops": 2 * n ** 3 / min(ts) / 1e9,
                  "gflops_median": 2 * n ** 3 / float(np.median(ts)) / 1e9}
    return out


def memory_bandwidth(threads, mbytes=512, repeats=5):
    """Best read GB/s over a float32 array >> L3, split over Python threads (both readers
    release the GIL), per thread count.  Two readers, interleaved, the faster one counts:
    NumPy's max-reduction (one stream per thread) and fastattn's read probe (the same max
    with two accumulators, over two streams per thread, as the decode projections read their
    weights).  On the 2-core Zen 3 here the probe read 23-24 GB/s at one thread where the
    reduction read 18.5-20, so the reduction alone understated the ceiling."""
    a = np.ones(mbytes * (1 << 20) // 4, np.float32)
    readers = {"numpy": np.maximum.reduce, "probe": _kernel.read_probe}
    out = {}
    for t in threads:
        parts = np.array_split(a, t)

        def once(read):
            if t == 1:
                read(parts[0])
                return
            ths = [threading.Thread(target=read, args=(p,)) for p in parts]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
        ts = {name: [] for name in readers}
        for name, read in readers.items():
            once(read)
        for _ in range(repeats):
            for name, read in readers.items():
                t0 = time.perf_counter()
                once(read)
                ts[name].append(time.perf_counter() - t0)
        best = {name: a.nbytes / min(v) / 1e9 for name, v in ts.items()}
        top = max(best, key=best.get)
        out[t] = {"gbs": best[top], "gbs_median": a.nbytes / float(np.median(ts[top])) / 1e9,
                  "reader": top, "gbs_by_reader": best}
    return out


# ----------------------------------------------------------------------------------------------
# the run

@dataclass
class Options:
    threads: tuple = (1,)
    repeats: int = 5
    min_sample: float = 0.02
    settle: float = 0.05
    budget: float = 3.0           # seconds per (case, threads) after min_repeats rounds
    peers: tuple = PEERS
    quick: bool = False
    full: bool = False
    memory: bool = True
    collision: bool = True
    log: object = None


def _tol(dtype):
    return {"float16": 2e-2, "float32": 1e-3, "float64": 1e-8}[dtype]


SAME_RUN_1T_S = 1e-3    # calls faster than this at 1 thread are timed at 1 thread again,
                        # interleaved with the multi-thread run, for criterion g


def run_case(case, opts, res=None):
    """Time one case at every thread count; returns a list of row dicts."""
    rows = []
    q, k, v = _inputs(case)
    t_1t = None
    for n in opts.threads:
        calls = {"fastattn": make_fastattn(case, n, q, k, v)}
        if n > 1 and t_1t is not None and t_1t < SAME_RUN_1T_S:
            # below a millisecond, load drift between the 1- and n-thread phases can exceed
            # the difference being checked ("no shape slower at n threads"): interleave
            calls["fastattn@1"] = make_fastattn(case, 1, q, k, v)
        unavailable = {}
        with _blas_limit(n):
            for peer in opts.peers:
                if peer not in case.peers:
                    continue
                f, why = MAKERS[peer](case, n, q, k, v)
                if f is None:
                    if why:
                        unavailable[peer] = why
                else:
                    calls[peer] = f
            cpu0, wall0 = time.process_time(), time.perf_counter()
            after = {"reference": OPENBLAS_SPIN_S} if n > 1 else {}
            med, samples, first = time_interleaved(
                calls, opts.repeats, opts.min_sample, opts.settle, opts.budget,
                settle_after=after, capped=("reference",),
                optional=tuple(p for p in calls if p in MAKERS), errors=unavailable)
            # CPU time this process got, per requested core, outside the settle sleeps: well
            # below 1 means other jobs took the cores (spinning threads count as CPU, so near
            # 1 does not prove quiet)
            awake = (time.perf_counter() - wall0 - opts.settle * sum(map(len, samples.values()))
                     - sum(after.get(m, 0) * len(s) for m, s in samples.items()))
            cpu = (time.process_time() - cpu0) / max(awake, 1e-9) / n
        same_run_1t = med.pop("fastattn@1", None)
        samples.pop("fastattn@1", None)
        first.pop("fastattn@1", None)
        ref = np.asarray(first["fastattn"], np.float64)
        maxdiff = {p: float(np.max(np.abs(np.asarray(o, np.float64) - ref)))
                   for p, o in first.items() if p != "fastattn"}
        t = med["fastattn"]
        row = {"target": case.target, "shape": case.shape, "dtype": case.dtype, "mode": case.mode,
               "threads": n, "B": case.B, "Hq": case.Hq, "Hkv": case.Hkv, "Lq": case.Lq,
               "Lk": case.Lk, "D": case.D, "Dv": case.Dv, "causal": case.causal,
               "window": list(case.window) if case.window else None, "decode": case.decode,
               "visible_pairs": case.pairs(), "flops": case.flops(), "kv_bytes": case.kv_bytes(),
               "time": t, "gflops": case.flops() / t / 1e9, "gbs": case.kv_bytes() / t / 1e9,
               "peer_time": {p: med[p] for p in med if p != "fastattn"},
               "ratio": {p: med[p] / t for p in med if p != "fastattn"},
               # median over rounds of the ratio within a round (less sensitive to load drift;
               # the reference has samples in the first rounds only)
               "ratio_paired": {p: float(np.median([a / b for a, b in
                                                    zip(samples[p], samples["fastattn"])]))
                                for p in med if p != "fastattn"},
               "cpu_share": cpu, "unavailable": unavailable, "maxdiff": maxdiff,
               "mismatch": [p for p, d in maxdiff.items() if not d <= _tol(case.dtype)],
               "samples": samples}
        if same_run_1t is not None:
            row["time_1t_same_run"] = same_run_1t
        if n == 1:
            t_1t = t
        rows.append(row)
        if opts.log:
            opts.log(format_row(row, res))
    return rows


def collision(n, repeats=30, peers=("torch",)):
    """Attention on 1x12x128x128x64 at n threads: alone, right after a 300x300 NumPy matmul,
    and right after that matmul with NumPy's BLAS held to one thread (threadpoolctl)."""
    from contextlib import nullcontext
    case = Case(1, 12, 128, 128, 64)
    q, k, v = _inputs(case)
    x = np.random.default_rng(2).standard_normal((300, 300), np.float32)
    calls = {"fastattn": make_fastattn(case, n, q, k, v)}
    if "torch" in peers:
        f, _ = make_torch(case, n, q, k, v)
        if f is not None:
            calls["torch"] = f
    out = {}
    for name, f in calls.items():
        res = {}
        f()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        res["alone"] = float(np.median(ts))
        for label, ctx in (("after_matmul", nullcontext()),
                           ("after_matmul_blas1", _blas_limit(1, required=True))):
            if ctx is None:
                res[label] = None
                continue
            ts = []
            with ctx:
                for _ in range(repeats):
                    x @ x
                    t0 = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t0)
            res[label] = float(np.median(ts))
        out[name] = res
        time.sleep(0.05)
    return {"threads": n, "shape": case.shape, "matmul": "300x300 @ 300x300 float32", **out}


def _rss_kb(field_name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _memory_child(spec):
    """Run in a subprocess: peak extra RSS (MB) of one call."""
    case = Case(**spec["case"])
    n, runner = spec["threads"], spec["runner"]
    q, k, v = _inputs(case)
    if runner == "fastattn":
        fastattn.attention(q[..., :8, :], k[..., :8, :], v[..., :8, :], num_threads=n)   # warm
        f = make_fastattn(case, n, q, k, v)
    else:
        small = Case(1, case.Hq, 8, 8, case.D, case.Dv, case.Hkv, case.dtype, case.causal)
        MAKERS[runner](small, n, *_inputs(small))[0]()                                   # warm
        f, why = MAKERS[runner](case, n, q, k, v)
        if f is None:
            print(json.dumps({"error": why}))
            return
    before = _rss_kb("VmRSS")
    method = "VmHWM after clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")          # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        method = "ru_maxrss"
    import resource
    if method == "ru_maxrss":
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = f()
    dt = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") if method != "ru_maxrss" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    print(json.dumps({"extra_mb": (peak - before) / 1024, "method": method, "time": dt}))


def memory(case, threads, runners=("fastattn",)):
    """Peak extra RSS of one call of each runner, each in a fresh subprocess."""
    res = []
    for runner in runners:
        for n in threads:
            spec = {"case": {"B": case.B, "Hq": case.Hq, "Lq": case.Lq, "Lk": case.Lk,
                             "D": case.D, "Dv": case.Dv, "Hkv": case.Hkv, "dtype": case.dtype,
                             "causal": case.causal},
                    "threads": n, "runner": runner}
            p = subprocess.run([sys.executable, "-m", "fastattn.bench", "--json", "",
                                "--_memory-child", json.dumps(spec)],
                               capture_output=True, text=True)
            try:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                r = {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}
            res.append({"runner": runner, "threads": n, "shape": case.shape,
                        "dtype": case.dtype, **r})
    return res


def _busy(machine):
    """A warning when other jobs were loading the machine at the start of the run, else ''."""
    load = machine.get("loadavg_start")
    if load and load[0] > 0.75 * machine["cores"]:
        return (f"load average {load[0]:.2f} on {machine['cores']} cores at the start: other "
                "jobs are running, so figures (above all the multi-thread ones) are pessimistic")
    return ""


def machine_info():
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cores": _all_cores(), "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    info["config"] = fastattn.show_config(print_=False)
    info["peers"] = peer_versions()
    info["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                 "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                 "FASTATTN_NUM_THREADS")}
    return info


def run(cases, opts):
    """Ceilings, cases, thread-collision and memory figures; returns the results dict."""
    log = opts.log or (lambda s: None)
    t_start = time.perf_counter()
    res = {"machine": machine_info(), "options": {
        "threads": list(opts.threads), "repeats": opts.repeats, "min_sample": opts.min_sample,
        "settle": opts.settle, "budget": opts.budget, "peers": list(opts.peers),
        "quick": opts.quick, "full": opts.full}}
    small = opts.quick
    busy = _busy(res["machine"])
    if busy:
        log("WARNING: " + busy)

    def ceilings(when):
        """Measure both ceilings; keep the best seen so far (they are measured at the start
        and again at the end of the run, so a burst of other jobs does not lower them)."""
        sg = sgemm_ceiling(opts.threads, n=384 if small else 1536, repeats=2 if small else 5)
        bw = memory_bandwidth(opts.threads, mbytes=64 if small else 512,
                              repeats=2 if small else 5)
        for key, new, unit in (("sgemm", sg, "gflops"), ("bandwidth", bw, "gbs")):
            cur = res.setdefault(key, {})
            for t, v in new.items():
                v = {**v, "when": when}
                if str(t) not in cur or v[unit] > cur[str(t)][unit]:
                    cur[str(t)] = v
        for t in opts.threads:
            log(f"  {t} thread(s): sgemm {sg[t]['gflops']:.1f} GF/s, "
                f"memory read {bw[t]['gbs']:.1f} GB/s ({bw[t]['reader']})")

    log("ceilings ...")
    ceilings("start")
    log(header())
    rows = []
    for case in cases:
        rows.extend(run_case(case, opts, res))
    res["rows"] = rows
    if not small:
        log("ceilings again ...")
        ceilings("end")
    if opts.collision and max(opts.threads) > 1:
        log("thread collision (NumPy matmul then attention) ...")
        res["collision"] = collision(max(opts.threads), repeats=10 if small else 30,
                                     peers=opts.peers)
    if opts.memory:
        log("memory (subprocess) ...")
        mem_case = Case(1, 1, 16384, 16384, 64, target="h")
        runners = ("fastattn",) + (tuple(p for p in ("torch", "onnxruntime")
                                         if p in opts.peers) if opts.full else ())
        res["memory"] = memory(mem_case, sorted(set(opts.threads)), runners)
    res["targets"] = evaluate(res)
    try:
        res["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    res["elapsed"] = time.perf_counter() - t_start
    return res


# ----------------------------------------------------------------------------------------------
# targets (issue 4)

def _find(rows, target=None, shape=None, dtype="float32", mode=None, threads=None):
    for r in rows:
        if ((target is None or r["target"] == target) and (shape is None or r["shape"] == shape)
                and r["dtype"] == dtype and (mode is None or r["mode"] == mode)
                and (threads is None or r["threads"] == threads)):
            return r
    return None


def _check(tid, what, ok, measured, *rows):
    """A criterion: met True / False (None: a figure, not a criterion), with the lowest CPU
    share of the rows it rests on (well below 1: other jobs held the cores)."""
    shares = [r["cpu_share"] for r in rows if r and "cpu_share" in r]
    return {"target": tid, "what": what, "met": ok, "measured": measured,
            "cpu": min(shares) if shares else None}


CEILING_SLACK = 1.2     # a kernel may beat a ceiling's best sample by noise, not by this much


def _disturbed(frac):
    """A fraction of a ceiling well above 1 says the ceiling's own measurement was disturbed
    (other jobs held the cores then): such a criterion is not met, whatever the figure."""
    return (" (far above 1: the ceiling was measured too low; rerun)"
            if frac > CEILING_SLACK else "")


def evaluate(res):
    """One entry per target criterion that this run measured: met True / False."""
    rows = [r for r in res.get("rows", []) if r["target"]]
    thr = sorted({r["threads"] for r in rows})
    nmax = max(thr) if thr else 1
    out = []

    def vs_peer(target, what, r, peer, need):
        """A ratio criterion of a row that ran; not measured (the peer missing or failing)
        counts as not met, so the summary cannot read 'N of N' over fewer criteria."""
        if r is None:
            return
        x = r["ratio"].get(peer)
        if x is None:
            why = (r.get("unavailable") or {}).get(peer, "not run")
            out.append(_check(target, what, False, f"not measured ({peer}: {why})", r))
        else:
            out.append(_check(target, what, x >= need, f"{x:.2f}x", r))

    for s in PREFILL:
        shape = "x".join(map(str, s))
        for n in thr:
            r = _find(rows, "a", shape, mode="full", threads=n)
            if not r:
                continue
            for peer, name in (("torch", "torch"), ("onnxruntime", "ORT")):
                vs_peer("a", f"{shape} {n}T vs {name} >= 1.0", r, peer, 1.0)
            ceil = res["sgemm"][str(n)]["gflops"]
            frac = r["gflops"] / ceil
            out.append(_check("a", f"{shape} {n}T >= 0.70 of sgemm", 0.70 <= frac <= CEILING_SLACK,
                              f"{r['gflops']:.1f} / {ceil:.1f} GF/s = {frac:.2f}"
                              + _disturbed(frac), r))
    for s, need in ((PREFILL[0], 1.8), (PREFILL[2], 1.15)):
        shape = "x".join(map(str, s))
        for n in thr:
            r = _find(rows, "b", shape, mode="causal", threads=n)
            vs_peer("b", f"{shape} causal {n}T vs torch >= {need}", r, "torch", need)
    ws = "x".join(map(str, WINDOW_SHAPE))
    for n in thr:
        rc = _find(rows, "c", ws, mode="causal", threads=n)
        rw = _find(rows, "c", ws, mode="window(256,0)", threads=n)
        if rc and rw:
            x = rc["time"] / rw["time"]
            out.append(_check("c", f"{ws} window(256,0) vs causal {n}T >= 3", x >= 3,
                              f"{x:.2f}x ({rw['time'] * 1e3:.0f} vs {rc['time'] * 1e3:.0f} ms)",
                              rc, rw))
    bw = (res.get("bandwidth") or {}).get(str(nmax), {}).get("gbs")
    for r in rows:
        if r["target"] != "d":
            continue
        n = r["threads"]
        if n == nmax and bw:
            frac = r["gbs"] / bw
            out.append(_check("d", f"{r['shape']} {n}T >= 0.7 of bandwidth", 0.7 <= frac <= CEILING_SLACK,
                              f"{r['gbs']:.1f} / {bw:.1f} GB/s = {frac:.2f}" + _disturbed(frac),
                              r))
        need = 2.5 if n == 1 else 1.6
        vs_peer("d", f"{r['shape']} {n}T vs torch >= {need}", r, "torch", need)
    for r in rows:
        if r["target"] == "e":
            us = r["time"] * 1e6
            out.append(_check("e", f"{r['shape']} {r['threads']}T <= 10 us/call", us <= 10,
                              f"{us:.1f} us", r))
    for dt, need in (("float64", 1.5), ("float16", 2.0)):
        for n in thr:
            r = _find(rows, "f", dtype=dt, threads=n)
            if r:
                vs_peer("f", f"{r['shape']} {dt} {n}T vs torch >= {need}", r, "torch", need)
    if 1 in thr and nmax > 1:
        r1 = _find(rows, "a", "x".join(map(str, PREFILL[0])), mode="full", threads=1)
        r2 = _find(rows, "a", "x".join(map(str, PREFILL[0])), mode="full", threads=nmax)
        if r1 and r2:
            x = r1["time"] / r2["time"]
            out.append(_check("g", f"{r1['shape']} {nmax}T vs 1T >= 1.8x", x >= 1.8,
                              f"{x:.2f}x", r1, r2))
        slower = []
        for r in rows:
            if r["threads"] != nmax:
                continue
            o = _find(rows, r["target"], r["shape"], r["dtype"], r["mode"], threads=1)
            t1 = r.get("time_1t_same_run", o["time"] if o else None)
            if o and r["time"] > t1:
                slower.append(f"{r['shape']} {r['dtype']} {r['mode']} "
                              f"({t1 * 1e3:.3g} -> {r['time'] * 1e3:.3g} ms)")
        n_pairs = sum(1 for r in rows if r["threads"] == nmax)
        rechecked = sum(1 for r in rows if "time_1t_same_run" in r)
        out.append(_check("g", f"no shape slower at {nmax}T than at 1T", not slower,
                          ("; ".join(slower) if slower else f"all {n_pairs} shapes faster")
                          + (f" ({rechecked} sub-ms calls against 1T timed in the same rounds)"
                             if rechecked else ""),
                          *[r for r in rows if r["threads"] == nmax]))
    col = res.get("collision")
    if col and "fastattn" in col:
        c = col["fastattn"]
        x = c["after_matmul"] / c["alone"]
        out.append(_check("g", f"{col['shape']} {col['threads']}T right after a NumPy "
                          "matmul (figure for the README)", None,
                          f"{c['alone'] * 1e3:.2f} alone, {c['after_matmul'] * 1e3:.2f} after "
                          f"({x:.2f}x); {_blas1_ms(c)} with NumPy BLAS at 1T"))
    for m in res.get("memory", []):
        if m["runner"] == "fastattn":
            # a failed subprocess is a criterion not met, not one that leaves the count
            out.append(_check("h", f"{m['shape']} {m['threads']}T < 64 MB extra",
                              "extra_mb" in m and m["extra_mb"] < 64,
                              f"{m['extra_mb']:.1f} MB" if "extra_mb" in m else
                              f"not measured: {m.get('error', 'no result')}"))
    return out


# ----------------------------------------------------------------------------------------------
# output

def _fmt_time(t):
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def _fmt_ratio(row, peer):
    if peer in row["ratio"]:
        s = f"{row['ratio'][peer]:.2f}"
        return s + "!" if peer in row["mismatch"] else s
    return "n/a" if peer in row["unavailable"] else "-"


COLUMNS = ("tgt", "shape", "dtype", "mode", "thr", "fastattn", "rate", "of ceil",
           "torch", "ort", "ref", "cpu")
WIDTHS = (3, 20, 7, 13, 3, 10, 11, 7, 6, 6, 7, 4)


def header():
    line = " ".join(f"{c:<{w}}" if i < 4 else f"{c:>{w}}"
                    for i, (c, w) in enumerate(zip(COLUMNS, WIDTHS)))
    return line + "\n" + "-" * len(line)


def _rate(row, res):
    """(text, fraction of the ceiling) of a row: GB/s of the bandwidth for decode, else GF/s
    of sgemm at the same thread count."""
    n = str(row["threads"])
    if row["decode"]:
        bw = res["bandwidth"][n]["gbs"] if res and res.get("bandwidth") else None
        return f"{row['gbs']:.1f} GB/s", (row["gbs"] / bw if bw else None)
    if row["mode"] == "small":
        return "-", None
    ceil = res["sgemm"][n]["gflops"] if res and res.get("sgemm") else None
    return f"{row['gflops']:.1f} GF/s", (row["gflops"] / ceil if ceil else None)


def _cells(row, res):
    rate, frac = _rate(row, res)
    return [row["target"], row["shape"], row["dtype"], row["mode"], str(row["threads"]),
            _fmt_time(row["time"]), rate, "-" if frac is None else f"{frac:.2f}",
            _fmt_ratio(row, "torch"), _fmt_ratio(row, "onnxruntime"), _fmt_ratio(row, "reference"),
            f"{row['cpu_share']:.2f}" if "cpu_share" in row else "-"]


def format_row(row, res):
    return " ".join(f"{c:<{w}}" if i < 4 else f"{c:>{w}}"
                    for i, (c, w) in enumerate(zip(_cells(row, res), WIDTHS)))


def text_report(res):
    lines = ["== results ==", header()]
    lines += [format_row(r, res) for r in res["rows"]]
    lines.append("")
    lines.append("time: median per call.  rate: GF/s (2*(D+Dv) flops per visible pair) or, for "
                 "decode, GB/s of K+V read.  of ceil: fraction of sgemm (or of memory read "
                 "bandwidth) at the same thread count.  torch/ort/ref: peer time / fastattn time "
                 "(>1: fastattn faster; '!': outputs differ; n/a: peer cannot run it; "
                 "-: not run).  cpu: CPU time the process got per requested core while the "
                 "row ran (well below 1: other jobs took the cores).")
    col = res.get("collision")
    if col:
        lines.append("")
        lines.append(f"thread collision, {col['shape']} at {col['threads']} threads, after a "
                     f"{col['matmul']}:")
        for name in ("fastattn", "torch"):
            if name in col:
                c = col[name]
                lines.append(f"  {name:<9} alone {c['alone'] * 1e3:.2f} ms, after the matmul "
                             f"{c['after_matmul'] * 1e3:.2f} ms, after it with NumPy's BLAS at 1 "
                             f"thread {_blas1_ms(c)}")
    for m in res.get("memory", []):
        if "extra_mb" in m:
            lines.append(f"memory: {m['runner']} {m['shape']} {m['threads']}T: peak extra RSS "
                         f"{m['extra_mb']:.1f} MB ({m['method']}; one call {m['time']:.2f} s)")
        else:
            lines.append(f"memory: {m['runner']} {m['shape']} {m['threads']}T: {m['error']}")
    if res.get("targets"):
        lines.append("")
        lines.append("targets (issue 4):")
        for t in res["targets"]:
            tag = "info" if t["met"] is None else "met " if t["met"] else "MISS"
            cpu = f" (cpu {t['cpu']:.2f})" if t.get("cpu") is not None and t["cpu"] < 0.8 else ""
            lines.append(f"  [{tag}] {t['target']}: {t['what']}: {t['measured']}{cpu}")
    return "\n".join(lines)


def command_line(argv, program="python -m fastattn.bench"):
    """The command that reproduces this run, with the OpenBLAS variables as they were."""
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    if all(v is None for v in env.values()):
        prefix = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "
    else:
        prefix = "".join(f"{k}={v} " for k, v in env.items() if v is not None)
    return prefix + program + "".join(" " + a for a in argv)


def markdown(res, argv):
    m = res["machine"]
    cfg = m["config"]
    out = ["# fastattn benchmark results", "",
           "Generated by the harness; regenerate with the command below (it rewrites this file).",
           "", "```", command_line(argv), "```", "",
           f"Run of {time.strftime('%Y-%m-%d %H:%M', time.localtime(res.get('stamp')))}"
           f", {res['elapsed']:.0f} s.", "",
           "## Machine", "",
           f"- CPU: {m['cpu']}, {m['cores']} cores usable; Python {m['python']}; {m['platform']}",
           f"- `fastattn.show_config()`: " + ", ".join(f"{k} = `{v}`" for k, v in cfg.items()),
           "- peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in m["peers"].items()),
           "- environment: " + ", ".join(f"{k}={v if v is not None else '(unset)'}"
                                        for k, v in m["env"].items()),
           f"- load average at start / end: {_load(m.get('loadavg_start'))} / "
           f"{_load(m.get('loadavg_end'))} (the 2 cores are shared with other jobs: figures are "
           f"medians of interleaved repeats, and every ratio comes from the same run)",
           *([f"- **WARNING: {_busy(m)}**"] if _busy(m) else []),
           "", "## Ceilings (measured at the start and at the end of the run; the best sample)",
           "",
           "| threads | sgemm (float32, 1536^3) "
           "| memory read (max over 512 MB, the faster of two readers) |",
           "|---|---|---|"]
    for t in res["options"]["threads"]:
        bw = res["bandwidth"][str(t)]
        readers = ", ".join(f"{k} {v:.1f}" for k, v in bw.get("gbs_by_reader", {}).items())
        out.append(f"| {t} | {res['sgemm'][str(t)]['gflops']:.1f} GF/s | "
                   f"{bw['gbs']:.1f} GB/s" + (f" ({readers})" if readers else "") + " |")
    met = sum(1 for t in res["targets"] if t["met"])
    crit = sum(1 for t in res["targets"] if t["met"] is not None)
    if res["targets"]:      # a custom run of other shapes has none
        out += ["", "## Targets (issue 4)", "",
                f"**{met} of {crit} criteria met.**  Each ratio is peer time / "
                "fastattn time from this run.  'cpu' is the lowest CPU share of the rows a "
                "criterion rests on (see the timings below): well below 1, other jobs held the "
                "cores and the figure says little about fastattn.  The encoder-layer and "
                "greedy-decode figures of the blocks issue come from `bench/bench_blocks.py` "
                "(its own section, appended below when it has been run).",
                "", "| # | criterion | measured | cpu | met |", "|---|---|---|---|---|"]
        for t in res["targets"]:
            met_s = "(figure)" if t["met"] is None else "yes" if t["met"] else "**NO**"
            cpu = "-" if t.get("cpu") is None else f"{t['cpu']:.2f}"
            out.append(f"| {t['target']} | {t['what']} | {t['measured']} | {cpu} | {met_s} |")
    out += ["", "## All timings", "",
            "Times are medians per call.  Rate is GF/s with 2·(D+Dv) flops per *visible* "
            "(query, key) pair (causal and window count only the visible pairs), or for decode "
            "(Lq = 1) GB/s of K and V read (each KV row once per KV head).  'of ceil' is the "
            "fraction of the sgemm ceiling (decode: of the memory read bandwidth) at the same "
            "thread count.  Peer columns are peer time / fastattn time: > 1 means fastattn is "
            "faster; n/a: the peer cannot express the call without a materialised mask, or is "
            "unavailable (not installed, or it failed: the JSON's 'unavailable' says why); -: not "
            "run (reference_attention only on small shapes; peers on row c only with --full); "
            "'!' marks a peer whose output differed from fastattn's.  'cpu' is the CPU time "
            "the process got per requested core while the row ran: well below 1 means other "
            "jobs held the cores (spinning threads count as CPU, so a value near 1 does not "
            "prove the machine was quiet).", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in res["rows"]:
        out.append("| " + " | ".join(_cells(r, res)) + " |")
    col = res.get("collision")
    if col:
        out += ["", f"## Thread collision ({col['shape']}, {col['threads']} threads, "
                f"right after a {col['matmul']} NumPy matmul; median of 30)", "",
                "| library | alone | after the matmul | after it, NumPy's BLAS held to 1 thread |",
                "|---|---|---|---|"]
        for name in ("fastattn", "torch"):
            if name in col:
                c = col[name]
                out.append(f"| {name} | {c['alone'] * 1e3:.2f} ms | {c['after_matmul'] * 1e3:.2f} "
                           f"ms | {_blas1_ms(c)} |")
    if res.get("memory"):
        out += ["", "## Memory (one call in a fresh subprocess; peak RSS during the call minus "
                "RSS before it, the output included)", "", "| runner | shape | threads | extra |",
                "|---|---|---|---|"]
        for mm in res["memory"]:
            val = f"{mm['extra_mb']:.1f} MB" if "extra_mb" in mm else mm["error"]
            out.append(f"| {mm['runner']} | {mm['shape']} | {mm['threads']} | {val} |")
    out.append("")
    return "\n".join(out)


BLOCKS_SECTION = "## Transformer blocks (issue 3), from `bench/bench_blocks.py`"


def _keep_blocks_section(path, md):
    """The report with the blocks section (bench/bench_blocks.py's) that `path` already holds,
    so regenerating the attention report does not delete the blocks figures."""
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        return md
    if BLOCKS_SECTION not in old:
        return md
    return md.rstrip() + "\n\n" + old[old.index(BLOCKS_SECTION):].rstrip() + "\n"


def _load(x):
    return "-" if not x else "/".join(f"{v:.2f}" for v in x)


def plot(res, path):
    """A PNG: ratio vs each peer and fraction of the ceiling, per row.  False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        return False
    rows = res["rows"]
    short = {"float32": "f32", "float64": "f64", "float16": "f16"}
    labels = [f"{r['target']} {r['shape']} {short.get(r['dtype'], r['dtype'])} {r['mode']} "
              f"{r['threads']}T" for r in rows]
    y = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.28 * len(rows) + 1.5), sharey=True)
    hgt = 0.38
    for i, (peer, color) in enumerate((("torch", "tab:orange"), ("onnxruntime", "tab:green"))):
        vals = [r["ratio"].get(peer, np.nan) for r in rows]
        ax1.barh(y + (i - 0.5) * hgt, vals, height=hgt, color=color, label=f"vs {peer}")
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xscale("log")
    ticks = [0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32]
    ax1.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{t:g}" for t in ticks]))
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xlabel("peer time / fastattn time (> 1: fastattn faster)")
    ax1.set_yticks(y, labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.legend(fontsize=8)
    fr = [_rate(r, res)[1] or 0.0 for r in rows]
    ax2.barh(y, fr, color=["tab:purple" if r["decode"] else "tab:blue" for r in rows])
    ax2.axvline(0.7, color="k", lw=0.8, ls="--")
    ax2.set_xlabel("fraction of sgemm ceiling (blue) / memory bandwidth (purple)")
    fig.suptitle(f"fastattn {fastattn.__version__}: {res['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# command line

def _threads_arg(text):
    try:
        t = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        t = ()
    if not t or min(t) < 1 or max(t) > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"bad --threads {text!r}: expected e.g. 1,2 (each in "
                                         f"[1, {MAX_THREADS}])")
    return tuple(sorted(set(t)))     # 1 first (criterion g times 1 thread first); no repeats


def _positive_arg(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def _seconds_arg(text):
    try:
        t = float(text)
    except ValueError:
        t = -1.0
    if not 0 <= t < math.inf:
        raise argparse.ArgumentTypeError(f"bad --settle {text!r}: expected seconds >= 0")
    return t


def _check_output(parser, path, option):
    """Refuse, before any measurement, an output path that cannot be written."""
    if path == "-" and option != "--markdown":       # only the report can go to stdout
        parser.error(f"{option}: '-' (stdout) is not supported here: give a path, or '' "
                     "for none")
    if not path or path == "-":
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        existed = os.path.exists(path)
        with open(path, "a"):
            pass
        if not existed:
            os.remove(path)
    except OSError as exc:
        parser.error(f"{option}: cannot write {path!r} ({exc.strerror})")


def _window_arg(text):
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"bad --window {text!r}: expected LEFT,RIGHT")
    try:
        return tuple(None if p.strip().lower() in ("", "none", "-") else int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --window {text!r}: expected LEFT,RIGHT") from None


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m fastattn.bench",
        description="Benchmark fastattn.attention against its peers (torch SDPA, onnxruntime "
                    "Attention, the NumPy reference) and the machine's sgemm and memory "
                    "ceilings.  Without --shapes/--causal/--window/--decode/--dtype it runs the "
                    "target table of issue 4.")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="B,H,Lq,Lk,D[,Dv][,Hkv]",
                   help="custom shapes (H = query heads; Hkv = key/value heads for GQA)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes (float32, float64, float16) for custom runs")
    p.add_argument("--threads", type=_threads_arg, default=None,
                   help=f"comma-separated thread counts (default 1,{_all_cores()})")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--window", type=_window_arg, metavar="L,R",
                   help="sliding window (left, right); 'none' for an unbounded side")
    p.add_argument("--decode", action="store_true",
                   help="decode: Lq = 1 (the given shapes, or the issue's decode shapes)")
    p.add_argument("--repeats", type=_positive_arg, default=None,
                   help="interleaved repeats (default 5)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true",
                       help="few repeats, small ceiling measurements, no memory subprocess")
    speed.add_argument("--full", action="store_true",
                       help="more repeats and time per case; peers on row c; torch memory too")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers among torch,onnxruntime,reference ('' = none)")
    p.add_argument("--settle", type=_seconds_arg, default=None,
                   help="seconds of sleep before each sample, to let the previous library's "
                        "spinning threads stop (default 0.05: onnxruntime's pool spins for "
                        "milliseconds after a run and halved fastattn's 2-thread speed at 2 ms)")
    p.add_argument("--json", default=os.path.join("bench", "out", "results.json"),
                   metavar="PATH", help="where to write the JSON results ('' = nowhere)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG path (default: next to the JSON, .png); '' = no plot")
    p.add_argument("--markdown", nargs="?", const="-", default=None, metavar="PATH",
                   help="emit the RESULTS.md report (to PATH, or stdout)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocess (row h)")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return p


def cases_from_args(args, parser):
    """The cases the options ask for (and whether they are custom); a bad option stops with
    parser.error."""
    error = parser.error
    custom = bool(args.shapes or args.causal or args.window or args.decode
                  or args.dtype is not None)
    if not custom:
        return suite(full=args.full), False
    given = "float32" if args.dtype is None else args.dtype
    dtypes = [d.strip() for d in given.split(",") if d.strip()]
    if args.dtype is not None and not dtypes:
        error(f"argument --dtype: no dtype in {args.dtype!r} (float32, float64, float16)")
    for d in dtypes:
        if d not in _ORT_TYPES:
            error(f"argument --dtype: unknown dtype {d!r} (float32, float64, float16)")
    if args.shapes:
        shapes = list(args.shapes)
    elif args.decode:
        shapes = [dict(s) for s in DECODE]
    elif args.window:
        shapes = [dict(zip(("B", "Hq", "Lq", "Lk", "D"), WINDOW_SHAPE))]
    else:
        shapes = [dict(zip(("B", "Hq", "Lq", "Lk", "D"), s)) for s in PREFILL]
    cases = []
    for s in shapes:
        s = dict(s)
        if args.decode:
            s["Lq"] = 1
        for d in dtypes:
            cases.append(Case(**s, dtype=d, causal=args.causal, window=args.window))
    avail = _mem_available()
    for c in cases:
        need = _input_bytes(c)
        if avail is not None and need > avail // 2:
            error(f"argument --shapes: {c.shape} {c.dtype} needs {need / 1e9:.3g} GB for q, k, v "
                  f"and the output, more than half the {avail / 1e9:.3g} GB of memory available")
        if c.pairs() == 0:
            error(f"argument --window: {c.shape} {c.mode} leaves no (query, key) pair visible: "
                  "nothing to time")
    return cases, True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_child:           # writes nothing: no output path to check (or to create)
        _memory_child(json.loads(args.memory_child))
        return 0
    for path, option in ((args.json, "--json"), (args.plot, "--plot"),
                         (args.markdown, "--markdown")):
        _check_output(parser, path, option)
    peers = tuple(dict.fromkeys(p.strip() for p in args.peers.split(",") if p.strip()))
    bad = [p for p in peers if p not in PEERS]
    if bad:
        parser.error(f"argument --peers: unknown {', '.join(map(repr, bad))} (choose among "
                     f"{', '.join(PEERS)}, or '' for none)")
    cases, custom = cases_from_args(args, parser)
    nmax = _all_cores()
    threads = args.threads or ((1, nmax) if nmax > 1 else (1,))
    if max(threads) > nmax:
        print(f"WARNING: --threads {max(threads)} is more than the {nmax} usable cores: the "
              f"threads share cores, so its rates and its 'cpu' column (at most "
              f"{nmax / max(threads):.2f}) say nothing about other jobs", flush=True)
    repeats = args.repeats or (2 if args.quick else 9 if args.full else 5)
    opts = Options(threads=threads, repeats=repeats,
                   min_sample=0.002 if args.quick else 0.02,
                   settle=(args.settle if args.settle is not None
                           else 0.0 if args.quick else 0.05),
                   budget=1.0 if args.quick else 30.0 if args.full else 3.0,
                   peers=peers, quick=args.quick, full=args.full,
                   memory=not (args.no_memory or args.quick or custom),
                   collision=not custom,
                   log=lambda s: print(s, flush=True))
    res = run(cases, opts)
    res["stamp"] = time.time()
    res["command"] = command_line(argv)
    print()
    print(text_report(res))
    if _busy(res["machine"]):
        print("WARNING: " + _busy(res["machine"]))
    print(f"\nelapsed {res['elapsed']:.1f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
        print(f"wrote {args.json}")
    plot_path = args.plot if args.plot is not None else (
        os.path.splitext(args.json)[0] + ".png" if args.json else "")
    if plot_path:
        if plot(res, plot_path):
            print(f"wrote {plot_path}")
        else:
            print("matplotlib is not installed: no plot (pip install 'fastattn[plot]')")
    if args.markdown:
        md = markdown(res, argv)
        if args.markdown == "-":
            print(md)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
            md = _keep_blocks_section(args.markdown, md)
            with open(args.markdown, "w") as f:
                f.write(md)
            print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
