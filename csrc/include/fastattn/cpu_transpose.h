// Register-blocked transposes for the per-ISA kernel builds (`*.isa.cpp`, see cpu_isa.h): the
// attention kernels' K^T and V^T tiles and the LSTM kernels' unit-major weights; and their
// row loads, which convert half and bf16 to fp32 (load_first_ps, and store_first back; load_n and
// store_n, the LSTM kernels' rows and the attention's single-row products).
// Included inside no namespace; it opens fastattn::FASTATTN_ISA_NAMESPACE itself, so each ISA
// build gets its own copy.
#pragma once

#include <ATen/cpu/vec/functional.h>  // convert_from_float
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {

// Whether transpose_block reads scalar_t (as fp32: float, or half and bf16 converted exactly).
template <typename scalar_t>
constexpr bool kTransposesFrom = std::is_same_v<scalar_t, float> ||
    std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// dst[c, r] = src[r, c] for r < rows, c < cols (both <= kTransposeBlock), in registers, as fp32.
// at::vec's transpose_mxn<float> does the same shuffles (FBGEMM's) on AVX-512 but zero-fills a
// 1 KB stack array (rep stos) and goes through it for every block: it took as long as the QK^T
// product of a short varlen sequence's tile (Zen 4); on AVX2 it is a scalar loop. Half and bf16
// rows are converted as they are loaded: their scalar loop (a conversion and a store per
// element) made the fp16 forward's packing half again as long as the fp32 one's.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTransposeBlock = 16;

// The first columns (mask) of a row as fp32 lanes, the others zero.
inline __m512 load_row_ps(const float* src, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, src);
}
inline __m512 load_row_ps(const c10::Half* src, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src));
}
inline __m512 load_row_ps(const c10::BFloat16* src, __mmask16 mask) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
// The first n <= 16 elements of a row as fp32 lanes, the others zero.
template <typename scalar_t>
inline __m512 load_first_ps(const scalar_t* src, int n) {
  return load_row_ps(src, static_cast<__mmask16>((1u << n) - 1));
}
// And back: the first n <= 16 lanes of v to a half or bf16 row, rounded to nearest even (as
// static_cast rounds; at::vec's convert_from_float takes two vectors, twice the work for one).
inline void store_first(const __m512& v, c10::Half* dst, int n) {
  _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << n) - 1), at::vec::cvtfp32_fp16(v));
}
inline void store_first(const __m512& v, c10::BFloat16* dst, int n) {
  _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << n) - 1), at::vec::cvtfp32_bf16(v));
}

template <typename scalar_t>
inline void transpose_block(const scalar_t* src, int64_t src_rs, float* dst, int64_t ld,
                            int rows, int cols) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    r[i] = i < rows ? load_row_ps(src + i * src_rs, col_mask) : _mm512_setzero_ps();
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // interleave 32-bit elements of row pairs
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // then 64-bit pairs
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // then 128-bit lanes
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i >= cols) break;
    const __m512 col = i < 8 ? _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88)
                             : _mm512_shuffle_f32x4(t[i - 8], t[i], 0xdd);
    _mm512_mask_storeu_ps(dst + i * ld, row_mask, col);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kTransposeBlock = 8;

// The first `cols` columns of a row as fp32 lanes, the others zero (col_mask: lanes < cols).
inline __m256 load_row_ps(const float* src, int cols, __m256i col_mask) {
  return cols == 8 ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, col_mask);
}
// 8 half or bf16 elements, those past cols zero (AVX2 has no masked 16-bit load).
template <typename scalar_t>
inline __m128i load_halves(const scalar_t* src, int cols) {
  if (cols == 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  alignas(16) uint16_t part[8] = {};
  std::memcpy(part, src, cols * sizeof(scalar_t));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(part));
}
inline __m256 load_row_ps(const c10::Half* src, int cols, __m256i) {
  return _mm256_cvtph_ps(load_halves(src, cols));
}
inline __m256 load_row_ps(const c10::BFloat16* src, int cols, __m256i) {
  const __m256i bits = _mm256_cvtepu16_epi32(load_halves(src, cols));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
// The first n <= 8 elements of a row as fp32 lanes, the others zero.
template <typename scalar_t>
inline __m256 load_first_ps(const scalar_t* src, int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return load_row_ps(src, n, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}
// And back (store_first on AVX-512 says how).
template <typename scalar_t>
inline void store_halves(const __m128i& bits, scalar_t* dst, int n) {
  if (n == 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), bits);
  alignas(16) uint16_t part[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(part), bits);
  std::memcpy(dst, part, n * sizeof(scalar_t));
}
inline void store_first(const __m256& v, c10::Half* dst, int n) {
  store_halves(at::vec::cvtfp32_fp16(v), dst, n);
}
inline void store_first(const __m256& v, c10::BFloat16* dst, int n) {
  store_halves(at::vec::cvtfp32_bf16(v), dst, n);
}

template <typename scalar_t>
inline void transpose_block(const scalar_t* src, int64_t src_rs, float* dst, int64_t ld,
                            int rows, int cols) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i col_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane);
  const __m256i row_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), lane);
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = i < rows ? load_row_ps(src + i * src_rs, cols, col_mask) : _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // interleave 32-bit elements of row pairs
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // then 64-bit pairs: column c of rows 4i..4i+3 (and c + 4)
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    if (i >= cols) break;
    const __m256 col = i < 4 ? _mm256_permute2f128_ps(r[i], r[i + 4], 0x20)
                             : _mm256_permute2f128_ps(r[i - 4], r[i], 0x31);
    if (rows == 8) {
      _mm256_storeu_ps(dst + i * ld, col);
    } else {
      _mm256_maskstore_ps(dst + i * ld, row_mask, col);  // microcoded on Zen: only at edges
    }
  }
}
#else
constexpr int kTransposeBlock = 0;  // no register transpose: the scalar loop
#endif

// dst[cols, ld] = transpose of src rows [rows, cols]; columns rows .. width zeroed (the
// products read no further).
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t src_rs, int64_t rows, int64_t cols,
                     acc_t* dst, int64_t ld, int64_t width) {
  for (int64_t c = 0; c < cols; ++c) {
    std::fill(dst + c * ld + rows, dst + c * ld + width, acc_t(0));
  }
  if constexpr (kTransposesFrom<scalar_t> && std::is_same_v<acc_t, float> &&
                kTransposeBlock > 0) {
    // A register-blocked transpose: the scalar loop below stores one element per column and
    // took as long as the tile's products.
    constexpr int64_t B = kTransposeBlock;
    for (int64_t r = 0; r < rows; r += B) {
      for (int64_t c = 0; c < cols; c += B) {
        transpose_block(src + r * src_rs + c, src_rs, dst + c * ld + r, ld,
                        static_cast<int>(std::min(B, rows - r)),
                        static_cast<int>(std::min(B, cols - c)));
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * src_rs;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = static_cast<acc_t>(s[c]);
  }
}

// n <= lanes consecutive elements of a row as acc_t lanes (the others zero), and back. Half and
// bf16 convert a vector at a time (load_first_ps and store_first; at::vec's convert_from_float
// in the default build): element by element, fp16 on AVX-512 is a vcvtph2ps each, and the LSTM's
// fp16 inference epilogue took 2.5x the fp32 one's time (T64 B24 H256). The LSTM kernels' rows and
// the attention's single-row products read them.
template <typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<acc_t> load_n(const scalar_t* p, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int L = Vec::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return n == L ? Vec::loadu(p) : Vec::loadu(p, n);
  } else if constexpr (kTransposesFrom<scalar_t> && std::is_same_v<acc_t, float> &&
                       kTransposeBlock > 0) {
    return Vec(load_first_ps(p, static_cast<int>(n)));
  } else {
    alignas(64) acc_t tmp[L] = {};
    for (int64_t l = 0; l < n; ++l) tmp[l] = static_cast<acc_t>(p[l]);
    return Vec::loadu(tmp);
  }
}
template <typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE void store_n(const at::vec::Vectorized<acc_t>& v, scalar_t* p, int64_t n) {
  constexpr int L = at::vec::Vectorized<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    n == L ? v.store(p) : v.store(p, n);
  } else if constexpr (kTransposesFrom<scalar_t> && std::is_same_v<acc_t, float> &&
                       kTransposeBlock > 0) {
    store_first(v, p, static_cast<int>(n));
  } else if constexpr (kTransposesFrom<scalar_t> && std::is_same_v<acc_t, float>) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
  } else {
    alignas(64) acc_t tmp[L];
    v.store(tmp);
    for (int64_t l = 0; l < n; ++l) p[l] = static_cast<scalar_t>(tmp[l]);
  }
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
