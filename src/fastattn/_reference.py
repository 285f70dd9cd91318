"""A plain NumPy reference for attention, in float64: for tests and for users who check."""
import numpy as np

from ._attention import _prepare

__all__ = ["reference_attention"]


def reference_attention(query, key, value, *, mask=None, causal=False, query_offset=None,
                        window=None, key_lengths=None, scale=None, softcap=None,
                        return_weights=False):
    """Attention with the semantics of :func:`fastattn.attention`, computed in float64.

    Materialises the full ``(*batch, Hq, Lq, Lk)`` score array: meant for checking, not speed.
    The result has the dtype ``attention`` would return.
    """
    p = _prepare(query, key, value, mask=mask, causal=causal, query_offset=query_offset,
                 window=window, key_lengths=key_lengths, scale=scale, softcap=softcap,
                 out=None, num_threads=1)
    nb, hq, hkv, lq, lk, d, dv = p.sizes
    batch = p.batch_shape
    q = np.broadcast_to(p.query, batch + p.query.shape[-3:]).astype(np.float64)
    k = np.broadcast_to(p.key, batch + p.key.shape[-3:]).astype(np.float64)
    v = np.broadcast_to(p.value, batch + p.value.shape[-3:]).astype(np.float64)
    group = hq // hkv if hkv else 1
    k = np.repeat(k, group, axis=-3)                         # (*batch, Hq, Lk, D)
    v = np.repeat(v, group, axis=-3)                         # (*batch, Hq, Lk, Dv)
    with np.errstate(all="ignore"):
        s = p.scale * np.matmul(q, np.swapaxes(k, -1, -2))   # (*batch, Hq, Lq, Lk)
        if p.softcap:
            s = p.softcap * np.tanh(s / p.softcap)
        # visibility of key j to query row i of batch item b
        klen = np.full(nb, lk, np.int64) if p.klen is None else p.klen
        qoff = klen - lq if p.qoff is None else p.qoff
        j = np.arange(lk)
        pos = qoff.reshape(batch + (1, 1, 1)) + np.arange(lq)[:, None]       # (*batch,1,Lq,1)
        visible = (j < klen.reshape(batch + (1, 1, 1))) \
            & (j >= pos - p.left) & (j <= pos + p.right)
        if p.mask is not None:
            m = np.broadcast_to(p.mask, batch + (hq, lq, lk))
            if m.dtype == np.bool_:
                visible = visible & m
            else:
                m = m.astype(np.float64)
                visible = visible & (m != -np.inf)
                s = s + np.where(m == -np.inf, 0, m)
        visible = np.broadcast_to(visible, s.shape)
        s = np.where(visible, s, -np.inf)
        mx = s.max(axis=-1, keepdims=True, initial=-np.inf)
        # a NaN score among visible keys makes the whole row NaN, as in a plain softmax
        has_nan = np.isnan(s).any(axis=-1, keepdims=True)
        mx = np.where(has_nan, np.nan, mx)
        e = np.where(visible, np.exp(s - np.where(np.isneginf(mx), 0, mx)), 0)
        den = e.sum(axis=-1, keepdims=True)
        w = np.where(den > 0, e / np.where(den > 0, den, 1), np.where(np.isnan(den), np.nan, 0))
        # hidden keys contribute nothing, even where their value row is not finite
        vfin = np.where(np.isfinite(v), v, 0)
        out = np.matmul(w, vfin)
        bad = ~np.isfinite(v)
        if bad.any():
            vbad = np.where(bad, v, 0)
            out = out + _masked_mv(w, vbad)
    out = out.astype(p.out_dtype)
    w = w.astype(p.out_dtype)
    if p.squeeze:                       # 2-D inputs: no head axis in the result
        out, w = out[0], w[0]
    return (out, w) if return_weights else out


def _masked_mv(w, vbad):
    """Σ_j w[..., i, j] * vbad[..., j, c], skipping the terms where w == 0 (so 0 * inf is 0)."""
    prod = w[..., :, :, None] * vbad[..., None, :, :]
    prod = np.where((w != 0)[..., :, :, None], prod, 0)
    return prod.sum(axis=-2)
