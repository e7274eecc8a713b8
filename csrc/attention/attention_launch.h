// The per-config launchers (one explicit instantiation per dtype x head dim, each in its own
// .cu file so they compile in parallel) and the one dtype / head-dim switch that picks them.
#pragma once

#include <type_traits>

#include "fastattn/attention_params.h"

namespace fastattn {
namespace attn {

template <typename Element, int HEAD_DIM>
cudaError_t launch_attention_fwd(const AttentionParams& params, cudaStream_t stream);

template <typename Element, int HEAD_DIM>
cudaError_t launch_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

// Key tile of the forward kernels (fewer keys per tile for the wider heads keeps the
// per-thread scores and output accumulators in registers).
constexpr int fwd_block_n(int head_dim) { return head_dim <= 128 ? 64 : 32; }
// Queries up to which the forward runs its one-warp decode kernel, optionally split over KV.
constexpr int kDecodeMaxLenQ = 16;
constexpr int kMaxSplits = 128;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<Element>{}, std::integral_constant<int, HEAD_DIM>{}) for the compiled
// config; cudaErrorInvalidValue for any other (the glue rejects those before).
template <typename Half, typename BFloat16, typename Fn>
cudaError_t dispatch_dtype_head_dim(AttentionDtype dtype, int head_dim, Fn&& fn) {
  auto with_dtype = [&](auto head_dim_constant) -> cudaError_t {
    switch (dtype) {
      case AttentionDtype::kFloat16: return fn(TypeTag<Half>{}, head_dim_constant);
      case AttentionDtype::kBFloat16: return fn(TypeTag<BFloat16>{}, head_dim_constant);
    }
    return cudaErrorInvalidValue;
  };
  switch (head_dim) {
    case 32: return with_dtype(std::integral_constant<int, 32>{});
    case 64: return with_dtype(std::integral_constant<int, 64>{});
    case 96: return with_dtype(std::integral_constant<int, 96>{});
    case 128: return with_dtype(std::integral_constant<int, 128>{});
    case 192: return with_dtype(std::integral_constant<int, 192>{});
    case 256: return with_dtype(std::integral_constant<int, 256>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace attn
}  // namespace fastattn
