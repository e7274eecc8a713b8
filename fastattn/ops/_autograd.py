"""How the fastattn ops' autograd is registered: first-order only, and usable under torch.func.

A registered backward calls the *_bwd ops, which have no autograd of their own: differentiated
again (double backward: torch.autograd.grad(..., create_graph=True), gradgradcheck, a gradient
penalty), it would silently drop the second-order terms. ``first_order_only`` makes that a
RuntimeError instead, raised when the gradients are differentiated, not when they are computed
(so create_graph=True alone still works).

torch.library's autograd wrapper is an autograd.Function without a setup_context staticmethod,
which torch.func transforms (grad, vjp, jacrev, vmap of a gradient) refuse to run.
``register_autograd`` also builds the same formulas into a Function that has one, and
``differentiable`` hands that Function out to calls made under a transform.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

# The transform-ready Function of each op registered through register_autograd, by op name.
_TRANSFORMABLE: dict[str, type[torch.autograd.Function]] = {}


def _graph_inputs(ctx, grads: tuple) -> list[torch.Tensor]:
    """What autograd would record this backward on: with create_graph=True (grad mode on inside
    a backward, as always under torch.func.grad), the gradients and saved inputs that require
    grad; none otherwise."""
    if not torch.is_grad_enabled():
        return []
    tensors = (*grads, *ctx.saved_tensors)
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


class _RaiseOnBackward(torch.autograd.Function):
    """(message, n, *results, *anchors) -> results, as views recorded on a node that raises
    ``message`` when differentiated. The anchors (tensors that require grad) are what ties the
    node into the graph, so that it is recorded at every autograd level, torch.func's too (it
    has a setup_context, so transforms accept it, and needs no requires_grad_ on their
    tensors, which they refuse)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message, n, *tensors):
        return tuple(None if t is None else t.view_as(t) for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order_only(op: str) -> Callable:
    """Decorator of a registered backward (see register_autograd) of the op named ``op``.

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
            anchors = _graph_inputs(ctx, grads)
            with torch.no_grad():
                results = backward(ctx, *grads)
            if not anchors:
                return results
            return _RaiseOnBackward.apply(message, len(results), *results, *anchors)

        return wrapper

    return decorate


def register_autograd(op: str, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd`` of the op named ``op`` ("fastattn::name"), plus the
    same ``backward`` and ``setup_context`` as an autograd.Function that torch.func transforms
    accept (``differentiable`` returns it under a transform). Its vmap rule is generated: vmap
    runs the op's own batching (torch's per-sample fallback for a custom op)."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)
    namespace, name = op.split("::")
    packet = getattr(getattr(torch.ops, namespace), name)

    def forward(*args):
        return packet(*args)

    _TRANSFORMABLE[op] = type(
        f"{name}_function",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "generate_vmap_rule": True,
        },
    )


def differentiable(op: Callable) -> Callable:
    """``op`` (an op packet registered through register_autograd), or, while a torch.func
    transform is active, its transform-ready Function's apply."""
    if torch._C._are_functorch_transforms_active():
        return _TRANSFORMABLE[op._qualified_op_name].apply
    return op


def not_differentiable(fn: str, results: tuple, inputs: tuple) -> tuple:
    """``results`` of the non-differentiable ``fn``, computed without a graph, recorded on a node
    that raises a clear RuntimeError when a backward reaches it, wherever one of ``inputs``
    requires grad with grad mode on (else ``results`` as they are). Without it, torch's fallback
    for an op with no autograd kernel warns and silently returns no gradient."""
    if not torch.is_grad_enabled():
        return results
    anchors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not anchors:
        return results
    message = (
        f"fastattn.{fn} is not differentiable (a decoding op): no gradient flows to its inputs; "
        "call it under torch.no_grad() or on detached tensors"
    )
    return _RaiseOnBackward.apply(message, len(results), *results, *anchors)
