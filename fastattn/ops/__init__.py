"""The functional API: input checks, backend choice, autograd and fake kernels.

Submodules: ``attention`` (scaled_dot_product_attention, attention), ``backends`` (status,
forcing, choice), ``errors`` (the exceptions raised for bad input), ``linear`` (F.linear on
fastattn's own CPU GEMM where it wins), ``packed_attention`` (varlen, KV cache), ``reference``
(plain PyTorch oracle), ``lstm``, ``torchscript`` (the fused call of the modules under
torch.jit.script). The package ``fastattn`` re-exports the public
functions; here the names stay the modules'.
"""

from fastattn.ops import (
    _registry,  # noqa: F401  (defines the fastattn::* schemas first)
    attention,
    backends,
    errors,
    linear,
    packed_attention,
    reference,
)

__all__ = ["attention", "backends", "errors", "linear", "packed_attention", "reference"]
