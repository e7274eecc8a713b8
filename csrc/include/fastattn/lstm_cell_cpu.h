// Arguments of the CPU LSTM cell pointwise kernels (csrc/lstm/lstm_cpu.isa.cpp). Torch-free: the
// glue (csrc/lstm/lstm_cpu.cpp) fills them with data pointers of contiguous tensors.
#pragma once

#include <cstdint>

#include "fastattn/dtype.h"

namespace fastattn {

// The pointwise part of one cell step on the cell ops' row-major data (contiguous [B, 4H] gates
// and [B, H] states), vectorized along the features: the layer kernels vectorize along the
// batch, which on this layout would gather every lane. Forward: hy, cy from gates and cx.
// Backward: grad_gates and grad_cx from gates, cx, grad_hy and grad_cy.
struct LstmCellPointwiseArgs {
  Dtype dtype;                   // of every tensor
  int64_t B, H;
  const void* gates;             // [B, 4H] pre-activation gates (biases and both GEMMs included)
  const void* cx;                // [B, H]
  const void* grad_hy;           // [B, H] (backward)
  const void* grad_cy;           // [B, H] (backward)
  void* hy;                      // out [B, H] (forward)
  void* cy;                      // out [B, H] (forward)
  void* grad_gates;              // out [B, 4H] (backward)
  void* grad_cx;                 // out [B, H] (backward)
};

}  // namespace fastattn
