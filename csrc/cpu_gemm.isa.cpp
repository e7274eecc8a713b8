// The blocked product behind cpu_gemm::mm_out (fastattn/cpu_gemm_blocks.h), compiled once per
// x86 ISA (fastattn/cpu_isa.h): oneDNN's brgemm runs the products; the packing of b and the
// copies of the blocks into out run at the CPU's vector width.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fastattn/cpu_gemm_blocks.h"
#include "fastattn/cpu_scratch.h"
#include "fastattn/cpu_transpose.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {
namespace {

namespace cpublas = at::native::cpublas;

// Blocks: out in column blocks of `cols` (kCols, or fewer for a narrow b), each against one packed
// B panel [K, cols] (zero-padded past b's last column) that stays in L2 while the row blocks of A
// stream past it; a row block of kRows reduces over K in steps of kDepth into a [kRows, cols]
// block, then goes to out.
constexpr int64_t kCols = 64, kRows = 64, kDepth = 512;
// Panel width for N columns: kCols, or N rounded up to kColStep when b is narrower (a one-step
// call, as lstm_cell's inference makes, has N = B: a 64-wide panel for B = 16 would multiply
// three columns of zeros for every one of b's). At most kCols / kColStep kernel shapes per a.
constexpr int64_t kColStep = 16;

}  // namespace

void gemm_blocks_kernel(const cpu_gemm::GemmBlocksArgs& g) {
  const int64_t M = g.M, K = g.K, N = g.N, group = g.group;
  // Column blocks across threads: each packs its own panels and reads all of A. With fewer
  // column blocks than threads (a one-step call's B columns), the rows are split too, and each
  // part packs its own copy of its panel: else one thread ran a 2-thread cell step's projection.
  const int64_t cols = std::min(kCols, (N + kColStep - 1) / kColStep * kColStep);
  const int64_t col_blocks = (N + cols - 1) / cols, row_blocks = (M + kRows - 1) / kRows;
  const int64_t row_parts =
      std::clamp<int64_t>(at::get_num_threads() / col_blocks, 1, row_blocks);
  at::parallel_for(0, col_blocks * row_parts, 1, [&](int64_t i0, int64_t i1) {
    // Kept across calls (cpu_scratch.h): the panel is up to K x 64 floats (256 KB at K = 1024),
    // which a vector zero-filled on every call. The packing writes all of it, brgemm all of
    // block.
    const ScratchBuffer<float> panel(K * cols), block(kRows * cols);
    std::vector<float> tail;
    int64_t packed = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = i / row_parts, part = i % row_parts;
      const int64_t n0 = j * cols, n = std::min(cols, N - n0);
      if (j != packed) {
        // panel[k][jj] = b[k][n0 + jj], zero for jj >= n, read along b's unit stride: a
        // row-major b (an LSTM gradient, a weight as linear's input gradient reads it) row by
        // row, else (w^T, as the projections read it) by register-blocked transposes of w's
        // rows. Column by column, a row-major b's panel read each of its K rows n times, a page
        // apart each (a TLB miss per element), and w^T's wrote each panel row n times from L2:
        // either cost more than the product of few rows; and one element at a time, w^T's
        // packing and the copies below took ~5% of an LSTM inference (T32 B64 H256, Xeon).
        if (g.bsn == 1) {
          if (n < cols) std::fill(panel.data(), panel.data() + panel.size(), 0.f);
          for (int64_t k = 0; k < K; ++k) {
            std::copy_n(g.b + k * g.bsk + n0, n, &panel[k * cols]);
          }
        } else {
          pack_transposed(g.b + n0 * g.bsn, g.bsn, n, K, panel.data(), cols, cols);
        }
        packed = j;
      }
      const int64_t r0 = row_blocks * part / row_parts, r1 = row_blocks * (part + 1) / row_parts;
      for (int64_t m0 = r0 * kRows; m0 < std::min(M, r1 * kRows); m0 += kRows) {
        const int64_t rows = std::min(kRows, M - m0);
        const float* a_rows = g.a + m0 * g.lda;
        int64_t ld = g.lda;
        if (rows < kRows) {
          // The last rows, zero-padded to a whole block (rows K apart: the same kernel as the
          // others' for a contiguous a), so that no kernel depends on M.
          if (tail.empty()) {
            tail.assign(kRows * K, 0.f);
            for (int64_t r = 0; r < rows; ++r) std::copy_n(a_rows + r * g.lda, K, &tail[r * K]);
          }
          a_rows = tail.data();
          ld = K;
        }
        for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
          cpublas::brgemm(kRows, cols, std::min(kDepth, K - k0), ld, cols, cols, k0 > 0,
                          a_rows + k0, &panel[k0 * cols], block.data(), false);
        }
        // The block's columns, a run per column group they fall in.
        for (int64_t c0 = n0; c0 < n0 + n;) {
          const int64_t run = std::min(n0 + n, (c0 / group + 1) * group) - c0;
          float* dst = g.out + ((c0 / group) * M + m0) * group + c0 % group;
          for (int64_t r = 0; r < rows; ++r) {
            const float* src = &block[r * cols + (c0 - n0)];
            const float add = g.row_bias ? g.row_bias[m0 + r] : 0.f;
            if (g.col_bias) {
              for (int64_t jj = 0; jj < run; ++jj)
                dst[r * group + jj] = src[jj] + add + g.col_bias[c0 + jj];
            } else {
              for (int64_t jj = 0; jj < run; ++jj) dst[r * group + jj] = src[jj] + add;
            }
          }
          c0 += run;
        }
      }
    }
    cpublas::brgemm_release(false);
  });
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
