"""atheris fuzz harness for fastattn.attention.

Decodes shapes (batch axes that broadcast or not, heads, lengths, feature sizes), dtypes,
memory layouts (transposed, stepped, negative, stride-0, Fortran order, misaligned) and every
option of ``attention`` from the fuzz input, valid or not.  Checks that

* only the documented exceptions (ValueError, TypeError) are raised;
* a successful call has the documented shape and dtype and leaves its inputs unchanged;
* on small sizes, the result agrees with ``reference_attention`` within the reliability.md
  bound for finite inputs; with NaN/inf inputs, every row the reference keeps finite stays
  finite (hidden keys never leak); ``return_weights`` / ``out=`` behave as documented.

Run (not part of the pytest run):

    python tests/fuzz/fuzz_attention.py -max_total_time=600 -print_final_stats=1
    tests/fuzz/run_fuzz.sh 1800 /tmp/fastattn-fuzz   # restarts after findings, keeps a corpus
"""
import os
import sys

import atheris

# fastattn._reference is left uninstrumented: atheris' comparison hooks keep the arrays that
# its elementwise comparisons make, and RSS grew by about 2 KB a run (3 GB in 20 minutes)
with atheris.instrument_imports(exclude=["fastattn._reference"]):
    import numpy as np
    import fastattn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import U16, U32, U64, _visibility, error_bound, plain_attention  # noqa: E402

DTYPES = [np.float32, np.float64, np.float16, np.float32, np.float64, np.int32, np.bool_,
          np.complex64, object, ">f4"]


def layout(fdp, a):
    """a (or an equal array) in one of several memory layouts."""
    kind = fdp.ConsumeIntInRange(0, 7)
    if a.ndim < 2 or a.dtype == object:
        return a
    if kind == 1:                               # transposed storage, same logical array
        return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    if kind == 2:                               # every other element of a bigger buffer
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if kind == 3:                               # negative strides
        return np.ascontiguousarray(a[..., ::-1, ::-1])[..., ::-1, ::-1] if a.ndim >= 2 else a
    if kind == 4:                               # Fortran order
        return np.asfortranarray(a)
    if kind == 5 and a.ndim >= 1 and a.shape[0] > 0:   # stride 0 along axis 0
        return np.broadcast_to(a[:1], a.shape) if fdp.ConsumeBool() else a
    if kind == 6 and a.dtype.itemsize > 1 and a.dtype.kind == "f":  # misaligned copy
        buf = np.zeros(a.nbytes + a.dtype.itemsize, np.uint8)
        m = buf[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
        m[...] = a
        return m
    if kind == 7:                               # read-only
        a = a.copy()
        a.setflags(write=False)
    return a


def values(fdp, shape, dtype):
    n = int(np.prod(shape)) if shape else 1
    seed = fdp.ConsumeIntInRange(0, 2 ** 16)
    amp = [1.0, 8.0, 0.01, 60.0][fdp.ConsumeIntInRange(0, 3)]
    x = amp * np.random.default_rng(seed).uniform(-1, 1, n)
    if n and fdp.ConsumeIntInRange(0, 15) == 0:       # a few non-finite values
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            x[fdp.ConsumeIntInRange(0, n - 1)] = [np.nan, np.inf, -np.inf][
                fdp.ConsumeIntInRange(0, 2)]
    if dtype is object:
        return np.array(x.tolist() + [None], dtype=object)[:n].reshape(shape)
    with np.errstate(all="ignore"):
        return x.reshape(shape).astype(dtype)


def size(fdp, big=False):
    r = fdp.ConsumeIntInRange(0, 31)
    if r < 3:
        return r                                 # 0, 1, 2
    if r < 28:
        return fdp.ConsumeIntInRange(1, 9)
    return fdp.ConsumeIntInRange(10, 600 if big else 40)


def batch_shape(fdp, nb):
    return tuple(fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeIntInRange(0, 9) == 0
                 else fdp.ConsumeIntInRange(1, 3) for _ in range(nb))


def maybe_broadcast(fdp, shape):
    """The shape with some axes set to 1, or (rarely) changed to a wrong size, or dropped."""
    out = []
    for n in shape:
        r = fdp.ConsumeIntInRange(0, 15)
        out.append(1 if r < 5 else (n + 1 if r == 15 else n))
    if out and fdp.ConsumeIntInRange(0, 3) == 0:
        out = out[fdp.ConsumeIntInRange(0, len(out)):]
    return tuple(out)


def int_option(fdp, batch, lo, hi):
    r = fdp.ConsumeIntInRange(0, 9)
    if r == 0:
        return None
    if r < 5:
        return fdp.ConsumeIntInRange(lo, hi)
    if r == 5:
        return [2 ** 31, -2 ** 31, 2 ** 62, 1.5, True, "3", np.int8(2)][fdp.ConsumeIntInRange(0, 6)]
    shp = maybe_broadcast(fdp, batch)
    a = np.random.default_rng(fdp.ConsumeIntInRange(0, 999)).integers(lo, hi + 1, shp)
    return a.astype([np.int64, np.int32, np.uint8, np.float64][fdp.ConsumeIntInRange(0, 3)]
                    if fdp.ConsumeIntInRange(0, 7) == 0 else np.int64)


def TestOneInput(data):
    fdp = atheris.FuzzedDataProvider(data)
    nd = fdp.ConsumeIntInRange(0, 3)              # batch axes (0: 3-D; -1 below: 2-D)
    two_d = fdp.ConsumeIntInRange(0, 7) == 0
    hkv = fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeIntInRange(0, 15) == 0 \
        else fdp.ConsumeIntInRange(1, 3)
    group = fdp.ConsumeIntInRange(1, 4)
    hq = hkv * group + (1 if fdp.ConsumeIntInRange(0, 15) == 0 else 0)
    lq, lk = size(fdp, True), size(fdp, True)
    d, dv = size(fdp), size(fdp)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        dv = d + 1 if fdp.ConsumeBool() else dv
    b = batch_shape(fdp, nd)
    if two_d:
        qs, ks, vs = (lq, d), (lk, d), (lk, dv)
        b, hq, hkv = (), 1, 1
    else:
        qs = maybe_broadcast(fdp, b) + (hq, lq, d)
        ks = maybe_broadcast(fdp, b) + (hkv, lk, d)
        vs = ks[:-3] + (hkv, lk, dv) if fdp.ConsumeIntInRange(0, 15) else \
            maybe_broadcast(fdp, b) + (hkv, lk + 1, dv)
        if fdp.ConsumeIntInRange(0, 31) == 0:
            ks = ks[:-1] + (d + 1,)
    dts = [DTYPES[fdp.ConsumeIntInRange(0, 4) if fdp.ConsumeIntInRange(0, 15) else
                  fdp.ConsumeIntInRange(0, len(DTYPES) - 1)] for _ in range(3)]
    if fdp.ConsumeIntInRange(0, 3):
        dts = [dts[0]] * 3
    # a size bound (D counted as at least 1, so D = 0 does not let any Lq x Lk mask through)
    if int(np.prod(qs[:-1])) * int(np.prod(ks[:-1])) * max(1, qs[-1]) * max(1, ks[-1]) > 4e6:
        return
    q, k, v = (layout(fdp, values(fdp, s, t)) for s, t in zip((qs, ks, vs), dts))

    kw = {}
    full_b = b
    r = fdp.ConsumeIntInRange(0, 5)
    if r >= 3:
        mshape = maybe_broadcast(fdp, full_b + (hq, lq, lk))
        if r == 3 or r == 5:
            m = np.random.default_rng(fdp.ConsumeIntInRange(0, 999)).random(mshape) < \
                fdp.ConsumeProbability()
            if r == 5:
                m = np.where(m, 0.0, -np.inf).astype(
                    [np.float32, np.float64, np.float16][fdp.ConsumeIntInRange(0, 2)])
                if m.size and fdp.ConsumeBool():
                    m = m + np.random.default_rng(1).uniform(-3, 3, mshape).astype(m.dtype)
        else:
            m = np.zeros(mshape, [np.int8, np.complex64, np.float32][fdp.ConsumeIntInRange(0, 2)])
        kw["mask"] = layout(fdp, m)
    if fdp.ConsumeBool():
        kw["causal"] = True if fdp.ConsumeIntInRange(0, 15) else [1, "yes", None][
            fdp.ConsumeIntInRange(0, 2)]
    if fdp.ConsumeIntInRange(0, 2) == 0:
        kw["query_offset"] = int_option(fdp, full_b, -lq - 3, lk + 3)
    if fdp.ConsumeIntInRange(0, 2) == 0:
        r = fdp.ConsumeIntInRange(0, 9)
        if r == 0:
            kw["window"] = [(1,), 5, "ab", (1.5, 2), (None, None, None)][fdp.ConsumeIntInRange(0, 4)]
        else:
            def bound():
                return None if fdp.ConsumeIntInRange(0, 3) == 0 else fdp.ConsumeIntInRange(-3, 40)
            kw["window"] = (bound(), bound())
    if fdp.ConsumeIntInRange(0, 2) == 0:
        kw["key_lengths"] = int_option(fdp, full_b, -1 if fdp.ConsumeIntInRange(0, 7) == 0 else 0,
                                       lk + (1 if fdp.ConsumeIntInRange(0, 7) == 0 else 0))
    if fdp.ConsumeIntInRange(0, 3) == 0:
        kw["scale"] = [fdp.ConsumeFloatInRange(-4.0, 4.0), 0.0, np.nan, np.inf, "1", None,
                       np.float32(0.5), 1e30][fdp.ConsumeIntInRange(0, 7)]
    if fdp.ConsumeIntInRange(0, 3) == 0:
        kw["softcap"] = [fdp.ConsumeFloatInRange(0.1, 30.0), 0.0, -1.0, np.nan, np.inf, None,
                         5][fdp.ConsumeIntInRange(0, 6)]
    ret_w = fdp.ConsumeIntInRange(0, 3) == 0
    if ret_w:
        kw["return_weights"] = True if fdp.ConsumeIntInRange(0, 15) else 1
    if fdp.ConsumeIntInRange(0, 3) == 0:
        kw["num_threads"] = [1, 2, 0, -1, 3, 2.0, True][fdp.ConsumeIntInRange(0, 6)]
    out = None
    if fdp.ConsumeIntInRange(0, 3) == 0:
        try:
            oshape = np.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3]) + (hq, lq, dv) if not two_d \
                else (lq, dv)
            odt = np.result_type(*(a.dtype for a in (q, k, v)))
        except Exception:
            oshape, odt = (1,), np.float32
        r = fdp.ConsumeIntInRange(0, 5)
        if r == 1:
            oshape = oshape + (1,)
        if r == 2:
            odt = np.float64 if odt != np.float64 else np.float32
        try:
            out = np.full(oshape[:-1] + (2 * oshape[-1],) if oshape else (), 7, odt)
            out = out[..., ::2] if oshape else out
        except Exception:
            out = np.zeros(3)
        if r == 3:
            out.setflags(write=False)
        if r == 4:
            out = [0.0]
        kw["out"] = out

    snap = [a.copy() for a in (q, k, v)]
    try:
        with np.errstate(divide="raise", over="raise", invalid="raise"):
            res = fastattn.attention(q, k, v, **kw)
    except (ValueError, TypeError):
        return
    for a, s in zip((q, k, v), snap):
        assert a.dtype == s.dtype and np.array_equal(a, s, equal_nan=True), "input modified"
    o, w = res if ret_w else (res, None)
    if out is not None:
        assert o is out, "out= not returned"
    odt = np.result_type(q.dtype, k.dtype, v.dtype)
    assert o.dtype == odt, (o.dtype, odt)
    if o.size > 20000 or lq * lk * max(hq, 1) * int(np.prod(b or (1,))) > 200000:
        return
    opts = {n: kw[n] for n in ("mask", "causal", "query_offset", "window", "key_lengths",
                               "scale", "softcap") if n in kw}
    with np.errstate(all="ignore"):
        ref, rw = fastattn.reference_attention(
            *(a.astype(np.float64) for a in (q, k, v)),
            **dict(opts, mask=opts["mask"].astype(np.float64)
                   if "mask" in opts and opts["mask"].dtype != np.bool_ else opts.get("mask")),
            return_weights=True)
    assert o.shape == ref.shape, (o.shape, ref.shape)
    o64 = o.astype(np.float64)
    fin_ref = np.isfinite(ref).all(axis=-1)
    fin_out = np.isfinite(o64).all(axis=-1)
    # rows the reference keeps finite stay finite (nothing hidden leaks); the converse may
    # differ where a weight underflows to exactly 0 in float32 but not in float64
    # (the reference drops w == 0 terms, so a visible non-finite value row whose weight
    # underflows to 0 only in float32 is exempt)
    q3, v3 = (a[None] if a.ndim == 2 else a for a in (q, v))
    k3 = k[None] if k.ndim == 2 else k
    bs = np.broadcast_shapes(q3.shape[:-3], k3.shape[:-3], v3.shape[:-3])
    hq_, hkv_ = q3.shape[-3], k3.shape[-3]
    try:
        vis, _ = _visibility(bs, hq_, lq, lk, **{n: opts[n] for n in opts
                                                 if n not in ("scale", "softcap")})
        vis_keys = np.broadcast_to(vis, bs + (hq_, lq, lk)).any(axis=-2)      # (*bs, Hq, Lk)
    except ValueError:     # option arrays with extra leading 1-axes: skip this one check
        vis_keys = None
    v_bad = ~np.isfinite(np.broadcast_to(v3, bs + v3.shape[-3:])).all(axis=-1)  # (*bs, Hkv, Lk)
    v_bad = np.repeat(v_bad, hq_ // hkv_ if hkv_ else 1, axis=-2)     # Hq = Hkv = 0: empty
    if vis_keys is not None and not (v_bad & vis_keys).any():
        assert fin_out[fin_ref].all(), "a finite reference row is not finite"
    finite_in = all(np.isfinite(a).all() for a in (q, k, v)) and \
        ("mask" not in opts or opts["mask"].dtype == np.bool_ or
         not np.isnan(opts["mask"]).any())
    if finite_in:
        assert fin_out.all(), "non-finite output for finite inputs"
    if finite_in and ref.size and (abs(kw.get("scale") or 1) < 1e6):
        with np.errstate(all="ignore"):
            bound, _ = error_bound(q, k, v, ref=ref, **opts)
        err = np.abs(o64 - ref).max()
        # plus the worst-case error of accumulating Lk terms of P·V in the working precision
        # (Higham's gamma_n): the reliability bound has no length term, and near-uniform
        # weights over hundreds of keys (D = 0, tiny logits) exceed it by a few ulps
        u = 2.0 ** -53 if odt == np.float64 else 2.0 ** -24
        vmax = float(np.abs(np.asarray(v, np.float64)).max()) if np.size(v) else 0.0
        bound += lk * u * vmax
        assert err <= bound * 1.0001 + 1e-300, f"error {err} > bound {bound}"
    if w is not None:
        assert w.shape == rw.shape and w.dtype == odt, "weights shape/dtype"
        # NaN weights only where the reference has them (the reference also puts NaN at the
        # hidden keys of a NaN row, the kernel 0 there)
        assert not (np.isnan(w) & ~np.isnan(rw)).any(), "weights NaN pattern"
        if finite_in:
            u, work = (U64, np.float64) if odt == np.float64 else (U32, np.float32)
            with np.errstate(all="ignore"):
                _, w2, smax = plain_attention(q, k, v, dtype=work, **opts)
            werr2 = np.abs(w2 - rw).max() if w.size else 0.0
            tol = max(2 * werr2, 8 * u * max(1.0, smax)) + (U16 if odt == np.float16 else 0)
            werr = np.abs(w.astype(np.float64) - rw).max() if w.size else 0.0
            assert werr <= tol, f"weights error {werr} > {tol}"

if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
