// Blocked float32 GEMM on ATen's oneDNN brgemm (fastattn/cpu_gemm.h).
#include "fastattn/cpu_gemm.h"

#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <strings.h>

#include "fastattn/brgemm_probe.h"
#include "fastattn/cpu_gemm_blocks.h"
#include "fastattn/cpu_isa.h"

namespace fastattn {

FASTATTN_ISA_DECLARE(void gemm_blocks_kernel(const cpu_gemm::GemmBlocksArgs&))

namespace cpu_gemm {
namespace {

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
  // The strides of b that the packing reads along (elsewhere torch.mm serves).
  if (bsk != 1 && bsn != 1) return false;
  GemmBlocksArgs args{};
  args.a = a.const_data_ptr<float>();
  args.lda = lda;
  args.b = b.const_data_ptr<float>();
  args.bsk = bsk;
  args.bsn = bsn;
  args.M = M;
  args.K = K;
  args.N = N;
  args.group = group;
  args.row_bias = row_bias.defined() ? row_bias.const_data_ptr<float>() : nullptr;
  args.col_bias = col_bias.defined() ? col_bias.const_data_ptr<float>() : nullptr;
  args.out = out.mutable_data_ptr<float>();
  FASTATTN_ISA_CALL(gemm_blocks_kernel, args);
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

}  // namespace cpu_gemm
}  // namespace fastattn
