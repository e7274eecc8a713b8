// The LSTM kernels' gate activations, sigmoid and tanh, on vectors of float and double, in the
// per-ISA kernel builds (`*.isa.cpp`, see cpu_isa.h): the plain LSTM (lstm_cpu.isa.cpp) and the
// LayerNorm-LSTM (lstm_layer_norm_cpu.isa.cpp) share them, so both round as torch's own within an
// ulp or two. They sit in the step's critical epilogue, hence the float forms built from
// exp_nonpositive (cpu_exp.h) and a reciprocal estimate rather than at::vec's Sleef tanh (2.3x
// the time of the cell's pointwise forward, B64 H1024, Xeon with AMX) or a division.
// Included inside no namespace; it opens fastattn::FASTATTN_ISA_NAMESPACE itself.
#pragma once

#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "fastattn/cpu_exp.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {
namespace activations {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// 1 / q from the hardware's reciprocal estimate and Newton steps: one from AVX-512's 14 bits
// (within about 1 ulp), two from AVX's 12, whose error after one step (up to 1.3e-7 relative)
// made the avx2 build's sigmoid(40) 1 - 1.3e-7 instead of 1. A cell's five divisions, on the
// divider's one port, bounded the epilogue of the bf16 recurrence on AMX.
C10_ALWAYS_INLINE Vec<float> reciprocal(const Vec<float>& q) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const Vec<float> one(1.f);
#if defined(CPU_CAPABILITY_AVX512)
  const Vec<float> r(_mm512_rcp14_ps(q));
#else
  const Vec<float> r0(_mm256_rcp_ps(q));
  const Vec<float> r = at::vec::fmadd(r0, at::vec::fnmadd(q, r0, one), r0);
#endif
  return at::vec::fmadd(r, at::vec::fnmadd(q, r, one), r);
#else
  return Vec<float>(1.f) / q;
#endif
}

// The float tanh in two forms that keep its rounding close to torch's (Sleef's, within an ulp;
// oneDNN's, in nn.LSTM, alike): an odd polynomial x + x^3 P(x^2) for |x| < 1 (a degree-6 P, a
// relative minimax fit within 5e-9 there) and 1 - 2e / (1 + e), e = exp(-2|x|), above, where the
// last step is one fused multiply-add onto 1, so a saturated tanh comes out rounded as the exact
// one would and the backward's 1 - g^2 carries no more error than torch's. The exp-free [13/6]
// rational form this replaced was off by up to 2.7e-7 relative (4.5x torch.tanh), most of it
// near 1, which put 6.6x torch's error into that gradient at 1.5 < |g| < 5. Every lane takes both
// forms: about 30 instructions against the rational's 17, the cell's pointwise forward 1.3x the
// time (B64 H1024, 1 thread, Xeon with AMX).
C10_ALWAYS_INLINE Vec<float> tanh(const Vec<float>& x) {
  const Vec<float> sign_bit(-0.f);
  const Vec<float> ax = x.abs();  // NaN kept
  // Large: |x| at most 10 (tanh rounds to 1 from 9.011 on: 10 still gives 1) keeps e normal;
  // NaN passes the clamp.
  const Vec<float> e = vec_exp(at::vec::clamp_max(ax, Vec<float>(10.f)) * Vec<float>(-2.f));
  const Vec<float> half(0.5f);  // 2 / (1 + e) as 1 / (e / 2 + 1 / 2), the same bits
  const Vec<float> large =
      at::vec::fnmadd(e, reciprocal(at::vec::fmadd(e, half, half)), Vec<float>(1.f));
  // Small: x + x (x^2 P(x^2)); x^2 P is subnormal only below |x| = 1e-19, where x^3 would be
  // below 1e-13 (a subnormal costs Intel CPUs a microcode assist, see cpu_exp.h).
  const Vec<float> x2 = x * x;
  Vec<float> p(-3.584515944e-04f);
  for (float c : {2.301363274e-03f, -7.946104743e-03f, 2.148665674e-02f, -5.387980118e-02f,
                  1.333234459e-01f, -3.333329558e-01f})
    p = at::vec::fmadd(x2, p, Vec<float>(c));
  const Vec<float> small = at::vec::fmadd(x, x2 * p, x);
  // x's sign onto both: large is |tanh|, and small is +0 for x = -0.
  return Vec<float>::blendv(large, small, ax < Vec<float>(1.f)) | (x & sign_bit);
}
// sigmoid(x) = s = 1 / (1 + e) for x >= 0 and e * s for x < 0, with e = exp(-|x|) in (0, 1]: a
// few ulp of relative error everywhere, as torch's own. The exp-free (1 + tanh(x / 2)) / 2 that
// it replaces left an absolute error of half an ulp of 1 (3e-8), a relative one of 3e-4 at
// x = -10 and of 100% below -16, where it gave 0 (a saturated input or forget gate, and the
// h = o * tanh(c) of a closed output gate, far from torch's there); with exp_nonpositive it
// costs about as many instructions. Below -87.3 (its least normal result) the AVX builds give 0,
// as flush-to-zero would.
C10_ALWAYS_INLINE Vec<float> sigmoid(const Vec<float>& x) {
  const Vec<float> e = vec_exp(x | Vec<float>(-0.f));  // -|x| by its sign bit
  const Vec<float> s = reciprocal(Vec<float>(1.f) + e);
  return Vec<float>::blendv(s, e * s, x < Vec<float>(0.f));  // NaN: vec_exp keeps it
}
inline Vec<double> sigmoid(const Vec<double>& x) {
  const Vec<double> one(1.0);
  return one / (one + x.neg().exp());
}
// at::vec's (Sleef's, within an ulp): 2 / (1 + exp(-2x)) - 1 lost the relative accuracy of small
// results, 1e-16 / |x|.
inline Vec<double> tanh(const Vec<double>& x) { return x.tanh(); }

}  // namespace activations
using activations::sigmoid;
using activations::tanh;

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
