// CUDA glue for fastattn::attention_varlen_fwd / attention_varlen_bwd (packed sequences,
// offsets read by the kernels from cu_seqlens: no host sync) and attention_kv_cache_fwd
// (append k_new / v_new into a contiguous or paged cache, then attend; split-KV decode).
// Checks every argument before anything is written, allocates the outputs, fills the
// torch-free params struct and launches on the current stream under a device guard. The
// checks that need the offsets' or indices' values are the op layer's (fastattn/ops). Knows
// no attention math.
#include <ATen/ATen.h>
#include <c10/core/SymInt.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "attention_cuda_checks.h"
#include "fastattn/attention_cuda_launch.h"

namespace fastattn {
namespace {

using glue::aligned_rows;
using glue::OptionalTensor;

// int32 [batch + 1] offsets on q's device (read by the kernels, contiguous).
at::Tensor checked_offsets(const at::Tensor& cu, const at::Tensor& q, int64_t batch, const char* name) {
  glue::check_same_device(cu, q, "attention_varlen", name);
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1 &&
                  (batch < 0 || cu.size(0) == batch + 1),
              "fastattn attention_varlen (cuda): ", name, " must be int32 [B + 1]",
              batch >= 0 ? " with B = " + std::to_string(batch) : std::string(), ", got ", cu.scalar_type(), " ",
              cu.sizes());
  return cu.contiguous();
}

struct Varlen {
  int64_t batch, q_heads, kv_heads, total_q, total_k, head_dim, max_q, max_k;
  at::Tensor cu_q, cu_k;

  // The kernels' grid and dropout counter run over the longest sequences.
  glue::Sizes sizes() const { return {batch, q_heads, kv_heads, max_q, max_k, head_dim}; }
};

Varlen check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                    const at::Tensor& cu_k, const c10::SymInt& max_seqlen_q, const c10::SymInt& max_seqlen_k) {
  glue::check_fp16_or_bf16(q, k, v, "attention_varlen");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "fastattn attention_varlen (cuda): q [total_q, Hq, E], k [total_k, Hk, E], v [total_k, Hk, Ev] must "
              "be 3-d, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && k.size(2) == q.size(2),
              "fastattn attention_varlen (cuda): expected k [total_k, Hk, E] and v [total_k, Hk, Ev] matching q ",
              q.sizes(), ", got k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "fastattn attention_varlen (cuda): the last dim of q, k, v must be contiguous (stride 1)");
  Varlen vl;
  vl.cu_q = checked_offsets(cu_q, q, -1, "cu_seqlens_q");
  vl.batch = vl.cu_q.size(0) - 1;
  vl.cu_k = checked_offsets(cu_k, q, vl.batch, "cu_seqlens_k");
  vl.q_heads = q.size(1), vl.kv_heads = k.size(1), vl.head_dim = q.size(2);
  vl.total_q = q.size(0), vl.total_k = k.size(0);
  vl.max_q = max_seqlen_q.expect_int();
  vl.max_k = max_seqlen_k.expect_int();
  TORCH_CHECK(vl.max_q >= 0 && vl.max_k >= 0, "fastattn attention_varlen (cuda): max_seqlen_q / max_seqlen_k must be "
              ">= 0, got ", vl.max_q, ", ", vl.max_k);
  glue::check_heads(vl.batch, vl.q_heads, vl.kv_heads, vl.head_dim, v.size(2), "attention_varlen");
  return vl;
}

// Fills what forward and backward share; returns the (possibly realigned) q, k, v, which
// must outlive the launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fill_varlen(AttentionParams& p, const Varlen& vl, const at::Tensor& q_in,
                                                           const at::Tensor& k_in, const at::Tensor& v_in,
                                                           const glue::Options& o) {
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  // Packed rows: no batch stride, sequence b starts at row cu_seqlens[b].
  glue::fill_qkv(p, vl.sizes(), q, k, v);
  p.total_q = vl.total_q;
  p.cu_seqlens_q = vl.cu_q.data_ptr<int>();
  p.cu_seqlens_k = vl.cu_k.data_ptr<int>();
  glue::fill_options(p, o, q, vl.batch, vl.q_heads, "attention_varlen");
  return {q, k, v};
}

// Nothing for the kernels to do: no query row, or no key anywhere.
bool varlen_is_trivial(const Varlen& vl) {
  return vl.batch == 0 || vl.q_heads == 0 || vl.total_q == 0 || vl.max_q == 0 || vl.total_k == 0 || vl.max_k == 0;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k,
    const OptionalTensor& alibi_slopes, double dropout_p, const OptionalTensor& rng_seed, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap) {
  const Varlen vl = check_varlen(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const glue::Options o{alibi_slopes, dropout_p, rng_seed, scale, window_left, window_right, bottom_right, softcap};
  AttentionParams p;
  const auto kept_alive = fill_varlen(p, vl, q_in, k_in, v_in, o);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  at::Tensor out = at::empty({vl.total_q, vl.q_heads, vl.head_dim}, q_in.options());
  at::Tensor lse = at::empty({vl.q_heads, vl.total_q}, q_in.options().dtype(at::kFloat));
  if (varlen_is_trivial(vl)) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  glue::fill_outputs(p, out, lse);
  C10_CUDA_CHECK(run_attention_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k,
    const OptionalTensor& alibi_slopes, double dropout_p, const OptionalTensor& rng_seed, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap) {
  const Varlen vl = check_varlen(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  glue::check_same_device(grad_out_in, q_in, "attention_varlen_bwd", "grad_out");
  glue::check_same_device(out_in, q_in, "attention_varlen_bwd", "out");
  glue::check_same_device(lse_in, q_in, "attention_varlen_bwd", "lse");
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes() &&
                  grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "fastattn attention_varlen_bwd (cuda): grad_out and out must be ", q_in.scalar_type(), " ",
              q_in.sizes(), ", got ", grad_out_in.scalar_type(), " ", grad_out_in.sizes(), " and ",
              out_in.scalar_type(), " ", out_in.sizes());
  TORCH_CHECK(grad_out_in.stride(2) == 1 && out_in.stride(2) == 1,
              "fastattn attention_varlen_bwd (cuda): the last dim of grad_out and out must be contiguous");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 2 && lse_in.size(0) == vl.q_heads &&
                  lse_in.size(1) == vl.total_q,
              "fastattn attention_varlen_bwd (cuda): lse must be float32 [Hq, total_q] = [", vl.q_heads, ", ",
              vl.total_q, "], got ", lse_in.scalar_type(), " ", lse_in.sizes());
  const glue::Options o{alibi_slopes, dropout_p, rng_seed, scale, window_left, window_right, bottom_right, softcap};
  AttentionBwdParams p;
  const auto kept_alive = fill_varlen(p, vl, q_in, k_in, v_in, o);
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  at::Tensor dq = at::empty(q_in.sizes(), q_in.options());
  at::Tensor dk = at::empty(k_in.sizes(), k_in.options());
  at::Tensor dv = at::empty(v_in.sizes(), v_in.options());
  if (varlen_is_trivial(vl)) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  // Keys no query sees (and their sequences' empty query sets) are written by the kernels.
  const at::Tensor grad_out = aligned_rows(grad_out_in), out = aligned_rows(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({vl.q_heads, vl.total_q}, q_in.options().dtype(at::kFloat));
  glue::fill_bwd_tensors(p, grad_out, out, lse, dq, dk, dv);
  p.delta = delta.data_ptr<float>();
  C10_CUDA_CHECK(run_attention_bwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {dq, dk, dv};
}

// An int32 index tensor on q's device of the given sizes (contiguous for the kernels).
at::Tensor checked_indices(const at::Tensor& t, const at::Tensor& q, at::IntArrayRef sizes, const char* name,
                           const char* shape) {
  glue::check_same_device(t, q, "attention_kv_cache", name);
  TORCH_CHECK(t.scalar_type() == at::kInt && t.sizes() == sizes, "fastattn attention_kv_cache (cuda): ", name,
              " must be int32 ", shape, " = ", sizes, ", got ", t.scalar_type(), " ", t.sizes());
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_kv_cache_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens_in,
    const OptionalTensor& k_new_in, const OptionalTensor& v_new_in, const OptionalTensor& block_table_in,
    const OptionalTensor& cache_batch_idx_in, const OptionalTensor& alibi_slopes, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap) {
  constexpr const char* kOp = "attention_kv_cache";
  glue::check_fp16_or_bf16(q_in, k_cache, v_cache, kOp);
  const bool paged = block_table_in.has_value();
  TORCH_CHECK(q_in.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "fastattn attention_kv_cache (cuda): q [B, Hq, Lq, E], k_cache / v_cache ",
              paged ? "[num_blocks, Hk, block_size, E]" : "[B_cache, Hk, S_max, E]", " must be 4-d, got ",
              q_in.sizes(), ", ", k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t batch = q_in.size(0), q_heads = q_in.size(1), q_len = q_in.size(2), head_dim = q_in.size(3);
  const int64_t cache_blocks = k_cache.size(0), kv_heads = k_cache.size(1), rows = k_cache.size(2);
  TORCH_CHECK(v_cache.size(0) == cache_blocks && v_cache.size(1) == kv_heads && v_cache.size(2) == rows &&
                  k_cache.size(3) == head_dim,
              "fastattn attention_kv_cache (cuda): expected k_cache and v_cache of the same [blocks, Hk, rows] with "
              "k_cache's last dim E = ", head_dim, ", got ", k_cache.sizes(), ", ", v_cache.sizes());
  glue::check_heads(batch, q_heads, kv_heads, head_dim, v_cache.size(3), kOp);
  TORCH_CHECK(q_in.stride(3) == 1, "fastattn attention_kv_cache (cuda): the last dim of q must be contiguous");
  // The caches are written in place, so they cannot be realigned by a copy.
  TORCH_CHECK(glue::rows_are_aligned(k_cache) && glue::rows_are_aligned(v_cache),
              "fastattn attention_kv_cache (cuda): k_cache and v_cache need a contiguous last dim and 16-byte "
              "aligned rows (strides multiples of 8 elements), got strides ", k_cache.strides(), ", ",
              v_cache.strides());
  const at::Tensor cache_seqlens = checked_indices(cache_seqlens_in, q_in, {batch}, "cache_seqlens", "[B]");

  TORCH_CHECK(k_new_in.has_value() == v_new_in.has_value(),
              "fastattn attention_kv_cache (cuda): k_new and v_new must be given together");
  int64_t len_new = 0;
  at::Tensor k_new, v_new;
  if (k_new_in.has_value()) {
    glue::check_same_device(*k_new_in, q_in, kOp, "k_new");
    glue::check_same_device(*v_new_in, q_in, kOp, "v_new");
    len_new = k_new_in->dim() == 4 ? k_new_in->size(2) : -1;
    const std::vector<int64_t> shape{batch, kv_heads, len_new, head_dim};
    TORCH_CHECK(k_new_in->sizes() == shape && v_new_in->sizes() == shape &&
                    k_new_in->scalar_type() == q_in.scalar_type() && v_new_in->scalar_type() == q_in.scalar_type(),
                "fastattn attention_kv_cache (cuda): k_new and v_new must be ", q_in.scalar_type(),
                " [B, Hk, L_new, E] = [", batch, ", ", kv_heads, ", L_new, ", head_dim, "], got ",
                k_new_in->scalar_type(), " ", k_new_in->sizes(), " and ", v_new_in->scalar_type(), " ",
                v_new_in->sizes());
    k_new = k_new_in->contiguous();
    v_new = v_new_in->contiguous();
  }

  const int64_t max_blocks = paged ? block_table_in->size(-1) : 0;
  at::Tensor block_table, cache_batch_idx;
  if (paged) {
    TORCH_CHECK(!cache_batch_idx_in.has_value(),
                "fastattn attention_kv_cache (cuda): cache_batch_idx must be None with block_table");
    TORCH_CHECK(block_table_in->dim() == 2, "fastattn attention_kv_cache (cuda): block_table must be int32 "
                "[B, max_blocks], got ", block_table_in->sizes());
    block_table = checked_indices(*block_table_in, q_in, {batch, max_blocks}, "block_table", "[B, max_blocks]");
  } else if (cache_batch_idx_in.has_value()) {
    cache_batch_idx = checked_indices(*cache_batch_idx_in, q_in, {batch}, "cache_batch_idx", "[B]");
  } else {
    TORCH_CHECK(cache_blocks >= batch, "fastattn attention_kv_cache (cuda): k_cache has ", cache_blocks,
                " rows for a batch of ", batch, " (pass cache_batch_idx to pick rows)");
  }
  const int64_t capacity = paged ? max_blocks * rows : rows;
  TORCH_CHECK(len_new <= capacity, "fastattn attention_kv_cache (cuda): L_new = ", len_new,
              " does not fit in a cache of ", capacity, " positions");
  // The kernels index both caches as blocks of `rows` rows (a cache_batch_idx entry is one
  // block of S_max rows), with an int block size.
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(),
              "fastattn attention_kv_cache (cuda): k_cache dim 2 (block_size / S_max) too large");

  AttentionParams p;
  const glue::Options o{alibi_slopes, 0.0, std::nullopt, scale, window_left, window_right, bottom_right, softcap};
  const at::Tensor q = aligned_rows(q_in);
  glue::fill_options(p, o, q, batch, q_heads, kOp);
  // Everything is checked: from here on the cache may be written.
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  glue::fill_qkv(p, {batch, q_heads, kv_heads, q_len, capacity, head_dim}, q, k_cache, v_cache);
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.kv_new_len = len_new;
  p.cache_blocks = cache_blocks;
  if (paged) {
    p.block_table = block_table.data_ptr<int>();
    p.block_table_stride = max_blocks;
    p.block_size = rows;
  } else if (cache_batch_idx.defined()) {
    p.cache_batch_idx = cache_batch_idx.data_ptr<int>();
  }
  if (len_new > 0) {
    p.k_new = k_new.data_ptr(), p.v_new = v_new.data_ptr();
    glue::row_strides(p.k_new_stride, k_new);
    glue::row_strides(p.v_new_stride, v_new);
    C10_CUDA_CHECK(run_kv_cache_append(p, stream));
  }

  at::Tensor out = at::empty({batch, q_heads, q_len, head_dim}, q_in.options());
  at::Tensor lse = at::empty({batch, q_heads, q_len}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (capacity == 0) {  // no key anywhere
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  glue::fill_outputs(p, out, lse);
  const glue::SplitKvBuffers split_buffers = glue::fill_split_kv(p, q_in);
  C10_CUDA_CHECK(run_attention_fwd(p, stream));
  return {out, lse};
}

}  // namespace
}  // namespace fastattn

// The schemas are defined in fastattn/ops/_registry.py (torch.library); these are the CUDA
// kernels of three of them.
TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_varlen_fwd", &fastattn::attention_varlen_fwd_cuda);
  m.impl("attention_varlen_bwd", &fastattn::attention_varlen_bwd_cuda);
  m.impl("attention_kv_cache_fwd", &fastattn::attention_kv_cache_fwd_cuda);
}
