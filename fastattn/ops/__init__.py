"""The functional API: input checks, backend choice, autograd and fake kernels."""

from fastattn.ops import _registry  # noqa: F401  (defines the fastattn::* schemas first)
from fastattn.ops.attention import attention, scaled_dot_product_attention
from fastattn.ops.backends import BackendStatus, backends, use_backend

__all__ = ["BackendStatus", "attention", "backends", "scaled_dot_product_attention", "use_backend"]
