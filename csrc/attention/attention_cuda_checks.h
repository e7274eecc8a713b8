// What the CUDA attention glue files (attention_cuda.cpp, attention_varlen_cuda.cpp) share:
// the 16-byte row alignment the kernels' cp.async loads need, device checks, and filling
// AttentionParams: the q / k / v tensors and sizes, the options (scale, softcap, window,
// alibi, dropout) after checking them, and split-KV's partial buffers (the tensors' pointers
// and strides through attention_glue.h, which the CPU glue shares). Knows no attention math.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <optional>

#include "attention_glue.h"
#include "fastattn/attention_cuda_launch.h"
#include "fastattn/attention_head_dims.h"
#include "fastattn/attention_params.h"

namespace fastattn {
namespace glue {

using OptionalTensor = std::optional<at::Tensor>;

// The kernels read rows with 16-byte cp.async: each row (every index but the last) must
// start 16-byte aligned, with a contiguous last dim.
inline bool rows_are_aligned(const at::Tensor& t) {
  bool aligned = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(-1) == 1;
  const int64_t elements_per_16_bytes = 16 / static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    aligned = aligned && (t.size(d) == 1 || t.stride(d) % elements_per_16_bytes == 0);
  }
  return aligned;
}

// Views that break the alignment (rare: odd offsets or strides) are copied.
inline at::Tensor aligned_rows(const at::Tensor& t) {
  return rows_are_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The sizes of a call as AttentionParams counts them: q_len / kv_len are the dense lengths,
// varlen's max_seqlen_q / max_seqlen_k, or the KV cache's query length and capacity.
struct Sizes {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim;
};

// dtype, the q / k / v pointers and row strides (dense [B, H, rows, E] or packed [rows, H, E])
// and the sizes (Ev == E). q, k, v: the tensors the kernels read, kept alive by the caller.
inline void fill_qkv(AttentionParams& p, const Sizes& s, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v) {
  p.dtype = q.scalar_type() == at::kHalf ? Dtype::Float16 : Dtype::BFloat16;
  fill_qkv_tensors(p, q, k, v);
  p.batch = s.batch;
  p.q_heads = s.q_heads;
  p.kv_heads = s.kv_heads;
  p.q_len = s.q_len;
  p.kv_len = s.kv_len;
  p.head_dim = s.head_dim;
  p.v_head_dim = s.head_dim;
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.device() == q.device(), "fastattn ", op, " (cuda): ", name, " is on ", t.device(),
              " but q is on ", q.device());
}

inline void check_fp16_or_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.is_cuda(), "fastattn ", op, " (cuda): q must be a CUDA tensor, got ", q.device());
  check_same_device(k, q, op, "k");
  check_same_device(v, q, op, "v");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "fastattn ", op,
              " (cuda): q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "fastattn ", op,
              " (cuda): q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
}

// Head dims, GQA and the grid limits (heads on grid.y, batch times KV splits on grid.z).
inline void check_heads(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t value_dim,
                        const char* op) {
  TORCH_CHECK(value_dim == head_dim, "fastattn ", op, " (cuda): value head dim ", value_dim,
              " != query head dim ", head_dim, " (the cuda kernels need Ev == E)");
  TORCH_CHECK(attention_cuda_supports_head_dim(static_cast<int>(head_dim)), "fastattn ", op, " (cuda): head dim ",
              head_dim, " is not compiled (", c10::ArrayRef<int>(kAttentionCudaHeadDims), ")");
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "fastattn ", op, " (cuda): query heads ", q_heads,
              " must be a multiple of kv heads ", kv_heads);
  TORCH_CHECK(q_heads <= 65535 && batch <= 65535, "fastattn ", op,
              " (cuda): at most 65535 heads and 65535 batches, got ", q_heads, ", ", batch);
}

struct Options {
  const OptionalTensor& alibi_slopes;
  double dropout_p;
  const OptionalTensor& rng_seed;
  double scale;
  int64_t window_left, window_right;
  bool bottom_right;
  double softcap;
};

// Checks and fills the score options; batch / q_heads are the alibi slopes' [B, Hq].
inline void fill_options(AttentionParams& p, const Options& o, const at::Tensor& q, int64_t batch,
                         int64_t q_heads, const char* op) {
  p.scale = o.scale;
  p.softcap = o.softcap;
  p.window_left = o.window_left;
  p.window_right = o.window_right;
  p.bottom_right = o.bottom_right;
  if (o.alibi_slopes.has_value()) {
    const at::Tensor& slopes = *o.alibi_slopes;
    check_same_device(slopes, q, op, "alibi_slopes");
    TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.is_contiguous() &&
                    ((slopes.dim() == 1 && slopes.size(0) == q_heads) ||
                     (slopes.dim() == 2 && slopes.size(0) == batch && slopes.size(1) == q_heads)),
                "fastattn ", op, " (cuda): alibi_slopes must be contiguous float32 [Hq] or [B, Hq] = [", batch,
                ", ", q_heads, "], got ", slopes.scalar_type(), " ", slopes.sizes());
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_batch_stride = slopes.dim() == 2 ? q_heads : 0;
  }
  TORCH_CHECK(o.dropout_p >= 0.0 && o.dropout_p <= 1.0, "fastattn ", op, " (cuda): dropout_p must be in [0, 1], got ",
              o.dropout_p);
  p.dropout_p = static_cast<float>(o.dropout_p);
  if (o.dropout_p > 0.0) {
    TORCH_CHECK(o.rng_seed.has_value() && o.rng_seed->device().is_cpu() && o.rng_seed->numel() == 1 &&
                    o.rng_seed->scalar_type() == at::kLong,
                "fastattn ", op, " (cuda): dropout_p > 0 needs rng_seed, an int64 CPU scalar tensor");
    p.seed = static_cast<uint64_t>(o.rng_seed->item<int64_t>());
  }
}

inline int multiprocessor_count(const at::Tensor& q) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, q.get_device()));
  return count;
}

// Split-KV's float32 partial results (out [num_splits, B, Hq, L, E], lse [num_splits, B, Hq,
// L]), allocated when the forward splits the keys; kept alive by the caller until the launch.
struct SplitKvBuffers {
  at::Tensor out_partial, lse_partial;
};

// Picks p.num_splits for q's device (p's sizes filled) and, when it splits, allocates the
// partial buffers and points p at them.
inline SplitKvBuffers fill_split_kv(AttentionParams& p, const at::Tensor& q) {
  p.num_splits = attention_fwd_num_splits(p, multiprocessor_count(q));
  SplitKvBuffers buffers;
  if (p.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    buffers.out_partial = at::empty({p.num_splits, p.batch, p.q_heads, p.q_len, p.head_dim}, f32);
    buffers.lse_partial = at::empty({p.num_splits, p.batch, p.q_heads, p.q_len}, f32);
    p.out_partial = buffers.out_partial.data_ptr<float>();
    p.lse_partial = buffers.lse_partial.data_ptr<float>();
  }
  return buffers;
}

}  // namespace glue
}  // namespace fastattn
