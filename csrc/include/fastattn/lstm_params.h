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

// One layer, one direction, over a whole sequence: every tensor contiguous.
//   x_proj [T, B, 4H] = x @ W_ih^T + b_ih + b_hh;  h0, c0 [B, H];  w_hh [4H, H]
//   -> h_all, c_all [T, B, H] (states after each step), gates_all [T, B, 4H] ACTIVATED gates
//      (i, f, g, o after sigmoid / tanh), as the backward in fastattn/ops/lstm.py expects.
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
};

// The persistent sequence kernel keeps each CTA's slice of w_hh in shared memory; it serves
// hidden sizes up to this on sm_80 and newer devices that support cooperative launches.
constexpr int64_t kLstmSequenceMaxHidden = 256;

cudaError_t launch_lstm_cell_fwd(const LstmCellFwdParams& params, cudaStream_t stream);
cudaError_t launch_lstm_cell_bwd(const LstmCellBwdParams& params, cudaStream_t stream);
// Launches on the current device; cudaErrorCooperativeLaunchTooLarge when the grid the
// problem needs cannot be co-resident on it.
cudaError_t launch_lstm_sequence_fwd(const LstmSequenceFwdParams& params, cudaStream_t stream);

}  // namespace fastattn
