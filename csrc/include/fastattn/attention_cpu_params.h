// Plain parameter structs of the C++ CPU attention kernels (torch-free): the glue in
// csrc/attention/attention_cpu.cpp checks the tensors and fills these; the kernels in
// csrc/attention/attention_cpu.isa.cpp read nothing else. Strides are in elements.
#pragma once

#include <cstdint>

#include "fastattn/dtype.h"

namespace fastattn {

enum class AttnMaskKind { None, Bool, Additive };

struct AttentionFwdParams {
  Dtype dtype;
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_head_dim;

  // q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]; last dims contiguous.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, row

  // [B, Hq, L, S] view (bool or q's dtype), any strides, 0 for broadcast dims.
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

  void* out;   // [B, Hq, L, Ev] contiguous, q's dtype
  float* lse;  // [B, Hq, L] contiguous
};

struct AttentionBwdParams {
  AttentionFwdParams fwd;  // inputs and options; fwd.out / fwd.lse are the forward's results
  const void* grad_out;    // [B, Hq, L, Ev]
  int64_t grad_out_stride[3];
  int64_t out_stride[3];   // strides of fwd.out (batch, head, row)
  void* dq;                // [B, Hq, L, E] contiguous, q's dtype
  void* dk;                // [B, Hk, S, E] contiguous
  void* dv;                // [B, Hk, S, Ev] contiguous
  float* dmask;            // [B, Hq, L, S] contiguous, pre-zeroed; nullptr when not wanted
};

}  // namespace fastattn
