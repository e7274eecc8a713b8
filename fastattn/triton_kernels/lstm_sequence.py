"""Whole-sequence LSTM forward for small hidden sizes (H <= 64) in Triton.

Registered as the triton op mirroring fastattn::lstm_sequence_fwd (fastattn/ops/_registry.py):

    fastattn::lstm_sequence_fwd_triton(x_proj, h0, c0, w_hh) -> (h_all, c_all, gates_all)

x_proj [T, B, 4H] = x @ W_ih^T + b_ih + b_hh; h0, c0 [B, H]; w_hh [4H, H]. Returns the states
after each step h_all, c_all [T, B, H] and the ACTIVATED gates gates_all [T, B, 4H] (i, f, g, o
after sigmoid / tanh), all in the input dtype (float32, float16 or bfloat16; float64 is not
served: Triton has no float64 tl.dot). Inputs are read through their strides.

Each program owns BLOCK_B batch rows for the whole sequence and keeps all of w_hh in
registers (four [H, H] tiles), so programs never wait on each other; that is what limits H.
States are rounded to the input dtype after every step, exactly like a loop of
lstm_cell_pointwise_fwd calls; the recurrent product accumulates in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn.ops.errors import FastattnTypeError, FastattnValueError
from fastattn.triton_kernels.lstm_cell import _sigmoid, _tanh

MAX_HIDDEN = 64
BLOCK_B = 16  # tl.dot needs at least 16 rows


def num_warps(block_h: int) -> int:
    """Warps of a program: the four [BLOCK_H, BLOCK_H] weight tiles need 8 from BLOCK_H = 64."""
    return 4 if block_h <= 32 else 8


@triton.jit
def _gate_weights(w_ptr, stride_w_row, stride_w_col, gate, hidden, k_idx, n_idx):
    """[BLOCK_H (k), BLOCK_H (n)] = w_hh[gate * H + n, k]: one gate's rows, transposed by
    addressing and zero-padded, so that h @ tile is that gate's recurrent product."""
    mask = (k_idx[:, None] < hidden) & (n_idx[None, :] < hidden)
    w_rows = gate * hidden + n_idx[None, :]
    w = tl.load(w_ptr + w_rows * stride_w_row + k_idx[:, None] * stride_w_col, mask=mask, other=0.0)
    return w.to(tl.float32)


@triton.jit
def _lstm_sequence_fwd_kernel(
    x_ptr, h0_ptr, c0_ptr, w_ptr, h_all_ptr, c_all_ptr, gates_all_ptr,
    seq_len, batch, hidden,
    stride_x_t, stride_x_b, stride_x_h, stride_h0_b, stride_h0_h, stride_c0_b, stride_c0_h,
    stride_w_row, stride_w_col,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B] batch rows
    cols = tl.arange(0, BLOCK_H)  # [BLOCK_H] hidden units (n), also the reduction index (k)
    mask = (rows[:, None] < batch) & (cols[None, :] < hidden)  # [BLOCK_B, BLOCK_H]
    dtype = h_all_ptr.dtype.element_ty

    # All of w_hh, held for the whole sequence: four [BLOCK_H, BLOCK_H] float32 tiles. The
    # products take float32 operands for every dtype (the Triton interpreter miscomputes a
    # bfloat16 tl.dot in triton 3.9) with tf32x3 precision (hi*hi + hi*lo + lo*hi on the
    # tensor cores): float16 / bfloat16 values are exact in tf32, and for float32 the error
    # stays ~1e-7 of sum |h * w|, as with "ieee". An "ieee" dot is lowered to FMA chains, and
    # LLVM's SLP vectorizer (run by triton 3.9 for sm_90, not for sm_80) aborts on this loop's
    # four of them sharing the operand h (an assertion in BoUpSLP::scheduleBlock, from
    # BLOCK_H = 32 on; one such dot per loop compiles, reloading w in the loop does not help).
    w_i = _gate_weights(w_ptr, stride_w_row, stride_w_col, 0, hidden, cols, cols)
    w_f = _gate_weights(w_ptr, stride_w_row, stride_w_col, 1, hidden, cols, cols)
    w_g = _gate_weights(w_ptr, stride_w_row, stride_w_col, 2, hidden, cols, cols)
    w_o = _gate_weights(w_ptr, stride_w_row, stride_w_col, 3, hidden, cols, cols)

    # [BLOCK_B, BLOCK_H] states (h holds values of the input dtype); padded rows / columns
    # are zero and stay zero in h.
    h = tl.load(h0_ptr + rows[:, None] * stride_h0_b + cols[None, :] * stride_h0_h,
                mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + rows[:, None] * stride_c0_b + cols[None, :] * stride_c0_h,
                mask=mask, other=0.0).to(tl.float32)
    x_t = x_ptr + rows[:, None].to(tl.int64) * stride_x_b + cols[None, :] * stride_x_h
    gate_step = hidden * stride_x_h
    state_t = rows[:, None].to(tl.int64) * hidden + cols[None, :]  # into [B, H] of step t
    gates_t = rows[:, None].to(tl.int64) * (4 * hidden) + cols[None, :]  # into [B, 4H]
    for _ in range(seq_len):
        pre_i = tl.dot(h, w_i, input_precision="tf32x3")
        pre_f = tl.dot(h, w_f, input_precision="tf32x3")
        pre_g = tl.dot(h, w_g, input_precision="tf32x3")
        pre_o = tl.dot(h, w_o, input_precision="tf32x3")
        i = _sigmoid(pre_i + tl.load(x_t, mask=mask, other=0.0).to(tl.float32))
        f = _sigmoid(pre_f + tl.load(x_t + gate_step, mask=mask, other=0.0).to(tl.float32))
        g = _tanh(pre_g + tl.load(x_t + 2 * gate_step, mask=mask, other=0.0).to(tl.float32))
        o = _sigmoid(pre_o + tl.load(x_t + 3 * gate_step, mask=mask, other=0.0).to(tl.float32))
        c_new = f * c + i * g
        h_new = o * _tanh(c_new)

        tl.store(c_all_ptr + state_t, c_new.to(dtype), mask=mask)
        tl.store(h_all_ptr + state_t, h_new.to(dtype), mask=mask)
        tl.store(gates_all_ptr + gates_t, i.to(dtype), mask=mask)
        tl.store(gates_all_ptr + gates_t + hidden, f.to(dtype), mask=mask)
        tl.store(gates_all_ptr + gates_t + 2 * hidden, g.to(dtype), mask=mask)
        tl.store(gates_all_ptr + gates_t + 3 * hidden, o.to(dtype), mask=mask)
        # The next step reads the states rounded to the input dtype, like a loop of cell ops.
        h = tl.where(mask, h_new, 0.0).to(dtype).to(tl.float32)
        c = c_new.to(dtype).to(tl.float32)
        x_t += stride_x_t
        state_t += batch * hidden
        gates_t += batch * 4 * hidden


def _check_inputs(
    x_proj: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor
) -> tuple[int, int, int]:
    """Validates shapes, dtypes and devices; returns (T, B, H)."""
    op = "lstm_sequence_fwd_triton"
    if x_proj.dim() != 3 or x_proj.shape[2] % 4 != 0:
        raise FastattnValueError(
            f"{op}: x_proj must be [T, B, 4H], got shape {tuple(x_proj.shape)}"
        )
    if x_proj.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FastattnTypeError(
            f"{op}: x_proj must be float32, float16 or bfloat16, got {x_proj.dtype}"
        )
    seq_len, batch, hidden = x_proj.shape[0], x_proj.shape[1], x_proj.shape[2] // 4
    if not 1 <= hidden <= MAX_HIDDEN:
        raise FastattnValueError(f"{op}: serves hidden sizes 1..{MAX_HIDDEN}, got H = {hidden}")
    expected = {"h0": (batch, hidden), "c0": (batch, hidden), "w_hh": (4 * hidden, hidden)}
    for name, tensor in (("h0", h0), ("c0", c0), ("w_hh", w_hh)):
        if tuple(tensor.shape) != expected[name]:
            raise FastattnValueError(
                f"{op}: {name} must have shape {list(expected[name])}, got {list(tensor.shape)}"
            )
        if tensor.dtype != x_proj.dtype:
            raise FastattnTypeError(
                f"{op}: {name} has dtype {tensor.dtype}, expected {x_proj.dtype}"
            )
        if tensor.device != x_proj.device:
            raise FastattnValueError(
                f"{op}: {name} is on {tensor.device}, expected x_proj's device"
            )
    return seq_len, batch, hidden


@torch.library.triton_op("fastattn::lstm_sequence_fwd_triton", mutates_args=())
def lstm_sequence_fwd_triton(
    x_proj: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h_all [T, B, H], c_all [T, B, H], activated gates_all [T, B, 4H]); see the module doc."""
    seq_len, batch, hidden = _check_inputs(x_proj, h0, c0, w_hh)
    h_all = x_proj.new_empty((seq_len, batch, hidden))
    c_all = x_proj.new_empty((seq_len, batch, hidden))
    gates_all = x_proj.new_empty((seq_len, batch, 4 * hidden))
    lstm_sequence_fwd_into(x_proj, h0, c0, w_hh, h_all, c_all, gates_all)
    return h_all, c_all, gates_all


def lstm_sequence_fwd_into(
    x_proj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    h_all: torch.Tensor,
    c_all: torch.Tensor,
    gates_all: torch.Tensor,
) -> None:
    """Launches the kernel, writing into contiguous outputs (checked by callers)."""
    seq_len, batch, hidden = h_all.shape
    if seq_len == 0 or batch == 0:
        return
    block_h = max(16, triton.next_power_of_2(hidden))  # tl.dot needs every dim >= 16
    torch.library.wrap_triton(_lstm_sequence_fwd_kernel)[(triton.cdiv(batch, BLOCK_B),)](
        x_proj, h0, c0, w_hh, h_all, c_all, gates_all, seq_len, batch, hidden,
        x_proj.stride(0), x_proj.stride(1), x_proj.stride(2), h0.stride(0), h0.stride(1),
        c0.stride(0), c0.stride(1), w_hh.stride(0), w_hh.stride(1),
        BLOCK_B=BLOCK_B, BLOCK_H=block_h, num_warps=num_warps(block_h),
    )
