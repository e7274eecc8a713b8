// dst = src^T for float32 CPU matrices, across threads on the register-blocked transposes of the
// widest ISA (cpu_transpose.h). at::Tensor::copy_ of a transposed view runs on one thread through
// scalar blocks: the LSTM's [T * B, 4H] gate gradients (6 MB at T64 B24 H256) took 0.89 ms of a
// ~17 ms training step on the Zen 5 EPYC.
#pragma once

#include <ATen/ATen.h>

namespace fastattn {

// dst [C, R] = src [R, C]^T. float32 CPU matrices with unit column strides that do not overlap
// run on the kernel; anything else on dst.copy_(src.t()).
void transpose_copy(const at::Tensor& dst, const at::Tensor& src);

// t.contiguous() for a matrix, through transpose_copy where t is a float32 one's transposed view
// (w.t() for a weight w, as the LSTM's input gradients pass it).
at::Tensor contiguous_matrix(const at::Tensor& t);

}  // namespace fastattn
