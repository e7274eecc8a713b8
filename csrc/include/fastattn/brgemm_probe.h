// Whether ATen's oneDNN brgemm (at::native::cpublas::brgemm) runs on this CPU for an element
// type: ATen raises where its oneDNN build has no kernel for the CPU. Shared by the attention
// tile engine (bf16, VNNI pairs) and the LSTM projection (float32).
#pragma once

#include <ATen/native/CPUBlas.h>

#include <exception>

namespace fastattn {

// One 2 x 16 x 2 product A [[1, 2], [3, 4]] x B (B[0][j] = j, B[1][j] = 1), checked exactly
// (small integers are exact in bf16 and fp32). With vnni, B is laid out as one row of pairs,
// as the bf16 kernels take it.
template <typename T>
bool brgemm_runs(bool vnni) {
  namespace cpublas = at::native::cpublas;
  const T a[4] = {1.f, 2.f, 3.f, 4.f};
  T b[2 * 16];
  for (int j = 0; j < 16; ++j) {
    b[vnni ? 2 * j : j] = static_cast<float>(j);
    b[vnni ? 2 * j + 1 : 16 + j] = 1.f;
  }
  float c[2 * 16];
  try {
    cpublas::brgemm(2, 16, 2, 2, 16, 16, false, a, b, c, vnni);
    cpublas::brgemm_release(vnni);
  } catch (const std::exception&) {
    return false;
  }
  for (int j = 0; j < 16; ++j) {
    if (c[j] != j + 2.f || c[16 + j] != 3.f * j + 4.f) return false;
  }
  return true;
}

}  // namespace fastattn
