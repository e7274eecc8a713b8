// fastattn's own float32 CPU GEMMs (the LSTM's projections and weight gradients, the
// fastattn::linear op) through ATen's oneDNN micro-kernels (at::native::cpublas::brgemm) on B
// panels we pack, instead of torch.mm: on AMD, torch.mm goes to MKL, which runs its AVX2 code
// there (~210 GFLOP/s on 2 cores of the Zen 4 and the Zen 5 alike; oneDNN's AVX-512 brgemm
// ~400-450 on the Zen 5, 99-107 a core against MKL's 84-96 on the Zen 4).
#pragma once

#include <ATen/ATen.h>

namespace fastattn::cpu_gemm {

// a @ b (+ row_bias[:, None], + col_bias[None, :], each when given) into a contiguous out
// [S, M, N / S], for float32 CPU tensors a [M, K] (unit column stride) and b [K, N] (any
// strides): column c of the product goes to out[c / (N / S)]. With b's columns ordered (t, b) and
// S = T, each step t gets its own [M, B] block (an LSTM's x_proj step after step, as the CPU
// kernel reads it); S = 1 is the plain product (a = the input's rows and b = w_ih^T give a
// row-major x_proj). Returns false, leaving out untouched, where these do not hold, where oneDNN's
// float32 brgemm does not run on this CPU, or where FASTATTN_LSTM_GEMM=torch: the caller then uses
// at::mm.
//
// oneDNN compiles a kernel per block shape and leading dims, so every one here depends on a's
// columns (K) and row stride and, only where b has fewer than 64 columns, on their count rounded
// up to 16: never on a's row count (a last block of fewer rows runs on a zero-padded copy),
// which for a = the input's rows changes with T * B from call to call.
bool mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
            const at::Tensor& row_bias = at::Tensor(), const at::Tensor& col_bias = at::Tensor());

// The fewest rows of x for which linear_out takes mm_out: fewer would not pay for packing w^T on
// every call (a block of 64 rows; a smaller x runs on a zero-padded copy of one).
constexpr int64_t kLinearMinRows = 64;

// out [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]), F.linear's product: on mm_out from
// kLinearMinRows rows where it beats torch.mm (beats_torch_mm), else at::addmm / at::mm (any
// dtype).
void linear_out(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                const at::Tensor& bias);

// Whether this CPU is one where mm_out beats torch.mm, whatever FASTATTN_LSTM_GEMM says:
// oneDNN's float32 brgemm runs and the CPU is AMD's with AVX-512 (where MKL takes its AVX2 code).
// On an Intel Xeon with AMX, MKL ran a row-major [1008 x 256] @ [256 x 1024] in 1.31 ms against
// mm_out's 1.50 (2 threads); on an AVX2-only AMD CPU both run AVX2 code and nothing was
// measured. The layouts that the CPU LSTM ops return for mm_out's sake follow this (constant in
// a process, as their fakes need); where it is false, the row-major products (fastattn.ops.linear
// and linear_out) take torch.mm, and mm_out keeps the step-major ones, which torch.mm would
// need a copy for.
bool wins_on_this_cpu();

// wins_on_this_cpu() unless FASTATTN_LSTM_GEMM=torch. fastattn.ops.linear asks once, at import,
// for the products that torch.nn's modules would run on torch.mm.
bool beats_torch_mm();

// Whether FASTATTN_LSTM_GEMM=torch asks for torch.mm wherever the CPU LSTM could run its own
// products instead (read on every call, so that one process can interleave the engines:
// python -m scripts.ab_lstm --gemm).
bool torch_mm_forced();

}  // namespace fastattn::cpu_gemm
