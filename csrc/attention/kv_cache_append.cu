// Appends k_new / v_new into a contiguous or paged KV cache at each sequence's cache_seqlens
// (the layout of AttentionParams' KV-cache fields), before the forward reads the cache. A
// copy kernel, not at:: ops: the destination row of every (b, t) depends on device-side
// cache_seqlens and block_table values, which the host never reads (no sync).
#include <cuda_runtime.h>

#include <cstdint>

#include "fastattn/attention_cuda_launch.h"

namespace fastattn {
namespace attn {

// One thread per element of k_new and v_new [B, Hk, L_new, E]; fp16 and bf16 move as 16-bit
// words. Positions outside the cache are skipped (the glue cannot read the values to reject
// them without a host sync; the op layer validates them).
__global__ void __launch_bounds__(256) kv_cache_append_kernel(const AttentionParams p) {
  const int64_t E = p.head_dim;
  const int64_t total = p.batch * p.kv_heads * p.kv_new_len * E;
  for (int64_t x = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; x < total;
       x += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e = x % E, t = (x / E) % p.kv_new_len, hk = (x / E / p.kv_new_len) % p.kv_heads;
    const int64_t b = x / E / p.kv_new_len / p.kv_heads;
    const int64_t pos = p.cache_seqlens[b] + t;
    if (pos < 0 || pos >= p.kv_len) continue;
    int64_t block = p.cache_batch_idx != nullptr ? p.cache_batch_idx[b] : b, row = pos;
    if (p.block_table != nullptr) {
      block = p.block_table[b * p.block_table_stride + pos / p.block_size];
      row = pos % p.block_size;
    }
    if (block < 0 || block >= p.cache_blocks) continue;
    // k / v are const for the attention kernels; here they are the cache being written.
    uint16_t* k = static_cast<uint16_t*>(const_cast<void*>(p.k));
    uint16_t* v = static_cast<uint16_t*>(const_cast<void*>(p.v));
    const uint16_t* k_new = static_cast<const uint16_t*>(p.k_new);
    const uint16_t* v_new = static_cast<const uint16_t*>(p.v_new);
    k[block * p.k_stride[0] + hk * p.k_stride[1] + row * p.k_stride[2] + e] =
        k_new[b * p.k_new_stride[0] + hk * p.k_new_stride[1] + t * p.k_new_stride[2] + e];
    v[block * p.v_stride[0] + hk * p.v_stride[1] + row * p.v_stride[2] + e] =
        v_new[b * p.v_new_stride[0] + hk * p.v_new_stride[1] + t * p.v_new_stride[2] + e];
  }
}

}  // namespace attn

cudaError_t run_kv_cache_append(const AttentionParams& params, cudaStream_t stream) {
  if (params.dtype != Dtype::Float16 && params.dtype != Dtype::BFloat16) return cudaErrorInvalidValue;
  const int64_t total = params.batch * params.kv_heads * params.kv_new_len * params.head_dim;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  attn::kv_cache_append_kernel<<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kThreads, 0, stream>>>(
      params);
  return cudaGetLastError();
}

}  // namespace fastattn
