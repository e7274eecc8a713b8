// The torch-free entry points of the CUDA attention kernels: pick the compiled config for
// the dtype and head dim (instances/*.cu hold one config each, so this file instantiates
// no kernel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_launch.h"

namespace fastattn {

// Split the keys only for short query blocks (decode) when the (b, h) CTAs alone would
// leave most SMs idle: aim at ~4 CTAs per SM, at least one key tile per split. Varlen
// problems never split (the partial buffers and the combine kernel are laid out [B, Hq, L]).
int attention_fwd_num_splits(const AttentionParams& params, int num_sms) {
  if (params.q_len > attn::kDecodeMaxLenQ || !attention_cuda_supports_head_dim(params.head_dim) ||
      params.cu_seqlens_q != nullptr) {
    return 1;
  }
  const int64_t block_n = attn::fwd_block_n(params.head_dim);
  const int64_t ctas = params.batch * params.q_heads;
  const int64_t key_blocks = (params.kv_len + block_n - 1) / block_n;
  const int64_t wanted = ctas > 0 ? (int64_t{4} * num_sms + ctas - 1) / ctas : 1;
  int64_t splits = wanted < key_blocks ? wanted : key_blocks;
  splits = splits < attn::kMaxSplits ? splits : attn::kMaxSplits;
  const int64_t grid_z_limit = 65535 / (params.batch > 0 ? params.batch : 1);  // grid.z = batch * splits
  splits = splits < grid_z_limit ? splits : grid_z_limit;
  return splits > 1 ? static_cast<int>(splits) : 1;
}

cudaError_t run_attention_fwd(const AttentionParams& params, cudaStream_t stream) {
  return attn::dispatch_dtype_head_dim<__half, __nv_bfloat16>(
      params.dtype, params.head_dim, [&](auto element, auto head_dim) {
        return attn::launch_attention_fwd<typename decltype(element)::type, decltype(head_dim)::value>(
            params, stream);
      });
}

cudaError_t run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  return attn::dispatch_dtype_head_dim<__half, __nv_bfloat16>(
      params.dtype, params.head_dim, [&](auto element, auto head_dim) {
        return attn::launch_attention_bwd<typename decltype(element)::type, decltype(head_dim)::value>(
            params, stream);
      });
}

}  // namespace fastattn
