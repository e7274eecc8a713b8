"""One LSTM layer in one direction, forward and backward, as persistent Triton kernels.

Registered as the triton ops mirroring fastattn::lstm_layer_fwd / _bwd and the LayerNorm-LSTM
ops fastattn::lstm_ln_layer_fwd / _bwd (schemas, layouts and option semantics:
fastattn/ops/_registry.py), with every option: projection (w_hr), packed batch_sizes, reverse,
zoneout_c / zoneout_h; the LN ops also take the LN gains, bias and eps, and save the float32
gates_all, hh_norm_all, c_norm_all and rstd_all as the CPU LN op does:

    fastattn::lstm_layer_fwd_triton(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse,
        zoneout_c, zoneout_h) -> (h_all, c_all, gates_all, hpre_all)
    fastattn::lstm_layer_bwd_triton(grad_h_all, grad_c_all, h0, c0, w_hh, w_hr, batch_sizes,
        reverse, zoneout_c, zoneout_h, h_all, c_all, gates_all, hpre_all)
        -> (grad_x_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr)
    fastattn::lstm_ln_layer_fwd_triton(x_proj, h0, c0, w_hh, ln_hh_weight, ln_c_weight,
        ln_c_bias, eps, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h)
        -> (h_all, c_all, gates_all, hpre_all, hh_norm_all, c_norm_all, rstd_all)
    fastattn::lstm_ln_layer_bwd_triton(grad_h_all, grad_c_all, h0, c0, w_hh, ln_hh_weight,
        ln_c_weight, ln_c_bias, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h, h_all,
        c_all, gates_all, hpre_all, hh_norm_all, c_norm_all, rstd_all)
        -> (grad_x_proj, grad_h0, grad_c0, grad_w_hh, grad_ln_hh_weight, grad_ln_c_weight,
            grad_ln_c_bias, grad_w_hr)

Both pairs run the same two kernels: the LAYER_NORM constexpr adds the LN passes (see the
kernels' docs); the LN gains' gradients are sums over the sequence in torch, as grad_w_hh.

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

A LayerNorm needs its row's mean and variance before any element of the row is normalized, so
with LAYER_NORM each step makes more passes over the column blocks (five forward, three more
backward); streamed, the raw values wait in the float32 rows the op saves anyway (hh_norm_all,
c_norm_all, the gate gradients), normalized in place later, so the LN costs no extra memory.
On chip, every pass is one block and nothing leaves the registers but the saved rows.

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
3): over sm_80's 163 KiB. 32-wide tiles take 60 KiB (forward) and 80 KiB (backward) with the
default pipelining (with LAYER_NORM, 77 and 140 KiB: fp32 on sm_80), within every arch's limit
(tests/triton_aot.py checks it); so do the streamed kernels' 32-wide tiles.

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
With LAYER_NORM the moments are two-pass float32 sums (no cancellation), as on the CPU; the
recurrent product is normalized in float32 (the CPU op rounds it to the input dtype first),
and c and h are rounded as without the LN (the CPU op lerps the zoneout before rounding c),
so the two can differ by a rounding step of the input dtype.
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
def _streamed_product(acc, a_ptr, rows, batch, k_cols, n_k, w_ptr, stride_w_k, stride_w_n,
                      n_cols, n_n, BLOCK_K: tl.constexpr):
    """acc + a @ w over k in blocks of BLOCK_K, the weights streamed: a [B, n_k] is this
    program's rows of a contiguous scratch of the step, w [n_k, n_n] is read through its
    strides (a transposed view of a weight). k_cols = tl.arange(0, BLOCK_K); n_cols: the
    tile's column indices, from 0."""
    for k0 in range(0, n_k, BLOCK_K):
        a = _tile(a_ptr, rows, n_k, batch, k0 + k_cols, 1, n_k)
        w = _tile(w_ptr + k0 * stride_w_k, k_cols, stride_w_k, n_k - k0, n_cols, stride_w_n,
                  n_n)
        acc += tl.dot(a, w, input_precision="tf32x3")
    return acc


@triton.jit
def _activate(x_t, cols, stride_x_g, hidden, step_h, pre_i, pre_f, pre_g, pre_o):
    """The activated gates i, f, g, o at columns ``cols``: x_proj[t] (rows at x_t) plus the
    recurrent pre-activations."""
    x_j = x_t + cols[None, :] * stride_x_g
    gate_step = hidden * stride_x_g
    i = _sigmoid(pre_i + tl.load(x_j, mask=step_h, other=0.0).to(tl.float32))
    f = _sigmoid(pre_f + tl.load(x_j + gate_step, mask=step_h, other=0.0).to(tl.float32))
    g = _tanh(pre_g + tl.load(x_j + 2 * gate_step, mask=step_h, other=0.0).to(tl.float32))
    o = _sigmoid(pre_o + tl.load(x_j + 3 * gate_step, mask=step_h, other=0.0).to(tl.float32))
    return i, f, g, o


@triton.jit
def _store_gates(ptr, hidden, mask, v_i, v_f, v_g, v_o, dtype: tl.constexpr):
    """Stores the four gates' tiles at ptr, ptr + H, ptr + 2H, ptr + 3H, rounded to dtype."""
    tl.store(ptr, _round(v_i, dtype).to(dtype), mask=mask)
    tl.store(ptr + hidden, _round(v_f, dtype).to(dtype), mask=mask)
    tl.store(ptr + 2 * hidden, _round(v_g, dtype).to(dtype), mask=mask)
    tl.store(ptr + 3 * hidden, _round(v_o, dtype).to(dtype), mask=mask)


@triton.jit
def _load_gates(ptr, hidden, mask):
    """The four gates' float32 tiles at ptr, ptr + H, ptr + 2H, ptr + 3H (zero outside mask)."""
    v_i = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    v_f = tl.load(ptr + hidden, mask=mask, other=0.0).to(tl.float32)
    v_g = tl.load(ptr + 2 * hidden, mask=mask, other=0.0).to(tl.float32)
    v_o = tl.load(ptr + 3 * hidden, mask=mask, other=0.0).to(tl.float32)
    return v_i, v_f, v_g, v_o


@triton.jit
def _cell_outputs(c_cell, o, c_prev, h_prev, s, steps, mask_h, out_rows, cols, zoneout_c_ptr,
                  zoneout_h_ptr, c_all_ptr, h_all_ptr, hpre_all_ptr, h0_ptr, stride_h0_b,
                  stride_h0_p, prev, rows, batch, hidden, dtype: tl.constexpr,
                  HAS_PROJ: tl.constexpr, HAS_ZONEOUT_C: tl.constexpr,
                  HAS_ZONEOUT_H: tl.constexpr, RESIDENT: tl.constexpr):
    """Stores c_all[t] and hpre_all[t] (with a projection) or h_all[t] at columns ``cols``, from
    the new cell value c_cell (before rounding) and the output gate: h = o * tanh(c_cell), each
    lerped toward the previous state by its zoneout weight; rows that do not step carry their
    state. h_prev: the previous h on chip (RESIDENT, no projection). Returns (c, h, hpre)."""
    step_h = mask_h & steps
    hpre = _round(tl.where(step_h, o * _tanh(c_cell), 0.0), dtype)
    c_new = _round(c_cell, dtype)
    h_offsets = out_rows * hidden + cols[None, :]
    if HAS_ZONEOUT_C:  # the weight of the previous state: lerp(c_new, c, z)
        z_c = tl.load(zoneout_c_ptr + h_offsets, mask=step_h, other=0.0).to(tl.float32)
        c_new = _round(c_new + z_c * (c_prev - c_new), dtype)
    c_out = tl.where(steps, c_new, c_prev)
    tl.store(c_all_ptr + h_offsets, c_out.to(dtype), mask=mask_h)
    h_out = hpre
    if HAS_PROJ:
        tl.store(hpre_all_ptr + h_offsets, hpre.to(dtype), mask=mask_h)
    else:  # h is hpre (P = H, so BLOCK_P = BLOCK_H and the columns are the same)
        if not RESIDENT:
            h_prev = _state_before(s, h0_ptr, stride_h0_b, stride_h0_p, h_all_ptr, prev, rows,
                                   batch, cols, hidden)
        h_new = hpre
        if HAS_ZONEOUT_H:
            z_h = tl.load(zoneout_h_ptr + h_offsets, mask=step_h, other=0.0).to(tl.float32)
            h_new = _round(h_new + z_h * (h_prev - h_new), dtype)
        h_out = tl.where(step_h, h_new, h_prev)
        tl.store(h_all_ptr + h_offsets, h_out.to(dtype), mask=mask_h)
    return c_out, h_out, hpre


@triton.jit
def _row_sum(x, mask):
    """[BLOCK_B] sums of a tile's columns inside mask."""
    return tl.sum(tl.where(mask, x, 0.0), axis=1)


@triton.jit
def _lstm_layer_fwd_kernel(
    x_ptr, h0_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, batch_sizes_ptr, zoneout_c_ptr, zoneout_h_ptr,
    ln_hh_weight_ptr, ln_c_weight_ptr, ln_c_bias_ptr,
    h_all_ptr, c_all_ptr, gates_all_ptr, hpre_all_ptr, hh_norm_all_ptr, c_norm_all_ptr,
    rstd_all_ptr,
    seq_len, batch, hidden, state, eps,
    stride_x_t, stride_x_b, stride_x_g, stride_h0_b, stride_h0_p, stride_c0_b, stride_c0_h,
    stride_w_hh_row, stride_w_hh_col, stride_w_hr_row, stride_w_hr_col,
    HAS_PROJ: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr, REVERSE: tl.constexpr,
    HAS_ZONEOUT_C: tl.constexpr, HAS_ZONEOUT_H: tl.constexpr, LAYER_NORM: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """RESIDENT (H <= BLOCK_H, P <= BLOCK_P): the weights and the state stay on chip, and every
    loop over column blocks below runs once with constant bounds (folded by the compiler).
    Else each step streams the weight tiles and reads the previous state back from h_all /
    c_all, which this program wrote for its own rows (a block barrier orders the two).

    LAYER_NORM (the LN ops' step, fastattn/ops/_registry.py): the LNs need a row's moments
    before any of it can be normalized, so a step takes five passes over the column blocks:
    (1) the recurrent products and their row sums, (2) their variance, (3) the gates and the
    cell before its LN and its row sums, (4) the cell's variance, (5) the states. Streamed,
    pass 1 parks the raw products in hh_norm_all[t] and pass 3 the raw cell in c_norm_all[t]
    (float32), each normalized in place later; on chip they stay in registers. gates_all,
    hh_norm_all, c_norm_all and rstd_all are float32 then (the math dtype)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B] batch rows
    h_cols = tl.arange(0, BLOCK_H)  # hidden units (gate and c columns) of a column block
    p_cols = tl.arange(0, BLOCK_P)  # state units (h columns; P = H without projection)
    dtype = h_all_ptr.dtype.element_ty
    gates_dtype = gates_all_ptr.dtype.element_ty
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
        h = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)  # unused: read back per block
        c = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for s in range(seq_len):
        t = seq_len - 1 - s if REVERSE else s
        prev = tl.minimum(tl.maximum(t + 1 if REVERSE else t - 1, 0), seq_len - 1)
        if HAS_BATCH_SIZES:  # rows past batch_sizes[t] carry their state through this step
            steps_b = rows < tl.load(batch_sizes_ptr + t)
        else:
            steps_b = rows < batch
        steps = steps_b[:, None]
        x_t = x_ptr + t.to(tl.int64) * stride_x_t + rows[:, None].to(tl.int64) * stride_x_b
        out_rows = t.to(tl.int64) * batch + rows[:, None].to(tl.int64)  # rows of [T * B, *]
        if RESIDENT and HAS_PROJ:
            hpre = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)  # the projection's input
        if LAYER_NORM:
            hh_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
            pre_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)  # kept on chip if RESIDENT
            pre_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            pre_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            pre_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
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
            g_t = out_rows * (4 * hidden) + cols[None, :]  # offsets of gate i in [T, B, 4H]
            if LAYER_NORM:  # (1); padded columns hold zero products
                hh_sum += tl.sum(pre_i + pre_f + pre_g + pre_o, axis=1)
                if not RESIDENT:
                    _store_gates(hh_norm_all_ptr + g_t, hidden, mask_h, pre_i, pre_f, pre_g,
                                 pre_o, tl.float32)
            else:
                i, f, g, o = _activate(x_t, cols, stride_x_g, hidden, step_h, pre_i, pre_f,
                                       pre_g, pre_o)
                if not RESIDENT:
                    c = _state_before(s, c0_ptr, stride_c0_b, stride_c0_h, c_all_ptr, prev,
                                      rows, batch, cols, hidden)
                # Rows that do not step hold zeros in gates_all and hpre_all (the schema's
                # contract). The stored states are rounded already (exact conversions); the
                # gates are saved unrounded, in float32 (the backward's dc can cancel: module doc).
                _store_gates(gates_all_ptr + g_t, hidden, mask_h, tl.where(steps, i, 0.0),
                             tl.where(steps, f, 0.0), tl.where(steps, g, 0.0),
                             tl.where(steps, o, 0.0), gates_dtype)
                c_out, h_out, hpre_j = _cell_outputs(
                    f * c + i * g, o, c, h, s, steps, mask_h, out_rows, cols, zoneout_c_ptr,
                    zoneout_h_ptr, c_all_ptr, h_all_ptr, hpre_all_ptr, h0_ptr, stride_h0_b,
                    stride_h0_p, prev, rows, batch, hidden, dtype, HAS_PROJ, HAS_ZONEOUT_C,
                    HAS_ZONEOUT_H, RESIDENT)
                if RESIDENT:
                    c = c_out
                    if HAS_PROJ:
                        hpre = hpre_j
                    else:
                        h = h_out
        if LAYER_NORM:
            if not RESIDENT:
                tl.debug_barrier()
            hh_mean = hh_sum / (4 * hidden)
            hh_var = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for j0 in range(0, n_h, BLOCK_H):  # (2) two passes: no cancellation
                cols = j0 + h_cols
                mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
                g_t = out_rows * (4 * hidden) + cols[None, :]
                if not RESIDENT:
                    pre_i, pre_f, pre_g, pre_o = _load_gates(hh_norm_all_ptr + g_t, hidden,
                                                             mask_h)
                d_i = tl.where(mask_h, pre_i - hh_mean[:, None], 0.0)
                d_f = tl.where(mask_h, pre_f - hh_mean[:, None], 0.0)
                d_g = tl.where(mask_h, pre_g - hh_mean[:, None], 0.0)
                d_o = tl.where(mask_h, pre_o - hh_mean[:, None], 0.0)
                hh_var += tl.sum(d_i * d_i + d_f * d_f + d_g * d_g + d_o * d_o, axis=1)
            hh_rstd = 1.0 / tl.sqrt_rn(hh_var / (4 * hidden) + eps)
            c_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
            cell = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)  # kept on chip if RESIDENT
            o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for j0 in range(0, n_h, BLOCK_H):  # (3)
                cols = j0 + h_cols
                mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
                step_h = mask_h & steps
                g_t = out_rows * (4 * hidden) + cols[None, :]
                if not RESIDENT:
                    pre_i, pre_f, pre_g, pre_o = _load_gates(hh_norm_all_ptr + g_t, hidden,
                                                             mask_h)
                n_i = (pre_i - hh_mean[:, None]) * hh_rstd[:, None]
                n_f = (pre_f - hh_mean[:, None]) * hh_rstd[:, None]
                n_g = (pre_g - hh_mean[:, None]) * hh_rstd[:, None]
                n_o = (pre_o - hh_mean[:, None]) * hh_rstd[:, None]
                _store_gates(hh_norm_all_ptr + g_t, hidden, mask_h, tl.where(steps, n_i, 0.0),
                             tl.where(steps, n_f, 0.0), tl.where(steps, n_g, 0.0),
                             tl.where(steps, n_o, 0.0), tl.float32)
                w_ln_i, w_ln_f, w_ln_g, w_ln_o = _load_gates(ln_hh_weight_ptr + cols[None, :],
                                                             hidden, mask_h)
                i, f, g, o = _activate(x_t, cols, stride_x_g, hidden, step_h, n_i * w_ln_i,
                                       n_f * w_ln_f, n_g * w_ln_g, n_o * w_ln_o)
                _store_gates(gates_all_ptr + g_t, hidden, mask_h, tl.where(steps, i, 0.0),
                             tl.where(steps, f, 0.0), tl.where(steps, g, 0.0),
                             tl.where(steps, o, 0.0), tl.float32)
                if not RESIDENT:
                    c = _state_before(s, c0_ptr, stride_c0_b, stride_c0_h, c_all_ptr, prev,
                                      rows, batch, cols, hidden)
                cell = f * c + i * g
                c_sum += _row_sum(cell, mask_h)
                if not RESIDENT:
                    tl.store(c_norm_all_ptr + out_rows * hidden + cols[None, :], cell,
                             mask=mask_h)
            if not RESIDENT:
                tl.debug_barrier()
            c_mean = c_sum / hidden
            c_var = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for j0 in range(0, n_h, BLOCK_H):  # (4)
                cols = j0 + h_cols
                mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
                if not RESIDENT:
                    cell = tl.load(c_norm_all_ptr + out_rows * hidden + cols[None, :],
                                   mask=mask_h, other=0.0)
                d = tl.where(mask_h, cell - c_mean[:, None], 0.0)
                c_var += tl.sum(d * d, axis=1)
            c_rstd = 1.0 / tl.sqrt_rn(c_var / hidden + eps)
            for j0 in range(0, n_h, BLOCK_H):  # (5)
                cols = j0 + h_cols
                mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
                c_offsets = out_rows * hidden + cols[None, :]
                if not RESIDENT:
                    cell = tl.load(c_norm_all_ptr + c_offsets, mask=mask_h, other=0.0)
                    o = tl.load(gates_all_ptr + out_rows * (4 * hidden) + 3 * hidden
                                + cols[None, :], mask=mask_h, other=0.0)
                    c = _state_before(s, c0_ptr, stride_c0_b, stride_c0_h, c_all_ptr, prev,
                                      rows, batch, cols, hidden)
                c_norm = (cell - c_mean[:, None]) * c_rstd[:, None]
                tl.store(c_norm_all_ptr + c_offsets, tl.where(steps, c_norm, 0.0), mask=mask_h)
                c_weight = tl.load(ln_c_weight_ptr + cols, mask=cols < hidden, other=0.0).to(
                    tl.float32)
                c_bias = tl.load(ln_c_bias_ptr + cols, mask=cols < hidden, other=0.0).to(
                    tl.float32)
                c_out, h_out, hpre_j = _cell_outputs(
                    c_norm * c_weight[None, :] + c_bias[None, :], o, c, h, s, steps, mask_h,
                    out_rows, cols, zoneout_c_ptr, zoneout_h_ptr, c_all_ptr, h_all_ptr,
                    hpre_all_ptr, h0_ptr, stride_h0_b, stride_h0_p, prev, rows, batch, hidden,
                    dtype, HAS_PROJ, HAS_ZONEOUT_C, HAS_ZONEOUT_H, RESIDENT)
                if RESIDENT:
                    c = c_out
                    if HAS_PROJ:
                        hpre = hpre_j
                    else:
                        h = h_out
            rstd_t = rstd_all_ptr + (t.to(tl.int64) * batch + rows) * 2
            tl.store(rstd_t, tl.where(steps_b, hh_rstd, 0.0), mask=rows < batch)
            tl.store(rstd_t + 1, tl.where(steps_b, c_rstd, 0.0), mask=rows < batch)
        if HAS_PROJ:
            if not RESIDENT:
                tl.debug_barrier()  # hpre_all[t] of every column block is written
            for p0 in range(0, n_p, BLOCK_P):  # h = hpre @ w_hr^T, state columns p0 + p_cols
                cols_p = p0 + p_cols
                mask_p = (rows[:, None] < batch) & (cols_p[None, :] < state)
                if RESIDENT:
                    proj = tl.dot(hpre, w_r, input_precision="tf32x3")
                    h_prev = h
                else:
                    # [BLOCK_H (k), BLOCK_P (n)] = w_hr[p0 + n, k]
                    proj = _streamed_product(
                        tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32),
                        hpre_all_ptr + t.to(tl.int64) * batch * hidden, rows, batch, h_cols,
                        hidden, w_hr_ptr + p0 * stride_w_hr_row, stride_w_hr_col,
                        stride_w_hr_row, p_cols, state - p0, BLOCK_H)
                    h_prev = _state_before(s, h0_ptr, stride_h0_b, stride_h0_p, h_all_ptr,
                                           prev, rows, batch, cols_p, state)
                h_new = _round(proj, dtype)
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
def _cell_state_before(s, c_prev0, c0_ptr, stride_c0_b, stride_c0_h, c_all_ptr, prev, rows,
                       batch, cols, hidden, RESIDENT: tl.constexpr):
    """float32 c the forward's step ``s`` read at columns ``cols``; RESIDENT: c0 is c_prev0,
    loaded once (in the loop, a second (strided) load a step costs a layout conversion through
    shared memory: 4 KiB more of it for fp32 H = P = 32)."""
    if RESIDENT:
        c_prev = tl.where(s > 0, _tile(c_all_ptr + prev.to(tl.int64) * batch * hidden, rows,
                                       hidden, batch, cols, 1, hidden), c_prev0)
    else:
        c_prev = _state_before(s, c0_ptr, stride_c0_b, stride_c0_h, c_all_ptr, prev, rows,
                               batch, cols, hidden)
    return c_prev


@triton.jit
def _lstm_layer_bwd_kernel(
    grad_h_all_ptr, grad_c_all_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, batch_sizes_ptr, zoneout_c_ptr,
    zoneout_h_ptr, ln_hh_weight_ptr, ln_c_weight_ptr, ln_c_bias_ptr, c_all_ptr, gates_all_ptr,
    hh_norm_all_ptr, c_norm_all_ptr, rstd_all_ptr,
    grad_gates_all_ptr, grad_h0_ptr, grad_c0_ptr, grad_hy_all_ptr, grad_hh_all_ptr,
    grad_c_new_all_ptr,
    seq_len, batch, hidden, state,
    stride_c0_b, stride_c0_h, stride_w_hh_row, stride_w_hh_col, stride_w_hr_row, stride_w_hr_col,
    HAS_PROJ: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr, REVERSE: tl.constexpr,
    HAS_ZONEOUT_C: tl.constexpr, HAS_ZONEOUT_H: tl.constexpr, LAYER_NORM: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Float32 outputs, rounded to the input dtype by the caller (in torch: the Triton
    interpreter of triton 3.9 truncates float32 to bfloat16 instead of rounding to nearest):
    grad_h0 [B, P], grad_c0 [B, H]; grad_gates_all [T, B, 4H], the pre-activation gate
    gradients (grad_x_proj);
    grad_hy_all [T, B, P] float32 (HAS_PROJ): the gradient reaching h_new = hpre @ w_hr^T,
    which grad_w_hr needs. Both are zero on rows that do not step. The other inputs are
    contiguous (the launcher's copies) except c0 and the weights.
    grad_hh_all [T, B, 4H] float32: the gradient reaching h_prev @ w_hh^T, which dh_prev and
    grad_w_hh take: with LAYER_NORM, the LN backward of grad_gates_all; else grad_gates_all
    itself (the launcher passes the same buffer). grad_c_new_all [T, B, H] float32
    (LAYER_NORM): the gradient reaching the cell LN's output, for the LN weights' gradients.

    Per step, three phases over column blocks: (A) the gradient reaching h (and through the
    projection's output), (B) the gate gradients and dc per H block, (C) dh_prev = grad_hh @
    w_hh per P block. RESIDENT as in the forward: the weights and dh, dc stay on chip and each
    phase is one block; else dh and dc live in grad_h0 / grad_c0 (this program's rows) and the
    phases read back what the one before wrote, after a block barrier. With LAYER_NORM, (B)
    takes three passes, each LN's backward needing its row sums of the one before: (B1) the
    gradient reaching the cell LN's output and the o gate's, (B2) the cell LN backward: the
    i, f, g gates' gradients and dc, (B3) the recurrent LN backward: grad_hh."""
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
        c_prev0 = _tile(c0_ptr, rows, stride_c0_b, batch, h_cols, stride_c0_h, hidden)
    else:
        n_h = hidden
        n_p = state
        c_prev0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)  # unused: read per block
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
        if LAYER_NORM:  # row sums of each LN's output gradient dy and of dy * its output
            c_dy_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
            c_dyy_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
            hh_dy_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
            hh_dyy_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
            grad_c_new = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)  # on chip if RESIDENT
        for j0 in range(0, n_h, BLOCK_H):
            cols = j0 + h_cols
            mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
            step_h = mask_h & steps
            h_offsets = out_rows * hidden + cols[None, :]
            g_t = out_rows * (4 * hidden) + cols[None, :]  # offsets of gate i in [T, B, 4H]
            if HAS_PROJ:  # the gradient reaching hpre: dh_new @ w_hr
                if RESIDENT:
                    dh_hpre = tl.dot(dh_new, w_r, input_precision="tf32x3")
                else:  # [BLOCK_P (k), BLOCK_H (n)] = w_hr[k, j0 + n]
                    dh_hpre = _streamed_product(
                        tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32),
                        grad_hy_all_ptr + t.to(tl.int64) * batch * state, rows, batch, p_cols,
                        state, w_hr_ptr + j0 * stride_w_hr_col, stride_w_hr_row,
                        stride_w_hr_col, h_cols, hidden - j0, BLOCK_P)
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
            if LAYER_NORM:  # (B1): c_new = c_norm * ln_c_weight + ln_c_bias, h = o tanh(c_new)
                o = tl.load(gates_all_ptr + g_t + 3 * hidden, mask=step_h, other=0.0)
                c_norm = tl.load(c_norm_all_ptr + h_offsets, mask=step_h, other=0.0)
                c_weight = tl.load(ln_c_weight_ptr + cols[None, :], mask=mask_h, other=0.0).to(
                    tl.float32)
                c_bias = tl.load(ln_c_bias_ptr + cols[None, :], mask=mask_h, other=0.0).to(
                    tl.float32)
                tanh_c = _tanh(c_norm * c_weight + c_bias)
                grad_c_new_j = dc_new + dh_hpre * o * (1.0 - tanh_c * tanh_c)
                grad_o_j = dh_hpre * tanh_c * o * (1.0 - o)
                tl.store(grad_c_new_all_ptr + h_offsets, grad_c_new_j, mask=mask_h)
                tl.store(grad_gates_all_ptr + g_t + 3 * hidden, grad_o_j, mask=mask_h)
                c_dy_sum += tl.sum(grad_c_new_j * c_weight, axis=1)
                c_dyy_sum += tl.sum(grad_c_new_j * c_weight * c_norm, axis=1)
                hh_dy = grad_o_j * tl.load(ln_hh_weight_ptr + 3 * hidden + cols[None, :],
                                           mask=mask_h, other=0.0).to(tl.float32)
                hh_dy_sum += tl.sum(hh_dy, axis=1)
                hh_dyy_sum += tl.sum(hh_dy * tl.load(hh_norm_all_ptr + g_t + 3 * hidden,
                                                     mask=step_h, other=0.0), axis=1)
                if RESIDENT:
                    grad_c_new = grad_c_new_j
                    grad_o = grad_o_j
            else:
                i, f, g, o = _load_gates(gates_all_ptr + g_t, hidden, step_h)
                c_prev = _cell_state_before(s, c_prev0, c0_ptr, stride_c0_b, stride_c0_h,
                                            c_all_ptr, prev, rows, batch, cols, hidden, RESIDENT)
                # c_all[t] holds the zoned-out state; tanh needs the cell's own f c_prev + i g.
                tanh_c = _tanh(f * c_prev + i * g)
                d_cell = dc_new + dh_hpre * o * (1.0 - tanh_c * tanh_c)
                grad_i_j = d_cell * g * i * (1.0 - i)
                grad_f_j = d_cell * c_prev * f * (1.0 - f)
                grad_g_j = d_cell * i * (1.0 - g * g)
                grad_o_j = dh_hpre * tanh_c * o * (1.0 - o)
                _store_gates(grad_gates_all_ptr + g_t, hidden, mask_h, grad_i_j, grad_f_j,
                             grad_g_j, grad_o_j, tl.float32)
                dc_prev = d_cell * f
                if HAS_ZONEOUT_C:
                    dc_prev += dc_total * z_c
                dc_out = tl.where(step_h, dc_prev, dc_total)
                if RESIDENT:
                    dc = dc_out
                    grad_i, grad_f, grad_g, grad_o = grad_i_j, grad_f_j, grad_g_j, grad_o_j
                else:  # in place, as dh above
                    tl.store(grad_c0_ptr + c_offsets, dc_out, mask=mask_h)
        if LAYER_NORM:
            if not RESIDENT:
                tl.debug_barrier()
            rstd_t = rstd_all_ptr + out_rows * 2  # [BLOCK_B, 1]: both LNs' rstd of the rows
            row_mask = rows[:, None] < batch
            c_rstd = tl.load(rstd_t + 1, mask=row_mask, other=0.0)
            c_dy_mean = c_dy_sum[:, None] / hidden
            c_dyy_mean = c_dyy_sum[:, None] / hidden
            for j0 in range(0, n_h, BLOCK_H):  # (B2)
                cols = j0 + h_cols
                mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
                step_h = mask_h & steps
                h_offsets = out_rows * hidden + cols[None, :]
                g_t = out_rows * (4 * hidden) + cols[None, :]
                c_offsets = rows[:, None].to(tl.int64) * hidden + cols[None, :]
                if not RESIDENT:
                    grad_c_new = tl.load(grad_c_new_all_ptr + h_offsets, mask=mask_h, other=0.0)
                c_norm = tl.load(c_norm_all_ptr + h_offsets, mask=step_h, other=0.0)
                c_weight = tl.load(ln_c_weight_ptr + cols[None, :], mask=mask_h, other=0.0).to(
                    tl.float32)
                d_cell = tl.where(step_h, (grad_c_new * c_weight - c_dy_mean
                                           - c_norm * c_dyy_mean) * c_rstd, 0.0)
                i, f, g, _ = _load_gates(gates_all_ptr + g_t, hidden, step_h)
                c_prev = _cell_state_before(s, c_prev0, c0_ptr, stride_c0_b, stride_c0_h,
                                            c_all_ptr, prev, rows, batch, cols, hidden, RESIDENT)
                grad_i_j = d_cell * g * i * (1.0 - i)
                grad_f_j = d_cell * c_prev * f * (1.0 - f)
                grad_g_j = d_cell * i * (1.0 - g * g)
                tl.store(grad_gates_all_ptr + g_t, grad_i_j, mask=mask_h)
                tl.store(grad_gates_all_ptr + g_t + hidden, grad_f_j, mask=mask_h)
                tl.store(grad_gates_all_ptr + g_t + 2 * hidden, grad_g_j, mask=mask_h)
                w_ln_i, w_ln_f, w_ln_g, _ = _load_gates(ln_hh_weight_ptr + cols[None, :], hidden,
                                                        mask_h)
                n_i, n_f, n_g, _ = _load_gates(hh_norm_all_ptr + g_t, hidden, step_h)
                hh_dy_sum += tl.sum(grad_i_j * w_ln_i + grad_f_j * w_ln_f + grad_g_j * w_ln_g,
                                    axis=1)
                hh_dyy_sum += tl.sum(grad_i_j * w_ln_i * n_i + grad_f_j * w_ln_f * n_f
                                     + grad_g_j * w_ln_g * n_g, axis=1)
                dc_in = dc if RESIDENT else tl.load(grad_c0_ptr + c_offsets, mask=mask_h,
                                                    other=0.0)
                dc_total = dc_in + tl.load(grad_c_all_ptr + h_offsets, mask=mask_h,
                                           other=0.0).to(tl.float32)
                dc_prev = d_cell * f
                if HAS_ZONEOUT_C:
                    dc_prev += dc_total * tl.load(zoneout_c_ptr + h_offsets, mask=step_h,
                                                  other=0.0).to(tl.float32)
                dc_out = tl.where(step_h, dc_prev, dc_total)
                if RESIDENT:
                    dc = dc_out
                    grad_i, grad_f, grad_g = grad_i_j, grad_f_j, grad_g_j
                else:
                    tl.store(grad_c0_ptr + c_offsets, dc_out, mask=mask_h)
            if not RESIDENT:
                tl.debug_barrier()
            hh_rstd = tl.load(rstd_t, mask=row_mask, other=0.0)
            hh_dy_mean = hh_dy_sum[:, None] / (4 * hidden)
            hh_dyy_mean = hh_dyy_sum[:, None] / (4 * hidden)
            for j0 in range(0, n_h, BLOCK_H):  # (B3)
                cols = j0 + h_cols
                mask_h = (rows[:, None] < batch) & (cols[None, :] < hidden)
                step_h = mask_h & steps
                g_t = out_rows * (4 * hidden) + cols[None, :]
                if not RESIDENT:
                    grad_i, grad_f, grad_g, grad_o = _load_gates(grad_gates_all_ptr + g_t,
                                                                 hidden, mask_h)
                w_ln_i, w_ln_f, w_ln_g, w_ln_o = _load_gates(ln_hh_weight_ptr + cols[None, :],
                                                             hidden, mask_h)
                n_i, n_f, n_g, n_o = _load_gates(hh_norm_all_ptr + g_t, hidden, step_h)
                grad_i = tl.where(step_h, (grad_i * w_ln_i - hh_dy_mean - n_i * hh_dyy_mean)
                                  * hh_rstd, 0.0)
                grad_f = tl.where(step_h, (grad_f * w_ln_f - hh_dy_mean - n_f * hh_dyy_mean)
                                  * hh_rstd, 0.0)
                grad_g = tl.where(step_h, (grad_g * w_ln_g - hh_dy_mean - n_g * hh_dyy_mean)
                                  * hh_rstd, 0.0)
                grad_o = tl.where(step_h, (grad_o * w_ln_o - hh_dy_mean - n_o * hh_dyy_mean)
                                  * hh_rstd, 0.0)
                _store_gates(grad_hh_all_ptr + g_t, hidden, mask_h, grad_i, grad_f, grad_g,
                             grad_o, tl.float32)
        if not RESIDENT:
            tl.debug_barrier()
        # (C) dh_prev = sum over the gates of grad_hh @ w_hh, per block of P columns.
        for p0 in range(0, n_p, BLOCK_P):
            cols_p = p0 + p_cols
            mask_p = (rows[:, None] < batch) & (cols_p[None, :] < state)
            step_p = mask_p & steps
            dh_prev = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
            for k0 in range(0, n_h, BLOCK_H):
                if not RESIDENT:
                    gg_k = (grad_hh_all_ptr + t.to(tl.int64) * batch * 4 * hidden + k0)
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
    if hidden == 0 and state > 0:  # h = w_hr @ hpre would be an empty product, never written
        raise FastattnValueError(f"{op}: a projection w_hr [P, H] needs H > 0, got "
                                 f"{list(w_hr.shape)}")
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


def _check_ln_weights(op, hidden, like, ln_hh_weight, ln_c_weight, ln_c_bias) -> None:
    for name, tensor, size in (("ln_hh_weight", ln_hh_weight, 4 * hidden),
                               ("ln_c_weight", ln_c_weight, hidden),
                               ("ln_c_bias", ln_c_bias, hidden)):
        if tuple(tensor.shape) != (size,) or tensor.dtype != like.dtype or (
                tensor.device != like.device):
            raise FastattnValueError(
                f"{op}: {name} must be a {like.dtype} tensor of shape [{size}] on {like.device}, "
                f"got {tensor.dtype} {list(tensor.shape)} on {tensor.device}")


def _flags(w_hr, batch_sizes, reverse, zoneout_c, zoneout_h, layer_norm) -> dict:
    return dict(HAS_PROJ=w_hr is not None, HAS_BATCH_SIZES=batch_sizes is not None,
                REVERSE=bool(reverse), HAS_ZONEOUT_C=zoneout_c is not None,
                HAS_ZONEOUT_H=zoneout_h is not None, LAYER_NORM=layer_norm is not None)


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


@torch.library.triton_op("fastattn::lstm_ln_layer_fwd_triton", mutates_args=())
def lstm_ln_layer_fwd_triton(
    x_proj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    ln_hh_weight: torch.Tensor,
    ln_c_weight: torch.Tensor,
    ln_c_bias: torch.Tensor,
    eps: float,
    w_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor | None,
    reverse: bool,
    zoneout_c: torch.Tensor | None,
    zoneout_h: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(h_all [T, B, P], c_all [T, B, H], gates_all [T, B, 4H] float32, hpre_all, hh_norm_all
    [T, B, 4H], c_norm_all [T, B, H], rstd_all [T, B, 2], the last three float32), as
    fastattn::lstm_ln_layer_fwd (fastattn/ops/_registry.py); see the module doc."""
    op = "lstm_ln_layer_fwd_triton"
    seq_len, batch, hidden, state = _check_inputs(
        op, x_proj, h0, c0, w_hh, w_hr, batch_sizes, zoneout_c, zoneout_h)
    _check_ln_weights(op, hidden, x_proj, ln_hh_weight, ln_c_weight, ln_c_bias)
    h_all = x_proj.new_empty((seq_len, batch, state))
    c_all = x_proj.new_empty((seq_len, batch, hidden))
    hpre_all = x_proj.new_empty((seq_len, batch, hidden) if w_hr is not None else (0,))
    f32 = dict(dtype=torch.float32, device=x_proj.device)
    gates_all = torch.empty((seq_len, batch, 4 * hidden), **f32)
    hh_norm_all = torch.empty((seq_len, batch, 4 * hidden), **f32)
    c_norm_all = torch.empty((seq_len, batch, hidden), **f32)
    rstd_all = torch.empty((seq_len, batch, 2), **f32)
    lstm_layer_fwd_into(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h,
                        h_all, c_all, gates_all, hpre_all,
                        layer_norm=(ln_hh_weight, ln_c_weight, ln_c_bias, eps),
                        ln_saved=(hh_norm_all, c_norm_all, rstd_all))
    return h_all, c_all, gates_all, hpre_all, hh_norm_all, c_norm_all, rstd_all


def lstm_layer_fwd_into(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h,
                        h_all, c_all, gates_all, hpre_all, *, layer_norm=None,
                        ln_saved=None) -> None:
    """Launches the forward kernel, writing into contiguous outputs (checked by callers).
    layer_norm: (ln_hh_weight, ln_c_weight, ln_c_bias, eps) for the LN step, which also writes
    ln_saved = (hh_norm_all, c_norm_all, rstd_all); gates_all is float32 then."""
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
    ln_hh_weight, ln_c_weight, ln_c_bias, eps = layer_norm or (x_proj, x_proj, x_proj, 0.0)
    # The LN weights are read as contiguous rows ([4H] or [H]: a copy, if any, is cheap).
    ln_hh_weight, ln_c_weight, ln_c_bias = (w.contiguous() for w in (ln_hh_weight, ln_c_weight,
                                                                      ln_c_bias))
    hh_norm_all, c_norm_all, rstd_all = ln_saved or (gates_all, gates_all, gates_all)
    torch.library.wrap_triton(_lstm_layer_fwd_kernel)[(triton.cdiv(batch, BLOCK_B),)](
        x_proj, h0, c0, w_hh, w_hr_, sizes, zoneout_c_, zoneout_h_,
        ln_hh_weight, ln_c_weight, ln_c_bias,
        h_all, c_all, gates_all, hpre_all if w_hr is not None else h_all,
        hh_norm_all, c_norm_all, rstd_all,
        seq_len, batch, hidden, state, float(eps),
        x_proj.stride(0), x_proj.stride(1), x_proj.stride(2), h0.stride(0), h0.stride(1),
        c0.stride(0), c0.stride(1), w_hh.stride(0), w_hh.stride(1),
        w_hr_.stride(0), w_hr_.stride(1),
        **_flags(w_hr, batch_sizes, reverse, zoneout_c, zoneout_h, layer_norm),
        **_launch_shape(hidden, state),
    )


def _check_saved(op, seq_len, batch, hidden, state, proj, **saved) -> None:
    shapes = {"grad_h_all": (seq_len, batch, state), "grad_c_all": (seq_len, batch, hidden),
              "h_all": (seq_len, batch, state), "c_all": (seq_len, batch, hidden),
              "hpre_all": (seq_len, batch, hidden) if proj else (0,),
              "gates_all": (seq_len, batch, 4 * hidden),
              "hh_norm_all": (seq_len, batch, 4 * hidden), "c_norm_all": (seq_len, batch, hidden),
              "rstd_all": (seq_len, batch, 2)}
    for name, tensor in saved.items():
        if tuple(tensor.shape) != shapes[name]:
            raise FastattnValueError(f"{op}: {name} must have shape {list(shapes[name])}, got "
                                     f"{list(tensor.shape)}")


def _check_bwd_inputs(op, h0, c0, w_hh, w_hr, batch_sizes, zoneout_c, zoneout_h, saved,
                      saved_f32) -> tuple[int, int, int, int]:
    """A backward's checks before any launch; returns (T, B, H, P). The data dtype is h0's,
    checked as x_proj's would be; ``saved_f32`` holds the forward's float32 rows, the first a
    [T, B, 4H] one that gives the sizes; ``saved`` the rest, in the data dtype."""
    first_name, first = next(iter(saved_f32.items()))
    if first.dim() != 3 or first.shape[2] % 4 != 0:
        raise FastattnValueError(f"{op}: {first_name} must be [T, B, 4H], got "
                                 f"{list(first.shape)}")
    seq_len, batch, hidden, state = _check_inputs(
        op, h0.new_empty(()).expand(first.shape), h0, c0, w_hh, w_hr, batch_sizes, zoneout_c,
        zoneout_h)
    _check_saved(op, seq_len, batch, hidden, state, w_hr is not None, **saved, **saved_f32)
    for name, tensor in saved_f32.items():
        if tensor.dtype != torch.float32 or tensor.device != h0.device:
            raise FastattnTypeError(f"{op}: {name} must be float32 on {h0.device} (the "
                                    f"forward's), got {tensor.dtype} on {tensor.device}")
    return seq_len, batch, hidden, state


def _h_prev_all(h0, h_all, reverse):
    """[T, B, P]: the state each step read, h0 first, then the previous step's output."""
    if reverse:
        return torch.cat([h_all, h0.unsqueeze(0)])[1:]
    return torch.cat([h0.unsqueeze(0), h_all])[:h_all.shape[0]]


def _products(a, b):
    """a^T @ b in float32 over the [T, B, *] rows of both: a weight's gradient."""
    return a.reshape(-1, a.shape[-1]).float().t() @ b.reshape(-1, b.shape[-1]).float()


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
    seq_len, batch, hidden, state = _check_bwd_inputs(
        op, h0, c0, w_hh, w_hr, batch_sizes, zoneout_c, zoneout_h,
        dict(grad_h_all=grad_h_all, grad_c_all=grad_c_all, h_all=h_all, c_all=c_all,
             hpre_all=hpre_all), dict(gates_all=gates_all))
    dtype = h0.dtype
    # The gate gradients stay float32 until grad_w_hh has been summed from them.
    f32 = dict(dtype=torch.float32, device=h0.device)
    grad_gates_all = torch.empty((seq_len, batch, 4 * hidden), **f32)
    grad_hy_all = torch.empty((seq_len, batch, state) if w_hr is not None else (0,), **f32)
    grad_h0 = torch.empty((batch, state), **f32)
    grad_c0 = torch.empty((batch, hidden), **f32)
    lstm_layer_bwd_into(grad_h_all, grad_c_all, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                        zoneout_h, c_all, gates_all, grad_gates_all, grad_h0, grad_c0,
                        grad_hy_all)
    grad_w_hh = _products(grad_gates_all, _h_prev_all(h0, h_all, reverse)).to(dtype)
    grad_w_hr = _products(grad_hy_all, hpre_all).to(dtype) if w_hr is not None else (
        h0.new_empty(0))
    return (grad_gates_all.to(dtype), grad_h0.to(dtype), grad_c0.to(dtype), grad_w_hh,
            grad_w_hr)


@torch.library.triton_op("fastattn::lstm_ln_layer_bwd_triton", mutates_args=())
def lstm_ln_layer_bwd_triton(
    grad_h_all: torch.Tensor,
    grad_c_all: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    ln_hh_weight: torch.Tensor,
    ln_c_weight: torch.Tensor,
    ln_c_bias: torch.Tensor,
    w_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor | None,
    reverse: bool,
    zoneout_c: torch.Tensor | None,
    zoneout_h: torch.Tensor | None,
    h_all: torch.Tensor,
    c_all: torch.Tensor,
    gates_all: torch.Tensor,
    hpre_all: torch.Tensor,
    hh_norm_all: torch.Tensor,
    c_norm_all: torch.Tensor,
    rstd_all: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """(grad_x_proj [T, B, 4H], grad_h0, grad_c0, grad_w_hh, grad_ln_hh_weight,
    grad_ln_c_weight, grad_ln_c_bias, grad_w_hr or empty), as fastattn::lstm_ln_layer_bwd."""
    op = "lstm_ln_layer_bwd_triton"
    seq_len, batch, hidden, state = _check_bwd_inputs(
        op, h0, c0, w_hh, w_hr, batch_sizes, zoneout_c, zoneout_h,
        dict(grad_h_all=grad_h_all, grad_c_all=grad_c_all, h_all=h_all, c_all=c_all,
             hpre_all=hpre_all),
        dict(hh_norm_all=hh_norm_all, gates_all=gates_all, c_norm_all=c_norm_all,
             rstd_all=rstd_all))
    _check_ln_weights(op, hidden, h0, ln_hh_weight, ln_c_weight, ln_c_bias)
    dtype = h0.dtype
    f32 = dict(dtype=torch.float32, device=h0.device)
    grad_gates_all = torch.empty((seq_len, batch, 4 * hidden), **f32)
    grad_hh_all = torch.empty((seq_len, batch, 4 * hidden), **f32)
    grad_c_new_all = torch.empty((seq_len, batch, hidden), **f32)
    grad_hy_all = torch.empty((seq_len, batch, state) if w_hr is not None else (0,), **f32)
    grad_h0 = torch.empty((batch, state), **f32)
    grad_c0 = torch.empty((batch, hidden), **f32)
    lstm_layer_bwd_into(grad_h_all, grad_c_all, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                        zoneout_h, c_all, gates_all, grad_gates_all, grad_h0, grad_c0,
                        grad_hy_all, layer_norm=(ln_hh_weight, ln_c_weight, ln_c_bias),
                        ln_saved=(hh_norm_all, c_norm_all, rstd_all),
                        ln_grads=(grad_hh_all, grad_c_new_all))
    grad_w_hh = _products(grad_hh_all, _h_prev_all(h0, h_all, reverse)).to(dtype)
    grad_w_hr = _products(grad_hy_all, hpre_all).to(dtype) if w_hr is not None else (
        h0.new_empty(0))
    return (grad_gates_all.to(dtype), grad_h0.to(dtype), grad_c0.to(dtype), grad_w_hh,
            (grad_gates_all * hh_norm_all).sum((0, 1)).to(dtype),
            (grad_c_new_all * c_norm_all).sum((0, 1)).to(dtype),
            grad_c_new_all.sum((0, 1)).to(dtype), grad_w_hr)


def lstm_layer_bwd_into(grad_h_all, grad_c_all, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                        zoneout_h, c_all, gates_all, grad_gates_all, grad_h0, grad_c0,
                        grad_hy_all, *, layer_norm=None, ln_saved=None, ln_grads=None) -> None:
    """Launches the backward kernel, writing the float32 grad_gates_all [T, B, 4H],
    grad_hy_all [T, B, P] (with w_hr; else empty), grad_h0 [B, P] and grad_c0 [B, H], all
    contiguous. layer_norm: (ln_hh_weight, ln_c_weight, ln_c_bias) for the LN step, reading
    ln_saved = (hh_norm_all, c_norm_all, rstd_all) and writing ln_grads = (grad_hh_all,
    grad_c_new_all), both float32 and contiguous."""
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
    ln_hh_weight, ln_c_weight, ln_c_bias = (w.contiguous() for w in layer_norm or (c_all, c_all,
                                                                                c_all))
    hh_norm_all, c_norm_all, rstd_all = (t.contiguous() for t in ln_saved or (
        grad_gates_all, grad_gates_all, grad_gates_all))
    # Without the LN, dh_prev and grad_w_hh take the gate gradients themselves.
    grad_hh_all, grad_c_new_all = ln_grads or (grad_gates_all, grad_gates_all)
    torch.library.wrap_triton(_lstm_layer_bwd_kernel)[(triton.cdiv(batch, BLOCK_B),)](
        grad_h_all.contiguous(), grad_c_all.contiguous(), c0, w_hh, w_hr_, sizes, zoneout_c_,
        zoneout_h_, ln_hh_weight, ln_c_weight, ln_c_bias, c_all, gates_all.contiguous(),
        hh_norm_all, c_norm_all, rstd_all,
        grad_gates_all, grad_h0, grad_c0, grad_hy_all if w_hr is not None else grad_gates_all,
        grad_hh_all, grad_c_new_all,
        seq_len, batch, hidden, state,
        c0.stride(0), c0.stride(1), w_hh.stride(0), w_hh.stride(1),
        w_hr_.stride(0), w_hr_.stride(1),
        **_flags(w_hr, batch_sizes, reverse, zoneout_c, zoneout_h, layer_norm),
        **_launch_shape(hidden, state),
    )
