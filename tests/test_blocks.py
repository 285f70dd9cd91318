"""Transformer blocks (api.md section 3): parity with torch.nn, the KV cache, weights, pickling,
and the fused Cython passes under them.

Parity: a torch.nn module in eval mode and the fastattn block built from it (``from_torch``)
agree within 1e-4 max abs error on unit-scale float32 inputs (rows at padded query positions
are unspecified and not compared).  Torch is a test-only dependency: the tests that need it
take the ``torch`` fixture and are skipped, with the reason, where it is absent.
"""
import os
import pickle
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fastattn
from fastattn import _fused

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTIVATIONS = ["relu", "gelu", "gelu_tanh"]


@pytest.fixture(scope="module")
def torch():
    t = pytest.importorskip("torch", reason="torch is a test-only dependency (pip install "
                                            "torch) and is not installed")
    t.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*nested tensor.*")
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
    # References run with autograd on (torch.enable_grad), so that torch takes its composite
    # path: its inference fast path (TransformerEncoderLayer under no_grad) computes exact
    # gelu even for GELU(approximate="tanh") (torch 2.13: errors of 1.3e-4).
    return t


def rng(seed=0):
    return np.random.default_rng(seed)


def randn(*shape, seed=0):
    return rng(seed).standard_normal(shape).astype(np.float32)


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_act(torch, name):
    if name == "gelu_tanh":
        return torch.nn.GELU(approximate="tanh")
    return name


def randomize(torch, module, seed=0):
    """Non-trivial norms and biases (torch initialises them to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    return module


def valid_rows(y, lengths):
    """Rows of (B, L, E) at non-padded positions, concatenated."""
    return np.concatenate([y[b, :n] for b, n in enumerate(lengths)])


def pad_mask(torch, lengths, L):
    """torch key_padding_mask (True = padding) for right padding."""
    return torch.from_numpy(np.arange(L)[None, :] >= np.asarray(lengths)[:, None])


def causal_torch(torch, L):
    return torch.nn.Transformer.generate_square_subsequent_mask(L)


def bf(torch, x, batch_first):
    """numpy (B, L, E) -> the torch layout of a module with this batch_first."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if batch_first else t.transpose(0, 1)


def unbf(y, batch_first):
    y = y.detach().detach().numpy()
    return y if batch_first else y.transpose(1, 0, 2)


# ---- parity with torch.nn ------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_matches_torch(torch, norm_first, activation, batch_first):
    E, H, F, B, L = 32, 4, 64, 3, 11
    tl = randomize(torch, torch.nn.TransformerEncoderLayer(
        E, H, F, dropout=0.0, activation=torch_act(torch, activation), norm_first=norm_first,
        batch_first=batch_first)).eval()
    layer = fastattn.EncoderLayer.from_torch(tl)
    assert (layer.activation, layer.norm_first) == (activation, norm_first)
    x = randn(B, L, E)
    with torch.enable_grad():
        ref = unbf(tl(bf(torch, x, batch_first)), batch_first)
    assert max_err(layer(x), ref) <= TOL
    # padding: key_lengths <-> src_key_padding_mask
    lengths = [11, 7, 1]
    with torch.enable_grad():
        ref = unbf(tl(bf(torch, x, batch_first), src_key_padding_mask=pad_mask(torch, lengths, L)),
                   batch_first)
    y = layer(x, key_lengths=np.array(lengths))
    assert np.isfinite(y).all()
    assert max_err(valid_rows(y, lengths), valid_rows(ref, lengths)) <= TOL


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_encoder_layer_masks_match_torch(torch, kind):
    E, H, F, B, L = 32, 4, 48, 2, 9
    tl = randomize(torch, torch.nn.TransformerEncoderLayer(E, H, F, dropout=0.0,
                                                           batch_first=True)).eval()
    layer = fastattn.EncoderLayer.from_torch(tl)
    x = randn(B, L, E, seed=1)
    allow = rng(2).random((L, L)) < 0.6
    np.fill_diagonal(allow, True)                      # no fully hidden row (torch gives NaN)
    if kind == "bool":
        ours, theirs = allow, torch.from_numpy(~allow)     # torch: True = not allowed
    else:
        add = np.where(allow, rng(3).standard_normal((L, L)), -np.inf).astype(np.float32)
        ours, theirs = add, torch.from_numpy(add)
    with torch.enable_grad():
        ref = tl(torch.from_numpy(x), src_mask=theirs).detach().numpy()
    assert max_err(layer(x, mask=ours), ref) <= TOL
    # causal flag == an explicit causal mask
    with torch.enable_grad():
        ref = tl(torch.from_numpy(x), src_mask=causal_torch(torch, L), is_causal=True).detach().numpy()
    assert max_err(layer(x, causal=True), ref) <= TOL


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_decoder_layer_matches_torch(torch, norm_first, activation):
    E, H, F, B, L, S = 32, 4, 64, 3, 8, 10
    td = randomize(torch, torch.nn.TransformerDecoderLayer(
        E, H, F, dropout=0.0, activation=torch_act(torch, activation), norm_first=norm_first,
        batch_first=True)).eval()
    layer = fastattn.DecoderLayer.from_torch(td)
    x, mem = randn(B, L, E, seed=1), randn(B, S, E, seed=2)
    with torch.enable_grad():
        ref = td(torch.from_numpy(x), torch.from_numpy(mem), tgt_mask=causal_torch(torch, L),
                 tgt_is_causal=True).detach().numpy()
    assert max_err(layer(x, mem), ref) <= TOL
    # padding of both: key_lengths <-> tgt_key_padding_mask, memory_key_lengths <-> memory's
    tl_, ml = [8, 5, 2], [10, 3, 7]
    with torch.enable_grad():
        ref = td(torch.from_numpy(x), torch.from_numpy(mem), tgt_mask=causal_torch(torch, L),
                 tgt_key_padding_mask=pad_mask(torch, tl_, L),
                 memory_key_padding_mask=pad_mask(torch, ml, S)).detach().numpy()
    y = layer(x, mem, key_lengths=np.array(tl_), memory_key_lengths=np.array(ml))
    assert np.isfinite(y).all()
    assert max_err(valid_rows(y, tl_), valid_rows(ref, tl_)) <= TOL


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_decoder_layer_masks_match_torch(torch, kind):
    E, H, F, B, L, S = 32, 4, 48, 2, 7, 9
    td = randomize(torch, torch.nn.TransformerDecoderLayer(E, H, F, dropout=0.0,
                                                           batch_first=True)).eval()
    layer = fastattn.DecoderLayer.from_torch(td)
    x, mem = randn(B, L, E, seed=4), randn(B, S, E, seed=5)
    tgt_allow = np.tril(rng(6).random((L, L)) < 0.7)
    np.fill_diagonal(tgt_allow, True)
    mem_allow = rng(7).random((L, S)) < 0.6
    mem_allow[:, 0] = True
    if kind == "bool":
        ours = (tgt_allow, mem_allow)
        theirs = (torch.from_numpy(~tgt_allow), torch.from_numpy(~mem_allow))
    else:
        ours = tuple(np.where(a, rng(8).standard_normal(a.shape), -np.inf).astype(np.float32)
                     for a in (tgt_allow, mem_allow))
        theirs = tuple(torch.from_numpy(a) for a in ours)
    with torch.enable_grad():
        ref = td(torch.from_numpy(x), torch.from_numpy(mem), tgt_mask=theirs[0],
                 memory_mask=theirs[1]).detach().numpy()
    y = layer(x, mem, causal=False, mask=ours[0], memory_mask=ours[1])
    assert max_err(y, ref) <= TOL


@pytest.mark.parametrize("norm_first", [False, True])
def test_stacks_with_final_norm_match_torch(torch, norm_first):
    E, H, F, B, L, S = 32, 4, 64, 2, 6, 9
    enc_t = randomize(torch, torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(E, H, F, dropout=0.0, norm_first=norm_first,
                                         activation="gelu", batch_first=True),
        3, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)).eval()
    dec_t = randomize(torch, torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(E, H, F, dropout=0.0, norm_first=norm_first,
                                         batch_first=True),
        2, norm=torch.nn.LayerNorm(E))).eval()
    enc, dec = fastattn.Encoder.from_torch(enc_t), fastattn.Decoder.from_torch(dec_t)
    assert len(enc.layers) == 3 and enc.norm is not None and len(dec.layers) == 2
    src, tgt = randn(B, S, E, seed=1), randn(B, L, E, seed=2)
    lengths = [9, 4]
    with torch.enable_grad():
        mem_t = enc_t(torch.from_numpy(src), src_key_padding_mask=pad_mask(torch, lengths, S))
        ref = dec_t(torch.from_numpy(tgt), mem_t, tgt_mask=causal_torch(torch, L),
                    memory_key_padding_mask=pad_mask(torch, lengths, S)).detach().numpy()
    mem = enc(src, key_lengths=np.array(lengths))
    assert max_err(valid_rows(mem, lengths), valid_rows(mem_t.detach().numpy(), lengths)) <= TOL
    # the decoder reads only valid memory rows, so torch's memory (zeros at padding) is fine
    y = dec(tgt, mem_t.detach().numpy(), memory_key_lengths=np.array(lengths))
    assert max_err(y, ref) <= TOL
    assert max_err(dec(tgt, mem, memory_key_lengths=np.array(lengths)), ref) <= TOL


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch(torch, batch_first, norm_first):
    E, H, F, B, L, S = 32, 4, 48, 2, 6, 8
    tt = randomize(torch, torch.nn.Transformer(E, H, 2, 2, F, dropout=0.0, norm_first=norm_first,
                                               batch_first=batch_first)).eval()
    model = fastattn.Transformer.from_torch(tt)
    src, tgt = randn(B, S, E, seed=3), randn(B, L, E, seed=4)
    with torch.enable_grad():
        ref = unbf(tt(bf(torch, src, batch_first), bf(torch, tgt, batch_first),
                      tgt_mask=causal_torch(torch, L)), batch_first)
    assert max_err(model(src, tgt), ref) <= TOL
    # padded sources: src_key_lengths pads both the encoder and the cross-attention
    sl = [8, 5]
    with torch.enable_grad():
        pm = pad_mask(torch, sl, S)
        ref = unbf(tt(bf(torch, src, batch_first), bf(torch, tgt, batch_first),
                      tgt_mask=causal_torch(torch, L), src_key_padding_mask=pm,
                      memory_key_padding_mask=pm), batch_first)
    assert max_err(model(src, tgt, src_key_lengths=np.array(sl)), ref) <= TOL


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_matches_torch(torch, bias):
    E, H, B, L, S = 32, 4, 2, 5, 7
    m_t = randomize(torch, torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=True)).eval()
    m = fastattn.MultiHeadAttention.from_torch(m_t)
    x, mem = randn(B, L, E, seed=1), randn(B, S, E, seed=2)
    with torch.enable_grad():
        xt, mt = torch.from_numpy(x), torch.from_numpy(mem)
        ref_self, w_self = (t.detach().numpy() for t in m_t(xt, xt, xt))
        ref_cross = m_t(xt, mt, mt, key_padding_mask=pad_mask(torch, [7, 3], S))[0].detach()
    y, w = m(x, return_weights=True)
    assert max_err(y, ref_self) <= TOL
    assert w.shape == (B, H, L, L) and max_err(w.mean(1), w_self) <= TOL
    assert max_err(m(x, mem, key_lengths=np.array([7, 3])), ref_cross) <= TOL
    assert max_err(m(x[0]), ref_self[0]) <= TOL                          # unbatched


def test_multihead_attention_causal_is_top_left_in_self_and_cross(torch):
    """causal=True hides key j from query i when j > i whether or not key is the query
    object (with padding too), as torch.nn.MultiheadAttention with a causal attn_mask."""
    E, H, B, L, S = 16, 2, 2, 4, 6
    m_t = randomize(torch, torch.nn.MultiheadAttention(E, H, batch_first=True)).eval()
    m = fastattn.MultiHeadAttention.from_torch(m_t)
    x, mem = randn(B, L, E, seed=1), randn(B, S, E, seed=2)
    kl = np.array([2, 4])
    selfy = m(x, causal=True, key_lengths=kl)
    assert max_err(m(x, x.copy(), causal=True, key_lengths=kl), selfy) <= 1e-6
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)              # True: hidden
    with torch.enable_grad():
        ref = m_t(*map(torch.from_numpy, (x, mem, mem)), attn_mask=causal,
                  key_padding_mask=pad_mask(torch, [5, 6], S))[0].detach()
    assert max_err(m(x, mem, causal=True, key_lengths=np.array([5, 6])), ref) <= TOL


def test_multihead_attention_kdim_vdim_matches_torch(torch):
    E, H, B, L, S = 24, 3, 2, 4, 6
    m_t = randomize(torch, torch.nn.MultiheadAttention(E, H, kdim=10, vdim=14,
                                                       batch_first=True)).eval()
    m = fastattn.MultiHeadAttention.from_torch(m_t)
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight"} <= set(m.state_dict())
    q, k, v = randn(B, L, E, seed=1), randn(B, S, 10, seed=2), randn(B, S, 14, seed=3)
    with torch.enable_grad():
        ref = m_t(*map(torch.from_numpy, (q, k, v)))[0].detach()
    assert max_err(m(q, k, v), ref) <= TOL
    with pytest.raises(ValueError, match="kdim"):
        m(q)


def test_float64_blocks_match_torch_closely(torch):
    tl = randomize(torch, torch.nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, activation="gelu", batch_first=True).double()).eval()
    layer = fastattn.EncoderLayer.from_torch(tl)
    assert layer.dtype == np.float64
    x = rng(1).standard_normal((2, 5, 16))
    with torch.enable_grad():
        ref = tl(torch.from_numpy(x)).detach().numpy()
    y = layer(x)
    assert y.dtype == np.float64 and max_err(y, ref) <= 1e-10


# ---- GQA against fastattn.reference_attention ----------------------------------------------

def _gqa_reference(m, x, mem=None, **kw):
    """MultiHeadAttention written out with NumPy projections and reference_attention."""
    sd = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    E, H, Hkv, D = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
    W, b = sd["in_proj_weight"], sd["in_proj_bias"]
    kv_src = x if mem is None else mem
    B, L, S = x.shape[0], x.shape[1], kv_src.shape[1]
    q = (x @ W[:E].T + b[:E]).reshape(B, L, H, D).transpose(0, 2, 1, 3)
    k = (kv_src @ W[E:E + Hkv * D].T + b[E:E + Hkv * D]).reshape(B, S, Hkv, D).transpose(0, 2, 1, 3)
    v = (kv_src @ W[E + Hkv * D:].T + b[E + Hkv * D:]).reshape(B, S, Hkv, D).transpose(0, 2, 1, 3)
    o = fastattn.reference_attention(q, k, v, **kw)                     # (B, H, L, D)
    o = o.transpose(0, 2, 1, 3).reshape(B, L, E)
    return o @ sd["out_proj.weight"].T + sd["out_proj.bias"]


@pytest.mark.parametrize("num_kv_heads", [1, 2, 6])
def test_gqa_multihead_attention_matches_reference(num_kv_heads):
    E, H, B, L, S = 48, 6, 3, 7, 9
    m = fastattn.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, seed=0)
    sd = m.state_dict()
    assert sd["in_proj_weight"].shape == (E + 2 * num_kv_heads * E // H, E)
    sd["in_proj_bias"] = rng(1).standard_normal(sd["in_proj_bias"].shape)
    sd["out_proj.bias"] = rng(2).standard_normal(E)
    m.load_state_dict(sd)
    x, mem = randn(B, L, E, seed=3), randn(B, S, E, seed=4)
    lengths = np.array([9, 4, 1])
    assert max_err(m(x), _gqa_reference(m, x)) <= TOL
    assert max_err(m(x, causal=True), _gqa_reference(m, x, causal=True)) <= TOL
    assert max_err(m(x, mem, key_lengths=lengths),
                   _gqa_reference(m, x, mem, key_lengths=lengths)) <= TOL


# ---- incremental decoding -------------------------------------------------------------------

def _decoder(norm_first, seed=0, E=32, H=4, F=64, n=2, activation="relu"):
    layers = [fastattn.DecoderLayer(E, H, F, norm_first=norm_first, activation=activation,
                                    seed=seed + i) for i in range(n)]
    dec = fastattn.Decoder(layers, fastattn.LayerNorm(E))
    sd = dec.state_dict()
    r = rng(seed + 100)
    for k in sd:          # non-trivial biases and norms
        if k.endswith("bias") or "norm" in k:
            sd[k] = sd[k] + 0.3 * r.standard_normal(sd[k].shape)
    return dec.load_state_dict(sd)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 10, [3, 1, 4, 2]])
def test_incremental_decoding_equals_full_causal_call(norm_first, chunks):
    B, T, S, E = 3, 10, 7, 32
    dec = _decoder(norm_first, activation="gelu")
    x, mem = randn(B, T, E, seed=1), randn(B, S, E, seed=2)
    ml = np.array([7, 2, 5])
    full = dec(x, mem, memory_key_lengths=ml)
    cache = dec.new_cache(mem, T + 2, memory_key_lengths=ml)
    outs, pos = [], 0
    for t in chunks:
        outs.append(dec(x[:, pos:pos + t], cache=cache))
        pos += t
        assert cache.length == pos
    assert max_err(np.concatenate(outs, axis=1), full) <= TOL


def test_incremental_decoding_single_layer_and_unbatched():
    E, T, S = 16, 6, 5
    layer = fastattn.DecoderLayer(E, 2, 32, seed=3)
    x, mem = randn(T, E, seed=4), randn(S, E, seed=5)
    full = layer(x, mem)
    cache = layer.new_cache(mem, T)
    steps = [layer(x[i:i + 1], cache=cache) for i in range(T)]
    assert steps[0].shape == (1, E)
    assert max_err(np.concatenate(steps), full) <= TOL


def test_transformer_decode_with_cache():
    model = fastattn.Transformer(32, 4, 1, 2, 48, seed=0)
    src, tgt = randn(2, 6, 32, seed=1), randn(2, 5, 32, seed=2)
    sl = np.array([6, 3])
    memory = model.encode(src, key_lengths=sl)
    full = model.decode(tgt, memory, memory_key_lengths=sl)
    assert max_err(model(src, tgt, src_key_lengths=sl), full) == 0
    cache = model.new_cache(memory, 5, memory_key_lengths=sl)
    steps = [model.decode(tgt[:, i:i + 1], memory, cache=cache) for i in range(5)]
    assert max_err(np.concatenate(steps, 1), full) <= TOL


def test_cache_checks_a_memory_passed_with_it_and_keeps_its_own_lengths():
    """A memory passed along with a cache must be the one the cache was made from (its
    K/V are what the call uses); the cache keeps a copy of memory_key_lengths."""
    model = fastattn.Transformer(16, 2, 1, 1, 32, seed=0)
    memory, tgt = randn(2, 5, 16, seed=1), randn(2, 2, 16, seed=2)
    sl = np.array([5, 2])
    full = model.decode(tgt, memory, memory_key_lengths=sl.copy())
    cache = model.new_cache(memory, 2, memory_key_lengths=sl)
    sl[:] = 1                                                # the caller's array changes
    with pytest.raises(ValueError, match="memory"):
        model.decode(tgt[:, :1], memory + 1, cache=cache)
    with pytest.raises(ValueError, match="memory"):
        model.decode(tgt[:, :1], memory[:, :3], cache=cache)
    assert cache.length == 0
    steps = [model.decode(tgt[:, :1], memory.copy(), cache=cache),
             model.decode(tgt[:, 1:], None, cache=cache)]
    assert max_err(np.concatenate(steps, 1), full) <= TOL


def test_copied_cache_decodes_independently():
    """copy.copy(cache) forks the decoding state: each copy continues from the shared prefix
    on its own, as a beam search needs, and neither changes the other's positions"""
    import copy
    model = fastattn.Transformer(16, 2, 1, 2, 32, seed=0)
    memory, tgt = randn(2, 5, 16, seed=1), randn(2, 4, 16, seed=2)
    other = randn(2, 2, 16, seed=3)
    cache = model.new_cache(memory, 4)
    model.decode(tgt[:, :2], None, cache=cache)
    fork = copy.copy(cache)
    a = [model.decode(other[:, :1], None, cache=fork)]           # the two interleaved
    b = [model.decode(tgt[:, 2:3], None, cache=cache)]
    a.append(model.decode(other[:, 1:], None, cache=fork))
    b.append(model.decode(tgt[:, 3:], None, cache=cache))
    assert cache.length == fork.length == 4
    assert max_err(np.concatenate(b, 1), model.decode(tgt, memory)[:, 2:]) <= TOL
    want = model.decode(np.concatenate([tgt[:, :2], other], 1), memory)[:, 2:]
    assert max_err(np.concatenate(a, 1), want) <= TOL


def test_cache_shared_by_threads_loses_no_position():
    """Steps on one cache from several threads run one at a time: every accepted position is
    counted, and no step is accepted past max_length (before: 64 steps from two threads left
    length at 32, and steps of 1-3 positions ran past max_length without an error)."""
    import threading
    dec = fastattn.Decoder([fastattn.DecoderLayer(32, 4, 64, seed=0)])
    mem, x = randn(1, 4, 32, seed=1), randn(1, 3, 32, seed=2)
    for trial in range(3):
        cache = dec.new_cache(mem, 64)
        done, errors = [], []

        def work(seed):
            r = np.random.default_rng(seed)
            for _ in range(16):
                t = int(r.integers(1, 4))
                try:
                    dec(x[:, :t], cache=cache)
                    done.append(t)
                except ValueError as exc:
                    errors.append(str(exc))

        threads = [threading.Thread(target=work, args=(trial * 10 + i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert cache.length == sum(done) <= 64
        assert all("do not fit" in e for e in errors)


def test_cache_is_tied_to_the_weights_it_was_made_with():
    """A cache holds keys and values computed with its decoder's weights: another decoder of
    the same shape, or the same one after load_state_dict, is refused; a copy or an unpickled
    pair of decoder and cache (the same weights) is accepted."""
    import copy
    dec_a, dec_b = _decoder(False, seed=0), _decoder(False, seed=5)
    mem, x = randn(2, 4, 32, seed=1), randn(2, 3, 32, seed=2)
    cache = dec_a.new_cache(mem, 3)
    with pytest.raises(ValueError, match="another decoder"):
        dec_b(x[:, :1], cache=cache)
    assert cache.length == 0
    twin, twin_cache = pickle.loads(pickle.dumps((dec_a, cache)))
    steps = [copy.deepcopy(dec_a)(x[:, :1], cache=cache), twin(x[:, :1], cache=twin_cache)]
    assert max_err(steps[0], dec_a(x[:, :1], mem)) <= TOL
    assert np.array_equal(steps[0], steps[1])
    dec_a.load_state_dict(dec_b.state_dict())
    with pytest.raises(ValueError, match="weights were replaced"):
        dec_a(x[:, 1:2], cache=cache)
    fresh = dec_a.new_cache(mem, 3)
    assert max_err(dec_a(x[:, :1], cache=fresh), dec_b(x[:, :1], mem)) <= TOL
    # any change through a public path: one weight (strict=False), an eps, an activation
    changes = [lambda: dec_a.load_state_dict({"layers.1.norm3.bias": np.zeros(32)}, strict=False),
               lambda: setattr(dec_a.layers[0].norm1, "eps", 10.0),
               lambda: setattr(dec_a.layers[1], "activation", "gelu")]
    for change in changes:
        cache = dec_a.new_cache(mem, 3)
        dec_a(x[:, :1], cache=cache)
        change()
        with pytest.raises(ValueError, match="weights were replaced"):
            dec_a(x[:, 1:2], cache=cache)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_steps_a_cache_locked_at_the_fork():
    """A fork taken while another thread holds a cache's step lock: the child's copy of the
    cache gets a new lock and decodes (the copied lock would be held for ever)."""
    dec = _decoder(False)
    mem, x = randn(1, 3, 32, seed=1), randn(1, 1, 32, seed=2)
    cache = dec.new_cache(mem, 2)
    want = dec(x, mem)
    with cache._lock:                   # as a step in another thread at the fork
        pid = os.fork()
        if pid == 0:                    # the child: exit 0 only when the step runs right
            code = 1
            try:
                signal.alarm(20)
                code = 0 if max_err(dec(x, cache=cache), want) <= TOL else 2
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_cache_length_is_read_only_and_buffers_start_zeroed():
    dec = _decoder(False)
    mem = randn(1, 3, 32, seed=1)
    cache = dec.new_cache(mem, 5)
    for name in ("length", "max_length"):
        with pytest.raises(AttributeError):
            setattr(cache, name, -3)
    assert all(not lc["k"].any() and not lc["v"].any() for lc in cache._layers)
    with pytest.raises(ValueError, match="max_length"):
        dec.new_cache(mem, 2**40)


def test_cache_accepts_its_own_memory_holding_nan():
    dec = _decoder(False)
    mem, x = randn(1, 3, 32, seed=1), randn(1, 1, 32, seed=2)
    mem[0, 0, 0] = np.nan
    cache = dec.new_cache(mem, 2)
    y = dec(x, mem.copy(), cache=cache)
    assert np.array_equal(y, dec(x, mem), equal_nan=True)


def test_block_errors_name_the_block_argument():
    """attention's checks, reached through a block, name the block's argument."""
    dec = _decoder(False)
    model = fastattn.Transformer(16, 2, 1, 1, 32, seed=0)
    x, mem = randn(2, 3, 32, seed=1), randn(2, 6, 32, seed=2)
    with pytest.raises(ValueError, match="^memory_mask of shape"):
        dec(x, mem, memory_mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="^memory_key_lengths must"):
        dec(x, mem, memory_key_lengths=np.array([7, 1]))
    with pytest.raises(ValueError, match="^memory_key_lengths must"):
        dec(x[:, :1], cache=dec.new_cache(mem, 1), memory_key_lengths=np.array([9, 1]))
    src, tgt = randn(2, 4, 16, seed=3), randn(2, 3, 16, seed=4)
    with pytest.raises(ValueError, match="^src_key_lengths must"):
        model(src, tgt, src_key_lengths=np.array([5, 1]))
    with pytest.raises(ValueError, match="^tgt_key_lengths must"):
        model(src, tgt, tgt_key_lengths=np.array([4, 1]))
    with pytest.raises(ValueError, match="^tgt has 8 features"):
        model(src, tgt[..., :8])
    with pytest.raises(TypeError, match="^x must be an array"):
        fastattn.EncoderLayer(16, 2, 32)([[1.0] * 16, [1.0]])


def test_load_state_dict_takes_what_torch_takes_and_names_bad_keys(torch):
    """Tensors that require grad and bfloat16 tensors load (torch's own load_state_dict takes
    them); a mapping with keys of mixed types or no mapping at all gives a clear error."""
    t = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    layer = fastattn.EncoderLayer(16, 2, 32)
    layer.load_state_dict(dict(t.named_parameters()))        # requires_grad=True
    want = {k: v.detach().numpy() for k, v in t.state_dict().items()}
    assert all(np.array_equal(v, want[k]) for k, v in layer.state_dict().items())
    layer.load_state_dict({k: v.to(torch.bfloat16) for k, v in t.state_dict().items()})
    assert np.array_equal(layer.state_dict()["linear1.weight"],
                          t.linear1.weight.detach().to(torch.bfloat16).float().numpy())
    with pytest.raises(ValueError, match=r"unexpected keys \['extra', 1, None\]"):
        layer.load_state_dict({**t.state_dict(), 1: 1, None: 2, "extra": 3})
    with pytest.raises(TypeError, match="mapping"):
        layer.load_state_dict(None)


def test_from_torch_keeps_each_norms_eps(torch):
    t = torch.nn.TransformerDecoderLayer(16, 2, 32, batch_first=True).eval()
    t.norm2.eps, t.norm3.eps = 1.0, 0.25
    layer = fastattn.DecoderLayer.from_torch(t)
    assert (layer.norm1.eps, layer.norm2.eps, layer.norm3.eps) == (1e-5, 1.0, 0.25)
    x, mem = randn(2, 3, 16, seed=1), randn(2, 4, 16, seed=2)
    with torch.no_grad():
        want = t(torch.from_numpy(x), torch.from_numpy(mem)).numpy()
    assert max_err(layer(x, mem, causal=False), want) <= 1e-5


def test_cache_limits_raise_and_leave_the_cache_usable():
    B, E = 2, 32
    dec = _decoder(False)
    x, mem = randn(B, 4, E, seed=1), randn(B, 3, E, seed=2)
    cache = dec.new_cache(mem, 3)
    dec(x[:, :2], cache=cache)
    with pytest.raises(ValueError, match="max_length"):
        dec(x[:, 2:4], cache=cache)               # 2 + 2 > 3
    assert cache.length == 2
    last = dec(x[:, 2:3], cache=cache)            # the one position that fits
    assert max_err(last, dec(x[:, :3], mem)[:, 2:3]) <= TOL
    with pytest.raises(ValueError, match="max_length"):
        dec(x[:, 3:4], cache=cache)
    with pytest.raises(ValueError, match="at least one"):
        dec(x[:, :0], cache=dec.new_cache(mem, 3))
    with pytest.raises(ValueError, match="batch"):
        dec(x[:1, :1], cache=dec.new_cache(mem, 3))
    with pytest.raises(ValueError, match="key_lengths"):
        dec(x[:, :1], cache=dec.new_cache(mem, 3), key_lengths=np.array([1, 1]))
    with pytest.raises(ValueError, match="another shape"):
        _decoder(False, n=3)(x[:, :1], cache=dec.new_cache(mem, 3))
    with pytest.raises(ValueError, match="memory"):
        dec(x)


# ---- weights and pickling -------------------------------------------------------------------

def test_state_dict_names_round_trip_and_errors(torch):
    tt = torch.nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
    model = fastattn.Transformer(16, 2, 1, 1, 32, seed=5)
    assert set(model.state_dict()) == set(tt.state_dict())
    for k, v in model.state_dict().items():
        assert v.shape == tuple(tt.state_dict()[k].shape), k
    # bias=False drops the bias names as torch does
    tl = torch.nn.TransformerEncoderLayer(16, 2, 32, bias=False)
    assert set(fastattn.EncoderLayer(16, 2, 32, bias=False).state_dict()) == set(tl.state_dict())
    other = fastattn.Transformer(16, 2, 1, 1, 32, seed=6)
    other.load_state_dict(model.state_dict())
    src, tgt = randn(1, 4, 16, seed=1), randn(1, 3, 16, seed=2)
    np.testing.assert_array_equal(other(src, tgt), model(src, tgt))
    sd = model.state_dict()
    sd.pop("decoder.norm.weight")
    with pytest.raises(ValueError, match="decoder.norm.weight"):
        other.load_state_dict(sd)
    sd = model.state_dict()
    sd["encoder.layers.0.linear1.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="linear1.weight"):
        other.load_state_dict(sd)
    np.testing.assert_array_equal(other(src, tgt), model(src, tgt))   # nothing half-loaded


def test_pickle_round_trip_gives_identical_outputs():
    model = fastattn.Transformer(32, 4, 2, 2, 48, norm_first=True, activation="gelu", seed=1)
    mha = fastattn.MultiHeadAttention(32, 8, num_kv_heads=2, seed=2)
    src, tgt = randn(2, 5, 32, seed=3), randn(2, 4, 32, seed=4)
    for obj, call in ((model, lambda m: m(src, tgt)), (mha, lambda m: m(src, causal=True))):
        clone = pickle.loads(pickle.dumps(obj))
        np.testing.assert_array_equal(call(clone), call(obj))
    # a cache half way through decoding pickles too
    memory = model.encode(src)
    cache = model.new_cache(memory, 4)
    model.decode(tgt[:, :2], cache=cache)
    m2, c2 = pickle.loads(pickle.dumps((model, cache)))
    np.testing.assert_array_equal(m2.decode(tgt[:, 2:], cache=c2),
                                  model.decode(tgt[:, 2:], cache=cache))
    # weights are stored once (the Q/K/V slices are views, not separate arrays)
    assert len(pickle.dumps(mha)) < 1.1 * sum(v.nbytes for v in mha.state_dict().values()) + 4096


def test_from_torch_rejects_what_it_cannot_represent(torch):
    with pytest.raises(TypeError, match="TransformerEncoderLayer"):
        fastattn.EncoderLayer.from_torch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="add_bias_kv"):
        fastattn.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="activation"):
        fastattn.EncoderLayer.from_torch(torch.nn.TransformerEncoderLayer(8, 2, 16,
                                                                          activation=torch.tanh))


def test_import_does_not_import_torch():
    code = "import sys, fastattn; fastattn.Transformer(16, 2, 1, 1, 32); " \
           "sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- layout: heads as views, output written through out= ------------------------------------

def test_heads_are_strided_views_and_output_is_written_in_place(monkeypatch):
    import fastattn._blocks as blocks
    seen = []
    real = blocks.attention

    def spy(q, k, v, **kw):
        seen.append((q, k, v, kw["out"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(blocks, "attention", spy)
    layer = fastattn.EncoderLayer(32, 4, 64, seed=0)
    layer(randn(2, 5, 32))
    q, k, v, out = seen[0]
    assert q.shape == (2, 4, 5, 8) and q.strides[-1] == 4 and not q.flags.c_contiguous
    def root(a):
        while a.base is not None:
            a = a.base
        return a

    assert root(q) is root(k) is root(v)                                 # one fused QKV GEMM
    assert root(q).shape == (2 * 5, 32 + 2 * 32)
    assert out.shape == (2, 4, 5, 8) and out.strides[1] == 8 * 4 and out.strides[2] == 32 * 4
    assert root(out).size == 2 * 5 * 32                                  # a (B, L, H, D) buffer


# ---- the fused passes -----------------------------------------------------------------------

def _act_ref(y, name):
    from math import erf, sqrt
    if name == "relu":
        return np.maximum(y, 0)
    if name == "gelu":
        return 0.5 * y * (1 + np.vectorize(erf)(y / sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    return y


@pytest.mark.parametrize("activation", [None] + ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, m, k", [(1, 1, 1), (3, 17, 5), (8, 33, 13), (9, 40, 7),
                                     (130, 70, 24), (40, 300, 16)])
def test_linear_matches_float64_reference(activation, dtype, n, m, k):
    r = rng(n * m + k)
    x, w, b = (r.standard_normal(s).astype(dtype) for s in ((n, k), (m, k), (m,)))
    ref = _act_ref(x.astype(np.float64) @ w.T.astype(np.float64) + b, activation)
    tol = 1e-5 * np.sqrt(k) if dtype == np.float32 else 1e-12
    results = []
    for nt in (1, 2):
        out = np.empty((n, m), dtype)
        _fused.linear(x, w, b, out, activation, False, nt)
        assert max_err(out, ref) <= tol
        results.append(out)
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=tol)
    # accumulate: out += x wᵀ + b
    acc = r.standard_normal((n, m)).astype(dtype)
    ref2 = acc.astype(np.float64) + x.astype(np.float64) @ w.T.astype(np.float64) + b
    if activation is None:
        _fused.linear(x, w, b, acc, None, True, 2)
        assert max_err(acc, ref2) <= tol


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9, 13, 64, 256])
def test_projection_kernels_match_blas_and_float64(n):
    """The float32 projection kernels against the BLAS path and a float64 reference: up to 8
    rows the streaming kernel (w rows taken in pairs, one from each half of w: odd and even
    m, m = 1, odd k tails), up to 256 the packed micro-kernel (partial row and column
    panels, k past one 512 block).  Each output element is one thread's work, summed in the
    same order however the rows or columns are split, so 1 and 2 threads agree bit for bit."""
    if _fused.SIMD != "avx2+fma":
        pytest.skip("the projection kernels need AVX2+FMA")
    r = rng(100 + n)
    for m, k in [(1, 1), (2, 5), (3, 7), (17, 9), (33, 16), (70, 23), (300, 33), (513, 515),
                 (40, 1031), (600, 2048)]:
        x = r.standard_normal((n, k + 5)).astype(np.float32)[:, 2:k + 2]   # strided rows
        w = r.standard_normal((m, k)).astype(np.float32)
        b = r.standard_normal(m).astype(np.float32)
        acc0 = r.standard_normal((n, m)).astype(np.float32)
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        tol = 1e-5 * np.sqrt(k)
        _fused.simd_init(False)                                # plain path: BLAS sgemm
        try:
            blas = _fused.linear(x, w, b, np.empty((n, m), np.float32), None, False, 1)
        finally:
            _fused.simd_init(True)
        assert max_err(blas, ref + b) <= tol
        outs = []
        for nt in (1, 2):
            out = _fused.linear(x, w, b, np.empty((n, m), np.float32), None, False, nt)
            assert max_err(out, ref + b) <= tol, (m, k)
            assert max_err(out, blas) <= tol
            acc = _fused.linear(x, w, None, acc0.copy(), None, True, nt)
            assert max_err(acc, ref + acc0) <= tol, (m, k)
            outs.append((out, acc))
        assert np.array_equal(outs[0][0], outs[1][0])
        assert np.array_equal(outs[0][1], outs[1][1])


def test_projection_thread_splits_are_bitwise_the_one_thread_result():
    """Whatever the thread count, every chunk of a float32 projection runs the kernel the whole
    call's row count picks: a 1-row tail chunk (161 rows at 5 threads: 40 + 40 + 40 + 40 + 1)
    does not switch to the streaming kernel's summation order.  (Every shape is above the
    flops below which a projection runs on one thread.)"""
    if _fused.SIMD != "avx2+fma":
        pytest.skip("the projection kernels need AVX2+FMA")
    r = rng(7)
    for n, m, k in [(161, 64, 512), (100, 96, 300), (256, 40, 1030), (9, 700, 256),
                    (7, 600, 300)]:
        assert 2 * n * m * k >= _fused.PARALLEL_MIN_FLOPS
        x = r.standard_normal((n, k)).astype(np.float32)
        w = r.standard_normal((m, k)).astype(np.float32)
        b = r.standard_normal(m).astype(np.float32)
        one = _fused.linear(x, w, b, np.empty((n, m), np.float32), None, False, 1)
        for nt in (2, 3, 5):
            out = _fused.linear(x, w, b, np.empty((n, m), np.float32), None, False, nt)
            assert np.array_equal(out, one), (n, m, k, nt)


def test_linear_out_overlapping_an_operand_is_still_right():
    """An out= sharing memory with the bias or the weight (which the GEMM would overwrite
    before reading them) goes through a temporary (before: the bias read back from out)."""
    r = rng(11)
    x = r.standard_normal((5, 3)).astype(np.float32)
    buf = r.standard_normal((5, 4)).astype(np.float32)
    want = x @ buf[:4, :3].T + buf[0]
    out = buf.copy()
    fastattn.linear(x, out[:4, :3], out[0], out=out)      # weight and bias inside out
    assert max_err(out, want) <= 1e-5
    with pytest.raises(ValueError, match="overlap"):      # the private kernel refuses it
        _fused.linear(x, buf[:4, :3].copy(), buf[0], buf, None, False, 1)


def test_entry_points_name_what_is_wrong():
    """Errors a user can cause in linear, LayerNorm and MultiHeadAttention are clear."""
    f = np.float32
    x, w = np.ones((2, 3), f), np.ones((4, 3), f)
    with pytest.raises(ValueError, match="activation"):
        fastattn.linear(x, w, activation=np.array(["relu", "gelu"]))
    ro = np.zeros((4, 2), f).T
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fastattn.linear(x, w, out=ro)
    ln = fastattn.LayerNorm(8)
    for eps in (-1.0, np.nan):
        ln.eps = eps
        with pytest.raises(ValueError, match="eps"):
            ln(np.ones((2, 8), f))
    x0 = np.array(1.0, f)          # the private kernel: a 0-d x crashed building its message
    with pytest.raises(ValueError, match="2-D"):
        _fused.add_layernorm(x0, None, np.ones(1, f), np.zeros(1, f), 1e-5, None, x0.copy(), 1)
    m = fastattn.MultiHeadAttention(24, 3, kdim=10, vdim=14)
    with pytest.raises(ValueError, match="value is required"):
        m(np.ones((1, 2, 24), f), np.ones((1, 3, 10), f))
    with pytest.raises(TypeError, match="causal must be a bool"):
        fastattn.MultiHeadAttention(24, 3)(np.ones((1, 2, 24), f), causal=np.array([True]))


def test_linear_strided_rows_and_public_wrapper():
    r = rng(5)
    x = r.standard_normal((6, 40)).astype(np.float32)[:, 3:35]         # row stride 40
    w = r.standard_normal((20, 32)).astype(np.float32)
    big = np.zeros((6, 50), np.float32)
    _fused.linear(x, w, None, big[:, 10:30], None, False, 2)
    assert max_err(big[:, 10:30], x @ w.T) <= 1e-4
    assert not big[:, :10].any() and not big[:, 30:].any()
    y = fastattn.linear(np.stack([x, x]), w, np.ones(20), activation="relu")
    assert y.shape == (2, 6, 20) and max_err(y[1], np.maximum(x @ w.T + 1, 0)) <= 1e-4
    with pytest.raises(ValueError):
        _fused.linear(x, w[:, :5], None, np.empty((6, 20), np.float32), None, False, 1)
    with pytest.raises(TypeError):
        _fused.linear(x, w.astype(np.float64), None, np.empty((6, 20), np.float32), None, False, 1)
    with pytest.raises(ValueError, match="overlap"):
        a = np.zeros((4, 4), np.float32)
        _fused.linear(a, np.eye(4, dtype=np.float32), None, a, None, False, 1)


def test_activations_accuracy_and_special_values():
    x = np.concatenate([np.linspace(-12, 12, 100001),
                        [0.0, -0.0, 1e30, -1e30, -1e38, -3e38, 3e38]]).astype(np.float32)
    for name in ACTIVATIONS:
        for simd in (True, False):                        # the AVX2 pass and the scalar one
            _fused.simd_init(simd)
            try:
                y = x[None].copy()
                _fused.bias_act(y, None, name)
            finally:
                _fused.simd_init(True)
            ref = _act_ref(x.astype(np.float64), name)
            assert np.all(np.abs(y[0] - ref) <= 1e-6 * np.maximum(1, np.abs(ref))), (name, simd)
    y = np.array([[np.nan, np.inf, -np.inf, np.nan, 3.0]], np.float32)
    for name in ACTIVATIONS:
        z = y.copy()
        _fused.bias_act(z, None, name)
        assert np.isnan(z[0, 0]) and np.isnan(z[0, 3]) and z[0, 1] == np.inf
    z = np.array([[-1e30, -50.0]], np.float32)
    _fused.bias_act(z, None, "gelu")
    assert np.all(z == 0)


def test_add_layernorm_matches_reference_and_works_in_place():
    r = rng(9)
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        x, y = (r.standard_normal((37, 29)).astype(dtype) + 5 for _ in range(2))
        g, b = r.standard_normal(29).astype(dtype), r.standard_normal(29).astype(dtype)
        h = x.astype(np.float64) + y
        ref = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * g + b
        s, o = np.empty_like(x), np.empty_like(x)
        _fused.add_layernorm(x, y, g, b, 1e-5, s, o, 2)
        assert max_err(o, ref) <= tol and max_err(s, h) <= tol
        x2 = x.copy()
        _fused.add_layernorm(x2, y, g, b, 1e-5, None, x2, 1)             # in place
        assert max_err(x2, ref) <= tol
        ln = fastattn.LayerNorm(29, dtype=dtype)
        ln.load_state_dict({"weight": g, "bias": b})
        assert max_err(ln(h.astype(dtype)), ref) <= tol
    with pytest.raises(ValueError, match="overlap"):
        a = np.zeros((4, 8), np.float32)
        _fused.add_layernorm(a[:, :4], None, np.ones(4, np.float32), np.zeros(4, np.float32),
                             1e-5, None, a[:, 2:6], 1)


# ---- input checks ---------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    layer = fastattn.EncoderLayer(16, 2, 32, seed=0)
    with pytest.raises(ValueError, match="16"):
        layer(np.zeros((2, 3, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        layer(np.zeros((2, 3, 4, 16), np.float32))
    with pytest.raises(TypeError, match="float"):
        layer(np.zeros((2, 3, 16), np.int64))
    with pytest.raises(ValueError, match="mask"):
        layer(np.zeros((2, 3, 16), np.float32), mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="divisible"):
        fastattn.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="multiple"):
        fastattn.MultiHeadAttention(12, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="activation"):
        fastattn.EncoderLayer(16, 2, activation="swish")
    with pytest.raises(TypeError, match="dtype"):
        fastattn.EncoderLayer(16, 2, dtype=np.float16)
    x = randn(2, 0, 16)
    assert layer(x).shape == (2, 0, 16)
    with pytest.raises(TypeError, match="dtype"):
        fastattn.EncoderLayer(16, 2, dtype="foo")
    with pytest.raises(TypeError, match="layer_norm_eps"):
        fastattn.EncoderLayer(16, 2, layer_norm_eps="x")
    with pytest.raises(ValueError, match="eps"):
        fastattn.LayerNorm(16, eps=float("nan"))
    with pytest.raises(ValueError, match="norm1.weight"):
        layer.load_state_dict({"norm1.weight": [[1.0], [1.0, 2.0]]}, strict=False)
    with pytest.raises(ValueError, match="norm1.weight.*range"):
        layer.load_state_dict({"norm1.weight": np.full(16, 1e300)}, strict=False)
    assert np.all(layer.norm1.weight == 1)                # nothing loaded
    with pytest.raises(ValueError, match="d_model = 15"):
        fastattn.EncoderLayer(15, 4)
    with pytest.raises(ValueError, match="at least one"):          # as Transformer(..., 0, ...)
        fastattn.Encoder([])
    with pytest.raises(TypeError, match="EncoderLayer"):
        fastattn.Encoder([layer.norm1])
    with pytest.raises(TypeError, match="bias"):
        fastattn.linear(np.ones((2, 3)), np.ones((4, 3)), np.ones(4, complex))


def test_guarded_entry_points_keep_their_signatures():
    """help() and inspect see the real parameters of the BLAS-guarded entry points"""
    import inspect
    assert "activation" in inspect.signature(fastattn.linear).parameters
    assert "key_lengths" in inspect.signature(fastattn.MultiHeadAttention.__call__).parameters
    assert "max_length" in inspect.signature(fastattn.Decoder.new_cache).parameters


def test_linear_with_an_empty_axis():
    """linear: K = 0 gives the bias (zeros without one); M = 0 or no rows an empty result"""
    b = np.arange(4, dtype=np.float32)
    assert np.array_equal(fastattn.linear(np.ones((2, 0), np.float32),
                                          np.ones((4, 0), np.float32), b), np.tile(b, (2, 1)))
    out = np.full((3, 2, 4), 7, np.float32)
    fastattn.linear(np.ones((3, 2, 0), np.float32), np.ones((4, 0), np.float32), out=out)
    assert not out.any()
    assert fastattn.linear(np.ones((2, 3)), np.ones((0, 3))).shape == (2, 0)
    assert fastattn.linear(np.ones((0, 3)), np.ones((5, 3))).shape == (0, 5)


# ---- the example ----------------------------------------------------------------------------

def test_greedy_decode_example_runs():
    path = os.path.join(ROOT, "examples", "greedy_decode.py")
    r = subprocess.run([sys.executable, path, "--check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cached and uncached decoding agree" in r.stdout


@pytest.mark.parametrize("attr", ["self_attn", "multihead_attn"])
@pytest.mark.parametrize("kw", [dict(add_zero_attn=True), dict(add_bias_kv=True),
                                dict(num_heads=4), dict(kdim=6)])
def test_layer_from_torch_rejects_attention_it_cannot_reproduce(torch, attr, kw):
    """A layer whose attention module was replaced by one fastattn's layer cannot reproduce
    (add_zero_attn; cross-attention with other heads: same state-dict shapes) must raise,
    naming the module, rather than load and give different outputs."""
    E = 8
    if attr == "self_attn" and "num_heads" in kw:
        pytest.skip("the layer takes its heads from self_attn: nothing differs")
    kw = dict(dict(embed_dim=E, num_heads=2, batch_first=True), **kw)
    tl = torch.nn.TransformerDecoderLayer(E, 2, 16, dropout=0.0, batch_first=True)
    setattr(tl, attr, torch.nn.MultiheadAttention(**kw))
    with pytest.raises(ValueError, match=attr):
        fastattn.DecoderLayer.from_torch(tl)
    if attr == "self_attn":
        te = torch.nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True)
        te.self_attn = torch.nn.MultiheadAttention(**kw)
        with pytest.raises(ValueError, match="self_attn"):
            fastattn.EncoderLayer.from_torch(te)
