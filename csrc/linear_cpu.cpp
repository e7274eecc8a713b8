// CPU implementation of fastattn::linear (schema: fastattn/ops/_registry.py): F.linear's product
// on fastattn's own GEMM (fastattn/cpu_gemm.h), for the callers that fastattn.ops.linear sends it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "fastattn/cpu_gemm.h"

namespace fastattn {
namespace {

// out [M, N] = input [M, K] @ weight [N, K]^T (+ bias [N]); any dtype at::mm takes, brgemm for
// float32 from 64 rows (cpu_gemm::linear_out).
at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "fastattn::linear";
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": input must be [M, K] and weight [N, K], got ", input.sizes(), " and ",
              weight.sizes());
  const auto check_like_input = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == input.scalar_type() && t.device() == input.device(), op, ": ",
                name, " must be ", input.scalar_type(), " on ", input.device(),
                " like input, got ", t.scalar_type(), " on ", t.device());
  };
  check_like_input(weight, "weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_like_input(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [",
                weight.size(0), "], got ", bias->sizes());
  }
  at::Tensor out = at::empty({input.size(0), weight.size(0)}, input.options());
  cpu_gemm::linear_out(out, input, weight, has_bias ? *bias : at::Tensor());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace fastattn
