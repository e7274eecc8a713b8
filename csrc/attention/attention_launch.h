// The per-config launchers (one explicit instantiation per dtype x head dim, each in its own
// .cu file so they compile in parallel) and the one dtype / head-dim switch that picks them.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "fastattn/attention_cuda_launch.h"
#include "fastattn/attention_head_dims.h"

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
// config (a head dim of kAttentionCudaHeadDims, float16 or bfloat16); cudaErrorInvalidValue for
// any other (the glue rejects those before).
template <typename Half, typename BFloat16, typename Fn, std::size_t... I>
cudaError_t dispatch_dtype_head_dim(Dtype dtype, int head_dim, Fn&& fn,
                                    std::index_sequence<I...>) {
  auto with_dtype = [&](auto head_dim_constant) -> cudaError_t {
    switch (dtype) {
      case Dtype::Float16: return fn(TypeTag<Half>{}, head_dim_constant);
      case Dtype::BFloat16: return fn(TypeTag<BFloat16>{}, head_dim_constant);
      case Dtype::Float32:
      case Dtype::Float64: break;
    }
    return cudaErrorInvalidValue;
  };
  cudaError_t result = cudaErrorInvalidValue;
  // One comparison per compiled head dim, stopping at the match.
  (void)((head_dim == kAttentionCudaHeadDims[I] &&
          (result = with_dtype(std::integral_constant<int, kAttentionCudaHeadDims[I]>{}), true)) ||
         ...);
  return result;
}

template <typename Half, typename BFloat16, typename Fn>
cudaError_t dispatch_dtype_head_dim(Dtype dtype, int head_dim, Fn&& fn) {
  return dispatch_dtype_head_dim<Half, BFloat16>(
      dtype, head_dim, std::forward<Fn>(fn), std::make_index_sequence<kNumAttentionCudaHeadDims>{});
}

}  // namespace attn
}  // namespace fastattn
