"""fastattn.attention against the float64 reference: accuracy, semantics, masks, empty rows,
layouts, no-overwrite, ``out=`` and dtypes (shared/reliability.md, "accuracy" to "no overwrite").

Each test names the property it checks.  The error bound is ``conftest.error_bound``.
"""
import itertools
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import fastattn
from conftest import assert_matches_reference, plain_attention, rand, reference64

DTYPES = [np.float32, np.float64, np.float16]
LENGTHS = [0, 1, 7, 127, 128, 129, 1030, 4096]
FEATURES = [8, 64, 128]


def _grid_case(lq, lk, d, rng, dtype, causal):
    dv = {8: 24, 64: 64, 128: 40}[d]                # Dv != D for two of the three
    heads = 2 if max(lq, lk) <= 1030 else 1
    q = rand(rng, (1, heads, lq, d), dtype)
    k = rand(rng, (1, heads, lk, d), dtype)
    v = rand(rng, (1, heads, lk, dv), dtype)
    return assert_matches_reference(q, k, v, causal=causal)


FAST_PAIRS = [(0, 7), (7, 0), (1, 1), (1, 129), (7, 7), (127, 128), (128, 127), (129, 129),
              (1, 1030), (129, 1030), (1030, 129)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("lq,lk", FAST_PAIRS)
def test_accuracy_grid_fast(lq, lk, dtype, rng):
    """accuracy: a quick slice of the (Lq, Lk, D) grid is within the reliability bound."""
    for i, d in enumerate(FEATURES):
        _grid_case(lq, lk, d, rng, dtype, causal=bool((lq + lk + i) % 2))


SLOW_CASES = [(lq, lk, FEATURES[(i + j) % 3]) for i, lq in enumerate(LENGTHS)
              for j, lk in enumerate(LENGTHS) if (lq, lk) not in FAST_PAIRS]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("lq,lk,d", SLOW_CASES)
def test_accuracy_grid_full(lq, lk, d, dtype, rng):
    """accuracy: every (Lq, Lk) pair of the grid, causal and not, within the bound."""
    for causal in (False, True):
        _grid_case(lq, lk, d, rng, dtype, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("hq,hkv", [(65, 5), (27, 1), (8, 2), (4, 4)])
def test_accuracy_gqa(hq, hkv, dtype, rng):
    """accuracy: grouped-query / multi-query head ratios (query head h uses KV head h // g)."""
    lq, lk = (3, 40) if hq > 8 else (33, 300)
    q = rand(rng, (2, hq, lq, 16), dtype)
    k = rand(rng, (2, hkv, lk, 16), dtype)
    v = rand(rng, (2, hkv, lk, 12), dtype)
    assert_matches_reference(q, k, v)
    assert_matches_reference(q, k, v, causal=True, key_lengths=np.array([lk, lk // 2]))
    # head h of the output equals plain attention with KV head h // g
    out = fastattn.attention(q, k, v)
    g = hq // hkv
    for h in sorted({0, hq - 1, min(g, hq - 1)}):
        single = fastattn.attention(q[:, h:h + 1], k[:, h // g:h // g + 1], v[:, h // g:h // g + 1])
        np.testing.assert_allclose(single[:, 0], out[:, h], atol=2e-3 if dtype == np.float16
                                   else 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("hq,hkv,lq,lk", [(65, 5, 129, 1030), (27, 1, 1, 4096), (32, 8, 1, 4096)])
def test_accuracy_gqa_large(hq, hkv, lq, lk, rng):
    """accuracy: GQA at decode and prefill lengths around the block boundaries."""
    q, k, v = (rand(rng, s) for s in ((1, hq, lq, 64), (1, hkv, lk, 64), (1, hkv, lk, 64)))
    assert_matches_reference(q, k, v)
    assert_matches_reference(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_accuracy_cross_attention(dtype, rng):
    """accuracy: cross-attention (Lq != Lk, Dv != D, key_lengths padding, batch broadcast)."""
    q = rand(rng, (3, 4, 50, 32), dtype)
    k = rand(rng, (1, 4, 700, 32), dtype)      # memory shared by the batch
    v = rand(rng, (3, 4, 700, 20), dtype)
    assert_matches_reference(q, k, v)
    assert_matches_reference(q, k, v, key_lengths=np.array([700, 1, 513]))


@pytest.mark.parametrize("logit", [1.0, 30.0, 300.0, 1e4])
def test_accuracy_large_logits(logit, rng):
    """accuracy: the bound scales with max|s|; no overflow or NaN for logits up to 1e4."""
    q = rand(rng, (1, 2, 40, 16)); k = rand(rng, (1, 2, 600, 16)); v = rand(rng, (1, 2, 600, 16))
    q *= logit / np.abs(q @ np.swapaxes(k, -1, -2) / 4).max()
    for dtype in (np.float32, np.float64):
        assert_matches_reference(q.astype(dtype), k.astype(dtype), v.astype(dtype))


def test_reference_agrees_with_independent_two_pass(rng):
    """accuracy (oracle check): reference_attention equals an independently written float64
    softmax with every option, so the oracle itself is sound."""
    q = rand(rng, (2, 1, 4, 9, 8), np.float64)
    k = rand(rng, (1, 3, 2, 11, 8), np.float64)
    v = rand(rng, (2, 1, 2, 11, 5), np.float64)
    mask = rng.random((3, 1, 9, 11)) < 0.8
    for kw in [{}, dict(causal=True), dict(causal=True, query_offset=0),
               dict(window=(2, 1)), dict(window=(None, 0), query_offset=np.array([[3], [-2]])),
               dict(key_lengths=np.array([[4], [11]]), causal=True), dict(mask=mask),
               dict(mask=np.where(mask, rng.uniform(-2, 2, mask.shape), -np.inf)),
               dict(softcap=2.0, scale=0.7)]:
        ref = reference64(q, k, v, **kw)
        mine, _, _ = plain_attention(q, k, v, **kw)
        np.testing.assert_allclose(ref, mine, rtol=0, atol=1e-13, err_msg=str(kw))


# ---- semantics spelled out as explicit masks ----------------------------------------------

def _qkv(rng, b=2, h=2, lq=9, lk=13, d=8, dv=8, dtype=np.float64):
    return rand(rng, (b, h, lq, d), dtype), rand(rng, (b, h, lk, d), dtype), \
        rand(rng, (b, h, lk, dv), dtype)


def test_causal_default_is_bottom_right(rng):
    """semantics: causal with the default offset sees j <= Lk - Lq + i (bottom-right)."""
    q, k, v = _qkv(rng)
    lq, lk = 9, 13
    explicit = np.tril(np.ones((lq, lk), bool), k=lk - lq)
    np.testing.assert_allclose(fastattn.attention(q, k, v, causal=True),
                               fastattn.attention(q, k, v, mask=explicit), atol=1e-14)


def test_causal_offset_zero_is_top_left_like_torch(rng):
    """semantics: query_offset=0 gives top-left alignment, as torch's is_causal does."""
    torch = pytest.importorskip("torch")
    q, k, v = _qkv(rng, lq=9, lk=13)
    ours = fastattn.attention(q, k, v, causal=True, query_offset=0)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)), is_causal=True).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_window_and_key_lengths_as_masks(rng):
    """semantics: window=(l, r) and key_lengths equal the explicit bool masks they describe."""
    q, k, v = _qkv(rng)
    lq, lk = 9, 13
    i, j = np.arange(lq)[:, None], np.arange(lk)
    p = (lk - lq) + i
    for left, right in [(2, 1), (0, 0), (None, -1), (3, None), (-2, 4)]:
        vis = np.ones((lq, lk), bool)
        if left is not None:
            vis &= j >= p - left
        if right is not None:
            vis &= j <= p + right
        np.testing.assert_allclose(fastattn.attention(q, k, v, window=(left, right)),
                                   fastattn.attention(q, k, v, mask=vis), atol=1e-14)
    kl = np.array([5, 13])
    vis = (j < kl[:, None, None, None])
    np.testing.assert_allclose(fastattn.attention(q, k, v, key_lengths=kl),
                               fastattn.attention(q, k, v, mask=vis), atol=1e-14)
    # the default causal offset counts from the valid length: Lk_valid - Lq
    vis2 = vis & (j <= (kl[:, None, None, None] - lq) + i)
    np.testing.assert_allclose(fastattn.attention(q, k, v, key_lengths=kl, causal=True),
                               fastattn.attention(q, k, v, mask=vis2), atol=1e-14)


# ---- property-based ------------------------------------------------------------------------

@st.composite
def problems(draw, dtypes=tuple(DTYPES)):
    shapes, batch = draw(mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=2,
                                                       max_side=3))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    lq, lk = draw(st.integers(0, 20)), draw(st.integers(0, 40))
    d, dv = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    r = np.random.default_rng(seed)
    q = r.uniform(-8, 8, shapes[0] + (hq, lq, d)).astype(dtype)
    k = r.uniform(-8, 8, shapes[1] + (hkv, lk, d)).astype(dtype)
    v = r.uniform(-8, 8, shapes[2] + (hkv, lk, dv)).astype(dtype)
    kw = {}
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    if kind != "none":
        # every mask shape in {B,1}x{H,1}x{Lq,1}x{Lk,1}, with or without the batch axes
        keep = draw(st.lists(st.booleans(), min_size=len(batch) + 3, max_size=len(batch) + 3))
        mshape = tuple(n if kp else 1 for n, kp in zip(batch + (hq, lq, lk), keep))
        if draw(st.booleans()):
            mshape = mshape[len(batch):]
        vis = r.random(mshape) < draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
        if kind == "bool":
            kw["mask"] = vis
        else:
            kw["mask"] = np.where(vis, r.uniform(-4, 4, mshape), -np.inf).astype(
                draw(st.sampled_from(DTYPES)))
    kw["causal"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["query_offset"] = draw(st.one_of(
            st.integers(-lq - 3, lk + 3),
            st.just(r.integers(-lq - 3, lk + 4, batch))))
    if draw(st.booleans()):
        kw["window"] = (draw(st.one_of(st.none(), st.integers(-3, 30))),
                        draw(st.one_of(st.none(), st.integers(-3, 30))))
    if draw(st.booleans()):
        kw["key_lengths"] = r.integers(0, lk + 1, draw(st.sampled_from([batch, batch[-1:], ()])))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.5, 30.0))
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(-1.0, 1.0))
    return q, k, v, kw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(dtypes=(np.float32, np.float16)))
def test_property_random_problems_within_bound(problem):
    """property-based: broadcast batches, every mask shape, offsets, windows, lengths, softcap
    and values in +-8 agree with the reference within the bound; no NaN, no warning
    (float32 and float16)."""
    q, k, v, kw = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fastattn.attention(q, k, v, **kw)
    assert_matches_reference(q, k, v, out=out, **kw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(dtypes=(np.float64,)))
def test_property_random_problems_within_bound_float64(problem):
    """property-based: the same as above for float64 inputs (bound with u = 2**-53)."""
    q, k, v, kw = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fastattn.attention(q, k, v, **kw)
    assert_matches_reference(q, k, v, out=out, **kw)


def test_accuracy_float64_exp_near_half_ln2():
    """accuracy: float64 with two keys whose logits differ by ~ln2/2 (where a short exp
    polynomial is least accurate) is within the bound (u = 2**-53)."""
    q = np.ones((1, 1, 1, 1))
    k = np.array([0.0, -0.34]).reshape(1, 1, 2, 1)
    v = np.array([-8.0, 8.0]).reshape(1, 1, 2, 1)
    assert_matches_reference(q, k, v, scale=1.0)


@pytest.mark.parametrize("dtype, scale", [(np.float32, 1e36), (np.float64, 1e306)])
@pytest.mark.parametrize("lq", [1, 40])
def test_large_scale_scales_the_scores_not_the_query(dtype, scale, lq):
    """accuracy: a scale above 1 multiplies the scores after Q·Kᵀ: scaling Q first overflowed
    inside a dot product whose score is finite (30·30 - 30·30 at scale 1e36: NaN), and with a
    softcap bounding the logits gave a wrong finite answer (1.5 for 1.9933)."""
    q = np.repeat(np.array([[30.0, -30.0]], dtype), lq, axis=0)
    k = np.array([[30.0, 30.0], [1.0, 0.0]], dtype)
    v = np.array([[1.0], [2.0]], dtype)
    for kw in (dict(scale=scale), dict(scale=scale, softcap=5.0), dict(scale=-scale)):
        out = fastattn.attention(q, k, v, **kw)
        want = fastattn.reference_attention(q, k, v, **kw)
        assert np.isfinite(out).all(), kw
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scales_above_one_match_the_reference(dtype, rng):
    """accuracy: scales above 1 (applied to the scores, or inside the exponent) over random
    shapes and options, float masks and the weights included."""
    fmask = rng.uniform(-4, 0, (37, 130)).astype(dtype)
    fmask[::5, ::3] = -np.inf
    for scale in (1.5, 8.0, 1e3, -3.0):
        for kw in ({}, dict(causal=True), dict(softcap=20.0), dict(window=(3, 1)),
                   dict(mask=fmask), dict(mask=fmask > -2)):
            q, k, v = _qkv(rng, lq=37, lk=130, dtype=dtype)
            assert_matches_reference(q, k, v, scale=scale, **kw)
            m1 = dict(kw, mask=kw["mask"][:1]) if "mask" in kw else kw
            assert_matches_reference(q[..., :1, :], k, v, scale=scale, **m1)
            out, w = fastattn.attention(q, k, v, scale=scale, return_weights=True, **kw)
            _, wr = fastattn.reference_attention(q, k, v, scale=scale, return_weights=True,
                                                 **kw)
            np.testing.assert_allclose(w, wr, rtol=0, atol=1e3 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("lq, lk", [(1, 5), (40, 5), (1, 3000), (40, 300)])
def test_scores_beyond_the_dtype_range_stay_finite(dtype, lq, lk, rng):
    """accuracy: scale · q·k beyond float32's range, with a softmax the float64 reference
    computes finitely: without a softcap the scale goes inside the exponent,
    exp(|scale| (s - m)), so no score overflows (they did: inf - inf gave NaN; audit).  At
    scale 1e38 the softmax is one-hot at each row's largest visible score.  Paths: streamed
    (Lq = 1; with Lk = 3000 the keys split across work items), micro-kernel (Lq = 40)."""
    q = np.array([[1.0, 2.0]], dtype)
    k = np.array([[1.0, 0.0], [0.0, 1.0]], dtype)
    v = np.array([[1.0], [2.0]], dtype)
    for scale, want in ((2e38, 2.0), (-2e38, 1.0)):
        np.testing.assert_array_equal(fastattn.attention(q, k, v, scale=scale), [[want]])
    q, k, v = (rand(rng, (1, 1, n, 16), dtype) for n in (lq, lk, lk))
    fmask = rng.uniform(-1, 0, (lq, lk)).astype(dtype)
    fmask[:, ::7] = -np.inf
    for scale in (1e38, -1e38):
        for kw in ({}, dict(causal=True, query_offset=lk // 2), dict(mask=fmask)):
            out, w = fastattn.attention(q, k, v, scale=scale, return_weights=True, **kw)
            ref, wr = fastattn.reference_attention(q, k, v, scale=scale, return_weights=True,
                                                   **kw)
            np.testing.assert_array_equal(w, wr.astype(dtype))     # one-hot
            np.testing.assert_array_equal(out, ref.astype(dtype))
            np.testing.assert_array_equal(fastattn.attention(q, k, v, scale=scale, **kw), out)


def test_more_than_32_batch_axes_fail_before_any_work():
    """validation: the batch-axis limit is checked before the outputs are allocated (here a
    4 TB weights array, which failed with MemoryError where the limit was checked later)."""
    q = np.zeros((1,) * 33 + (1, 10**6, 1), np.float32)
    with pytest.raises(ValueError, match="at most 32 batch axes"):
        fastattn.attention(q, q, q, return_weights=True)


# ---- masks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_bool_equals_additive_neg_inf_bitwise(dtype, rng):
    """masks: a bool mask and the additive mask with 0 / -inf give bitwise equal results."""
    q, k, v = _qkv(rng, lq=70, lk=1100, dtype=dtype)
    vis = rng.random((2, 1, 70, 1100)) < 0.7
    vis[0, 0, 3] = False
    add = np.where(vis, 0, -np.inf).astype(dtype)
    for kw in ({}, dict(causal=True), dict(key_lengths=np.array([600, 1100]))):
        a, wa = fastattn.attention(q, k, v, mask=vis, return_weights=True, **kw)
        b, wb = fastattn.attention(q, k, v, mask=add, return_weights=True, **kw)
        assert np.array_equal(a, b) and np.array_equal(wa, wb)
        assert np.array_equal(a, fastattn.attention(q, k, v, mask=add, **kw))


@pytest.mark.parametrize("mshape", ["1,1,1,Lk", "1,1,Lq,1", "B,1,1,Lk", "1,H,Lq,Lk", "Lq,Lk",
                                    "Lk", "B,H,1,1", "1,1,1,1"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast_equals_materialised_bitwise(mshape, kind, rng):
    """masks: a broadcast mask gives bitwise the result of its materialised copy."""
    dims = dict(B=2, H=3, Lq=17, Lk=600)
    shape = tuple(dims.get(s, 1) for s in mshape.split(","))
    q, k, v = _qkv(rng, b=2, h=3, lq=17, lk=600, dtype=np.float32)
    vis = rng.random(shape) < 0.6
    m = vis if kind == "bool" else np.where(vis, rng.standard_normal(shape), -np.inf)
    full = np.ascontiguousarray(np.broadcast_to(m, (2, 3, 17, 600)))
    a = fastattn.attention(q, k, v, mask=m)
    b = fastattn.attention(q, k, v, mask=full)
    assert np.array_equal(a, b)
    assert_matches_reference(q, k, v, out=a, mask=m)


# ---- empty rows ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_empty_rows_are_exact_zeros_without_warning(dtype, rng):
    """empty rows: rows with no visible key are exactly 0 (weights too), other rows match the
    reference; no NaN and no RuntimeWarning anywhere."""
    q, k, v = _qkv(rng, lq=20, lk=1100, dtype=dtype)
    vis = rng.random((2, 2, 20, 1100)) < 0.5
    vis[0, 1, 4] = False                                  # one empty row by mask
    cases = [
        (dict(mask=vis), lambda o: o[0, 1, 4]),
        (dict(key_lengths=np.array([0, 1100])), lambda o: o[0]),          # no keys at all
        (dict(causal=True, query_offset=-5), lambda o: o[:, :, :5]),       # before all keys
        (dict(window=(-1, None), causal=True), lambda o: o),               # empty interval
        (dict(window=(3, -4)), lambda o: o),
        (dict(mask=np.zeros((20, 1100), bool)), lambda o: o),
        (dict(mask=np.full((1, 1100), -np.inf, dtype)), lambda o: o),
    ]
    for kw, empty in cases:
        with warnings.catch_warnings(), np.errstate(divide="raise", over="raise",
                                                    invalid="raise"):
            warnings.simplefilter("error")
            out, w = fastattn.attention(q, k, v, return_weights=True, **kw)
        assert not np.isnan(out).any() and not np.isnan(w).any(), kw
        e = empty(out)
        assert e.size and np.array_equal(e, np.zeros_like(e)), kw
        ew = empty(w)
        assert np.array_equal(ew, np.zeros_like(ew)), kw
        assert_matches_reference(q, k, v, out=out, **kw)


def test_empty_axes_give_empty_or_zero_results(rng):
    """empty rows: zero-sized batch, heads, Lq, Lk, D and Dv give the right shapes (Lk = 0: zeros)."""
    for qs, ks, vs, expect in [
        ((0, 2, 3, 4), (0, 2, 5, 4), (0, 2, 5, 6), (0, 2, 3, 6)),
        ((2, 0, 3, 4), (2, 1, 5, 4), (2, 1, 5, 6), (2, 0, 3, 6)),
        ((2, 2, 0, 4), (2, 1, 5, 4), (2, 1, 5, 6), (2, 2, 0, 6)),
        ((2, 2, 3, 4), (2, 1, 0, 4), (2, 1, 0, 6), (2, 2, 3, 6)),
        ((2, 2, 3, 0), (2, 1, 5, 0), (2, 1, 5, 6), (2, 2, 3, 6)),
        ((2, 2, 3, 4), (2, 1, 5, 4), (2, 1, 5, 0), (2, 2, 3, 0)),
    ]:
        q, k, v = rand(rng, qs), rand(rng, ks), rand(rng, vs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = fastattn.attention(q, k, v)
        assert out.shape == expect
        assert_matches_reference(q, k, v, out=out)
    o, w = fastattn.attention(rand(rng, (3, 4)), rand(rng, (0, 4)), rand(rng, (0, 5)),
                              return_weights=True)
    assert np.array_equal(o, np.zeros((3, 5))) and w.shape == (3, 0)


def test_weights_when_dv_is_zero(rng):
    """empty rows / return_weights: the weights do not depend on Dv (Dv = 0 included)."""
    q, k = rand(rng, (1, 4, 3)), rand(rng, (1, 6, 3))
    _, w0 = fastattn.attention(q, k, rand(rng, (1, 6, 0)), return_weights=True)
    _, w2 = fastattn.attention(q, k, rand(rng, (1, 6, 2)), return_weights=True)
    np.testing.assert_allclose(w0, w2, atol=1e-7)


# ---- layouts -------------------------------------------------------------------------------

def _layouts(a):
    """(name, an array equal to a in another memory layout)."""
    yield "transposed", np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    yield "step2", big[..., ::2]
    yield "negative", np.ascontiguousarray(a[..., ::-1, ::-1])[..., ::-1, ::-1]
    yield "fortran", np.asfortranarray(a)
    yield "heads_first_axis", np.ascontiguousarray(np.moveaxis(a, -3, 0)).transpose(1, 0, 2, 3)
    pad = np.full(a.shape[:-2] + (a.shape[-2] + 3, a.shape[-1] + 5), np.nan, a.dtype)
    pad[..., 1:-2, 2:-3] = a
    yield "poisoned_padding", pad[..., 1:-2, 2:-3]


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_layouts_equal_contiguous_copy(which, dtype, rng):
    """layouts: transposed, [..., ::2], negative strides, Fortran order, padded views of
    q, k or v give the result of the contiguous copy (bitwise)."""
    q, k, v = _qkv(rng, b=2, h=2, lq=37, lk=530, d=16, dv=12, dtype=dtype)
    mask = rng.random((37, 530)) < 0.8
    base = fastattn.attention(q, k, v, mask=mask, causal=True)
    args = [q, k, v]
    for name, alt in _layouts(args[which]):
        assert np.array_equal(alt, args[which])
        a = list(args)
        a[which] = alt
        out = fastattn.attention(*a, mask=mask, causal=True)
        assert np.array_equal(out, base), name
    for name, alt in _layouts(np.broadcast_to(mask, (2, 2, 37, 530))):
        out = fastattn.attention(q, k, v, mask=alt, causal=True)
        assert np.array_equal(out, base), "mask " + name


def test_layout_stride_zero_equals_materialised(rng):
    """layouts: stride-0 (np.broadcast_to) batch, head, row and feature axes equal the copy."""
    q = rand(rng, (1, 2, 5, 8))
    k = rand(rng, (1, 2, 300, 8))
    v = rand(rng, (1, 2, 300, 6))
    views = [
        (np.broadcast_to(q, (3, 2, 5, 8)), np.broadcast_to(k, (3, 2, 300, 8)), v),
        (np.broadcast_to(q[..., :1, :], (1, 2, 5, 8)), k, v),                     # rows
        (np.broadcast_to(q[:, :1], (1, 4, 5, 8)), k, v),                          # heads
        (q, np.broadcast_to(k[..., :1, :], (1, 2, 300, 8)), v),                   # key rows
        (q, k, np.broadcast_to(v[..., :1], (1, 2, 300, 6))),                      # features
        (q, k, np.broadcast_to(v[..., :1, :], (1, 2, 300, 6))),                   # value rows
    ]
    for args in views:
        got = fastattn.attention(*args, causal=True)
        want = fastattn.attention(*(np.ascontiguousarray(a) for a in args), causal=True)
        assert np.array_equal(got, want)


def test_layout_split_heads_view_equals_copy(rng):
    """layouts: (B, L, H, D) views made by split_heads from (B, L, H*D) projections equal the
    contiguous (B, H, L, D) copy, and merge_heads inverts split_heads."""
    B, L, H, D = 2, 300, 4, 16
    x = rand(rng, (B, L, 3 * H * D))                  # a fused qkv projection
    q, k, v = (fastattn.split_heads(x[..., i * H * D:(i + 1) * H * D], H) for i in range(3))
    assert q.shape == (B, H, L, D) and np.shares_memory(q, x)
    out = fastattn.attention(q, k, v, causal=True)
    want = fastattn.attention(*(np.ascontiguousarray(a) for a in (q, k, v)), causal=True)
    assert np.array_equal(out, want)
    merged = fastattn.merge_heads(out)
    assert merged.shape == (B, L, H * D)
    assert np.array_equal(fastattn.split_heads(merged, H), out)


def test_layout_misaligned_and_byteswapped(rng):
    """layouts: misaligned and non-native byte order inputs equal the native copy."""
    q, k, v = _qkv(rng, dtype=np.float32)
    buf = np.zeros(k.nbytes + 1, np.uint8)
    mis = buf[1:].view(np.float32).reshape(k.shape)
    mis[...] = k
    assert not mis.flags.aligned
    base = fastattn.attention(q, k, v)
    assert np.array_equal(fastattn.attention(q, mis, v), base)
    assert np.array_equal(fastattn.attention(q.astype(">f4"), k, v.astype(">f4")), base)


# ---- no overwrite, out= --------------------------------------------------------------------

def test_no_overwrite_and_read_only_inputs(rng):
    """no overwrite: inputs (q, k, v, mask, key_lengths, query_offset) are never modified and
    read-only inputs are accepted."""
    q, k, v = _qkv(rng, lq=40, lk=700, dtype=np.float32)
    mask = rng.standard_normal((40, 700)).astype(np.float32)
    kl, qo = np.array([300, 700]), np.array([10, -3])
    args = [q, k, v, mask, kl, qo]
    for a in args:
        a.setflags(write=False)
    copies = [a.copy() for a in args]
    out, w = fastattn.attention(q, k, v, mask=mask, key_lengths=kl, query_offset=qo, causal=True,
                                return_weights=True)
    fastattn.attention(q.astype(np.float16), k, v, mask=mask > 0, window=(4, 4))
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)
    assert not np.shares_memory(out, q) and not np.shares_memory(w, mask)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_out_strided_view_returned_and_filled(dtype, rng):
    """out=: a strided view is filled with exactly the normal result and returned as is;
    the elements around it are untouched."""
    q, k, v = _qkv(rng, lq=30, lk=200, d=8, dv=6, dtype=dtype)
    want = fastattn.attention(q, k, v, causal=True)
    buf = np.full((2, 2, 30, 12), 7, dtype)
    for out in (buf[..., ::2], np.empty((2, 30, 2, 6), dtype).transpose(0, 2, 1, 3),
                np.empty((2, 2, 30, 6), dtype)):
        res = fastattn.attention(q, k, v, causal=True, out=out)
        assert res is out
        assert np.array_equal(out, want)
    assert (buf[..., 1::2] == 7).all()
    o, w = fastattn.attention(q, k, v, causal=True, out=buf[..., ::2], return_weights=True)
    assert o is not None and np.shares_memory(o, buf)


@pytest.mark.parametrize("arg", ["key_lengths", "query_offset"])
def test_out_sharing_memory_with_an_int_argument(arg, rng):
    """out=: an out that shares memory with key_lengths / query_offset gets the result the
    call has with a copy of them (the kernel once read key lengths the output had overwritten,
    and then keys far past Lk: a crash)."""
    B, Lk, D = 4, 3, 2
    q, k, v = rand(rng, (B, 1, 1, D), np.float64), rand(rng, (B, 1, Lk, D), np.float64), \
        rand(rng, (B, 1, Lk, D), np.float64)
    buf = np.zeros(B * D)
    ints = buf[:B].view(np.int64)
    ints[:] = [3, 2, 3, 1] if arg == "key_lengths" else [0, 1, -1, 2]
    kw = dict(causal=True) if arg == "query_offset" else {}
    want = fastattn.attention(q, k, v, **{arg: ints.copy()}, **kw)
    out = buf.reshape(B, 1, 1, D)
    fastattn.attention(q, k, v, **{arg: ints}, out=out, **kw)
    assert np.array_equal(out, want)


def test_float64_mask_beyond_float32_stays_finite(rng):
    """mask: a float64 mask on float32 inputs is narrowed with finite values kept finite
    (-1e40 acts as float32's most negative value, not as -inf, which would hide the keys);
    -inf still hides."""
    q, k, v = _qkv(rng, b=1, h=1, lq=3, lk=4)
    m = np.zeros((3, 4))
    m[0] = -1e40                 # a whole row: equal scores, the mean of V (not a zero row)
    m[1, :2] = -np.inf
    m[2, 1] = -1e40
    f32 = np.where(np.isinf(m), m, np.clip(m, -3.4028235e38, 3.4028235e38)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fastattn.attention(q, k, v, mask=m)
    assert np.array_equal(got, fastattn.attention(q, k, v, mask=f32))
    np.testing.assert_allclose(got[0, 0, 0], v[0, 0].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.dtype(">f4")])
def test_broadcast_float_mask_of_another_dtype_is_not_materialised(dtype, rng):
    """mask: a broadcast float mask that needs converting is converted at its own size, not
    at (*batch, Hq, Lq, Lk) (16 MB here); the result equals the float32 mask's."""
    import tracemalloc
    L = 2048
    q = rand(rng, (1, 1, L, 8))
    row = (rng.standard_normal(L) * 3).astype(dtype)
    m = np.broadcast_to(row, (1, 1, L, L))
    want = fastattn.attention(q, q, q, mask=np.broadcast_to(row.astype(np.float32), m.shape))
    tracemalloc.start()
    try:
        got = fastattn.attention(q, q, q, mask=m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, want)
    assert peak < 2 * q.nbytes + (1 << 20), peak


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_matrix_inputs_of_mixed_dtypes(rng):
    """inputs: np.matrix (a 2-D ndarray subclass) promotes like any 2-D array"""
    q, k, v = rand(rng, (5, 4)), rand(rng, (6, 4), np.float64), rand(rng, (6, 4), np.float64)
    got = fastattn.attention(np.matrix(q), k, v)
    assert type(got) is np.ndarray and got.dtype == np.float64
    assert np.array_equal(got, fastattn.attention(q, k, v))


def test_zero_query_and_key_heads_give_an_empty_result(rng):
    """empty: Hq = Hkv = 0 is an empty result (as in torch), not an error"""
    z = np.zeros((2, 0, 3, 4), np.float32)
    assert fastattn.attention(z, z, z).shape == (2, 0, 3, 4)


def test_out_for_2d_inputs_is_returned(rng):
    """out=: with 2-D (L, D) inputs the very same out object is returned."""
    q = rand(rng, (5, 4))
    out = np.empty((5, 4), np.float32)
    assert fastattn.attention(q, q, q, out=out) is out


def test_out_aliasing_an_input(rng):
    """out=: out may be one of the inputs (same memory); the result is that of a fresh call."""
    q, k, v = _qkv(rng, lq=13, lk=13, dtype=np.float64)
    want = fastattn.attention(q, k, v)
    for i in range(3):
        args = [q.copy(), k.copy(), v.copy()]
        res = fastattn.attention(*args, out=args[i])
        assert res is args[i]
        np.testing.assert_array_equal(res, want)


def test_out_errors(rng):
    """out=: wrong shape, wrong dtype, read-only and non-arrays raise, naming out."""
    q, k, v = _qkv(rng, dtype=np.float32)
    ro = np.empty((2, 2, 9, 8), np.float32)
    ro.setflags(write=False)
    for bad, err in [(np.empty((2, 2, 9, 7), np.float32), ValueError),
                     (np.empty((2, 9, 8), np.float32), ValueError),
                     (np.empty((2, 2, 9, 8), np.float64), ValueError),
                     (np.empty((2, 2, 9, 8), np.float16), ValueError),
                     (ro, ValueError), ([[0.0]], TypeError)]:
        with pytest.raises(err, match="out"):
            fastattn.attention(q, k, v, out=bad)


# ---- dtypes --------------------------------------------------------------------------------

def test_float16_computed_in_float32(rng):
    """dtypes: float16 inputs give float16 equal to the float32 computation rounded."""
    q, k, v = (a.astype(np.float16) for a in _qkv(rng, lq=40, lk=600))
    out = fastattn.attention(q, k, v, causal=True)
    assert out.dtype == np.float16
    f32 = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v)), causal=True)
    assert np.array_equal(out, f32.astype(np.float16))
    o, w = fastattn.attention(q, k, v, return_weights=True)
    assert o.dtype == w.dtype == np.float16


@pytest.mark.parametrize("dts", list(itertools.product(DTYPES, repeat=3))[1:8])
def test_mixed_dtypes_promote(dts, rng):
    """dtypes: mixed float inputs promote like np.result_type and stay within the bound."""
    q, k, v = (a.astype(t) for a, t in zip(_qkv(rng), dts))
    out = fastattn.attention(q, k, v)
    assert out.dtype == np.result_type(*dts)
    assert_matches_reference(q, k, v, out=out)


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.uint8, np.bool_, np.complex64,
                                 np.complex128, object, np.longdouble])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_float_dtypes_raise_type_error(bad, which, rng):
    """dtypes: integer, bool, complex and object inputs raise TypeError naming the argument."""
    args = [np.ones((2, 3, 4), np.float32) for _ in range(3)]
    args[which] = np.ones((2, 3, 4)).astype(bad)
    name = ("query", "key", "value")[which]
    with pytest.raises(TypeError, match=name):
        fastattn.attention(*args)


def test_list_inputs_accepted(rng):
    """dtypes: nested lists of floats are accepted like np.asarray would read them."""
    q = rand(rng, (3, 4), np.float64)
    out = fastattn.attention(q.tolist(), q.tolist(), q.tolist())
    np.testing.assert_array_equal(out, fastattn.attention(q, q, q))
