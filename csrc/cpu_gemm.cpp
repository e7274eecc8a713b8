// Blocked float32 GEMM on ATen's oneDNN brgemm (fastattn/cpu_gemm.h).
#include "fastattn/cpu_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <strings.h>
#include <vector>

#include "fastattn/brgemm_probe.h"

namespace fastattn::cpu_gemm {
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
// Rows of B a column-by-column packing copies at a time: [kTranspose, kCols] floats, 16 KiB.
constexpr int64_t kTranspose = 64;

// Whether oneDNN's float32 brgemm runs on this CPU (asked once).
bool brgemm_runs_here() {
  static const bool runs = brgemm_runs<float>(/*vnni=*/false);
  return runs;
}

bool usable() { return brgemm_runs_here() && !torch_mm_forced(); }

}  // namespace

bool torch_mm_forced() {
  const char* engine = std::getenv("FASTATTN_LSTM_GEMM");
  return engine != nullptr && !strcasecmp(engine, "torch");
}

bool mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
            const at::Tensor& row_bias, const at::Tensor& col_bias) {
  const auto f32_cpu = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.device().is_cpu();
  };
  if (!f32_cpu(out) || !f32_cpu(a) || !f32_cpu(b) || a.dim() != 2 || b.dim() != 2 || !usable())
    return false;
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  // Column c of the product goes to out[c / group][m][c % group].
  if (out.dim() != 3 || out.size(1) != M || out.size(0) * out.size(2) != N || !out.is_contiguous())
    return false;
  if (a.stride(1) != 1 || b.size(0) != K || M == 0 || N == 0 || K == 0) return false;
  const auto bias_fits = [](const at::Tensor& bias, int64_t n) {
    return !bias.defined() ||
           (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == n);
  };
  if (!bias_fits(row_bias, M) || !bias_fits(col_bias, N)) return false;
  const int64_t group = out.size(2);
  const int64_t lda = a.stride(0), bsk = b.stride(0), bsn = b.stride(1);
  // brgemm's rows must not overlap (a one-row view may carry any row stride).
  if (lda < K) return false;
  const float* A = a.const_data_ptr<float>();
  const float* Bsrc = b.const_data_ptr<float>();
  const float* r_bias = row_bias.defined() ? row_bias.const_data_ptr<float>() : nullptr;
  const float* c_bias = col_bias.defined() ? col_bias.const_data_ptr<float>() : nullptr;
  float* C = out.mutable_data_ptr<float>();

  // Column blocks across threads: each packs its own panels and reads all of A. With fewer
  // column blocks than threads (a one-step call's B columns), the rows are split too, and each
  // part packs its own copy of its panel: else one thread ran a 2-thread cell step's projection.
  const int64_t cols = std::min(kCols, (N + kColStep - 1) / kColStep * kColStep);
  const int64_t col_blocks = (N + cols - 1) / cols, row_blocks = (M + kRows - 1) / kRows;
  const int64_t row_parts =
      std::clamp<int64_t>(at::get_num_threads() / col_blocks, 1, row_blocks);
  at::parallel_for(0, col_blocks * row_parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> panel(K * cols), block(kRows * cols), tail;
    int64_t packed = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = i / row_parts, part = i % row_parts;
      const int64_t n0 = j * cols, n = std::min(cols, N - n0);
      if (j != packed) {
        // panel[k][jj] = b[k][n0 + jj], zero for jj >= n, read along b's unit stride: a
        // row-major b (an LSTM gradient, a weight as linear's input gradient reads it) row by
        // row, else (w^T, as the projections read it) column by column over kTranspose rows at
        // a time, so that both the columns read and the panel rows written stay in L1. Column
        // by column over all K, a row-major b's panel read each of its K rows n times, a page
        // apart each (a TLB miss per element), and w^T's wrote each panel row n times from L2:
        // either cost more than the product of few rows.
        if (n < cols) std::fill(panel.begin(), panel.end(), 0.f);
        if (bsn == 1) {
          for (int64_t k = 0; k < K; ++k) std::copy_n(Bsrc + k * bsk + n0, n, &panel[k * cols]);
        } else {
          for (int64_t k0 = 0; k0 < K; k0 += kTranspose) {
            const int64_t k1 = std::min(K, k0 + kTranspose);
            for (int64_t jj = 0; jj < n; ++jj) {
              const float* src = Bsrc + (n0 + jj) * bsn;
              for (int64_t k = k0; k < k1; ++k) panel[k * cols + jj] = src[k * bsk];
            }
          }
        }
        packed = j;
      }
      const int64_t r0 = row_blocks * part / row_parts, r1 = row_blocks * (part + 1) / row_parts;
      for (int64_t m0 = r0 * kRows; m0 < std::min(M, r1 * kRows); m0 += kRows) {
        const int64_t rows = std::min(kRows, M - m0);
        const float* a_rows = A + m0 * lda;
        int64_t ld = lda;
        if (rows < kRows) {
          // The last rows, zero-padded to a whole block (rows K apart: the same kernel as the
          // others' for a contiguous a), so that no kernel depends on M.
          if (tail.empty()) {
            tail.assign(kRows * K, 0.f);
            for (int64_t r = 0; r < rows; ++r) std::copy_n(a_rows + r * lda, K, &tail[r * K]);
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
          float* dst = C + ((c0 / group) * M + m0) * group + c0 % group;
          for (int64_t r = 0; r < rows; ++r) {
            const float* src = &block[r * cols + (c0 - n0)];
            const float add = r_bias ? r_bias[m0 + r] : 0.f;
            if (c_bias) {
              for (int64_t jj = 0; jj < run; ++jj)
                dst[r * group + jj] = src[jj] + add + c_bias[c0 + jj];
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
  return true;
}

void linear_out(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                const at::Tensor& bias) {
  // A row-major product has no layout that only mm_out writes: it goes where it is faster.
  if (x.size(0) >= kLinearMinRows && beats_torch_mm() &&
      mm_out(out.unsqueeze(0), x, w.t(), at::Tensor(), bias)) {
    return;
  }
  bias.defined() ? at::addmm_out(out, bias, x, w.t())
                 : at::mm_out(out, x, w.t());
}

bool wins_on_this_cpu() {
  // Measured on AVX-512 AMD CPUs (Zen 4 and Zen 5) and on an Intel Xeon with AMX; on an
  // AVX2-only AMD CPU (Zen 3) both run AVX2 code, and torch.mm keeps it.
  static const bool amd_avx512 = __builtin_cpu_is("amd") && __builtin_cpu_supports("avx512f");
  return amd_avx512 && brgemm_runs_here();
}

bool beats_torch_mm() { return wins_on_this_cpu() && !torch_mm_forced(); }

}  // namespace fastattn::cpu_gemm
