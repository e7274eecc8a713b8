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

#ifdef CPU_CAPABILITY_AVX512
// exp(x) = 2^n p(r), n = round(x log2(e)), r = x - n ln(2) in [-ln(2)/2, ln(2)/2], p a degree-5
// polynomial (the coefficients and the accuracy of at::vec's exp_u20), with vscalefps applying
// 2^n: 8 instructions and a compare against exp_u20's ~19, whose integer exponent assembly
// (conversions, shift, blend) costs as much as its polynomial. The softmax's exp took ~10% of
// the bf16 and fp32 forward and backward on Zen 4. Callers pass x <= 0 up to rounding (the
// softmax's exponents are scale * s - shift with the shift at least the largest scaled score,
// the row's max or its LSE), -inf (a masked score) or NaN: no clamp above, where exp(88.8) would
// overflow (vscalefps gives inf up to +inf itself, which would give NaN). Lanes below -87.3
// give 0: -inf would meet inf - inf in r, and exp(-87.3) is the least normal float that the
// polynomial reaches. A subnormal result (or one that rounds to 0 from below the least normal)
// costs Intel CPUs a microcode assist per instruction: masked scores, which the softmax meets in
// every diagonal tile, made the bf16 forward at L = S = 128 causal 1.5x slower than without the
// mask (Xeon with AMX, 2 threads). Results that would be subnormal (below 1.2e-38) become 0, as
// under flush-to-zero. NaN stays NaN (the compare keeps its lane, the polynomial carries it).
inline at::vec::Vectorized<float> exp_avx512(const at::vec::Vectorized<float>& x) {
  const __mmask16 normal =  // x >= -87.3, or NaN
      _mm512_cmp_ps_mask(__m512(x), _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(__m512(x), _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182f), __m512(x));
  __m512 poly = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
  poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.166676521f));
  poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.499991506f));
  poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.999999701f));
  poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(normal, poly, n);
}
#elif defined(CPU_CAPABILITY_AVX2)
// The same on AVX2, which has no vscalefps: 2^n assembled in the exponent field ((n + 127) << 23,
// a normal float for the n >= -126 of x >= -87.3, where the result stays normal too), lanes below
// -87.3 cleared. 14 instructions against exp_u20's ~18, and NaN stays NaN (exp_u20 clamps NaN
// to its largest input, exp(88.4)): the LSTM's sigmoid took 3% more of an avx2 inference step
// with exp_u20 than with the exp-free form it replaced (T64 B64 H256, 1 thread, this build on
// the Xeon with AMX).
inline at::vec::Vectorized<float> exp_avx2(const at::vec::Vectorized<float>& x) {
  const __m256 normal =  // x >= -87.3, or NaN: all ones
      _mm256_cmp_ps(__m256(x), _mm256_set1_ps(-87.3f), _CMP_NLT_UQ);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(__m256(x), _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147182f), __m256(x));
  __m256 poly = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00828929059f), _mm256_set1_ps(0.0418978221f));
  poly = _mm256_fmadd_ps(r, poly, _mm256_set1_ps(0.166676521f));
  poly = _mm256_fmadd_ps(r, poly, _mm256_set1_ps(0.499991506f));
  poly = _mm256_fmadd_ps(r, poly, _mm256_set1_ps(0.999999701f));
  poly = _mm256_fmadd_ps(r, poly, _mm256_set1_ps(1.f));
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(poly, _mm256_castsi256_ps(two_n)), normal);
}
#endif

// exp_avx512 or exp_avx2 where the build has one, std::exp per lane elsewhere (at::vec's
// default exp_u20, and double): NaN stays NaN in every build.
template <typename T>
at::vec::Vectorized<T> vec_exp(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return exp_avx512(x);
#elif defined(CPU_CAPABILITY_AVX2)
    return exp_avx2(x);
#else
    return x.exp_u20();
#endif
  } else {
    return x.map([](T v) { return std::exp(v); });
  }
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
