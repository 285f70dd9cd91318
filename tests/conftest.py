"""Shared helpers for the attention tests: an independent two-pass attention and the error bound.

The bound is the one of shared/reliability.md:

    max abs error <= max(2 x (float32 two-pass error), 8 u max(1, max|s|) max|v|)

where the two-pass error is the error, against the float64 reference, of a plain softmax
computed in the working precision (max first, then exp and sum), s are the visible logits and
u the unit roundoff of the precision the kernel computes in.  float16 results add the final
rounding to float16 (u16 |ref|).
"""
import numpy as np
import pytest

import fastattn

U16 = 2.0 ** -11
U32 = 2.0 ** -24
U64 = 2.0 ** -53
OPTION_NAMES = ("mask", "causal", "query_offset", "window", "key_lengths", "scale", "softcap")


def _per_batch(x, batch):
    """An int (array) broadcast to the batch shape, as (*batch, 1, 1, 1) int64."""
    a = np.asarray(x, np.int64)
    a = a.reshape(a.shape[max(0, a.ndim - len(batch)):])
    return np.broadcast_to(a, batch).reshape(batch + (1, 1, 1))


def _visibility(batch, hq, lq, lk, *, mask=None, causal=False, query_offset=None, window=None,
                key_lengths=None):
    """(visible bool, additive float64 or None), both broadcastable to (*batch, Hq, Lq, Lk).

    Written from the api.md text, independently of fastattn's own argument handling."""
    klen = _per_batch(lk if key_lengths is None else key_lengths, batch)
    qoff = klen - lq if query_offset is None else _per_batch(query_offset, batch)
    j = np.arange(lk)
    pos = qoff + np.arange(lq)[:, None]
    vis = j < klen
    if causal:
        vis = vis & (j <= pos)
    if window is not None:
        left, right = window
        if left is not None:
            vis = vis & (j >= pos - left)
        if right is not None:
            vis = vis & (j <= pos + right)
    add = None
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype == np.bool_:
            vis = vis & m
        else:
            m = m.astype(np.float64)
            vis = vis & (m != -np.inf)
            add = np.where(m == -np.inf, 0.0, m)
    return vis, add


def plain_attention(query, key, value, *, dtype=np.float64, mask=None, causal=False,
                    query_offset=None, window=None, key_lengths=None, scale=None, softcap=None):
    """Two-pass softmax attention computed in `dtype`, for finite inputs.

    Returns (out, weights, smax) where smax bounds the rounding scale of the visible logits:
    max of |s| and of |scale| · Σ_c |q_c k_c| (the dot product's own condition), float64."""
    q, k, v = (np.asarray(a) for a in (query, key, value))
    squeeze = q.ndim == k.ndim == v.ndim == 2
    q, k, v = (a[None] if a.ndim == 2 else a for a in (q, k, v))
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    hq, lq, d = q.shape[-3:]
    hkv, lk, dv = v.shape[-3:]
    group = hq // hkv if hkv else 1                  # Hq = Hkv = 0: an empty result
    q = np.broadcast_to(q, batch + q.shape[-3:]).astype(dtype)
    k = np.repeat(np.broadcast_to(k, batch + k.shape[-3:]).astype(dtype), group, axis=-3)
    v = np.repeat(np.broadcast_to(v, batch + v.shape[-3:]).astype(dtype), group, axis=-3)
    vis, add = _visibility(batch, hq, lq, lk, mask=mask, causal=causal,
                           query_offset=query_offset, window=window, key_lengths=key_lengths)
    sc = dtype(1.0 / np.sqrt(d) if scale is None else scale) if d or scale is not None \
        else dtype(1.0)
    s = sc * (q @ np.swapaxes(k, -1, -2))
    if softcap is not None:
        s = dtype(softcap) * np.tanh(s / dtype(softcap))
    if add is not None:
        s = s + add.astype(dtype)
    vis = np.broadcast_to(vis, s.shape)
    s = np.where(vis, s, -np.inf).astype(dtype)
    cond = abs(float(sc)) * (np.abs(q) @ np.swapaxes(np.abs(k), -1, -2))
    cond = np.broadcast_to(cond, s.shape)
    smax = float(max(np.abs(s[vis]).max(), cond[vis].max())) if vis.any() else 0.0
    mx = s.max(axis=-1, keepdims=True, initial=-np.inf)
    mx = np.where(np.isfinite(mx), mx, 0).astype(dtype)
    e = np.where(vis, np.exp(s - mx), 0).astype(dtype)
    den = e.sum(axis=-1, keepdims=True)
    w = (e / np.where(den > 0, den, 1)).astype(dtype)
    out = w @ v
    if squeeze:
        out, w = out[0], w[0]
    return out, w, smax


def _f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


def reference64(query, key, value, **kw):
    """fastattn.reference_attention on float64 copies (so its result is not rounded back)."""
    m = kw.get("mask")
    if m is not None and np.asarray(m).dtype != np.bool_:
        kw = dict(kw, mask=_f64(m))
    return fastattn.reference_attention(_f64(query), _f64(key), _f64(value), **kw)


def error_bound(query, key, value, ref=None, **kw):
    """The reliability.md bound for attention(query, key, value, **kw); returns (bound, ref64)."""
    dt = np.result_type(*(np.asarray(a).dtype for a in (query, key, value)))
    if ref is None:
        ref = reference64(query, key, value, **kw)
    opts = {n: kw[n] for n in OPTION_NAMES if n in kw}
    if dt == np.float64:
        work, u = np.float64, U64
    else:
        work, u = np.float32, U32
    two_pass, _, smax = plain_attention(query, key, value, dtype=work, **opts)
    err2 = float(np.abs(two_pass - ref).max()) if ref.size else 0.0
    vmax = float(np.abs(np.asarray(value, np.float64)).max()) if np.size(value) else 0.0
    # a float64 result is checked against a float64 reference whose own rounding is of the
    # same order, so the allowance doubles there
    factor = 16 if dt == np.float64 else 8
    bound = max(2 * err2, factor * u * max(1.0, smax) * vmax)
    if dt == np.float16:
        bound += U16 * (float(np.abs(ref).max()) if ref.size else 0.0)
    return bound, ref


def assert_matches_reference(query, key, value, out=None, **kw):
    """attention(...) (or the given result) within the bound of the float64 reference; no NaN.

    Returns (max abs error, bound)."""
    opts = {n: kw[n] for n in OPTION_NAMES if n in kw}
    if out is None:
        out = fastattn.attention(query, key, value, **kw)
    bound, ref = error_bound(query, key, value, **opts)
    assert out.shape == ref.shape
    assert out.dtype == np.result_type(*(np.asarray(a).dtype for a in (query, key, value)))
    assert np.isfinite(out).all(), "non-finite output for finite inputs"
    err = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
    assert err <= bound, f"max abs error {err:.3g} > bound {bound:.3g}"
    return err, bound


def rand(rng, shape, dtype=np.float32, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


@pytest.fixture
def rng(request):
    """A generator seeded by the test's name, so every test is reproducible on its own."""
    seed = sum(map(ord, request.node.nodeid)) % (2 ** 32)
    return np.random.default_rng(seed)
