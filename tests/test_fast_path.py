"""The plain-call fast path of attention() against the general path it short-cuts."""
import numpy as np
import pytest

import fastattn
from fastattn import _attention


def _qkv(rng, B, H, Hkv, Lq, Lk, D, Dv, dtype):
    return (rng.standard_normal((B, H, Lq, D)).astype(dtype),
            rng.standard_normal((B, Hkv, Lk, D)).astype(dtype),
            rng.standard_normal((B, Hkv, Lk, Dv)).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(1, 1, 1, 1, 1, 64, 64), (2, 4, 2, 33, 47, 16, 8),
                                  (1, 8, 8, 300, 300, 64, 64), (3, 6, 2, 1, 700, 32, 32)])
def test_fast_path_equals_general_path(dims, causal, dtype):
    """fast path: a plain call takes it and equals the general path bitwise."""
    q, k, v = _qkv(np.random.default_rng(0), *dims, dtype)
    assert _attention._attention_plain(q, k, v, causal) is not None
    fast = fastattn.attention(q, k, v, causal=causal)
    fast1 = fastattn.attention(q, k, v, causal=causal, num_threads=1)
    # any other option (here an explicit default scale) sends the call down the general path
    general = fastattn.attention(q, k, v, causal=causal, scale=1 / np.sqrt(dims[5]))
    assert fast.dtype == dtype and np.array_equal(fast, general) and np.array_equal(fast1, general)


def test_fast_path_declines_what_it_does_not_check():
    """fast path: anything but the plain case is left to the general path, which still works
    (and owns the errors)."""
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 2, 4, 2, 5, 7, 8, 8, np.float32)
    plain = _attention._attention_plain
    declined = [
        (q[0], k[0], v[0]),                                   # 3-D
        (q, k.astype(np.float64), v),                         # mixed dtypes
        (q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)),
        (q, np.asfortranarray(k), v),                         # K not C-contiguous
        (q, k, v[..., ::-1]),                                 # V not C-contiguous
        (q, k[:, :, :0], v[:, :, :0]),                        # Lk = 0
        (q, k[:1], v[:1]),                                    # broadcast batch
        (q.astype(">f4"), k, v),                              # byte-swapped
        (q.tolist(), k, v),                                   # not an ndarray
    ]
    for args in declined:
        assert plain(*args, False) is None
        out = fastattn.attention(*args)
        ref = fastattn.reference_attention(*args)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="feature size D"):
        fastattn.attention(q, k[..., :4], v)                  # the general path's error
