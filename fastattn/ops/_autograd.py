"""The backward formulas registered for the fastattn ops are first-order only.

A registered backward calls the *_bwd ops, which have no autograd of their own: differentiated
again (double backward: torch.autograd.grad(..., create_graph=True), gradgradcheck, a gradient
penalty), it would silently drop the second-order terms. ``first_order_only`` makes that a
RuntimeError instead, raised when the gradients are differentiated, not when they are computed
(so create_graph=True alone still works).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def _builds_graph(ctx, grads: tuple) -> bool:
    """Whether autograd records this backward: create_graph=True (grad mode on inside a backward)
    and a gradient or a saved input that requires grad."""
    if not torch.is_grad_enabled():
        return False
    tensors = (*grads, *ctx.saved_tensors)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def first_order_only(op: str) -> Callable:
    """Decorator of a ``torch.library.register_autograd`` backward of the op named ``op``.

    The backward runs without recording a graph; when autograd would have recorded one, its
    gradients come back attached to a node that raises "double backward ... is not supported"
    if differentiated.
    """
    message = (
        f"fastattn: double backward (differentiating the gradients of {op}) is not supported; "
        "for second derivatives run the call on the reference backend "
        "(with fastattn.use_backend('reference'): ...)"
    )

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            builds_graph = _builds_graph(ctx, grads)
            with torch.no_grad():
                results = backward(ctx, *grads)
            if not builds_graph:
                return results
            raise_on_backward = torch._C._functions.DelayedError(message, len(results))

            def differentiable_alias(t):  # DelayedError records a node only for such inputs
                return None if t is None else t.detach().requires_grad_()

            return raise_on_backward(*(differentiable_alias(t) for t in results))

        return wrapper

    return decorate
