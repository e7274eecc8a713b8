// The plain parameter structs the CUDA attention kernels take, and their torch-free launch
// entry points. Filled by the glue (csrc/attention/attention_cuda.cpp) from tensors in the
// normalized layout of fastattn/ops/_registry.py:
//   q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, E], out [B, Hq, L, E], lse [B, Hq, L].
// Strides are in elements; the last dimension of q, k, v, out, grad_out, dq, dk, dv is
// contiguous, every row starts 16-byte aligned (the glue guarantees both).
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
  // [B, Hq, L] float32 contiguous: log(sum(exp(scores))) per query row, -inf for a row
  // without any visible key.
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

  // Dropout: keep (b, h, i, j) iff philox_uniform(seed, ((b * Hq + h) * L + i) * S + j) >= p.
  float dropout_p = 0.0f;
  uint64_t seed = 0;

  // Split-KV (forward only): num_splits > 1 writes per-split partial results to
  // out_partial [num_splits, B, Hq, L, E] and lse_partial [num_splits, B, Hq, L] (float32,
  // contiguous), merged afterwards by their LSE into out / lse.
  int num_splits = 1;
  float* out_partial = nullptr;
  float* lse_partial = nullptr;
};

struct AttentionBwdParams : AttentionParams {
  const void* grad_out = nullptr;  // [B, Hq, L, E]
  int64_t grad_out_batch_stride = 0, grad_out_head_stride = 0, grad_out_row_stride = 0;

  void* dq = nullptr;  // [B, Hq, L, E] contiguous
  void* dk = nullptr;  // [B, Hk, S, E] contiguous
  void* dv = nullptr;  // [B, Hk, S, E] contiguous
  // [B, Hq, L] float32 workspace: rowsum(grad_out * out).
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

}  // namespace fastattn
