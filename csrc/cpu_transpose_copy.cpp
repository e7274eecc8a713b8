// fastattn::transpose_copy (fastattn/cpu_transpose_copy.h): the dispatch to the per-ISA kernel.
#include "fastattn/cpu_transpose_copy.h"

#include <ATen/MemoryOverlap.h>

#include "fastattn/cpu_isa.h"

namespace fastattn {

FASTATTN_ISA_DECLARE(void transpose_copy_kernel(const float* src, int64_t src_rs, int64_t rows,
                                                int64_t cols, float* dst, int64_t ld))

void transpose_copy(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_INTERNAL_ASSERT(dst.dim() == 2 && src.dim() == 2 && dst.size(0) == src.size(1) &&
                        dst.size(1) == src.size(0));
  const auto plain = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.device().is_cpu() && t.stride(1) == 1;
  };
  if (src.numel() == 0 || !plain(src) || !plain(dst) ||
      at::has_internal_overlap(dst) != at::MemOverlap::No ||
      at::get_overlap_status(dst, src) != at::MemOverlapStatus::No) {
    dst.copy_(src.t());
    return;
  }
  FASTATTN_ISA_CALL(transpose_copy_kernel, src.const_data_ptr<float>(), src.stride(0),
                    src.size(0), src.size(1), dst.mutable_data_ptr<float>(), dst.stride(0));
}

at::Tensor contiguous_matrix(const at::Tensor& t) {
  if (t.dim() != 2 || t.is_contiguous() || t.stride(0) != 1) return t.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options());
  transpose_copy(out, t.t());
  return out;
}

}  // namespace fastattn
