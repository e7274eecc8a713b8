"""The functional API: input checks, backend choice, autograd and fake kernels.

``fastattn.ops.backends`` is the backend-choice module; the package-level
``fastattn.backends()`` is its status function.
"""

from fastattn.ops import _registry  # noqa: F401  (defines the fastattn::* schemas first)
from fastattn.ops.attention import attention, scaled_dot_product_attention

__all__ = ["attention", "scaled_dot_product_attention"]
