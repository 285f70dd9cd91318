"""fastattn.attention: argument checking, dtype and layout policy, tiling, and the kernel call.

Everything a user can get wrong is checked here, before any work, with an error that names
the argument and the shapes involved.  The kernel (``_kernel.pyx``) then receives operands it
can read in place: per-batch element offsets (so any number of batch axes, broadcast axes
being stride 0), head/row/feature strides, and K/V whose rows BLAS can read directly.
"""
import functools
import math
import operator

import numpy as np

from . import _kernel
from ._threads import (MAX_THREADS, blas_guard, check_num_threads, get_num_threads,
                       parallel_threads)

__all__ = ["attention"]

INT32_MAX = 2**31 - 1       # BLAS sizes and leading dimensions are 32-bit here
_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
_NATIVE_FLOATS = (_F16, _F32, _F64)
_UNBOUNDED = 1 << 42        # a window bound that no key index reaches
_OFFSET_LIMIT = 1 << 40     # query offsets up to this go as they are; beyond, _fold_window
MAX_BATCH_AXES = 32         # the kernel's limit (NumPy's own is 64 axes in all)
BLOCK_Q = 256               # query rows per work item
BLOCK_K = 512               # keys per tile ...
TILE_ELEMENTS = 1 << 18     # ... fewer for wide heads: a tile's K (or V) stays within this
STREAM_TILE_ELEMENTS = 1 << 15  # ... and within this where several rows are streamed
EDGE_K = 64                 # keys per chunk where rows see different key ranges
SPLIT_MIN_WORK = 8          # fewer work items than this: split the KV axis (decode) ...
SPLIT_MIN_KEYS = 1024       # ... into chunks of at least this many keys
SERIAL_FLOPS = 1 << 20      # calls below this many flops ...
SERIAL_KV_BYTES = 1 << 18   # ... and this many bytes of K and V run on the calling thread
SMALL_ROWS = _kernel.SMALL_ROWS_LIMIT  # the kernel streams K/V without BLAS for so few rows
BLAS_THREADED_FLOPS = 65536  # OpenBLAS may thread a GEMM from M·N·K = 4 x this; stay clear


def _float_array(x, name):
    """x as an ndarray of a float dtype the kernel can read: native byte order, aligned."""
    if type(x) is np.ndarray and x.dtype in _NATIVE_FLOATS and x.flags.aligned:
        return x
    if type(x) is not np.ndarray:   # subclasses too: np.matrix stays 2-D under x[None]
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be an array of floats: {exc}") from None
    dt = x.dtype
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {dt}")
    if not dt.isnative or not x.flags.aligned:
        x = x.astype(dt.newbyteorder("="), copy=True)
    return x


def _cast(a, dtype):
    """a.astype(dtype); float16 <-> float32 of C-contiguous arrays through F16C (NumPy's own
    conversion costs about 2 ns an element here, a fifth of a float16 call)."""
    if a.flags.c_contiguous and (a.dtype, dtype) in ((_F16, _F32), (_F32, _F16)):
        out = np.empty(a.shape, dtype)
        if _kernel.convert_half(a, out):
            return out
    return a.astype(dtype)


def _shape_str(*named):
    return ", ".join(f"{n} {tuple(a.shape)}" for n, a in named)


def _index(x, name):
    """A Python int from an int-like scalar (bool excluded)."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}") from None


def _int_per_batch(x, name, batch_shape):
    """An int argument broadcast to the batch shape, as an int64 array (not yet clipped)."""
    try:
        a = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an integer or an integer array: {exc}") from None
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer or an integer array, got dtype {a.dtype}")
    if a.ndim > len(batch_shape) and all(n == 1 for n in a.shape[: a.ndim - len(batch_shape)]):
        a = a.reshape(a.shape[a.ndim - len(batch_shape):])
    try:
        if np.broadcast_shapes(a.shape, batch_shape) != batch_shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to the batch shape "
                         f"{batch_shape}") from None
    return a


def _blas_ready(a):
    """a (..., L, F) with rows BLAS can read: unit feature stride, 1 <= F <= ld <= 2**31-1."""
    if a.flags.c_contiguous:        # ld = F, which _prepare has checked against the limit
        return a
    L, F = a.shape[-2:]
    isz = a.itemsize
    unit = F <= 1 or a.strides[-1] == isz
    ld = a.strides[-2] // isz
    if unit and (L <= 1 or max(1, F) <= ld <= INT32_MAX):
        return a
    return np.ascontiguousarray(a)


class _Call:
    """A checked attention call: operands in the compute dtype, sizes and visibility."""
    __slots__ = ("query", "key", "value", "mask", "batch_shape", "sizes",
                 "scale", "softcap", "left", "right", "qoff", "klen", "out_dtype", "dtype",
                 "num_threads", "out", "squeeze")


def _prepare(query, key, value, *, mask, causal, query_offset, window, key_lengths, scale,
             softcap, out, num_threads):
    q = _float_array(query, "query")
    k = _float_array(key, "key")
    v = _float_array(value, "value")
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        for name, a in (("query", q), ("key", k), ("value", v)):
            if a.ndim < 2:
                raise ValueError(f"{name} must have at least 2 dimensions (L, D), got shape "
                                 f"{a.shape}")
    if q.dtype == k.dtype == v.dtype:
        out_dtype = q.dtype
    else:
        out_dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    dtype = _F32 if out_dtype == _F16 else out_dtype
    squeeze = q.ndim == k.ndim == v.ndim == 2
    if q.ndim == 2 or k.ndim == 2 or v.ndim == 2:
        q, k, v = (a[None] if a.ndim == 2 else a for a in (q, k, v))  # (*b, H, L, D)

    hq, lq, d = q.shape[-3:]
    hkv, lk, dk = k.shape[-3:]
    hv, lv, dv = v.shape[-3:]
    if dk != d:
        raise ValueError(f"query and key must have the same feature size D: "
                         f"{_shape_str(('query', q), ('key', k))}")
    if lv != lk or hv != hkv:
        raise ValueError(f"key and value must have the same heads and length: "
                         f"{_shape_str(('key', k), ('value', v))}")
    if hkv == 0 and hq != 0 or hkv and hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}): "
                         f"{_shape_str(('query', q), ('key', k))}")
    batch_shape = q.shape[:-3]
    try:
        if k.shape[:-3] != batch_shape or v.shape[:-3] != batch_shape:
            batch_shape = np.broadcast_shapes(batch_shape, k.shape[:-3], v.shape[:-3])
    except ValueError:
        raise ValueError(f"the batch axes of query, key and value do not broadcast: "
                         f"{_shape_str(('query', q), ('key', k), ('value', v))}") from None
    if len(batch_shape) > MAX_BATCH_AXES:
        raise ValueError(f"at most {MAX_BATCH_AXES} batch axes are supported, got "
                         f"{len(batch_shape)}: {_shape_str(('query', q), ('key', k))}")
    if max(lq, lk, d, dv, hq) > INT32_MAX:
        for name, n in (("Lq", lq), ("Lk", lk), ("D", d), ("Dv", dv), ("Hq", hq)):
            if n > INT32_MAX:
                raise ValueError(f"{name} = {n} exceeds the 32-bit BLAS limit 2**31 - 1")

    # float16 K and V stay float16: the kernel converts them a tile at a time (converting the
    # whole arrays first read them once and wrote and read them again at twice the size)
    kv_half = dtype == _F32 and k.dtype == v.dtype == _F16
    if q.dtype != dtype:
        q = _cast(q, dtype)
    if not kv_half and (k.dtype != dtype or v.dtype != dtype):
        k, v = (_cast(a, dtype) if a.dtype != dtype else a for a in (k, v))

    c = _Call()
    c.query, c.key, c.value = q, k, v
    c.batch_shape = batch_shape
    nb = math.prod(batch_shape)
    c.sizes = (nb, hq, hkv, lq, lk, d, dv)
    c.out_dtype, c.dtype, c.squeeze = out_dtype, dtype, squeeze

    # mask: bool (True = attend) or additive float, broadcasting to (*batch, Hq, Lq, Lk)
    full = batch_shape + (hq, lq, lk)
    c.mask = None
    if mask is not None:
        try:
            m = np.asarray(mask)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"mask must be a bool or float array: {exc}") from None
        if m.dtype != np.bool_ and m.dtype.kind != "f":
            raise TypeError(f"mask must be a bool or float array, got dtype {m.dtype}")
        try:
            ok = np.broadcast_shapes(m.shape, full) == full
        except (ValueError, RuntimeError):     # RuntimeError: more than 32 axes
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {m.shape} does not broadcast to (*batch, Hq, Lq, Lk) "
                             f"= {full}")
        if m.dtype.kind == "f" and (m.dtype != dtype or not m.dtype.isnative):
            # convert the distinct values only: a broadcast (stride 0) axis becomes length 1,
            # which broadcasts as well, so the mask is never built at the full size
            m = m[tuple(slice(0, 1) if st == 0 else slice(None) for st in m.strides)]
            if m.dtype.itemsize > dtype.itemsize:
                # narrowing (float64 mask, float32 compute): finite values stay finite, as
                # very negative but finite (finfo.min) rather than -inf, which hides the key
                big = np.finfo(dtype).max
                m = np.where(np.isinf(m), m, np.clip(m, -big, big))
            m = m.astype(dtype)
        if not m.flags.aligned:
            m = m.copy()
        if m.ndim < 3:
            m = m.reshape((1,) * (3 - m.ndim) + m.shape)
        c.mask = m

    # key_lengths -> klen (NB,), query_offset -> qoff (NB,)
    klen = qoff = None          # None: the kernel uses Lk and Lk - Lq
    if type(key_lengths) is int:        # a plain int: no array round trip
        if not 0 <= key_lengths <= lk:
            raise ValueError(f"key_lengths must lie in [0, Lk] = [0, {lk}], got {key_lengths}")
        klen = np.full(nb, key_lengths, np.int64)
    elif key_lengths is not None:
        kl = _int_per_batch(key_lengths, "key_lengths", batch_shape)
        if kl.size and (kl.min() < 0 or kl.max() > lk):
            raise ValueError(f"key_lengths must lie in [0, Lk] = [0, {lk}], got values in "
                             f"[{kl.min()}, {kl.max()}]")
        # a copy, never the caller's array: `out` may share its memory
        klen = np.broadcast_to(kl, batch_shape).astype(np.int64).reshape(-1)
    exact = None                # the offsets as Python ints where some lie beyond the limit
    if type(query_offset) is int:
        qoff = np.full(nb, max(-_OFFSET_LIMIT, min(_OFFSET_LIMIT, query_offset)), np.int64)
        if abs(query_offset) > _OFFSET_LIMIT:
            exact = [query_offset] * nb
    elif query_offset is not None:
        qo = _int_per_batch(query_offset, "query_offset", batch_shape)
        if qo.size and (qo.max() > _OFFSET_LIMIT or qo.min() < -_OFFSET_LIMIT):
            exact = np.broadcast_to(qo, batch_shape).reshape(-1).tolist()
        if qo.dtype.kind == "u":
            qo = np.minimum(qo.astype(np.uint64), np.uint64(_OFFSET_LIMIT))
        else:
            qo = np.clip(qo.astype(np.int64), -_OFFSET_LIMIT, _OFFSET_LIMIT)
        qoff = np.broadcast_to(qo, batch_shape).astype(np.int64).reshape(-1)
    c.klen = klen

    # window and causal -> one interval p - left <= j <= p + right (None: unbounded)
    wl = wr = None
    if window is not None:
        try:
            wl, wr = window
        except (TypeError, ValueError):
            raise ValueError(f"window must be a pair (left, right) of ints or None, "
                             f"got {window!r}") from None
        wl = None if wl is None else _index(wl, "window[0]")
        wr = None if wr is None else _index(wr, "window[1]")
    if causal is not False and causal is not True and not isinstance(causal, np.bool_):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal:
        wr = 0 if wr is None else min(wr, 0)
    if exact is None:
        # offsets within the limit: a bound clipped at 2**42 still passes every key
        c.qoff = qoff
        c.left, c.right = (_UNBOUNDED if w is None else max(-_UNBOUNDED, min(_UNBOUNDED, w))
                           for w in (wl, wr))
    else:
        qoff, c.left, c.right = _fold_window(exact, wl, wr)
        c.qoff = np.array(qoff, np.int64)

    # the kernel computes in `dtype`: scale and softcap must be finite there, softcap > 0
    fin = np.finfo(dtype)
    big, tiny = float(fin.max), float(fin.smallest_subnormal)
    if scale is None:
        c.scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    else:
        c.scale = _real(scale, "scale")
        if not abs(c.scale) <= big:
            raise ValueError(f"scale must be finite in {dtype} (the compute dtype), got {scale!r}")
    if softcap is None:
        c.softcap = 0.0
    else:
        c.softcap = _real(softcap, "softcap")
        if not tiny <= c.softcap <= big:
            raise ValueError(f"softcap must be a number > 0 and finite in {dtype} (the compute "
                             f"dtype), got {softcap!r}")

    c.num_threads = get_num_threads() if num_threads is None else check_num_threads(num_threads)

    c.out = None
    if out is not None:
        shape = batch_shape + (hq, lq, dv)
        if squeeze:
            shape = shape[1:]
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}")
        if out.dtype != out_dtype:
            raise ValueError(f"out has dtype {out.dtype}, expected {out_dtype}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        c.out = out
    return c


def _fold_window(offsets, left, right):
    """(offsets, left, right) in int64 range that show every query row the keys the exact
    ones do (Python ints, huge ones included; left/right None: unbounded).

    Row i of batch item b sees [o_b + i - left, o_b + i + right], so only o_b - left and
    o_b + right matter, and only up to the rows' and keys' range (both < 2**31): clipping the
    offsets and the bounds one by one (as for offsets within _OFFSET_LIMIT) would lose a huge
    offset that a huge bound cancels.  The window's width left + right is the same for every
    b: a narrow one keeps o_b - left; in a wider one than any key range, at most one bound
    of each row can hide a key, and that one is kept."""
    far = 1 << 32                               # past every row + key index
    clip = lambda x, lim=far: max(-lim, min(lim, x))
    n = len(offsets)
    if left is None and right is None:
        return [0] * n, _UNBOUNDED, _UNBOUNDED
    if right is None:
        return [clip(o - left) for o in offsets], 0, _UNBOUNDED
    if left is None:
        return [clip(o + right) for o in offsets], _UNBOUNDED, 0
    width = left + right
    if width < 0:
        return [0] * n, 0, -1                   # an empty window: no key for any row
    if width <= 2 * far:
        return [clip(o - left, 4 * far) for o in offsets], 0, width
    half = 2 * far                              # each side of the folded window
    return [clip(o - left) + half if o - left >= -far else clip(o + right) - half
            for o in offsets], half, half


def _real(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        if not (isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf"):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:                     # an int beyond the float range
        raise ValueError(f"{name} must be finite, got {x!r}") from None


@functools.lru_cache(maxsize=256)
def _tiling(nb, hq, hkv, lq, lk, d, dv, with_weights):
    """((heads, rows, bk, edge, n_splits, split_len), work items): the work item's extent.
    Cached: computing it costs a third of a small call (1.8 of 6 us)."""
    group = hq // hkv
    if lq >= BLOCK_Q:
        heads = 1
        nqb = -(-lq // BLOCK_Q)
        rows = -(-lq // nqb)
    else:
        # short queries: stack the query heads that share a KV head, so each K/V row
        # is read once per KV head (GQA decode)
        rows = lq
        heads = min(group, max(1, BLOCK_Q // lq))
        heads = -(-group // -(-group // heads))
        nqb = 1
    tile = TILE_ELEMENTS
    if 1 < heads * rows <= SMALL_ROWS:
        # several rows streamed: the Q·Kᵀ pass fetches the chunk's V beside its K, and both
        # must still be in L2 for the P·V pass (float32 GQA 32/8 decode, D = 128, 2 threads:
        # 3.62 ms in chunks of 512 keys, 3.29 in chunks of 256)
        tile = STREAM_TILE_ELEMENTS
    bk = max(EDGE_K, min(BLOCK_K, tile // max(d, dv, 1)))
    nwork = nb * hkv * -(-group // heads) * nqb
    n_splits = 1
    if nwork < SPLIT_MIN_WORK and lk >= 2 * SPLIT_MIN_KEYS and not with_weights:
        n_splits = min(-(-SPLIT_MIN_WORK // nwork), lk // SPLIT_MIN_KEYS)
    split_len = -(-lk // n_splits)
    return (heads, rows, bk, EDGE_K, n_splits, split_len), nwork * n_splits


def attention(query, key, value, *, mask=None, causal=False, query_offset=None, window=None,
              key_lengths=None, scale=None, softcap=None, return_weights=False, out=None,
              num_threads=None):
    """Scaled dot-product attention: softmax(scale * Q Kᵀ + M) V over the visible keys.

    Shapes: query (*batch, Hq, Lq, D), key (*batch, Hkv, Lk, D), value (*batch, Hkv, Lk, Dv)
    (2-D inputs: one head, no batch), Hq a multiple of Hkv.  Returns (*batch, Hq, Lq, Dv), or
    (output, weights) with ``return_weights=True``.  Key j is visible to query row i when the
    mask allows it (bool True, or a float added to the score; -inf hides), j < key_lengths,
    and, with ``causal``, j <= query_offset + i (query_offset defaults to Lk_valid - Lq:
    bottom-right alignment), and, with ``window=(left, right)``,
    query_offset + i - left <= j <= query_offset + i + right.  Rows with no visible key are 0.
    See the README and shared API contract for the full semantics.
    """
    if (mask is None and query_offset is None and window is None and key_lengths is None
            and scale is None and softcap is None and out is None
            and (num_threads is None or type(num_threads) is int
                 and 1 <= num_threads <= MAX_THREADS)
            and return_weights is False and (causal is False or causal is True)):
        o = _attention_plain(query, key, value, causal, num_threads)
        if o is not None:
            return o
    if not isinstance(return_weights, (bool, np.bool_)):
        raise TypeError(f"return_weights must be a bool, got {type(return_weights).__name__}")
    c = _prepare(query, key, value, mask=mask, causal=causal, query_offset=query_offset,
                 window=window, key_lengths=key_lengths, scale=scale, softcap=softcap,
                 out=out, num_threads=num_threads)
    nb, hq, hkv, lq, lk, d, dv = c.sizes
    batch = c.batch_shape
    q, k, v = c.query, c.key, c.value
    dtype = c.dtype

    # the output buffer: the user's `out` where the kernel can write it directly
    o = c.out
    if o is not None and c.squeeze:
        o = o[None]
    direct = (o is not None and o.dtype == dtype and o.flags.aligned
              and not any(np.may_share_memory(o, a) for a in (q, k, v, c.mask) if a is not None))
    if not direct:
        o = np.empty(batch + (hq, lq, dv), dtype)
    weights = np.zeros(batch + (hq, lq, lk), dtype) if return_weights else None

    if nb and hq and lq and (dv or return_weights):
        if lk == 0:
            o[...] = 0
        else:
            _run(c, o, weights)

    if c.out is not None:
        if not direct:
            np.copyto(c.out, o[0] if c.squeeze else o)
        o = c.out
    else:
        if c.squeeze:
            o = o[0]
        if o.dtype != c.out_dtype:
            o = _cast(o, c.out_dtype)
    if return_weights:
        if c.squeeze:
            weights = weights[0]
        return o, _cast(weights, c.out_dtype) if weights.dtype != c.out_dtype else weights
    return o


def _attention_plain(q, k, v, causal, num_threads=None):
    """The most common call, checked in a few attribute reads: 4-D (B, H, L, D) arrays of one
    native float32/float64 dtype, aligned, K/V C-contiguous, all sizes >= 1, no options but
    causal and num_threads.
    Returns None for anything else, and the general path (which owns the errors) takes over.
    """
    if not (type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray):
        return None
    dt = q.dtype
    if (dt is not _F32 and dt is not _F64) or k.dtype is not dt or v.dtype is not dt:
        return None
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return None
    (b, hq, lq, d), (bk, hkv, lk, dk), (bv, hv, lv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv and hkv == hv and lk == lv and d == dk and 0 < hkv
            and hq % hkv == 0 and 0 < min(b, hq, lq, lk, d, dv)
            and max(hq, lq, lk, d, dv) <= INT32_MAX):
        return None
    if not (q.flags.aligned and k.flags.c_contiguous and v.flags.c_contiguous):
        return None
    o = np.empty((b, hq, lq, dv), dt)
    tiling, nwork = _tiling(b, hq, hkv, lq, lk, d, dv, False)
    nthreads = _nthreads((b, hq, hkv, lq, lk, d, dv), dt.itemsize,
                         num_threads or get_num_threads(), nwork)
    _launch((q, k, v, o, None, None, None, None, (b,), tiling, _UNBOUNDED,
             0 if causal else _UNBOUNDED, 1.0 / math.sqrt(d), 0.0, nthreads), tiling, d, dv)
    return o


def _nthreads(sizes, itemsize, requested, nwork):
    """1 (the calling thread) for a call too small to pay for a parallel region: few flops
    and few K/V bytes to stream (a decode step over 1 MB of K/V is worth two threads); else
    up to `requested` threads, at most one per work item."""
    nb, hq, hkv, lq, lk, d, dv = sizes
    if (2 * nb * hq * lq * lk * (d + dv) < SERIAL_FLOPS
            and nb * hkv * lk * (d + dv) * itemsize < SERIAL_KV_BYTES):
        return 1
    return parallel_threads(min(requested, nwork))


def _launch(args, tiling, d, dv):
    """The kernel call, with BLAS held to one thread where a tile GEMM could be threaded."""
    heads, rows, bk = tiling[:3]
    if (_kernel.micro_kernel_enabled() or heads * rows <= SMALL_ROWS
            or heads * rows * bk * max(d, dv) < BLAS_THREADED_FLOPS):
        _kernel.attention_forward(*args)     # no tile GEMM that BLAS would thread
    else:
        with blas_guard:
            _kernel.attention_forward(*args)


def _run(c, o, weights):
    nb, hq, hkv, lq, lk, d, dv = c.sizes
    m = c.mask
    if m is not None and m.dtype == np.bool_:
        m = m.view(np.uint8)
    tiling, nwork = _tiling(nb, hq, hkv, lq, lk, d, dv, weights is not None)
    nthreads = _nthreads(c.sizes, c.key.dtype.itemsize, c.num_threads, nwork)
    _launch((c.query, _blas_ready(c.key), _blas_ready(c.value), o, m, weights, c.klen, c.qoff,
             c.batch_shape, tiling, c.left, c.right, c.scale, c.softcap, nthreads), tiling, d, dv)
