"""Fused pointwise LSTM cell (forward and backward) in Triton.

Registered as torch.library triton ops mirroring the C++ schemas in fastattn/ops/_registry.py:

    fastattn::lstm_cell_pointwise_fwd_triton(gates, cx) -> (hy, cy)
    fastattn::lstm_cell_pointwise_bwd_triton(grad_hy, grad_cy, gates, cx, cy)
        -> (grad_gates, grad_cx)

gates [B, 4H] are pre-activation sums in torch's chunk order i, f, g, o (i, f, o sigmoid, g
tanh); cx, cy, hy, grad_hy, grad_cy are [B, H]. cy = f * cx + i * g, hy = o * tanh(cy).
Math runs in float32 for float16/bfloat16/float32 inputs and in float64 for float64; outputs
have the input dtype and are freshly allocated contiguous tensors. Inputs are read through
their strides (any layout, including broadcast or transposed views); all inputs must share
one dtype and device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn.ops.errors import FastattnTypeError, FastattnValueError

# Elements of the [B, H] output handled by one program; the grid is flat over B * H so that
# any (B, H), odd ones included, fills whole blocks except the last.
BLOCK = 1024


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of a non-positive argument never overflows; the sign is restored afterwards.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _lstm_cell_fwd_kernel(
    gates_ptr, cx_ptr, hy_ptr, cy_ptr,
    n_elements, hidden,
    stride_gates_b, stride_gates_h, stride_cx_b, stride_cx_h,
    COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offsets < n_elements
    row = offsets // hidden
    col = offsets - row * hidden
    gate_base = gates_ptr + row * stride_gates_b + col * stride_gates_h
    gate_step = hidden * stride_gates_h  # from one gate chunk to the next
    i = _sigmoid(tl.load(gate_base, mask=mask).to(COMPUTE_DTYPE))
    f = _sigmoid(tl.load(gate_base + gate_step, mask=mask).to(COMPUTE_DTYPE))
    g = _tanh(tl.load(gate_base + 2 * gate_step, mask=mask).to(COMPUTE_DTYPE))
    o = _sigmoid(tl.load(gate_base + 3 * gate_step, mask=mask).to(COMPUTE_DTYPE))
    c_prev = tl.load(cx_ptr + row * stride_cx_b + col * stride_cx_h, mask=mask).to(COMPUTE_DTYPE)
    c = f * c_prev + i * g
    h = o * _tanh(c)
    tl.store(cy_ptr + offsets, c.to(cy_ptr.dtype.element_ty), mask=mask)
    tl.store(hy_ptr + offsets, h.to(hy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lstm_cell_bwd_kernel(
    grad_hy_ptr, grad_cy_ptr, gates_ptr, cx_ptr, cy_ptr, grad_gates_ptr, grad_cx_ptr,
    n_elements, hidden,
    stride_ghy_b, stride_ghy_h, stride_gcy_b, stride_gcy_h,
    stride_gates_b, stride_gates_h, stride_cx_b, stride_cx_h, stride_cy_b, stride_cy_h,
    COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offsets < n_elements
    row = offsets // hidden
    col = offsets - row * hidden
    gate_base = gates_ptr + row * stride_gates_b + col * stride_gates_h
    gate_step = hidden * stride_gates_h
    i = _sigmoid(tl.load(gate_base, mask=mask).to(COMPUTE_DTYPE))
    f = _sigmoid(tl.load(gate_base + gate_step, mask=mask).to(COMPUTE_DTYPE))
    g = _tanh(tl.load(gate_base + 2 * gate_step, mask=mask).to(COMPUTE_DTYPE))
    o = _sigmoid(tl.load(gate_base + 3 * gate_step, mask=mask).to(COMPUTE_DTYPE))
    c_prev = tl.load(cx_ptr + row * stride_cx_b + col * stride_cx_h, mask=mask).to(COMPUTE_DTYPE)
    c = tl.load(cy_ptr + row * stride_cy_b + col * stride_cy_h, mask=mask).to(COMPUTE_DTYPE)
    grad_h = tl.load(grad_hy_ptr + row * stride_ghy_b + col * stride_ghy_h, mask=mask)
    grad_c_in = tl.load(grad_cy_ptr + row * stride_gcy_b + col * stride_gcy_h, mask=mask)
    grad_h = grad_h.to(COMPUTE_DTYPE)

    tanh_c = _tanh(c)
    # Total gradient reaching c: directly through cy and through hy = o * tanh(c).
    grad_c = grad_c_in.to(COMPUTE_DTYPE) + grad_h * o * (1.0 - tanh_c * tanh_c)
    # Gradients w.r.t. the pre-activations: chain through sigmoid' = s(1-s), tanh' = 1-t^2.
    grad_i = grad_c * g * i * (1.0 - i)
    grad_f = grad_c * c_prev * f * (1.0 - f)
    grad_g = grad_c * i * (1.0 - g * g)
    grad_o = grad_h * tanh_c * o * (1.0 - o)

    out_row = grad_gates_ptr + row * (4 * hidden) + col  # grad_gates is contiguous [B, 4H]
    out_dtype = grad_gates_ptr.dtype.element_ty
    tl.store(out_row, grad_i.to(out_dtype), mask=mask)
    tl.store(out_row + hidden, grad_f.to(out_dtype), mask=mask)
    tl.store(out_row + 2 * hidden, grad_g.to(out_dtype), mask=mask)
    tl.store(out_row + 3 * hidden, grad_o.to(out_dtype), mask=mask)
    tl.store(grad_cx_ptr + offsets, (grad_c * f).to(grad_cx_ptr.dtype.element_ty), mask=mask)


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_cell_inputs(op: str, gates: torch.Tensor, **states: torch.Tensor) -> tuple[int, int]:
    """Validates shapes, dtypes and devices; returns (B, H)."""
    if gates.dim() != 2 or gates.shape[1] % 4 != 0:
        raise FastattnValueError(f"{op}: gates must be [B, 4H], got shape {tuple(gates.shape)}")
    if gates.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise FastattnTypeError(
            f"{op}: gates must be float16, bfloat16, float32 or float64, got {gates.dtype}"
        )
    batch, hidden = gates.shape[0], gates.shape[1] // 4
    for name, tensor in states.items():
        if tuple(tensor.shape) != (batch, hidden):
            raise FastattnValueError(
                f"{op}: {name} must be [B, H] = [{batch}, {hidden}] to match gates "
                f"[{batch}, {4 * hidden}], got shape {tuple(tensor.shape)}"
            )
        if tensor.dtype != gates.dtype:
            raise FastattnTypeError(
                f"{op}: {name} has dtype {tensor.dtype}, expected gates' {gates.dtype}"
            )
        if tensor.device != gates.device:
            raise FastattnValueError(
                f"{op}: {name} is on {tensor.device}, expected gates' {gates.device}"
            )
    return batch, hidden


def _grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, BLOCK),)


@torch.library.triton_op("fastattn::lstm_cell_pointwise_fwd_triton", mutates_args=())
def lstm_cell_pointwise_fwd_triton(
    gates: torch.Tensor, cx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hy, cy) [B, H] from pre-activation gates [B, 4H] (order i, f, g, o) and cx [B, H]."""
    batch, hidden = _check_cell_inputs("lstm_cell_pointwise_fwd_triton", gates, cx=cx)
    hy = torch.empty((batch, hidden), dtype=gates.dtype, device=gates.device)
    cy = torch.empty_like(hy)
    lstm_cell_pointwise_fwd_into(gates, cx, hy, cy)
    return hy, cy


def lstm_cell_pointwise_fwd_into(
    gates: torch.Tensor, cx: torch.Tensor, hy: torch.Tensor, cy: torch.Tensor
) -> None:
    """Launches the forward kernel, writing into contiguous hy, cy [B, H] (checked by callers)."""
    batch, hidden = cx.shape
    n_elements = batch * hidden
    if n_elements:
        torch.library.wrap_triton(_lstm_cell_fwd_kernel)[_grid(n_elements)](
            gates, cx, hy, cy, n_elements, hidden,
            gates.stride(0), gates.stride(1), cx.stride(0), cx.stride(1),
            COMPUTE_DTYPE=_compute_dtype(gates.dtype), BLOCK=BLOCK,
        )


@torch.library.triton_op("fastattn::lstm_cell_pointwise_bwd_triton", mutates_args=())
def lstm_cell_pointwise_bwd_triton(
    grad_hy: torch.Tensor,
    grad_cy: torch.Tensor,
    gates: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gates [B, 4H], grad_cx [B, H]) of the forward above.

    grad_hy and grad_cy [B, H] are the incoming gradients of hy and cy (pass zeros for an
    unused one); gates, cx and cy are the forward's inputs and its cy output.
    """
    batch, hidden = _check_cell_inputs(
        "lstm_cell_pointwise_bwd_triton", gates, grad_hy=grad_hy, grad_cy=grad_cy, cx=cx, cy=cy
    )
    grad_gates = torch.empty((batch, 4 * hidden), dtype=gates.dtype, device=gates.device)
    grad_cx = torch.empty((batch, hidden), dtype=gates.dtype, device=gates.device)
    lstm_cell_pointwise_bwd_into(grad_hy, grad_cy, gates, cx, cy, grad_gates, grad_cx)
    return grad_gates, grad_cx


def lstm_cell_pointwise_bwd_into(
    grad_hy: torch.Tensor,
    grad_cy: torch.Tensor,
    gates: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    grad_gates: torch.Tensor,
    grad_cx: torch.Tensor,
) -> None:
    """Launches the backward kernel, writing into contiguous grad_gates [B, 4H], grad_cx [B, H]."""
    batch, hidden = cx.shape
    n_elements = batch * hidden
    if n_elements:
        torch.library.wrap_triton(_lstm_cell_bwd_kernel)[_grid(n_elements)](
            grad_hy, grad_cy, gates, cx, cy, grad_gates, grad_cx, n_elements, hidden,
            grad_hy.stride(0), grad_hy.stride(1), grad_cy.stride(0), grad_cy.stride(1),
            gates.stride(0), gates.stride(1), cx.stride(0), cx.stride(1),
            cy.stride(0), cy.stride(1),
            COMPUTE_DTYPE=_compute_dtype(gates.dtype), BLOCK=BLOCK,
        )
