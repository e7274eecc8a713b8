// The CPU LSTM's whole-sequence float32 GEMMs (the inference input projection, the recurrent
// weight gradient) through ATen's oneDNN micro-kernels (at::native::cpublas::brgemm) on B panels
// we pack, instead of torch.mm: on the 2-core AMD EPYC (Zen 4) torch.mm goes to MKL, whose code
// path there reached 80-94 GFLOP/s on these shapes at one thread, oneDNN's AVX-512 brgemm
// 100-107 (FMA peak 114).
#pragma once

#include <ATen/ATen.h>

namespace fastattn::lstm_gemm {

// out (accumulate ? += : =) a @ b (+ row_bias[:, None] when given and not accumulating), for
// float32 2-D CPU tensors with unit column stride in out and a (b: any strides). Returns false,
// leaving out untouched, where these do not hold or oneDNN's float32 brgemm does not run on this
// CPU: the caller then uses at::mm / at::addmm.
bool mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
            const at::Tensor& row_bias = at::Tensor());

}  // namespace fastattn::lstm_gemm
