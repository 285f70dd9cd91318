"""fastattn: fast CPU scaled dot-product attention for NumPy.

The kernel is Cython over BLAS tiles (``scipy.linalg.cython_blas``) with an online softmax,
OpenMP threads and the GIL released.  See ``fastattn.attention``.
"""
from ._attention import attention
from ._heads import merge_heads, split_heads
from ._reference import reference_attention
from ._threads import get_num_threads, set_num_threads
from ._config import show_config
from ._blocks import (Decoder, DecoderCache, DecoderLayer, Encoder, EncoderLayer, LayerNorm,
                      MultiHeadAttention, Transformer, linear)

__version__ = "0.1.0"

__all__ = ["attention", "reference_attention", "split_heads", "merge_heads",
           "get_num_threads", "set_num_threads", "show_config", "__version__",
           "MultiHeadAttention", "EncoderLayer", "DecoderLayer", "Encoder", "Decoder",
           "Transformer", "LayerNorm", "DecoderCache", "linear"]
