// The CPU LSTM kernels' dtype switch, shared by every per-ISA kernel file.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fastattn/lstm_cpu.h"

namespace fastattn {

// Calls fn with a value of dtype's C++ type (fn(float{}), fn(c10::BFloat16{}), ...), so a
// generic lambda instantiates its kernel template with decltype of it.
template <typename Fn>
void visit_lstm_dtype(Dtype dtype, const Fn& fn) {
  switch (dtype) {
    case Dtype::Float32: return fn(float{});
    case Dtype::Float64: return fn(double{});
    case Dtype::BFloat16: return fn(c10::BFloat16{});
    case Dtype::Float16: return fn(c10::Half{});
  }
}

}  // namespace fastattn
