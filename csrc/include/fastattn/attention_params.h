// The plain parameter structs the CUDA attention kernels take, and their torch-free launch
// entry points. Filled by the glue (csrc/attention/attention_cuda.cpp,
// attention_varlen_cuda.cpp) from tensors in the normalized layout of
// fastattn/ops/_registry.py:
//   q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, E], out [B, Hq, L, E], lse [B, Hq, L].
// Strides are in elements; the last dimension of q, k, v, out, grad_out, dq, dk, dv is
// contiguous, every row starts 16-byte aligned (the glue guarantees both).
//
// The same kernels serve two more layouts, chosen by the optional pointers below (null: the
// dense layout above, at the dense speed):
//   varlen    cu_seqlens_q / cu_seqlens_k: B packed sequences, q [total_q, Hq, E],
//             k / v [total_k, Hk, E], out [total_q, Hq, E], lse [Hq, total_q]; batch strides
//             are 0, L / S are max_seqlen_q / max_seqlen_k (the grid and the dropout counter).
//   KV cache  cache_seqlens: sequence b sees cache_seqlens[b] + cache_new_len keys of a
//             contiguous cache (cache row cache_batch_idx[b] or b) or a paged one (block_table).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "fastattn/attention_head_dims.h"
#include "fastattn/dtype.h"

namespace fastattn {

struct AttentionParams {
  Dtype dtype = Dtype::BFloat16;  // Float16 or BFloat16: the only types the kernels serve

  // Element pointers (dtype above).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  // float32 contiguous, [B, Hq, L] (varlen: [Hq, total_q]): log(sum(exp(scores))) per query
  // row, -inf for a row without any visible key.
  float* lse = nullptr;

  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  int64_t out_batch_stride = 0, out_head_stride = 0, out_row_stride = 0;

  int batch = 0;
  int heads_q = 0;
  int heads_kv = 0;  // heads_q % heads_kv == 0; query head h reads kv head h / (heads_q / heads_kv)
  int64_t len_q = 0;   // L
  int64_t len_kv = 0;  // S
  int head_dim = 0;    // E (== Ev)

  float scale = 1.0f;
  float softcap = 0.0f;  // > 0: scores become softcap * tanh(scores / softcap)

  // Key j is visible to query i iff -window_left <= j - i - offset <= window_right, a negative
  // bound being unbounded; offset = len_kv - len_q if bottom_right else 0.
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool bottom_right = false;

  // Optional [B, Hq, L, S] mask read through its (possibly zero) strides: bool (1 byte,
  // true = may attend) or additive in the element dtype.
  const void* mask = nullptr;
  bool mask_is_bool = false;
  int64_t mask_batch_stride = 0, mask_head_stride = 0, mask_row_stride = 0, mask_col_stride = 0;

  // Optional float32 slopes [B, Hq] (alibi_batch_stride = Hq) or [Hq] (stride 0):
  // adds slope * (j - i - offset) to score (i, j).
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;

  // Dropout: keep (b, h, i, j) iff philox_uniform(seed, lse_index(b, h, i) * S + j) >= p, where
  // lse_index is the row's index in lse: ((b * Hq + h) * L + i) dense, (h * total_q +
  // cu_seqlens_q[b] + i) varlen.
  float dropout_p = 0.0f;
  uint64_t seed = 0;

  // Split-KV (forward only): num_splits > 1 writes per-split partial results to
  // out_partial [num_splits, B, Hq, L, E] and lse_partial [num_splits, B, Hq, L] (float32,
  // contiguous), merged afterwards by their LSE into out / lse.
  int num_splits = 1;
  float* out_partial = nullptr;
  float* lse_partial = nullptr;

  // Varlen (both or neither): int32 [B + 1] row offsets of each sequence in the packed q / out
  // and k / v. Sequence b has cu_seqlens_q[b + 1] - cu_seqlens_q[b] <= len_q queries and
  // cu_seqlens_k[b + 1] - cu_seqlens_k[b] <= len_kv keys.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  int64_t total_q = 0;  // rows of the packed q: the head stride of lse and of the dropout rows

  // KV cache (forward only): sequence b attends over keys [0, cache_seqlens[b] + cache_new_len)
  // of its cache, which already holds the appended rows (run_kv_cache_append). Contiguous
  // cache: k [B_cache, Hk, S_max, E], row cache_batch_idx[b] (or b when null) at k_batch_stride.
  // Paged (block_table int32 [B, max_blocks], row stride block_table_batch_stride): key p of
  // sequence b is row p % block_size of block block_table[b, p / block_size], blocks at
  // k_batch_stride (k [num_blocks, Hk, block_size, E] through any strides). len_kv is the
  // capacity (S_max or max_blocks * block_size), which bounds every sequence's keys.
  const int* cache_seqlens = nullptr;
  int64_t cache_new_len = 0;
  const int* cache_batch_idx = nullptr;
  const int* block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int block_size = 0;
  int64_t cache_blocks = 0;  // B_cache or num_blocks: the bound of the indices above
  // Indices outside [0, cache_blocks) are never dereferenced (the glue cannot read them without
  // a host sync): the forward reads such a block's keys as NaN and its values as 0, so a query
  // that sees one of its keys gets a NaN out row and lse, and the others are unaffected.

  // The rows run_kv_cache_append writes into the cache before the forward: k_new / v_new
  // [B, Hk, cache_new_len, E] at positions cache_seqlens[b] ... of sequence b.
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int64_t k_new_batch_stride = 0, k_new_head_stride = 0, k_new_row_stride = 0;
  int64_t v_new_batch_stride = 0, v_new_head_stride = 0, v_new_row_stride = 0;
};

struct AttentionBwdParams : AttentionParams {
  const void* grad_out = nullptr;  // [B, Hq, L, E]
  int64_t grad_out_batch_stride = 0, grad_out_head_stride = 0, grad_out_row_stride = 0;

  void* dq = nullptr;  // like q ([B, Hq, L, E] or [total_q, Hq, E]), through the strides below
  void* dk = nullptr;  // like k, through the dkv strides
  void* dv = nullptr;  // like v, through the dkv strides
  int64_t dq_batch_stride = 0, dq_head_stride = 0, dq_row_stride = 0;
  int64_t dkv_batch_stride = 0, dkv_head_stride = 0, dkv_row_stride = 0;
  // float32 workspace laid out like lse: rowsum(grad_out * out).
  float* delta = nullptr;
  // Optional [B, Hq, L, S] float32 contiguous, zero-initialized by the caller: dL/d(scores),
  // the gradient of an additive mask. Written only for tiles that are not skipped.
  float* dmask = nullptr;
};

// The number of KV splits run_attention_fwd would like for this problem on a device with
// `num_sms` multiprocessors (1 = no split). The caller allocates the partial buffers.
int attention_fwd_num_splits(const AttentionParams& params, int num_sms);

// Launch on `stream`; each returns the first CUDA error (cudaSuccess when every launch
// was accepted). They do not synchronize.
cudaError_t run_attention_fwd(const AttentionParams& params, cudaStream_t stream);
cudaError_t run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);
// Writes k_new / v_new into the KV cache the params describe (cache_seqlens, block_table or
// cache_batch_idx, k / v as the cache). Rows whose position falls outside the cache (past
// len_kv, or a cache row / block index outside [0, cache_blocks)) are skipped, never written.
cudaError_t run_kv_cache_append(const AttentionParams& params, cudaStream_t stream);

}  // namespace fastattn
