// Attention forward, split-KV decode + combine, and backward (preprocess, dQ, dK/dV) under
// cudasim, through the entry points the torch glue calls (csrc/attention/attention_cuda.cpp:
// attention_fwd_num_splits, run_attention_fwd, run_attention_bwd), against a float64
// reference of the kernel contract (fastattn/attention_params.h).
//
// The same kernels on packed varlen sequences (forward and backward; cu_seqlens read in the
// kernels) and on a KV cache (run_kv_cache_append, then the forward over a contiguous cache
// through cache_batch_idx or a paged one through a shuffled block table, split-KV on), each
// against float64 attention per sequence (varlen_cases, kv_cache_cases: f16 E64, which the
// subset build compiles too). --varlen-dropout-mask=FILE writes the varlen forward's keep bits.
//
// The backward gets the float64 forward's out (rounded to the element type) and lse, so it
// is judged on its own. --dropout-mask=FILE instead writes the keep mask the forward kernels
// applied (recovered with one-hot values) for the Python test to compare with the CPU
// backend's Philox stream (fastattn.ops.reference.dropout_keep_mask).
//
// CUDASIM_CONFIG_SUBSET (the ASan+UBSan build and the mutation check): the kernels of two
// configs only (f16 E64, bf16 E128), called through their per-config launchers (what
// run_attention_* dispatch to) with the split count the case names, to keep those builds
// short. The cases of those two configs cover every flag.
#include "attention/attention_fwd.cuh"
#include "attention/attention_bwd.cuh"
#ifndef CUDASIM_CONFIG_SUBSET
#include "attention/attention_dispatch.cu"
#endif
#include "attention/kv_cache_append.cu"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>

#include "harness.h"

CUDASIM_DEFINE_DYNAMIC_SMEM(fastattn::attn, smem, 227 * 1024)

using fastattn::AttentionBwdParams;
using fastattn::AttentionParams;
using harness::Err;
using harness::from_d;
using harness::to_d;

namespace {

enum class Mask {
  kNone,
  kBoolShared,      // bool [1, 1, L, S] broadcast over batch and heads (zero strides), one empty row
  kBoolKeyPadding,  // bool [B, 1, 1, S] (zero head and row strides)
  kFloatFull,       // additive [B, Hq, L, S], with its gradient (dmask)
  kFloatPerHead,    // additive [1, Hq, L, S] broadcast over batch
  // additive float32 [B, Hq, L, S] of 30-sized values (ALiBi / relative-position biases), with
  // dmask: read at float32 precision (rounded to bf16 they would move the scores by up to 0.125)
  kFloat32Full,
};
enum class Alibi { kNone, kPerHead, kPerBatchHead };

struct Case {
  const char* name;
  int head_dim;
  int batch, q_heads, kv_heads;
  int64_t q_len, kv_len;
  bool bottom_right = false;
  int64_t window_left = -1, window_right = -1;  // causal: window_right = 0
  float softcap = 0.0f;
  Alibi alibi = Alibi::kNone;
  Mask mask = Mask::kNone;
  float dropout = 0.0f;
  bool strided = false;  // q, k, v, out, grad_out as [B, L, H, E] views (row stride H * E)
  bool backward = true;
  int subset_splits = 1;  // KV splits in the subset build (the full build asks the glue's heuristic)
  double tol = 0.0;       // of max |reference|; 0: the element type's
};

// Tensors of one case, in the layout the params describe.
template <typename T>
struct Problem {
  const Case& c;
  int B, Hq, Hk, E;
  int64_t L, S;
  std::vector<T> q, k, v, d_out, mask_float;
  std::vector<float> mask_float32;
  std::vector<unsigned char> mask_bool;
  std::vector<float> slopes;
  int64_t mask_strides[4] = {0, 0, 0, 0};  // b, h, i, j

  Problem(const Case& c_, std::mt19937& rng)
      : c(c_), B(c_.batch), Hq(c_.q_heads), Hk(c_.kv_heads), E(c_.head_dim), L(c_.q_len), S(c_.kv_len) {
    q = harness::randn<T>(size_t(B) * Hq * L * E, rng);
    k = harness::randn<T>(size_t(B) * Hk * S * E, rng);
    v = harness::randn<T>(size_t(B) * Hk * S * E, rng);
    d_out = harness::randn<T>(size_t(B) * Hq * L * E, rng);
    slopes.resize(size_t(B) * Hq);
    for (size_t x = 0; x < slopes.size(); ++x) slopes[x] = 0.03f * float(x % 7 + 1);
    std::normal_distribution<double> normal;
    switch (c.mask) {
      case Mask::kNone: break;
      case Mask::kBoolShared:
        mask_bool.resize(L * S);
        for (int64_t i = 0; i < L; ++i)
          for (int64_t j = 0; j < S; ++j) mask_bool[i * S + j] = i != 2 && (i * 31 + j * 17) % 5 != 0;
        mask_strides[2] = S, mask_strides[3] = 1;
        break;
      case Mask::kBoolKeyPadding:
        mask_bool.resize(B * S);
        for (int b = 0; b < B; ++b)
          for (int64_t j = 0; j < S; ++j) mask_bool[b * S + j] = j < S - 3 * (b + 1);
        mask_strides[0] = S, mask_strides[3] = 1;
        break;
      case Mask::kFloatFull:
      case Mask::kFloatPerHead: {
        const int mb = c.mask == Mask::kFloatFull ? B : 1;
        mask_float.resize(size_t(mb) * Hq * L * S);
        for (size_t x = 0; x < mask_float.size(); ++x)
          mask_float[x] = from_d<T>(x % 11 == 3 ? -INFINITY : 0.5 * normal(rng));
        mask_strides[0] = c.mask == Mask::kFloatFull ? Hq * L * S : 0;
        mask_strides[1] = L * S, mask_strides[2] = S, mask_strides[3] = 1;
        break;
      }
      case Mask::kFloat32Full:
        mask_float32.resize(size_t(B) * Hq * L * S);
        for (size_t x = 0; x < mask_float32.size(); ++x)
          mask_float32[x] = x % 11 == 3 ? -INFINITY : float(30.0 * normal(rng));
        mask_strides[0] = Hq * L * S, mask_strides[1] = L * S, mask_strides[2] = S, mask_strides[3] = 1;
        break;
    }
  }
  // Entry mi of the additive mask, exactly as stored.
  double mask_value(int64_t mi) const { return mask_float32.empty() ? to_d(mask_float[mi]) : mask_float32[mi]; }
  // Element (b, h, i, e) of a [B, H, N, E] tensor stored as the case's layout says.
  size_t at(int H, int64_t N, int b, int h, int64_t i, int e) const {
    return c.strided ? ((size_t(b) * N + i) * H + h) * E + e : ((size_t(b) * H + h) * N + i) * E + e;
  }
  // (batch, head, row) strides of a [B, H, N, E] tensor stored as the case's layout says.
  void strides(int H, int64_t N, int64_t (&s)[3]) const {
    if (c.strided) s[0] = N * H * E, s[1] = E, s[2] = H * E;
    else s[0] = H * N * E, s[1] = N * E, s[2] = E;
  }
  void fill(AttentionParams& p) const {
    p.dtype = std::is_same_v<T, __half> ? fastattn::Dtype::Float16 : fastattn::Dtype::BFloat16;
    p.q = q.data(), p.k = k.data(), p.v = v.data();
    strides(Hq, L, p.q_stride);
    strides(Hk, S, p.k_stride);
    strides(Hk, S, p.v_stride);
    strides(Hq, L, p.out_stride);
    p.batch = B, p.q_heads = Hq, p.kv_heads = Hk, p.q_len = L, p.kv_len = S, p.head_dim = E, p.v_head_dim = E;
    p.scale = 1.0f / std::sqrt(static_cast<float>(E));
    p.softcap = c.softcap;
    p.window_left = c.window_left, p.window_right = c.window_right, p.bottom_right = c.bottom_right;
    if (c.mask != Mask::kNone) {
      const bool is_bool = !mask_bool.empty();
      p.mask_kind = is_bool ? fastattn::AttnMaskKind::Bool : fastattn::AttnMaskKind::Additive;
      p.mask_is_float32 = !mask_float32.empty();
      p.mask = is_bool                ? static_cast<const void*>(mask_bool.data())
               : p.mask_is_float32 ? static_cast<const void*>(mask_float32.data())
                                   : static_cast<const void*>(mask_float.data());
      std::copy(mask_strides, mask_strides + 4, p.mask_stride);
    }
    if (c.alibi != Alibi::kNone) {
      p.alibi_slopes = slopes.data();
      p.alibi_batch_stride = c.alibi == Alibi::kPerBatchHead ? Hq : 0;
    }
    p.dropout_p = c.dropout;
    p.seed = 0x9E3779B97F4A7C15ull;  // both 32-bit halves of the Philox key non-zero
  }
};

// float64 forward and backward of the contract, one query row at a time.
struct Reference {
  std::vector<double> out, lse, dq, dk, dv, dmask;
};

template <typename T>
Reference reference(const Problem<T>& pr, const AttentionParams& p) {
  const int B = pr.B, Hq = pr.Hq, Hk = pr.Hk, E = pr.E, G = Hq / Hk;
  const int64_t L = pr.L, S = pr.S;
  const Case& c = pr.c;
  Reference r;
  r.out.assign(size_t(B) * Hq * L * E, 0.0), r.lse.assign(size_t(B) * Hq * L, -INFINITY);
  r.dq.assign(size_t(B) * Hq * L * E, 0.0), r.dk.assign(size_t(B) * Hk * S * E, 0.0);
  r.dv.assign(size_t(B) * Hk * S * E, 0.0), r.dmask.assign(size_t(B) * Hq * L * S, 0.0);
  const double scale = p.scale;
  const int64_t offset = c.bottom_right ? S - L : 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / G;
      for (int64_t i = 0; i < L; ++i) {
        std::vector<double> s(S, -INFINITY), dsdz(S, scale), P(S, 0.0), keep(S, 1.0);
        double m = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          const int64_t d = j - i - offset;
          if ((c.window_left >= 0 && d < -c.window_left) || (c.window_right >= 0 && d > c.window_right)) continue;
          const int64_t mi = b * pr.mask_strides[0] + h * pr.mask_strides[1] + i * pr.mask_strides[2] + j * pr.mask_strides[3];
          if (!pr.mask_bool.empty() && !pr.mask_bool[mi]) continue;
          double z = 0.0;
          for (int e = 0; e < E; ++e) z += to_d(pr.q[pr.at(Hq, L, b, h, i, e)]) * to_d(pr.k[pr.at(Hk, S, b, hk, j, e)]);
          double x = z * scale;
          if (c.softcap > 0.0f) {
            const double t = std::tanh(x / c.softcap);
            x = c.softcap * t;
            dsdz[j] = scale * (1.0 - t * t);
          }
          if (c.alibi != Alibi::kNone) x += double(pr.slopes[b * p.alibi_batch_stride + h]) * double(d);
          if (c.mask != Mask::kNone && pr.mask_bool.empty()) x += pr.mask_value(mi);
          s[j] = x;
          m = std::max(m, x);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < S; ++j)
          if (s[j] != -INFINITY) sum += std::exp(s[j] - m);
        const size_t row = (size_t(b) * Hq + h) * L + i;
        if (!(sum > 0)) continue;  // no visible key: out 0, lse -inf, no gradient
        r.lse[row] = m + std::log(sum);
        for (int64_t j = 0; j < S; ++j) {
          if (s[j] != -INFINITY) P[j] = std::exp(s[j] - m) / sum;
          if (c.dropout > 0.0f) {
            const uint64_t n = static_cast<uint64_t>(row * S + j);
            keep[j] = fastattn::philox_uniform(p.seed, n) >= c.dropout ? 1.0 / (1.0 - double(c.dropout)) : 0.0;
          }
        }
        double delta = 0.0;  // rowsum(dO * out) with out rounded to T, like the kernel's input
        for (int e = 0; e < E; ++e) {
          double o = 0.0;
          for (int64_t j = 0; j < S; ++j) o += P[j] * keep[j] * to_d(pr.v[pr.at(Hk, S, b, hk, j, e)]);
          r.out[row * E + e] = o;
          delta += to_d(pr.d_out[pr.at(Hq, L, b, h, i, e)]) * to_d(from_d<T>(o));
        }
        for (int64_t j = 0; j < S; ++j) {
          if (P[j] == 0.0) continue;
          double dp = 0.0;
          for (int e = 0; e < E; ++e) dp += to_d(pr.d_out[pr.at(Hq, L, b, h, i, e)]) * to_d(pr.v[pr.at(Hk, S, b, hk, j, e)]);
          const double ds = P[j] * (dp * keep[j] - delta);
          r.dmask[row * S + j] = ds;
          const double dz = ds * dsdz[j];
          for (int e = 0; e < E; ++e) {
            r.dq[row * E + e] += dz * to_d(pr.k[pr.at(Hk, S, b, hk, j, e)]);
            r.dk[((size_t(b) * Hk + hk) * S + j) * E + e] += dz * to_d(pr.q[pr.at(Hq, L, b, h, i, e)]);
            r.dv[((size_t(b) * Hk + hk) * S + j) * E + e] += P[j] * keep[j] * to_d(pr.d_out[pr.at(Hq, L, b, h, i, e)]);
          }
        }
      }
    }
  return r;
}

// The configs the subset build compiles.
template <typename T, int E>
constexpr bool kCompiled =
#ifdef CUDASIM_CONFIG_SUBSET
    (std::is_same_v<T, __half> && E == 64) || (std::is_same_v<T, __nv_bfloat16> && E == 128);
#else
    true;
#endif

// Launches the forward (AttentionParams) or the backward (AttentionBwdParams) through the glue's
// entry point, or in the subset build through the per-config launcher it dispatches to.
template <typename T, int E, typename Params>
cudaError_t launch(const Params& p) {
  constexpr bool kForward = std::is_same_v<Params, AttentionParams>;
#ifdef CUDASIM_CONFIG_SUBSET
  if constexpr (kForward) return fastattn::attn::launch_attention_fwd<T, E>(p, nullptr);
  else return fastattn::attn::launch_attention_bwd<T, E>(p, nullptr);
#else
  if constexpr (kForward) return fastattn::run_attention_fwd(p, nullptr);
  else return fastattn::run_attention_bwd(p, nullptr);
#endif
}

// Runs the forward the way the glue does: ask for the split count, allocate the partials.
template <typename T, int E>
cudaError_t run_fwd(AttentionParams& p, int subset_splits, std::vector<float>& out_partial,
                    std::vector<float>& lse_partial) {
#ifdef CUDASIM_CONFIG_SUBSET
  p.num_splits = subset_splits;
#else
  (void)subset_splits;
  p.num_splits = fastattn::attention_fwd_num_splits(p, cudasim::device_sms());
#endif
  if (p.num_splits > 1) {
    out_partial.assign(size_t(p.num_splits) * p.batch * p.q_heads * p.q_len * p.head_dim, NAN);
    lse_partial.assign(size_t(p.num_splits) * p.batch * p.q_heads * p.q_len, NAN);
    p.out_partial = out_partial.data(), p.lse_partial = lse_partial.data();
  }
  return launch<T, E>(p);
}

template <typename T, int E>
bool run_case(const Case& c) {
  std::mt19937 rng(1234 + E + int(c.q_len) * 7 + int(c.kv_len));
  const Problem<T> pr(c, rng);
  AttentionParams p;
  pr.fill(p);
  const Reference ref = reference(pr, p);
  const double tol = c.tol > 0 ? c.tol : std::is_same_v<T, __half> ? 5e-3 : 3e-2;  // of max |reference|
  const int64_t rows = int64_t(pr.B) * pr.Hq * pr.L;
  const unsigned long long sw0 = cudasim::rt().switches;

  // Forward.
  std::vector<T> out = harness::poisoned<T>(size_t(rows) * E);
  std::vector<float> lse(rows, NAN), out_partial, lse_partial;
  p.out = out.data(), p.lse = lse.data();
  if (const cudaError_t err = run_fwd<T, E>(p, c.subset_splits, out_partial, lse_partial); err != cudaSuccess) {
    std::printf("%-70s FAIL  forward launch error %d\n", c.name, int(err));
    return false;
  }
  Err e_out, e_lse;
  bool empty_ok = true;
  for (int b = 0; b < pr.B; ++b)
    for (int h = 0; h < pr.Hq; ++h)
      for (int64_t i = 0; i < pr.L; ++i) {
        const size_t row = (size_t(b) * pr.Hq + h) * pr.L + i;
        for (int e = 0; e < E; ++e) e_out.add(ref.out[row * E + e], to_d(out[pr.at(pr.Hq, pr.L, b, h, i, e)]));
        if (std::isinf(ref.lse[row])) empty_ok &= std::isinf(lse[row]) && lse[row] < 0;
        else e_lse.add(ref.lse[row], lse[row]);
      }
  bool ok = e_out.rel() <= tol && e_lse.max_abs <= 1e-4 * std::max(1.0, e_lse.max_ref) && empty_ok;
  std::printf("%-70s %s  splits %3d  out %.1e lse %.1e", c.name, ok ? "OK  " : "FAIL", p.num_splits, e_out.rel(), e_lse.max_abs);
  if (!empty_ok) std::printf(" (row without keys: lse not -inf)");

  // Backward from the reference forward.
  if (c.backward) {
    AttentionBwdParams bp;
    static_cast<AttentionParams&>(bp) = p;
    bp.num_splits = 1, bp.out_partial = nullptr, bp.lse_partial = nullptr;
    std::vector<T> ref_out(size_t(rows) * E);
    std::vector<float> ref_lse(rows), delta(rows, NAN);
    for (int b = 0; b < pr.B; ++b)
      for (int h = 0; h < pr.Hq; ++h)
        for (int64_t i = 0; i < pr.L; ++i)
          for (int e = 0; e < E; ++e) {
            const size_t row = (size_t(b) * pr.Hq + h) * pr.L + i;
            ref_out[pr.at(pr.Hq, pr.L, b, h, i, e)] = from_d<T>(ref.out[row * E + e]);
            ref_lse[row] = static_cast<float>(ref.lse[row]);
          }
    std::vector<T> dq = harness::poisoned<T>(size_t(rows) * E);
    std::vector<T> dk = harness::poisoned<T>(size_t(pr.B) * pr.Hk * pr.S * E), dv = dk;
    const bool with_dmask = c.mask == Mask::kFloatFull || c.mask == Mask::kFloat32Full;
    std::vector<float> dmask(with_dmask ? size_t(rows) * pr.S : 0, 0.0f);  // the caller zero-fills it
    bp.out = ref_out.data(), bp.lse = ref_lse.data();
    bp.grad_out = pr.d_out.data();
    pr.strides(pr.Hq, pr.L, bp.grad_out_stride);
    bp.dq = dq.data(), bp.dk = dk.data(), bp.dv = dv.data(), bp.delta = delta.data();
    bp.dq_stride[0] = int64_t(pr.Hq) * pr.L * E, bp.dq_stride[1] = pr.L * E, bp.dq_stride[2] = E;
    bp.dk_stride[0] = int64_t(pr.Hk) * pr.S * E, bp.dk_stride[1] = pr.S * E, bp.dk_stride[2] = E;
    std::copy(bp.dk_stride, bp.dk_stride + 3, bp.dv_stride);
    bp.dmask = with_dmask ? dmask.data() : nullptr;
    if (const cudaError_t err = launch<T, E>(bp); err != cudaSuccess) {
      std::printf("  FAIL backward launch error %d\n", int(err));
      return false;
    }
    Err e_dq, e_dk, e_dv, e_dm;
    for (size_t x = 0; x < dq.size(); ++x) e_dq.add(ref.dq[x], to_d(dq[x]));
    for (size_t x = 0; x < dk.size(); ++x) e_dk.add(ref.dk[x], to_d(dk[x]));
    for (size_t x = 0; x < dv.size(); ++x) e_dv.add(ref.dv[x], to_d(dv[x]));
    for (size_t x = 0; x < dmask.size(); ++x) e_dm.add(ref.dmask[x], dmask[x]);
    const bool bwd_ok = e_dq.rel() <= tol && e_dk.rel() <= tol && e_dv.rel() <= tol && (!with_dmask || e_dm.rel() <= tol);
    std::printf(" | bwd %s dq %.1e dk %.1e dv %.1e", bwd_ok ? "OK  " : "FAIL", e_dq.rel(), e_dk.rel(), e_dv.rel());
    if (with_dmask) std::printf(" dmask %.1e", e_dm.rel());
    ok &= bwd_ok;
  }
  std::printf(" (tol %.0e) %llu switches\n", tol, cudasim::rt().switches - sw0);
  return ok;
}

struct Entry {
  bool bf16;
  Case c;
};

template <typename T>
bool dispatch_head_dim(const Case& c, bool& ran) {
  auto go = [&](auto e) {
    constexpr int E = decltype(e)::value;
    if constexpr (kCompiled<T, E>) {
      ran = true;
      return run_case<T, E>(c);
    }
    return true;
  };
  switch (c.head_dim) {
    case 32: return go(std::integral_constant<int, 32>{});
    case 64: return go(std::integral_constant<int, 64>{});
    case 96: return go(std::integral_constant<int, 96>{});
    case 128: return go(std::integral_constant<int, 128>{});
    case 192: return go(std::integral_constant<int, 192>{});
    case 256: return go(std::integral_constant<int, 256>{});
  }
  std::printf("%s: head dim %d has no kernel\n", c.name, c.head_dim);
  return false;
}

// Every flag, every head dim, both dtypes, odd sizes; the decode cases (L <= 16) take the
// one-warp kernel and, with few (b, h) CTAs, the split-KV path plus the combine kernel.
const std::vector<Entry>& cases() {
  static const std::vector<Entry> all = {
      {false, {"f16 E64 GQA 4:1 L33 S47", 64, 1, 4, 1, 33, 47}},
      {true, {"bf16 E128 B2 GQA 2:1 causal bottom-right L70 S50 (rows without keys)", 128, 2, 2, 1, 70, 50, true, -1, 0}},
      {false, {"f16 E64 causal top-left softcap alibi[Hq] L50 S80", 64, 1, 2, 2, 50, 80, false, -1, 0, 20.0f, Alibi::kPerHead}},
      {true, {"bf16 E32 window(20,5) bool mask [L,S] broadcast, empty row L40 S90", 32, 1, 2, 1, 40, 90, false, 20, 5,
              0.0f, Alibi::kNone, Mask::kBoolShared}},
      {false, {"f16 E32 float mask [B,Hq,L,S] + dmask, window(30,10) L40 S70", 32, 2, 1, 1, 40, 70, false, 30, 10, 0.0f,
               Alibi::kNone, Mask::kFloatFull}},
      {false, {"f16 E64 GQA dropout 0.2 L33 S70", 64, 1, 2, 1, 33, 70, false, -1, -1, 0.0f, Alibi::kNone, Mask::kNone,
               0.2f}},
      {true, {"bf16 E96 B2 alibi[B,Hq] key-padding bool mask [B,1,1,S] L30 S45", 96, 2, 2, 2, 30, 45, false, -1, -1,
              0.0f, Alibi::kPerBatchHead, Mask::kBoolKeyPadding}},
      {false, {"f16 E256 GQA 2:1 L20 S40 (split dK / dV kernels)", 256, 1, 2, 1, 20, 40}},
      {true, {"bf16 E192 causal bottom-right L17 S33", 192, 1, 1, 1, 17, 33, true, -1, 0}},
      {false, {"f16 E128 [B,L,H,E] views, float mask [1,Hq,L,S] L65 S64", 128, 2, 2, 2, 65, 64, false, -1, -1, 0.0f,
               Alibi::kNone, Mask::kFloatPerHead, 0.0f, true}},
      {true, {"bf16 E64 decode GQA L5 S300", 64, 1, 4, 2, 5, 300, false, -1, -1, 0.0f, Alibi::kNone, Mask::kNone,
              0.0f, false, true, 3}},
      {false, {"f16 E64 decode L1 S257 causal bottom-right dropout 0.1 softcap", 64, 1, 2, 2, 1, 257, true, -1, 0,
               30.0f, Alibi::kNone, Mask::kNone, 0.1f, false, true, 4}},
      {true, {"bf16 E256 decode L7 S129 window(40,-1) alibi", 256, 1, 1, 1, 7, 129, true, 40, -1, 0.0f,
              Alibi::kPerHead}},
      {false, {"f16 E96 decode L16 S33 bool mask [L,S], [B,L,H,E] views", 96, 1, 3, 1, 16, 33, false, -1, -1, 0.0f,
               Alibi::kNone, Mask::kBoolShared, 0.0f, true}},
      {false, {"f16 E64 GQA 2:1 float mask [B,Hq,L,S] + dmask, window(12,3) L19 S37", 64, 1, 2, 1, 19, 37, false, 12,
               3, 0.0f, Alibi::kNone, Mask::kFloatFull}},
      {true, {"bf16 E128 decode GQA L3 S200 key-padding bool mask, softcap", 128, 2, 2, 1, 3, 200, false, -1, -1, 10.0f,
              Alibi::kNone, Mask::kBoolKeyPadding, 0.0f, false, true, 3}},
      {true, {"bf16 E128 bool mask [L,S] broadcast, empty row, alibi[B,Hq] L21 S30", 128, 2, 1, 1, 21, 30, false, -1,
              -1, 0.0f, Alibi::kPerBatchHead, Mask::kBoolShared}},
      // Within 2x torch's own error: bf16 CPU SDPA with such a mask has out, dq, dk, dv <= 3.5e-3
      // of max |float64|. The mask rounded to bf16 gives 1e-2 to 8e-2, often within bf16's 3e-2.
      {true, {"bf16 E128 GQA 2:1 float32 mask x30 + dmask, causal bottom-right L33 S40", 128, 1, 2, 1, 33, 40, true, -1,
              0, 0.0f, Alibi::kNone, Mask::kFloat32Full, 0.0f, false, true, 1, 7e-3}},
      {true, {"bf16 E32 L1 S1", 32, 1, 1, 1, 1, 1}},
      {false, {"f16 E192 L7 S1 causal top-left", 192, 1, 1, 1, 7, 1, false, -1, 0}},
  };
  return all;
}

// Forward with one-hot values (v[j] = e_j, S <= E): out[i][j] = P[i][j] * keep[i][j] / (1 - p),
// so out != 0 is the keep mask the kernel applied. Writes uint8 [B, H, L, S] per shape.
template <typename T, int E>
bool dump_dropout_mask(FILE* f, int B, int H, int64_t L, int64_t S, float p_drop) {
  std::mt19937 rng(5);
  Case c{"dropout mask", E, B, H, H, L, S};
  c.dropout = p_drop;
  Problem<T> pr(c, rng);
  for (auto& x : pr.q) x = from_d<T>(0.1 * to_d(x));  // nearly uniform probabilities: none underflows
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int64_t j = 0; j < S; ++j)
        for (int e = 0; e < E; ++e) pr.v[pr.at(H, S, b, h, j, e)] = from_d<T>(e == j ? 1.0 : 0.0);
  AttentionParams p;
  pr.fill(p);
  std::vector<T> out = harness::poisoned<T>(size_t(B) * H * L * E);
  std::vector<float> lse(size_t(B) * H * L), op, lp;
  p.out = out.data(), p.lse = lse.data();
  if (run_fwd<T, E>(p, c.subset_splits, op, lp) != cudaSuccess) return false;
  std::vector<unsigned char> keep(size_t(B) * H * L * S);
  for (size_t row = 0; row < size_t(B) * H * L; ++row)
    for (int64_t j = 0; j < S; ++j) keep[row * S + j] = to_d(out[row * E + j]) != 0.0;
  std::fwrite(keep.data(), 1, keep.size(), f);
  std::printf("dropout mask B%d H%d L%lld S%lld p %.2f: %d splits, %.3f kept\n", B, H, (long long)L, (long long)S,
              p_drop, p.num_splits, double(std::count(keep.begin(), keep.end(), 1)) / keep.size());
  return true;
}

// ---- varlen and KV cache -------------------------------------------------------------------
// The same kernels with per-sequence rows and lengths: packed varlen sequences (forward and
// backward), and the KV-cache forward (append, then attend; contiguous or paged cache).

struct SeqOptions {
  bool bottom_right = false;
  int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;
  bool alibi = false;  // slopes [B, Hq]
  float dropout = 0.0f;
};

// float64 attention of one sequence and query head (Lq queries, Sk keys): q(i, e), k(j, e),
// v(j, e), d_out(i, e) read the inputs, keep(i, j) is the dropout factor, round(x) rounds the
// output to the element type (the backward's delta uses the stored out). Writes out [Lq, E]
// and lse [Lq]; adds dq [Lq, E], dk / dv [Sk, E].
struct SeqGrads {
  std::vector<double> out, lse, dq, dk, dv;
};
template <typename Q, typename K, typename V, typename DO, typename Keep, typename Round>
void reference_sequence(int64_t Lq, int64_t Sk, int E, double scale, double slope, const SeqOptions& o,
                        Q q, K k, V v, DO d_out, Keep keep, Round round, SeqGrads& g) {
  const int64_t offset = o.bottom_right ? Sk - Lq : 0;
  for (int64_t i = 0; i < Lq; ++i) {
    std::vector<double> s(Sk, -INFINITY), dsdz(Sk, scale), P(Sk, 0.0), kp(Sk, 1.0);
    double m = -INFINITY;
    for (int64_t j = 0; j < Sk; ++j) {
      const int64_t d = j - i - offset;
      if ((o.window_left >= 0 && d < -o.window_left) || (o.window_right >= 0 && d > o.window_right)) continue;
      double z = 0.0;
      for (int e = 0; e < E; ++e) z += q(i, e) * k(j, e);
      double x = z * scale;
      if (o.softcap > 0.0f) {
        const double t = std::tanh(x / o.softcap);
        x = o.softcap * t;
        dsdz[j] = scale * (1.0 - t * t);
      }
      s[j] = x + slope * double(d);
      m = std::max(m, s[j]);
    }
    double sum = 0.0;
    for (int64_t j = 0; j < Sk; ++j)
      if (s[j] != -INFINITY) sum += std::exp(s[j] - m);
    g.lse[i] = sum > 0 ? m + std::log(sum) : -INFINITY;
    if (!(sum > 0)) continue;  // no visible key: out 0, no gradient
    for (int64_t j = 0; j < Sk; ++j) {
      if (s[j] != -INFINITY) P[j] = std::exp(s[j] - m) / sum;
      kp[j] = keep(i, j);
    }
    double delta = 0.0;
    for (int e = 0; e < E; ++e) {
      double out = 0.0;
      for (int64_t j = 0; j < Sk; ++j) out += P[j] * kp[j] * v(j, e);
      g.out[i * E + e] = out;
      delta += d_out(i, e) * round(out);
    }
    for (int64_t j = 0; j < Sk; ++j) {
      if (P[j] == 0.0) continue;
      double dp = 0.0;
      for (int e = 0; e < E; ++e) dp += d_out(i, e) * v(j, e);
      const double dz = P[j] * (dp * kp[j] - delta) * dsdz[j];
      for (int e = 0; e < E; ++e) {
        g.dq[i * E + e] += dz * k(j, e);
        g.dk[j * E + e] += dz * q(i, e);
        g.dv[j * E + e] += P[j] * kp[j] * d_out(i, e);
      }
    }
  }
}

struct VarlenCase {
  const char* name;
  int Hq, Hk;
  std::vector<int> lens_q, lens_k;
  SeqOptions o;
};

// Packed [total, H, E] tensors whose rows are `row_stride` = (H + 1) * E apart (a view of a
// wider buffer: the kernels must follow the strides, not assume [total, H, E] contiguous).
template <typename T>
struct Packed {
  int H, E;
  int64_t total, row_stride;
  std::vector<T> data;
  Packed(int64_t total_, int H_, int E_, std::mt19937& rng)
      : H(H_), E(E_), total(total_), row_stride(int64_t(H_ + 1) * E_), data(harness::randn<T>(size_t(total_ + 1) * (H_ + 1) * E_, rng)) {}
  double at(int64_t row, int h, int e) const { return to_d(data[row * row_stride + h * E + e]); }
};

std::vector<int> offsets(const std::vector<int>& lens) {
  std::vector<int> cu(lens.size() + 1, 0);
  for (size_t b = 0; b < lens.size(); ++b) cu[b + 1] = cu[b] + lens[b];
  return cu;
}

template <typename T, int E>
bool run_varlen_case(const VarlenCase& c, const char* dropout_mask_path = nullptr) {
  std::mt19937 rng(77 + E + c.Hq);
  const int B = int(c.lens_q.size()), Hq = c.Hq, Hk = c.Hk, G = Hq / Hk;
  const std::vector<int> cu_q = offsets(c.lens_q), cu_k = offsets(c.lens_k);
  const int64_t total_q = cu_q[B], total_k = cu_k[B];
  const int64_t max_q = *std::max_element(c.lens_q.begin(), c.lens_q.end());
  const int64_t max_k = *std::max_element(c.lens_k.begin(), c.lens_k.end());
  Packed<T> q(total_q, Hq, E, rng);
  const Packed<T> k(total_k, Hk, E, rng), v(total_k, Hk, E, rng), d_out(total_q, Hq, E, rng);
  Packed<T> v_used = v;
  if (dropout_mask_path) {  // one-hot values: out[i][j] != 0 is the keep bit of key j
    for (auto& x : q.data) x = from_d<T>(0.1 * to_d(x));  // nearly uniform probabilities: none underflows
    for (int b = 0; b < B; ++b)
      for (int64_t j = cu_k[b]; j < cu_k[b + 1]; ++j)
        for (int h = 0; h < Hk; ++h)
          for (int e = 0; e < E; ++e) v_used.data[j * v.row_stride + h * E + e] = from_d<T>(e == j - cu_k[b] ? 1.0 : 0.0);
  }
  std::vector<float> slopes(size_t(B) * Hq);
  for (size_t x = 0; x < slopes.size(); ++x) slopes[x] = 0.05f * float(x % 5 + 1);

  AttentionParams p;
  p.dtype = std::is_same_v<T, __half> ? fastattn::Dtype::Float16 : fastattn::Dtype::BFloat16;
  p.q = q.data.data(), p.k = k.data.data(), p.v = v_used.data.data();
  p.q_stride[1] = E, p.q_stride[2] = q.row_stride;
  p.k_stride[1] = E, p.k_stride[2] = k.row_stride;
  p.v_stride[1] = E, p.v_stride[2] = v.row_stride;
  p.out_stride[1] = E, p.out_stride[2] = int64_t(Hq) * E;  // [total_q, Hq, E] contiguous
  p.batch = B, p.q_heads = Hq, p.kv_heads = Hk, p.q_len = max_q, p.kv_len = max_k, p.head_dim = E, p.v_head_dim = E;
  p.cu_seqlens_q = cu_q.data(), p.cu_seqlens_k = cu_k.data(), p.total_q = total_q;
  p.scale = 1.0f / std::sqrt(float(E));
  p.softcap = c.o.softcap;
  p.window_left = c.o.window_left, p.window_right = c.o.window_right, p.bottom_right = c.o.bottom_right;
  if (c.o.alibi) p.alibi_slopes = slopes.data(), p.alibi_batch_stride = Hq;
  p.dropout_p = c.o.dropout;
  p.seed = 0x9E3779B97F4A7C15ull;

  std::vector<T> out = harness::poisoned<T>(size_t(total_q) * Hq * E);
  std::vector<float> lse(size_t(Hq) * total_q, NAN), op, lp;
  p.out = out.data(), p.lse = lse.data();
  if (const cudaError_t err = run_fwd<T, E>(p, 1, op, lp); err != cudaSuccess) {
    std::printf("%-70s FAIL  forward launch error %d\n", c.name, int(err));
    return false;
  }
  if (dropout_mask_path) {  // uint8 [Hq, total_q, max_k]: keep bits of the keys each row has
    std::vector<unsigned char> keep(size_t(Hq) * total_q * max_k, 0);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hq; ++h)
        for (int64_t i = cu_q[b]; i < cu_q[b + 1]; ++i)
          for (int64_t j = 0; j < c.lens_k[b]; ++j)
            keep[(size_t(h) * total_q + i) * max_k + j] = to_d(out[(i * Hq + h) * E + j]) != 0.0;
    FILE* f = std::fopen(dropout_mask_path, "wb");
    if (!f) return false;
    std::fwrite(keep.data(), 1, keep.size(), f);
    std::fclose(f);
    std::printf("varlen dropout mask Hq%d total_q %lld max_k %lld written\n", Hq, (long long)total_q, (long long)max_k);
    return true;
  }

  // Backward from the reference forward, into contiguous dq [total_q, Hq, E], dk / dv [total_k, Hk, E].
  AttentionBwdParams bp;
  static_cast<AttentionParams&>(bp) = p;
  std::vector<T> ref_out(size_t(total_q) * Hq * E);
  std::vector<float> ref_lse(size_t(Hq) * total_q), delta(ref_lse.size(), NAN);
  std::vector<double> r_out(ref_out.size()), r_lse(ref_lse.size()), r_dq(ref_out.size(), 0.0);
  std::vector<double> r_dk(size_t(total_k) * Hk * E, 0.0), r_dv(r_dk.size(), 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / G;
      const int64_t q0 = cu_q[b], k0 = cu_k[b], Lq = c.lens_q[b], Sk = c.lens_k[b];
      SeqGrads g{std::vector<double>(Lq * E, 0.0), std::vector<double>(Lq, 0.0), std::vector<double>(Lq * E, 0.0),
                 std::vector<double>(Sk * E, 0.0), std::vector<double>(Sk * E, 0.0)};
      const int64_t lse0 = int64_t(h) * total_q + q0;  // this row's dropout counter is (lse0 + i) * max_k + j
      reference_sequence(
          Lq, Sk, E, p.scale, c.o.alibi ? slopes[b * Hq + h] : 0.0, c.o,
          [&](int64_t i, int e) { return q.at(q0 + i, h, e); }, [&](int64_t j, int e) { return k.at(k0 + j, hk, e); },
          [&](int64_t j, int e) { return v.at(k0 + j, hk, e); }, [&](int64_t i, int e) { return d_out.at(q0 + i, h, e); },
          [&](int64_t i, int64_t j) {
            if (c.o.dropout <= 0.0f) return 1.0;
            const uint64_t n = uint64_t((lse0 + i) * max_k + j);
            return fastattn::philox_uniform(p.seed, n) >= c.o.dropout ? 1.0 / (1.0 - double(c.o.dropout)) : 0.0;
          },
          [](double x) { return to_d(from_d<T>(x)); }, g);
      for (int64_t i = 0; i < Lq; ++i) {
        r_lse[lse0 + i] = g.lse[i];
        ref_lse[lse0 + i] = float(g.lse[i]);
        for (int e = 0; e < E; ++e) {
          const size_t x = ((q0 + i) * Hq + h) * E + e;
          r_out[x] = g.out[i * E + e], r_dq[x] = g.dq[i * E + e];
          ref_out[x] = from_d<T>(g.out[i * E + e]);
        }
      }
      for (int64_t j = 0; j < Sk; ++j)
        for (int e = 0; e < E; ++e) {
          r_dk[((k0 + j) * Hk + hk) * E + e] += g.dk[j * E + e];
          r_dv[((k0 + j) * Hk + hk) * E + e] += g.dv[j * E + e];
        }
    }
  const double tol = std::is_same_v<T, __half> ? 5e-3 : 3e-2;
  Err e_out, e_lse;
  bool empty_ok = true;
  for (size_t x = 0; x < out.size(); ++x) e_out.add(r_out[x], to_d(out[x]));
  for (size_t x = 0; x < lse.size(); ++x) {
    if (std::isinf(r_lse[x])) empty_ok &= std::isinf(lse[x]) && lse[x] < 0;
    else e_lse.add(r_lse[x], lse[x]);
  }
  bool ok = e_out.rel() <= tol && e_lse.max_abs <= 1e-4 * std::max(1.0, e_lse.max_ref) && empty_ok;
  std::printf("%-70s %s  out %.1e lse %.1e%s", c.name, ok ? "OK  " : "FAIL", e_out.rel(), e_lse.max_abs,
              empty_ok ? "" : " (row without keys: lse not -inf)");

  std::vector<T> dq = harness::poisoned<T>(ref_out.size()), dk = harness::poisoned<T>(r_dk.size()), dv = dk;
  bp.out = ref_out.data(), bp.lse = ref_lse.data();
  bp.out_stride[1] = E, bp.out_stride[2] = int64_t(Hq) * E;
  bp.grad_out = d_out.data.data(), bp.grad_out_stride[1] = E, bp.grad_out_stride[2] = d_out.row_stride;
  bp.dq = dq.data(), bp.dk = dk.data(), bp.dv = dv.data(), bp.delta = delta.data();
  bp.dq_stride[1] = E, bp.dq_stride[2] = int64_t(Hq) * E;
  bp.dk_stride[1] = bp.dv_stride[1] = E, bp.dk_stride[2] = bp.dv_stride[2] = int64_t(Hk) * E;
  if (const cudaError_t err = launch<T, E>(bp); err != cudaSuccess) {
    std::printf("  FAIL backward launch error %d\n", int(err));
    return false;
  }
  Err e_dq, e_dk, e_dv;
  for (size_t x = 0; x < dq.size(); ++x) e_dq.add(r_dq[x], to_d(dq[x]));
  for (size_t x = 0; x < dk.size(); ++x) e_dk.add(r_dk[x], to_d(dk[x])), e_dv.add(r_dv[x], to_d(dv[x]));
  const bool bwd_ok = e_dq.rel() <= tol && e_dk.rel() <= tol && e_dv.rel() <= tol;
  std::printf(" | bwd %s dq %.1e dk %.1e dv %.1e (tol %.0e)\n", bwd_ok ? "OK  " : "FAIL", e_dq.rel(), e_dk.rel(),
              e_dv.rel(), tol);
  return ok && bwd_ok;
}

enum class Cache { kContiguous, kPaged, kPagedVllm };

struct KvCacheCase {
  const char* name;
  int Hq, Hk;
  int64_t Lq, L_new;
  std::vector<int> cache_seqlens;
  Cache cache;
  int64_t capacity;  // S_max, or max_blocks * block_size
  int block_size = 0;
  SeqOptions o;
  int subset_splits = 1;
  // Wrong index values the op layer would have rejected (check_values=False): {b, column,
  // id} sets block_table[b, column] (paged) or cache_batch_idx[b] (contiguous) to a block id
  // outside the cache. Nothing may be read or written there; a query that sees one of the
  // block's positions gets a NaN row and lse (attention_params.h), the others are exact.
  std::vector<std::array<int, 3>> bad_ids = {};
};

// Appends and attends as the glue does, then checks the cache (the new rows at their slots,
// every other element untouched) and out / lse against float64 attention over each
// sequence's logical keys (the old cache prefix, then k_new).
template <typename T, int E>
bool run_kv_cache_case(const KvCacheCase& c) {
  std::mt19937 rng(99 + E + int(c.Lq));
  const int B = int(c.cache_seqlens.size()), Hq = c.Hq, Hk = c.Hk, G = Hq / Hk;
  const bool paged = c.cache != Cache::kContiguous;
  const int bs = paged ? c.block_size : 1;
  const int64_t max_blocks = paged ? c.capacity / bs : 0;
  // Paged: shuffled blocks, two spare ones no sequence uses. Contiguous: cache rows reversed
  // through cache_batch_idx, one spare row.
  const int64_t cache_blocks = paged ? B * max_blocks + 2 : B + 1;
  std::vector<int> block_table(size_t(B) * max_blocks), batch_idx(B);
  for (size_t x = 0; x < block_table.size(); ++x) block_table[x] = int(x) + 2;
  std::shuffle(block_table.begin(), block_table.end(), rng);
  for (int b = 0; b < B; ++b) batch_idx[b] = B - b;
  for (const auto& [b, column, id] : c.bad_ids) (paged ? block_table[b * max_blocks + column] : batch_idx[b]) = id;
  auto missing = [&](int b, int64_t pos) {  // position pos of sequence b is in a block outside the cache
    const int id = paged ? block_table[b * max_blocks + pos / bs] : batch_idx[b];
    return id < 0 || id >= cache_blocks;
  };
  const int64_t rows_per_block = paged ? bs : c.capacity;
  int64_t sb, sh, sr;  // cache strides: [blocks, Hk, rows, E] or vLLM's [blocks, rows, Hk, E]
  if (c.cache == Cache::kPagedVllm) sb = rows_per_block * Hk * E, sh = E, sr = int64_t(Hk) * E;
  else sb = Hk * rows_per_block * E, sh = rows_per_block * E, sr = E;
  const std::vector<T> k0 = harness::randn<T>(size_t(cache_blocks) * sb, rng), v0 = harness::randn<T>(k0.size(), rng);
  std::vector<T> k_cache = k0, v_cache = v0;
  const std::vector<T> q = harness::randn<T>(size_t(B) * Hq * c.Lq * E, rng);
  const std::vector<T> k_new = harness::randn<T>(size_t(B) * Hk * c.L_new * E, rng), v_new = harness::randn<T>(k_new.size(), rng);
  std::vector<float> slopes(size_t(B) * Hq);
  for (size_t x = 0; x < slopes.size(); ++x) slopes[x] = 0.04f * float(x % 3 + 1);
  // Where position pos of sequence b lives in the cache (element offset of (hk, e) = 0).
  auto slot = [&](int b, int64_t pos) {
    return paged ? int64_t(block_table[b * max_blocks + pos / bs]) * sb + (pos % bs) * sr
                 : int64_t(batch_idx[b]) * sb + pos * sr;
  };

  AttentionParams p;
  p.dtype = std::is_same_v<T, __half> ? fastattn::Dtype::Float16 : fastattn::Dtype::BFloat16;
  p.q = q.data(), p.k = k_cache.data(), p.v = v_cache.data();
  p.q_stride[0] = Hq * c.Lq * E, p.q_stride[1] = c.Lq * E, p.q_stride[2] = E;
  p.k_stride[0] = p.v_stride[0] = sb, p.k_stride[1] = p.v_stride[1] = sh, p.k_stride[2] = p.v_stride[2] = sr;
  p.out_stride[0] = p.q_stride[0], p.out_stride[1] = p.q_stride[1], p.out_stride[2] = E;
  p.batch = B, p.q_heads = Hq, p.kv_heads = Hk, p.q_len = c.Lq, p.kv_len = c.capacity, p.head_dim = E, p.v_head_dim = E;
  p.scale = 1.0f / std::sqrt(float(E));
  p.softcap = c.o.softcap;
  p.window_left = c.o.window_left, p.window_right = c.o.window_right, p.bottom_right = c.o.bottom_right;
  if (c.o.alibi) p.alibi_slopes = slopes.data(), p.alibi_batch_stride = Hq;
  p.cache_seqlens = c.cache_seqlens.data(), p.kv_new_len = c.L_new, p.cache_blocks = cache_blocks;
  if (paged) p.block_table = block_table.data(), p.block_table_stride = max_blocks, p.block_size = bs;
  else p.cache_batch_idx = batch_idx.data();
  p.k_new = k_new.data(), p.v_new = v_new.data();
  p.k_new_stride[0] = p.v_new_stride[0] = Hk * c.L_new * E;
  p.k_new_stride[1] = p.v_new_stride[1] = c.L_new * E, p.k_new_stride[2] = p.v_new_stride[2] = E;

  if (const cudaError_t err = fastattn::run_kv_cache_append(p, nullptr); err != cudaSuccess) {
    std::printf("%-70s FAIL  append launch error %d\n", c.name, int(err));
    return false;
  }
  std::vector<T> out = harness::poisoned<T>(q.size());
  std::vector<float> lse(size_t(B) * Hq * c.Lq, NAN), op, lp;
  p.out = out.data(), p.lse = lse.data();
  if (const cudaError_t err = run_fwd<T, E>(p, c.subset_splits, op, lp); err != cudaSuccess) {
    std::printf("%-70s FAIL  forward launch error %d\n", c.name, int(err));
    return false;
  }

  std::vector<T> k_expect = k0, v_expect = v0;
  for (int b = 0; b < B; ++b)
    for (int hk = 0; hk < Hk; ++hk)
      for (int64_t t = 0; t < c.L_new; ++t)
        for (int e = 0; e < E; ++e) {
          const size_t from = ((size_t(b) * Hk + hk) * c.L_new + t) * E + e;
          if (missing(b, c.cache_seqlens[b] + t)) continue;  // skipped by the append
          const size_t to = size_t(slot(b, c.cache_seqlens[b] + t) + hk * sh + e);
          k_expect[to] = k_new[from], v_expect[to] = v_new[from];
        }
  const bool cache_ok = std::memcmp(k_expect.data(), k_cache.data(), k_cache.size() * sizeof(T)) == 0 &&
                        std::memcmp(v_expect.data(), v_cache.data(), v_cache.size() * sizeof(T)) == 0;

  Err e_out, e_lse;
  bool nan_rows_ok = true;
  int nan_rows = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / G;
      const int64_t old = c.cache_seqlens[b], Sk = old + c.L_new;
      // A missing block's keys are NaN and its values 0 (what the kernel reads instead).
      auto key = [&](const std::vector<T>& cache0, const std::vector<T>& fresh, double if_missing) {
        return [&, old, if_missing, from_cache = &cache0, from_new = &fresh](int64_t j, int e) {
          if (missing(b, j)) return if_missing;
          return j < old ? to_d((*from_cache)[size_t(slot(b, j) + hk * sh + e)])
                         : to_d((*from_new)[((size_t(b) * Hk + hk) * c.L_new + (j - old)) * E + e]);
        };
      };
      SeqGrads g{std::vector<double>(c.Lq * E, 0.0), std::vector<double>(c.Lq, 0.0), std::vector<double>(c.Lq * E, 0.0),
                 std::vector<double>(Sk * E, 0.0), std::vector<double>(Sk * E, 0.0)};
      const size_t q0 = (size_t(b) * Hq + h) * c.Lq;
      reference_sequence(
          c.Lq, Sk, E, p.scale, c.o.alibi ? slopes[b * Hq + h] : 0.0, c.o,
          [&](int64_t i, int e) { return to_d(q[(q0 + i) * E + e]); }, key(k0, k_new, NAN), key(v0, v_new, 0.0),
          [](int64_t, int) { return 0.0; }, [](int64_t, int64_t) { return 1.0; }, [](double x) { return x; }, g);
      for (int64_t i = 0; i < c.Lq; ++i) {
        bool sees_missing = false;
        for (int64_t j = 0, d0 = -i - (c.o.bottom_right ? Sk - c.Lq : 0); j < Sk; ++j) {
          const bool hidden = (c.o.window_left >= 0 && j + d0 < -c.o.window_left) ||
                              (c.o.window_right >= 0 && j + d0 > c.o.window_right);
          sees_missing |= !hidden && missing(b, j);
        }
        for (int e = 0; e < E; ++e) {
          const double got = to_d(out[(q0 + i) * E + e]);
          if (sees_missing) nan_rows_ok &= std::isnan(got);
          else e_out.add(g.out[i * E + e], got);
        }
        if (sees_missing) nan_rows_ok &= std::isnan(lse[q0 + i]), ++nan_rows;
        else e_lse.add(g.lse[i], lse[q0 + i]);
      }
    }
  const double tol = std::is_same_v<T, __half> ? 5e-3 : 3e-2;
  const bool ok = cache_ok && nan_rows_ok && e_out.rel() <= tol &&
                  e_lse.max_abs <= 1e-4 * std::max(1.0, e_lse.max_ref);
  std::printf("%-70s %s  splits %3d  cache %s out %.1e lse %.1e (tol %.0e)", c.name, ok ? "OK  " : "FAIL",
              p.num_splits, cache_ok ? "ok" : "WRONG", e_out.rel(), e_lse.max_abs, tol);
  if (!c.bad_ids.empty()) std::printf("  NaN rows %d %s", nan_rows, nan_rows_ok ? "ok" : "WRONG");
  std::printf("\n");
  return ok;
}

// f16 E64: a config both the full and the subset build compile, and the emulator's cheapest
// that the mutation check also runs.
const std::vector<VarlenCase>& varlen_cases() {
  static const std::vector<VarlenCase> all = {
      {"varlen E64 f16 GQA 2:1 lens q (0,1,7,70) k (3,1,7,130) causal top-left", 2, 1, {0, 1, 7, 70}, {3, 1, 7, 130},
       {false, -1, 0}},
      {"varlen E64 f16 lens q (5,1,0,16) k (9,0,4,40) causal bottom-right softcap alibi dropout 0.2", 2, 2,
       {5, 1, 0, 16}, {9, 0, 4, 40}, {true, -1, 0, 15.0f, true, 0.2f}},
      {"varlen E64 f16 GQA 2:1 lens q (33,2) k (20,66) bottom-right window(8,2)", 2, 1, {33, 2}, {20, 66},
       {true, 8, 2}},
  };
  return all;
}

const std::vector<KvCacheCase>& kv_cache_cases() {
  static const std::vector<KvCacheCase> all = {
      {"kvcache f16 E64 paged bs 5 shuffled, GQA 2:1 Lq1 L_new 1, lens (0,37,130)", 2, 1, 1, 1, {0, 37, 130},
       Cache::kPaged, 135, 5, {}, 4},
      {"kvcache f16 E64 paged vLLM [blocks,bs,Hk,E].transpose bs 16 Lq3 L_new 3 causal bottom-right", 2, 2, 3, 3,
       {45, 70}, Cache::kPagedVllm, 80, 16, {true, -1, 0, 0.0f, true}, 3},
      {"kvcache f16 E64 contiguous cache_batch_idx, Lq2 L_new 0 softcap window(50,-1)", 1, 1, 2, 0, {7, 150},
       Cache::kContiguous, 160, 0, {true, 50, -1, 20.0f}, 2},
      {"kvcache f16 E64 paged bs 8 block ids past the end / negative, window(14,0) L_new 2", 2, 1, 4, 2, {30, 21},
       Cache::kPaged, 40, 8, {true, 14, 0}, 2, {{0, 1, 12}, {1, 2, -1}}},
      {"kvcache f16 E64 contiguous cache_batch_idx past the end, L_new 1", 2, 2, 2, 1, {7, 40},
       Cache::kContiguous, 48, 0, {}, 1, {{1, 0, 1000}}},
  };
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  cudasim::register_dynamic_smem(fastattn::attn::smem, sizeof(fastattn::attn::smem));
  if (const char* path = harness::option(argc, argv, "dropout-mask")) {
    // The shapes the Python test expects: the main kernel, then the split-KV decode path.
    FILE* f = std::fopen(path, "wb");
#ifdef CUDASIM_CONFIG_SUBSET
    const bool ok = false;
#else
    const bool ok = f && dump_dropout_mask<__half, 64>(f, 2, 3, 33, 50, 0.3f) &&
                    dump_dropout_mask<__nv_bfloat16, 256>(f, 1, 2, 3, 200, 0.5f);
#endif
    if (f) std::fclose(f);
    return ok ? 0 : 1;
  }
  if (const char* path = harness::option(argc, argv, "varlen-dropout-mask")) {
    // Keys <= E (one-hot values): packed sequences of (q, k) lengths (3, 20), (0, 5), (9, 33).
    const VarlenCase c{"varlen dropout mask", 3, 3, {3, 0, 9}, {20, 5, 33}, {false, -1, -1, 0.0f, false, 0.3f}};
    return run_varlen_case<__half, 64>(c, path) ? 0 : 1;
  }
  const harness::Selection sel(argc, argv);
  int failed = 0, ran = 0;
  for (const Entry& entry : cases()) {
    if (!sel.wants(entry.c.name)) continue;
    bool compiled = false;
    const bool ok = entry.bf16 ? dispatch_head_dim<__nv_bfloat16>(entry.c, compiled) : dispatch_head_dim<__half>(entry.c, compiled);
    ran += compiled;
    failed += !ok;
  }
  for (const VarlenCase& c : varlen_cases()) {
    if (!sel.wants(c.name)) continue;
    ++ran;
    failed += !run_varlen_case<__half, 64>(c);
  }
  for (const KvCacheCase& c : kv_cache_cases()) {
    if (!sel.wants(c.name)) continue;
    ++ran;
    failed += !run_kv_cache_case<__half, 64>(c);
  }
  return harness::finish(failed, ran);
}
