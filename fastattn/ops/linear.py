"""``linear``: F.linear, on fastattn's own float32 CPU GEMM (the fastattn::linear op, oneDNN's
brgemm: csrc/include/fastattn/cpu_gemm.h) where that beats torch.mm's, else F.linear itself.

It beats it on AMD CPUs with AVX-512, where torch.mm's MKL runs its AVX2 code: on the 2-core
Zen 5 EPYC, MultiheadAttention's in-projection [1024, 512] x [512, 1536] ran at 450 GFLOP/s
against F.linear's 218. The op's fake and autograd are registered here; the LSTM's training input
projection for the lanes along the units (fastattn.ops.lstm) takes ``linear`` too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn import _extension
from fastattn.ops import _registry  # noqa: F401  (defines the schemas)
from fastattn.ops._autograd import differentiable, first_order_only, register_autograd

_OPS = torch.ops.fastattn
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Asked once (a constant for torch.compile to trace past): FASTATTN_LSTM_GEMM=torch set before
# the import turns the op off.
_GEMM_WINS = _extension.C is not None and _extension.C.cpu_gemm_beats_torch_mm()
# Below this many rows the op would run at::mm itself (packing the weight would not pay), so
# such a call keeps F.linear, without the op's overhead.
_MIN_ROWS = _extension.C.cpu_gemm_linear_min_rows if _GEMM_WINS else None


@torch.library.register_fake("fastattn::linear")
def _linear_fake(input, weight, bias):
    return input.new_empty(input.shape[0], weight.shape[0])


def _linear_setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.save_for_backward(input, weight)


@first_order_only("fastattn::linear")
def _linear_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad
    # Both gradients on the GEMM the forward took (the caller chose it): the weight's,
    # grad^T @ input, on lstm_weight_mm's product, whose A operand grad^T has unit column stride
    # when grad is feature-major, as lstm_layer_bwd's grad_x_proj is where this op runs (else it
    # makes a contiguous copy); the input's as _input_gradient says.
    return (_input_gradient(grad, weight) if need_input else None,
            _OPS.lstm_weight_mm(grad.t(), input.unsqueeze(0), None)[0] if need_weight else None,
            grad.sum(0) if need_bias else None)


register_autograd("fastattn::linear", _linear_backward, setup_context=_linear_setup_context)


def _input_gradient(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad [M, N] @ weight [N, K] on fastattn's GEMM: a row-major grad as this op's A (on the
    Zen 5, 2.1-2.9x torch.mm's rate at 64-1024 rows against weights of 256-1024 columns); a
    feature-major one (the LSTM's) as the product's transpose weight^T @ grad^T, with a copy of
    weight^T as lstm_weight_mm's A, since brgemm reads its A along rows."""
    if grad.stride(0) == 1 and grad.stride(1) != 1:
        return _OPS.lstm_weight_mm(weight.t(), grad.t().unsqueeze(0), None)[0].t()
    return _OPS.linear(grad, weight.t(), None)


def takes_op(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether fastattn::linear serves this call: a GEMM that wins here, plain float32 CPU
    tensors of F.linear's shapes with enough rows, and no autocast (F.linear would run in its
    dtype)."""
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if not _GEMM_WINS or any(
            type(t) not in _PLAIN or t.dtype != torch.float32 or t.device.type != "cpu"
            for t in tensors):
        return False
    if input.dim() < 2 or weight.dim() != 2 or input.shape[-1] != weight.shape[1] or (
            bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        return False
    return input.numel() >= _MIN_ROWS * input.shape[-1] and not torch.is_autocast_enabled("cpu")


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear(input, weight, bias): the same result (to float32 rounding), shapes, gradients
    and errors, on fastattn::linear where takes_op says it serves the call."""
    if not takes_op(input, weight, bias):
        return F.linear(input, weight, bias)
    rows = input.reshape(-1, input.shape[-1])
    out = differentiable(_OPS.linear)(rows, weight, bias)
    return out.view(*input.shape[:-1], weight.shape[0])
