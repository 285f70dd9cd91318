import numpy as np

import fastattn


def test_matches_reference_small():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 33, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 47, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 47, 8)).astype(np.float32)
    for kw in ({}, {"causal": True}, {"window": (5, 2)}):
        out = fastattn.attention(q, k, v, **kw)
        ref = fastattn.reference_attention(q, k, v, **kw)
        assert out.shape == (2, 4, 33, 8)
        np.testing.assert_allclose(out, ref, atol=2e-6)
