// fastattn::attention_kv_cache_fwd's ADInplaceOrView kernel, for every device: the op writes
// k_cache and v_cache in place (its schema's (a!) and (b!)), so it bumps their version counters
// as torch's own in-place ops do. Then autograd refuses a backward that would read a cache's
// overwritten values (a tensor saved for a gradient before the call) instead of computing a
// wrong gradient from them, and an inference tensor written outside inference mode raises
// torch's error. The Triton op, a torch.library.triton_op, gets torch's own such kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastattn {
namespace {

using Tensor = at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;

std::tuple<Tensor, Tensor> attention_kv_cache_fwd_versions(
    c10::DispatchKeySet keys, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
    const Tensor& cache_seqlens, const OptionalTensor& k_new, const OptionalTensor& v_new,
    const OptionalTensor& block_table, const OptionalTensor& cache_batch_idx,
    const OptionalTensor& alibi_slopes, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double softcap) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::attention_kv_cache_fwd", "")
          .typed<std::tuple<Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
              const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
              const OptionalTensor&, double, int64_t, int64_t, bool, double)>();
  // Before the write: an inference tensor outside inference mode raises here, with the caches
  // untouched (a call the kernel then refuses has bumped them for nothing, which is harmless).
  torch::autograd::impl::bump_version(k_cache);
  torch::autograd::impl::bump_version(v_cache);
  at::AutoDispatchBelowADInplaceOrView below;
  return op.redispatch(keys & c10::after_ADInplaceOrView_keyset, q, k_cache, v_cache,
                       cache_seqlens, k_new, v_new, block_table, cache_batch_idx, alibi_slopes,
                       scale, window_left, window_right, bottom_right, softcap);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, ADInplaceOrView, m) {
  m.impl("attention_kv_cache_fwd", TORCH_FN(attention_kv_cache_fwd_versions));
}

}  // namespace fastattn
