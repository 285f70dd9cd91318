"""Reliability checks of shared/reliability.md: validation errors, 32-bit limits, non-finite
values, leaks, and the softmax row passes (SIMD against the plain C path).

Each test names the property it checks.
"""
import gc
import math
import os
import warnings

import numpy as np
import pytest

import fastattn
from fastattn import _kernel
from conftest import U32, U64, assert_matches_reference, rand

INT32_MAX = 2 ** 31 - 1


def _qkv(rng, b=2, h=2, lq=9, lk=13, d=8, dv=6, dtype=np.float32):
    return rand(rng, (b, h, lq, d), dtype), rand(rng, (b, h, lk, d), dtype), \
        rand(rng, (b, h, lk, dv), dtype)


# ---- validation ----------------------------------------------------------------------------

def _f(*shape):
    return np.zeros(shape, np.float32)


Q, K, V = _f(2, 4, 5, 8), _f(2, 2, 7, 8), _f(2, 2, 7, 3)
BAD_CALLS = [
    # (description, args, kwargs, error, regex naming the argument and the shapes)
    ("query 1-D", (_f(8), K, V), {}, ValueError, r"query.*\(8,\)"),
    ("key 1-D", (Q, _f(8), V), {}, ValueError, r"key.*\(8,\)"),
    ("value 0-D", (Q, K, np.float32(1)), {}, ValueError, r"value.*\(\)"),
    ("D mismatch", (Q, _f(2, 2, 7, 9), V), {}, ValueError, r"query.*key.*\(2, 4, 5, 8\).*\(2, 2, 7, 9\)"),
    ("Lk mismatch", (Q, K, _f(2, 2, 6, 3)), {}, ValueError, r"key.*value.*\(2, 2, 7, 8\).*\(2, 2, 6, 3\)"),
    ("Hkv mismatch", (Q, K, _f(2, 1, 7, 3)), {}, ValueError, r"key.*value"),
    ("heads do not divide", (_f(2, 3, 5, 8), K, V), {}, ValueError, r"heads.*3.*2"),
    ("no kv heads", (Q, _f(2, 0, 7, 8), _f(2, 0, 7, 3)), {}, ValueError, r"heads"),
    ("batch does not broadcast", (_f(3, 4, 5, 8), K, V), {}, ValueError,
     r"batch.*\(3, 4, 5, 8\).*\(2, 2, 7, 8\)"),
    ("mask shape", (Q, K, V), dict(mask=np.ones((5, 6), bool)), ValueError, r"mask.*\(5, 6\)"),
    ("mask batch", (Q, K, V), dict(mask=np.ones((3, 1, 5, 7), bool)), ValueError, r"mask.*\(3, 1, 5, 7\)"),
    ("mask int dtype", (Q, K, V), dict(mask=np.ones((5, 7), np.int32)), TypeError, r"mask.*int32"),
    ("mask complex", (Q, K, V), dict(mask=np.ones((5, 7), complex)), TypeError, r"mask"),
    ("key_lengths shape", (Q, K, V), dict(key_lengths=np.array([1, 2, 3])), ValueError,
     r"key_lengths.*\(3,\)"),
    ("key_lengths negative", (Q, K, V), dict(key_lengths=np.array([-1, 2])), ValueError,
     r"key_lengths.*-1"),
    ("key_lengths > Lk", (Q, K, V), dict(key_lengths=8), ValueError, r"key_lengths.*7"),
    ("key_lengths float", (Q, K, V), dict(key_lengths=np.array([1.0, 2.0])), TypeError,
     r"key_lengths"),
    ("query_offset shape", (Q, K, V), dict(query_offset=np.zeros(3, int)), ValueError,
     r"query_offset.*\(3,\)"),
    ("query_offset float", (Q, K, V), dict(query_offset=1.5), TypeError, r"query_offset"),
    ("window not a pair", (Q, K, V), dict(window=3), ValueError, r"window"),
    ("window triple", (Q, K, V), dict(window=(1, 2, 3)), ValueError, r"window"),
    ("window float", (Q, K, V), dict(window=(1.5, 2)), TypeError, r"window"),
    ("scale nan", (Q, K, V), dict(scale=float("nan")), ValueError, r"scale"),
    ("scale inf", (Q, K, V), dict(scale=float("inf")), ValueError, r"scale"),
    ("scale str", (Q, K, V), dict(scale="1"), TypeError, r"scale"),
    ("softcap 0", (Q, K, V), dict(softcap=0.0), ValueError, r"softcap"),
    ("softcap negative", (Q, K, V), dict(softcap=-1.0), ValueError, r"softcap"),
    ("softcap nan", (Q, K, V), dict(softcap=float("nan")), ValueError, r"softcap"),
    ("num_threads 0", (Q, K, V), dict(num_threads=0), ValueError, r"num_threads"),
    ("num_threads -1", (Q, K, V), dict(num_threads=-1), ValueError, r"num_threads"),
    ("num_threads float", (Q, K, V), dict(num_threads=2.0), TypeError, r"num_threads"),
    ("causal not bool", (Q, K, V), dict(causal="yes"), TypeError, r"causal"),
    ("return_weights not bool", (Q, K, V), dict(return_weights=1), TypeError, r"return_weights"),
    ("out wrong shape", (Q, K, V), dict(out=_f(2, 4, 5, 4)), ValueError, r"out.*\(2, 4, 5, 4\)"),
    ("out wrong dtype", (Q, K, V), dict(out=np.zeros((2, 4, 5, 3), np.int32)), ValueError,
     r"out.*int32"),
    ("out not an array", (Q, K, V), dict(out=[0.0]), TypeError, r"out"),
    ("query int", (Q.astype(int), K, V), {}, TypeError, r"query.*int"),
    ("key bool", (Q, K.astype(bool), V), {}, TypeError, r"key.*bool"),
    ("value complex", (Q, K, V.astype(complex)), {}, TypeError, r"value.*complex"),
    ("query object", (Q.astype(object), K, V), {}, TypeError, r"query.*object"),
    ("ragged list", ([[1.0], [1.0, 2.0]], K, V), {}, TypeError, r"query"),
    ("mask ragged list", (Q, K, V), dict(mask=[[True], [True, False]]), TypeError, r"mask"),
    ("key_lengths ragged list", (Q, K, V), dict(key_lengths=[[1], [1, 2]]), TypeError,
     r"key_lengths"),
    ("query_offset ragged list", (Q, K, V), dict(causal=True, query_offset=[[1], [1, 2]]),
     TypeError, r"query_offset"),
    ("mask 33 axes", (Q, K, V), dict(mask=np.ones((1,) * 33, bool)), ValueError, r"mask"),
    ("scale int beyond float", (Q, K, V), dict(scale=10**400), ValueError, r"scale"),
    ("softcap int beyond float", (Q, K, V), dict(softcap=10**400), ValueError, r"softcap"),
    ("num_threads 2**31", (Q, K, V), dict(num_threads=2**31), ValueError, r"num_threads"),
]


@pytest.mark.parametrize("kw", [dict(scale=1e39), dict(scale=-1e39), dict(softcap=1e39),
                                dict(softcap=1e-46)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_scale_and_softcap_outside_the_compute_dtype_refused(kw, dtype):
    """validation: a finite scale/softcap that float32 (the compute dtype of float32 and
    float16) cannot hold is refused, not turned into inf (NaN output) or 0 (softcap dropped);
    float64 takes them."""
    q, k, v = (a.astype(dtype) for a in (Q, K, V))
    with pytest.raises(ValueError, match=list(kw)[0]):
        fastattn.attention(q, k, v, **kw)
    assert np.isfinite(fastattn.attention(*(a.astype(np.float64) for a in (Q, K, V)),
                                          **kw)).all()


def test_set_num_threads_refuses_what_no_kernel_can_take():
    """validation: set_num_threads(2**31) raises instead of making every later projection
    fail converting it to a C int."""
    with pytest.raises(ValueError, match="num_threads"):
        fastattn.set_num_threads(2**31)
    assert fastattn.linear(np.ones((4, 8), np.float32), np.ones((5, 8), np.float32)).shape == (4, 5)


@pytest.mark.parametrize("desc,args,kw,err,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_validation_error_names_argument(desc, args, kw, err, match, dtype):
    """validation: each bad input of api.md raises ValueError/TypeError naming the argument
    (and the shapes), for every float dtype, before any work (a valid out= stays untouched)."""
    args = tuple(a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a
                 for a in args)
    if "out" in kw and isinstance(kw["out"], np.ndarray) and kw["out"].dtype == np.float32:
        kw = dict(kw, out=kw["out"].astype(dtype))
    with pytest.raises(err, match=match):
        fastattn.attention(*args, **kw)


def test_validation_read_only_out():
    """validation: a read-only out raises ValueError naming out."""
    out = np.zeros((2, 4, 5, 3), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out.*read-only"):
        fastattn.attention(Q, K, V, out=out)


@pytest.mark.parametrize("kw", [dict(num_threads=0), dict(softcap=-1.0), dict(scale=np.nan),
                                dict(key_lengths=99), dict(mask=np.ones((5, 6), bool))])
def test_validation_before_any_work(kw, rng):
    """validation: errors are raised before any work: a poisoned out= is left untouched."""
    q, k, v = rand(rng, Q.shape), rand(rng, K.shape), rand(rng, V.shape)
    out = np.full((2, 4, 5, 3), 123.0, np.float32)
    with pytest.raises(ValueError):
        fastattn.attention(q, k, v, out=out, **kw)
    assert (out == 123.0).all()


@pytest.mark.parametrize("dt", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                np.int64, np.uint64])
def test_integer_option_dtypes(dt, rng):
    """validation: key_lengths / query_offset accept every integer dtype (no OverflowError)."""
    q, k, v = _qkv(rng)
    kl, qo = np.array([5, 13], dt), np.array([2, 7], dt)
    out = fastattn.attention(q, k, v, causal=True, key_lengths=kl, query_offset=qo)
    assert_matches_reference(q, k, v, out=out, causal=True, key_lengths=kl.astype(np.int64),
                             query_offset=qo.astype(np.int64))


def test_huge_offsets_and_windows_are_clipped(rng):
    """validation: offsets and window bounds far beyond 64-bit-safe ranges behave as +-inf."""
    q, k, v = _qkv(rng)
    full = fastattn.attention(q, k, v)
    assert np.array_equal(fastattn.attention(q, k, v, causal=True, query_offset=2 ** 62), full)
    assert np.array_equal(fastattn.attention(q, k, v, window=(2 ** 70, 2 ** 70)), full)
    empty = fastattn.attention(q, k, v, causal=True, query_offset=-2 ** 62)
    assert not empty.any()
    assert not fastattn.attention(q, k, v, window=(-2 ** 70, None)).any()


def test_huge_offsets_cancelled_by_huge_window_bounds(rng):
    """validation: a huge query_offset and a huge window bound that cancel (row i of batch b
    sees [o_b + i - left, o_b + i + right]) give the keys the exact integers say: clipping
    each to 2**40 / 2**42 on its own flipped whole rows between all keys and none."""
    B, Lq, Lk = 3, 4, 9
    q, k, v = (rand(rng, (B, 1, n, 5), np.float64) for n in (Lq, Lk, Lk))
    big = [0, 2**40, 2**41 + 3, 2**45, 2**62, 2**70]
    for trial in range(300):
        offs = [int(rng.choice([-1, 1])) * int(rng.choice(big)) + int(rng.integers(-12, 12))
                for _ in range(B)]
        if trial % 3 == 0:
            offs = [offs[0]] * B
        o0 = offs[0] if rng.integers(2) else int(rng.choice(big))
        left, right = (None if rng.integers(4) == 0 else
                       int(rng.integers(-12, 12)) + int(rng.choice([-1, 1])) * o0
                       for _ in range(2))
        causal = bool(rng.integers(2))
        want = np.zeros((B, 1, Lq, 5))
        for b, o in enumerate(offs):
            vis = np.ones((Lq, Lk), bool)
            if left is not None:
                vis &= np.array([[o + a - left <= c for c in range(Lk)] for a in range(Lq)])
            if right is not None:
                vis &= np.array([[c <= o + a + right for c in range(Lk)] for a in range(Lq)])
            if causal:
                vis &= np.array([[c <= o + a for c in range(Lk)] for a in range(Lq)])
            s = np.where(vis, q[b, 0] @ k[b, 0].T / np.sqrt(5), -np.inf)
            m = np.max(s, axis=1, keepdims=True)
            p = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
            den = p.sum(1, keepdims=True)
            want[b, 0] = np.divide(p, den, out=np.zeros_like(p), where=den > 0) @ v[b, 0]
        if len(set(offs)) == 1:
            qo = offs[0]                                # a plain int: any size
        elif max(abs(x) for x in offs) < 2**63:
            qo = np.array(offs, np.int64)
        else:
            continue                                    # an int64 array cannot hold them
        got = fastattn.attention(q, k, v, causal=causal, query_offset=qo, window=(left, right))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12,
                                   err_msg=f"offsets {offs} window {(left, right)} {causal}")


def test_reference_2d_inputs_keep_2d_shape(rng):
    """validation (oracle): reference_attention on 2-D inputs returns (Lq, Dv) like attention."""
    q = rand(rng, (3, 4))
    assert fastattn.reference_attention(q, q, q).shape == fastattn.attention(q, q, q).shape


# ---- 32-bit limits ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["Lq", "Lk", "D", "Dv", "Hq"])
def test_sizes_above_int32_refused(case):
    """32-bit limits: a size above 2**31 - 1 (made with stride-0 views, no memory) raises
    ValueError naming the limit, or works; it never gives a wrong result or crashes."""
    big = INT32_MAX + 1
    z = np.zeros(1, np.float32)
    shapes = dict(q=(1, 1, 2, 4), k=(1, 1, 3, 4), v=(1, 1, 3, 2))
    if case == "Lq":
        shapes["q"] = (1, 1, big, 4)
    elif case == "Lk":
        shapes["k"], shapes["v"] = (1, 1, big, 4), (1, 1, big, 2)
    elif case == "D":
        shapes["q"], shapes["k"] = (1, 1, 2, big), (1, 1, 3, big)
    elif case == "Dv":
        shapes["v"] = (1, 1, 3, big)
    else:
        shapes["q"], shapes["k"], shapes["v"] = (1, big, 2, 4), (1, 1, 3, 4), (1, 1, 3, 2)
    q, k, v = (np.broadcast_to(z, shapes[n]) for n in "qkv")
    with pytest.raises(ValueError, match=r"2\*\*31|2147483647|32-bit"):
        fastattn.attention(q, k, v)


def test_batch_count_above_int32_with_empty_rows():
    """32-bit limits: 2**31 broadcast batch items with Lq = 0 give an empty result, no work."""
    z = np.zeros(1, np.float32)
    q = np.broadcast_to(z, (2 ** 31, 1, 0, 4))
    k = np.broadcast_to(z, (1, 1, 3, 4))
    out = fastattn.attention(q, k, k)
    assert out.shape == (2 ** 31, 1, 0, 4)


def test_leading_dimension_above_int32_is_handled(rng):
    """32-bit limits: key/value rows 2**31 elements apart (a leading dimension BLAS cannot
    take) are handled correctly (copied or chunked) or refused naming the limit."""
    lk, d = 3, 4
    n = (lk - 1) * (INT32_MAX + 5) + d
    try:
        buf = np.zeros(n, np.float32)              # lazily mapped: only touched pages count
    except MemoryError:
        pytest.skip("cannot map a 8 GB buffer here")
    ld = INT32_MAX + 5
    keys = rand(rng, (lk, d))
    for j in range(lk):
        buf[j * ld:j * ld + d] = keys[j]
    k = np.lib.stride_tricks.as_strided(buf, (1, 1, lk, d), (0, 0, ld * 4, 4))
    q = rand(rng, (1, 1, 2, d))
    try:
        out = fastattn.attention(q, k, k)
    except ValueError as e:
        assert "2**31" in str(e) or "32-bit" in str(e)
        return
    np.testing.assert_array_equal(out, fastattn.attention(q, keys[None, None], keys[None, None]))
    del k, buf


# ---- non-finite ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_query_row_affects_only_that_row(bad, dtype, rng):
    """non-finite: NaN/inf in query row i changes only output row i (others bitwise equal)."""
    q, k, v = _qkv(rng, lq=40, lk=700, dtype=dtype)
    clean = fastattn.attention(q, k, v, causal=True)
    qb = q.copy()
    qb[1, 0, 17, 3] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fastattn.attention(qb, k, v, causal=True)
    others = np.ones(out.shape[:-1], bool)
    others[1, 0, 17] = False
    assert np.array_equal(out[others], clean[others])
    if bad is np.nan:
        assert np.isnan(out[1, 0, 17]).all()


@pytest.mark.parametrize("where", ["mask", "key_lengths", "causal", "window", "float_mask"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_hidden_keys_never_leak(where, bad, dtype, rng):
    """non-finite: NaN/inf in K or V at keys that are hidden (mask, key_lengths, causal future,
    window) never reaches the result; it equals the clean result within the bound."""
    lq, lk = 5, 1100
    q, k, v = _qkv(rng, lq=lq, lk=lk, dtype=dtype)
    hidden = np.zeros((2, 2, lq, lk), bool)
    kw = {}
    if where == "mask":
        hidden[..., 600:620] = True
        kw["mask"] = ~hidden[0, 0, 0]
    elif where == "float_mask":
        hidden[..., 3] = hidden[..., 1050:] = True
        kw["mask"] = np.where(hidden[0, 0, 0], -np.inf, 0.5).astype(dtype)
    elif where == "key_lengths":
        kw["key_lengths"] = np.array([700, lk])
        hidden[0, ..., 700:] = True
    elif where == "causal":
        kw["causal"], kw["query_offset"] = True, 500
        hidden[..., lq - 1 + 500 + 1:] = True
    else:
        kw["window"] = (10, 10)
        hidden[...] = True
        hidden[..., lk - lq - 10:] = False
    keys_hidden = hidden.all(axis=(1, 2))            # (B, Lk) hidden from every row and head
    kb, vb = k.copy(), v.copy()
    b_idx, j_idx = np.nonzero(keys_hidden)
    sel = rng.choice(len(j_idx), size=min(40, len(j_idx)), replace=False)
    kb[b_idx[sel], :, j_idx[sel], 1] = bad
    vb[b_idx[sel[::2]], :, j_idx[sel[::2]], :] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fastattn.attention(q, kb, vb, **kw)
        out2 = fastattn.attention(q, kb, vb, num_threads=2, **kw)
    assert np.isfinite(out).all() and np.array_equal(out, out2)
    assert_matches_reference(q, k, v, out=out, **kw)


def test_nonfinite_visible_key_poisons_only_its_rows(rng):
    """non-finite: a NaN value row at a key visible to some rows only affects those rows."""
    q, k, v = _qkv(rng, b=1, h=1, lq=6, lk=6, dtype=np.float64)
    vb = v.copy()
    vb[0, 0, 3, :] = np.nan                      # visible to rows 3.. under causal
    out = fastattn.attention(q, k, vb, causal=True)
    clean = fastattn.attention(q, k, v, causal=True)
    np.testing.assert_allclose(out[0, 0, :3], clean[0, 0, :3], rtol=0, atol=1e-14)
    assert np.isnan(out[0, 0, 3:]).all()


# ---- softmax / exp internals --------------------------------------------------------------

@pytest.fixture
def scalar_and_simd():
    """Yields a function that switches the row passes; always restores the SIMD path."""
    names = []

    def use(simd):
        names.append(_kernel.simd_init(simd))
        return names[-1]
    try:
        yield use
    finally:
        _kernel.simd_init(True)


def _rows(dtype, rng):
    xs = []
    for n in list(range(0, 40)) + [255, 256, 1000]:
        x = rng.uniform(-50, 5, n).astype(dtype)
        xs.append(x)
    special = np.array([-np.inf, 0.0, -1e4, -87.0, -88.5, -700.0, -746.0, 1.0, -np.inf, -0.5,
                        -103.0, -1e30], dtype)
    xs.append(special)
    xs.append(np.full(9, -np.inf, dtype))
    return xs


def test_read_probe_is_the_max(rng):
    """The benchmark's memory-read probe (two halves read block by block in turn) returns
    the array's max for every length and block size, both halves and the odd element
    included; -inf for an empty array; a block below 1 is a ValueError."""
    for n in list(range(0, 20)) + [1023, 1024, 1025, 4097]:
        x = rng.uniform(-5, 5, n).astype(np.float32)
        for block in (1, 3, 8, 512, 10**6):
            for where in ({0, n // 2, n - 1} if n else set()):
                y = x.copy()
                y[where] = 6.0
                assert _kernel.read_probe(y, block) == 6.0, (n, block, where)
            assert _kernel.read_probe(x, block) == (x.max() if n else -np.inf)
    with pytest.raises(ValueError, match="block"):
        _kernel.read_probe(np.ones(4, np.float32), 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_passes_simd_equal_scalar(dtype, scalar_and_simd, rng):
    """softmax internals: SIMD and plain-C row max / exp-sum agree (exp within a few ulps of
    the float64 exp), exp(-inf) is exactly 0 and large negatives underflow to exactly 0."""
    assert scalar_and_simd(False) == "scalar"
    simd = scalar_and_simd(True)
    if simd == "scalar":
        pytest.skip("no SIMD path on this machine")
    u = U32 if dtype == np.float32 else U64
    for x in _rows(dtype, rng):
        res = {}
        for mode in (False, True):
            scalar_and_simd(mode)
            y = x.copy()
            mx = _kernel.py_row_max(y)
            s = _kernel.py_row_expsum(y, dtype(0))
            res[mode] = (mx, s, y)
        (m0, s0, y0), (m1, s1, y1) = res[False], res[True]
        assert m0 == m1 == (x.max() if x.size else -np.inf)
        exact = np.exp(x.astype(np.float64))
        tiny = exact < np.finfo(dtype).tiny * 2 ** 10          # near/below underflow
        # exp(-inf) and anything far below the underflow threshold are exactly 0 on both
        # paths; in the subnormal range a path may flush to 0 (both stay below tiny)
        zero = np.isneginf(x) | (exact < np.finfo(dtype).smallest_subnormal / 2)
        assert (y0[zero] == 0).all() and (y1[zero] == 0).all()
        assert (y0[tiny] <= 2 * np.finfo(dtype).tiny * 2 ** 10).all()
        assert (y1[tiny] <= 2 * np.finfo(dtype).tiny * 2 ** 10).all()
        rel = np.abs(y1 - exact)[~tiny] / exact[~tiny]
        assert rel.size == 0 or rel.max() <= 4 * u, f"exp error {rel.max() / u:.1f} ulp"
        assert abs(s1 - s0) <= 4 * u * max(abs(s0), 1e-300) * max(1, x.size), (s0, s1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_passes_nan_propagates(dtype, scalar_and_simd):
    """softmax internals: a NaN in a row makes its exp and the sum NaN, on both paths."""
    for mode in (False, True):
        scalar_and_simd(mode)
        for n in (1, 5, 8, 17):
            for pos in sorted({0, n // 2, n - 1}):
                x = np.linspace(-3, 0, n).astype(dtype)
                x[pos] = np.nan
                y = x.copy()
                s = _kernel.py_row_expsum(y, dtype(0))
                assert np.isnan(s) and np.isnan(y[pos])
                assert np.isfinite(np.delete(y, pos)).all()
        x = np.array([np.nan], dtype)
        y = x.copy()
        assert np.isnan(_kernel.py_row_expsum(y, dtype(np.nan)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_same_on_scalar_path(dtype, scalar_and_simd, rng):
    """softmax internals: attention on the plain-C path is within the bound too, with the same
    empty rows and NaN pattern as the SIMD path."""
    q, k, v = _qkv(rng, lq=40, lk=1030, dtype=dtype)
    mask = rng.random((40, 1030)) < 0.5
    mask[7] = False
    kw = dict(mask=mask, causal=True, softcap=5.0)
    res = {}
    for mode in (True, False):
        scalar_and_simd(mode)
        res[mode] = fastattn.attention(q, k, v, **kw)
        assert_matches_reference(q, k, v, out=res[mode], **kw)
    assert np.array_equal(res[True] == 0, res[False] == 0)


# ---- the micro-kernel path (_gemm.h) against BLAS -------------------------------------------

GEMM_SHAPES = [(1, 1, 1), (5, 17, 3), (6, 16, 8), (7, 33, 65), (13, 100, 64), (12, 31, 129),
               (25, 48, 16), (3, 2, 0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_is_keys", [True, False])
def test_micro_kernel_gemm_matches_float64(dtype, x_is_keys, rng):
    """micro-kernel: c (+)= a · xᵀ (keys, packed by transposing) or a · x (values), for
    shapes with row / column / depth tails, within the float dot-product error bound."""
    if _kernel.simd_init(True) == "scalar":
        pytest.skip("no AVX2/FMA on this machine")
    u = U32 if dtype == np.float32 else U64
    for m, n, k in GEMM_SHAPES:
        a = rand(rng, (m, k), dtype)
        x = rand(rng, (n, k) if x_is_keys else (k, n), dtype)
        b = x.T if x_is_keys else x
        c0 = rand(rng, (m, n), dtype)
        for accumulate in (False, True):
            c = c0.copy()
            assert _kernel.py_gemm_packed(a, x, x_is_keys, c, accumulate)
            ref = a.astype(np.float64) @ b.astype(np.float64) + (c0 if accumulate else 0)
            scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64) + np.abs(c0)
            assert np.all(np.abs(c - ref) <= (k + 2) * u * scale + 1e-300), (m, n, k, accumulate)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_micro_kernel_pack_reports_nonfinite_values(dtype, rng):
    """micro-kernel: packing V tells whether every value is finite (NaN and ±inf alike), in
    the full column panels (vector loads) and in the last, partial one."""
    if _kernel.simd_init(True) == "scalar":
        pytest.skip("no AVX2/FMA on this machine")
    a = rand(rng, (6, 10), dtype)
    for bad in (np.nan, np.inf, -np.inf):
        for row, col in [(7, 20), (0, 0), (9, 15), (4, 7)]:     # 21 columns: panels of 16 / 8
            x = rand(rng, (10, 21), dtype)
            assert _kernel.py_gemm_packed(a, x, False, np.empty((6, 21), dtype), False)
            x[row, col] = bad
            assert not _kernel.py_gemm_packed(a, x, False, np.empty((6, 21), dtype), False)


# (B, Hq, Hkv, Lq, Lk, D, Dv, options): panels crossing heads (GQA with few rows), tails of
# the 6-row blocks, the 16-key packed panels and the 8-wide transposes, windows with a left
# bound (panels starting inside a tile), lengths, masks, softcap and weights
PANEL_CASES = [
    (2, 4, 2, 37, 301, 40, 24, dict(causal=True)),
    (1, 3, 3, 150, 700, 64, 64, dict(window=(45, 7), causal=True)),
    (2, 8, 1, 5, 77, 19, 33, dict(causal=True)),
    (2, 6, 2, 13, 530, 128, 8, dict(key_lengths=np.array([530, 111]))),
    (1, 2, 2, 70, 70, 8, 72, dict(mask=np.tri(70, 70, 3, dtype=bool), softcap=3.0)),
    (1, 2, 1, 31, 47, 16, 16, dict(window=(5, 5), return_weights=True)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(PANEL_CASES)))
def test_micro_kernel_path_matches_blas_path(case, dtype, scalar_and_simd, rng):
    """micro-kernel: the panel path (AVX2) and the BLAS-tile path (plain C) both meet the
    reference bound, agree to within a few rounding errors, and hide the same keys (weights
    and empty rows identical in where they are 0).  NaN values at hidden keys stay hidden."""
    b, hq, hkv, lq, lk, d, dv, opts = PANEL_CASES[case]
    q, k = rand(rng, (b, hq, lq, d), dtype), rand(rng, (b, hkv, lk, d), dtype)
    v = rand(rng, (b, hkv, lk, dv), dtype)
    if "key_lengths" in opts:
        v[1, :, opts["key_lengths"][1]:] = np.nan          # padded keys: never read into O
    res = {}
    for mode in (True, False):
        if scalar_and_simd(mode) == "scalar" and mode:
            pytest.skip("no AVX2/FMA on this machine")
        res[mode] = fastattn.attention(q, k, v, **opts)
    if opts.get("return_weights"):
        (o1, w1), (o0, w0) = res[True], res[False]
        assert np.array_equal(w1 == 0, w0 == 0)
        np.testing.assert_allclose(w1, w0, rtol=0, atol=64 * np.finfo(dtype).eps)
    else:
        o1, o0 = res[True], res[False]
    v_ref = np.nan_to_num(v, nan=0.0)
    assert_matches_reference(q, k, v_ref, out=o1, **{n: x for n, x in opts.items()
                                                      if n != "return_weights"})
    assert_matches_reference(q, k, v_ref, out=o0, **{n: x for n, x in opts.items()
                                                      if n != "return_weights"})
    assert np.array_equal(o1 == 0, o0 == 0)


# (B, Hq, Hkv, Lq, Lk, D, Dv, options) with at most SMALL_ROWS (16) rows per KV head: the
# streaming Q·Kᵀ (rows four at a time, the others several keys at a time; D and Lk with
# vector tails) and P·V (keys in L1-sized blocks: Lk across several, Dv wide and with a tail;
# rows in groups of 4, 3 and 2 where no P is 0, one by one where some are)
DECODE_CASES = [
    (1, 12, 2, 1, 300, 64, 48, {}),
    (2, 10, 2, 1, 129, 32, 44, dict(key_lengths=np.array([129, 70]))),
    (1, 4, 1, 1, 301, 128, 128, {}),
    (2, 8, 1, 1, 777, 24, 130, {}),
    (1, 7, 1, 1, 200, 13, 5, dict(mask=np.arange(200) % 3 != 1)),
    (2, 6, 2, 1, 530, 136, 72, dict(key_lengths=np.array([530, 99]))),
    (1, 2, 1, 4, 100, 40, 200, dict(causal=True)),
    (3, 5, 5, 1, 1030, 64, 64, dict(key_lengths=np.array([1030, 1, 517]))),
    (1, 3, 3, 16, 300, 64, 64, dict(causal=True)),
    (2, 8, 2, 3, 90, 33, 17, dict(window=(20, 0), causal=True)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_streaming_path_matches_plain_path(case, dtype, scalar_and_simd, rng):
    """decode: the AVX2 streaming kernels for few rows and the plain-C ones both meet the
    reference bound and hide the same keys; NaN values at hidden keys stay hidden."""
    b, hq, hkv, lq, lk, d, dv, opts = DECODE_CASES[case]
    q, k = rand(rng, (b, hq, lq, d), dtype), rand(rng, (b, hkv, lk, d), dtype)
    v = rand(rng, (b, hkv, lk, dv), dtype)
    if "key_lengths" in opts:
        for i, n in enumerate(opts["key_lengths"]):
            v[i, :, n:] = np.nan
    if "mask" in opts:
        v[..., ~opts["mask"], :] = np.nan
    res = {}
    for mode in (True, False):
        if scalar_and_simd(mode) == "scalar" and mode:
            pytest.skip("no AVX2/FMA on this machine")
        res[mode] = fastattn.attention(q, k, v, **opts)
    v_ref = np.nan_to_num(v, nan=0.0)
    for mode in (True, False):
        assert_matches_reference(q, k, v_ref, out=res[mode], **opts)
    assert np.array_equal(res[True] == 0, res[False] == 0)


# (B, Hq, Hkv, Lq, Lk, D, Dv, options): float16 K/V through the streaming path (few rows), the
# micro-kernel path, the KV split and windows; K/V as (B, L, H, D) views, read in place
HALF_CASES = [
    (2, 8, 2, 1, 700, 64, 64, dict(key_lengths=np.array([700, 333]))),
    (1, 4, 4, 1, 5000, 128, 40, {}),
    (2, 6, 3, 37, 530, 40, 24, dict(causal=True)),
    (1, 2, 1, 300, 300, 16, 72, dict(window=(50, 3), key_lengths=np.array([250]))),
]


@pytest.mark.parametrize("case", range(len(HALF_CASES)))
def test_float16_kv_read_in_place_equals_float32(case, scalar_and_simd, rng):
    """dtypes: float16 K/V, converted by the kernel a tile at a time (F16C, or plain C), give
    bitwise the float32 computation on the converted arrays; subnormal, ±0 and largest
    float16 values are converted exactly; inf and NaN at hidden keys stay hidden."""
    b, hq, hkv, lq, lk, d, dv, opts = HALF_CASES[case]
    q = rand(rng, (b, hq, lq, d), np.float16)
    k = (rand(rng, (b, lk, hkv, d), np.float32) * 4).astype(np.float16).transpose(0, 2, 1, 3)
    v = rand(rng, (b, lk, hkv, dv), np.float16).transpose(0, 2, 1, 3)
    k[0, 0, :4, 0] = [6e-8, -6e-8, -0.0, 65504]             # subnormals, -0, largest
    v[0, 0, 1, :3] = [1e-7, 3e-5, -0.0]
    if "key_lengths" in opts:
        for i, n in enumerate(opts["key_lengths"]):
            k[i, :, n:, 0], v[i, :, n:, 0] = np.inf, np.nan
    for mode in (True, False):
        scalar_and_simd(mode)
        got = fastattn.attention(q, k, v, **opts)
        want = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v)), **opts)
        assert got.dtype == np.float16 and np.isfinite(got).all()
        assert np.array_equal(got, want.astype(np.float16))


# ---- leaks ---------------------------------------------------------------------------------

# AddressSanitizer keeps freed blocks in a quarantine of up to 256 MB, so RSS grows under it
# without any leak (.ci/asan.sh sets FASTATTN_UNDER_ASAN); the normal run measures leaks.
rss_test = pytest.mark.skipif(bool(os.environ.get("FASTATTN_UNDER_ASAN")),
                              reason="RSS is meaningless under ASan's quarantine")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
@rss_test
def test_no_leak_over_1e5_calls(rng):
    """leaks: 10^5 calls (every tenth one raising, some with weights, out=, masks) grow RSS
    by less than 5 MB."""
    q, k, v = _qkv(rng, b=1, h=2, lq=4, lk=16, d=8, dv=8)
    mask = rng.random((4, 16)) < 0.7
    out = np.empty((1, 2, 4, 8), np.float32)
    bad = np.ones((1, 3, 4, 8), np.float32)

    def batch(n):
        for i in range(n):
            r = i % 10
            if r == 0:
                try:
                    fastattn.attention(bad, k, v)
                except ValueError:
                    pass
            elif r == 1:
                try:
                    fastattn.attention(q, k, v, key_lengths=-1)
                except ValueError:
                    pass
            elif r == 2:
                fastattn.attention(q, k, v, mask=mask, return_weights=True)
            elif r == 3:
                fastattn.attention(q, k, v, out=out, causal=True)
            elif r == 4:
                fastattn.attention(q.astype(np.float16), k, v, window=(2, 2))
            else:
                fastattn.attention(q, k, v, key_lengths=np.array([9]), num_threads=1 + i % 2)

    batch(5000)                                   # warm up caches and allocator pools
    gc.collect()
    before = _rss_bytes()
    batch(100_000)
    gc.collect()
    growth = _rss_bytes() - before
    print(f"\nleaks: RSS growth over 10^5 calls = {growth / 2 ** 20:.2f} MB")
    assert growth < 5 * 2 ** 20


@rss_test
def test_no_leak_quick(rng):
    """leaks (quick): 10^4 calls including raising ones grow RSS by less than 2 MB."""
    q, k, v = _qkv(rng, b=1, h=1, lq=3, lk=8)
    for _ in range(1000):
        fastattn.attention(q, k, v)
    before = _rss_bytes()
    for i in range(10_000):
        if i % 5 == 0:
            with pytest.raises(ValueError):
                fastattn.attention(q, k, v, softcap=0.0)
        else:
            fastattn.attention(q, k, v, return_weights=bool(i % 2))
    assert _rss_bytes() - before < 2 * 2 ** 20
