"""The functional API: input checks, backend choice, autograd and fake kernels."""

from fastattn.ops import _registry  # noqa: F401  (defines the fastattn::* schemas first)
from fastattn.ops.backends import BackendStatus, backends, use_backend

__all__ = ["BackendStatus", "backends", "use_backend"]
