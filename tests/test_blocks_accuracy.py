"""Transformer blocks vs PyTorch, as accuracy against float64 (shared/reliability.md, the
"blocks vs PyTorch" row): for a torch.nn module and the fastattn block built from it with
``from_torch``, on the same float32 weights and unit-scale float32 inputs,

    max |fastattn32 - truth64| <= max(2 * max |torch32 - truth64|, floor)

where truth64 is the torch module in float64 (same weights, promoted exactly) run on the same
inputs promoted to float64, and `floor` = 2 u max(1, max |truth64|) with u = 2**-24 guards only
the degenerate case of a (near) zero torch error (see `errors`).  With padding, only rows at
valid (non-padded) query positions are compared (fastattn leaves the others unspecified).

Unlike tests/test_blocks.py (a fixed 1e-4 bound against torch float32), the bound here follows
torch's own float32 error, which for these sizes is 2e-7..2e-6: a fastattn block that is more
than twice as far from float64 as torch is fails.  The ratio of two max abs errors is an
extreme-value statistic: per single draw, over all 27 cases and seeds 0-39, it had median 1.0
and 99th percentile 1.7, yet 4 of 1620 draws exceeded 2, all in decoder stacks (their final
LayerNorm amplifies the layers' errors), while the RMS errors of fastattn and torch agreed
within 10% on every draw.  So each test pools the outputs of three draws (seeds 0-2, fixed
before any measurement) before taking the max: over 144 such pooled groups (seeds 0-23, every
stack and decoder-layer case) the largest ratio was 1.60.

Torch references run under ``torch.enable_grad()``: under no_grad torch takes its inference
fast path, which (torch 2.13) computes exact gelu even for GELU(approximate="tanh").

The float64 module is rebuilt from the same constructor and loaded with the float32 state
dict, not made with ``copy.deepcopy(module).double()``: torch's
TransformerDecoderLayer.__setstate__ (torch 2.13) sets ``activation = F.relu`` whenever
"activation" is not in the instance __dict__, which is the case when the activation is a
module (it lives in _modules), so a deep copy of a decoder layer built with
``GELU(approximate="tanh")`` silently computes relu.  For the same reason torch's own
TransformerDecoder (which deep-copies its layer) runs relu for a GELU-module activation; the
decoder stack below passes tanh-gelu as ``functools.partial(F.gelu, approximate="tanh")``,
which survives the copy.  `build` checks both copies use the same activations, and `errors`
that torch's float32 error is small, so a broken reference cannot widen the bound unnoticed.
"""
import functools
import warnings

import numpy as np
import pytest

import fastattn

U32 = 2.0 ** -24
E, H, F, B, L, S = 64, 4, 128, 3, 17, 13      # d_model, heads, feed-forward, batch, tgt, memory
LENGTHS = [17, 9, 3]                          # valid query/key positions per batch item (of L)
MEM_LENGTHS = [13, 5, 10]                     # valid memory positions per batch item (of S)
SEEDS = [0, 1, 2]
ACTIVATIONS = ["relu", "gelu", "gelu_tanh"]


@pytest.fixture(scope="module")
def torch():
    t = pytest.importorskip("torch", reason="torch is a test-only dependency (pip install "
                                            "torch) and is not installed")
    warnings.filterwarnings("ignore", message=".*nested tensor.*")
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
    # One torch thread for these small sizes: with two, torch's thread pool slows the file
    # 2-3x on a busy machine.  Restored afterwards for the other test modules.
    threads = t.get_num_threads()
    t.set_num_threads(1)
    yield t
    t.set_num_threads(threads)


# ---- helpers --------------------------------------------------------------------------------

def randn(seed, *shape):
    """Unit-scale float32 normals."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_act(torch, name, functional=False):
    if name != "gelu_tanh":
        return name
    if functional:
        return functools.partial(torch.nn.functional.gelu, approximate="tanh")
    return torch.nn.GELU(approximate="tanh")


def build(torch, make, seed):
    """(float32 module, float64 module) with the same weights, eval mode.

    make() runs under torch seed `seed` (torch's own weight init, without touching the global
    generator); norms and biases then get non-trivial values (torch initialises them to 1
    and 0), as randomize() in tests/test_blocks.py does.  The float64 module is make() again,
    .double(), loaded with the float32 state dict (exact: float32 -> float64 is lossless)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m32 = make()
        with torch.no_grad():
            for name, p in m32.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.copy_(p + 0.3 * torch.randn(p.shape))
        m64 = make().double()
    m64.load_state_dict(m32.state_dict())
    for (n32, a), (n64, b) in zip(m32.named_modules(), m64.named_modules(), strict=True):
        assert n32 == n64 and repr(getattr(a, "activation", None)) == repr(
            getattr(b, "activation", None)), n32
    for (n32, p32), (n64, p64) in zip(m32.named_parameters(), m64.named_parameters(),
                                      strict=True):
        assert n32 == n64 and p32.dtype == torch.float32 and p64.dtype == torch.float64
        assert torch.equal(p32.double(), p64), n32
    return m32.eval(), m64.eval()


def pad_mask(torch, lengths, n):
    """torch key_padding_mask (True = padding) for right padding."""
    return torch.from_numpy(np.arange(n)[None, :] >= np.asarray(lengths)[:, None])


def causal_mask(torch, n, dtype):
    return torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=dtype)


def valid_rows(y, lengths):
    """Rows of (B, L, E) at non-padded positions, concatenated; all rows if lengths is None."""
    y = np.asarray(y, np.float64)
    if lengths is None:
        return y.reshape(-1, y.shape[-1])
    return np.concatenate([y[b, :n] for b, n in enumerate(lengths)])


def three_ways(torch, modules, cls, run_torch, run_fast, inputs, lengths=None):
    """(fastattn float32, torch float32, torch float64) outputs, valid rows only.

    `modules` is build()'s pair; `cls.from_torch(float32 module)` is the fastattn block;
    `inputs` are float32 numpy arrays, promoted exactly to float64 for the truth."""
    m32, m64 = modules
    block = cls.from_torch(m32)
    assert block.dtype == np.float32
    with torch.enable_grad():
        t32 = run_torch(m32, *(torch.from_numpy(a) for a in inputs)).detach().numpy()
        t64 = run_torch(m64, *(torch.from_numpy(a.astype(np.float64))
                               for a in inputs)).detach().numpy()
    ours = run_fast(block, *inputs)
    assert ours.dtype == np.float32 and t32.dtype == np.float32 and t64.dtype == np.float64
    assert ours.shape == t32.shape == t64.shape
    return tuple(valid_rows(y, lengths) for y in (ours, t32, t64))


def errors(ours, t32, t64):
    """(fastattn error, torch error, floor): max abs errors against the float64 truth."""
    assert np.isfinite(ours).all() and np.isfinite(t32).all() and np.isfinite(t64).all()
    ours_err = float(np.max(np.abs(ours - t64)))
    torch_err = float(np.max(np.abs(t32 - t64)))
    # A float64 reference that computes something else (e.g. another activation) would make
    # torch's "error" large and the 2x bound vacuous; torch float32 is ~1e-6 from float64 here.
    assert torch_err <= 1e-4, f"the float64 reference is off torch float32 by {torch_err:.2e}"
    # The floor matters only if torch's error is ~0 (a degenerate draw), where 2x of it would
    # ask fastattn to be exact.  A correctly rounded float32 result is already up to
    # u max|truth| away; the floor allows twice that (the "2x" applied to correct rounding).
    # It sits below 2 x torch's error in every case measured here (floor 1.5e-7..8e-7 vs
    # 2 x torch 3.9e-7..3e-6), and, taken as a max rather than added, it never loosens the
    # 2x bound where that bound is the larger.
    floor = 2 * U32 * max(1.0, float(np.max(np.abs(t64))))
    return ours_err, torch_err, floor


def assert_within_2x_torch(case, *args):
    """case(torch, seed, *args) over every seed, the outputs pooled: the max of a larger
    sample is a steadier statistic than one draw's (see the module docstring)."""
    draws = [case(seed, *args) for seed in SEEDS]
    ours, t32, t64 = (np.concatenate([d[i].ravel() for d in draws]) for i in range(3))
    ours_err, torch_err, floor = errors(ours, t32, t64)
    assert ours_err <= max(2 * torch_err, floor), (
        f"fastattn float32 error {ours_err:.3e} > max(2 x torch float32 error {torch_err:.3e}, "
        f"floor {floor:.1e}) (ratio {ours_err / max(torch_err, 1e-300):.2f})")


# ---- the cases (each returns the three outputs; usable outside pytest too) -------------------

def run_decoder_torch(torch):
    def run(t, x, mem):
        return t(x, mem, tgt_mask=causal_mask(torch, L, x.dtype), tgt_is_causal=True,
                 memory_key_padding_mask=pad_mask(torch, MEM_LENGTHS, S))
    return run


def run_decoder_fast(b, x, mem):
    return b(x, mem, causal=True, memory_key_lengths=np.array(MEM_LENGTHS))


def run_encoder_torch(torch):
    return lambda t, x: t(x, src_key_padding_mask=pad_mask(torch, LENGTHS, L))


def run_encoder_fast(b, x):
    return b(x, key_lengths=np.array(LENGTHS))


def case_mha(torch, seed, kind):
    """MultiheadAttention: self-attention, self-attention with key padding, cross-attention
    with a padded memory."""
    m = build(torch, lambda: torch.nn.MultiheadAttention(E, H, batch_first=True), seed)
    x, mem = randn(seed, B, L, E), randn(seed + 100, B, S, E)
    cls = fastattn.MultiHeadAttention
    if kind == "self":
        return three_ways(torch, m, cls, lambda t, x: t(x, x, x, need_weights=False)[0],
                          lambda b, x: b(x), [x])
    if kind == "self_padded":
        kpm = pad_mask(torch, LENGTHS, L)
        return three_ways(torch, m, cls,
                          lambda t, x: t(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
                          lambda b, x: b(x, key_lengths=np.array(LENGTHS)), [x], LENGTHS)
    assert kind == "cross_padded"
    kpm = pad_mask(torch, MEM_LENGTHS, S)
    return three_ways(torch, m, cls,
                      lambda t, x, mem: t(x, mem, mem, key_padding_mask=kpm,
                                          need_weights=False)[0],
                      lambda b, x, mem: b(x, mem, key_lengths=np.array(MEM_LENGTHS)),
                      [x, mem])                     # every query row is valid


def case_encoder_layer(torch, seed, norm_first, activation):
    tl = build(torch, lambda: torch.nn.TransformerEncoderLayer(
        E, H, F, dropout=0.0, activation=torch_act(torch, activation), norm_first=norm_first,
        batch_first=True), seed)
    return three_ways(torch, tl, fastattn.EncoderLayer, run_encoder_torch(torch),
                      run_encoder_fast, [randn(seed, B, L, E)], LENGTHS)


def case_decoder_layer(torch, seed, norm_first, activation):
    td = build(torch, lambda: torch.nn.TransformerDecoderLayer(
        E, H, F, dropout=0.0, activation=torch_act(torch, activation), norm_first=norm_first,
        batch_first=True), seed)
    return three_ways(torch, td, fastattn.DecoderLayer, run_decoder_torch(torch),
                      run_decoder_fast, [randn(seed, B, L, E), randn(seed + 100, B, S, E)])


def case_encoder(torch, seed, norm_first, activation):
    """TransformerEncoder: 2 layers + final norm, padded."""
    te = build(torch, lambda: torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(E, H, F, dropout=0.0, norm_first=norm_first,
                                         activation=torch_act(torch, activation),
                                         batch_first=True),
        2, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False), seed)
    return three_ways(torch, te, fastattn.Encoder, run_encoder_torch(torch), run_encoder_fast,
                      [randn(seed, B, L, E)], LENGTHS)


def case_decoder(torch, seed, norm_first, activation):
    """TransformerDecoder: 2 layers + final norm, causal, padded memory."""
    td = build(torch, lambda: torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(E, H, F, dropout=0.0, norm_first=norm_first,
                                         activation=torch_act(torch, activation, True),
                                         batch_first=True),
        2, norm=torch.nn.LayerNorm(E)), seed)
    return three_ways(torch, td, fastattn.Decoder, run_decoder_torch(torch), run_decoder_fast,
                      [randn(seed, B, L, E), randn(seed + 100, B, S, E)])


# ---- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["self", "self_padded", "cross_padded"])
def test_multihead_attention_within_2x_torch_error(torch, kind):
    assert_within_2x_torch(functools.partial(case_mha, torch), kind)


BLOCK_CASES = {"encoder_layer": case_encoder_layer, "decoder_layer": case_decoder_layer,
               "encoder_stack": case_encoder, "decoder_stack": case_decoder}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("block", list(BLOCK_CASES))
def test_layers_and_stacks_within_2x_torch_error(torch, block, norm_first, activation):
    assert_within_2x_torch(functools.partial(BLOCK_CASES[block], torch), norm_first, activation)
