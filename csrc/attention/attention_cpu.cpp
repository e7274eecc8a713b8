// CPU glue of fastattn::attention_fwd / attention_bwd: checks the normalized-layout tensors,
// allocates the results, fills the torch-free params structs and calls the widest-ISA build
// of the kernels in attention_cpu.isa.cpp.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "fastattn/attention_cpu_params.h"
#include "fastattn/cpu_isa.h"

namespace fastattn {

FASTATTN_ISA_DECLARE(void attention_fwd_kernel(const AttentionFwdParams& params))
FASTATTN_ISA_DECLARE(void attention_bwd_kernel(const AttentionBwdParams& params))

namespace {

Dtype attn_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return Dtype::Float32;
    case at::kDouble: return Dtype::Float64;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Float16;
    default:
      TORCH_CHECK(false, "fastattn attention (cpu): q must be float32, float64, bfloat16 or "
                  "float16, got ", q.scalar_type());
  }
}

// The kernels read the last dim contiguously and every other dim through its stride.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

void check_4d(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "fastattn attention (cpu): ", name, " must be 4-D [B, H, len, dim], "
              "got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "fastattn attention (cpu): ", name, " must be on the CPU, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "fastattn attention (cpu): ", name,
              " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
}

struct Inputs {
  at::Tensor q, k, v, mask, alibi;
};

// Checks every input of the forward options and fills `p` (all but out / lse).
Inputs fill_fwd_params(AttentionFwdParams& p, const at::Tensor& q_in, const at::Tensor& k_in,
                       const at::Tensor& v_in, const std::optional<at::Tensor>& attn_mask,
                       const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                       const std::optional<at::Tensor>& rng_seed, double scale,
                       int64_t window_left, int64_t window_right, bool bottom_right,
                       double softcap) {
  p.dtype = attn_dtype(q_in);
  check_4d(q_in, "q", q_in);
  check_4d(k_in, "k", q_in);
  check_4d(v_in, "v", q_in);
  Inputs in{last_dim_contiguous(q_in), last_dim_contiguous(k_in), last_dim_contiguous(v_in), {},
            {}};
  const int64_t B = q_in.size(0), Hq = q_in.size(1), L = q_in.size(2), E = q_in.size(3);
  const int64_t Hk = k_in.size(1), S = k_in.size(2), Ev = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B, "fastattn attention (cpu): q, k, v must "
              "share the batch size, got q ", q_in.sizes(), ", k ", k_in.sizes(), ", v ",
              v_in.sizes());
  TORCH_CHECK(k_in.size(3) == E, "fastattn attention (cpu): k's head dim must equal q's (", E,
              "), got k ", k_in.sizes());
  TORCH_CHECK(v_in.size(1) == Hk && v_in.size(2) == S, "fastattn attention (cpu): v must be [B, ",
              Hk, ", ", S, ", Ev] like k, got v ", v_in.sizes());
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "fastattn attention (cpu): q heads (", Hq,
              ") must be a multiple of k/v heads (", Hk, ")");
  TORCH_CHECK(E > 0 && Ev > 0, "fastattn attention (cpu): head dims must be positive, got E=",
              E, ", Ev=", Ev);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "fastattn attention (cpu): dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), "fastattn attention (cpu): scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "fastattn attention (cpu): softcap must be >= 0 (0 = off), got ", softcap);

  p.batch = B; p.q_heads = Hq; p.kv_heads = Hk; p.q_len = L; p.kv_len = S;
  p.head_dim = E; p.v_head_dim = Ev;
  p.q = in.q.data_ptr(); p.k = in.k.data_ptr(); p.v = in.v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = in.q.stride(d);
    p.k_stride[d] = in.k.stride(d);
    p.v_stride[d] = in.v.stride(d);
  }

  p.mask_kind = AttnMaskKind::None;
  p.mask = nullptr;
  for (int64_t& s : p.mask_stride) s = 0;
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.device().is_cpu(), "fastattn attention (cpu): attn_mask must be on the CPU, got ",
                m.device());
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == L &&
                m.size(3) == S, "fastattn attention (cpu): attn_mask must be a [B, Hq, L, S] = [",
                B, ", ", Hq, ", ", L, ", ", S, "] view (broadcast strides allowed), got ",
                m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q_in.scalar_type(),
                "fastattn attention (cpu): attn_mask must be bool or q's dtype ",
                q_in.scalar_type(), ", got ", m.scalar_type());
    in.mask = m;
    p.mask_kind = m.scalar_type() == at::kBool ? AttnMaskKind::Bool : AttnMaskKind::Additive;
    p.mask = m.data_ptr();
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = m.size(d) == 1 ? 0 : m.stride(d);
  }

  p.alibi_slopes = nullptr;
  p.alibi_batch_stride = 0;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat,
                "fastattn attention (cpu): alibi_slopes must be a float32 CPU tensor, got ",
                a.scalar_type(), " on ", a.device());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == Hq) ||
                (a.dim() == 2 && a.size(0) == B && a.size(1) == Hq),
                "fastattn attention (cpu): alibi_slopes must be [Hq] or [B, Hq] with Hq=", Hq,
                ", B=", B, ", got ", a.sizes());
    in.alibi = a.contiguous();
    p.alibi_slopes = in.alibi.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? Hq : 0;
  }

  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = 0;
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng_seed.has_value() && rng_seed->numel() == 1 &&
                rng_seed->scalar_type() == at::kLong && rng_seed->device().is_cpu(),
                "fastattn attention (cpu): dropout_p > 0 needs rng_seed, an int64 CPU scalar "
                "tensor");
    p.seed = static_cast<uint64_t>(rng_seed->item<int64_t>());
  }
  p.scale = scale;
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
  p.softcap = softcap;
  return in;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& alibi_slopes,
    double dropout_p, const std::optional<at::Tensor>& rng_seed, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap) {
  AttentionFwdParams p{};
  Inputs in = fill_fwd_params(p, q, k, v, attn_mask, alibi_slopes, dropout_p, rng_seed, scale,
                              window_left, window_right, bottom_right, softcap);
  at::Tensor out = at::empty({p.batch, p.q_heads, p.q_len, p.v_head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.q_heads, p.q_len}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  FASTATTN_ISA_CALL(attention_fwd_kernel, p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_seed, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, bool mask_grad) {
  AttentionBwdParams bp{};
  AttentionFwdParams& p = bp.fwd;
  Inputs in = fill_fwd_params(p, q, k, v, attn_mask, alibi_slopes, dropout_p, rng_seed, scale,
                              window_left, window_right, bottom_right, softcap);
  const std::vector<int64_t> out_shape{p.batch, p.q_heads, p.q_len, p.v_head_dim};
  check_4d(grad_out, "grad_out", q);
  check_4d(out, "out", q);
  TORCH_CHECK(grad_out.sizes() == out_shape && out.sizes() == out_shape,
              "fastattn attention_bwd (cpu): grad_out and out must be [B, Hq, L, Ev] = ",
              at::IntArrayRef(out_shape), ", got grad_out ", grad_out.sizes(), ", out ",
              out.sizes());
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
              lse.sizes() == at::IntArrayRef({p.batch, p.q_heads, p.q_len}),
              "fastattn attention_bwd (cpu): lse must be float32 [B, Hq, L] on the CPU, got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  TORCH_CHECK(!mask_grad || p.mask_kind == AttnMaskKind::Additive,
              "fastattn attention_bwd (cpu): mask_grad needs an additive (floating) attn_mask");
  const at::Tensor grad_out_c = last_dim_contiguous(grad_out);
  const at::Tensor out_c = last_dim_contiguous(out);
  const at::Tensor lse_c = lse.contiguous();
  p.out = const_cast<void*>(out_c.data_ptr());
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());
  bp.grad_out = grad_out_c.data_ptr();
  for (int d = 0; d < 3; ++d) {
    bp.grad_out_stride[d] = grad_out_c.stride(d);
    bp.out_stride[d] = out_c.stride(d);
  }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dmask = mask_grad
      ? at::zeros({p.batch, p.q_heads, p.q_len, p.kv_len}, q.options().dtype(at::kFloat))
      : at::empty({0}, q.options().dtype(at::kFloat));
  bp.dq = dq.data_ptr();
  bp.dk = dk.data_ptr();
  bp.dv = dv.data_ptr();
  bp.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  FASTATTN_ISA_CALL(attention_bwd_kernel, bp);
  return {dq, dk, dv, dmask};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastattn
