// The plain parameter structs the CUDA LSTM kernels take, and their torch-free launch entry
// points (defined in csrc/lstm/*.cu, called by the glue csrc/lstm/lstm_cuda.cpp).
// Shapes follow fastattn/ops/_registry.py: gate chunks in torch's order i, f, g, o
// (i, f, o sigmoid, g tanh); cy = f * cx + i * g, hy = o * tanh(cy). Math runs in float32
// for float16 / bfloat16 / float32 and in float64 for float64. Strides are in elements.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "fastattn/dtype.h"

namespace fastattn {

// Inputs: last dim contiguous, rows at any stride. Outputs: contiguous.
struct LstmCellFwdParams {
  Dtype dtype = Dtype::Float32;
  const void* gates = nullptr;  // [B, 4H] pre-activation
  const void* cx = nullptr;     // [B, H]
  void* hy = nullptr;           // [B, H]
  void* cy = nullptr;           // [B, H]
  int64_t gates_row_stride = 0, cx_row_stride = 0;
  int64_t batch = 0, hidden = 0;
};

struct LstmCellBwdParams {
  Dtype dtype = Dtype::Float32;
  const void* grad_hy = nullptr;  // [B, H]
  const void* grad_cy = nullptr;  // [B, H]
  const void* gates = nullptr;    // [B, 4H] pre-activation (the forward's input)
  const void* cx = nullptr;       // [B, H]
  const void* cy = nullptr;       // [B, H] (the forward's output)
  void* grad_gates = nullptr;     // [B, 4H] gradient of the pre-activation gates
  void* grad_cx = nullptr;        // [B, H]
  int64_t grad_hy_row_stride = 0, grad_cy_row_stride = 0, gates_row_stride = 0;
  int64_t cx_row_stride = 0, cy_row_stride = 0;
  int64_t batch = 0, hidden = 0;
};

// The LayerNorm stage of a LayerNorm-LSTM step (fastattn::lstm_ln_layer_*, _registry.py):
// gates = x_proj + LN(rec) * hh_weight, c_new = LN(f * c_prev + i * g) * c_weight + c_bias,
// LN over the row without affine, (v - mean) / sqrt(biased var + eps). hh_weight == nullptr: off.
struct LstmStepLayerNorm {
  const void* hh_weight = nullptr;  // [4H] dtype
  const void* c_weight = nullptr;   // [H] dtype
  const void* c_bias = nullptr;     // [H] dtype
  double eps = 0.0;
};

// One time step of a layer-direction op (fastattn::lstm_layer_fwd / _infer, and
// fastattn::lstm_ln_layer_fwd with ln), the part after the recurrent GEMM; the cell op
// (LstmCellFwdParams) is the same step without options.
// Rows b < stepping step, the others carry their state (see _registry.py, batch_sizes).
// Row-strided inputs: last dim contiguous. Outputs and rec: contiguous [B, width] rows.
// With ln: rec is required, and gates_out, hh_norm_out, c_norm_out, rstd_out (the rows the
// backward reads, zeros for carried rows) are all required and in the math type.
struct LstmStepFwdParams {
  Dtype dtype = Dtype::Float32;
  const void* x_proj = nullptr;     // [B, 4H] the input's share of the pre-activation gates
  const void* rec = nullptr;        // [B, 4H] h_prev @ w_hh^T (rows < stepping) in the math
                                    // type (float32 for half types), or nullptr
  const void* c_prev = nullptr;     // [B, H]
  const void* h_prev = nullptr;     // [B, H] without projection (zoneout_h, carried rows)
  const void* zoneout_c = nullptr;  // [B, H] weight of c_prev, or nullptr
  const void* zoneout_h = nullptr;  // [B, H] weight of h_prev (no projection), or nullptr
  void* c_out = nullptr;            // [B, H]
  void* h_out = nullptr;            // [B, H] the new h; hpre = o * tanh(c) when projecting
  void* gates_out = nullptr;        // [B, 4H] activated gates in the math type (zeros for
                                    // carried rows), or nullptr; see LstmStepBwdParams
  int64_t x_proj_row_stride = 0, c_prev_row_stride = 0, h_prev_row_stride = 0;
  int64_t batch = 0, hidden = 0, stepping = 0;
  bool project = false;  // h_out is hpre (zeros for carried rows; zoneout_h applies after w_hr)
  LstmStepLayerNorm ln;
  void* hh_norm_out = nullptr;      // [B, 4H] LN(rec)
  void* c_norm_out = nullptr;       // [B, H] LN(f * c_prev + i * g)
  void* rstd_out = nullptr;         // [B, 2] 1 / sqrt(var + eps) of rec and of the cell
};

// With projection, after h_out[:stepping] = hpre @ w_hr^T was written by a GEMM: zoneout_h
// mixing of the stepped rows and the carried rows' h_prev. Every [B, P] tensor contiguous.
struct LstmProjectionFwdParams {
  Dtype dtype = Dtype::Float32;
  void* h = nullptr;                // [B, P] in: projected h_new (rows < stepping); out: state
  const void* h_prev = nullptr;     // [B, P]
  const void* zoneout_h = nullptr;  // [B, P] or nullptr
  int64_t batch = 0, width = 0, stepping = 0;
};

// The backward of one step (and of the cell op: gates pre-activation, c_new given, no carried
// gradients, grad_dtype == dtype). The gradients reaching the step are incoming (dtype, the
// gradient of this step's outputs h_all[t] / c_all[t]) plus carried (grad_dtype, from the later
// steps). Outputs in grad_dtype: grad_gates (pre-activation; zeros for carried rows),
// grad_c_prev, and carried_h overwritten in place by the part of the h gradient that skips the
// recurrent GEMM (zoneout_h's share, all of it for carried rows); the caller adds
// grad_gates @ w_hh to it. Row-strided inputs: last dim contiguous; the rest contiguous.
// Activated gates come in the math type because dc = grad_c + grad_h * o * (1 - tanh^2(c)) can
// cancel: gates rounded to a half type would reach dc magnified (percent-level grad c_prev).
// With ln (the LayerNorm-LSTM step): grad_dtype is the math type; gates (activated), hh_norm,
// c_norm and rstd are the forward's saved rows, in the math type; c_new is unused; the outputs
// add grad_hh (of rec: the caller adds grad_hh @ w_hh to carried_h instead of grad_gates @ w_hh)
// and grad_c_new (of the cell LN's output, for its weight gradients), zeros for carried rows.
struct LstmStepBwdParams {
  Dtype dtype = Dtype::Float32;       // gates, c_prev, c_new, grad_h, grad_c, zoneout_*
  Dtype grad_dtype = Dtype::Float32;  // carried_*, grad_hpre, grad_gates, grad_c_prev
  const void* gates = nullptr;        // [B, 4H] pre-activation (dtype), or activated in the
                                      // math type if gates_activated (the forward's gates_out)
  const void* c_prev = nullptr;       // [B, H]
  const void* c_new = nullptr;        // [B, H] f * c_prev + i * g, or nullptr: recomputed
  const void* grad_h = nullptr;       // [B, H] incoming h gradient (no projection), or nullptr
  const void* grad_c = nullptr;       // [B, H] incoming c gradient
  const void* grad_hpre = nullptr;    // [B, H] gradient of hpre (projection), or nullptr
  void* carried_h = nullptr;          // [B, H] in/out (no projection), or nullptr
  const void* carried_c = nullptr;    // [B, H], or nullptr (may equal grad_c_prev)
  const void* zoneout_c = nullptr;    // [B, H], or nullptr
  const void* zoneout_h = nullptr;    // [B, H] (no projection), or nullptr
  void* grad_gates = nullptr;         // [B, 4H]
  void* grad_c_prev = nullptr;        // [B, H]
  int64_t gates_row_stride = 0, c_prev_row_stride = 0, c_new_row_stride = 0;
  int64_t grad_h_row_stride = 0, grad_c_row_stride = 0;
  int64_t batch = 0, hidden = 0, stepping = 0;
  bool gates_activated = false;
  LstmStepLayerNorm ln;
  const void* hh_norm = nullptr;      // [B, 4H]
  const void* c_norm = nullptr;       // [B, H]
  const void* rstd = nullptr;         // [B, 2]
  void* grad_hh = nullptr;            // [B, 4H]
  void* grad_c_new = nullptr;         // [B, H]
};

// The projection's share of a step backward: total = carried_h + grad_h (the gradient of the
// [B, P] state); rows < stepping: grad_proj = total * (1 - zoneout_h), carried_h = total *
// zoneout_h; carried rows: grad_proj = 0, carried_h = total. The caller then computes the hpre
// gradient grad_proj @ w_hr and adds grad_gates @ w_hh to carried_h. Contiguous [B, P].
struct LstmProjectionBwdParams {
  Dtype dtype = Dtype::Float32;       // grad_h, zoneout_h
  Dtype grad_dtype = Dtype::Float32;  // carried_h, grad_proj
  const void* grad_h = nullptr;
  const void* zoneout_h = nullptr;    // or nullptr
  void* carried_h = nullptr;          // in/out
  void* grad_proj = nullptr;
  int64_t batch = 0, width = 0, stepping = 0;
};

// One layer, one direction, over a whole sequence: every tensor contiguous.
//   x_proj [T, B, 4H] = x @ W_ih^T + b_ih + b_hh;  h0, c0 [B, H];  w_hh [4H, H]
//   -> h_all, c_all [T, B, H] (states after each step), gates_all [T, B, 4H] ACTIVATED gates
//      (i, f, g, o after sigmoid / tanh) in the math type, as lstm_layer_bwd reads them.
struct LstmSequenceFwdParams {
  Dtype dtype = Dtype::Float32;
  const void* x_proj = nullptr;
  const void* h0 = nullptr;
  const void* c0 = nullptr;
  const void* w_hh = nullptr;
  void* h_all = nullptr;
  void* c_all = nullptr;
  void* gates_all = nullptr;
  int64_t seq_len = 0, batch = 0, hidden = 0;
  bool reverse = false;  // steps t = T-1 .. 0, the first reading h0 / c0
  // Device int64 [T], or nullptr: only rows < batch_sizes[t] step at time t; the others carry
  // their state through it (gates_all zero), as in LstmStepFwdParams::stepping.
  const int64_t* batch_sizes = nullptr;
  // [T, B, H] in the data dtype, or nullptr: zoneout weights of the previous c / h
  // (LstmStepFwdParams).
  const void* zoneout_c = nullptr;
  const void* zoneout_h = nullptr;
};

// Its backward, for the same problem (no options): every tensor contiguous.
//   grad_h_all, grad_c_all [T, B, H] (the outputs' gradients, the data dtype); c0 [B, H];
//   c_all [T, B, H] and gates_all [T, B, 4H] (activated, math type) as the forward saved them;
//   w_hh [4H, H]
//   -> grad_gates_all [T, B, 4H] (of x_proj, pre-activation), grad_h0, grad_c0 [B, H], all in
//      the math type, as lstm_layer_bwd's loop keeps them; the weight gradients are GEMMs over
//      grad_gates_all afterwards.
struct LstmSequenceBwdParams {
  Dtype dtype = Dtype::Float32;
  const void* grad_h_all = nullptr;
  const void* grad_c_all = nullptr;
  const void* c0 = nullptr;
  const void* c_all = nullptr;
  const void* gates_all = nullptr;
  const void* w_hh = nullptr;
  void* grad_gates_all = nullptr;
  void* grad_h0 = nullptr;
  void* grad_c0 = nullptr;
  int64_t seq_len = 0, batch = 0, hidden = 0;
  bool reverse = false;                   // the forward ran reversed
  const int64_t* batch_sizes = nullptr;   // as the forward's: a carried row's gates get zero
  const void* zoneout_c = nullptr;        // as the forward's
  const void* zoneout_h = nullptr;
};

// The persistent sequence kernels keep each CTA's slice of w_hh in shared memory; they serve
// hidden sizes up to this on sm_80 and newer devices that support cooperative launches.
constexpr int64_t kLstmSequenceMaxHidden = 256;

cudaError_t launch_lstm_cell_fwd(const LstmCellFwdParams& params, cudaStream_t stream);
cudaError_t launch_lstm_cell_bwd(const LstmCellBwdParams& params, cudaStream_t stream);
cudaError_t launch_lstm_step_fwd(const LstmStepFwdParams& params, cudaStream_t stream);
cudaError_t launch_lstm_step_bwd(const LstmStepBwdParams& params, cudaStream_t stream);
cudaError_t launch_lstm_projection_fwd(const LstmProjectionFwdParams& params, cudaStream_t stream);
cudaError_t launch_lstm_projection_bwd(const LstmProjectionBwdParams& params, cudaStream_t stream);
// Launches on the current device; cudaErrorCooperativeLaunchTooLarge when the grid the
// problem needs cannot be co-resident on it.
cudaError_t launch_lstm_sequence_fwd(const LstmSequenceFwdParams& params, cudaStream_t stream);
cudaError_t launch_lstm_sequence_bwd(const LstmSequenceBwdParams& params, cudaStream_t stream);
// Whether launch_lstm_sequence_fwd / _bwd can serve a problem of this dtype and size on the
// current device (hidden size, sm_80+, cooperative launches, a co-resident grid): the layer
// ops' choice of the kernels.
bool lstm_sequence_fwd_fits(Dtype dtype, int64_t batch, int64_t hidden);
bool lstm_sequence_bwd_fits(Dtype dtype, int64_t batch, int64_t hidden);

}  // namespace fastattn
