// CPU glue of fastattn::attention_fwd / _bwd, attention_varlen_fwd / _bwd and
// attention_kv_cache_fwd: checks the tensors (and, on the CPU where it costs no device sync,
// the values of the offsets, lengths and block tables the kernels index with), allocates the
// results, writes a KV cache's new rows, fills the torch-free params structs and calls the
// widest-ISA build of the kernels in attention_cpu.isa.cpp.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_glue.h"
#include "fastattn/attention_params.h"
#include "fastattn/cpu_isa.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastattn {

FASTATTN_ISA_DECLARE(void attention_fwd_kernel(const AttentionParams& params))
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

// Results the kernels write (out, lse, dq, dk, dv), allocated empty. glibc serves a request
// above its mmap threshold (which adapts up to 32 MiB) with fresh pages from mmap on every
// call, so the kernel's first writes fault them in 4 KiB at a time: for the 38 MB output of
// issue 16's varlen case (256 sequences of 16..128, H 8, E 64, fp32), ~17 ms of a ~65 ms
// forward at 1 thread (1.5 ms when the memory is reused). Where transparent huge pages are in
// `madvise` mode (common; `always`: already huge, `never`: a no-op), advising the 2 MiB
// pages that lie wholly inside the buffer (only this buffer's pages) lets one fault map
// 2 MiB. Measured at 1 thread (thread CPU time, min of 15, interleaved): that varlen forward
// 64.7 -> 51.7 ms, its forward + backward 229 -> 179 ms, a dense causal forward with a 33.5 MB
// output (B 4, H 8, L 2048, E 64) 209.7 -> 205.0 ms. Below 4 MiB a buffer may hold no whole
// huge page; a buffer that comes back from the heap already faulted in gains nothing and loses
// nothing (measured: an 8 MB output, no difference).
constexpr size_t kHugePageAdviceBytes = size_t{4} << 20;

at::Tensor empty_result(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  if (t.nbytes() >= kHugePageAdviceBytes) {
    constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
    const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (first + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (first + t.nbytes()) & ~(kHugePage - 1);
    // Advice only: a failure (e.g. a kernel without THP) leaves ordinary pages.
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// The forward's out [B, Hq, L, Ev] laid out as torch's CPU flash kernel lays out its own, like
// q's dims: dense, Ev innermost, B, Hq and L ordered by q's strides as torch's empty_like orders a
// tensor that is not dense (an insertion sort from the innermost dim: a larger stride goes
// outside, equal strides put the larger size outside, a stride of 0 (an expanded dim) keeps its
// place); contiguous where Ev differs from q's head dim (torch computes those calls by its math
// path) or q's last dim is strided (the op reads a contiguous copy of q then). The heads of a
// projection, [B, L, H * E] viewed as [B, H, L, E], then give an out whose heads merge back
// (out.transpose(1, 2).reshape(B, L, -1), as MultiheadAttention and transformer blocks do) as a
// view, where a contiguous out made that a copy of the whole output (1.3% of
// fastattn.nn.MultiheadAttention's forward at N4 L256 D512, Xeon with AMX).
// fastattn/ops/attention.py's fake applies the same rule.
at::Tensor empty_out_like_query(const at::Tensor& q, int64_t v_head_dim) {
  std::array<int64_t, 3> inner_first{2, 1, 0};  // q's dims B, Hq, L, the innermost first
  if (v_head_dim == q.size(3)) {
    // > 0: dim a goes outside dim b; < 0: it stays inside; 0: no order between them.
    const auto compare = [&](int64_t a, int64_t b) -> int {
      const int64_t sa = q.stride(a), sb = q.stride(b);
      if (sa == 0 || sb == 0) return 0;
      if (sa != sb) return sa > sb ? 1 : -1;
      return q.size(a) > q.size(b) ? 1 : 0;
    };
    for (int64_t i = 1; i < 3; ++i) {
      int64_t moving = i;
      for (int64_t j = i - 1; j >= 0; --j) {
        const int c = compare(inner_first[j], inner_first[moving]);
        if (c < 0) break;
        if (c > 0) {
          std::swap(inner_first[j], inner_first[moving]);
          moving = j;
        }
      }
    }
  }
  const std::vector<int64_t> sizes{q.size(inner_first[2]), q.size(inner_first[1]),
                                   q.size(inner_first[0]), v_head_dim};
  std::vector<int64_t> back(4, 3);  // the permutation that undoes the order of `sizes`
  for (int64_t i = 0; i < 3; ++i) back[inner_first[i]] = 2 - i;
  return empty_result(sizes, q.options()).permute(back);
}

int64_t ceil_div_host(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Checks and fills the options shared by every layout (p.batch and p.q_heads already set).
void fill_options(AttentionParams& p, Inputs& in, const char* op, const at::Tensor& q,
                  const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                  const std::optional<at::Tensor>& rng_seed, double scale, int64_t window_left,
                  int64_t window_right, bool bottom_right, double softcap) {
  const int64_t B = p.batch, Hq = p.q_heads;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "fastattn ", op, " (cpu): dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), "fastattn ", op, " (cpu): scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "fastattn ", op, " (cpu): softcap must be >= 0 (0 = off), got ", softcap);
  p.alibi_slopes = nullptr;
  p.alibi_batch_stride = 0;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat,
                "fastattn ", op, " (cpu): alibi_slopes must be a float32 CPU tensor, got ",
                a.scalar_type(), " on ", a.device());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == Hq) ||
                (a.dim() == 2 && a.size(0) == B && a.size(1) == Hq),
                "fastattn ", op, " (cpu): alibi_slopes must be [Hq] or [B, Hq] with Hq=", Hq,
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
                "fastattn ", op, " (cpu): dropout_p > 0 needs rng_seed, an int64 CPU scalar "
                "tensor");
    p.seed = static_cast<uint64_t>(rng_seed->item<int64_t>());
  }
  p.scale = scale;
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
  p.softcap = softcap;
}

// Checks every input of the forward options and fills `p` (all but out / lse).
Inputs fill_fwd_params(AttentionParams& p, const at::Tensor& q_in, const at::Tensor& k_in,
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

  p.batch = B; p.q_heads = Hq; p.kv_heads = Hk; p.q_len = L; p.kv_len = S;
  p.head_dim = E; p.v_head_dim = Ev;
  glue::fill_qkv_tensors(p, in.q, in.k, in.v);

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
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q_in.scalar_type() ||
                    m.scalar_type() == at::kFloat,
                "fastattn attention (cpu): attn_mask must be bool, float32 or q's dtype ",
                q_in.scalar_type(), ", got ", m.scalar_type());
    in.mask = m;
    p.mask_kind = m.scalar_type() == at::kBool ? AttnMaskKind::Bool : AttnMaskKind::Additive;
    p.mask_is_float32 = m.scalar_type() == at::kFloat;
    p.mask = m.data_ptr();
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = m.size(d) == 1 ? 0 : m.stride(d);
  }

  fill_options(p, in, "attention", q_in, alibi_slopes, dropout_p, rng_seed, scale, window_left,
               window_right, bottom_right, softcap);
  return in;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& alibi_slopes,
    double dropout_p, const std::optional<at::Tensor>& rng_seed, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap) {
  AttentionParams p{};
  Inputs in = fill_fwd_params(p, q, k, v, attn_mask, alibi_slopes, dropout_p, rng_seed, scale,
                              window_left, window_right, bottom_right, softcap);
  at::Tensor out = empty_out_like_query(in.q, p.v_head_dim);
  at::Tensor lse = empty_result({p.batch, p.q_heads, p.q_len}, q.options().dtype(at::kFloat));
  glue::fill_outputs(p, out, lse);
  FASTATTN_ISA_CALL(attention_fwd_kernel, p);
  return {out, lse};
}

// Runs the backward kernel on checked inputs (bp filled but for out / lse); returns
// dq, dk, dv, contiguous like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_bwd(AttentionBwdParams& bp,
                                                       const at::Tensor& grad_out,
                                                       const at::Tensor& out,
                                                       const at::Tensor& lse, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v) {
  at::Tensor dq = empty_result(q.sizes(), q.options());
  at::Tensor dk = empty_result(k.sizes(), k.options());
  at::Tensor dv = empty_result(v.sizes(), v.options());
  glue::fill_bwd_tensors(bp, grad_out, out, lse, dq, dk, dv);
  FASTATTN_ISA_CALL(attention_bwd_kernel, bp);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_seed, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, bool mask_grad) {
  AttentionBwdParams bp{};
  AttentionParams& p = bp;
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
  // In the kernel's accumulation dtype, so that float64 mask gradients keep float64 precision.
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dmask = mask_grad
      ? at::zeros({p.batch, p.q_heads, p.q_len, p.kv_len}, q.options().dtype(acc))
      : at::empty({0}, q.options().dtype(acc));
  bp.dmask = mask_grad ? dmask.data_ptr() : nullptr;
  const auto [dq, dk, dv] = run_bwd(bp, grad_out_c, out_c, lse_c, q, k, v);
  return {dq, dk, dv, dmask};
}

void check_index_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == dim,
              "fastattn ", op, " (cpu): ", name, " must be a ", dim, "-D int32 CPU tensor, got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// Checks cu_seqlens (int32 [B + 1] from 0, non-decreasing, ending at total, no length above
// max_len) and returns it contiguous. The value checks raise ValueError (TORCH_CHECK_VALUE):
// on CPU tensors they are the only check of these values (the Python op layer skips its own
// and re-raises these as FastattnValueError), so they must read as fastattn's other value errors.
at::Tensor checked_cu_seqlens(const at::Tensor& cu, const char* name, int64_t batch,
                              int64_t total, int64_t max_len, const char* max_name) {
  const char* op = "attention_varlen";
  check_index_tensor(cu, op, name, 1);
  TORCH_CHECK(cu.size(0) == batch + 1, "fastattn ", op, " (cpu): ", name, " must have B + 1 = ",
              batch + 1, " entries (as cu_seqlens_q), got ", cu.size(0));
  at::Tensor c = cu.contiguous();
  const int32_t* o = c.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(o[0] == 0, "fastattn ", op, " (cpu): ", name, " must start at 0, got ",
                    o[0]);
  // In the Python checks' order (a decrease is reported as such, not as a long sequence).
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(o[b + 1] >= o[b], "fastattn ", op, " (cpu): ", name,
                      " must be non-decreasing, got ", o[b], " then ", o[b + 1], " at ", b);
  }
  TORCH_CHECK_VALUE(o[batch] == total, "fastattn ", op, " (cpu): ", name, "[-1] = ", o[batch],
                    " must equal the total token count ", total);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(o[b + 1] - o[b] <= max_len, "fastattn ", op, " (cpu): ", name,
                      " gives sequence ", b, " ", o[b + 1] - o[b], " rows, more than ", max_name,
                      " = ", max_len);
  }
  return c;
}

struct VarlenInputs {
  Inputs in;
  at::Tensor cu_q, cu_k;
};

VarlenInputs fill_varlen_params(AttentionParams& p, const at::Tensor& q_in,
                                const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                int64_t max_seqlen_q, int64_t max_seqlen_k,
                                const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                const std::optional<at::Tensor>& rng_seed, double scale,
                                int64_t window_left, int64_t window_right, bool bottom_right,
                                double softcap) {
  const char* op = "attention_varlen";
  p.dtype = attn_dtype(q_in);
  for (const auto& [t, name] : {std::pair{q_in, "q"}, {k_in, "k"}, {v_in, "v"}}) {
    TORCH_CHECK(t.dim() == 3, "fastattn ", op, " (cpu): ", name,
                " must be 3-D [tokens, heads, dim], got shape ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), "fastattn ", op, " (cpu): ", name,
                " must be on the CPU, got ", t.device());
    TORCH_CHECK(t.scalar_type() == q_in.scalar_type(), "fastattn ", op, " (cpu): ", name,
                " must have q's dtype ", q_in.scalar_type(), ", got ", t.scalar_type());
  }
  const int64_t Hq = q_in.size(1), E = q_in.size(2), Hk = k_in.size(1), Ev = v_in.size(2);
  TORCH_CHECK(k_in.size(2) == E, "fastattn ", op, " (cpu): k's head dim must equal q's (", E,
              "), got k ", k_in.sizes());
  TORCH_CHECK(v_in.size(0) == k_in.size(0) && v_in.size(1) == Hk, "fastattn ", op,
              " (cpu): v must be [", k_in.size(0), ", ", Hk, ", Ev] like k, got v ", v_in.sizes());
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "fastattn ", op, " (cpu): q heads (", Hq,
              ") must be a multiple of k/v heads (", Hk, ")");
  TORCH_CHECK(E > 0 && Ev > 0, "fastattn ", op, " (cpu): head dims must be positive, got E=", E,
              ", Ev=", Ev);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "fastattn ", op,
              " (cpu): max_seqlen_q / max_seqlen_k must be >= 0, got ", max_seqlen_q, " / ",
              max_seqlen_k);
  check_index_tensor(cu_seqlens_q, op, "cu_seqlens_q", 1);
  const int64_t B = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(B >= 0, "fastattn ", op, " (cpu): cu_seqlens_q must have B + 1 >= 1 entries");
  VarlenInputs vin{{last_dim_contiguous(q_in), last_dim_contiguous(k_in),
                    last_dim_contiguous(v_in), {}, {}},
                   checked_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", B, q_in.size(0),
                                      max_seqlen_q, "max_seqlen_q"),
                   checked_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", B, k_in.size(0),
                                      max_seqlen_k, "max_seqlen_k")};
  const Inputs& in = vin.in;
  p.batch = B; p.q_heads = Hq; p.kv_heads = Hk; p.q_len = max_seqlen_q; p.kv_len = max_seqlen_k;
  p.head_dim = E; p.v_head_dim = Ev;
  glue::fill_qkv_tensors(p, in.q, in.k, in.v);
  p.cu_seqlens_q = vin.cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = vin.cu_k.data_ptr<int32_t>();
  p.total_q = q_in.size(0);
  p.mask_kind = AttnMaskKind::None;
  fill_options(p, vin.in, op, q_in, alibi_slopes, dropout_p, rng_seed, scale, window_left,
               window_right, bottom_right, softcap);
  return vin;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_seed, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap) {
  AttentionParams p{};
  VarlenInputs in = fill_varlen_params(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, alibi_slopes, dropout_p, rng_seed, scale,
                                       window_left, window_right, bottom_right, softcap);
  at::Tensor out = empty_result({q.size(0), p.q_heads, p.v_head_dim}, q.options());
  at::Tensor lse = empty_result({p.q_heads, q.size(0)}, q.options().dtype(at::kFloat));
  glue::fill_outputs(p, out, lse);
  FASTATTN_ISA_CALL(attention_fwd_kernel, p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_seed, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap) {
  AttentionBwdParams bp{};
  AttentionParams& p = bp;
  VarlenInputs in = fill_varlen_params(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, alibi_slopes, dropout_p, rng_seed, scale,
                                       window_left, window_right, bottom_right, softcap);
  const std::vector<int64_t> out_shape{q.size(0), p.q_heads, p.v_head_dim};
  for (const auto& [t, name] : {std::pair{grad_out, "grad_out"}, {out, "out"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == q.scalar_type() &&
                t.sizes() == out_shape, "fastattn attention_varlen_bwd (cpu): ", name,
                " must be ", q.scalar_type(), " ", at::IntArrayRef(out_shape),
                " [total_q, Hq, Ev] on the CPU, got ", t.scalar_type(), " ", t.sizes(), " on ",
                t.device());
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
              lse.sizes() == at::IntArrayRef({p.q_heads, q.size(0)}),
              "fastattn attention_varlen_bwd (cpu): lse must be float32 [Hq, total_q] on the "
              "CPU, got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  return run_bwd(bp, last_dim_contiguous(grad_out), last_dim_contiguous(out), lse.contiguous(),
                 q, k, v);
}

// Writes values [B, Hk, L_new, D] into cache in place: row i of (b, h) at position
// cache_seqlens[b] + i of sequence b, which is row p % block_size of block
// block_table[b][p / block_size] (paged: block_table given, rows_per_table its row length), else
// row p of cache row cache_batch_idx[b] (or b). Positions and indices are checked; the cache's
// last dim is contiguous; values may have any strides. Row by row as bytes (one dtype): an
// index_put_ of the same rows cost ~11 us per cache on a decode step, a third of its attention.
void append_kv_rows(const at::Tensor& cache, const at::Tensor& values, const int32_t* seqlens,
                    const int32_t* block_table, int64_t rows_per_table,
                    const int32_t* cache_batch_idx) {
  const int64_t B = values.size(0), H = values.size(1), L_new = values.size(2);
  const int64_t D = values.size(3), bytes = values.element_size();
  const int64_t block_size = cache.size(2);
  auto* dst_base = static_cast<char*>(cache.data_ptr());
  const auto* src_base = static_cast<const char*>(values.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < L_new; ++i) {
        const int64_t pos = seqlens[b] + i;
        int64_t slot, row;  // cache dim 0 and dim 2 of the new row
        if (block_table != nullptr) {
          slot = block_table[b * rows_per_table + pos / block_size], row = pos % block_size;
        } else {
          slot = cache_batch_idx != nullptr ? cache_batch_idx[b] : b, row = pos;
        }
        char* dst = dst_base + (slot * cache.stride(0) + h * cache.stride(1) +
                                row * cache.stride(2)) * bytes;
        const char* src = src_base + (b * values.stride(0) + h * values.stride(1) +
                                      i * values.stride(2)) * bytes;
        if (values.stride(3) == 1 || D == 1) {
          std::memcpy(dst, src, D * bytes);
        } else {
          for (int64_t e = 0; e < D; ++e) {
            std::memcpy(dst + e * bytes, src + e * values.stride(3) * bytes, bytes);
          }
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_kv_cache_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx,
    const std::optional<at::Tensor>& alibi_slopes, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap) {
  const char* op = "attention_kv_cache";
  AttentionParams p{};
  p.dtype = attn_dtype(q);
  check_4d(q, "q", q);
  check_4d(k_cache, "k_cache", q);
  check_4d(v_cache, "v_cache", q);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), E = q.size(3);
  const int64_t Hk = k_cache.size(1), Ev = v_cache.size(3);
  for (const auto& [t, name] : {std::pair{k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "fastattn ", op, " (cpu): ", name,
                " must have a contiguous last dim (it is read and written in place), got "
                "strides ", t.strides());
  }
  TORCH_CHECK(k_cache.size(3) == E, "fastattn ", op, " (cpu): k_cache's head dim must equal "
              "q's (", E, "), got k_cache ", k_cache.sizes());
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == Hk &&
              v_cache.size(2) == k_cache.size(2), "fastattn ", op, " (cpu): v_cache must be [",
              k_cache.size(0), ", ", Hk, ", ", k_cache.size(2), ", Ev] like k_cache, got ",
              v_cache.sizes());
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "fastattn ", op, " (cpu): q heads (", Hq,
              ") must be a multiple of cache heads (", Hk, ")");
  TORCH_CHECK(E > 0 && Ev > 0, "fastattn ", op, " (cpu): head dims must be positive, got E=", E,
              ", Ev=", Ev);
  check_index_tensor(cache_seqlens, op, "cache_seqlens", 1);
  TORCH_CHECK(cache_seqlens.size(0) == B, "fastattn ", op, " (cpu): cache_seqlens must be [B] = [",
              B, "], got ", cache_seqlens.sizes());
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "fastattn ", op,
              " (cpu): pass both k_new and v_new, or neither");
  int64_t L_new = 0;
  if (k_new.has_value()) {
    L_new = k_new->dim() == 4 ? k_new->size(2) : -1;
    for (const auto& [t, name, dim] :
         {std::tuple{*k_new, "k_new", E}, std::tuple{*v_new, "v_new", Ev}}) {
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == q.scalar_type() &&
                  t.dim() == 4 && t.size(0) == B && t.size(1) == Hk && t.size(2) == L_new &&
                  t.size(3) == dim, "fastattn ", op, " (cpu): ", name, " must be ",
                  q.scalar_type(), " [B, Hk, L_new, ", dim == E ? "E" : "Ev", "] = [", B, ", ",
                  Hk, ", L_new, ", dim, "] on the CPU (k_new and v_new sharing L_new), got ",
                  t.scalar_type(), " ", t.sizes(), " on ", t.device());
    }
  }
  const bool paged = block_table.has_value();
  at::Tensor table, batch_idx;
  int64_t capacity = k_cache.size(2);  // keys one sequence can hold
  const at::Tensor seqlens_c = cache_seqlens.contiguous();
  const int32_t* seqlens = seqlens_c.data_ptr<int32_t>();
  if (paged) {
    TORCH_CHECK(!cache_batch_idx.has_value(), "fastattn ", op,
                " (cpu): cache_batch_idx must be None with a block_table");
    check_index_tensor(*block_table, op, "block_table", 2);
    TORCH_CHECK(block_table->size(0) == B, "fastattn ", op, " (cpu): block_table must be "
                "[B, max_blocks] with B = ", B, ", got ", block_table->sizes());
    TORCH_CHECK(k_cache.size(2) > 0, "fastattn ", op, " (cpu): a paged cache's block_size "
                "(k_cache.size(2)) must be positive");
    table = block_table->contiguous();
    capacity = table.size(1) * k_cache.size(2);
  } else if (cache_batch_idx.has_value()) {
    check_index_tensor(*cache_batch_idx, op, "cache_batch_idx", 1);
    TORCH_CHECK(cache_batch_idx->size(0) == B, "fastattn ", op, " (cpu): cache_batch_idx must "
                "be [B] = [", B, "], got ", cache_batch_idx->sizes());
    batch_idx = cache_batch_idx->contiguous();
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = seqlens[b];
    TORCH_CHECK_VALUE(len >= 0 && len + L_new <= capacity, "fastattn ", op,
                      " (cpu): cache_seqlens[", b, "] + L_new = ", len, " + ", L_new,
                      " must lie in [0, ", capacity, "] (the cache's capacity per sequence)");
    if (paged) {
      const int32_t* row = table.data_ptr<int32_t>() + b * table.size(1);
      for (int64_t j = 0; j < ceil_div_host(len + L_new, k_cache.size(2)); ++j) {
        TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < k_cache.size(0), "fastattn ", op,
                          " (cpu): block_table[", b, ", ", j, "] = ", row[j], " is not a block "
                          "of the cache (", k_cache.size(0), " blocks)");
      }
    } else if (batch_idx.defined()) {
      const int32_t idx = batch_idx.data_ptr<int32_t>()[b];
      TORCH_CHECK_VALUE(idx >= 0 && idx < k_cache.size(0), "fastattn ", op,
                        " (cpu): cache_batch_idx[", b, "] = ", idx, " is not a row of the cache (",
                        k_cache.size(0), " rows)");
    } else {
      TORCH_CHECK(k_cache.size(0) >= B, "fastattn ", op, " (cpu): k_cache has ",
                  k_cache.size(0), " rows for a batch of ", B, " (pass cache_batch_idx)");
    }
  }
  p.batch = B; p.q_heads = Hq; p.kv_heads = Hk; p.q_len = Lq; p.kv_len = capacity;
  p.head_dim = E; p.v_head_dim = Ev;
  Inputs in{last_dim_contiguous(q), k_cache, v_cache, {}, {}};
  fill_options(p, in, op, q, alibi_slopes, 0.0, std::nullopt, scale, window_left, window_right,
               bottom_right, softcap);

  // Everything is valid: append, then attend.
  if (L_new > 0) {
    const int32_t* block_row = paged ? table.data_ptr<int32_t>() : nullptr;
    const int32_t* cache_row = batch_idx.defined() ? batch_idx.data_ptr<int32_t>() : nullptr;
    append_kv_rows(k_cache, *k_new, seqlens, block_row, paged ? table.size(1) : 0, cache_row);
    append_kv_rows(v_cache, *v_new, seqlens, block_row, paged ? table.size(1) : 0, cache_row);
  }

  glue::fill_qkv_tensors(p, in.q, k_cache, v_cache);
  p.cache_seqlens = seqlens;
  p.kv_new_len = L_new;
  p.cache_batch_idx = batch_idx.defined() ? batch_idx.data_ptr<int32_t>() : nullptr;
  p.block_table = paged ? table.data_ptr<int32_t>() : nullptr;
  p.block_table_stride = paged ? table.size(1) : 0;
  p.block_size = paged ? k_cache.size(2) : 0;
  p.cache_blocks = k_cache.size(0);
  p.mask_kind = AttnMaskKind::None;
  at::Tensor out = empty_result({B, Hq, Lq, Ev}, q.options());
  at::Tensor lse = empty_result({B, Hq, Lq}, q.options().dtype(at::kFloat));
  glue::fill_outputs(p, out, lse);
  FASTATTN_ISA_CALL(attention_fwd_kernel, p);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd_cpu);
  m.impl("attention_kv_cache_fwd", &attention_kv_cache_fwd_cpu);
}

}  // namespace fastattn
