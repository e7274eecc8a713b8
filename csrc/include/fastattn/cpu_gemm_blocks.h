// The blocked product behind cpu_gemm::mm_out (fastattn/cpu_gemm.h), once its checks have passed:
// the arguments of its per-ISA kernel (csrc/cpu_gemm.isa.cpp), so that the packing and the
// copies around oneDNN's brgemm calls are compiled for the vector width the CPU runs.
#pragma once

#include <cstdint>

namespace fastattn::cpu_gemm {

// out [S, M, N / S] (contiguous, group = N / S columns per slice) = a [M, K] (rows lda apart,
// unit column stride) @ b [K, N] (strides bsk, bsn, one of them 1) (+ row_bias [M], + col_bias
// [N], each where not null): column c of the product goes to out[c / group].
struct GemmBlocksArgs {
  const float* a;
  int64_t lda;
  const float* b;
  int64_t bsk, bsn;
  int64_t M, K, N, group;
  const float* row_bias;
  const float* col_bias;
  float* out;
};

}  // namespace fastattn::cpu_gemm
