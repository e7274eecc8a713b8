// Plain parameter structs of the C++ CPU attention kernels (torch-free): the glue in
// csrc/attention/attention_cpu.cpp checks the tensors and fills these; the kernels in
// csrc/attention/attention_cpu.isa.cpp read nothing else. Strides are in elements.
#pragma once

#include <cstdint>

#include "fastattn/dtype.h"

namespace fastattn {

enum class AttnMaskKind { None, Bool, Additive };

// One kernel serves three layouts, told apart by which pointers below are set:
//   dense:    q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]; sequence b is batch row b.
//   varlen:   q [total_q, Hq, E], k/v [total_k, Hk, *] seen as [B = 1 row, H, rows, D] with batch
//             strides 0; sequence b owns q rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 and
//             k/v rows cu_seqlens_k[b] .. (q_len / kv_len are max_seqlen_q / max_seqlen_k).
//   KV cache: q [B, Hq, L, E]; sequence b sees cache_seqlens[b] + kv_new_len keys of cache batch
//             row cache_batch_idx[b] (b when null), kv_len being the cache's capacity; paged
//             (block_table set): key j of sequence b is row j % block_size of block
//             block_table[b * block_table_stride + j / block_size], k_stride[0] / v_stride[0]
//             being the block strides.
// The query row (b, h, i) has the row index (b * Hq + h) * L + i (dense, KV cache) or
// h * total_q + cu_seqlens_q[b] + i (varlen): its lse element, and its dropout counter is
// row index * kv_len + j (fastattn/ops/_registry.py).
struct AttentionFwdParams {
  Dtype dtype;
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_head_dim;

  // Last dims contiguous.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, row

  const int32_t* cu_seqlens_q;  // varlen: [B + 1]; else nullptr
  const int32_t* cu_seqlens_k;  // varlen: [B + 1]; else nullptr
  const int32_t* cache_seqlens;    // KV cache: [B]; else nullptr
  int64_t kv_new_len;              // KV cache: keys appended after cache_seqlens[b]
  const int32_t* cache_batch_idx;  // KV cache, not paged: [B] or nullptr
  const int32_t* block_table;      // paged KV cache: [B, max_blocks] rows; else nullptr
  int64_t block_table_stride, block_size;

  // [B, Hq, L, S] view (bool or q's dtype), any strides, 0 for broadcast dims. Dense only.
  AttnMaskKind mask_kind;
  const void* mask;
  int64_t mask_stride[4];

  // float32 [Hq] (alibi_batch_stride 0) or [B, Hq]; nullptr when unused.
  const float* alibi_slopes;
  int64_t alibi_batch_stride;

  float dropout_p;  // 0 disables dropout
  uint64_t seed;
  double scale;
  int64_t window_left, window_right;  // < 0: unbounded
  bool bottom_right;
  double softcap;  // <= 0: off

  void* out;                // q's dtype, row (b, h, i) at out_stride (batch, head, row)
  int64_t out_stride[3];    // rows of a varlen sequence start at cu_seqlens_q[b] as q's do
  float* lse;               // contiguous, element = the query row's row index
};

struct AttentionBwdParams {
  AttentionFwdParams fwd;  // inputs and options; fwd.out / fwd.lse are the forward's results
  const void* grad_out;    // laid out like fwd.out
  int64_t grad_out_stride[3];
  void* dq;                // like q, q's dtype
  void* dk;                // like k
  void* dv;                // like v
  int64_t dq_stride[3], dk_stride[3], dv_stride[3];
  float* dmask;            // dense only: [B, Hq, L, S] contiguous, pre-zeroed; nullptr when not
                           // wanted
};

}  // namespace fastattn
