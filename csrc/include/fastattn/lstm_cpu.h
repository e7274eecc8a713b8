// Arguments of the CPU LSTM pointwise kernels (csrc/lstm/lstm_cpu.isa.cpp). Torch-free: the
// glue (csrc/lstm/lstm_cpu.cpp) fills them with data pointers of contiguous tensors.
//
// Gate chunks are in torch's order i, f, g, o. Every row of a [rows, 4H] gate tensor and of a
// [rows, H] state tensor is contiguous and rows follow each other (row stride 4H / H).
// Math runs in float32 for bfloat16/float16 data, in the data's type otherwise.
#pragma once

#include <cstdint>

namespace fastattn {

enum class LstmDtype { Float32, Float64, BFloat16, Float16 };

// One forward step for `rows` rows:
//   i, f, o = sigmoid(gates chunks), g = tanh(gates chunk);  c_new = f * c_prev + i * g;
//   h_new = o * tanh(c_new);
//   c_out = zoneout_c ? zoneout_c * c_prev + (1 - zoneout_c) * c_new : c_new;
//   h_out = zoneout_h ? zoneout_h * h_prev + (1 - zoneout_h) * h_new : h_new.
struct LstmStepFwdArgs {
  LstmDtype dtype;
  int64_t rows;
  int64_t hidden;            // H
  const void* gates;         // [rows, 4H] pre-activation
  void* gates_act;           // [rows, 4H] activated gates out (may alias gates), or nullptr
  const void* c_prev;        // [rows, H]
  void* c_out;               // [rows, H]
  void* h_out;               // [rows, H]
  const void* zoneout_c;     // [rows, H] or nullptr
  const void* zoneout_h;     // [rows, H] or nullptr
  const void* h_prev;        // [rows, H], read only with zoneout_h
};

// The backward of one step, for `rows` rows:
//   dh_total = grad_h + grad_h_extra;  dh_new = zoneout_h ? (1 - zoneout_h) * dh_total : dh_total
//   (and grad_h_prev = zoneout_h * dh_total is written only with zoneout_h);
//   dc_total = grad_c + grad_c_extra;
//   dc_new = (zoneout_c ? (1 - zoneout_c) * dc_total : dc_total) + dh_new * o * (1 - tanh(c_new)^2)
//   grad_gates (pre-activation) from di = dc_new * g, df = dc_new * c_prev, dg = dc_new * i,
//   do = dh_new * tanh(c_new);  grad_c_prev = dc_new * f (+ zoneout_c * dc_total).
struct LstmStepBwdArgs {
  LstmDtype dtype;
  int64_t rows;
  int64_t hidden;
  const void* grad_h;        // [rows, H]
  const void* grad_h_extra;  // [rows, H] or nullptr
  const void* grad_c;        // [rows, H]
  const void* grad_c_extra;  // [rows, H] or nullptr
  const void* gates;         // [rows, 4H]: activated, or pre-activation if gates_preactivation
  bool gates_preactivation;
  const void* c_prev;        // [rows, H]
  const void* c_new;         // [rows, H] f * c_prev + i * g, or nullptr to recompute it
  const void* zoneout_c;     // [rows, H] or nullptr
  const void* zoneout_h;     // [rows, H] or nullptr
  void* grad_gates;          // [rows, 4H]
  void* grad_c_prev;         // [rows, H]
  void* grad_h_prev;         // [rows, H], written only with zoneout_h
};

}  // namespace fastattn
