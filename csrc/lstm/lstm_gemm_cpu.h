// The CPU LSTM's float32 input projection (inference and training) through ATen's oneDNN
// micro-kernels (at::native::cpublas::brgemm) on B panels we pack, instead of torch.mm: on the
// 2-core AMD EPYC (Zen 4) torch.mm goes to MKL, whose code path there reached 84-96 GFLOP/s on
// these shapes at one thread, oneDNN's AVX-512 brgemm 99-107 (FMA peak 114). The gradient into the
// input stays on torch.mm: it reduces over 4H, and its packed panels fall out of L2 (brgemm 56-65
// GFLOP/s there, MKL 79-87).
#pragma once

#include <ATen/ATen.h>

namespace fastattn::lstm_gemm {

// out = a @ b (+ row_bias[:, None] when given), for float32 2-D CPU tensors with unit column
// stride in out and a (b: any strides). Returns false, leaving out untouched, where these do not
// hold, where oneDNN's float32 brgemm does not run on this CPU, or where FASTATTN_LSTM_GEMM=torch:
// the caller then uses at::mm / at::addmm.
//
// oneDNN compiles a kernel per block shape and leading dims, so every one here depends on a's
// shape (the weights') and, only where b has fewer than 64 columns, on their count rounded up
// to 16: never on T * B itself, which changes from call to call.
bool mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
            const at::Tensor& row_bias = at::Tensor());

}  // namespace fastattn::lstm_gemm
