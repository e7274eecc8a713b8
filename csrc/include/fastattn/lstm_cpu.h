// Arguments of the CPU LSTM layer kernels (csrc/lstm/lstm_cpu.isa.cpp). Torch-free: the glue
// (csrc/lstm/lstm_cpu.cpp) fills them with data pointers and strides.
//
// One layer in one direction over a padded sequence, as the fastattn::lstm_layer_* ops define it
// (fastattn/ops/_registry.py). Gate chunks are in torch's order i, f, g, o. Sizes: T steps, B rows,
// H cell units, P = projected width (H without projection), G = 4H.
//
// Data tensors are seen through LstmSeqView strides, so any layout works. The fast one depends on
// where the kernels put their vector lanes (lstm_unit_lanes_below): along the batch, a batch stride of 1,
// step-major ([T, 4H, B] in memory) the fastest; along the units, row-major [T, B, F].
// fastattn.ops.lstm computes x_proj in the fast layout, and the glue allocates gates_all and
// grad_x_proj in x_proj's.
// Weights are contiguous and, like the saved gates_all, in the math type: float for
// float32/bfloat16/float16 data, double for float64 (w_hh bf16 with LstmLayerShape::bf16_products).
#pragma once

#include <cstdint>

#include "fastattn/dtype.h"

namespace fastattn {

// One step's gate pre-activations for a batch of a few rows, float32:
// gates[b, j] = bias[j] + x[b, :] . w_ih[j, :] + h[b, :] . w_hh[j, :] for b < B, j < G. Every
// matrix is row-major with unit column stride; ld* are row strides in elements.
struct LstmStepGatesArgs {
  int64_t B, G, I, P;
  const float* x;
  int64_t ldx;
  const float* h;
  int64_t ldh;
  const float* w_ih;
  int64_t ld_ih;
  const float* w_hh;
  int64_t ld_hh;
  const float* bias;  // [G], or nullptr
  float* gates;
  int64_t ld_gates;
};

// A [T, B, F] tensor: element (t, b, f) at data + t * st + b * sb + f * sf (in elements).
// data == nullptr means the tensor is absent. A [B, F] state is a view with T = 1.
struct LstmSeqView {
  void* data = nullptr;
  int64_t st = 0, sb = 0, sf = 0;
};

struct LstmLayerShape {
  Dtype dtype;               // of every LstmSeqView but gates_all (math type)
  int64_t T, B, H, P;
  bool reverse;                  // steps run t = T-1 .. 0
  const int64_t* batch_sizes;    // [T] non-increasing, or nullptr (all B rows step every time)
  // The recurrent products run on oneDNN's brgemm in bf16 (a bf16 layer with w_hh and no w_hr,
  // where lstm_bf16_rows_on_brgemm() says so; the glue decides): w_hh is then bf16, as given.
  bool bf16_products = false;
};

// Forward. Per step: gates = x_proj[t] + h_prev @ w_hh^T; i, f, o = sigmoid, g = tanh;
// c_new = f * c_prev + i * g; hpre = o * tanh(c_new); h_new = w_hr ? hpre @ w_hr^T : hpre;
// c = lerp(c_new, c_prev, zoneout_c[t]), h = lerp(h_new, h_prev, zoneout_h[t]).
// Rows b >= batch_sizes[t] carry h and c unchanged and get zero gates_all / hpre_all.
struct LstmLayerFwdArgs {
  LstmLayerShape shape;
  const void* w_hh;              // [G, P], or nullptr for no recurrent term (h0 then only
                                 // carried and mixed by zoneout)
  const void* w_hr;              // [P, H] or nullptr
  LstmSeqView x_proj;            // [T, B, G] pre-activation input part (biases included)
  LstmSeqView h0, c0;            // [B, P], [B, H]
  LstmSeqView zoneout_c, zoneout_h;  // [T, B, H], [T, B, P] weights of the previous state, or absent
  LstmSeqView h_all, c_all;      // out [T, B, P], [T, B, H]: state after each step
  // out [T, B, G]: activated gates (what the backward reads), in the math type. The backward
  // recomputes tanh(c_new) from them, and in dc = grad_c + grad_h * o * (1 - tanh^2(c_new)) the
  // two terms can cancel: gates rounded to bfloat16 made grad c0 several percent wrong.
  LstmSeqView gates_all;
  LstmSeqView hpre_all;          // out [T, B, H] with w_hr (else absent)
};

// Backward of the forward above, from its saved activated gates and cell states.
struct LstmLayerBwdArgs {
  LstmLayerShape shape;
  const void* w_hh;              // [G, P], or nullptr for no recurrent term
  const void* w_hr;              // [P, H] or nullptr
  LstmSeqView grad_h_all;        // [T, B, P] gradient of h_all
  LstmSeqView grad_c_all;        // [T, B, H] gradient of c_all, or absent (zero)
  LstmSeqView c0, c_all;
  LstmSeqView gates_all;         // [T, B, G], in the math type (as the forward saves it)
  LstmSeqView zoneout_c, zoneout_h;
  LstmSeqView grad_x_proj;       // out [T, B, G] (pre-activation gate gradients)
  LstmSeqView grad_h0;           // out [B, P]
  LstmSeqView grad_c0;           // out [B, H]
  LstmSeqView grad_hproj_all;    // out [T, B, P] gradient of hpre @ w_hr^T, with w_hr (else absent)
};

}  // namespace fastattn
