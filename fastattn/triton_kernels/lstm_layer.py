"""One LSTM layer in one direction, forward and backward, as persistent Triton kernels.

Registered as the triton ops mirroring fastattn::lstm_layer_fwd / _bwd (schemas, layouts and
option semantics: fastattn/ops/_registry.py), with every option: projection (w_hr), packed
batch_sizes, reverse, zoneout_c / zoneout_h:

    fastattn::lstm_layer_fwd_triton(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse,
        zoneout_c, zoneout_h) -> (h_all, c_all, gates_all, hpre_all)
    fastattn::lstm_layer_bwd_triton(grad_h_all, grad_c_all, h0, c0, w_hh, w_hr, batch_sizes,
        reverse, zoneout_c, zoneout_h, h_all, c_all, gates_all, hpre_all)
        -> (grad_x_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr)

Served: float32, float16, bfloat16 (Triton has no float64 tl.dot), any H and P.
Outputs are contiguous; x_proj, h0, c0, w_hh and w_hr are read through their strides.

Design. Batch rows are independent, so each program owns BLOCK_B rows for every gate column
and runs the whole time loop alone: no grid sync (a grid-wide spin barrier would also deadlock
the interpreter, which runs programs one after another), one launch per layer and direction.
One kernel template per direction, two ways to hold the weights (the RESIDENT constexpr):

- H, P <= MAX_RESIDENT (32): w_hh (and w_hr) stay on chip for the whole sequence, h and c in
  registers between steps; every loop over column blocks runs once with constant bounds.
- Larger: each step loops over STREAM_BLOCK-wide column blocks of the gates (then of the
  projection), streaming the w_hh / w_hr tiles from global memory (L2), and reads the previous
  state back from the h_all / c_all rows this program wrote the step before (the outputs are
  the state scratch; a block barrier orders the writes and the reads).

The backward runs the dh / dc recurrence per row block in reverse time with the same two
layouts (streamed: dh and dc kept in grad_h0 / grad_c0, this program's rows), writing
grad_x_proj (the pre-activation gate gradients) as it goes; grad_w_hh and grad_w_hr are then
one GEMM each over the whole sequence, outside the loop.

Per-size preference (fastattn.ops.lstm): the cuda backend comes first in backends.choose's
order, so wherever the extension has its C++-loop op (one cuBLAS GEMM + one fused pointwise
kernel per step) it serves lstm_layer; the streamed kernel serves CUDA tensors without that
build (a Triton-only install), so that no CUDA path runs the time loop in Python. On paper
the C++ loop is the faster one at large H. H200 figures: 132 SMs; L2 ~10 TB/s in all,
~76 GB/s per SM at its fair share and at most ~125 GB/s (64 B/clock) for one SM alone; per SM
~3.7 TFLOP/s TF32 and ~7.5 TFLOP/s bf16 on the tensor cores; a launch ~4 us. Per time step
(T = 128 multiplies all by 128):

- C++ loop: two launches, >= 8 us, and the GEMM [B, P] x [P, 4H] spread over every SM stays
  below that except at fp32 H1024 B64 (537 MFLOP on the CUDA cores, ~15 us): ~8 us for every
  B in {1, 16, 64} and H in {256, 512, 1024}.
- Streamed kernel: EVERY program reads all of w_hh (16 H^2 bytes fp32, 8 H^2 bf16)
  through its own SM's L2 port each step, whatever its number of rows, so its step time does
  not fall with B; B only sets how many SMs run side by side (ceil(B / 16)). At 76..125 GB/s:
  fp32 H256 8..14 us, H512 34..55 us, H1024 134..220 us; bf16 H256 4..7 us, H512 17..28 us,
  H1024 67..110 us (the tf32x3 products, 3 passes at 3.7 TFLOP/s, take about as long).

So the C++ loop wins by 2x to 27x at H >= 512 in every dtype and ties or wins by up to 1.7x
at fp32 H256, for B = 1, 16 and 64 alike; the streamed kernel would win only at half
precision H256, by 1.2x to 1.9x depending on an unmeasured per-SM L2 rate, where the CUDA
persistent kernel (w_hh on chip across SMs, grid sync) is the better design.

With the weights on chip for the whole sequence nothing is streamed: a step is a dependent
chain of a few small MMAs, the activations and an x_proj load, ~1..2 us against the C++
loop's >= 8 us, 4x to 8x for every B (ceil(B / 16) programs, one wave up to B = 2112). On
chip means shared memory: the tf32x3 products keep a hi and a lo copy of every weight tile
there (Triton hoists them out of the loop), so 64-wide tiles need 168 KiB even without
software pipelining (num_stages = 1; 200 KiB forward and 240 KiB backward with the default
3): over sm_80's 163 KiB. 32-wide tiles take 60 KiB (forward) and 84 KiB (backward) with the
default pipelining, within every arch's limit (tests/triton_aot.py checks it); so do the
streamed kernels' 32-wide tiles.

Numerics: h and c are rounded to the input dtype after every step, as a loop of
lstm_cell_pointwise_fwd calls does; products accumulate in float32 and take float32
operands with tf32x3 precision (hi*hi + hi*lo + lo*hi on the tensor cores; the Triton
interpreter miscomputes a bfloat16 tl.dot in triton 3.9): float16 / bfloat16 values are exact
in tf32, and for float32 the error stays ~1e-7 of sum |h * w|, as with "ieee". An "ieee" dot
is lowered to FMA chains, and LLVM's SLP vectorizer (run by triton 3.9 for sm_90, not for
sm_80) aborts on four of them sharing an operand in one loop (an assertion in
BoUpSLP::scheduleBlock, from a 32-wide tile on). gates_all is float32 for every dtype, as the
CPU and CUDA ops save it: the backward's dc = grad_c + grad_h * o * (1 - tanh^2(c)) can cancel,
and gates rounded to bfloat16 would reach grad c0 magnified (percent-level errors). The backward
works in float32 throughout and rounds its results once, as
fastattn.ops.reference.lstm_layer_bwd_reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn.ops.errors import FastattnTypeError, FastattnValueError
from fastattn.triton_kernels.lstm_cell import _sigmoid, _tanh

MAX_RESIDENT = 32  # the largest H and P whose weight tiles stay on chip on sm_80 and sm_90
STREAM_BLOCK = 32  # the tile width over H and P when the weights are streamed
BLOCK_B = 16  # batch rows of a program; tl.dot needs at least 16


def block_size(size: int) -> int:
    """The tile width that holds ``size`` units (tl.dot needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(size))


def num_warps(block_h: int, block_p: int) -> int:
    """Warps of a program: 4 up to 32-wide tiles (the widest launched), 8 beyond."""
    return 4 if max(block_h, block_p) <= 32 else 8


@triton.jit
def _tile(ptr, idx0, stride0, size0, idx1, stride1, size1):
    """[len(idx0), len(idx1)] float32 = ptr[idx0 * stride0 + idx1 * stride1], zero outside
    size0 x size1. Loads weight tiles (transposed by the choice of strides) and state rows."""
    mask = (idx0[:, None] < size0) & (idx1[None, :] < size1)
    offsets = idx0[:, None].to(tl.int64) * stride0 + idx1[None, :] * stride1
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gate_tiles(w_hh_ptr, gate_stride, idx0, stride0, size0, idx1, stride1, size1):
    """The four gates' weight tiles (i, f, g, o) of w_hh, gate q starting q * gate_stride
    elements in; each as _tile(...) with the given (transposing) strides."""
    w_i = _tile(w_hh_ptr, idx0, stride0, size0, idx1, stride1, size1)
    w_f = _tile(w_hh_ptr + gate_stride, idx0, stride0, size0, idx1, stride1, size1)
    w_g = _tile(w_hh_ptr + 2 * gate_stride, idx0, stride0, size0, idx1, stride1, size1)
    w_o = _tile(w_hh_ptr + 3 * gate_stride, idx0, stride0, size0, idx1, stride1, size1)
    return w_i, w_f, w_g, w_o


@triton.jit
def _state_before(s, first_ptr, stride_first_b, stride_first_u, all_ptr, prev, rows, batch,
                  cols, width):
    """float32 [rows, cols] of the state step ``s`` reads: the (strided) initial state at the
    first step, else time ``prev`` of the contiguous [T, B, width] outputs. One load runs."""
    later = _tile(all_ptr + prev.to(tl.int64) * batch * width, rows, width,
                  tl.where(s > 0, batch, 0), cols, 1, width)
    first = _tile(first_ptr, rows, stride_first_b, tl.where(s > 0, 0, batch), cols,
                  stride_first_u, width)
    return tl.where(s > 0, later, first)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 x rounded to the nearest ``dtype`` value (ties to even), kept in float32.
    bfloat16 is rounded on the bits, after which the conversion is exact: the Triton
    interpreter (triton 3.9) truncates float32 to bfloat16, which biases a recurrence; a GPU
    rounds either way. NaN stays NaN (the bit trick could carry a NaN payload into inf)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _lstm_layer_fwd_kernel(
    x_ptr, h0_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, batch_sizes_ptr, zoneout_c_ptr, zoneout_h_ptr,
    h_all_ptr, c_all_ptr, gates_all_ptr, hpre_all_ptr,
    seq_len, batch, hidden, state,
    stride_x_t, stride_x_b, stride_x_g, stride_h0_b, stride_h0_p, stride_c0_b, stride_c0_h,
    stride_w_hh_row, stride_w_hh_col, stride_w_hr_row, stride_w_hr_col,
    HAS_PROJ: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr, REVERSE: tl.constexpr,
    HAS_ZONEOUT_C: tl.constexpr, HAS_ZONEOUT_H: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """RESIDENT (H <= BLOCK_H, P <= BLOCK_P): the weights and the state stay on chip, and every
    loop over column blocks below runs once with constant bounds (folded by the compiler).
    Else each step streams the weight tiles and reads the previous state back from h_all /
    c_all, which this program wrote for its own rows (a block barrier orders the two)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B] batch rows
    h_cols = tl.arange(0, BLOCK_H)  # hidden units (gate and c columns) of a column block
    p_cols = tl.arange(0, BLOCK_P)  # state units (h columns; P = H without projection)
    dtype = h_all_ptr.dtype.element_ty
    if RESIDENT:
        n_h = BLOCK_H
        n_p = BLOCK_P
        # [BLOCK_P (k), BLOCK_H (n)] = w_hh[gate * H + n, k]: h @ tile is one gate's product.
        w_i, w_f, w_g, w_o = _gate_tiles(w_hh_ptr, hidden * stride_w_hh_row, p_cols,
                                         stride_w_hh_col, state, h_cols, stride_w_hh_row, hidden)
        if HAS_PROJ:  # [BLOCK_H (k), BLOCK_P (n)] = w_hr[n, k]
            w_r = _tile(w_hr_ptr, h_cols, stride_w_hr_col, hidden, p_cols, stride_w_hr_row,
                        state)
        # States in float32 holding values of the input dtype; padded columns stay zero.
        h = _tile(h0_ptr, rows, stride_h0_b, batch, p_cols, stride_h0_p, state)
        c = _tile(c0_ptr, rows, stride_c0_b, batch, h_cols, stride_c0_h, hidden)
    else:
        n_h = hidden
        n_p = state
    for s in range(seq_len):
        t = seq_len - 1 - s if REVERSE else s
        prev = tl.minimum(tl.maximum(t + 1 if REVERSE else t - 1, 0), seq_len - 1)
        if HAS_BATCH_SIZES:  # rows past batch_sizes[t] carry their state through this step
            steps = rows[:, None] < tl.load(batch_sizes_ptr + t)
        else:
            steps = rows[:, None] < batch
        x_t = x_ptr + t.to(tl.int64) * stride_x_t + rows[:, None].to(tl.int64) * stride_x_b
        out_rows = t.to(tl.int64) * batch + rows[:, None].to(tl.int64)  # rows of [T * B, *]
        if RESIDENT and HAS_PROJ:
            hpre = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)  # the projection's input
        for j0 in range(0, n_h, BLOCK_H):  # gate columns j0 + h_cols of each gate
            cols = j0 + h_cols
            mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
            step_h = mask_h & steps
            pre_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            pre_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            pre_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            pre_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, n_p, BLOCK_P):
                if not RESIDENT:
                    h = _state_before(s, h0_ptr, stride_h0_b, stride_h0_p, h_all_ptr, prev,
                                      rows, batch, k0 + p_cols, state)
                    w_i, w_f, w_g, w_o = _gate_tiles(
                        w_hh_ptr + j0 * stride_w_hh_row + k0 * stride_w_hh_col,
                        hidden * stride_w_hh_row, p_cols, stride_w_hh_col, state - k0, h_cols,
                        stride_w_hh_row, hidden - j0)
                pre_i += tl.dot(h, w_i, input_precision="tf32x3")
                pre_f += tl.dot(h, w_f, input_precision="tf32x3")
                pre_g += tl.dot(h, w_g, input_precision="tf32x3")
                pre_o += tl.dot(h, w_o, input_precision="tf32x3")
            x_j = x_t + cols[None, :] * stride_x_g
            gate_step = hidden * stride_x_g
            i = _sigmoid(pre_i + tl.load(x_j, mask=step_h, other=0.0).to(tl.float32))
            f = _sigmoid(pre_f + tl.load(x_j + gate_step, mask=step_h, other=0.0).to(tl.float32))
            g = _tanh(pre_g + tl.load(x_j + 2 * gate_step, mask=step_h, other=0.0).to(tl.float32))
            o = _sigmoid(pre_o + tl.load(x_j + 3 * gate_step, mask=step_h, other=0.0).to(
                tl.float32))
            if RESIDENT:
                c_prev = c
            else:
                c_prev = _state_before(s, c0_ptr, stride_c0_b, stride_c0_h, c_all_ptr, prev,
                                       rows, batch, cols, hidden)
            c_cell = f * c_prev + i * g
            hpre_j = _round(tl.where(step_h, o * _tanh(c_cell), 0.0), dtype)
            c_new = _round(c_cell, dtype)
            h_offsets = out_rows * hidden + cols[None, :]
            if HAS_ZONEOUT_C:  # the weight of the previous state: lerp(c_new, c, z)
                z_c = tl.load(zoneout_c_ptr + h_offsets, mask=step_h, other=0.0).to(tl.float32)
                c_new = _round(c_new + z_c * (c_prev - c_new), dtype)
            c_out = tl.where(steps, c_new, c_prev)
            tl.store(c_all_ptr + h_offsets, c_out.to(dtype), mask=mask_h)
            # Rows that do not step hold zeros in gates_all and hpre_all (the schema's
            # contract). The stored states are rounded already (exact conversions); the gates
            # are saved unrounded, in float32 (the backward's dc can cancel: module doc).
            g_t = gates_all_ptr + out_rows * (4 * hidden) + cols[None, :]
            tl.store(g_t, tl.where(steps, i, 0.0), mask=mask_h)
            tl.store(g_t + hidden, tl.where(steps, f, 0.0), mask=mask_h)
            tl.store(g_t + 2 * hidden, tl.where(steps, g, 0.0), mask=mask_h)
            tl.store(g_t + 3 * hidden, tl.where(steps, o, 0.0), mask=mask_h)
            if HAS_PROJ:
                tl.store(hpre_all_ptr + h_offsets, hpre_j.to(dtype), mask=mask_h)
                if RESIDENT:
                    hpre = hpre_j
            else:  # h is hpre (P = H, so BLOCK_P = BLOCK_H and the columns are the same)
                if RESIDENT:
                    h_prev = h
                else:
                    h_prev = _state_before(s, h0_ptr, stride_h0_b, stride_h0_p, h_all_ptr,
                                           prev, rows, batch, cols, state)
                h_new = hpre_j
                if HAS_ZONEOUT_H:
                    z_h = tl.load(zoneout_h_ptr + h_offsets, mask=step_h, other=0.0).to(
                        tl.float32)
                    h_new = _round(h_new + z_h * (h_prev - h_new), dtype)
                h_out = tl.where(step_h, h_new, h_prev)
                tl.store(h_all_ptr + h_offsets, h_out.to(dtype), mask=mask_h)
                if RESIDENT:
                    h = h_out
            if RESIDENT:
                c = c_out
        if HAS_PROJ:
            if not RESIDENT:
                tl.debug_barrier()  # hpre_all[t] of every column block is written
            for p0 in range(0, n_p, BLOCK_P):  # h = hpre @ w_hr^T, state columns p0 + p_cols
                cols_p = p0 + p_cols
                mask_p = (rows[:, None] < batch) & (cols_p[None, :] < state)
                proj = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
                for k0 in range(0, n_h, BLOCK_H):
                    if not RESIDENT:
                        hpre = _tile(hpre_all_ptr + t.to(tl.int64) * batch * hidden, rows,
                                     hidden, batch, k0 + h_cols, 1, hidden)
                        # [BLOCK_H (k), BLOCK_P (n)] = w_hr[p0 + n, k0 + k]
                        w_r = _tile(w_hr_ptr + p0 * stride_w_hr_row + k0 * stride_w_hr_col,
                                    h_cols, stride_w_hr_col, hidden - k0, p_cols,
                                    stride_w_hr_row, state - p0)
                    proj += tl.dot(hpre, w_r, input_precision="tf32x3")
                h_new = _round(proj, dtype)
                if RESIDENT:
                    h_prev = h
                else:
                    h_prev = _state_before(s, h0_ptr, stride_h0_b, stride_h0_p, h_all_ptr,
                                           prev, rows, batch, cols_p, state)
                p_offsets = out_rows * state + cols_p[None, :]
                if HAS_ZONEOUT_H:
                    z_h = tl.load(zoneout_h_ptr + p_offsets, mask=mask_p & steps,
                                  other=0.0).to(tl.float32)
                    h_new = _round(h_new + z_h * (h_prev - h_new), dtype)
                h_out = tl.where(steps & mask_p, h_new, h_prev)
                tl.store(h_all_ptr + p_offsets, h_out.to(dtype), mask=mask_p)
                if RESIDENT:
                    h = h_out
        if not RESIDENT:
            tl.debug_barrier()  # the next step reads h_all[t] and c_all[t] back


@triton.jit
def _lstm_layer_bwd_kernel(
    grad_h_all_ptr, grad_c_all_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, batch_sizes_ptr, zoneout_c_ptr,
    zoneout_h_ptr, c_all_ptr, gates_all_ptr,
    grad_gates_all_ptr, grad_h0_ptr, grad_c0_ptr, grad_hy_all_ptr,
    seq_len, batch, hidden, state,
    stride_c0_b, stride_c0_h, stride_w_hh_row, stride_w_hh_col, stride_w_hr_row, stride_w_hr_col,
    HAS_PROJ: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr, REVERSE: tl.constexpr,
    HAS_ZONEOUT_C: tl.constexpr, HAS_ZONEOUT_H: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Float32 outputs, rounded to the input dtype by the caller (in torch: the Triton
    interpreter of triton 3.9 truncates float32 to bfloat16 instead of rounding to nearest):
    grad_h0 [B, P], grad_c0 [B, H]; grad_gates_all [T, B, 4H], the pre-activation gate
    gradients (grad_x_proj);
    grad_hy_all [T, B, P] float32 (HAS_PROJ): the gradient reaching h_new = hpre @ w_hr^T,
    which grad_w_hr needs. Both are zero on rows that do not step. The other inputs are
    contiguous (the launcher's copies) except c0 and the weights.

    Per step, three phases over column blocks: (A) the gradient reaching h (and through the
    projection's output), (B) the gate gradients and dc per H block, (C) dh_prev = grad_gates @
    w_hh per P block. RESIDENT as in the forward: the weights and dh, dc stay on chip and each
    phase is one block; else dh and dc live in grad_h0 / grad_c0 (this program's rows) and the
    phases read back what the one before wrote, after a block barrier."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    h_cols = tl.arange(0, BLOCK_H)
    p_cols = tl.arange(0, BLOCK_P)
    if RESIDENT:
        n_h = BLOCK_H
        n_p = BLOCK_P
        # [BLOCK_H (k), BLOCK_P (n)] = w_hh[gate * H + k, n]: grad_gate @ tile is its part of dh.
        w_i, w_f, w_g, w_o = _gate_tiles(w_hh_ptr, hidden * stride_w_hh_row, h_cols,
                                         stride_w_hh_row, hidden, p_cols, stride_w_hh_col, state)
        if HAS_PROJ:  # [BLOCK_P (k), BLOCK_H (n)] = w_hr[k, n]
            w_r = _tile(w_hr_ptr, p_cols, stride_w_hr_row, state, h_cols, stride_w_hr_col,
                        hidden)
        dh = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)  # gradient reaching the state h
        dc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)  # gradient reaching the state c
        # c0 loaded once: in the loop, a second (strided) load a step costs a layout
        # conversion through shared memory (4 KiB more of it for fp32 H = P = 32).
        c_prev0 = _tile(c0_ptr, rows, stride_c0_b, batch, h_cols, stride_c0_h, hidden)
    else:
        n_h = hidden
        n_p = state
        for p0 in range(0, n_p, BLOCK_P):
            offsets = rows[:, None].to(tl.int64) * state + (p0 + p_cols)[None, :]
            mask = (rows[:, None] < batch) & ((p0 + p_cols)[None, :] < state)
            tl.store(grad_h0_ptr + offsets, tl.zeros((BLOCK_B, BLOCK_P), tl.float32), mask=mask)
        for j0 in range(0, n_h, BLOCK_H):
            offsets = rows[:, None].to(tl.int64) * hidden + (j0 + h_cols)[None, :]
            mask = (rows[:, None] < batch) & ((j0 + h_cols)[None, :] < hidden)
            tl.store(grad_c0_ptr + offsets, tl.zeros((BLOCK_B, BLOCK_H), tl.float32), mask=mask)
        tl.debug_barrier()
    for r in range(seq_len):
        s = seq_len - 1 - r  # the forward's step index, walked backwards
        t = seq_len - 1 - s if REVERSE else s
        prev = tl.minimum(tl.maximum(t + 1 if REVERSE else t - 1, 0), seq_len - 1)
        if HAS_BATCH_SIZES:
            steps = rows[:, None] < tl.load(batch_sizes_ptr + t)
        else:
            steps = rows[:, None] < batch
        out_rows = t.to(tl.int64) * batch + rows[:, None].to(tl.int64)  # rows of [T * B, *]
        # (A) dh_total = dh + grad_h_all[t], and with a projection its output's gradient.
        if RESIDENT:
            dh_total = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
            dh_new = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
        for p0 in range(0, n_p, BLOCK_P):
            cols_p = p0 + p_cols
            mask_p = (rows[:, None] < batch) & (cols_p[None, :] < state)
            p_offsets = out_rows * state + cols_p[None, :]
            dh_in = dh if RESIDENT else _tile(grad_h0_ptr, rows, state, batch, cols_p, 1, state)
            dh_total_p = dh_in + tl.load(grad_h_all_ptr + p_offsets, mask=mask_p,
                                         other=0.0).to(tl.float32)
            if RESIDENT:
                dh_total = dh_total_p
            else:  # in place: each element is read and written by the same thread
                tl.store(grad_h0_ptr + rows[:, None].to(tl.int64) * state + cols_p[None, :],
                         dh_total_p, mask=mask_p)
            if HAS_PROJ:
                dh_new_p = tl.where(mask_p & steps, dh_total_p, 0.0)
                if HAS_ZONEOUT_H:
                    dh_new_p *= 1.0 - tl.load(zoneout_h_ptr + p_offsets, mask=mask_p & steps,
                                              other=0.0).to(tl.float32)
                tl.store(grad_hy_all_ptr + p_offsets, dh_new_p, mask=mask_p)
                if RESIDENT:
                    dh_new = dh_new_p
        if not RESIDENT:
            tl.debug_barrier()
        # (B) the gate gradients and dc, per block of H columns.
        if RESIDENT:
            grad_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            grad_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            grad_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            grad_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for j0 in range(0, n_h, BLOCK_H):
            cols = j0 + h_cols
            mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
            step_h = mask_h & steps
            h_offsets = out_rows * hidden + cols[None, :]
            if HAS_PROJ:  # the gradient reaching hpre: dh_new @ w_hr
                dh_hpre = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, n_p, BLOCK_P):
                    if not RESIDENT:
                        dh_new = _tile(grad_hy_all_ptr + t.to(tl.int64) * batch * state, rows,
                                       state, batch, k0 + p_cols, 1, state)
                        # [BLOCK_P (k), BLOCK_H (n)] = w_hr[k0 + k, j0 + n]
                        w_r = _tile(w_hr_ptr + k0 * stride_w_hr_row + j0 * stride_w_hr_col,
                                    p_cols, stride_w_hr_row, state - k0, h_cols,
                                    stride_w_hr_col, hidden - j0)
                    dh_hpre += tl.dot(dh_new, w_r, input_precision="tf32x3")
            else:  # P = H: the state's columns are the gates'
                if RESIDENT:
                    dh_hpre = tl.where(step_h, dh_total, 0.0)
                else:
                    dh_hpre = tl.where(step_h, _tile(grad_h0_ptr, rows, state, batch, cols, 1,
                                                     state), 0.0)
                if HAS_ZONEOUT_H:
                    dh_hpre *= 1.0 - tl.load(zoneout_h_ptr + h_offsets, mask=step_h,
                                             other=0.0).to(tl.float32)
            c_offsets = rows[:, None].to(tl.int64) * hidden + cols[None, :]
            dc_in = dc if RESIDENT else tl.load(grad_c0_ptr + c_offsets, mask=mask_h, other=0.0)
            dc_total = dc_in + tl.load(grad_c_all_ptr + h_offsets, mask=mask_h,
                                       other=0.0).to(tl.float32)
            dc_new = tl.where(step_h, dc_total, 0.0)
            if HAS_ZONEOUT_C:
                z_c = tl.load(zoneout_c_ptr + h_offsets, mask=step_h, other=0.0).to(tl.float32)
                dc_new = dc_new * (1.0 - z_c)
            g_t = gates_all_ptr + out_rows * (4 * hidden) + cols[None, :]
            i = tl.load(g_t, mask=step_h, other=0.0).to(tl.float32)
            f = tl.load(g_t + hidden, mask=step_h, other=0.0).to(tl.float32)
            g = tl.load(g_t + 2 * hidden, mask=step_h, other=0.0).to(tl.float32)
            o = tl.load(g_t + 3 * hidden, mask=step_h, other=0.0).to(tl.float32)
            if RESIDENT:
                c_prev = tl.where(s > 0, _tile(c_all_ptr + prev.to(tl.int64) * batch * hidden,
                                               rows, hidden, batch, cols, 1, hidden), c_prev0)
            else:
                c_prev = _state_before(s, c0_ptr, stride_c0_b, stride_c0_h, c_all_ptr, prev,
                                       rows, batch, cols, hidden)
            # c_all[t] holds the zoned-out state; tanh needs the cell's own f * c_prev + i * g.
            tanh_c = _tanh(f * c_prev + i * g)
            d_cell = dc_new + dh_hpre * o * (1.0 - tanh_c * tanh_c)
            grad_i_j = d_cell * g * i * (1.0 - i)
            grad_f_j = d_cell * c_prev * f * (1.0 - f)
            grad_g_j = d_cell * i * (1.0 - g * g)
            grad_o_j = dh_hpre * tanh_c * o * (1.0 - o)
            gg_t = grad_gates_all_ptr + out_rows * (4 * hidden) + cols[None, :]
            tl.store(gg_t, grad_i_j, mask=mask_h)
            tl.store(gg_t + hidden, grad_f_j, mask=mask_h)
            tl.store(gg_t + 2 * hidden, grad_g_j, mask=mask_h)
            tl.store(gg_t + 3 * hidden, grad_o_j, mask=mask_h)
            dc_prev = d_cell * f
            if HAS_ZONEOUT_C:
                dc_prev += dc_total * z_c
            dc_out = tl.where(step_h, dc_prev, dc_total)
            if RESIDENT:
                dc = dc_out
                grad_i, grad_f, grad_g, grad_o = grad_i_j, grad_f_j, grad_g_j, grad_o_j
            else:  # in place, as dh above
                tl.store(grad_c0_ptr + c_offsets, dc_out, mask=mask_h)
        if not RESIDENT:
            tl.debug_barrier()
        # (C) dh_prev = sum over the gates of grad_gate @ w_hh, per block of P columns.
        for p0 in range(0, n_p, BLOCK_P):
            cols_p = p0 + p_cols
            mask_p = (rows[:, None] < batch) & (cols_p[None, :] < state)
            step_p = mask_p & steps
            dh_prev = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
            for k0 in range(0, n_h, BLOCK_H):
                if not RESIDENT:
                    gg_k = (grad_gates_all_ptr + t.to(tl.int64) * batch * 4 * hidden + k0)
                    grad_i = _tile(gg_k, rows, 4 * hidden, batch, h_cols, 1, hidden - k0)
                    grad_f = _tile(gg_k + hidden, rows, 4 * hidden, batch, h_cols, 1, hidden - k0)
                    grad_g = _tile(gg_k + 2 * hidden, rows, 4 * hidden, batch, h_cols, 1,
                                   hidden - k0)
                    grad_o = _tile(gg_k + 3 * hidden, rows, 4 * hidden, batch, h_cols, 1,
                                   hidden - k0)
                    # [BLOCK_H (k), BLOCK_P (n)] = w_hh[gate * H + k0 + k, p0 + n]
                    w_i, w_f, w_g, w_o = _gate_tiles(
                        w_hh_ptr + k0 * stride_w_hh_row + p0 * stride_w_hh_col,
                        hidden * stride_w_hh_row, h_cols, stride_w_hh_row, hidden - k0, p_cols,
                        stride_w_hh_col, state - p0)
                dh_prev += tl.dot(grad_i, w_i, input_precision="tf32x3")
                dh_prev += tl.dot(grad_f, w_f, input_precision="tf32x3")
                dh_prev += tl.dot(grad_g, w_g, input_precision="tf32x3")
                dh_prev += tl.dot(grad_o, w_o, input_precision="tf32x3")
            d_offsets = rows[:, None].to(tl.int64) * state + cols_p[None, :]
            if RESIDENT:
                dh_total_p = dh_total
            else:
                dh_total_p = tl.load(grad_h0_ptr + d_offsets, mask=mask_p, other=0.0)
            if HAS_ZONEOUT_H:  # the zoned-out share of h came straight from the previous state
                z_h = tl.load(zoneout_h_ptr + out_rows * state + cols_p[None, :], mask=step_p,
                              other=0.0).to(tl.float32)
                dh_prev += dh_total_p * z_h
            dh_out = tl.where(step_p, dh_prev, dh_total_p)
            if RESIDENT:
                dh = dh_out
            else:  # in place, as in (A)
                tl.store(grad_h0_ptr + d_offsets, dh_out, mask=mask_p)
        if not RESIDENT:
            tl.debug_barrier()
    if RESIDENT:
        tl.store(grad_h0_ptr + rows[:, None].to(tl.int64) * state + p_cols[None, :], dh,
                 mask=(rows[:, None] < batch) & (p_cols[None, :] < state))
        tl.store(grad_c0_ptr + rows[:, None].to(tl.int64) * hidden + h_cols[None, :], dc,
                 mask=(rows[:, None] < batch) & (h_cols[None, :] < hidden))


# ---- ops ---------------------------------------------------------------------------------------


def _check_inputs(op, x_proj, h0, c0, w_hh, w_hr, batch_sizes, zoneout_c, zoneout_h):
    """Validates shapes, dtypes and devices before any launch; returns (T, B, H, P)."""
    if x_proj.dim() != 3 or x_proj.shape[2] % 4 != 0:
        raise FastattnValueError(f"{op}: x_proj must be [T, B, 4H], got {list(x_proj.shape)}")
    if x_proj.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FastattnTypeError(
            f"{op}: x_proj must be float32, float16 or bfloat16, got {x_proj.dtype}")
    seq_len, batch, hidden = x_proj.shape[0], x_proj.shape[1], x_proj.shape[2] // 4
    state = w_hr.shape[0] if w_hr is not None and w_hr.dim() == 2 else hidden
    expected = {"h0": (batch, state), "c0": (batch, hidden), "w_hh": (4 * hidden, state),
                "w_hr": (state, hidden), "zoneout_c": (seq_len, batch, hidden),
                "zoneout_h": (seq_len, batch, state)}
    tensors = {"h0": h0, "c0": c0, "w_hh": w_hh, "w_hr": w_hr, "zoneout_c": zoneout_c,
               "zoneout_h": zoneout_h}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != expected[name]:
            raise FastattnValueError(
                f"{op}: {name} must have shape {list(expected[name])}, got {list(tensor.shape)}")
        if tensor.dtype != x_proj.dtype:
            raise FastattnTypeError(f"{op}: {name} has dtype {tensor.dtype}, expected "
                                    f"{x_proj.dtype} (x_proj's)")
        if tensor.device != x_proj.device:
            raise FastattnValueError(
                f"{op}: {name} is on {tensor.device}, expected {x_proj.device} (x_proj's)")
    if batch_sizes is not None and (batch_sizes.dtype != torch.int64 or batch_sizes.device.type
                                    != "cpu" or tuple(batch_sizes.shape) != (seq_len,)):
        raise FastattnValueError(
            f"{op}: batch_sizes must be an int64 CPU tensor of shape [{seq_len}], got "
            f"{batch_sizes.dtype} {list(batch_sizes.shape)} on {batch_sizes.device}")
    return seq_len, batch, hidden, state


def _flags(w_hr, batch_sizes, reverse, zoneout_c, zoneout_h) -> dict:
    return dict(HAS_PROJ=w_hr is not None, HAS_BATCH_SIZES=batch_sizes is not None,
                REVERSE=bool(reverse), HAS_ZONEOUT_C=zoneout_c is not None,
                HAS_ZONEOUT_H=zoneout_h is not None)


def _launch_shape(hidden: int, state: int) -> dict:
    resident = max(hidden, state) <= MAX_RESIDENT
    block_h, block_p = ((block_size(hidden), block_size(state)) if resident
                        else (STREAM_BLOCK, STREAM_BLOCK))
    return dict(RESIDENT=resident, BLOCK_B=BLOCK_B, BLOCK_H=block_h, BLOCK_P=block_p,
                num_warps=num_warps(block_h, block_p))


@torch.library.triton_op("fastattn::lstm_layer_fwd_triton", mutates_args=())
def lstm_layer_fwd_triton(
    x_proj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor | None,
    reverse: bool,
    zoneout_c: torch.Tensor | None,
    zoneout_h: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h_all [T, B, P], c_all [T, B, H], activated gates_all [T, B, 4H] float32, hpre_all
    [T, B, H] or empty without w_hr), as fastattn::lstm_layer_fwd; see the module doc."""
    seq_len, batch, hidden, state = _check_inputs(
        "lstm_layer_fwd_triton", x_proj, h0, c0, w_hh, w_hr, batch_sizes, zoneout_c, zoneout_h)
    h_all = x_proj.new_empty((seq_len, batch, state))
    c_all = x_proj.new_empty((seq_len, batch, hidden))
    gates_all = x_proj.new_empty((seq_len, batch, 4 * hidden), dtype=torch.float32)
    hpre_all = x_proj.new_empty((seq_len, batch, hidden) if w_hr is not None else (0,))
    lstm_layer_fwd_into(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h,
                        h_all, c_all, gates_all, hpre_all)
    return h_all, c_all, gates_all, hpre_all


def lstm_layer_fwd_into(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h,
                        h_all, c_all, gates_all, hpre_all) -> None:
    """Launches the forward kernel, writing into contiguous outputs (checked by callers)."""
    seq_len, batch, hidden = c_all.shape
    state = h_all.shape[2]
    if seq_len == 0 or batch == 0:
        return
    # Optional tensors the kernel does not read are replaced by any pointer of their type.
    sizes = x_proj.new_empty(0, dtype=torch.int64) if batch_sizes is None else (
        batch_sizes.to(x_proj.device))
    w_hr_ = w_hh if w_hr is None else w_hr
    # Zoneout weights are read at the outputs' offsets: one layout keeps the argument list short.
    zoneout_c_ = x_proj if zoneout_c is None else zoneout_c.contiguous()
    zoneout_h_ = x_proj if zoneout_h is None else zoneout_h.contiguous()
    torch.library.wrap_triton(_lstm_layer_fwd_kernel)[(triton.cdiv(batch, BLOCK_B),)](
        x_proj, h0, c0, w_hh, w_hr_, sizes, zoneout_c_, zoneout_h_,
        h_all, c_all, gates_all, hpre_all if w_hr is not None else h_all,
        seq_len, batch, hidden, state,
        x_proj.stride(0), x_proj.stride(1), x_proj.stride(2), h0.stride(0), h0.stride(1),
        c0.stride(0), c0.stride(1), w_hh.stride(0), w_hh.stride(1),
        w_hr_.stride(0), w_hr_.stride(1),
        **_flags(w_hr, batch_sizes, reverse, zoneout_c, zoneout_h),
        **_launch_shape(hidden, state),
    )


@torch.library.triton_op("fastattn::lstm_layer_bwd_triton", mutates_args=())
def lstm_layer_bwd_triton(
    grad_h_all: torch.Tensor,
    grad_c_all: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor | None,
    reverse: bool,
    zoneout_c: torch.Tensor | None,
    zoneout_h: torch.Tensor | None,
    h_all: torch.Tensor,
    c_all: torch.Tensor,
    gates_all: torch.Tensor,
    hpre_all: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x_proj [T, B, 4H], grad_h0 [B, P], grad_c0 [B, H], grad_w_hh [4H, P], grad_w_hr
    [P, H] or empty), as fastattn::lstm_layer_bwd; see the module doc."""
    op = "lstm_layer_bwd_triton"
    if gates_all.dim() != 3 or gates_all.shape[2] % 4 != 0:
        raise FastattnValueError(f"{op}: gates_all must be [T, B, 4H], got "
                                 f"{list(gates_all.shape)}")
    if gates_all.dtype != torch.float32 or gates_all.device != h0.device:
        raise FastattnTypeError(f"{op}: gates_all must be float32 on {h0.device} (the "
                                f"forward's), got {gates_all.dtype} on {gates_all.device}")
    # The data dtype is h0's: checked as x_proj's would be.
    seq_len, batch, hidden, state = _check_inputs(
        op, h0.new_empty(()).expand(gates_all.shape), h0, c0, w_hh, w_hr, batch_sizes, zoneout_c,
        zoneout_h)
    saved = {"grad_h_all": (grad_h_all, (seq_len, batch, state)),
             "grad_c_all": (grad_c_all, (seq_len, batch, hidden)),
             "h_all": (h_all, (seq_len, batch, state)), "c_all": (c_all, (seq_len, batch, hidden)),
             "hpre_all": (hpre_all, (seq_len, batch, hidden) if w_hr is not None else (0,))}
    for name, (tensor, shape) in saved.items():
        if tuple(tensor.shape) != shape:
            raise FastattnValueError(f"lstm_layer_bwd_triton: {name} must have shape "
                                     f"{list(shape)}, got {list(tensor.shape)}")
    dtype = h0.dtype
    # The gate gradients stay float32 until grad_w_hh has been summed from them.
    grad_gates_all = gates_all.new_empty((seq_len, batch, 4 * hidden), dtype=torch.float32)
    grad_hy_all = gates_all.new_empty(
        (seq_len, batch, state) if w_hr is not None else (0,), dtype=torch.float32)
    grad_h0 = h0.new_empty((batch, state), dtype=torch.float32)
    grad_c0 = c0.new_empty((batch, hidden), dtype=torch.float32)
    lstm_layer_bwd_into(grad_h_all, grad_c_all, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                        zoneout_h, c_all, gates_all, grad_gates_all, grad_h0, grad_c0,
                        grad_hy_all)
    # The state each step read: h0 first, then the previous step's output, in the step order.
    if reverse:
        h_prev_all = torch.cat([h_all, h0.unsqueeze(0)])[1:]
    else:
        h_prev_all = torch.cat([h0.unsqueeze(0), h_all])[:seq_len]
    grad_gates = grad_gates_all.view(seq_len * batch, 4 * hidden)
    grad_w_hh = (grad_gates.t() @ h_prev_all.reshape(seq_len * batch, state).float()).to(dtype)
    grad_w_hr = h0.new_empty(0)
    if w_hr is not None:
        grad_w_hr = (grad_hy_all.view(seq_len * batch, state).t()
                     @ hpre_all.reshape(seq_len * batch, hidden).float()).to(dtype)
    return (grad_gates_all.to(dtype), grad_h0.to(dtype), grad_c0.to(dtype), grad_w_hh,
            grad_w_hr)


def lstm_layer_bwd_into(grad_h_all, grad_c_all, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                        zoneout_h, c_all, gates_all, grad_gates_all, grad_h0, grad_c0,
                        grad_hy_all) -> None:
    """Launches the backward kernel, writing the float32 grad_gates_all [T, B, 4H],
    grad_hy_all [T, B, P] (with w_hr; else empty), grad_h0 [B, P] and grad_c0 [B, H], all
    contiguous."""
    seq_len, batch, hidden = c_all.shape
    state = grad_h0.shape[1]
    if batch == 0:
        return
    sizes = gates_all.new_empty(0, dtype=torch.int64) if batch_sizes is None else (
        batch_sizes.to(gates_all.device))
    w_hr_ = w_hh if w_hr is None else w_hr
    # The per-step tensors are read at the outputs' offsets (contiguous); they are read once, so
    # a copy costs about what strided reads would.
    c_all = c_all.contiguous()
    zoneout_c_ = c_all if zoneout_c is None else zoneout_c.contiguous()
    zoneout_h_ = c_all if zoneout_h is None else zoneout_h.contiguous()
    torch.library.wrap_triton(_lstm_layer_bwd_kernel)[(triton.cdiv(batch, BLOCK_B),)](
        grad_h_all.contiguous(), grad_c_all.contiguous(), c0, w_hh, w_hr_, sizes, zoneout_c_,
        zoneout_h_, c_all, gates_all.contiguous(),
        grad_gates_all, grad_h0, grad_c0, grad_hy_all if w_hr is not None else grad_gates_all,
        seq_len, batch, hidden, state,
        c0.stride(0), c0.stride(1), w_hh.stride(0), w_hh.stride(1),
        w_hr_.stride(0), w_hr_.stride(1),
        **_flags(w_hr, batch_sizes, reverse, zoneout_c, zoneout_h),
        **_launch_shape(hidden, state),
    )
