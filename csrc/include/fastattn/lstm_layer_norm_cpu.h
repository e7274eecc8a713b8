// Arguments of the CPU LayerNorm-LSTM row kernels (csrc/lstm/lstm_layer_norm_cpu.isa.cpp).
// Torch-free: the glue (csrc/lstm/lstm_layer_norm_cpu.cpp) fills them with data pointers of
// contiguous tensors.
//
// Row layouts as in lstm_cpu.h: gate chunks i, f, g, o; rows of [rows, 4H] / [rows, H] tensors
// follow each other. Data pointers are of the `dtype` type except those marked opmath: float32
// for bfloat16/float16 data, the data's type otherwise, the type the math runs in. The rows saved
// for the backward that feed its LayerNorm gradients (gates_act, hh_norm, c_norm, rstd) are opmath, so
// that the backward's cancellation-prone sums do not start from rounded bfloat16 values; so are
// the gradients the backward carries from step to step (dh, dc and what they are made from), so
// that they are not rounded to bfloat16 once per step.
#pragma once

#include <cstdint>

#include "fastattn/lstm_cpu.h"

namespace fastattn {

// One LayerNorm-LSTM forward step for `rows` rows (LN(v) = (v - mean(v)) * rstd(v), no affine):
//   hh_norm = LN(hh)                                   (hh = h_prev @ W_hh^T, over 4H)
//   i, f, g, o = activations of x_proj + hh_norm * ln_hh_weight
//   c_norm = LN(f * c_prev + i * g)                    (over H)
//   c_new = c_norm * ln_c_weight + ln_c_bias;  h_new = o * tanh(c_new)
//   c_out / h_out: c_new / h_new, lerped toward c_prev / h_prev by zoneout_c / zoneout_h.
// rstd[row] = (rstd of hh, rstd of the cell), each 1 / sqrt(var + eps).
struct LstmLnStepFwdArgs {
  Dtype dtype;
  int64_t rows;
  int64_t hidden;              // H
  double eps;
  const void* x_proj;          // [rows, 4H] normalized input projection (bias included)
  const void* hh;              // [rows, 4H] h_prev @ W_hh^T
  void* hh_norm;               // [rows, 4H] opmath: LN(hh)
  const void* ln_hh_weight;    // [4H]
  const void* ln_c_weight;     // [H]
  const void* ln_c_bias;       // [H]
  const void* c_prev;          // [rows, H]
  const void* zoneout_c;       // [rows, H] or nullptr
  const void* zoneout_h;       // [rows, H] or nullptr
  const void* h_prev;          // [rows, H], read only with zoneout_h
  void* gates_act;             // [rows, 4H] opmath: activated gates
  void* c_norm;                // [rows, H] opmath
  void* rstd;                  // [rows, 2] opmath
  void* c_out;                 // [rows, H]
  void* h_out;                 // [rows, H]
};

// The backward of one step, for `rows` rows, from the forward's saved rows:
//   dh_total = grad_h + grad_h_extra; dh_new = (1 - zoneout_h) * dh_total (zoneout_h * dh_total
//   goes to grad_h_prev, written only with zoneout_h);
//   grad_c_new = (1 - zoneout_c) * (grad_c + grad_c_extra) + dh_new * o * (1 - tanh(c_new)^2);
//   grad_c_prev = (the cell LN's and f's share) + zoneout_c * (grad_c + grad_c_extra);
//   grad_gates: pre-activation gradient (= the gradient of x_proj);
//   grad_hh: gradient of hh = h_prev @ W_hh^T (through hh's LN).
// grad_h_prev may alias grad_h and grad_c_prev may alias grad_c.
struct LstmLnStepBwdArgs {
  Dtype dtype;
  int64_t rows;
  int64_t hidden;
  const void* grad_h;          // [rows, H] opmath
  const void* grad_h_extra;    // [rows, H] or nullptr
  const void* grad_c;          // [rows, H] opmath
  const void* grad_c_extra;    // [rows, H] or nullptr
  const void* ln_hh_weight;    // [4H]
  const void* ln_c_weight;     // [H]
  const void* ln_c_bias;       // [H]
  const void* gates_act;       // [rows, 4H] opmath
  const void* hh_norm;         // [rows, 4H] opmath
  const void* c_norm;          // [rows, H] opmath
  const void* rstd;            // [rows, 2] opmath
  const void* c_prev;          // [rows, H]
  const void* zoneout_c;       // [rows, H] or nullptr
  const void* zoneout_h;       // [rows, H] or nullptr
  void* grad_gates;            // [rows, 4H]
  void* grad_hh;               // [rows, 4H] opmath
  void* grad_c_new;            // [rows, H] opmath (the cell LN's weight gradients come from it)
  void* grad_c_prev;           // [rows, H] opmath
  void* grad_h_prev;           // [rows, H] opmath, written only with zoneout_h
};

}  // namespace fastattn
