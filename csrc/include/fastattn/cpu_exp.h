// exp(x) for x <= 0 in the per-ISA kernel builds (`*.isa.cpp`, see cpu_isa.h): the attention
// softmax's shifted scores and the LSTM's sigmoid (of -|x|).
// Included inside no namespace; it opens fastattn::FASTATTN_ISA_NAMESPACE itself, so each ISA
// build gets its own copy.
#pragma once

#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cmath>
#include <type_traits>

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// exp(x) = 2^n p(r), n = round(x log2(e)), r = x - n ln(2) in [-ln(2)/2, ln(2)/2], p a degree-5
// polynomial (the coefficients and the accuracy of at::vec's exp_u20), with 2^n applied by
// vscalefps (AVX-512) or assembled in the exponent field, (n + 127) << 23 (AVX2): 8 instructions
// and a compare on AVX-512, 14 on AVX2, against exp_u20's ~18-19, whose integer exponent
// assembly (conversions, shift, blend) costs as much as its polynomial. The softmax's exp took
// ~10% of the bf16 and fp32 forward and backward on Zen 4; on the avx2 build, exp_u20 instead
// made the forward at B1 H8 L = S = 512 E64 float32 7.70 ms against 6.58 (1 thread, Xeon with
// AMX). Callers pass x <= 0 up to rounding (the softmax's exponents are scale * s - shift with the
// shift at least the largest scaled score, the row's max or its LSE), -inf (a masked score) or
// NaN: no clamp above, where exp(88.8) would overflow (vscalefps gives inf up to +inf itself,
// which would give NaN; the exponent field would wrap). Lanes below -87.3 give 0: -inf would meet
// inf - inf in r, n + 127 leaves the exponent field below n = -126, and exp(-87.3) is the least
// normal float that the polynomial reaches. A subnormal result (or one that rounds to 0 from
// below the least normal) costs Intel CPUs a microcode assist per instruction: masked scores,
// which the softmax meets in every diagonal tile, made the bf16 forward at L = S = 128 causal
// 1.5x slower than without the mask (Xeon with AMX, 2 threads). Results that would be subnormal
// (below 1.2e-38) become 0, as under flush-to-zero. NaN stays NaN (the compare keeps its lane,
// the polynomial carries it; exp_u20 clamps NaN to its largest input, exp(88.4)).
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec n = (x * Vec(1.44269504f)).round();  // to nearest
  const Vec r = at::vec::fnmadd(n, Vec(0.693147182f), x);
  Vec poly = at::vec::fmadd(r, Vec(0.00828929059f), Vec(0.0418978221f));
  for (float c : {0.166676521f, 0.499991506f, 0.999999701f, 1.f}) {
    poly = at::vec::fmadd(r, poly, Vec(c));
  }
#ifdef CPU_CAPABILITY_AVX512
  const __mmask16 normal =  // x >= -87.3, or NaN
      _mm512_cmp_ps_mask(__m512(x), _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(normal, poly, n);
#else
  const __m256 normal =  // x >= -87.3, or NaN: all ones
      _mm256_cmp_ps(__m256(x), _mm256_set1_ps(-87.3f), _CMP_NLT_UQ);
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(poly, _mm256_castsi256_ps(two_n)), normal);
#endif
}
#endif

// exp_nonpositive where the build has it (AVX-512, AVX2), std::exp per lane elsewhere (at::vec's
// default exp_u20, and double): NaN stays NaN in every build.
template <typename T>
at::vec::Vectorized<T> vec_exp(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    return exp_nonpositive(x);
#else
    return x.exp_u20();
#endif
  } else {
    return x.map([](T v) { return std::exp(v); });
  }
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
