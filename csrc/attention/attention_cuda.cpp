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

#include "attention_cuda_checks.h"
#include "fastattn/attention_cuda_launch.h"

namespace fastattn {
namespace {

using glue::aligned_rows;
using glue::OptionalTensor;
constexpr const char* kOp = "attention";

void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  glue::check_same_device(t, q, kOp, name);
}

using Problem = glue::Sizes;

Problem check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  glue::check_fp16_or_bf16(q, k, v, kOp);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastattn attention (cuda): q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, E] must be 4-d, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const Problem pr{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == pr.batch && v.size(0) == pr.batch && v.size(1) == pr.kv_heads &&
                  v.size(2) == pr.kv_len && k.size(3) == pr.head_dim,
              "fastattn attention (cuda): expected k [B, Hk, S, E] and v [B, Hk, S, Ev] matching q ", q.sizes(),
              ", got k ", k.sizes(), ", v ", v.sizes());
  glue::check_heads(pr.batch, pr.q_heads, pr.kv_heads, pr.head_dim, v.size(3), kOp);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "fastattn attention (cuda): the last dim of q, k, v must be contiguous (stride 1)");
  return pr;
}

struct Options {
  const OptionalTensor& attn_mask;
  glue::Options score;
};

// Fills everything but the output pointers; returns the (possibly realigned) q, k, v and
// mask, which must outlive the launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fill_common(AttentionParams& p, const Problem& pr,
                                                                        const at::Tensor& q_in,
                                                                        const at::Tensor& k_in,
                                                                        const at::Tensor& v_in,
                                                                        const Options& o) {
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  glue::fill_qkv(p, pr, q, k, v);

  at::Tensor mask;
  if (o.attn_mask.has_value()) {
    mask = *o.attn_mask;
    check_same_device(mask, q, "attn_mask");
    // float32 with any q: added at float32 precision, as torch's SDPA does.
    TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == q.scalar_type() ||
                    mask.scalar_type() == at::kFloat,
                "fastattn attention (cuda): attn_mask must be bool, float32 or q's dtype ", q.scalar_type(),
                ", got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == pr.batch && mask.size(1) == pr.q_heads &&
                    mask.size(2) == pr.q_len && mask.size(3) == pr.kv_len,
                "fastattn attention (cuda): attn_mask must be a [B, Hq, L, S] = [", pr.batch, ", ", pr.q_heads, ", ",
                pr.q_len, ", ", pr.kv_len, "] (broadcast) view, got ", mask.sizes());
    p.mask = mask.data_ptr();
    p.mask_kind = mask.scalar_type() == at::kBool ? AttnMaskKind::Bool : AttnMaskKind::Additive;
    p.mask_is_float32 = mask.scalar_type() == at::kFloat;
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask.stride(d);
  }
  glue::fill_options(p, o.score, q, pr.batch, pr.q_heads, kOp);
  return {q, k, v, mask};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const OptionalTensor& attn_mask,
                                                      const OptionalTensor& alibi_slopes, double dropout_p,
                                                      const OptionalTensor& rng_seed, double scale,
                                                      int64_t window_left, int64_t window_right, bool bottom_right,
                                                      double softcap) {
  const Problem pr = check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  at::Tensor out = at::empty({pr.batch, pr.q_heads, pr.q_len, pr.head_dim}, q_in.options());
  at::Tensor lse = at::empty({pr.batch, pr.q_heads, pr.q_len}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (pr.kv_len == 0) {  // no key visible anywhere
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  AttentionParams p;
  const Options o{attn_mask, {alibi_slopes, dropout_p, rng_seed, scale, window_left, window_right, bottom_right, softcap}};
  const auto kept_alive = fill_common(p, pr, q_in, k_in, v_in, o);
  glue::fill_outputs(p, out, lse);

  const glue::SplitKvBuffers split_buffers = glue::fill_split_kv(p, q_in);
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
  const std::vector<int64_t> out_shape{pr.batch, pr.q_heads, pr.q_len, pr.head_dim};
  TORCH_CHECK(grad_out_in.sizes() == out_shape && out_in.sizes() == out_shape &&
                  grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "fastattn attention_bwd (cuda): grad_out and out must be ", q_in.scalar_type(), " ", out_shape,
              ", got ", grad_out_in.scalar_type(), " ", grad_out_in.sizes(), " and ", out_in.scalar_type(), " ",
              out_in.sizes());
  TORCH_CHECK(grad_out_in.stride(3) == 1 && out_in.stride(3) == 1,
              "fastattn attention_bwd (cuda): the last dim of grad_out and out must be contiguous");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat &&
                  lse_in.sizes() == std::vector<int64_t>({pr.batch, pr.q_heads, pr.q_len}),
              "fastattn attention_bwd (cuda): lse must be float32 [B, Hq, L], got ", lse_in.scalar_type(), " ",
              lse_in.sizes());
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  at::Tensor dq = at::empty(out_shape, q_in.options());
  at::Tensor dk = at::empty({pr.batch, pr.kv_heads, pr.kv_len, pr.head_dim}, q_in.options());
  at::Tensor dv = at::empty({pr.batch, pr.kv_heads, pr.kv_len, pr.head_dim}, q_in.options());
  const auto f32 = q_in.options().dtype(at::kFloat);
  // Skipped tiles are never written: dmask starts at zero.
  at::Tensor dmask = mask_grad ? at::zeros({pr.batch, pr.q_heads, pr.q_len, pr.kv_len}, f32) : at::empty({0}, f32);
  if (pr.batch * pr.q_heads == 0 || pr.q_len == 0 || pr.kv_len == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask};
  }

  AttentionBwdParams p;
  const Options o{attn_mask, {alibi_slopes, dropout_p, rng_seed, scale, window_left, window_right, bottom_right, softcap}};
  const auto kept_alive = fill_common(p, pr, q_in, k_in, v_in, o);
  const at::Tensor grad_out = aligned_rows(grad_out_in), out = aligned_rows(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({pr.batch, pr.q_heads, pr.q_len}, f32);
  glue::fill_bwd_tensors(p, grad_out, out, lse, dq, dk, dv);
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
