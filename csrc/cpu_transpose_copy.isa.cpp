// The kernel of fastattn::transpose_copy (fastattn/cpu_transpose_copy.h), compiled once per x86
// ISA (fastattn/cpu_isa.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "fastattn/cpu_transpose.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {

// dst[c * ld + r] = src[r * src_rs + c]. Each task writes kChunk whole rows of dst (no two
// threads share a line of it) and reads the matching 64-column strip of src: register blocks
// of whole lines on both sides.
void transpose_copy_kernel(const float* src, int64_t src_rs, int64_t rows, int64_t cols,
                           float* dst, int64_t ld) {
  constexpr int64_t kChunk = 64;
  // Enough elements per task (64 Ki) that the fork is a small share of it.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows * kChunk));
  at::parallel_for(0, (cols + kChunk - 1) / kChunk, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c0 = i * kChunk;
      pack_transposed(src + c0, src_rs, rows, std::min(kChunk, cols - c0), dst + c0 * ld, ld,
                      rows);
    }
  });
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
