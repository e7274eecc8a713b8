// The plain parameter structs every attention kernel takes, CPU and CUDA alike (torch-free and
// CUDA-free). The glue checks the tensors and fills them: csrc/attention/attention_cpu.cpp for
// the C++ CPU kernels (attention_cpu.isa.cpp), attention_cuda.cpp / attention_varlen_cuda.cpp
// for the CUDA kernels (launched through fastattn/attention_cuda_launch.h). The kernels read
// nothing else. Strides are in elements; the last dim of q, k, v, out, grad_out, dq, dk, dv is
// contiguous (the CUDA glue also starts every row 16-byte aligned).
//
// One struct serves three layouts, told apart by which pointers below are set (null: dense):
//   dense     q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev], out [B, Hq, L, Ev],
//             lse [B, Hq, L]; sequence b is batch row b.
//   varlen    cu_seqlens_q / cu_seqlens_k: B packed sequences, q [total_q, Hq, E],
//             k / v [total_k, Hk, *], out [total_q, Hq, Ev], lse [Hq, total_q]; batch strides
//             are 0, q_len / kv_len are max_seqlen_q / max_seqlen_k (the grid and the dropout
//             counter). Sequence b owns q rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 and
//             k / v rows cu_seqlens_k[b] ...
//   KV cache  cache_seqlens: sequence b sees cache_seqlens[b] + kv_new_len keys of a contiguous
//             cache (batch row cache_batch_idx[b], or b) or of a paged one (block_table).
// A query row (b, h, i) has the row index (b * Hq + h) * L + i (dense, KV cache) or
// h * total_q + cu_seqlens_q[b] + i (varlen): its lse element; its dropout counter for key j
// is row index * kv_len + j (fastattn/ops/_registry.py).
//
// A few fields serve one side only, marked [cpu] or [cuda]: the CPU kernels take any Ev and
// compute delta themselves; the CUDA kernels need Ev == E, append the new KV-cache rows
// themselves and split the keys of a decode over CTAs.
#pragma once

#include <cstdint>

#include "fastattn/dtype.h"

namespace fastattn {

enum class AttnMaskKind { None, Bool, Additive };

struct AttentionParams {
  // The CPU kernels serve all four; the CUDA kernels Float16 and BFloat16.
  Dtype dtype = Dtype::Float32;
  int64_t batch = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;  // q_heads % kv_heads == 0; query head h reads kv head h / (q_heads / kv_heads)
  int64_t q_len = 0;     // L
  int64_t kv_len = 0;    // S
  int64_t head_dim = 0;  // E
  int64_t v_head_dim = 0;  // Ev; [cuda] always == head_dim

  // Element pointers (dtype above); strides are (batch, head, row).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {};

  // out: row (b, h, i) at out_stride, varlen rows of sequence b starting at cu_seqlens_q[b]
  // as q's do. lse: float32 contiguous, element = the query row's row index:
  // log(sum(exp(scores))), -inf for a row without any visible key.
  void* out = nullptr;
  int64_t out_stride[3] = {};
  float* lse = nullptr;

  // Double for the CPU kernels' float64 path; the CUDA kernels compute in float.
  double scale = 1.0;
  double softcap = 0.0;  // > 0: scores become softcap * tanh(scores / softcap)

  // Key j is visible to query i iff -window_left <= j - i - offset <= window_right, a negative
  // bound being unbounded; offset = kv_len - q_len (of the sequence) if bottom_right, else 0.
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool bottom_right = false;

  // Optional [B, Hq, L, S] mask read through its (possibly zero) strides (batch, head, row,
  // column), dense layout only: bool (1 byte, true = may attend) or additive in the element
  // dtype (or float32, below). mask_kind is None exactly when mask is null.
  AttnMaskKind mask_kind = AttnMaskKind::None;
  const void* mask = nullptr;
  // An additive mask is float32 rather than the element dtype: torch's SDPA takes a float32
  // mask with any q dtype, and rounding it to bfloat16 / float16 would shift the scores of
  // large biases (ALiBi-like, relative positions) by their rounding error.
  bool mask_is_float32 = false;
  int64_t mask_stride[4] = {};

  // Optional float32 slopes [B, Hq] (alibi_batch_stride = Hq) or [Hq] (stride 0):
  // adds slope * (j - i - offset) to score (i, j).
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;

  // Dropout (0 disables it): keep (b, h, i, j) iff philox_uniform(seed, dropout counter)
  // >= dropout_p.
  float dropout_p = 0.0f;
  uint64_t seed = 0;

  // Varlen (both or neither): int32 [B + 1] row offsets of each sequence in the packed q / out
  // and k / v. Sequence b has cu_seqlens_q[b + 1] - cu_seqlens_q[b] <= q_len queries and
  // cu_seqlens_k[b + 1] - cu_seqlens_k[b] <= kv_len keys.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0;  // rows of the packed q (cu_seqlens_q[B]): the head stride of lse

  // KV cache (forward only): sequence b attends over keys [0, cache_seqlens[b] + kv_new_len)
  // of its cache, which already holds the appended rows. Contiguous cache: k [B_cache, Hk,
  // S_max, E], row cache_batch_idx[b] (or b when null) at k_stride[0]. Paged (block_table
  // int32 [B, max_blocks], row stride block_table_stride): key j of sequence b is row
  // j % block_size of block block_table[b * block_table_stride + j / block_size], blocks at
  // k_stride[0] / v_stride[0] (k [num_blocks, Hk, block_size, E] through any strides). kv_len
  // is the capacity (S_max or max_blocks * block_size), which bounds every sequence's keys.
  const int32_t* cache_seqlens = nullptr;
  int64_t kv_new_len = 0;
  const int32_t* cache_batch_idx = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int64_t block_size = 0;
  int64_t cache_blocks = 0;  // B_cache or num_blocks: the bound of the indices above
  // Indices outside [0, cache_blocks) are never dereferenced by the CUDA kernels (the glue
  // cannot read them without a host sync): the forward reads such a block's keys as NaN and its
  // values as 0, so a query that sees one of its keys gets a NaN out row and lse, and the others
  // are unaffected. The CPU glue checks the values and raises instead.

  // [cuda] The rows run_kv_cache_append writes into the cache before the forward: k_new /
  // v_new [B, Hk, kv_new_len, E] at positions cache_seqlens[b] ... of sequence b. (The CPU
  // glue appends them with at:: ops.)
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int64_t k_new_stride[3] = {}, v_new_stride[3] = {};

  // [cuda] Split-KV (forward only): num_splits > 1 writes per-split partial results to
  // out_partial [num_splits, B, Hq, L, E] and lse_partial [num_splits, B, Hq, L] (float32,
  // contiguous), merged afterwards by their LSE into out / lse.
  int num_splits = 1;
  float* out_partial = nullptr;
  float* lse_partial = nullptr;
};

// The backward: the forward's inputs and options, out / lse being the forward's results.
struct AttentionBwdParams : AttentionParams {
  const void* grad_out = nullptr;  // laid out like out
  int64_t grad_out_stride[3] = {};

  void* dq = nullptr;  // like q, q's dtype
  void* dk = nullptr;  // like k
  void* dv = nullptr;  // like v
  int64_t dq_stride[3] = {}, dk_stride[3] = {}, dv_stride[3] = {};
  // [cuda] float32 workspace laid out like lse: rowsum(grad_out * out).
  float* delta = nullptr;
  // Optional [B, Hq, L, S] contiguous, zero-initialized by the caller: dL/d(scores), the
  // gradient of an additive mask (dense only), in the accumulation dtype (float32; float64 for
  // float64 inputs on the CPU). Written only for tiles that are not skipped.
  void* dmask = nullptr;
};

}  // namespace fastattn
