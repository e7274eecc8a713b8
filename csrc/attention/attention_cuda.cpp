// CUDA glue for fastattn::attention_fwd / attention_bwd: checks the tensors, allocates the
// outputs, fills the torch-free params struct and launches the kernels of
// csrc/attention/*.cu on the current stream under a device guard. Knows no attention math.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "fastattn/attention_params.h"

namespace fastattn {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// The kernels read rows with 16-byte cp.async: each row (every index but the last) must
// start 16-byte aligned. Views that break this (rare: odd offsets or strides) are copied.
at::Tensor aligned_rows(const at::Tensor& t) {
  bool aligned = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(-1) == 1;
  const int64_t elements_per_16_bytes = 16 / static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    aligned = aligned && (t.size(d) == 1 || t.stride(d) % elements_per_16_bytes == 0);
  }
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device(), "fastattn attention (cuda): ", name, " is on ", t.device(),
              " but q is on ", q.device());
}

struct Problem {
  int64_t batch, heads_q, heads_kv, len_q, len_kv, head_dim;
};

Problem check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "fastattn attention (cuda): q must be a CUDA tensor, got ", q.device());
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "fastattn attention (cuda): q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn attention (cuda): q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastattn attention (cuda): q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, E] must be 4-d, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const Problem pr{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == pr.batch && v.size(0) == pr.batch && v.size(1) == pr.heads_kv &&
                  v.size(2) == pr.len_kv && k.size(3) == pr.head_dim,
              "fastattn attention (cuda): expected k [B, Hk, S, E] and v [B, Hk, S, Ev] matching q ", q.sizes(),
              ", got k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(v.size(3) == pr.head_dim, "fastattn attention (cuda): value head dim ", v.size(3),
              " != query head dim ", pr.head_dim, " (the cuda kernels need Ev == E)");
  TORCH_CHECK(attention_cuda_supports_head_dim(static_cast<int>(pr.head_dim)),
              "fastattn attention (cuda): head dim ", pr.head_dim, " is not compiled (",
              c10::ArrayRef<int>(kAttentionCudaHeadDims), ")");
  TORCH_CHECK(pr.heads_kv > 0 && pr.heads_q % pr.heads_kv == 0,
              "fastattn attention (cuda): query heads ", pr.heads_q, " must be a multiple of kv heads ", pr.heads_kv);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "fastattn attention (cuda): the last dim of q, k, v must be contiguous (stride 1)");
  // Grid limits: heads on grid.y, batch (times the KV splits) on grid.z.
  TORCH_CHECK(pr.heads_q <= 65535 && pr.batch <= 65535,
              "fastattn attention (cuda): at most 65535 heads and 65535 batches, got ", pr.heads_q, ", ", pr.batch);
  return pr;
}

struct Options {
  const OptionalTensor& attn_mask;
  const OptionalTensor& alibi_slopes;
  double dropout_p;
  const OptionalTensor& rng_seed;
  double scale;
  int64_t window_left, window_right;
  bool bottom_right;
  double softcap;
};

// Fills everything but the output pointers; returns the (possibly realigned) q, k, v and
// mask, which must outlive the launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fill_common(AttentionParams& p, const Problem& pr,
                                                                        const at::Tensor& q_in,
                                                                        const at::Tensor& k_in,
                                                                        const at::Tensor& v_in,
                                                                        const Options& o) {
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  p.dtype = q.scalar_type() == at::kHalf ? Dtype::Float16 : Dtype::BFloat16;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.batch = static_cast<int>(pr.batch);
  p.heads_q = static_cast<int>(pr.heads_q);
  p.heads_kv = static_cast<int>(pr.heads_kv);
  p.len_q = pr.len_q;
  p.len_kv = pr.len_kv;
  p.head_dim = static_cast<int>(pr.head_dim);
  p.scale = static_cast<float>(o.scale);
  p.softcap = static_cast<float>(o.softcap);
  p.window_left = o.window_left;
  p.window_right = o.window_right;
  p.bottom_right = o.bottom_right;

  at::Tensor mask;
  if (o.attn_mask.has_value()) {
    mask = *o.attn_mask;
    check_same_device(mask, q, "attn_mask");
    TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == q.scalar_type(),
                "fastattn attention (cuda): attn_mask must be bool or ", q.scalar_type(), ", got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == pr.batch && mask.size(1) == pr.heads_q &&
                    mask.size(2) == pr.len_q && mask.size(3) == pr.len_kv,
                "fastattn attention (cuda): attn_mask must be a [B, Hq, L, S] = [", pr.batch, ", ", pr.heads_q, ", ",
                pr.len_q, ", ", pr.len_kv, "] (broadcast) view, got ", mask.sizes());
    p.mask = mask.data_ptr();
    p.mask_is_bool = mask.scalar_type() == at::kBool;
    p.mask_batch_stride = mask.stride(0), p.mask_head_stride = mask.stride(1);
    p.mask_row_stride = mask.stride(2), p.mask_col_stride = mask.stride(3);
  }
  if (o.alibi_slopes.has_value()) {
    const at::Tensor& slopes = *o.alibi_slopes;
    check_same_device(slopes, q, "alibi_slopes");
    TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.is_contiguous() &&
                    ((slopes.dim() == 1 && slopes.size(0) == pr.heads_q) ||
                     (slopes.dim() == 2 && slopes.size(0) == pr.batch && slopes.size(1) == pr.heads_q)),
                "fastattn attention (cuda): alibi_slopes must be contiguous float32 [Hq] or [B, Hq], got ",
                slopes.scalar_type(), " ", slopes.sizes());
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_batch_stride = slopes.dim() == 2 ? pr.heads_q : 0;
  }
  TORCH_CHECK(o.dropout_p >= 0.0 && o.dropout_p <= 1.0, "fastattn attention (cuda): dropout_p must be in [0, 1], got ",
              o.dropout_p);
  p.dropout_p = static_cast<float>(o.dropout_p);
  if (o.dropout_p > 0.0) {
    TORCH_CHECK(o.rng_seed.has_value() && o.rng_seed->device().is_cpu() && o.rng_seed->numel() == 1 &&
                    o.rng_seed->scalar_type() == at::kLong,
                "fastattn attention (cuda): dropout_p > 0 needs rng_seed, an int64 CPU scalar tensor");
    p.seed = static_cast<uint64_t>(o.rng_seed->item<int64_t>());
  }
  return {q, k, v, mask};
}

int multiprocessor_count(const at::Tensor& q) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, q.get_device()));
  return count;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const OptionalTensor& attn_mask,
                                                      const OptionalTensor& alibi_slopes, double dropout_p,
                                                      const OptionalTensor& rng_seed, double scale,
                                                      int64_t window_left, int64_t window_right, bool bottom_right,
                                                      double softcap) {
  const Problem pr = check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  at::Tensor out = at::empty({pr.batch, pr.heads_q, pr.len_q, pr.head_dim}, q_in.options());
  at::Tensor lse = at::empty({pr.batch, pr.heads_q, pr.len_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (pr.len_kv == 0) {  // no key visible anywhere
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  AttentionParams p;
  const Options o{attn_mask, alibi_slopes, dropout_p, rng_seed, scale, window_left, window_right, bottom_right, softcap};
  const auto kept_alive = fill_common(p, pr, q_in, k_in, v_in, o);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1), p.out_row_stride = out.stride(2);

  p.num_splits = attention_fwd_num_splits(p, multiprocessor_count(q_in));
  at::Tensor out_partial, lse_partial;
  if (p.num_splits > 1) {
    out_partial = at::empty({p.num_splits, pr.batch, pr.heads_q, pr.len_q, pr.head_dim},
                            q_in.options().dtype(at::kFloat));
    lse_partial = at::empty({p.num_splits, pr.batch, pr.heads_q, pr.len_q}, q_in.options().dtype(at::kFloat));
    p.out_partial = out_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  C10_CUDA_CHECK(run_attention_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const OptionalTensor& attn_mask,
    const OptionalTensor& alibi_slopes, double dropout_p, const OptionalTensor& rng_seed, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, bool mask_grad) {
  const Problem pr = check_qkv(q_in, k_in, v_in);
  check_same_device(grad_out_in, q_in, "grad_out");
  check_same_device(out_in, q_in, "out");
  check_same_device(lse_in, q_in, "lse");
  const std::vector<int64_t> out_shape{pr.batch, pr.heads_q, pr.len_q, pr.head_dim};
  TORCH_CHECK(grad_out_in.sizes() == out_shape && out_in.sizes() == out_shape &&
                  grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "fastattn attention_bwd (cuda): grad_out and out must be ", q_in.scalar_type(), " ", out_shape,
              ", got ", grad_out_in.scalar_type(), " ", grad_out_in.sizes(), " and ", out_in.scalar_type(), " ",
              out_in.sizes());
  TORCH_CHECK(grad_out_in.stride(3) == 1 && out_in.stride(3) == 1,
              "fastattn attention_bwd (cuda): the last dim of grad_out and out must be contiguous");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat &&
                  lse_in.sizes() == std::vector<int64_t>({pr.batch, pr.heads_q, pr.len_q}),
              "fastattn attention_bwd (cuda): lse must be float32 [B, Hq, L], got ", lse_in.scalar_type(), " ",
              lse_in.sizes());
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  at::Tensor dq = at::empty(out_shape, q_in.options());
  at::Tensor dk = at::empty({pr.batch, pr.heads_kv, pr.len_kv, pr.head_dim}, q_in.options());
  at::Tensor dv = at::empty({pr.batch, pr.heads_kv, pr.len_kv, pr.head_dim}, q_in.options());
  const auto f32 = q_in.options().dtype(at::kFloat);
  // Skipped tiles are never written: dmask starts at zero.
  at::Tensor dmask = mask_grad ? at::zeros({pr.batch, pr.heads_q, pr.len_q, pr.len_kv}, f32) : at::empty({0}, f32);
  if (pr.batch * pr.heads_q == 0 || pr.len_q == 0 || pr.len_kv == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask};
  }

  AttentionBwdParams p;
  const Options o{attn_mask, alibi_slopes, dropout_p, rng_seed, scale, window_left, window_right, bottom_right, softcap};
  const auto kept_alive = fill_common(p, pr, q_in, k_in, v_in, o);
  const at::Tensor grad_out = aligned_rows(grad_out_in), out = aligned_rows(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({pr.batch, pr.heads_q, pr.len_q}, f32);
  p.out = const_cast<void*>(out.data_ptr());
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1), p.out_row_stride = out.stride(2);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.grad_out = grad_out.data_ptr();
  p.grad_out_batch_stride = grad_out.stride(0), p.grad_out_head_stride = grad_out.stride(1);
  p.grad_out_row_stride = grad_out.stride(2);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(run_attention_bwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_fwd", &fastattn::attention_fwd_cuda);
  m.impl("attention_bwd", &fastattn::attention_bwd_cuda);
}
