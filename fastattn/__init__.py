"""fastattn: fused scaled-dot-product attention and LSTM kernels for PyTorch.

Drop-in replacements for ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``,
``nn.LSTMCell`` and ``nn.LSTM``, served by C++ (CPU), CUDA C++ and Triton kernels, with a
plain-PyTorch reference backend that always works.
"""

from fastattn import _extension  # noqa: F401  (loads fastattn._C, registering the C++ ops)
from fastattn.nn import LSTM, LSTMCell, MultiheadAttention, convert
from fastattn.ops.attention import attention, scaled_dot_product_attention
from fastattn.ops.backends import BackendStatus, backends, use_backend
from fastattn.ops.errors import FastattnTypeError, FastattnValueError
from fastattn.ops.lstm import lstm_cell
from fastattn.ops.packed_attention import attention_varlen, attention_with_kv_cache

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "FastattnTypeError",
    "FastattnValueError",
    "LSTM",
    "LSTMCell",
    "MultiheadAttention",
    "__version__",
    "attention",
    "attention_varlen",
    "attention_with_kv_cache",
    "backends",
    "convert",
    "lstm_cell",
    "scaled_dot_product_attention",
    "use_backend",
]
