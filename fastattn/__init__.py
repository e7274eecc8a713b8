"""fastattn: fused scaled-dot-product attention and LSTM kernels for PyTorch.

Drop-in replacements for ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``,
``nn.LSTMCell`` and ``nn.LSTM``, served by C++ (CPU), CUDA C++ and Triton kernels, with a
plain-PyTorch reference backend that always works.
"""

from fastattn import _extension  # noqa: F401  (loads fastattn._C, registering the C++ ops)
from fastattn.ops.attention import attention, scaled_dot_product_attention
from fastattn.ops.packed_attention import attention_varlen, attention_with_kv_cache
from fastattn.ops.backends import BackendStatus, backends, use_backend

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "__version__",
    "attention",
    "attention_varlen",
    "attention_with_kv_cache",
    "backends",
    "scaled_dot_product_attention",
    "use_backend",
]
