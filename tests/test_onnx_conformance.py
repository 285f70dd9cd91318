"""ONNX Attention conformance: every node test case that ships with `onnx` mapped onto fastattn.

The cases come from ``onnx.backend.test.case.node.collect_testcases("Attention")`` (opsets 23, 24
and 25). Each has a single Attention node, its input arrays and the expected outputs, which
onnx computed with its reference implementation (``onnx/reference/ops/op_attention.py``). One
pytest case per conformance case (id = the case name). The ``*_expanded`` twins (the same node
written as its function body, with the same inputs and expected outputs) are not mapped again:
``test_expanded_twins_carry_the_same_data`` checks that each one has a base case with identical
data, so nothing is lost by skipping them.

How a node maps onto ``fastattn.attention`` (the semantics are those of the onnx reference):

- 3-D ``Q (B, Lq, Hq*D)``, ``K/V (B, Lk, Hkv*D)`` go through ``fastattn.split_heads`` with the
  ``q_num_heads`` / ``kv_num_heads`` attributes, and Y goes back through ``merge_heads``.
  ONNX GQA maps query head ``h`` to kv head ``h // (Hq // Hkv)``, as fastattn does.
- ``past_key`` / ``past_value`` are concatenated in front of K / V on the sequence axis; the
  result is compared with ``present_key`` / ``present_value`` (bitwise).
- Causal and window positions: ONNX puts query row ``i`` at ``offset + i`` with offset =
  past length (internal cache), ``nonpad_kv_seqlen[b] - Lq`` (external cache, no past; may be
  negative) or 0 (no cache: top-left). That is passed as ``query_offset``. The window
  attributes (``left_window_size``, ``right_window_size``, opset 25; -1 = unbounded) become
  ``window=(left, right)`` with ``None`` for -1; ONNX applies them with or without is_causal,
  as fastattn does.
- ``nonpad_kv_seqlen`` is ``key_lengths``.
- ``attn_mask`` (bool, True = attend, or additive float) is passed as ``mask``; it broadcasts
  NumPy-style (right-aligned) against (B, Hq, Lq, Lk) in both. ONNX lets its last axis be
  shorter than the total key length and pads it with False / -inf, which is done here with
  ``np.pad`` before the call.
- ``scale`` and ``softcap`` (0 = off) map directly. ONNX applies softcap to the scaled scores
  before adding the mask/bias, as the fastattn contract does, and zeroes rows whose keys are
  all masked, as fastattn does; so no mask rewriting is needed for either.
- ``qk_matmul_output`` with ``qk_matmul_output_mode=3`` (the softmax probabilities) is
  ``return_weights=True``. Modes 0, 1 and 2 (raw scaled QK, softcapped QK, QK + bias) are
  pre-softmax intermediates that fastattn does not expose: they are listed in
  ``NOT_CHECKED`` and not compared (Y and present_* of those cases are still checked).
- ``softmax_precision`` only asks for a softmax at least as precise as the input type;
  fastattn's softmax is float32 for float16/32 inputs, so it needs no mapping.
- bfloat16 (``ml_dtypes``) is not a fastattn dtype (the contract lists float16/32/64): those
  inputs are widened exactly to float32, and the result is rounded back to bfloat16 before the
  comparison.

Tolerances (F32_TOL, F16_TOL, BF16_TOL below): float32 rtol 1e-5, atol 1e-7, tighter than
onnx's backend runner (1e-3 / 1e-7). float16 and bfloat16 expectations were computed by onnx
*in* float16 / bfloat16 (scaled Q and K, the scores and the probabilities are all rounded to
the input type), while fastattn computes in float32 and rounds once, so the comparison allows
two units in the last place of the expected dtype: float16 rtol 2**-9, bfloat16 rtol 2**-6
(onnx's own runner uses 2**-6 for bfloat16), atol 1e-6 for both.

Where ONNX and fastattn pick different *defaults* the mapping passes the value explicitly:
ONNX's no-cache causal is top-left (query_offset=0) and its internal-cache offset is the past
length (not Lk - Lq, which differs when the new K/V chunk is shorter than Q), while
fastattn's default is bottom-right (Lk_valid - Lq). For the external cache (nonpad_kv_seqlen,
no past) ONNX is bottom-right per batch, which is fastattn's default: the test also checks
that query_offset=None gives bitwise the same result there.
"""
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
onnx_helper = pytest.importorskip("onnx.helper")

import fastattn  # noqa: E402

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # onnx depends on ml_dtypes, but do not insist
    BF16 = None

N_BASE_CASES = 93           # non-expanded Attention cases shipped with onnx 1.23

# (rtol, atol). float32: tighter than onnx's runner (1e-3, 1e-7); fastattn is within 2e-7
# relative of onnx's float32 reference on every case. float16: 2 ulps relative (onnx rounds
# scaled Q/K, scores and probabilities to float16; fastattn rounds once, observed <= 1 ulp).
# bfloat16: onnx's own runner tolerance (2 ulps).
F32_TOL = (1e-5, 1e-7)
F16_TOL = (2.0 ** -9, 1e-6)
BF16_TOL = (2.0 ** -6, 1e-6)

KNOWN_INPUTS = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")
KNOWN_OUTPUTS = ("Y", "present_key", "present_value", "qk_matmul_output")
KNOWN_ATTRS = {"scale", "is_causal", "q_num_heads", "kv_num_heads", "softcap",
               "qk_matmul_output_mode", "softmax_precision",
               "left_window_size", "right_window_size"}

# Outputs that fastattn's API does not expose, hence not compared: qk_matmul_output in modes
# 0 (scale * Q K^T), 1 (that, softcapped) and 2 (softcapped + mask/causal/padding bias). They
# are pre-softmax intermediates; fastattn returns only the output and (optionally) the softmax
# probabilities (mode 3). The listing is checked against the collected cases, so a new onnx
# release that adds such a case makes test_not_checked_list_is_exact fail instead of silently
# growing the unchecked set.
NOT_CHECKED = {
    "test_attention_4d_with_qk_matmul": "qk_matmul_output mode 0 (scale*QK^T)",
    "test_attention_4d_with_qk_matmul_bias": "qk_matmul_output mode 2 (QK + bias)",
    "test_attention_4d_with_qk_matmul_softcap": "qk_matmul_output mode 1 (softcapped QK)",
    "test_attention_4d_with_past_and_present_qk_matmul_bias":
        "qk_matmul_output mode 2 (QK + bias)",
    "test_attention_4d_with_past_and_present_qk_matmul_bias_3d_mask":
        "qk_matmul_output mode 2 (QK + bias)",
    "test_attention_4d_with_past_and_present_qk_matmul_bias_4d_mask":
        "qk_matmul_output mode 2 (QK + bias)",
    "test_attention_4d_with_past_and_present_qk_matmul_bias_3d_mask_causal":
        "qk_matmul_output mode 2 (QK + bias)",
    "test_attention_4d_with_past_and_present_qk_matmul_bias_4d_mask_causal":
        "qk_matmul_output mode 2 (QK + bias)",
    "test_attention_4d_with_past_and_present_qk_matmul": "qk_matmul_output mode 0 (scale*QK^T)",
    "test_attention_3d_with_past_and_present_qk_matmul": "qk_matmul_output mode 0 (scale*QK^T)",
    "test_attention_3d_with_past_and_present_qk_matmul_bias":
        "qk_matmul_output mode 2 (QK + bias)",
    "test_attention_3d_with_past_and_present_qk_matmul_softcap":
        "qk_matmul_output mode 1 (softcapped QK)",
}

# Cases that fail because of a (reported) fastattn bug: name -> reason. Strict xfail, so a fix
# turns them into failures until the entry is removed.
KNOWN_BUGS = {}


def _collect():
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        # importing every node-case module runs all their exporters (some overflow on purpose)
        warnings.simplefilter("ignore")
        cases = collect_testcases("Attention")
    base = [c for c in cases if not c.name.endswith("_expanded")]
    expanded = [c for c in cases if c.name.endswith("_expanded")]
    return base, expanded


BASE_CASES, EXPANDED_CASES = _collect()
CASES_BY_NAME = {c.name: c for c in BASE_CASES}


def _node(case):
    nodes = case.model.graph.node
    assert len(nodes) == 1 and nodes[0].op_type == "Attention", case.name
    return nodes[0]


def _opset(case):
    return next(o.version for o in case.model.opset_import if o.domain in ("", "ai.onnx"))


def _named(case, node, data_set=0):
    """({input name: array}, {output name: array}, attributes) of one data set."""
    inputs, outputs = case.data_sets[data_set]
    in_names = [n for n in node.input if n]
    out_names = [n for n in node.output if n]
    assert len(in_names) == len(inputs) and len(out_names) == len(outputs), case.name
    # the node's positional slots give the meaning; graph names are the slot names here
    slots_in = {name: KNOWN_INPUTS[i] for i, name in enumerate(node.input) if name}
    slots_out = {name: KNOWN_OUTPUTS[i] for i, name in enumerate(node.output) if name}
    ins = {slots_in[n]: np.asarray(a) for n, a in zip(in_names, inputs)}
    outs = {slots_out[n]: np.asarray(a) for n, a in zip(out_names, outputs)}
    attrs = {a.name: onnx_helper.get_attribute_value(a) for a in node.attribute}
    unknown = set(attrs) - KNOWN_ATTRS
    assert not unknown, f"{case.name}: attributes {unknown} have no mapping"
    return ins, outs, attrs


def _widen(a):
    """bfloat16 -> float32 (exact); everything else unchanged."""
    if BF16 is not None and a.dtype == BF16:
        return a.astype(np.float32)
    return a


def map_case(case, *, offset_shift=0, default_offset=False):
    """Run one conformance case through fastattn.

    Returns (actual, expected, checked, tol): dicts output name -> array, the list of output
    names compared, and (rtol, atol). `offset_shift` perturbs query_offset (to show the test
    can fail); `default_offset=True` leaves query_offset to fastattn's default."""
    node = _node(case)
    ins, outs, attrs = _named(case, node)
    q, k, v = ins["Q"], ins["K"], ins["V"]
    in_dtype = q.dtype
    three_d = q.ndim == 3
    assert q.ndim in (3, 4) and q.ndim == k.ndim == v.ndim, case.name

    q, k, v = _widen(q), _widen(k), _widen(v)
    if three_d:
        q = fastattn.split_heads(q, attrs["q_num_heads"])
        k = fastattn.split_heads(k, attrs["kv_num_heads"])
        v = fastattn.split_heads(v, attrs["kv_num_heads"])
    actual = {}

    past_len = 0
    if "past_key" in ins or "past_value" in ins:
        past_k, past_v = _widen(ins["past_key"]), _widen(ins["past_value"])
        past_len = past_k.shape[-2]
        assert past_v.shape[-2] == past_len
        k = np.concatenate([past_k, k], axis=-2)
        v = np.concatenate([past_v, v], axis=-2)
        actual["present_key"], actual["present_value"] = k, v
    lq, lk = q.shape[-2], k.shape[-2]

    key_lengths = ins.get("nonpad_kv_seqlen")
    assert key_lengths is None or past_len == 0, "ONNX forbids nonpad_kv_seqlen with past"
    if past_len:
        query_offset = past_len                       # internal cache
    elif key_lengths is not None:
        query_offset = key_lengths - lq               # external cache: bottom-right per batch
    else:
        query_offset = 0                              # no cache: top-left
    query_offset = None if default_offset else query_offset + offset_shift

    mask = ins.get("attn_mask")
    if mask is not None:
        mask = _widen(mask)
        pad = lk - mask.shape[-1]
        assert pad >= 0, case.name
        if pad:
            fill = False if mask.dtype == np.bool_ else -np.inf
            mask = np.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)], constant_values=fill)

    left = attrs.get("left_window_size", -1)
    right = attrs.get("right_window_size", -1)
    window = None
    if left >= 0 or right >= 0:
        window = (left if left >= 0 else None, right if right >= 0 else None)
    softcap = attrs.get("softcap", 0.0)
    mode = attrs.get("qk_matmul_output_mode", 0)
    want_weights = "qk_matmul_output" in outs and mode == 3

    res = fastattn.attention(
        q, k, v, mask=mask, causal=bool(attrs.get("is_causal", 0)),
        query_offset=query_offset, window=window, key_lengths=key_lengths,
        scale=attrs.get("scale"), softcap=softcap if softcap > 0 else None,
        return_weights=want_weights)
    y, w = res if want_weights else (res, None)
    actual["Y"] = fastattn.merge_heads(y) if three_d else y
    if want_weights:
        actual["qk_matmul_output"] = w
    actual = {n: a.astype(in_dtype) for n, a in actual.items()}

    checked = [n for n in KNOWN_OUTPUTS if n in outs and n in actual]
    unchecked = [n for n in outs if n not in actual]
    assert unchecked == ([] if case.name not in NOT_CHECKED else ["qk_matmul_output"]), \
        f"{case.name}: outputs {unchecked} are not checked and not listed in NOT_CHECKED"

    if in_dtype == np.float16:
        tol = F16_TOL
    elif BF16 is not None and in_dtype == BF16:
        tol = BF16_TOL
    else:
        tol = (min(case.rtol, F32_TOL[0]), min(case.atol, F32_TOL[1]))
    return actual, outs, checked, tol


def _as_f64(a):
    return a.astype(np.float32).astype(np.float64) if BF16 is not None and a.dtype == BF16 \
        else a.astype(np.float64)


def _marks(name):
    if name in KNOWN_BUGS:
        return [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name])]
    return []


@pytest.mark.parametrize(
    "name", [pytest.param(c.name, id=c.name, marks=_marks(c.name)) for c in BASE_CASES])
def test_conformance_case(name):
    case = CASES_BY_NAME[name]
    assert len(case.data_sets) == 1, "each Attention case ships one data set"
    actual, expected, checked, (rtol, atol) = map_case(case)
    assert "Y" in checked
    for out_name in checked:
        got, want = actual[out_name], expected[out_name]
        assert got.shape == want.shape, f"{out_name}: shape {got.shape} != {want.shape}"
        assert got.dtype == want.dtype, f"{out_name}: dtype {got.dtype} != {want.dtype}"
        if out_name.startswith("present_"):
            # the concatenation we built and passed as key/value must be ONNX's present_*
            np.testing.assert_array_equal(got, want, err_msg=f"{name}: {out_name}")
            continue
        g, e = _as_f64(got), _as_f64(want)
        assert np.isfinite(g).all(), f"{name}: {out_name} has non-finite values"
        # rows ONNX defines as exactly zero (fully masked) must be exactly zero here too
        zero_rows = (e == 0).all(axis=-1)
        np.testing.assert_array_equal(g[zero_rows], 0.0,
                                      err_msg=f"{name}: {out_name} zero rows")
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol,
                                   err_msg=f"{name}: {out_name}")

    ins, _, _ = _named(case, _node(case))
    if "nonpad_kv_seqlen" in ins:
        # external cache: fastattn's default alignment (Lk_valid - Lq) is ONNX's
        again, _, _, _ = map_case(case, default_offset=True)
        for out_name in checked:
            np.testing.assert_array_equal(again[out_name], actual[out_name],
                                          err_msg=f"{name}: {out_name}, default query_offset")


def test_case_count():
    assert len(BASE_CASES) == N_BASE_CASES, sorted(c.name for c in BASE_CASES)
    assert {_opset(c) for c in BASE_CASES} == {23, 24, 25}


def test_not_checked_list_is_exact():
    """NOT_CHECKED lists exactly the cases whose qk_matmul_output is a mode-0/1/2 intermediate."""
    found = set()
    for case in BASE_CASES:
        node = _node(case)
        _, outs, attrs = _named(case, node)
        if "qk_matmul_output" in outs and attrs.get("qk_matmul_output_mode", 0) != 3:
            found.add(case.name)
    assert found == set(NOT_CHECKED)


def test_expanded_twins_carry_the_same_data():
    """Every `_expanded` case is a base case's function-body twin with identical data."""
    assert len(EXPANDED_CASES) == len(BASE_CASES)
    for case in EXPANDED_CASES:
        base = CASES_BY_NAME[case.name[: -len("_expanded")]]
        assert len(case.data_sets) == len(base.data_sets)
        for (ins_a, outs_a), (ins_b, outs_b) in zip(case.data_sets, base.data_sets):
            for a, b in zip(list(ins_a) + list(outs_a), list(ins_b) + list(outs_b)):
                a, b = np.asarray(a), np.asarray(b)
                assert a.dtype == b.dtype and a.shape == b.shape
                assert a.tobytes() == b.tobytes(), case.name
