"""Head splitting as views: (*batch, L, H*D) <-> (*batch, H, L, D)."""
import numpy as np

__all__ = ["split_heads", "merge_heads"]


def split_heads(x, num_heads):
    """(*batch, L, H*D) -> (*batch, H, L, D), a view of x (no copy where x's last axis is
    contiguous with its heads, as a projection's output is)."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (L, H*D), got shape {x.shape}")
    if isinstance(num_heads, (bool, np.bool_)) or not isinstance(num_heads, (int, np.integer)):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1 or x.shape[-1] % num_heads:
        raise ValueError(f"num_heads = {num_heads} must be >= 1 and divide the last axis of "
                         f"x, shape {x.shape}")
    *batch, L, E = x.shape
    return np.swapaxes(x.reshape(*batch, L, num_heads, E // num_heads), -2, -3)


def merge_heads(x):
    """(*batch, H, L, D) -> (*batch, L, H*D); a view where the layout allows, else a copy."""
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"x must have at least 3 dimensions (H, L, D), got shape {x.shape}")
    *batch, H, L, D = x.shape
    return np.swapaxes(x, -2, -3).reshape(*batch, L, H * D)
