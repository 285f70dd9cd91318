"""Transformer blocks on fastattn: NumPy weights, PyTorch names, a KV cache for decoding.

Every block takes batch-first input ``(B, L, E)`` (or unbatched ``(L, E)``) and works on the
``N = B·L`` rows at once, with no Python loop over batch or heads:

* projections are GEMMs over all N rows (``_fused.linear``: the rows, or for few rows the
  output columns, split across fastattn's OpenMP threads, the BLAS held to one thread each,
  bias + activation applied per chunk); self-attention uses one fused QKV GEMM;
* heads are strided views of the projection output, ``(B, L, H, D)`` transposed to
  ``(B, H, L, D)``, read in place by :func:`fastattn.attention`, which writes into a
  ``(B, L, H, D)`` buffer through ``out=`` (so the output projection reads it as ``(N, E)``);
* residual + LayerNorm is one pass (``_fused.add_layernorm``); in pre-norm blocks the
  residual is added inside the GEMM (beta = 1).

A block reads like its equation::

    post-norm:  x = norm1(x + self_attn(x));       x = norm2(x + ff(x))
    pre-norm:   x = x + self_attn(norm1(x));       x = x + ff(norm2(x))

Decoding with a cache (``new_cache``): each layer's cross-attention K/V of the memory are
computed once, self-attention K/V go into preallocated ``(B, Hkv, max_length, D)`` buffers, and
each call appends ``t >= 1`` positions, attending with bottom-right causal alignment.
"""
import contextlib
import functools
import math
import os
import threading
import weakref

import numpy as np

from . import _fused
from ._attention import attention
from ._threads import blas_guard, get_num_threads, parallel_threads

__all__ = ["LayerNorm", "MultiHeadAttention", "EncoderLayer", "DecoderLayer", "Encoder",
           "Decoder", "Transformer", "DecoderCache", "linear"]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
MAX_CACHE_LENGTH = 2**31 - 1    # the kernel's limit on a key sequence


# ---- helpers -------------------------------------------------------------------------------

def _check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _check_int(x, name, minimum):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def _check_eps(eps, name):
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.integer,
                                                                np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not 0 <= eps < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {eps}")
    return eps


def _check_activation(activation):
    if not (isinstance(activation, str) and activation in ACTIVATIONS):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _input(x, name, width, dtype):
    """x as a C-contiguous (B, L, width) array of `dtype` (a copy only when needed), and
    whether it was unbatched (L, width)."""
    try:
        a = x if isinstance(x, np.ndarray) else np.asarray(x)
    except ValueError as exc:  # ragged lists
        raise TypeError(f"{name} must be an array of floats: {exc}") from None
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be (B, L, E) or unbatched (L, E), got shape {a.shape}")
    if a.shape[-1] != width:
        raise ValueError(f"{name} has {a.shape[-1]} features on its last axis, expected {width} "
                         f"(shape {a.shape})")
    unbatched = a.ndim == 2
    if unbatched:
        a = a[None]
    return np.ascontiguousarray(a, dtype=dtype), unbatched


def _rows(a):
    """(B, L, E) C-contiguous -> (B·L, E) view."""
    return a.reshape(-1, a.shape[-1])


@contextlib.contextmanager
def _arg_names(**names):
    """An error about an argument of `attention` (its message starts with the name) names
    the block's argument instead: names maps attention's name to the block's."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for old, new in names.items():
            if msg.startswith((old + " ", old + ":")):
                raise type(exc)(new + msg[len(old):]) from None
        raise


def _blas_one_thread():
    """The guard holding the BLAS library to one thread (counted across callers): every
    public entry point holds it around its whole forward pass, GEMMs and attention calls."""
    return blas_guard if hasattr(blas_guard, "__enter__") else blas_guard()


def _guarded(method):
    @functools.wraps(method)            # keeps the signature for help() and inspect
    def wrapper(*args, **kwargs):
        with _blas_one_thread():
            return method(*args, **kwargs)
    return wrapper


def _linear(x, w, b=None, act=None, out=None, accumulate=False):
    """out (N, M) [+]= act(x (N, K) · wᵀ + b) on fastattn's threads (the caller holds the
    BLAS guard)."""
    if out is None:
        out = np.empty((x.shape[0], w.shape[0]), x.dtype)
    return _fused.linear(x, w, b, out, act, accumulate, parallel_threads(get_num_threads()))


def _layernorm(x, y, norm, sum_out=None, norm_out=None):
    """norm_out := LayerNorm(x + y) (y may be None); sum_out := x + y when given."""
    if norm_out is None:
        norm_out = np.empty_like(x)
    return _fused.add_layernorm(x, y, norm.weight, norm._beta(), norm.eps, sum_out, norm_out,
                                parallel_threads(get_num_threads()))


@_guarded
def linear(x, weight, bias=None, *, activation=None, out=None):
    """``act(x · weightᵀ + bias)`` for x ``(..., K)``, weight ``(M, K)`` (PyTorch's layout).

    The projection the blocks use: one GEMM over all rows on fastattn's threads (BLAS held to
    one thread each), with the bias and activation (None, "relu", "gelu", "gelu_tanh") fused
    into the same pass.  float32/float64; ``out`` (..., M) optional.  Returns (..., M).
    """
    w = np.asarray(weight)
    if w.dtype.kind != "f" or w.dtype not in (np.float32, np.float64):
        raise TypeError(f"weight must be float32 or float64, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (M, K), got shape {w.shape}")
    dt = w.dtype
    w = np.ascontiguousarray(w)
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(f"x must be a float array, got dtype {a.dtype}")
    if a.ndim < 1 or a.shape[-1] != w.shape[1]:
        raise ValueError(f"x {a.shape} and weight {w.shape} do not match on K")
    lead = a.shape[:-1]
    M, K = w.shape
    x2 = np.ascontiguousarray(a, dtype=dt).reshape(math.prod(lead), K)
    b = None
    if bias is not None:
        b = np.asarray(bias)
        if b.dtype.kind not in "fiu":
            raise TypeError(f"bias must be a real array, got dtype {b.dtype}")
        b = np.ascontiguousarray(b, dtype=dt)
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {b.shape}")
    if activation is not None:
        _check_activation(activation)
    shape = lead + (w.shape[0],)
    if out is None:
        return _linear(x2, w, b, activation).reshape(shape)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dt:
        raise ValueError(f"out must be a {dt} array of shape {shape}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    o2 = out.reshape(math.prod(lead), M) if out.flags.c_contiguous else None
    if o2 is None or any(np.may_share_memory(out, t) for t in (a, w, b) if t is not None):
        # the GEMM would overwrite an operand it still reads: through a temporary
        np.copyto(out, _linear(x2, w, b, activation).reshape(shape))
        return out
    _linear(x2, w, b, activation, out=o2)
    return out


def _torch_state(module):
    return {k: _weight_array(v, k) for k, v in module.state_dict().items()}


def _torch_dtype(module):
    for p in module.parameters():
        return np.float64 if str(p.dtype) == "torch.float64" else np.float32
    return np.float32


def _torch_activation(act):
    import functools

    import torch.nn.functional as F
    from torch import nn
    if isinstance(act, str):
        return _check_activation(act)
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu:
        return "gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, functools.partial) and act.func is F.gelu and not act.args:
        appr = act.keywords.get("approximate", "none")
        if set(act.keywords) <= {"approximate"} and appr in ("none", "tanh"):
            return "gelu_tanh" if appr == "tanh" else "gelu"
    raise ValueError(f"activation {act!r} is not supported: use relu, gelu or "
                     f"gelu(approximate='tanh')")


def _check_torch_mha(mha, name, num_heads=None, embed_dim=None):
    """Raise ValueError for a torch.nn.MultiheadAttention configuration fastattn cannot
    reproduce (in a layer: also one that differs from what the layer's block is built with,
    which its state dict alone does not reveal)."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(f"{name}: add_bias_kv and add_zero_attn are not supported")
    if num_heads is not None and mha.num_heads != num_heads:
        raise ValueError(f"{name} has {mha.num_heads} heads, but the layer's self_attn has "
                         f"{num_heads}: attention blocks of one layer must have the same heads")
    if embed_dim is not None and not (mha.embed_dim == mha.kdim == mha.vdim == embed_dim):
        raise ValueError(f"{name}: embed_dim, kdim and vdim must all be d_model = {embed_dim} in "
                         f"a layer, got {mha.embed_dim}, {mha.kdim}, {mha.vdim}")


def _require(module, cls_name):
    import torch.nn as nn
    cls = getattr(nn, cls_name)
    if not isinstance(module, cls):
        raise TypeError(f"expected a torch.nn.{cls_name}, got {type(module).__name__}")


class _Block:
    """Parameters by PyTorch name: `_own_params` lists (name, attribute) of this block,
    `_children` lists (prefix, sub-block)."""

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        # a weight (or eps, activation, ...) was set: a decoder cache made before, its keys
        # and values computed with the old values, no longer fits.  Random, so unique across
        # processes and forks; copies and pickles keep it.
        object.__setattr__(self, "_weights_token", os.urandom(16))

    def _own_params(self):
        return []

    def _children(self):
        return []

    def _named(self, prefix=""):
        for name, attr in self._own_params():
            if getattr(self, attr) is not None:
                yield prefix + name, self, attr
        for p, child in self._children():
            yield from child._named(prefix + p + ".")

    def state_dict(self):
        """The weights as {PyTorch name: array copy}."""
        return {name: getattr(obj, attr).copy() for name, obj, attr in self._named()}

    def load_state_dict(self, mapping, strict=True):
        """Load weights by PyTorch name (values: anything ``np.asarray`` accepts).

        Every name must be present and no other (``strict=False``: missing names keep their
        values, unknown ones are ignored); shapes must match.  Nothing is changed unless the
        whole mapping is valid.
        """
        if not (hasattr(mapping, "keys") and hasattr(mapping, "__getitem__")):
            raise TypeError(f"{type(self).__name__}.load_state_dict takes a mapping of names to "
                            f"arrays, got {type(mapping).__name__}")
        named = {name: (obj, attr) for name, obj, attr in self._named()}
        keys = set(mapping.keys())
        missing = sorted(set(named) - keys)
        unexpected = sorted(keys - set(named), key=repr)
        if strict and (missing or unexpected):
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        new = {}
        for name, (obj, attr) in named.items():
            if name not in mapping:
                continue
            cur = getattr(obj, attr)
            v = _weight_array(mapping[name], name)
            if v.dtype.kind not in "fiu":
                raise TypeError(f"{name}: expected a float array, got dtype {v.dtype}")
            if v.shape != cur.shape:
                raise ValueError(f"{name}: expected shape {cur.shape}, got {v.shape}")
            with np.errstate(over="ignore"):
                new[name] = np.array(v, dtype=cur.dtype, order="C", copy=True)
            if v.dtype.kind == "f" and np.isinf(new[name]).sum() != np.isinf(v).sum():
                raise ValueError(f"{name}: values beyond the range of {cur.dtype}")
        for name, v in new.items():
            obj, attr = named[name]
            setattr(obj, attr, v)
        return self


def _weight_array(value, name):
    """A state-dict value as a NumPy array; a torch tensor may require grad or be bfloat16,
    as the ones torch's own load_state_dict takes."""
    try:
        if hasattr(value, "detach") and hasattr(value, "cpu"):
            value = value.detach().cpu()
            if str(getattr(value, "dtype", "")) == "torch.bfloat16":
                value = value.float()           # exact: bfloat16 is float32's upper half
        return np.asarray(value)
    except ValueError as exc:  # ragged lists
        raise ValueError(f"{name}: not an array: {exc}") from None
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        raise TypeError(f"{name}: not an array: {exc}") from None


def _uniform(rng, shape, bound, dtype):
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


# ---- LayerNorm ------------------------------------------------------------------------------

class LayerNorm(_Block):
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""

    def __init__(self, normalized_shape, eps=1e-5, *, bias=True, dtype=np.float32):
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(f"normalized_shape must be one int, got {normalized_shape}")
            normalized_shape = normalized_shape[0]
        n = _check_int(normalized_shape, "normalized_shape", 1)
        self.dtype = _check_dtype(dtype)
        self.eps = _check_eps(eps, "eps")
        self.weight = np.ones(n, self.dtype)
        self.bias = np.zeros(n, self.dtype) if bias else None

    @property
    def normalized_shape(self):
        return (self.weight.shape[0],)

    def _own_params(self):
        return [("weight", "weight"), ("bias", "bias")]

    def _beta(self):
        return self.bias if self.bias is not None else np.zeros_like(self.weight)

    def __call__(self, x):
        a, unbatched = _input(x, "x", self.weight.shape[0], self.dtype)
        out = _layernorm(_rows(a), None, self).reshape(a.shape)
        return out[0] if unbatched else out

    @classmethod
    def from_torch(cls, module):
        _require(module, "LayerNorm")
        if len(module.normalized_shape) != 1 or not module.elementwise_affine:
            raise ValueError("only a LayerNorm over the last axis with elementwise_affine=True "
                             "is supported")
        ln = cls(module.normalized_shape[0], module.eps, bias=module.bias is not None,
                 dtype=_torch_dtype(module))
        return ln.load_state_dict(_torch_state(module))


# ---- MultiHeadAttention ---------------------------------------------------------------------

class MultiHeadAttention(_Block):
    """Multi-head attention with PyTorch's ``nn.MultiheadAttention`` weights.

    ``num_kv_heads`` < ``num_heads`` gives grouped-query attention (K/V projections of
    ``num_kv_heads * head_dim`` features).  With ``kdim == vdim == embed_dim`` the Q/K/V
    weights are one ``in_proj_weight`` (``(E + 2·Ekv, E)``), else ``q_proj_weight``,
    ``k_proj_weight`` and ``v_proj_weight``; the bias is ``in_proj_bias`` either way.

    ``__call__(query, key=None, value=None, *, mask=None, key_lengths=None, causal=False,
    return_weights=False)``: key defaults to query, value to key.  Self-attention (key and
    value omitted, or the query object itself) runs one fused QKV GEMM.  ``mask`` follows
    :func:`fastattn.attention` (bool True = attend, or additive float), broadcasting to
    ``(B, H, Lq, Lk)``; ``key_lengths`` (B,) counts the valid keys (padding on the right).
    ``causal=True`` hides key j from query i when j > i (top-left, like torch.nn's causal
    masks), for self- and cross-attention alike.  With ``return_weights=True`` returns
    ``(output, weights)``, weights ``(B, H, Lq, Lk)`` per head (PyTorch averages them over
    heads by default: ``weights.mean(1)``).
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
                 bias=True, dtype=np.float32, seed=None):
        E = _check_int(embed_dim, "embed_dim", 1)
        H = _check_int(num_heads, "num_heads", 1)
        Hkv = H if num_kv_heads is None else _check_int(num_kv_heads, "num_kv_heads", 1)
        if E % H:
            raise ValueError(f"embed_dim = {E} must be divisible by num_heads = {H}")
        if H % Hkv:
            raise ValueError(f"num_heads = {H} must be a multiple of num_kv_heads = {Hkv}")
        kdim = E if kdim is None else _check_int(kdim, "kdim", 1)
        vdim = E if vdim is None else _check_int(vdim, "vdim", 1)
        self.embed_dim, self.num_heads, self.num_kv_heads = E, H, Hkv
        self.head_dim = E // H
        self.kdim, self.vdim = kdim, vdim
        self.dtype = dt = _check_dtype(dtype)
        Ekv = Hkv * self.head_dim
        rng = np.random.default_rng(seed)
        self._same_dims = kdim == E and vdim == E
        self.in_proj_weight = self.q_proj_weight = self.k_proj_weight = None
        self.v_proj_weight = None
        if self._same_dims:
            self.in_proj_weight = _uniform(rng, (E + 2 * Ekv, E), np.sqrt(6 / (2 * E + 2 * Ekv)),
                                           dt)
        else:
            self.q_proj_weight = _uniform(rng, (E, E), np.sqrt(3 / E), dt)
            self.k_proj_weight = _uniform(rng, (Ekv, kdim), np.sqrt(6 / (Ekv + kdim)), dt)
            self.v_proj_weight = _uniform(rng, (Ekv, vdim), np.sqrt(6 / (Ekv + vdim)), dt)
        self.in_proj_bias = np.zeros(E + 2 * Ekv, dt) if bias else None
        self.out_proj_weight = _uniform(rng, (E, E), 1 / np.sqrt(E), dt)
        self.out_proj_bias = np.zeros(E, dt) if bias else None

    def _own_params(self):
        return [("in_proj_weight", "in_proj_weight"), ("q_proj_weight", "q_proj_weight"),
                ("k_proj_weight", "k_proj_weight"), ("v_proj_weight", "v_proj_weight"),
                ("in_proj_bias", "in_proj_bias"), ("out_proj.weight", "out_proj_weight"),
                ("out_proj.bias", "out_proj_bias")]

    @property
    def _ekv(self):
        return self.num_kv_heads * self.head_dim

    # weights as row slices of the fused arrays (views, so a pickle holds each weight once)
    def _w(self, part):
        E, Ekv = self.embed_dim, self._ekv
        if self._same_dims:
            W = self.in_proj_weight
            return {"q": W[:E], "kv": W[E:], "qkv": W, "k": W[E:E + Ekv], "v": W[E + Ekv:]}[part]
        return {"q": self.q_proj_weight, "k": self.k_proj_weight,
                "v": self.v_proj_weight}[part]

    def _b(self, part):
        b = self.in_proj_bias
        if b is None:
            return None
        E, Ekv = self.embed_dim, self._ekv
        return {"q": b[:E], "kv": b[E:], "qkv": b, "k": b[E:E + Ekv], "v": b[E + Ekv:]}[part]

    # -- the pieces the layers compose --
    def _qkv(self, x2):
        """Fused self-attention projection: (N, E) -> (N, E + 2·Ekv)."""
        return _linear(x2, self._w("qkv"), self._b("qkv"))

    def _kv(self, m2):
        """Fused K/V projection of a memory: (N, E) -> (N, 2·Ekv)."""
        return _linear(m2, self._w("kv"), self._b("kv"))

    def _heads(self, a, B, L, H):
        """(B·L, ≥H·D) row block (a view) -> (B, H, L, D) strided view."""
        D = self.head_dim
        return a.reshape(B, L, H, D).transpose(0, 2, 1, 3)

    def _attend(self, q, k, v, B, Lq, *, mask, key_lengths, causal, return_weights=False,
                query_offset=None):
        """q (B, H, Lq, D), k/v (B, Hkv, Lk, D) views -> (B·Lq, E) buffer [, weights].

        query_offset: absolute position of query row 0 for `causal` (attention's default,
        None, aligns the last query row with the last valid key)."""
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        ob = np.empty((B, Lq, self.num_heads, self.head_dim), self.dtype)     # (B, L, H, D)
        r = attention(q, k, v, mask=mask, key_lengths=key_lengths, causal=causal,
                      query_offset=query_offset if causal else None,
                      return_weights=return_weights, out=ob.transpose(0, 2, 1, 3))
        ob = ob.reshape(B * Lq, self.embed_dim)
        return (ob, r[1]) if return_weights else (ob, None)

    def _out(self, ob, out=None, accumulate=False):
        """Output projection of the (N, E) attention rows; accumulate: out += ..."""
        return _linear(ob, self.out_proj_weight, self.out_proj_bias, out=out,
                       accumulate=accumulate)

    def _self(self, x2, B, L, *, mask, key_lengths, causal, out=None, accumulate=False,
              return_weights=False):
        E, Ekv, H, Hkv = self.embed_dim, self._ekv, self.num_heads, self.num_kv_heads
        qkv = self._qkv(x2)                                               # (N, E + 2 Ekv)
        q = self._heads(qkv[:, :E], B, L, H)                              # (B, H, L, D)
        k = self._heads(qkv[:, E:E + Ekv], B, L, Hkv)                     # (B, Hkv, L, D)
        v = self._heads(qkv[:, E + Ekv:], B, L, Hkv)
        # one sequence: query i and key i are the same position, also when padded
        ob, w = self._attend(q, k, v, B, L, mask=mask, key_lengths=key_lengths, causal=causal,
                             return_weights=return_weights, query_offset=0)
        return self._out(ob, out, accumulate), w

    def _cross(self, x2, B, L, k, v, *, mask, key_lengths, causal=False, out=None,
               accumulate=False, return_weights=False):
        q = self._heads(_linear(x2, self._w("q"), self._b("q")), B, L, self.num_heads)
        # causal: key j for query i when j <= i (top-left, as torch.nn's causal masks), also
        # when the key is another array than the query
        ob, w = self._attend(q, k, v, B, L, mask=mask, key_lengths=key_lengths, causal=causal,
                             return_weights=return_weights, query_offset=0)
        return self._out(ob, out, accumulate), w

    def _memory_kv(self, key, value, B):
        """K/V heads (B, Hkv, S, D) of a memory, with a fused GEMM when key is value."""
        Ekv, Hkv = self._ekv, self.num_kv_heads
        S = key.shape[1]
        if value is key and self._same_dims:
            kv = self._kv(_rows(key))                                     # (B·S, 2 Ekv)
            return self._heads(kv[:, :Ekv], B, S, Hkv), self._heads(kv[:, Ekv:], B, S, Hkv)
        k = _linear(_rows(key), self._w("k"), self._b("k"))
        v = _linear(_rows(value), self._w("v"), self._b("v"))
        return self._heads(k, B, S, Hkv), self._heads(v, B, S, Hkv)

    @_guarded
    def __call__(self, query, key=None, value=None, *, mask=None, key_lengths=None,
                 causal=False, return_weights=False):
        E = self.embed_dim
        self_attn = (key is None or key is query) and (value is None or value is query)
        q, unbatched = _input(query, "query", E, self.dtype)
        B, L = q.shape[:2]
        if self_attn:
            if not self._same_dims:
                raise ValueError(f"self-attention needs kdim == vdim == embed_dim, got kdim "
                                 f"{self.kdim}, vdim {self.vdim}, embed_dim {E}")
            y, w = self._self(_rows(q), B, L, mask=mask, key_lengths=key_lengths, causal=causal,
                              return_weights=return_weights)
        else:
            if key is None:
                key = query
            if value is None:
                if self.vdim != self.kdim:
                    raise ValueError(f"value is required when vdim ({self.vdim}) differs from "
                                     f"kdim ({self.kdim})")
                value = key
            same = value is key
            k, kub = _input(key, "key", self.kdim, self.dtype)
            v = k if same and self.kdim == self.vdim else _input(value, "value", self.vdim,
                                                                  self.dtype)[0]
            if kub != unbatched or k.shape[0] != B or v.shape[:2] != k.shape[:2]:
                raise ValueError(f"query, key and value must have the same batch size and key "
                                 f"and value the same length: query {np.shape(query)}, key "
                                 f"{np.shape(key)}, value {np.shape(value)}")
            kh, vh = self._memory_kv(k, v, B)
            y, w = self._cross(_rows(q), B, L, kh, vh, mask=mask, key_lengths=key_lengths,
                               causal=causal, return_weights=return_weights)
        y = y.reshape(B, L, E)
        if unbatched:
            y = y[0]
            w = w[0] if w is not None else None
        return (y, w) if return_weights else y

    @classmethod
    def from_torch(cls, module):
        _require(module, "MultiheadAttention")
        _check_torch_mha(module, "module")
        m = cls(module.embed_dim, module.num_heads, kdim=module.kdim, vdim=module.vdim,
                bias=module.in_proj_bias is not None, dtype=_torch_dtype(module))
        return m.load_state_dict(_torch_state(module))


# ---- feed-forward layers --------------------------------------------------------------------

class _Layer(_Block):
    """What encoder and decoder layers share: sizes, the feed-forward pair, the norms."""

    def _init_common(self, d_model, num_heads, dim_feedforward, activation, norm_first,
                     layer_norm_eps, bias, dtype, rng):
        self.d_model = _check_int(d_model, "d_model", 1)
        self.num_heads = _check_int(num_heads, "num_heads", 1)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model = {self.d_model} must be divisible by num_heads = "
                             f"{self.num_heads}")
        F = self.dim_feedforward = _check_int(dim_feedforward, "dim_feedforward", 1)
        self.activation = _check_activation(activation)
        self.norm_first = bool(norm_first)
        self.layer_norm_eps = _check_eps(layer_norm_eps, "layer_norm_eps")
        self.dtype = dt = _check_dtype(dtype)
        E = self.d_model
        self.linear1_weight = _uniform(rng, (F, E), 1 / np.sqrt(E), dt)
        self.linear1_bias = _uniform(rng, (F,), 1 / np.sqrt(E), dt) if bias else None
        self.linear2_weight = _uniform(rng, (E, F), 1 / np.sqrt(F), dt)
        self.linear2_bias = _uniform(rng, (E,), 1 / np.sqrt(F), dt) if bias else None

    def _ff_params(self):
        return [("linear1.weight", "linear1_weight"), ("linear1.bias", "linear1_bias"),
                ("linear2.weight", "linear2_weight"), ("linear2.bias", "linear2_bias")]

    def _ff(self, x2, out=None, accumulate=False):
        """linear2(act(linear1(x))) on (N, E) rows; accumulate: out += ..."""
        h = _linear(x2, self.linear1_weight, self.linear1_bias, act=self.activation)  # (N, F)
        return _linear(h, self.linear2_weight, self.linear2_bias, out=out,
                       accumulate=accumulate)

    @classmethod
    def _from_torch_layer(cls, module, torch_name):
        _require(module, torch_name)
        import torch.nn as nn
        kw = cls._torch_kwargs(module)
        for name, child in module.named_children():   # self_attn, multihead_attn
            if isinstance(child, nn.MultiheadAttention):
                _check_torch_mha(child, name, kw["num_heads"], kw["d_model"])
        layer = cls(**kw)
        for name, child in layer._children():       # each norm keeps its own eps
            if isinstance(child, LayerNorm):
                child.eps = _check_eps(getattr(module, name).eps, f"{name}.eps")
        return layer.load_state_dict(_torch_state(module))

    @staticmethod
    def _torch_kwargs(module):
        return dict(d_model=module.self_attn.embed_dim, num_heads=module.self_attn.num_heads,
                    dim_feedforward=module.linear1.out_features,
                    activation=_torch_activation(module.activation),
                    norm_first=module.norm_first, layer_norm_eps=module.norm1.eps,
                    bias=module.linear1.bias is not None, dtype=_torch_dtype(module))


class EncoderLayer(_Layer):
    """``torch.nn.TransformerEncoderLayer`` on fastattn (post-norm, or ``norm_first``)."""

    def __init__(self, d_model, num_heads, dim_feedforward=2048, *, activation="relu",
                 norm_first=False, layer_norm_eps=1e-5, bias=True, dtype=np.float32, seed=None):
        rng = np.random.default_rng(seed)
        self._init_common(d_model, num_heads, dim_feedforward, activation, norm_first,
                          layer_norm_eps, bias, dtype, rng)
        E, dt = self.d_model, self.dtype
        self.self_attn = MultiHeadAttention(E, self.num_heads, bias=bias, dtype=dt,
                                            seed=rng.integers(2**63))
        self.norm1 = LayerNorm(E, layer_norm_eps, bias=bias, dtype=dt)
        self.norm2 = LayerNorm(E, layer_norm_eps, bias=bias, dtype=dt)

    def _own_params(self):
        return self._ff_params()

    def _children(self):
        return [("self_attn", self.self_attn), ("norm1", self.norm1), ("norm2", self.norm2)]

    def _forward(self, x2, B, L, mask, key_lengths, causal, owned=False):
        """(N, E) rows -> a new (N, E) array (x2 itself, overwritten, when `owned`)."""
        sa = dict(mask=mask, key_lengths=key_lengths, causal=causal)
        if self.norm_first:
            n = _layernorm(x2, None, self.norm1)                          # n = norm1(x)
            h = x2 if owned else x2.copy()
            self.self_attn._self(n, B, L, out=h, accumulate=True, **sa)   # h = x + sa(n)
            _layernorm(h, None, self.norm2, norm_out=n)                   # n = norm2(h)
            return self._ff(n, out=h, accumulate=True)                    # h = h + ff(n)
        y, _ = self.self_attn._self(x2, B, L, **sa)
        h = _layernorm(x2, y, self.norm1, norm_out=y)                     # h = norm1(x + sa(x))
        y = self._ff(h)
        return _layernorm(h, y, self.norm2, norm_out=y)                   # norm2(h + ff(h))

    @_guarded
    def __call__(self, x, *, mask=None, key_lengths=None, causal=False):
        a, unbatched = _input(x, "x", self.d_model, self.dtype)
        B, L, E = a.shape
        y = self._forward(_rows(a), B, L, mask, key_lengths, causal).reshape(B, L, E)
        return y[0] if unbatched else y

    @classmethod
    def from_torch(cls, module):
        return cls._from_torch_layer(module, "TransformerEncoderLayer")


class DecoderLayer(_Layer):
    """``torch.nn.TransformerDecoderLayer`` on fastattn (post-norm, or ``norm_first``).

    ``__call__(x, memory, *, causal=True, mask=None, key_lengths=None, memory_mask=None,
    memory_key_lengths=None, cache=None)``; with a cache from :meth:`new_cache`, ``x`` holds
    the next ``t >= 1`` positions and ``memory`` may be None (its K/V are in the cache).
    """

    def __init__(self, d_model, num_heads, dim_feedforward=2048, *, activation="relu",
                 norm_first=False, layer_norm_eps=1e-5, bias=True, dtype=np.float32, seed=None):
        rng = np.random.default_rng(seed)
        self._init_common(d_model, num_heads, dim_feedforward, activation, norm_first,
                          layer_norm_eps, bias, dtype, rng)
        E, H, dt = self.d_model, self.num_heads, self.dtype
        self.self_attn = MultiHeadAttention(E, H, bias=bias, dtype=dt, seed=rng.integers(2**63))
        self.multihead_attn = MultiHeadAttention(E, H, bias=bias, dtype=dt,
                                                 seed=rng.integers(2**63))
        self.norm1 = LayerNorm(E, layer_norm_eps, bias=bias, dtype=dt)
        self.norm2 = LayerNorm(E, layer_norm_eps, bias=bias, dtype=dt)
        self.norm3 = LayerNorm(E, layer_norm_eps, bias=bias, dtype=dt)

    def _own_params(self):
        return self._ff_params()

    def _children(self):
        return [("self_attn", self.self_attn), ("multihead_attn", self.multihead_attn),
                ("norm1", self.norm1), ("norm2", self.norm2), ("norm3", self.norm3)]

    # -- cache of one layer: cross K/V of the memory, self K/V buffers --
    def _layer_cache(self, mem, max_length):
        ca = self.multihead_attn
        B, S, _ = mem.shape
        Hkv, D = self.self_attn.num_kv_heads, self.self_attn.head_dim
        kv = ca._kv(_rows(mem))                                           # (B·S, 2 Ekv)
        Ekv, Hkc = ca._ekv, ca.num_kv_heads
        # head-major copies (B, Hkv, S, D): every decoding step reads each head's keys and
        # values as one contiguous block (in the (B·S, 2 Ekv) rows they sit 2 Ekv apart)
        mk = np.ascontiguousarray(ca._heads(kv[:, :Ekv], B, S, Hkc))
        mv = np.ascontiguousarray(ca._heads(kv[:, Ekv:], B, S, Hkc))
        shape = (B, Hkv, max_length, D)
        # zeros, not empty: a pickled or copied cache holds no stale memory (calloc'd pages
        # cost nothing until a step writes them)
        return {"mk": mk, "mv": mv, "k": np.zeros(shape, self.dtype),
                "v": np.zeros(shape, self.dtype)}

    def _self_cached(self, x2, B, t, lc, pos, *, mask, causal, out=None, accumulate=False):
        """Self-attention of t new positions against the cache's first pos + t positions."""
        sa = self.self_attn
        E, Ekv, H, Hkv = sa.embed_dim, sa._ekv, sa.num_heads, sa.num_kv_heads
        qkv = sa._qkv(x2)                                                 # (B·t, E + 2 Ekv)
        lc["k"][:, :, pos:pos + t] = sa._heads(qkv[:, E:E + Ekv], B, t, Hkv)
        lc["v"][:, :, pos:pos + t] = sa._heads(qkv[:, E + Ekv:], B, t, Hkv)
        q = sa._heads(qkv[:, :E], B, t, H)                                # (B, H, t, D)
        k = lc["k"][:, :, :pos + t]                                       # (B, Hkv, pos+t, D)
        v = lc["v"][:, :, :pos + t]
        # new row i sits at absolute position pos + i (bottom-right alignment)
        ob, _ = sa._attend(q, k, v, B, t, mask=mask, key_lengths=None, causal=causal,
                           query_offset=pos)
        return sa._out(ob, out, accumulate)

    def _forward(self, x2, B, L, mem, mask, key_lengths, causal, memory_mask,
                 memory_key_lengths, lc=None, pos=0, owned=False):
        """(N, E) rows -> a new (N, E) array (x2 itself, overwritten, when `owned`).
        `mem` is the (B, S, E) memory, or None with a layer cache `lc`."""
        ca = self.multihead_attn
        if lc is not None:
            mk, mv = lc["mk"], lc["mv"]                                   # (B, Hkv, S, D)

            def self_attn(x, **kw):
                return self._self_cached(x, B, L, lc, pos, mask=mask, causal=causal, **kw)
        else:
            mk, mv = ca._memory_kv(mem, mem, B)

            def self_attn(x, **kw):
                return self.self_attn._self(x, B, L, mask=mask, key_lengths=key_lengths,
                                            causal=causal, **kw)[0]

        def cross_attn(x, **kw):
            with _arg_names(mask="memory_mask", key_lengths="memory_key_lengths"):
                return ca._cross(x, B, L, mk, mv, mask=memory_mask,
                                 key_lengths=memory_key_lengths, **kw)[0]

        if self.norm_first:
            n = _layernorm(x2, None, self.norm1)                          # n = norm1(x)
            h = x2 if owned else x2.copy()
            self_attn(n, out=h, accumulate=True)                          # h = x + sa(n)
            _layernorm(h, None, self.norm2, norm_out=n)
            cross_attn(n, out=h, accumulate=True)                         # h = h + ca(norm2(h))
            _layernorm(h, None, self.norm3, norm_out=n)
            return self._ff(n, out=h, accumulate=True)                    # h = h + ff(norm3(h))
        y = self_attn(x2)
        h = _layernorm(x2, y, self.norm1, norm_out=y)                     # h = norm1(x + sa(x))
        y = cross_attn(h)
        h = _layernorm(h, y, self.norm2, norm_out=y)                      # norm2(h + ca(h))
        y = self._ff(h)
        return _layernorm(h, y, self.norm3, norm_out=y)                   # norm3(h + ff(h))

    @_guarded
    def new_cache(self, memory, max_length, *, memory_key_lengths=None):
        """A cache for incremental decoding through this layer (see Decoder.new_cache)."""
        return DecoderCache._make([self], memory, max_length, memory_key_lengths)

    def __call__(self, x, memory=None, *, causal=True, mask=None, key_lengths=None,
                 memory_mask=None, memory_key_lengths=None, cache=None):
        return _decode([self], None, x, memory, causal, mask, key_lengths, memory_mask,
                       memory_key_lengths, cache)

    @classmethod
    def from_torch(cls, module):
        return cls._from_torch_layer(module, "TransformerDecoderLayer")


# ---- stacks ---------------------------------------------------------------------------------

def _check_stack(layers, norm, cls, name):
    layers = list(layers)
    if not all(isinstance(lyr, cls) for lyr in layers):
        raise TypeError(f"{name} takes a list of {cls.__name__}")
    if not layers:              # as Transformer(num_encoder_layers=0): the same limit, one error
        raise ValueError(f"{name} needs at least one {cls.__name__}, got none")
    E, dt = layers[0].d_model, layers[0].dtype
    if any(lyr.d_model != E or lyr.dtype != dt for lyr in layers):
        raise ValueError(f"the layers of a {name} must share d_model and dtype")
    if norm is not None and (not isinstance(norm, LayerNorm) or norm.normalized_shape != (E,)
                             or norm.dtype != dt):
        raise ValueError(f"norm must be a LayerNorm({E}) of dtype {dt}, or None")
    return layers


class _Stack(_Block):
    """Layers of one type applied in turn, then an optional final LayerNorm."""
    _layer = None                   # the layer class, set by each stack

    def __init__(self, layers, norm=None):
        self.layers = _check_stack(layers, norm, self._layer, type(self).__name__)
        self.norm = norm

    @property
    def d_model(self):
        return self.layers[0].d_model

    @property
    def dtype(self):
        return self.layers[0].dtype

    def _children(self):
        kids = [(f"layers.{i}", lyr) for i, lyr in enumerate(self.layers)]
        return kids + ([("norm", self.norm)] if self.norm is not None else [])

    @classmethod
    def from_torch(cls, module):
        _require(module, "Transformer" + cls.__name__)
        layers = [cls._layer.from_torch(lyr) for lyr in module.layers]
        norm = LayerNorm.from_torch(module.norm) if module.norm is not None else None
        return cls(layers, norm)


class Encoder(_Stack):
    """A stack of EncoderLayer, then an optional final LayerNorm (``torch.nn.TransformerEncoder``).

    ``__call__(x, *, mask=None, key_lengths=None, causal=False)``.
    """

    _layer = EncoderLayer

    @_guarded
    def __call__(self, x, *, mask=None, key_lengths=None, causal=False):
        a, unbatched = _input(x, "x", self.d_model, self.dtype)
        B, L, E = a.shape
        h = _rows(a)
        for i, layer in enumerate(self.layers):
            h = layer._forward(h, B, L, mask, key_lengths, causal, owned=i > 0)
        if self.norm is not None:
            h = _layernorm(h, None, self.norm, norm_out=h)
        h = h.reshape(B, L, E)
        return h[0] if unbatched else h



class DecoderCache:
    """Incremental-decoding state of a decoder: per layer, the cross-attention K/V of the
    memory (computed once) and preallocated self-attention K/V buffers of ``max_length``.

    ``length`` (read-only): positions filled so far; ``max_length``; ``batch_size``.  Made by
    ``Decoder.new_cache`` / ``Transformer.new_cache`` / ``DecoderLayer.new_cache``, and used
    only with that decoder as it was then (another decoder, or the same one after
    ``load_state_dict`` or any attribute set since, raises ``ValueError``; arrays changed in
    place are not detected).  Steps from several threads on one cache run one at a time.
    ``copy.copy(cache)`` gives an independent cache (own self-attention buffers, the memory's
    read-only K/V shared), as a beam search that forks a hypothesis needs.
    """

    __slots__ = ("_length", "_max_length", "batch_size", "memory_length",
                 "memory_key_lengths", "unbatched", "_layers", "_memory", "_tokens", "_lock",
                 "__weakref__")

    @classmethod
    def _make(cls, layers, memory, max_length, memory_key_lengths):
        E, dt = layers[0].d_model, layers[0].dtype
        mem, unbatched = _input(memory, "memory", E, dt)
        c = cls()
        c._max_length = _check_int(max_length, "max_length", 0)
        if c._max_length > MAX_CACHE_LENGTH:
            raise ValueError(f"max_length must be <= 2**31 - 1, got {c._max_length}")
        c._length = 0
        c.batch_size, c.memory_length = mem.shape[:2]
        c.unbatched = unbatched
        lengths = _lengths(memory_key_lengths, "memory_key_lengths", c.batch_size,
                           c.memory_length)
        c.memory_key_lengths = None if lengths is None else lengths.copy()
        c._layers = [lyr._layer_cache(mem, c._max_length) for lyr in layers]
        c._memory = mem.copy()            # private: a call given a memory is checked against it
        c._tokens = _weight_tokens(layers)
        c._new_lock()
        return c

    def _new_lock(self):
        """One step at a time: a step reads, then sets, length.  A forked child gets new locks
        (a step another thread was taking at the fork would hold the copied one for ever)."""
        self._lock = threading.Lock()
        _CACHES.add(self)

    @property
    def length(self):
        """Positions decoded so far."""
        return self._length

    @property
    def max_length(self):
        return self._max_length

    def _check(self, layers):
        """Raise unless this cache was made by `layers`, with their current weights."""
        if self._tokens == _weight_tokens(layers):
            return
        if len(self._layers) != len(layers) or not all(
                lc["k"].shape[1] == lyr.self_attn.num_kv_heads and
                lc["k"].shape[3] == lyr.self_attn.head_dim and lc["k"].dtype == lyr.dtype and
                lc["mk"].shape[1] == lyr.multihead_attn.num_kv_heads and
                lc["mk"].shape[3] == lyr.multihead_attn.head_dim
                for lc, lyr in zip(self._layers, layers)):
            raise ValueError(f"{self!r} was made for a decoder of another shape")
        raise ValueError(f"{self!r} was made by another decoder, or before this decoder's "
                         f"weights were replaced (its keys and values come from the weights "
                         f"it was made with): make a new cache")

    def reset(self):
        """Forget the decoded positions (the memory's K/V are kept)."""
        with self._lock:
            self._length = 0

    def __repr__(self):
        return (f"DecoderCache(length={self.length}, max_length={self.max_length}, "
                f"batch_size={self.batch_size}, memory_length={self.memory_length}, "
                f"layers={len(self._layers)})")

    def __copy__(self):
        c = DecoderCache.__new__(DecoderCache)
        c.__setstate__(self.__getstate__())
        # decoding writes the self-attention buffers: a copy that shared them would overwrite
        # the original's positions (the memory's K/V are only read)
        c._layers = [dict(lc, k=lc["k"].copy(), v=lc["v"].copy()) for lc in self._layers]
        return c

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("_lock", "__weakref__")}

    def __setstate__(self, state):
        state = {"_tokens": None, **state}          # a cache pickled before the tokens ...
        for k, v in state.items():
            setattr(self, "_" + k if k in ("length", "max_length") else k, v)   # ... and names
        self._new_lock()


_CACHES = weakref.WeakSet()


def _new_cache_locks_in_child():
    for cache in list(_CACHES):
        cache._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_cache_locks_in_child)


def _weight_tokens(layers):
    """The weights' identity, one token per block: a block gets a new one whenever any of
    its attributes is set (a weight, eps, the activation; changes in place are not seen)."""
    tokens, todo = [], list(layers)
    while todo:
        b = todo.pop()
        # a block unpickled from before the tokens gets one: it fits no earlier cache
        tokens.append(b.__dict__.setdefault("_weights_token", os.urandom(16)))
        todo.extend(child for _, child in b._children())
    return tuple(tokens)


def _lengths(x, name, B, limit):
    if x is None:
        return None
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    if a.ndim > 1 or (a.ndim == 1 and a.shape[0] not in (1, B)):
        raise ValueError(f"{name} must be an int or a ({B},) array, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > limit):
        raise ValueError(f"{name} must lie in [0, {limit}], got {a}")
    return a


def _same_memory(memory, kept, E, dt):
    """Whether `memory` holds the values of the cache's memory (`kept`, (B, S, E))."""
    m, _ = _input(memory, "memory", E, dt)
    return m.shape == kept.shape and bool(np.array_equal(m, kept, equal_nan=True))


@_guarded
def _decode(layers, norm, x, memory, causal, mask, key_lengths, memory_mask,
            memory_key_lengths, cache):
    """Run decoder layers (+ final norm) on x, with or without a cache."""
    args = (layers, norm, x, memory, causal, mask, key_lengths, memory_mask,
            memory_key_lengths, cache)
    if cache is None:
        return _decode_steps(*args)
    if not isinstance(cache, DecoderCache):
        raise TypeError(f"cache must be a DecoderCache, got {type(cache).__name__}")
    with cache._lock:           # another thread's step on this cache waits for this one
        return _decode_steps(*args)


def _decode_steps(layers, norm, x, memory, causal, mask, key_lengths, memory_mask,
                  memory_key_lengths, cache):
    E, dt = layers[0].d_model, layers[0].dtype
    a, unbatched = _input(x, "x", E, dt)
    B, L, _ = a.shape
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    mem = None
    if cache is None:
        if memory is None:
            raise ValueError("memory is required without a cache")
        mem, mub = _input(memory, "memory", E, dt)
        if mub != unbatched or mem.shape[0] != B:
            raise ValueError(f"x and memory must have the same batch size: x {np.shape(x)}, "
                             f"memory {np.shape(memory)}")
        pos = 0
    else:
        cache._check(layers)
        if key_lengths is not None:
            raise ValueError("key_lengths cannot be used with a cache (decoded positions are "
                             "never padding); use memory_key_lengths for the memory")
        if unbatched != cache.unbatched or B != cache.batch_size:
            raise ValueError(f"x {np.shape(x)} does not match the cache's batch size "
                             f"{cache.batch_size}" + (" (unbatched)" if cache.unbatched else ""))
        if L < 1:
            raise ValueError("x must hold at least one new position")
        if cache._length + L > cache._max_length:
            raise ValueError(f"the cache holds {cache._length} of max_length = "
                             f"{cache._max_length} positions: {L} more do not fit")
        if memory is not None and not _same_memory(memory, cache._memory, E, dt):
            raise ValueError("memory differs from the memory the cache was made from (its "
                             "keys and values are in the cache; pass memory=None, or make a new "
                             "cache)")
        pos = cache._length
        if memory_key_lengths is None:
            memory_key_lengths = cache.memory_key_lengths
    h = _rows(a)
    for i, layer in enumerate(layers):
        lc = cache._layers[i] if cache is not None else None
        h = layer._forward(h, B, L, mem, mask, key_lengths, causal, memory_mask,
                           memory_key_lengths, lc=lc, pos=pos, owned=i > 0)
    if norm is not None:
        h = _layernorm(h, None, norm, norm_out=h)
    if cache is not None:
        cache._length = pos + L
    h = h.reshape(B, L, E)
    return h[0] if unbatched else h


class Decoder(_Stack):
    """A stack of DecoderLayer, then an optional final LayerNorm (``torch.nn.TransformerDecoder``).

    ``__call__(x, memory=None, *, causal=True, mask=None, key_lengths=None, memory_mask=None,
    memory_key_lengths=None, cache=None)``.  Incremental decoding::

        cache = decoder.new_cache(memory, max_length)
        y = decoder(x_new, cache=cache)      # x_new (B, t, E): the next t positions
    """

    _layer = DecoderLayer

    @_guarded
    def new_cache(self, memory, max_length, *, memory_key_lengths=None):
        """Cross-attention K/V of `memory` for every layer, and self-attention K/V buffers
        for up to `max_length` decoded positions.  Returns a DecoderCache."""
        return DecoderCache._make(self.layers, memory, max_length, memory_key_lengths)

    def __call__(self, x, memory=None, *, causal=True, mask=None, key_lengths=None,
                 memory_mask=None, memory_key_lengths=None, cache=None):
        return _decode(self.layers, self.norm, x, memory, causal, mask, key_lengths,
                       memory_mask, memory_key_lengths, cache)



class Transformer(_Block):
    """Encoder-decoder ``torch.nn.Transformer`` on fastattn (final norms on both stacks).

    ``encode(src, *, key_lengths=None, mask=None)`` -> memory;
    ``decode(tgt, memory, *, memory_key_lengths=None, key_lengths=None, cache=None)``
    (causal); ``__call__(src, tgt, *, src_key_lengths=None, tgt_key_lengths=None)``;
    ``new_cache(memory, max_length, *, memory_key_lengths=None)``.
    """

    def __init__(self, d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, *, activation="relu", norm_first=False,
                 layer_norm_eps=1e-5, bias=True, dtype=np.float32, seed=None):
        ne = _check_int(num_encoder_layers, "num_encoder_layers", 1)
        nd = _check_int(num_decoder_layers, "num_decoder_layers", 1)
        seeds = np.random.SeedSequence(seed).spawn(ne + nd)
        kw = dict(activation=activation, norm_first=norm_first, layer_norm_eps=layer_norm_eps,
                  bias=bias, dtype=dtype)
        self.encoder = Encoder(
            [EncoderLayer(d_model, num_heads, dim_feedforward, seed=s, **kw) for s in seeds[:ne]],
            LayerNorm(d_model, layer_norm_eps, bias=bias, dtype=dtype))
        self.decoder = Decoder(
            [DecoderLayer(d_model, num_heads, dim_feedforward, seed=s, **kw) for s in seeds[ne:]],
            LayerNorm(d_model, layer_norm_eps, bias=bias, dtype=dtype))

    @property
    def d_model(self):
        return self.encoder.d_model

    @property
    def dtype(self):
        return self.encoder.dtype

    def _children(self):
        return [("encoder", self.encoder), ("decoder", self.decoder)]

    def encode(self, src, *, key_lengths=None, mask=None):
        return self.encoder(src, mask=mask, key_lengths=key_lengths)

    def decode(self, tgt, memory=None, *, memory_key_lengths=None, key_lengths=None, cache=None,
               mask=None, memory_mask=None):
        return self.decoder(tgt, memory, causal=True, mask=mask, key_lengths=key_lengths,
                            memory_mask=memory_mask, memory_key_lengths=memory_key_lengths,
                            cache=cache)

    @_guarded
    def new_cache(self, memory, max_length, *, memory_key_lengths=None):
        return self.decoder.new_cache(memory, max_length, memory_key_lengths=memory_key_lengths)

    def __call__(self, src, tgt, *, src_key_lengths=None, tgt_key_lengths=None):
        with _arg_names(x="src", key_lengths="src_key_lengths"):
            memory = self.encode(src, key_lengths=src_key_lengths)
        with _arg_names(x="tgt", memory_key_lengths="src_key_lengths",
                        key_lengths="tgt_key_lengths"):
            return self.decode(tgt, memory, memory_key_lengths=src_key_lengths,
                               key_lengths=tgt_key_lengths)

    @classmethod
    def from_torch(cls, module):
        _require(module, "Transformer")
        if not (isinstance(module.encoder, __import__("torch").nn.TransformerEncoder) and
                isinstance(module.decoder, __import__("torch").nn.TransformerDecoder)):
            raise TypeError("custom encoder/decoder modules are not supported")
        t = cls.__new__(cls)
        t.encoder = Encoder.from_torch(module.encoder)
        t.decoder = Decoder.from_torch(module.decoder)
        return t
