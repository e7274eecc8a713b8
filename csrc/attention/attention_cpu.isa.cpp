// FlashAttention-style attention forward and backward on the CPU, compiled once per x86 ISA.
//
// Tiles of kBlockM query rows meet tiles of kForwardBlockN (forward) or kBlockN (backward) keys,
// twice those on brgemm (Problem::block_m, block_n); the L x S score matrix never exists (a
// thread holds O((kBlockM + kForwardBlockN) * E) floats). Tile products use a register-blocked
// at::vec FMA micro-kernel (gemm below) on
// operands packed once per tile into float (double for float64) buffers whose widths are
// padded to whole register pairs; the avx512 build's bf16 forward and backward use AVX512-BF16
// dot products instead where the CPU has them, and both passes' products go to ATen's oneDNN
// brgemm where the CPU has AMX-BF16 (TileProducts; the backward's dK and dV transposed). The
// forward keeps an online softmax and writes the log-sum-exp; the backward recomputes the
// probabilities from it with the same packing and the same products (a few query rows' on the
// key rows in place, in both passes: Problem::rows_in_place), so its scores are the forward's
// bit for bit even for huge logits.
// The same kernels serve dense, varlen and (paged) KV-cache calls: only Problem::sequence and
// its row addressing know the layout (attention_params.h).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "fastattn/cpu_brgemm_bf16.h"
#include "fastattn/attention_params.h"
#include "fastattn/cpu_exp.h"
#include "fastattn/cpu_isa.h"
#include "fastattn/cpu_scratch.h"
#include "fastattn/cpu_transpose.h"
#include "fastattn/philox.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlockM = 64;  // query rows per tile
constexpr int64_t kBlockN = 64;  // keys per tile of the backward
// Keys per tile of the forward. On avx512, twice the backward's: that halves the per-row steps
// of the online softmax per key (the row max and sum reductions, the rescale of O) and made the
// forward 2-4% faster in fp32 and 6-8% in bf16 at L = S = 1024-4096 (Zen 4, one thread, thread
// CPU time). The avx2 build ran 1-4% slower with 128 keys than with 64 on the same CPU.
#ifdef CPU_CAPABILITY_AVX512
constexpr int64_t kForwardBlockN = 128;
#else
constexpr int64_t kForwardBlockN = 64;
#endif
constexpr int kGemmRows = 6;     // rows of the micro-kernel's register tile (x 2-4 vectors)

template <typename T>
constexpr int64_t pad_cols() {
  return 2 * Vectorized<T>::size();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// C[ROWS, COLS vectors] (ACCUMULATE ? += : =) A[ROWS, kdim] * B[kdim, COLS vectors]: the
// register tile of gemm_rows (same operands). The product is summed from zero and added to C
// once, as BLAS adds its C: a long reduction split over many calls (dV and dK over the query
// tiles, dQ and O over the key tiles) then rounds as blocks of kdim terms and one sum of the
// blocks. Chained through C (the accumulators loaded from it), the whole reduction was one
// sequence of roundings: fp32 dK and dV at L = 200-1000 had 2-4.6x the error of torch's
// against float64, and O at L = S = 1024 2.3x.
template <typename T, int ROWS, int COLS, bool A_ROW_MAJOR, bool ACCUMULATE>
C10_ALWAYS_INLINE void gemm_tile(int64_t kdim, const T* a, int64_t lda, const T* b,
                                 int64_t ldb, T* c, int64_t ldc) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc[ROWS][COLS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < COLS; ++v) acc[r][v] = Vec(T(0));
  }
  const T* bp = b;
  const T* ap = a;
  for (int64_t p = 0; p < kdim; ++p, bp += ldb, ap += A_ROW_MAJOR ? 1 : lda) {
    Vec bv[COLS];
#pragma GCC unroll 4
    for (int v = 0; v < COLS; ++v) bv[v] = Vec::loadu(bp + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const Vec ar(A_ROW_MAJOR ? ap[r * lda] : ap[r]);
#pragma GCC unroll 4
      for (int v = 0; v < COLS; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < COLS; ++v) {
      T* cv = c + r * ldc + v * W;
      (ACCUMULATE ? acc[r][v] + Vec::loadu(cv) : acc[r][v]).store(cv);
    }
  }
}

// C[ROWS, n] (ACCUMULATE ? += : =) A[ROWS, kdim] * B[kdim, n]. A is row-major (A_ROW_MAJOR)
// or column-major with leading dim lda, so a transposed operand costs nothing and the
// broadcast addresses advance by one constant step; B is row-major (leading dim ldb); n is a
// multiple of one vector (every buffer's width is padded to two). Register tiles of two
// vectors per row, and one for an odd last vector: the score columns of a causal tile's rows
// end at the diagonal, and rounding them up to two vectors computed 1.40x the visible scores
// of issue 16's short sequences where one vector computes 1.22x. float on AVX-512 takes four
// vectors per row first (6 x 4 accumulators of its 32 registers: each broadcast of A feeds
// twice the FMAs): fp32 fwd+bwd 1-7% faster at L = S = 512-1024 (Xeon with AMX, 2 threads), the
// forward within noise there and ~10% faster at 2048. Out of line: GCC inlined the
// forward's QK^T instance (its only caller) into the tile loop, where it ran the fp32 forward
// ~5% slower (Zen 4, one thread).
template <typename T, int ROWS, bool A_ROW_MAJOR, bool ACCUMULATE>
__attribute__((noinline)) void gemm_rows(int64_t n, int64_t kdim, const T* a, int64_t lda,
                                         const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t j = 0;
  if constexpr (W == 16 && std::is_same_v<T, float>) {
    for (; j + 4 * W <= n; j += 4 * W) {
      gemm_tile<T, ROWS, 4, A_ROW_MAJOR, ACCUMULATE>(kdim, a, lda, b + j, ldb, c + j, ldc);
    }
  }
  for (; j + 2 * W <= n; j += 2 * W) {
    gemm_tile<T, ROWS, 2, A_ROW_MAJOR, ACCUMULATE>(kdim, a, lda, b + j, ldb, c + j, ldc);
  }
  if (j < n) gemm_tile<T, ROWS, 1, A_ROW_MAJOR, ACCUMULATE>(kdim, a, lda, b + j, ldb, c + j, ldc);
}

// Calls fn(i, std::integral_constant<int, R>{}) on row blocks [i, i + R) that cover [0, m):
// blocks of ROWS rows, then one smaller block per remaining size, so that every micro-kernel
// call has a compile-time row count.
template <int ROWS, typename Fn>
void for_row_blocks(int64_t m, Fn&& fn) {
  int64_t i = 0;
  for (; i + ROWS <= m; i += ROWS) fn(i, std::integral_constant<int, ROWS>{});
  if constexpr (ROWS > 1) {
    if (i < m) for_row_blocks<ROWS - 1>(m - i, [&](int64_t r, auto rows) { fn(i + r, rows); });
  }
}

// On a tile that a causal (right) window cuts, row i of a product sees only the keys
// j < i + diag: its score columns (QK^T, dO V^T) or its reduction steps (PV, dS K) past those
// are never needed, as masked scores are overwritten with -inf and masked probabilities are 0.
// A product told `diag` skips them per block of rows, up to whole vectors of columns
// (most of the waste of the diagonal tiles: a 64 x 64 one computes twice its visible pairs).
// kAllVisible: no limit.
constexpr int64_t kAllVisible = std::numeric_limits<int64_t>::max() / 4;

// The columns (or reduction steps) of rows [i, i + rows) under the limit `diag`, rounded up to
// `step`, at most `n`.
inline int64_t visible_extent(int64_t i, int64_t rows, int64_t diag, int64_t n, int64_t step) {
  if (diag >= kAllVisible) return n;
  return std::min(n, round_up(std::max<int64_t>(i + rows - 1 + diag, 0), step));
}

// The first reduction step that rows [i, i + rows) need when row i needs only the steps
// p > i - from_diag (see kAllVisible; kAllVisible: all).
inline int64_t first_visible_step(int64_t i, int64_t from_diag) {
  if (from_diag >= kAllVisible) return 0;
  return std::max<int64_t>(i - from_diag + 1, 0);
}

template <typename T, bool A_ROW_MAJOR, bool ACCUMULATE>
void gemm_layout(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T* c, int64_t ldc, int64_t col_diag, int64_t k_diag,
                 int64_t k_from_diag) {
  const int64_t row_step = A_ROW_MAJOR ? lda : 1;
  const int64_t k_step = A_ROW_MAJOR ? 1 : lda;
  for_row_blocks<kGemmRows>(m, [&](int64_t i, auto rows) {
    constexpr int R = decltype(rows)::value;
    const int64_t n_rows = visible_extent(i, R, col_diag, n, Vectorized<T>::size());
    const int64_t k_end = visible_extent(i, R, k_diag, kdim, 1);
    const int64_t k_begin = first_visible_step(i, k_from_diag);
    if (n_rows == 0 || k_end <= k_begin) return;
    gemm_rows<T, R, A_ROW_MAJOR, ACCUMULATE>(n_rows, k_end - k_begin,
                                             a + i * row_step + k_begin * k_step, lda,
                                             b + k_begin * ldb, ldb, c + i * ldc, ldc);
  });
}

// C[m, n] (ACCUMULATE ? += : =) A[m, kdim] * B[kdim, n]; A is read through (row, col) strides,
// one of which is 1. Row i needs only columns j < i + col_diag and reduction steps
// i - k_from_diag < p < i + k_diag (see kAllVisible); the rest of C may be left as it was.
template <typename T, bool ACCUMULATE = true>
void gemm(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_rs, int64_t a_cs,
          const T* b, int64_t ldb, T* c, int64_t ldc, int64_t col_diag = kAllVisible,
          int64_t k_diag = kAllVisible, int64_t k_from_diag = kAllVisible) {
  if (a_cs == 1) {
    gemm_layout<T, true, ACCUMULATE>(m, n, kdim, a, a_rs, b, ldb, c, ldc, col_diag, k_diag,
                                     k_from_diag);
  } else {
    gemm_layout<T, false, ACCUMULATE>(m, n, kdim, a, a_cs, b, ldb, c, ldc, col_diag, k_diag,
                                      k_from_diag);
  }
}

// Below this many flops a call runs on the calling thread: waking the pool costs more. Measured
// on Zen 4 (2 threads, pool spinning between calls): at 1.3e5 flops (L = S = 8, H 8, E 64) the
// two threads already save 2 us of 12 in the forward and 13 of 31 in the backward; at 2e6
// (L = S = 32) 16 us of 39 in the forward. (It was 4e6 until then.)
constexpr double kParallelFlops = 1e5;
// The same for a forward that splits the keys of its query tiles over the threads and merges
// the parts by LSE (attention_fwd_typed, decode): the merge and its buffers cost a few us more.
// Measured the same way with one head (L = 1, E 128): at S = 512 (2.6e5 flops) 16.4 us split
// against 16.1 on one thread, at S = 1024 14.5 against 22.3. scripts/ab_decode.py measures it
// on a quiet machine.
constexpr double kSplitParallelFlops = 3e5;

// The largest of x[0..n) (n a multiple of the vector width), NaN when any element is NaN
// (at::vec::maximum propagates NaN). Inlined, so that the reductions of consecutive rows
// overlap (a call per row and key tile took ~9% of the bf16 forward at L = S = 1024 on the
// Xeon with AMX).
template <typename T>
C10_ALWAYS_INLINE T vec_reduce_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(-std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < n; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + j));
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// vmaxps: b where either operand is NaN.
C10_ALWAYS_INLINE Vectorized<float> plain_max(const Vectorized<float>& a,
                                              const Vectorized<float>& b) {
#ifdef CPU_CAPABILITY_AVX512
  return _mm512_max_ps(a, b);
#else
  return _mm256_max_ps(a, b);
#endif
}
// The largest lane of v, by vmaxps.
C10_ALWAYS_INLINE float plain_reduce_max(const Vectorized<float>& v) {
#ifdef CPU_CAPABILITY_AVX512
  return _mm512_reduce_max_ps(v);
#else
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
}
#endif

// A row's largest score for the softmax's shift: a NaN among the scores must make the row NaN.
// With exp_nonpositive (AVX-512, AVX2), which keeps NaN, plain vmaxps (which drops a NaN
// operand) serves: a NaN score's probability, so the row's sum and output, become NaN whatever
// the shift. Only a row whose scores are all NaN or -inf would lose it, its max -inf reading as
// "no key seen": it is scanned again keeping NaN. (at::vec::maximum costs 4 instructions a vector; the row maxima
// took ~10% of the bf16 forward at L = S = 1024, Xeon with AMX.)
template <typename T>
C10_ALWAYS_INLINE T scores_max(const T* x, int64_t n) {  // n a multiple of the vector width
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    using Vec = Vectorized<float>;
    constexpr int64_t W = Vec::size();
    Vec a(-std::numeric_limits<float>::infinity()), b = a;
    int64_t j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {  // two chains: vmaxps's latency, not its rate, bounds one
      a = plain_max(Vec::loadu(x + j), a);
      b = plain_max(Vec::loadu(x + j + W), b);
    }
    if (j < n) a = plain_max(Vec::loadu(x + j), a);
    const float m = plain_reduce_max(plain_max(a, b));
    return m == -std::numeric_limits<float>::infinity() ? vec_reduce_max(x, n) : m;
  }
#endif
  return vec_reduce_max(x, n);
}

// x[j] = exp(scale * x[j] - shift) for j < n (n a multiple of the vector width), with one
// rounding (a fused multiply-add; scale 1 gives x[j] - shift exactly); returns their sum as a
// vector of partial sums (the forward adds a row's up once, after its last key tile).
template <typename T>
Vectorized<T> vec_exp_sum(T* x, int64_t n, T scale, T shift) {
  using Vec = Vectorized<T>;
  const Vec sc(scale), sh(-shift);
  Vec acc(T(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const Vec e = vec_exp(at::vec::fmadd(Vec::loadu(x + j), sc, sh));
    e.store(x + j);
    acc = acc + e;
  }
  return acc;
}

template <typename T>
void vec_scale(T* x, int64_t n, T factor) {
  using Vec = Vectorized<T>;
  const Vec f(factor);
  for (int64_t j = 0; j < n; j += Vec::size()) (Vec::loadu(x + j) * f).store(x + j);
}

// The lines of the `bytes` bytes at row into the cache, for a row kAheadRows rows further on in
// a stream that the single-row products read once.
constexpr int64_t kAheadRows = 16;
template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_bytes(const scalar_t* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

// s[r * lds + j] = sum_e q[r * ldq + e] * k[j * k_rs + e] for r < R, e < E, j < n: R query
// rows' scores, reading the key rows in place (q zero-padded to whole vectors), each key vector
// loaded once for the R rows. Each (row, key)'s products stay a vector of partial sums; a group of
// one vector's worth of keys is transposed and added up at once, which costs a few instructions
// per key where a horizontal sum per key (a chain of 4 shuffles and adds on AVX-512) took most of
// a decode step's scoring time (Zen 4). A row's scores are the same bits for any R.
template <int R, typename acc_t, typename scalar_t>
void scores_in_place(const acc_t* q, int64_t ldq, const scalar_t* k, int64_t k_rs, int64_t n,
                     int64_t E, acc_t* s, int64_t lds) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  alignas(64) acc_t part[R][L * L] = {};
  alignas(64) acc_t by_lane[L * L];
  const int64_t nvec = ceil_div(E, L), tail = E - (nvec - 1) * L;
  // kKeys keys at a time, each its own chain of FMAs per row: one key's chain of E / L dependent
  // FMAs at a time left the FMA units waiting on its latency (bf16 decode 5-8% slower, Zen 5).
  // R x kKeys accumulators and kKeys key vectors fit AVX2's 16 registers.
  constexpr int64_t kKeys = R == 1 ? 4 : std::max(1, 8 / R);
  for (int64_t j0 = 0; j0 < n; j0 += L) {
    const int64_t keys = std::min(L, n - j0);
    // Keys j0 + j .. j0 + j + K - 1 into the rows j .. j + K - 1 of each row's part.
    const auto chains = [&](auto count, int64_t j) {
      constexpr int64_t K = decltype(count)::value;
      const scalar_t* row = k + (j0 + j) * k_rs;
      for (int64_t kk = 0; kk < K; ++kk)
        prefetch_bytes(row + (kk + kAheadRows) * k_rs, E * int64_t(sizeof(scalar_t)));
      Vec acc[R][K];
      for (int r = 0; r < R; ++r) {
        for (int64_t kk = 0; kk < K; ++kk) acc[r][kk] = Vec(acc_t(0));
      }
      for (int64_t c = 0; c < nvec; ++c) {
        const int64_t lanes = c + 1 < nvec ? L : tail;
        Vec kv[K];
        for (int64_t kk = 0; kk < K; ++kk) kv[kk] = load_n<acc_t>(row + kk * k_rs + c * L, lanes);
        for (int r = 0; r < R; ++r) {
          const Vec qv = Vec::loadu(q + r * ldq + c * L);
          for (int64_t kk = 0; kk < K; ++kk) acc[r][kk] = at::vec::fmadd(qv, kv[kk], acc[r][kk]);
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int64_t kk = 0; kk < K; ++kk) acc[r][kk].store(part[r] + (j + kk) * L);
      }
    };
    int64_t j = 0;
    for (; j + kKeys <= keys; j += kKeys) chains(std::integral_constant<int64_t, kKeys>{}, j);
    for (; j < keys; ++j) chains(std::integral_constant<int64_t, 1>{}, j);
    for (int r = 0; r < R; ++r) {
      at::vec::transpose_mxn<acc_t, L, L>(part[r], L, by_lane, L);
      Vec total = Vec::loadu(by_lane);
      for (int64_t l = 1; l < L; ++l) total = total + Vec::loadu(by_lane + l * L);
      total.store(s + r * lds + j0, keys);
    }
  }
}

// o[r * ldo + e] += sum_j p[r * ldp + j] * v[j * v_rs + e] for r < R, e < ev, j < n: R query
// rows' PV, reading the value rows in place, each value vector loaded once for the R rows. A
// block of up to 8 / R vectors of each row's o stays in registers across the keys (8
// accumulators, a broadcast and a load fit AVX2's 16): updating o in memory key by key chained
// every key's FMAs through a store and a reload, 3/4 of a decode step's time (Zen 4). o must
// have room for whole vectors past ev (its width is padded); the values' lanes past ev read as
// zero. A row skips the keys with p == 0 (masked, or underflowed), and a key that every row skips
// is not read, so that a masked key's value never reaches a row, as the multi-row path's zero
// probabilities make it contribute nothing. A row's output is the same bits for any R.
template <int R, typename acc_t, typename scalar_t>
void pv_in_place(const acc_t* p, int64_t ldp, const scalar_t* v, int64_t v_rs, int64_t n,
                 int64_t ev, acc_t* o, int64_t ldo) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  constexpr int kVectors = 8 / (R == 3 ? 4 : R);  // per row: 8, 4, 2, 2
  for_row_blocks<kVectors>(ceil_div(ev, L), [&](int64_t c0, auto block) {
    constexpr int B = decltype(block)::value;
    const int64_t e0 = c0 * L;
    int64_t lanes[B];
    Vec acc[R][B];
    for (int b = 0; b < B; ++b) lanes[b] = std::min<int64_t>(L, ev - e0 - b * L);
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < B; ++b) acc[r][b] = Vec::loadu(o + r * ldo + e0 + b * L);
    }
    for (int64_t j = 0; j < n; ++j) {
      bool seen = false;
      for (int r = 0; r < R; ++r) seen = seen || p[r * ldp + j] != acc_t(0);
      if (!seen) continue;
      const scalar_t* row = v + j * v_rs + e0;
      prefetch_bytes(row + kAheadRows * v_rs, B * L * int64_t(sizeof(scalar_t)));
      for (int r = 0; r < R; ++r) {
        if (p[r * ldp + j] == acc_t(0)) continue;
        const Vec pj(p[r * ldp + j]);
        for (int b = 0; b < B; ++b) {
          acc[r][b] = at::vec::fmadd(pj, load_n<acc_t>(row + b * L, lanes[b]), acc[r][b]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < B; ++b) acc[r][b].store(o + r * ldo + e0 + b * L);
    }
  });
}

// dst[rows, ld] = scale * src rows (row stride src_rs), columns >= cols zeroed (ld a multiple
// of two vectors). Half and bf16 rows convert a vector at a time: converted element by
// element (a vcvtph2ps per element), packing Q and V took a third of the fp16 forward's time at
// L = S = 128 (Xeon with AMX).
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* src, int64_t src_rs, int64_t rows, int64_t cols, acc_t scale,
               acc_t* dst, int64_t ld) {
  using Vec = Vectorized<acc_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * src_rs;
    acc_t* d = dst + r * ld;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int64_t c = 0; c < cols; ++c) d[c] = s[c] * scale;
    } else {
      constexpr int64_t L = Vectorized<scalar_t>::size();  // 2 vectors of acc_t
      for (int64_t c = 0; c < cols; c += L) {
        const int64_t count = std::min(L, cols - c);
        const auto x = count == L ? Vectorized<scalar_t>::loadu(s + c)
                                  : Vectorized<scalar_t>::loadu(s + c, count);
        const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(x);
        (lo * Vec(scale)).store(d + c);
        if (count > Vec::size()) (hi * Vec(scale)).store(d + c + Vec::size());
      }
    }
    std::fill(d + cols, d + ld, acc_t(0));
  }
}

// dst[e] = src[e] for e < n, rounded to scalar_t (as static_cast rounds: to nearest even), a
// vector at a time for half and bf16.
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t L = Vectorized<scalar_t>::size();  // 2 vectors of acc_t
    for (int64_t e = 0; e < n; e += L) {
      const int64_t count = std::min(L, n - e);
      const Vec lo = Vec::loadu(src + e, std::min<int64_t>(count, Vec::size()));
      const Vec hi = count > Vec::size() ? Vec::loadu(src + e + Vec::size(), count - Vec::size())
                                         : Vec(acc_t(0));
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + e, count);
    }
  }
}

// One sequence of a call (attention_params.h): batch row b of a dense or KV-cache call,
// sequence b of a varlen one.
struct Sequence {
  int64_t b;
  int64_t q_begin, q_len;   // its query rows of head (b, h): q_begin .. q_begin + q_len - 1
  int64_t k_begin, kv_len;  // its keys: rows k_begin .. of kv batch row kv_batch (not paged)
  int64_t kv_batch;
  int64_t offset;           // diagonal shift: kv_len - q_len for bottom-right, else 0
};

// The geometry shared by the passes, and where a sequence's rows are found.
struct Problem {
  const AttentionParams& p;
  int64_t group;    // query heads per kv head
  int64_t block_m;  // query rows per tile
  int64_t block_n;  // keys per tile (key_tile_width)
  int64_t e_pad, ev_pad, n_pad;
  int64_t in_place_rows;  // the products' in_place_rows()

  bool varlen() const { return p.cu_seqlens_q != nullptr; }
  // Whether a tile of m rows of sequence sq is scored and multiplied row by row on the key and
  // value rows in place (the single-row products of decode) instead of packing them: any tile of
  // one row, and every tile of a sequence of at most in_place_rows query rows. Both passes
  // decide alike and score such rows alike (Scores::compute), so the backward's P is the
  // forward's.
  bool rows_in_place(const Sequence& sq, int64_t m) const {
    return m == 1 || sq.q_len <= in_place_rows;
  }
  // Query tiles per head by the longest sequence's q_len: the layout of per-tile state (the
  // backward's dq_seen flags, as its dq accumulator's rows).
  int64_t query_tiles() const { return ceil_div(p.q_len, block_m); }

  Sequence sequence(int64_t b) const {
    Sequence sq{b, 0, p.q_len, 0, p.kv_len, b, 0};
    if (varlen()) {
      sq.q_begin = p.cu_seqlens_q[b];
      sq.q_len = p.cu_seqlens_q[b + 1] - sq.q_begin;
      sq.k_begin = p.cu_seqlens_k[b];
      sq.kv_len = p.cu_seqlens_k[b + 1] - sq.k_begin;
    } else if (p.cache_seqlens != nullptr) {
      sq.kv_len = p.cache_seqlens[b] + p.kv_new_len;
      if (p.cache_batch_idx != nullptr) sq.kv_batch = p.cache_batch_idx[b];
    }
    sq.offset = p.bottom_right ? sq.kv_len - sq.q_len : 0;
    return sq;
  }
  // The row index of query row i of head h (lse element; dropout counter / kv_len).
  int64_t row_index(const Sequence& sq, int64_t h, int64_t i) const {
    return varlen() ? h * p.cu_seqlens_q[p.batch] + sq.q_begin + i
                    : (sq.b * p.q_heads + h) * p.q_len + i;
  }
  // Query-side row i of head h in a tensor laid out like q (q, out, grad_out, dq).
  template <typename T>
  static T* q_side_row(T* base, const int64_t* stride, const Sequence& sq, int64_t h, int64_t i) {
    return base + sq.b * stride[0] + h * stride[1] + (sq.q_begin + i) * stride[2];
  }
  // Key j of kv head hk in a tensor laid out like k (k, v, dk, dv); the tile holding key j
  // continues with the row stride stride[2].
  template <typename T>
  T* key_row(T* base, const int64_t* stride, const Sequence& sq, int64_t hk, int64_t j) const {
    if (p.block_table != nullptr) {
      const int64_t block = p.block_table[sq.b * p.block_table_stride + j / p.block_size];
      return base + block * stride[0] + hk * stride[1] + (j % p.block_size) * stride[2];
    }
    return base + sq.kv_batch * stride[0] + hk * stride[1] + (sq.k_begin + j) * stride[2];
  }
  // f(c, run) for each run of keys [k0 + c, k0 + c + run) of the tile [k0, k0 + n) that lies in
  // one page of a paged cache, in order (the whole tile at once when not paged): a run's rows
  // are read from key_row(.., k0 + c) with the row stride.
  template <typename F>
  void for_page_runs(int64_t k0, int64_t n, F&& f) const {
    if (p.block_table == nullptr) {
      f(int64_t(0), n);
      return;
    }
    for (int64_t c = 0; c < n;) {
      const int64_t run = std::min(n - c, p.block_size - (k0 + c) % p.block_size);
      f(c, run);
      c += run;
    }
  }

  // Whether any key in [k0, k0 + n) is visible to any row in [q0, q0 + m).
  bool tile_visible(const Sequence& sq, int64_t q0, int64_t m, int64_t k0, int64_t n) const {
    if (p.window_left >= 0 && k0 + n - 1 < q0 + sq.offset - p.window_left) return false;
    if (p.window_right >= 0 && k0 > q0 + m - 1 + sq.offset + p.window_right) return false;
    return true;
  }
  // Whether every key of the tile is visible to every row of it, before any mask.
  bool tile_full(const Sequence& sq, int64_t q0, int64_t m, int64_t k0, int64_t n) const {
    if (p.window_left >= 0 && k0 < q0 + m - 1 + sq.offset - p.window_left) return false;
    if (p.window_right >= 0 && k0 + n - 1 > q0 + sq.offset + p.window_right) return false;
    return true;
  }
  // Row i of the tile at (q0, k0) sees no key j >= i + diag (kAllVisible without a right
  // window edge): what the tile products skip (see kAllVisible).
  int64_t visible_diag(const Sequence& sq, int64_t q0, int64_t k0) const {
    if (p.window_right < 0 || p.window_right >= kAllVisible) return kAllVisible;
    return q0 + sq.offset + p.window_right + 1 - k0;
  }
  // Whether scores of a fully visible tile need per-element work (softcap, bias, mask).
  bool elementwise() const {
    return p.softcap > 0 || p.alibi_slopes != nullptr || p.mask_kind != AttnMaskKind::None;
  }
};

// dp [m, ld] becomes dS = P o (dP - delta) (row i's delta[i]): the gradient of the scores
// that the softmax read.
template <typename T>
void score_grads(const T* p, T* dp, const T* delta, int64_t m, int64_t ld) {
  for (int64_t i = 0; i < m; ++i) {
    const T d = delta[i];
    T* dsr = dp + i * ld;
    const T* pr = p + i * ld;
    for (int64_t j = 0; j < ld; ++j) dsr[j] = pr[j] * (dsr[j] - d);
  }
}

// Probabilities that the backward has not yet computed from their scores: row i's are
// exp(scale * s - shift[i]) at the columns j < width[i] (whole vectors) and 0 past them (a NaN
// shift, whose width is the row's, makes the row NaN). A bf16 Backward computes them in its pass
// over P and dP (probs_from_scores), which saves a pass over the scores.
template <typename T>
struct ProbsFromScores {
  const T* shift;
  const int64_t* width;
  T scale;
};

// The tile products and the packing they read, for the at::vec FMA micro-kernel (gemm) on
// acc_t buffers: the forward's (scale * Q, K^T and V; qk, pv) and the backward's (Backward).
// TileProducts below swaps in the bf16 dot products where the CPU has them.
template <typename scalar_t, typename acc_t>
struct FmaProducts {
  static const char* engine() {
    return std::is_same_v<acc_t, double> ? "at::vec fp64 FMA" : "at::vec fp32 FMA";
  }
  // qs [m, e_pad] = scale * q rows (row stride q_rs).
  static void pack_q(const Problem& pr, const scalar_t* q, int64_t q_rs, int64_t m, acc_t* qs) {
    pack_rows(q, q_rs, m, pr.p.head_dim, static_cast<acc_t>(pr.p.scale), qs, pr.e_pad);
  }
  // kt [E, n_pad] = k^T and vb [block_n, ev_pad] = v of n keys.
  static void pack_kv(const Problem& pr, const scalar_t* k, int64_t k_rs, const scalar_t* v,
                      int64_t v_rs, int64_t n, acc_t* kt, acc_t* vb) {
    pack_transposed(k, k_rs, n, pr.p.head_dim, kt, pr.n_pad,
                    round_up(n, pad_cols<acc_t>()));
    pack_rows(v, v_rs, n, pr.p.v_head_dim, acc_t(1), vb, pr.ev_pad);
  }
  // Ends a thread's run of products (brgemm's AMX state; nothing here).
  static void release() {}
  // Query rows per tile of both passes (128 made fp32 fwd+bwd 3-7% slower on the Xeon with
  // AMX); keys per tile of the forward and of the backward.
  static int64_t block_m() { return kBlockM; }
  static int64_t forward_block_n() { return kForwardBlockN; }
  static int64_t backward_block_n() { return kBlockN; }
  // Query rows of a sequence up to which both passes read keys and values in place
  // (Problem::rows_in_place, rows_qk, rows_pv): packing a key tile (K^T and V) costs about a
  // third of its products with 64 rows, so with a few it cost more than the products. fp32, B1
  // H8 E128, 2 threads, Xeon with AMX, against torch's SDPA: L = 2 0.42-0.48x -> 0.94-0.98x at
  // S = 4096 (0.71-0.75x at 512, where a call's fixed costs weigh), 3 0.42-0.50x -> 0.81-0.82x,
  // 4 0.50-0.68x -> 0.82-0.86x (0.6x at 512). At 8 rows in place (two blocks of 4 reading the
  // keys twice) L = 5-8 gained at S = 4096 and lost at 512. Under avx2 alike.
  static int64_t in_place_rows() { return 4; }
  // s [m, n_pad] = qs kt for the columns of n keys that row i sees (j < i + diag,
  // kAllVisible); the other columns of s are left as they were.
  static void qk(const Problem& pr, int64_t m, int64_t n, const acc_t* qs, const acc_t* kt,
                 acc_t* s, int64_t diag) {
    gemm<acc_t, false>(m, round_up(n, Vectorized<acc_t>::size()), pr.p.head_dim, qs, pr.e_pad, 1,
                       kt, pr.n_pad, s, pr.n_pad, diag);
  }
  // The factor by which the softmax multiplies qk's scores (here they are scaled already).
  static acc_t score_scale(const Problem&) { return acc_t(1); }
  // The probabilities of a row of scores: row[j] = exp(scale * row[j] - shift) for j < width,
  // 0 for width <= j < cols (multiples of the vector width), in the layout pv reads; returns
  // the sum of the exps as partial sums (vec_exp_sum).
  static Vectorized<acc_t> exp_probs(acc_t* row, int64_t width, int64_t cols, acc_t scale,
                                     acc_t shift) {
    const Vectorized<acc_t> sum = vec_exp_sum(row, width, scale, shift);
    std::fill(row + width, row + cols, acc_t(0));
    return sum;
  }
  // Puts probabilities p [m, n_pad] that exp_probs of FmaProducts wrote (dropout scales them
  // first) in the layout pv reads: they are in it.
  static void layout_probs(const Problem&, int64_t, acc_t*) {}
  // o [m, ev_pad] += p [m, n] vb, where p[i, j] = 0 for j >= i + diag; p (in s) may be
  // overwritten.
  static void pv(const Problem& pr, int64_t m, int64_t n, acc_t* p, const acc_t* vb, acc_t* o,
                 int64_t diag) {
    gemm<acc_t>(m, pr.ev_pad, n, p, pr.n_pad, 1, vb, pr.ev_pad, o, pr.ev_pad, kAllVisible,
                diag);
  }
  // m query rows' scaled scores s [m, n_pad] against n key rows read in place (qs as pack_q
  // wrote them), and their o [m, ev_pad] += p [m, n_pad] v with fp32 probabilities p (decode,
  // and Problem::rows_in_place): blocks of up to 4 rows, each key and value row loaded once per
  // block (a row at a time, L = 4 at S = 4096 ran 0.68x torch's SDPA; now 0.82-0.86x).
  static void rows_qk(const Problem& pr, int64_t m, const acc_t* qs, const scalar_t* k,
                      int64_t k_rs, int64_t n, acc_t* s) {
    for_row_blocks<4>(m, [&](int64_t i, auto rows) {
      scores_in_place<decltype(rows)::value>(qs + i * pr.e_pad, pr.e_pad, k, k_rs, n,
                                             pr.p.head_dim, s + i * pr.n_pad, pr.n_pad);
    });
  }
  static void rows_pv(const Problem& pr, int64_t m, const acc_t* p, const scalar_t* v,
                      int64_t v_rs, int64_t n, acc_t* o) {
    for_row_blocks<4>(m, [&](int64_t i, auto rows) {
      pv_in_place<decltype(rows)::value>(p + i * pr.n_pad, pr.n_pad, v, v_rs, n,
                                         pr.p.v_head_dim, o + i * pr.ev_pad, pr.ev_pad);
    });
  }

  // The backward's operands of one key tile (kt = K^T as qk reads it, kb = K, vt = V^T) and
  // of one query tile (qs as qk reads it, dob = dO), and its products other than qk.
  struct Backward {
    std::vector<acc_t> kt, kb, vt, qs, dob;

    explicit Backward(const Problem& pr)
        : kt(pr.p.head_dim * pr.n_pad), kb(pr.block_n * pr.e_pad),
          vt(pr.p.v_head_dim * pr.n_pad), qs(pr.block_m * pr.e_pad),
          dob(pr.block_m * pr.ev_pad) {}

    void pack_keys(const Problem& pr, const scalar_t* k, int64_t k_rs, const scalar_t* v,
                   int64_t v_rs, int64_t n) {
      pack_rows(k, k_rs, n, pr.p.head_dim, acc_t(1), kb.data(), pr.e_pad);
      pack_transposed(k, k_rs, n, pr.p.head_dim, kt.data(), pr.n_pad, pr.n_pad);
      pack_transposed(v, v_rs, n, pr.p.v_head_dim, vt.data(), pr.n_pad, pr.n_pad);
    }
    // Query tile `tile` (g * n_qb + qb) of kv head `head` (b * kv_heads + hk) of the call:
    // only the bf16 operands below keep packed tiles by it.
    void pack_queries(const Problem& pr, const scalar_t* q, int64_t q_rs, const scalar_t* dout,
                      int64_t dout_rs, int64_t m, int64_t /*head*/, int64_t /*tile*/) {
      pack_q(pr, q, q_rs, m, qs.data());
      pack_rows(dout, dout_rs, m, pr.p.v_head_dim, acc_t(1), dob.data(), pr.ev_pad);
    }
    // The packed query tile as qk reads it.
    const acc_t* scores_queries() const { return qs.data(); }
    // Whether grads adds into the key tile's dk and dv, which then start as zeros.
    static bool adds_into_keys() { return true; }
    // Completes the key tile's dk [n, e_pad] and dv [n, ev_pad] (grads added into them).
    void finish_keys(const Problem&, int64_t, acc_t*, acc_t*) const {}
    // Whether grads takes P as scores (ProbsFromScores) where there is no dropout.
    static bool probs_from_scores() { return false; }
    // Whether grads can write dq (dq_add false) instead of adding into it, so that a query
    // tile's first key tile needs no zeros there.
    static bool writes_dq() { return false; }
    // dp [m, n_pad] = dO V^T, where row i sees keys j < i + diag (0 elsewhere).
    void dp(const Problem& pr, int64_t m, acc_t* dp, int64_t diag) const {
      if (diag < kAllVisible) std::fill(dp, dp + m * pr.n_pad, acc_t(0));
      gemm<acc_t, false>(m, pr.n_pad, pr.p.v_head_dim, dob.data(), pr.ev_pad, 1, vt.data(),
                         pr.n_pad, dp, pr.n_pad, diag);
    }
    // dv [n, ev_pad] += P_dv^T dO, dk [n, e_pad] += scale dS^T Q and dq [m, e_pad] += dS K
    // (unscaled; = where dq_add is false, which only products that writes_dq() are given), for
    // the probabilities p [m, n_pad] (P_dv: with dropout, P o Z) and the score gradient
    // dS = P o (dP - delta) (row i's delta[i]), which ds [m, n_pad] holds already where delta is
    // null, dP otherwise (overwritten either way). p[i, j] = ds[i, j] = 0 for
    // j >= i + diag, so key j needs only the rows i > j - diag. With from_scores (only where
    // probs_from_scores()), p = p_dv holds the scores of the probabilities it describes.
    void grads(const Problem& pr, int64_t m, int64_t n, const acc_t* p_dv, const acc_t* p,
               const ProbsFromScores<acc_t>* /*from_scores*/, acc_t* ds, const acc_t* delta,
               acc_t* dk, acc_t* dv, acc_t* dq, bool /*dq_add*/, int64_t diag) {
      if (delta != nullptr) score_grads(p, ds, delta, m, pr.n_pad);
      gemm<acc_t>(n, pr.ev_pad, m, p_dv, 1, pr.n_pad, dob.data(), pr.ev_pad, dv, pr.ev_pad,
                  kAllVisible, kAllVisible, diag);
      gemm<acc_t>(n, pr.e_pad, m, ds, 1, pr.n_pad, qs.data(), pr.e_pad, dk, pr.e_pad,
                  kAllVisible, kAllVisible, diag);
      gemm<acc_t>(m, pr.e_pad, n, ds, pr.n_pad, 1, kb.data(), pr.e_pad, dq, pr.e_pad,
                  kAllVisible, diag);
    }
  };
};

template <typename scalar_t, typename acc_t>
struct TileProducts : FmaProducts<scalar_t, acc_t> {};

#ifdef CPU_CAPABILITY_AVX512
// bf16 tile products on AVX512-BF16: vdpbf16ps multiplies 16 pairs of bf16 and adds both
// products to 16 fp32 accumulators, twice the multiply-adds of an fp32 FMA, with no
// conversion of the inputs to fp32. Products of two bf16 are exact in fp32, so products of
// bf16 inputs (QK^T, dO V^T) have fp32 accuracy. A computed operand is rounded to bf16 where
// torch's bf16 flash kernels round it: P before PV and before dV += P^T dO, dS before
// dQ += dS K and dK += dS^T Q, a relative error of at most 2^-9 per element, while every sum
// stays fp32 (and dS is computed from the fp32 P). (vdpbf16ps also treats bf16 denormals as
// zero: magnitudes below 1e-38, far below the rounding step of any score or gradient.)
// Operands hold bf16 pairs as 32-bit words, stored in the acc_t (float) buffers the FMA path
// uses: a pair needs the room of one float.
typedef uint32_t __attribute__((__may_alias__)) bf16_pair;
constexpr int kDotRows = 8;  // rows of the dot micro-kernel's register tile (x 2 vectors)

inline bf16_pair bf16_pair_of(c10::BFloat16 lo, c10::BFloat16 hi) {
  return static_cast<uint32_t>(lo.x) | static_cast<uint32_t>(hi.x) << 16;
}

// C[ROWS, n] (ACCUMULATE ? += : =) alpha A[ROWS, kp] B[kp, n] over bf16 pairs: A row-major
// (A_ROW_MAJOR, leading dim lda pairs) or column-major, so that a transposed operand costs
// nothing, as in gemm_rows; B [kp, n] with pair (2p, 2p+1) of the reduction at row p ("VNNI"
// layout, leading dim ldb); C fp32; n is a multiple of 32.
template <int ROWS, bool A_ROW_MAJOR, bool ACCUMULATE>
__attribute__((target("avx512f,avx512bf16"))) void dot_rows(
    int64_t n, int64_t kp, const bf16_pair* a, int64_t lda, const bf16_pair* b, int64_t ldb,
    float* c, int64_t ldc, float alpha) {
  for (int64_t j = 0; j < n; j += 32) {
    __m512 acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      acc0[r] = _mm512_setzero_ps();
      acc1[r] = _mm512_setzero_ps();
    }
    const bf16_pair* bp = b + j;
    const bf16_pair* ap = a;
    for (int64_t p = 0; p < kp; ++p, bp += ldb, ap += A_ROW_MAJOR ? 1 : lda) {
      const auto b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bp));
      const auto b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bp + 16));
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        const auto ar = reinterpret_cast<__m512bh>(
            _mm512_set1_epi32(A_ROW_MAJOR ? ap[r * lda] : ap[r]));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], ar, b0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], ar, b1);
      }
    }
    const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      float* cr = c + r * ldc + j;
      _mm512_storeu_ps(cr, ACCUMULATE ? _mm512_fmadd_ps(acc0[r], scale, _mm512_loadu_ps(cr))
                                      : _mm512_mul_ps(acc0[r], scale));
      _mm512_storeu_ps(cr + 16, ACCUMULATE
                                    ? _mm512_fmadd_ps(acc1[r], scale, _mm512_loadu_ps(cr + 16))
                                    : _mm512_mul_ps(acc1[r], scale));
    }
  }
}

template <bool A_ROW_MAJOR, bool ACCUMULATE>
void dot_layout(int64_t m, int64_t n, int64_t kp, const bf16_pair* a, int64_t lda,
                const bf16_pair* b, int64_t ldb, float* c, int64_t ldc, float alpha,
                int64_t col_diag, int64_t k_diag) {
  const int64_t row_step = A_ROW_MAJOR ? lda : 1;
  for_row_blocks<kDotRows>(m, [&](int64_t i, auto rows) {
    constexpr int R = decltype(rows)::value;
    const int64_t n_rows = visible_extent(i, R, col_diag, n, 32);
    const int64_t kp_rows = ceil_div(visible_extent(i, R, k_diag, 2 * kp, 2), 2);
    if (n_rows == 0 || kp_rows == 0) return;
    dot_rows<R, A_ROW_MAJOR, ACCUMULATE>(n_rows, kp_rows, a + i * row_step, lda, b, ldb,
                                         c + i * ldc, ldc, alpha);
  });
}

// C[m, n] (ACCUMULATE ? += : =) alpha A[m, kp] B[kp, n] over bf16 pairs; A is read through
// (row, pair) strides, one of which is 1, as in gemm. Row i needs only columns j < i + col_diag
// and the pairs of reduction steps p < i + k_diag (kAllVisible); the rest of C is not written.
template <bool ACCUMULATE>
void dot(int64_t m, int64_t n, int64_t kp, const bf16_pair* a, int64_t a_rs, int64_t a_cs,
         const bf16_pair* b, int64_t ldb, float* c, int64_t ldc, float alpha,
         int64_t col_diag = kAllVisible, int64_t k_diag = kAllVisible) {
  if (a_cs == 1) {
    dot_layout<true, ACCUMULATE>(m, n, kp, a, a_rs, b, ldb, c, ldc, alpha, col_diag, k_diag);
  } else {
    dot_layout<false, ACCUMULATE>(m, n, kp, a, a_cs, b, ldb, c, ldc, alpha, col_diag, k_diag);
  }
}

// The operand layouts of dot, from bf16 rows (inputs) or fp32 rows (computed tiles, rounded
// to nearest even as torch's conversion rounds). Each zero-fills what the products read past
// the data (a missing odd element, padded rows or columns), so that no padding product meets
// an uninitialized (possibly NaN) word.

// dst [rows, ld] = pairs (src[r, 2p], src[r, 2p+1]) at (r, p): an A operand reduced over its
// columns, row-major. A bf16 row is already such pairs in memory.
inline void pack_column_pairs(const c10::BFloat16* src, int64_t src_rs, int64_t rows,
                              int64_t cols, bf16_pair* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const c10::BFloat16* s = src + r * src_rs;
    std::memcpy(dst + r * ld, s, cols / 2 * sizeof(bf16_pair));
    if (cols % 2 != 0) dst[r * ld + cols / 2] = bf16_pair_of(s[cols - 1], c10::BFloat16(0.f));
  }
}

// The fp32 rows [m, n] (leading dim ld, n a multiple of 32) become column pairs in place: pair
// j of a row takes the room of float j, which is read before it is written.
__attribute__((target("avx512f,avx512bf16"))) inline void to_pairs_in_place(float* x, int64_t m,
                                                                           int64_t n,
                                                                           int64_t ld) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = x + i * ld;
    for (int64_t j = 0; j < n; j += 32) {
      const __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + j + 16),
                                                 _mm512_loadu_ps(row + j));
      _mm512_storeu_si512(reinterpret_cast<bf16_pair*>(row) + j / 2,
                          reinterpret_cast<__m512i>(pairs));
    }
  }
}

// The softmax's exp and to_pairs_in_place in one pass over a row (a pass fewer over the tile's
// scores): row[j] = exp(scale * row[j] - shift) for j < width, 0 for width <= j < cols, as
// column pairs in place (width and cols multiples of 16, the row's room a multiple of 32
// floats); returns the sum of the exps before their rounding to bf16, as partial sums.
__attribute__((target("avx512f,avx512bf16"))) inline Vectorized<float> exp_to_pairs(
    float* row, int64_t width, int64_t cols, float scale, float shift) {
  const Vectorized<float> sc(scale), sh(-shift);
  const auto exp_at = [&](int64_t j) -> __m512 {
    return j < width
        ? __m512(exp_nonpositive(at::vec::fmadd(Vectorized<float>::loadu(row + j), sc, sh)))
        : _mm512_setzero_ps();
  };
  auto* out = reinterpret_cast<bf16_pair*>(row);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j < width; j += 32) {
    const __m512 lo = exp_at(j), hi = exp_at(j + 16);
    sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
    _mm512_storeu_si512(out + j / 2, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
  std::fill(out + j / 2, out + round_up(cols, 32) / 2, 0);
  return sum;
}

// dst [ceil(cols/2), ld] = pairs (src[r, 2p], src[r, 2p+1]) at (p, r), rows.. zero: the
// transpose of an operand reduced over its columns, as B (K^T for the scores, V^T for dP).
// Where the rows' pairs are 32-bit words a whole number of words apart (an even row stride),
// the register-blocked 32-bit transpose moves them, bits unchanged: a 4-byte copy per pair took
// ~5% of the bf16 backward at L = S = 512 (Xeon with AMX).
inline void pack_transposed_pairs(const c10::BFloat16* src, int64_t src_rs, int64_t rows,
                                  int64_t cols, bf16_pair* dst, int64_t ld) {
  const int64_t pairs = ceil_div(cols, 2);
  int64_t copied = 0;  // pair columns done
  if (src_rs % 2 == 0) {
    copied = cols / 2;
    pack_transposed(reinterpret_cast<const float*>(src), src_rs / 2, rows, copied,
                    reinterpret_cast<float*>(dst), ld, ld);
  }
  for (int64_t p = copied; p < pairs; ++p) std::fill(dst + p * ld + rows, dst + (p + 1) * ld, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const c10::BFloat16* s = src + r * src_rs;
    for (int64_t p = copied; p < cols / 2; ++p) std::memcpy(dst + p * ld + r, s + 2 * p, 4);
    if (cols % 2 != 0) dst[cols / 2 * ld + r] = bf16_pair_of(s[cols - 1], c10::BFloat16(0.f));
  }
}

// dst [ceil(rows/2), ld] = pairs (src[2i, c], src[2i+1, c]) at (i, c), columns cols.. zero
// (ld >= cols rounded up to 16): an operand reduced over its rows, as B (V for PV; K, Q and
// dO in the backward).
__attribute__((target("avx512f,avx512bf16"))) inline void pack_row_pairs(
    const c10::BFloat16* src, int64_t src_rs, int64_t rows, int64_t cols, bf16_pair* dst,
    int64_t ld) {
  // 16 elements of x (lanes outside mask read as 0) as bf16 bits in the low halves of 32-bit
  // lanes.
  const auto bf16_lanes = [](const c10::BFloat16* x, __mmask16 mask) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x));
  };
  for (int64_t i = 0; 2 * i < rows; ++i) {
    const c10::BFloat16* r0 = src + 2 * i * src_rs;
    const bool second = 2 * i + 1 < rows;
    bf16_pair* d = dst + i * ld;
    int64_t c = 0;
    for (; c < cols; c += 16) {
      const __mmask16 mask =
          cols - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (cols - c)) - 1);
      const __m512i lo = bf16_lanes(r0 + c, mask);
      const __m512i hi = second ? bf16_lanes(r0 + src_rs + c, mask) : _mm512_setzero_si512();
      _mm512_storeu_si512(d + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    std::fill(d + c, d + ld, 0);
  }
}

// The bf16 pairs (a[c], b[c]) of 16 columns c, given kRowPairWords: vcvtne2ps2bf16 (b, a) puts
// a's 16 values in words 0..15 and b's in 16..31; a row pair wants a[c] in word 2c and b[c]
// in word 2c + 1.
alignas(64) constexpr uint16_t kRowPairWords[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                    21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                    11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m512i row_pairs(
    __m512 a, __m512 b, __m512i row_pair_words) {
  return _mm512_permutexvar_epi16(row_pair_words,
                                  reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
}

// The backward's computed operands, rounded to bf16 in one pass over P and dP [m, n] (fp32
// rows, leading dim n, a multiple of 32): dS = P o (dP - delta) (score_grads; with delta null,
// dp holds dS already) as column pairs in place of dp (to_pairs_in_place), which dq's product
// reads, and as row pairs ds_rows [ceil(m/2), n] (as pack_row_pairs lays them out; an odd last
// row pairs with zeros), and P_dv (p_dv: P, or with dropout P o Z) as row pairs p_rows, which
// the products that reduce over the query rows read. A pass for dS and three for its pairs and
// P's (two over P and dS as row pairs, one over dS in place) took ~9% of the bf16 backward at
// L = S = 512 (Xeon with AMX). With from_scores (no dropout: p = p_dv), p holds the scores and
// the pass computes P from them, as FmaProducts::exp_probs would (a pass fewer over the tile).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void pack_grad_pairs(
    const float* p_dv, const float* p, const ProbsFromScores<float>* from_scores, float* dp,
    const float* delta, int64_t m, int64_t n, bf16_pair* p_rows, bf16_pair* ds_rows) {
  const __m512i interleave = _mm512_load_si512(kRowPairWords);
  const __m512 zero = _mm512_setzero_ps();
  const bool p_is_p_dv = p == p_dv;  // no dropout: dS reads the P vectors already loaded
  // P_dv's row r at columns col.. (r < m).
  auto probs = [&](int64_t r, int64_t col) -> __m512 {
    const __m512 x = _mm512_loadu_ps(p_dv + r * n + col);
    if (from_scores == nullptr) return x;
    if (col >= from_scores->width[r]) return zero;
    return exp_nonpositive(_mm512_fmadd_ps(x, _mm512_set1_ps(from_scores->scale),
                                      _mm512_set1_ps(-from_scores->shift[r])));
  };
  for (int64_t i = 0; i < m; i += 2) {
    const bool second = i + 1 < m;
    float* ds0 = dp + i * n;
    float* ds1 = ds0 + n;  // row i + 1 (only if second)
    const __m512 d0 = _mm512_set1_ps(delta ? delta[i] : 0.f);
    const __m512 d1 = _mm512_set1_ps(delta && second ? delta[i + 1] : 0.f);
    bf16_pair *p_out = p_rows + i / 2 * n, *ds_out = ds_rows + i / 2 * n;
    for (int64_t j = 0; j < n; j += 32) {
      // Row r's column pairs land at floats j / 2 .. j / 2 + 15 of its room, read already.
      __m512 a[2], b[2], c[2], e[2];  // P_dv rows i, i + 1 and dS rows i, i + 1, columns j..
      for (int h = 0; h < 2; ++h) {
        const int64_t col = j + 16 * h;
        a[h] = probs(i, col);
        b[h] = second ? probs(i + 1, col) : zero;
        c[h] = _mm512_loadu_ps(ds0 + col);
        e[h] = second ? _mm512_loadu_ps(ds1 + col) : zero;
        if (delta) {  // c, e hold dP: dS = P (dP - delta) (0 for a missing row i + 1)
          const __m512 pa = p_is_p_dv ? a[h] : _mm512_loadu_ps(p + i * n + col);
          const __m512 pb = p_is_p_dv || !second ? b[h] : _mm512_loadu_ps(p + (i + 1) * n + col);
          c[h] = _mm512_mul_ps(pa, _mm512_sub_ps(c[h], d0));
          e[h] = _mm512_mul_ps(pb, _mm512_sub_ps(e[h], d1));
        }
      }
      for (int h = 0; h < 2; ++h) {
        _mm512_storeu_si512(p_out + j + 16 * h, row_pairs(a[h], b[h], interleave));
        _mm512_storeu_si512(ds_out + j + 16 * h, row_pairs(c[h], e[h], interleave));
      }
      _mm512_storeu_si512(reinterpret_cast<bf16_pair*>(ds0) + j / 2,
                          reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(c[1], c[0])));
      if (second) {
        _mm512_storeu_si512(reinterpret_cast<bf16_pair*>(ds1) + j / 2,
                            reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e[1], e[0])));
      }
    }
  }
}

// A single query row's products (decode) over bf16 pairs, reading the key and value rows in
// place as scores_in_place and pv_in_place do: a vdpbf16ps takes 32 elements of a row, where
// the FMA path converts them to fp32 16 at a time first (that conversion and its FMAs were most
// of a bf16 decode step: Xeon with AMX, H 2, S 512, E 128). (The micro-kernels are functions, not
// lambdas: a lambda does not take its function's target attribute.)

// The first min(count, 32) 16-bit elements of a 512-bit vector.
inline __mmask32 first_halves(int64_t count) {
  return count >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t{1} << count) - 1);
}

// part[r * 16 ..] = 16 partial sums of the dot product of q (column pairs) with key row r,
// r < R, of E elements (those past E read as zero in both operands: q's words past its pairs
// are not written).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void key_row_dots(
    const bf16_pair* q, const c10::BFloat16* row, int64_t k_rs, int64_t E, float* part) {
  for (int r = 0; r < R; ++r)
    prefetch_bytes(row + (r + kAheadRows) * k_rs, E * int64_t(sizeof(c10::BFloat16)));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < E; c += 32) {
    const __mmask32 mask = first_halves(E - c);
    const auto qv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, q + c / 2));
    for (int r = 0; r < R; ++r) {
      const __m512i kv = _mm512_maskz_loadu_epi16(mask, row + r * k_rs + c);
      acc[r] = _mm512_dpbf16_ps(acc[r], qv, reinterpret_cast<__m512bh>(kv));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_store_ps(part + r * 16, acc[r]);
}

// s[j] = scale * sum_e q[e] * k[j * k_rs + e] for e < E, j < n, with q as column pairs
// (pack_column_pairs): scores_in_place's groups of keys and its sum by transposition; the
// products of two bf16 are exact in fp32, and the sums are scaled once (as qk scales its
// products).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void row_scores_pairs(
    const bf16_pair* q, const c10::BFloat16* k, int64_t k_rs, int64_t n, int64_t E, float scale,
    float* s) {
  constexpr int64_t L = 16;
  constexpr int64_t kKeys = 4;  // scores_in_place's chains of FMAs, one per key
  alignas(64) float part[L * L] = {};
  alignas(64) float by_lane[L * L];
  for (int64_t j0 = 0; j0 < n; j0 += L) {
    const int64_t keys = std::min(L, n - j0);
    int64_t j = 0;
    for (; j + kKeys <= keys; j += kKeys)
      key_row_dots<kKeys>(q, k + (j0 + j) * k_rs, k_rs, E, part + j * L);
    for (; j < keys; ++j) key_row_dots<1>(q, k + (j0 + j) * k_rs, k_rs, E, part + j * L);
    at::vec::transpose_mxn<float, L, L>(part, L, by_lane, L);
    __m512 total = _mm512_load_ps(by_lane);
    for (int64_t l = 1; l < L; ++l) total = _mm512_add_ps(total, _mm512_load_ps(by_lane + l * L));
    _mm512_mask_storeu_ps(s + j0, static_cast<__mmask16>(first_halves(keys)),
                          _mm512_mul_ps(total, _mm512_set1_ps(scale)));
  }
}

// o[c * 32 ..] += sum_j p[j] * v[j * v_rs + c * 32 ..] for the R chunks c of 32 values at v and
// o, the last one's values past `last` (<= 32) read as zero; row_pv_pairs below.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void value_chunks_pv(
    const float* p, const c10::BFloat16* v, int64_t v_rs, int64_t n, int64_t last, float* o) {
  // Columns 0-15 and 16-31 of a chunk, as lanes of (lo, hi) for vpermt2ps.
  alignas(64) static constexpr int32_t kFirstHalf[16] = {0, 1, 2, 3, 16, 17, 18, 19,
                                                         4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static constexpr int32_t kSecondHalf[16] = {8,  9,  10, 11, 24, 25, 26, 27,
                                                          12, 13, 14, 15, 28, 29, 30, 31};
  __mmask32 lanes[R];
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lanes[r] = r + 1 < R ? ~__mmask32(0) : first_halves(last);
    lo[r] = _mm512_setzero_ps();
    hi[r] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < n; j += 2) {
    const float p0 = p[j], p1 = j + 1 < n ? p[j + 1] : 0.f;
    if (p0 == 0.f && p1 == 0.f) continue;
    const bf16_pair p01 = bf16_pair_of(c10::BFloat16(p0), c10::BFloat16(p1));
    const auto pair = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(p01)));
    const c10::BFloat16* row0 = v + j * v_rs;
    const c10::BFloat16* row1 = row0 + v_rs;
    prefetch_bytes(row0 + kAheadRows * v_rs, R * 32 * int64_t(sizeof(c10::BFloat16)));
    prefetch_bytes(row1 + kAheadRows * v_rs, R * 32 * int64_t(sizeof(c10::BFloat16)));
    const __mmask32 use0 = p0 != 0.f ? ~__mmask32(0) : 0;
    const __mmask32 use1 = p1 != 0.f ? ~__mmask32(0) : 0;
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_maskz_loadu_epi16(lanes[r] & use0, row0 + r * 32);
      const __m512i b = _mm512_maskz_loadu_epi16(lanes[r] & use1, row1 + r * 32);
      const auto evens = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
      const auto odds = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
      lo[r] = _mm512_dpbf16_ps(lo[r], pair, evens);
      hi[r] = _mm512_dpbf16_ps(hi[r], pair, odds);
    }
  }
  const __m512i first = _mm512_load_si512(kFirstHalf);
  const __m512i second = _mm512_load_si512(kSecondHalf);
  for (int r = 0; r < R; ++r) {
    float* out = o + r * 32;
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out),
                                        _mm512_permutex2var_ps(lo[r], first, hi[r])));
    _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_loadu_ps(out + 16),
                                             _mm512_permutex2var_ps(lo[r], second, hi[r])));
  }
}

// o[e] += sum_j p[j] * v[j * v_rs + e] for e < ev, j < n: pv_in_place over pairs of keys (blocks
// of up to 4 chunks of 32 values in registers), each pair's probabilities rounded to bf16 as the
// multi-row path's pairs (to_pairs_in_place) round them. Keys j and j + 1 interleave by
// vpunpck{l,h}wd, which pairs the words of each 128-bit lane, so the accumulators hold a chunk's
// columns in that order (lo: 0-3, 8-11, 16-19, 24-27; hi: the others) until the end. A key with
// p[j] == 0 is not read (pv_in_place's rule); o has room for whole chunks past ev.
void row_pv_pairs(const float* p, const c10::BFloat16* v, int64_t v_rs, int64_t n, int64_t ev,
                  float* o) {
  const int64_t chunks = ceil_div(ev, 32);
  for_row_blocks<4>(chunks, [&](int64_t c0, auto block) {
    constexpr int R = decltype(block)::value;
    const int64_t last = std::min<int64_t>(32, ev - (c0 + R - 1) * 32);
    value_chunks_pv<R>(p, v + c0 * 32, v_rs, n, last, o + c0 * 32);
  });
}

// Where cpu_brgemm::use_for_bf16() (AMX-BF16, or forced), the same pair operands go to ATen's
// oneDNN brgemm instead of dot: its VNNI-2 layout of B is ours (fastattn/cpu_brgemm_bf16.h).
template <>
struct TileProducts<c10::BFloat16, float> {
  using Fma = FmaProducts<c10::BFloat16, float>;
  using bf16 = c10::BFloat16;
  static bool on() { return cpu_has_avx512_bf16(); }
  static bool brgemm() { return cpu_brgemm::use_for_bf16(); }
  static const char* engine() {
    if (brgemm()) return cpu_brgemm::bf16_engine_name();
    return on() ? "avx512-bf16 vdpbf16ps" : Fma::engine();
  }
  static void release() {
    if (brgemm()) cpu_brgemm::release();
  }
  // brgemm's forward takes twice the keys per tile: half the per-row steps of the softmax
  // (reductions, the rescale of O) and of the calls into brgemm per key. bf16 forward, Xeon with
  // AMX, 2 threads, against 128: L = S = 512 and 1024 12-14% faster, causal 8-15%; 512 keys
  // ran slower than 256 at each of those sizes (s then outgrows L1 and L2's nearest share).
  static int64_t forward_block_n() { return brgemm() ? 2 * kForwardBlockN : kForwardBlockN; }
  // And the backward twice its 64: fwd+bwd 5% faster at L = S = 512 and 1024 (same machine,
  // alternating builds, min of 6), causal unchanged; 256 lost at L = S = 512 causal.
  static int64_t backward_block_n() { return brgemm() ? 2 * kBlockN : kBlockN; }
  // And twice the query rows in both passes: half the calls into brgemm per key, and the
  // backward's dK^T and dV^T products, which reduce over the rows, accumulate twice as many
  // per call (oneDNN adds into C at ~2/3 of the rate at which it writes C, at these sizes).
  // Same machine, alternating builds, min of 6-10: fwd+bwd L = S = 1024 10.8 -> 9.8 ms, 512
  // 2.65 -> 2.59, causal 4-5% faster; forward L = S = 1024 2.67 -> 2.47 ms, 512 4% faster, 512
  // causal 3% slower. (256 keys per backward tile as well lost 5-13%.)
  static int64_t block_m() { return brgemm() ? 2 * kBlockM : kBlockM; }
  // Fewer rows in place than the FMA path's (see there): its tile products are cheaper. Against
  // torch's SDPA (bf16, B1 H8 E128, 2 threads, Xeon with AMX): L = 2 0.98x -> 1.67x at S = 4096,
  // 1.24-1.30x -> 1.42-1.57x at 512; L = 3 and 4 gained at S = 4096 (0.97x -> 1.24-1.28x) but
  // lost at 512 (1.28-1.34x -> 0.88-1.14x).
  static int64_t in_place_rows() { return on() ? 2 : Fma::in_place_rows(); }
  static bf16_pair* pairs(float* x) { return reinterpret_cast<bf16_pair*>(x); }
  static const bf16_pair* pairs(const float* x) { return reinterpret_cast<const bf16_pair*>(x); }

  // Q rows as pairs, unscaled (qk and rows_qk apply the scale in fp32) and zero-padded
  // to an even E.
  static void pack_q(const Problem& pr, const bf16* q, int64_t q_rs, int64_t m, float* qs) {
    if (!on()) return Fma::pack_q(pr, q, q_rs, m, qs);
    pack_column_pairs(q, q_rs, m, pr.p.head_dim, pairs(qs), pr.e_pad);
  }
  // kt [ceil(E/2), n_pad] pairs (k[j, 2p], k[j, 2p+1]) at (p, j); vb [ceil(n/2), ev_pad] pairs
  // (v[2i, e], v[2i+1, e]) at (i, e).
  static void pack_kv(const Problem& pr, const bf16* k, int64_t k_rs, const bf16* v,
                      int64_t v_rs, int64_t n, float* kt, float* vb) {
    if (!on()) return Fma::pack_kv(pr, k, k_rs, v, v_rs, n, kt, vb);
    pack_transposed_pairs(k, k_rs, n, pr.p.head_dim, pairs(kt), pr.n_pad);
    pack_row_pairs(v, v_rs, n, pr.p.v_head_dim, pairs(vb), pr.ev_pad);
  }
  static void qk(const Problem& pr, int64_t m, int64_t n, const float* qs, const float* kt,
                 float* s, int64_t diag) {
    if (!on()) return Fma::qk(pr, m, n, qs, kt, s, diag);
    if (brgemm()) {
      // The columns that some row sees (whole vector pairs: a few kernel shapes per tile width).
      const int64_t cols = visible_extent(0, m, diag, pr.n_pad, 32);
      cpu_brgemm::bf16_product(m, cols, ceil_div(pr.p.head_dim, 2), pairs(qs), pr.e_pad,
                               pairs(kt), pr.n_pad, s, pr.n_pad, false);
      if (defers_scale(pr)) return;
      const float scale = static_cast<float>(pr.p.scale);
      for (int64_t i = 0; i < m * pr.n_pad; ++i) s[i] *= scale;
      return;
    }
    dot<false>(m, round_up(n, 32), ceil_div(pr.p.head_dim, 2), pairs(qs), pr.e_pad, 1,
               pairs(kt), pr.n_pad, s, pr.n_pad, static_cast<float>(pr.p.scale), diag);
  }
  // brgemm has no factor for its products: the softmax's exp applies the scale instead, as
  // one fused multiply-add with its shift (a pass fewer over the scores; bf16 forward at
  // L = S = 1024 on the Xeon with AMX, 2 threads: see the commit), unless per-element work
  // (softcap, bias, mask) needs the scaled scores first, or a negative scale would turn the
  // row's max into its min.
  static bool defers_scale(const Problem& pr) {
    return brgemm() && pr.p.scale > 0 && !pr.elementwise();
  }
  static float score_scale(const Problem& pr) {
    return defers_scale(pr) ? static_cast<float>(pr.p.scale) : 1.f;
  }
  // The probabilities as the column pairs that pv reads, converted as the exp writes them.
  static Vectorized<float> exp_probs(float* row, int64_t width, int64_t cols, float scale,
                                     float shift) {
    if (!on()) return Fma::exp_probs(row, width, cols, scale, shift);
    return exp_to_pairs(row, width, cols, scale, shift);
  }
  static void layout_probs(const Problem& pr, int64_t m, float* p) {
    if (on()) to_pairs_in_place(p, m, pr.n_pad, pr.n_pad);
  }
  static void rows_qk(const Problem& pr, int64_t m, const float* qs, const bf16* k,
                      int64_t k_rs, int64_t n, float* s) {
    if (!on()) return Fma::rows_qk(pr, m, qs, k, k_rs, n, s);
    for (int64_t i = 0; i < m; ++i) {
      row_scores_pairs(pairs(qs + i * pr.e_pad), k, k_rs, n, pr.p.head_dim,
                       static_cast<float>(pr.p.scale), s + i * pr.n_pad);
    }
  }
  static void rows_pv(const Problem& pr, int64_t m, const float* p, const bf16* v, int64_t v_rs,
                      int64_t n, float* o) {
    if (!on()) return Fma::rows_pv(pr, m, p, v, v_rs, n, o);
    for (int64_t i = 0; i < m; ++i) {
      row_pv_pairs(p + i * pr.n_pad, v, v_rs, n, pr.p.v_head_dim, o + i * pr.ev_pad);
    }
  }
  // p holds the probabilities as column pairs (exp_probs, layout_probs).
  static void pv(const Problem& pr, int64_t m, int64_t n, float* p, const float* vb, float* o,
                 int64_t diag) {
    if (!on()) return Fma::pv(pr, m, n, p, vb, o, diag);
    if (brgemm()) {
      return cpu_brgemm::bf16_product(m, pr.ev_pad, ceil_div(visible_extent(0, m, diag, n, 2), 2),
                                      pairs(p), pr.n_pad, pairs(vb), pr.ev_pad, o, pr.ev_pad,
                                      true);
    }
    dot<true>(m, pr.ev_pad, ceil_div(n, 2), pairs(p), pr.n_pad, 1, pairs(vb), pr.ev_pad, o,
              pr.ev_pad, 1.f, kAllVisible, diag);
  }

  // The FMA path's buffers hold the key tile's pair layouts (kt and vt as transposed pairs, kb
  // as row pairs). A query tile has four (column pairs of q as qk reads them and of dO, row pairs
  // of both for the products that reduce over queries), kept in `queries` for every query tile
  // of the current kv head: every key tile of a head meets the same query tiles, and packing
  // them anew for each key tile took ~5% of the bf16 backward at L = S = 512 (Zen 4). A head
  // whose packed tiles would not fit in kMaxCachedQueryBytes (about a Zen 4 core's L2, where
  // the next key tile finds them; reasoned, not tuned) uses one slot, packed for every key tile.
  //
  // With brgemm, which reads A row-major, the products that reduce over the query rows run
  // transposed: dK^T [E, n] += Q^T dS and dV^T [Ev, n] += dO^T P, with Q^T and dO^T as pairs of
  // rows (two more layouts per query tile, q_cols and dout_cols) and dS, P as the row pairs that
  // dot reads as B. finish_keys transposes dK^T and dV^T into the tile's dk and dv.
  static constexpr int64_t kMaxCachedQueryBytes = int64_t{1} << 20;
  struct Backward : Fma::Backward {
    int64_t slot_floats = 0, slots = 0;
    std::vector<float> queries;  // [slots][qs | dob | q_rows | dout_rows (| q_cols | dout_cols)]
    std::vector<char> packed;    // per slot: holds tile `slot` of kv head `packed_head`
    int64_t packed_head = -1;
    float *cur_qs = nullptr, *cur_dob = nullptr, *cur_q_rows = nullptr, *cur_dout_rows = nullptr;
    float *cur_q_cols = nullptr, *cur_dout_cols = nullptr;  // [E | Ev, block_m / 2] (brgemm)
    std::vector<float> p_rows, ds_rows;  // [block_m / 2, n_pad]: P, dS as row pairs
    std::vector<float> dkt, dvt;    // [E, n_pad], [Ev, n_pad]: dK^T, dV^T (brgemm)
    bool keys_written = false;      // whether a product has written dkt and dvt for these keys

    explicit Backward(const Problem& pr)
        : Fma::Backward(pr), p_rows(on() ? pr.block_m / 2 * pr.n_pad : 0),
          ds_rows(p_rows.size()),
          dkt(brgemm() ? pr.p.head_dim * pr.n_pad : 0),
          dvt(brgemm() ? pr.p.v_head_dim * pr.n_pad : 0) {
      if (!on()) return;
      const int64_t half = pr.block_m / 2;
      slot_floats = pr.block_m * (pr.e_pad + pr.ev_pad) + half * (pr.e_pad + pr.ev_pad) +
                    (brgemm() ? half * (pr.p.head_dim + pr.p.v_head_dim) : 0);
      const int64_t tiles = pr.group * ceil_div(pr.p.q_len, pr.block_m);
      slots = tiles * slot_floats * static_cast<int64_t>(sizeof(float)) <= kMaxCachedQueryBytes
          ? tiles : 1;
      queries.resize(slots * slot_floats);
      packed.assign(slots, 0);
    }

    void pack_keys(const Problem& pr, const bf16* k, int64_t k_rs, const bf16* v, int64_t v_rs,
                   int64_t n) {
      if (!on()) return Fma::Backward::pack_keys(pr, k, k_rs, v, v_rs, n);
      pack_transposed_pairs(k, k_rs, n, pr.p.head_dim, pairs(kt.data()), pr.n_pad);
      pack_row_pairs(k, k_rs, n, pr.p.head_dim, pairs(kb.data()), pr.e_pad);
      pack_transposed_pairs(v, v_rs, n, pr.p.v_head_dim, pairs(vt.data()), pr.n_pad);
      keys_written = false;  // the first query tile's products write dkt and dvt, later ones add
    }
    // (Unlike pack_q, a single row is packed too: the products below read it.)
    void pack_queries(const Problem& pr, const bf16* q, int64_t q_rs, const bf16* dout,
                      int64_t dout_rs, int64_t m, int64_t head, int64_t tile) {
      if (!on()) return Fma::Backward::pack_queries(pr, q, q_rs, dout, dout_rs, m, head, tile);
      if (head != packed_head) {
        std::fill(packed.begin(), packed.end(), 0);
        packed_head = head;
      }
      const int64_t slot = slots == 1 ? 0 : tile;
      cur_qs = queries.data() + slot * slot_floats;
      const int64_t half = pr.block_m / 2;
      cur_dob = cur_qs + pr.block_m * pr.e_pad;
      cur_q_rows = cur_dob + pr.block_m * pr.ev_pad;
      cur_dout_rows = cur_q_rows + half * pr.e_pad;
      cur_q_cols = cur_dout_rows + half * pr.ev_pad;
      cur_dout_cols = cur_q_cols + pr.p.head_dim * half;
      if (slots > 1 && packed[slot]) return;
      packed[slot] = 1;
      pack_column_pairs(q, q_rs, m, pr.p.head_dim, pairs(cur_qs), pr.e_pad);
      pack_column_pairs(dout, dout_rs, m, pr.p.v_head_dim, pairs(cur_dob), pr.ev_pad);
      pack_row_pairs(q, q_rs, m, pr.p.head_dim, pairs(cur_q_rows), pr.e_pad);
      pack_row_pairs(dout, dout_rs, m, pr.p.v_head_dim, pairs(cur_dout_rows), pr.ev_pad);
      if (brgemm()) {
        // The row pairs transposed, pair for pair (32-bit words, moved unchanged).
        const int64_t m_pairs = ceil_div(m, 2);
        pack_transposed(cur_q_rows, pr.e_pad, m_pairs, pr.p.head_dim, cur_q_cols, half,
                        m_pairs);
        pack_transposed(cur_dout_rows, pr.ev_pad, m_pairs, pr.p.v_head_dim, cur_dout_cols, half,
                        m_pairs);
      }
    }
    const float* scores_queries() const { return on() ? cur_qs : qs.data(); }
    void dp(const Problem& pr, int64_t m, float* dp, int64_t diag) const {
      if (!on()) return Fma::Backward::dp(pr, m, dp, diag);
      if (brgemm()) {
        return cpu_brgemm::bf16_product(m, pr.n_pad, ceil_div(pr.p.v_head_dim, 2),
                                        pairs(cur_dob), pr.ev_pad, pairs(vt.data()), pr.n_pad,
                                        dp, pr.n_pad, false);
      }
      // The columns that dot leaves unwritten must read 0 (dS = P (dP - delta) with P = 0).
      if (diag < kAllVisible) std::fill(dp, dp + m * pr.n_pad, 0.f);
      dot<false>(m, pr.n_pad, ceil_div(pr.p.v_head_dim, 2), pairs(cur_dob), pr.ev_pad, 1,
                 pairs(vt.data()), pr.n_pad, dp, pr.n_pad, 1.f, diag);
    }
    static bool probs_from_scores() { return on(); }
    // As FmaProducts' grads, with P (from_scores), dS and their bf16 pairs computed in one pass
    // (pack_grad_pairs).
    void grads(const Problem& pr, int64_t m, int64_t n, const float* p_dv, const float* p,
               const ProbsFromScores<float>* from_scores, float* ds, const float* delta,
               float* dk, float* dv, float* dq, bool dq_add, int64_t diag) {
      if (!on()) {
        return Fma::Backward::grads(pr, m, n, p_dv, p, from_scores, ds, delta, dk, dv, dq,
                                    dq_add, diag);
      }
      pack_grad_pairs(p_dv, p, from_scores, ds, delta, m, pr.n_pad, pairs(p_rows.data()),
                      pairs(ds_rows.data()));
      const int64_t m_pairs = ceil_div(m, 2);
      if (brgemm()) {
        cpu_brgemm::bf16_product(pr.p.v_head_dim, pr.n_pad, m_pairs, pairs(cur_dout_cols),
                                 pr.block_m / 2, pairs(p_rows.data()), pr.n_pad, dvt.data(),
                                 pr.n_pad, keys_written);
        cpu_brgemm::bf16_product(pr.p.head_dim, pr.n_pad, m_pairs, pairs(cur_q_cols),
                                 pr.block_m / 2, pairs(ds_rows.data()), pr.n_pad, dkt.data(),
                                 pr.n_pad, keys_written);
        keys_written = true;
        return cpu_brgemm::bf16_product(m, pr.e_pad, ceil_div(n, 2), pairs(ds), pr.n_pad,
                                        pairs(kb.data()), pr.e_pad, dq, pr.e_pad, dq_add);
      }
      dot<true>(n, pr.ev_pad, m_pairs, pairs(p_rows.data()), 1, pr.n_pad,
                pairs(cur_dout_rows), pr.ev_pad, dv, pr.ev_pad, 1.f);
      dot<true>(n, pr.e_pad, m_pairs, pairs(ds_rows.data()), 1, pr.n_pad, pairs(cur_q_rows),
                pr.e_pad, dk, pr.e_pad, static_cast<float>(pr.p.scale));
      dot<true>(m, pr.e_pad, ceil_div(n, 2), pairs(ds), pr.n_pad, 1, pairs(kb.data()), pr.e_pad,
                dq, pr.e_pad, 1.f, kAllVisible, diag);
    }
    static bool adds_into_keys() { return !brgemm(); }
    static bool writes_dq() { return brgemm(); }
    // With brgemm, dk = scale * (dK^T)^T and dv = (dV^T)^T (zeros where no query tile saw the
    // keys); dot added into dk and dv directly.
    void finish_keys(const Problem& pr, int64_t n, float* dk, float* dv) const {
      if (!brgemm()) return;
      if (!keys_written) {
        std::fill(dk, dk + n * pr.e_pad, 0.f);
        std::fill(dv, dv + n * pr.ev_pad, 0.f);
        return;
      }
      pack_transposed(dkt.data(), pr.n_pad, pr.p.head_dim, n, dk, pr.e_pad, pr.p.head_dim);
      pack_transposed(dvt.data(), pr.n_pad, pr.p.v_head_dim, n, dv, pr.ev_pad, pr.p.v_head_dim);
      const float scale = static_cast<float>(pr.p.scale);
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t e = 0; e < pr.p.head_dim; ++e) dk[j * pr.e_pad + e] *= scale;
      }
    }
  };
};
#endif  // CPU_CAPABILITY_AVX512

template <typename scalar_t, typename acc_t, typename Products = FmaProducts<scalar_t, acc_t>>
struct Scores {
  // s[m, n_pad] = scores of rows [q0, q0+m) x keys [k0, k0+n) of head h of sequence sq, with
  // softcap, alibi, mask and visibility applied (-inf where invisible, and in padded columns).
  // qs [m, e_pad] holds scale * q; kt [E, n_pad] holds k^T, or is null for rows scored on the
  // unpacked k rows (row stride k_rs; Problem::rows_in_place).
  // When softcap is on, tanh_out receives tanh(raw / softcap) for the backward. The caller
  // reads the columns up to `width` (>= n): only those are set.
  static void compute(const Problem& pr, const Sequence& sq, int64_t h, int64_t q0, int64_t m,
                      int64_t k0, int64_t n, int64_t width, const acc_t* qs, const acc_t* kt,
                      const scalar_t* k_rows, int64_t k_rs, acc_t* s, acc_t* tanh_out) {
    const AttentionParams& p = pr.p;
    const int64_t ld = pr.n_pad;
    // qk writes the columns that a row may see; the others become -inf below. Only the softcap
    // reads them before (its tanh values of masked columns reach the backward's dS), so only
    // then are they zeroed first.
    if (p.softcap > 0) std::fill(s, s + m * ld, acc_t(0));
    if (kt != nullptr) {
      Products::qk(pr, m, n, qs, kt, s, pr.visible_diag(sq, q0, k0));
    } else {
      // A tile of a paged cache spans pages (key_tile_width): a page's rows at a time.
      const auto* k = static_cast<const scalar_t*>(p.k);
      pr.for_page_runs(k0, n, [&](int64_t c, int64_t run) {
        const scalar_t* rows = p.block_table == nullptr
            ? k_rows : pr.key_row(k, p.k_stride, sq, h / pr.group, k0 + c);
        Products::rows_qk(pr, m, qs, rows, k_rs, run, s + c);
      });
    }
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const bool full = pr.tile_full(sq, q0, m, k0, n);
    if (full && !pr.elementwise()) {
      if (n < width) {
        for (int64_t i = 0; i < m; ++i) std::fill(s + i * ld + n, s + i * ld + width, kNegInf);
      }
      return;
    }
    const acc_t softcap = static_cast<acc_t>(p.softcap);
    const acc_t slope = p.alibi_slopes
        ? static_cast<acc_t>(p.alibi_slopes[sq.b * p.alibi_batch_stride + h]) : acc_t(0);
    for (int64_t i = 0; i < m; ++i) {
      acc_t* row = s + i * ld;
      const int64_t qi = q0 + i;
      if (p.softcap > 0) {
        acc_t* t = tanh_out + i * ld;
        for (int64_t j = 0; j < n; ++j) {
          t[j] = std::tanh(row[j] / softcap);
          row[j] = softcap * t[j];
        }
      }
      if (p.alibi_slopes) {
        for (int64_t j = 0; j < n; ++j) {
          row[j] += slope * static_cast<acc_t>(k0 + j - qi - sq.offset);
        }
      }
      if (p.mask_kind != AttnMaskKind::None) {
        const int64_t* ms = p.mask_stride;
        const int64_t base = sq.b * ms[0] + h * ms[1] + qi * ms[2] + k0 * ms[3];
        if (p.mask_kind == AttnMaskKind::Bool) {
          const bool* mrow = static_cast<const bool*>(p.mask) + base;
          for (int64_t j = 0; j < n; ++j) {
            if (!mrow[j * ms[3]]) row[j] = kNegInf;
          }
        } else {
          const auto add = [&](const auto* mrow) {
            for (int64_t j = 0; j < n; ++j) row[j] += static_cast<acc_t>(mrow[j * ms[3]]);
          };
          if (p.mask_is_float32) {
            add(static_cast<const float*>(p.mask) + base);
          } else {
            add(static_cast<const scalar_t*>(p.mask) + base);
          }
        }
      }
      // Visible keys of row qi: [qi + offset - left, qi + offset + right], clipped to the tile.
      int64_t lo = 0, hi = n;
      if (p.window_left >= 0) lo = std::clamp(qi + sq.offset - p.window_left - k0, int64_t(0), n);
      if (p.window_right >= 0) {
        hi = std::clamp(qi + sq.offset + p.window_right + 1 - k0, int64_t(0), n);
      }
      hi = std::max(hi, lo);
      std::fill(row, row + lo, kNegInf);
      std::fill(row + hi, row + width, kNegInf);
    }
  }
};

// Multiplies p[m, n] by the dropout keep mask scaled by 1/(1 - dropout_p) of head h of
// sequence sq, rows [q0, q0+m), keys [k0, k0+n).
template <typename acc_t>
void apply_dropout(const Problem& pr, const Sequence& sq, int64_t h, int64_t q0, int64_t m,
                   int64_t k0, int64_t n, acc_t* prob, int64_t ld) {
  const AttentionParams& p = pr.p;
  const acc_t keep_scale = acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p));
  for (int64_t i = 0; i < m; ++i) {
    const uint64_t row = static_cast<uint64_t>(pr.row_index(sq, h, q0 + i) * p.kv_len + k0);
    acc_t* pr = prob + i * ld;
    for (int64_t j = 0; j < n; ++j) {
      pr[j] = philox_uniform(p.seed, row + j) >= p.dropout_p ? pr[j] * keep_scale : acc_t(0);
    }
  }
}

// max(a, b) that is NaN when either is (std::max(-inf, NaN) is -inf): a NaN score from q, k or v
// must make its row NaN, as in torch, not pass for a row with no visible key.
template <typename T>
T nan_max(T a, T b) {
  return std::isnan(a) || a > b ? a : b;
}

// out[i] = exp(old_max[i] - new_max[i]) for i < round_up(m, vector width) (the arrays hold
// that many): the online softmax's rescale factors of a tile's rows, one vector exp per vector
// of rows (a scalar exp per row and tile took ~4% of the fp32 forward's time on Zen 4).
template <typename T>
void rescale_factors(const T* old_max, const T* new_max, int64_t m, T* out) {
  using Vec = Vectorized<T>;
  for (int64_t i = 0; i < m; i += Vec::size()) {
    (Vec::loadu(old_max + i) - Vec::loadu(new_max + i)).exp().store(out + i);
  }
}

// Forward of rows [q0, q0+m) of head h of sequence sq over key tiles [kb_begin, kb_end): writes the
// normalized output rows to o [m, ev_pad] and their log-sum-exp to lse [m] (-inf: no key).
template <typename scalar_t, typename acc_t>
struct ForwardTile {
  using Products = TileProducts<scalar_t, acc_t>;
  std::vector<acc_t> qs, s, o;
  // row_sum: a vector of partial sums per row (kSumLanes), added up once the keys are done.
  static constexpr int64_t kSumLanes = Vectorized<acc_t>::size();
  std::vector<acc_t> row_max, row_sum, lse, new_max, rescale;
  // Packed key tiles of one kv head, kept while a thread's consecutive query tiles read the
  // same head (packing a tile costs about as much as a third of its products):
  // kt_all [n_kb][E][n_pad] = k^T, v_all [n_kb][block_n][ev_pad], in `cache` (see cpu_scratch.h);
  // packed[kb]: whether tile kb holds the current head. (Declared in initialization order.)
  std::vector<char> packed;
  ScratchBuffer<acc_t> cache;
  acc_t* kt_all;
  acc_t* v_all;
  int64_t packed_b = -1, packed_hk = -1;

  // The rows of the buffers: a tile's, at most q_len rounded up to whole vectors
  // (rescale_factors writes those). 64 rows zeroed ~100 KB per thread and call at L = 1.
  static int64_t rows(const Problem& pr) {
    return std::min(pr.block_m,
                    round_up(std::max<int64_t>(pr.p.q_len, 1), Vectorized<acc_t>::size()));
  }

  explicit ForwardTile(const Problem& pr)
      : qs(rows(pr) * pr.e_pad), s(rows(pr) * pr.n_pad), o(rows(pr) * pr.ev_pad),
        row_max(rows(pr)), row_sum(rows(pr) * kSumLanes), lse(rows(pr)), new_max(rows(pr)),
        rescale(rows(pr)),
        packed(pr.p.q_len > pr.in_place_rows ? ceil_div(pr.p.kv_len, pr.block_n) : 0, 0),
        // Calls of a few query rows (decode) never pack, so they request no cache.
        cache(static_cast<int64_t>(packed.size()) *
              (pr.p.head_dim * pr.n_pad + pr.block_n * pr.ev_pad)),
        kt_all(cache.data()),
        v_all(cache.data() + static_cast<int64_t>(packed.size()) * pr.p.head_dim * pr.n_pad) {}

  void run(const Problem& pr, const Sequence& sq, int64_t h, int64_t q0, int64_t m,
           int64_t kb_begin, int64_t kb_end) {
    const AttentionParams& p = pr.p;
    const int64_t hk = h / pr.group;
    const int64_t ld = pr.n_pad, ldo = pr.ev_pad;
    const auto* k = static_cast<const scalar_t*>(p.k);
    const auto* v = static_cast<const scalar_t*>(p.v);
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

    Products::pack_q(pr, pr.q_side_row(static_cast<const scalar_t*>(p.q), p.q_stride, sq, h, q0),
                     p.q_stride[2], m, qs.data());
    std::fill(o.begin(), o.begin() + m * ldo, acc_t(0));
    std::fill(row_max.begin(), row_max.end(), kNegInf);
    std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
    if (sq.b != packed_b || hk != packed_hk) {
      std::fill(packed.begin(), packed.end(), 0);
      packed_b = sq.b;
      packed_hk = hk;
    }

    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      const int64_t k0 = kb * pr.block_n, n = std::min(pr.block_n, sq.kv_len - k0);
      if (!pr.tile_visible(sq, q0, m, k0, n)) continue;
      const scalar_t* k_tile = pr.key_row(k, p.k_stride, sq, hk, k0);
      const scalar_t* v_tile = pr.key_row(v, p.v_stride, sq, hk, k0);
      // A few rows read k and v in place: packing would cost more than the products.
      const bool in_place = pr.rows_in_place(sq, m);
      acc_t* kt = kt_all + kb * p.head_dim * ld;  // [E, n_pad]
      acc_t* vb = v_all + kb * pr.block_n * ldo;  // [block_n, ev_pad]
      if (!in_place && !packed[kb]) {
        Products::pack_kv(pr, k_tile, p.k_stride[2], v_tile, p.v_stride[2], n, kt, vb);
        packed[kb] = 1;
      }
      // The softmax reads the columns of the tile's n keys (rounded up to whole vectors; the
      // rest is -inf, and pv reads no further than n).
      const int64_t cols = round_up(n, Vectorized<acc_t>::size());
      // s [m, n_pad]: scores of the tile, becoming exp(s - running max); with softcap the
      // tanh values are not needed here, so they go to s itself.
      Scores<scalar_t, acc_t, Products>::compute(pr, sq, h, q0, m, k0, n, cols, qs.data(),
                                                 in_place ? nullptr : kt, k_tile, p.k_stride[2],
                                                 s.data(), s.data());
      // Row i's scores past its diagonal (whole vectors of them) are -inf: the max and the
      // exp skip those and write their probabilities as the zeros exp would give. On a causal
      // diagonal tile that halves the softmax's work, most of a short sequence's tiles.
      const int64_t diag = pr.visible_diag(sq, q0, k0);
      const auto row_cols = [&](int64_t i) {
        return visible_extent(i, 1, diag, cols, Vectorized<acc_t>::size());
      };
      // The scores' maxima and exps take the scale that qk left to them (score_scale > 0; rows
      // scored in place are scaled: the single-row products apply it).
      const acc_t scale = in_place ? acc_t(1) : Products::score_scale(pr);
      for (int64_t i = 0; i < m; ++i) {
        new_max[i] = nan_max(row_max[i], scale * scores_max(s.data() + i * ld, row_cols(i)));
      }
      rescale_factors(row_max.data(), new_max.data(), m, rescale.data());
      // fp32 probabilities where something else reads them first: rows_pv, and
      // dropout, which scales them before pv's layout (bf16 pairs) rounds them.
      const bool fp32_probs = in_place || p.dropout_p > 0;
      for (int64_t i = 0; i < m; ++i) {
        acc_t* row = s.data() + i * ld;
        const bool seen = new_max[i] != kNegInf;  // -inf: nothing seen yet
        const int64_t width = seen ? row_cols(i) : 0;
        using Fma = FmaProducts<scalar_t, acc_t>;
        const Vectorized<acc_t> sum = fp32_probs
            ? Fma::exp_probs(row, width, cols, scale, new_max[i])
            : Products::exp_probs(row, width, cols, scale, new_max[i]);
        if (!seen) continue;
        acc_t* partial = row_sum.data() + i * kSumLanes;
        at::vec::fmadd(Vectorized<acc_t>::loadu(partial), Vectorized<acc_t>(rescale[i]), sum)
            .store(partial);
        if (rescale[i] != acc_t(1)) vec_scale(o.data() + i * ldo, ldo, rescale[i]);
        row_max[i] = new_max[i];
      }
      if (p.dropout_p > 0) apply_dropout(pr, sq, h, q0, m, k0, n, s.data(), ld);
      if (in_place) {
        pr.for_page_runs(k0, n, [&](int64_t c, int64_t run) {
          Products::rows_pv(pr, m, s.data() + c, pr.key_row(v, p.v_stride, sq, hk, k0 + c),
                            p.v_stride[2], run, o.data());
        });
      } else {
        if (fp32_probs) Products::layout_probs(pr, m, s.data());
        Products::pv(pr, m, n, s.data(), vb, o.data(), diag);
      }
    }
    // The sum is 0 only for a row that saw no key (its largest score adds exp(0) = 1); a NaN
    // sum (a NaN score) makes the row and its lse NaN.
    for (int64_t i = 0; i < m; ++i) {
      const acc_t sum = at::vec::vec_reduce_all<acc_t>(
          [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; },
          Vectorized<acc_t>::loadu(row_sum.data() + i * kSumLanes));
      if (sum == acc_t(0)) {
        std::fill(o.data() + i * ldo, o.data() + (i + 1) * ldo, acc_t(0));
        lse[i] = kNegInf;
      } else {
        vec_scale(o.data() + i * ldo, ldo, acc_t(1) / sum);
        lse[i] = row_max[i] + std::log(sum);
      }
    }
    Products::release();
  }
};

// Query tile t of n_tiles in an order where neighbours pair a cheap tile with an expensive
// one (under a causal window cost grows with the tile index), so that the contiguous runs of
// tiles that the threads start with cost about the same.
inline int64_t balanced_tile(int64_t t, int64_t n_tiles) {
  return (t % 2 == 0) ? t / 2 : n_tiles - 1 - t / 2;
}

// Runs fn(state, unit) for units 0 .. n - 1 on `threads` threads that take the next unit from a
// shared counter, each thread with its own state = make_state(). Varlen sequences differ in
// cost by orders of magnitude: the contiguous chunks of at::parallel_for would leave threads
// idle while one works through the long sequences.
template <typename MakeState, typename Fn>
void parallel_dynamic(int64_t threads, int64_t n, MakeState&& make_state, Fn&& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t unit = next++; unit < n; unit = next++) fn(state, unit);
  });
}

// Runs fn(state, unit) for units 0 .. n - 1 on `threads` threads, each thread with its own
// state = make_state(): a thread works through its own contiguous run of units first (the chunk
// at::parallel_for hands it: neighbouring units share the operands a state keeps packed, a
// head's key tiles), then takes units one at a time from the back of the run with the most left.
// Units of equal cost still finish unevenly on a shared machine (a thread that starts late, a
// core that a neighbour slows): with static chunks the others wait for it at the end of the call.
template <typename MakeState, typename Fn>
void parallel_stealing(int64_t threads, int64_t n, MakeState&& make_state, Fn&& fn) {
  // A run's units [front, back) in one word, so that its owner (front) and a thief (back) claim
  // a unit each with a compare-and-swap that sees both ends.
  struct alignas(64) Run {
    std::atomic<uint64_t> span;
  };
  constexpr uint64_t kLow = 0xffffffffu;
  if (threads <= 1 || n > static_cast<int64_t>(kLow)) {
    return parallel_dynamic(threads, n, make_state, fn);
  }
  std::vector<Run> runs(threads);
  for (int64_t t = 0; t < threads; ++t) {
    runs[t].span = static_cast<uint64_t>(t * n / threads) << 32 |
                   static_cast<uint64_t>((t + 1) * n / threads);
  }
  // The unit claimed from run r's front (or back), -1 when the run is empty.
  const auto claim = [&](int64_t r, bool from_back) -> int64_t {
    uint64_t span = runs[r].span.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = span >> 32, back = span & kLow;
      if (front >= back) return -1;
      const uint64_t next = from_back ? (front << 32 | (back - 1)) : ((front + 1) << 32 | back);
      if (runs[r].span.compare_exchange_weak(span, next, std::memory_order_relaxed)) {
        return static_cast<int64_t>(from_back ? back - 1 : front);
      }
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t own_begin, int64_t own_end) {
    auto state = make_state();
    for (int64_t r = own_begin; r < own_end; ++r) {
      for (int64_t unit = claim(r, false); unit >= 0; unit = claim(r, false)) fn(state, unit);
    }
    for (;;) {
      int64_t victim = -1;
      uint64_t most = 0;
      for (int64_t r = 0; r < threads; ++r) {
        const uint64_t span = runs[r].span.load(std::memory_order_relaxed);
        const uint64_t left = (span & kLow) - (span >> 32);  // front <= back always
        if (left > most) {
          most = left;
          victim = r;
        }
      }
      if (victim < 0) return;
      const int64_t unit = claim(victim, true);
      if (unit >= 0) fn(state, unit);
    }
  });
}

// The sequences by decreasing cost (q_len * kv_len): dynamic scheduling starts the long ones
// first, so that no long one is left for the end.
std::vector<int64_t> sequences_by_cost(const Problem& pr) {
  std::vector<int64_t> order(pr.p.batch), cost(pr.p.batch);
  for (int64_t b = 0; b < pr.p.batch; ++b) {
    const Sequence sq = pr.sequence(b);
    cost[b] = sq.q_len * std::max<int64_t>(sq.kv_len, 1);
  }
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// The bytes of a core's L2 cache (512 KiB where the system does not say: glibc's sysconf says,
// other C libraries may not define the name).
int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long reported = 0;
#endif
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t{512} << 10;
  }();
  return bytes;
}

// A tensor that a varlen pass reads (q, k, v, dO): per sequence its query rows (query_rows) or
// its key rows, `heads` heads of `width` elements each; element (row r, head h) at
// base + h * stride[1] + r * stride[2].
struct VarlenRows {
  const void* base;
  const int64_t* stride;
  bool query_rows;
  int64_t heads, width;

  int64_t first_row(const Sequence& sq) const { return query_rows ? sq.q_begin : sq.k_begin; }
  int64_t rows(const Sequence& sq) const { return query_rows ? sq.q_len : sq.kv_len; }
};

// Reads one byte of every cache line of sequence sq's rows of t, in address order. A varlen pass
// reads a head's rows a token apart (2 KiB at H 8, E 64, fp32, for 256 bytes of the head), a
// stride the hardware prefetchers do not follow: head by head, the forward's packing of issue
// 16's many short sequences stalled on memory for about a third of its time (Zen 4, one
// thread). Read in address order first, the same rows stream in at several times the rate (a
// cold 38 MB tensor: 1.5 ms in order, 4.3 ms head by head) and stay in L2 for the heads that
// follow.
template <typename T>
void warm_rows(const VarlenRows& t, const Sequence& sq) {
  constexpr int64_t kLine = 64;
  const auto* first = static_cast<const T*>(t.base) + t.first_row(sq) * t.stride[2];
  const int64_t row_bytes = t.width * static_cast<int64_t>(sizeof(T));
  const bool heads_inner = std::abs(t.stride[2]) >= std::abs(t.stride[1]);
  const int64_t outer = heads_inner ? t.rows(sq) : t.heads;
  const int64_t inner = heads_inner ? t.heads : t.rows(sq);
  const int64_t outer_stride = heads_inner ? t.stride[2] : t.stride[1];
  const int64_t inner_stride = heads_inner ? t.stride[1] : t.stride[2];
  unsigned char seen = 0;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < inner; ++i) {
      const auto* row =
          reinterpret_cast<const unsigned char*>(first + o * outer_stride + i * inner_stride);
      for (int64_t byte = 0; byte < row_bytes; byte += kLine) seen |= row[byte];
    }
  }
  asm volatile("" : : "r"(seen));  // the loads are the point: keep them
}

// A unit of a varlen pass's dynamic schedule: heads [h_begin, h_end) of sequence b (query heads
// in the forward, kv heads in the backward); warm: read the sequence's rows first (warm_rows).
struct VarlenUnit {
  int64_t b, h_begin, h_end;
  bool warm;
};

// The units of a varlen pass over `heads` heads per sequence that reads the tensors `read`,
// longest sequences first (sequences_by_cost). A unit is a whole head, so that its tiles share
// the thread's packed operands; a sequence whose rows of every tensor read fit in L2 is one unit
// of all its heads, warmed first. (Longer ones would only evict their own rows before the heads
// read them.)
template <typename T>
std::vector<VarlenUnit> varlen_units(const Problem& pr, int64_t heads,
                                     const std::vector<VarlenRows>& read) {
  std::vector<VarlenUnit> units;
  units.reserve(pr.p.batch);  // one per sequence that fits; a longer one adds its heads
  for (const int64_t b : sequences_by_cost(pr)) {
    const Sequence sq = pr.sequence(b);
    int64_t bytes = 0;
    for (const VarlenRows& t : read) {
      bytes += t.rows(sq) * t.heads * t.width * static_cast<int64_t>(sizeof(T));
    }
    if (bytes <= l2_cache_bytes()) {
      units.push_back({b, 0, heads, true});
    } else {
      for (int64_t h = 0; h < heads; ++h) units.push_back({b, h, h + 1, false});
    }
  }
  return units;
}

// Keys per tile of a pass whose tiles hold at most max_width keys: max_width, or fewer when every
// sequence has fewer keys: the keys rounded up to whole register pairs, so that the products and
// the softmax of a short sequence skip the padding (at L = S = 16 they computed 64 columns for
// 16 keys). Paged with more than in_place_rows query rows: the largest divisor of the page size
// up to max_width, so that the keys of a tile, which the products pack, are rows of one page, read
// with the page's row stride. Fewer query rows (decode) read their keys in place a page's run at
// a time (Problem::for_page_runs): their tiles span pages, so that the per-tile softmax runs once
// per 64 or 128 keys, not per page (16-row pages: a decode step 15-17% faster on the Zen 5).
template <typename acc_t>
int64_t key_tile_width(const AttentionParams& p, int64_t max_width, int64_t in_place_rows) {
  if (p.block_table == nullptr || p.q_len <= in_place_rows) {
    return std::min(max_width, round_up(std::max<int64_t>(p.kv_len, 1), pad_cols<acc_t>()));
  }
  int64_t width = std::min(max_width, p.block_size);
  while (p.block_size % width != 0) --width;
  return width;
}

template <typename acc_t, typename Products>
Problem make_problem(const AttentionParams& p, int64_t max_block_n) {
  const int64_t block_n = key_tile_width<acc_t>(p, max_block_n, Products::in_place_rows());
  return Problem{p,
                 p.q_heads / p.kv_heads,
                 Products::block_m(),
                 block_n,
                 round_up(p.head_dim, pad_cols<acc_t>()),
                 round_up(p.v_head_dim, pad_cols<acc_t>()),
                 round_up(block_n, pad_cols<acc_t>()),
                 Products::in_place_rows()};
}

template <typename scalar_t>
void attention_fwd_typed(const AttentionParams& p) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Problem pr =
      make_problem<acc_t, TileProducts<scalar_t, acc_t>>(
          p, TileProducts<scalar_t, acc_t>::forward_block_n());
  // Items past the end of a shorter sequence (varlen: q_len is the longest) return at once.
  const int64_t n_qb = pr.query_tiles(), n_kb = ceil_div(p.kv_len, pr.block_n);
  const int64_t heads = p.batch * p.q_heads, items = heads * n_qb;
  if (items == 0) return;
  auto* out = static_cast<scalar_t*>(p.out);
  const int64_t Ev = p.v_head_dim;

  // Fewer query tiles than twice the threads (decode: L = 1..few) would leave threads idle or
  // unevenly loaded: the keys of each tile are split too, into as many parts as make the units
  // divide evenly over the threads, and the parts merged by LSE (the layouts with a contiguous
  // [B, Hq, L, Ev] out: dense and KV cache; varlen has many items). Tiles that already divide
  // evenly (e.g. 2 heads on 2 threads) run whole, one per thread, with no merge.
  const double flops = 2.0 * heads * p.q_len * p.kv_len * (p.head_dim + Ev);
  const int64_t pool = at::get_num_threads();
  const int64_t even_splits = pr.varlen() || items >= 2 * pool
      ? 1 : std::clamp<int64_t>(pool / std::gcd(items, pool), 1, std::max<int64_t>(n_kb, 1));
  const int64_t threads =
      flops < (even_splits > 1 ? kSplitParallelFlops : kParallelFlops) ? 1 : pool;
  const int64_t splits = threads == 1 ? 1 : even_splits;

  if (splits == 1) {
    // Query tile qb of head h of sequence b (nothing past the sequence's end).
    auto run_tile = [&](ForwardTile<scalar_t, acc_t>& tile, int64_t b, int64_t h, int64_t qb) {
      const Sequence sq = pr.sequence(b);
      const int64_t q0 = qb * pr.block_m, m = std::min(pr.block_m, sq.q_len - q0);
      if (m <= 0) return;
      tile.run(pr, sq, h, q0, m, 0, ceil_div(sq.kv_len, pr.block_n));
      for (int64_t i = 0; i < m; ++i) {
        p.lse[pr.row_index(sq, h, q0 + i)] = static_cast<float>(tile.lse[i]);
        scalar_t* dst = pr.q_side_row(out, p.out_stride, sq, h, q0 + i);
        store_row(tile.o.data() + i * pr.ev_pad, Ev, dst);
      }
    };
    auto make_tile = [&] { return ForwardTile<scalar_t, acc_t>(pr); };
    if (pr.varlen()) {
      const std::vector<VarlenRows> read = {{p.q, p.q_stride, true, p.q_heads, p.head_dim},
                                            {p.k, p.k_stride, false, p.kv_heads, p.head_dim},
                                            {p.v, p.v_stride, false, p.kv_heads, Ev}};
      const std::vector<VarlenUnit> units = varlen_units<scalar_t>(pr, p.q_heads, read);
      parallel_dynamic(threads, static_cast<int64_t>(units.size()), make_tile,
                       [&](auto& tile, int64_t u) {
        const VarlenUnit& unit = units[u];
        if (unit.warm) {
          const Sequence sq = pr.sequence(unit.b);
          for (const VarlenRows& t : read) warm_rows<scalar_t>(t, sq);
        }
        for (int64_t h = unit.h_begin; h < unit.h_end; ++h) {
          for (int64_t qb = 0; qb < n_qb; ++qb) run_tile(tile, unit.b, h, qb);
        }
      });
      return;
    }
    parallel_stealing(threads, items, make_tile, [&](auto& tile, int64_t it) {
      const int64_t bh = it / n_qb;
      run_tile(tile, bh / p.q_heads, bh % p.q_heads, balanced_tile(it % n_qb, n_qb));
    });
    return;
  }

  // part_o [splits, B*Hq*L, Ev], part_lse [splits, B*Hq*L]
  const int64_t rows = heads * p.q_len;
  std::vector<acc_t> part_o(splits * rows * Ev);
  std::vector<acc_t> part_lse(splits * rows);
  at::parallel_for(0, items * splits, 1, [&](int64_t begin, int64_t end) {
    ForwardTile<scalar_t, acc_t> tile(pr);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t split = it % splits, bh = it / splits / n_qb, qb = it / splits % n_qb;
      const int64_t h = bh % p.q_heads;
      const Sequence sq = pr.sequence(bh / p.q_heads);
      const int64_t q0 = qb * pr.block_m, m = std::min(pr.block_m, p.q_len - q0);
      const int64_t row0 = bh * p.q_len + q0;
      const int64_t seq_kb = ceil_div(sq.kv_len, pr.block_n);
      tile.run(pr, sq, h, q0, m, split * seq_kb / splits, (split + 1) * seq_kb / splits);
      for (int64_t i = 0; i < m; ++i) {
        part_lse[split * rows + row0 + i] = tile.lse[i];
        std::copy(tile.o.data() + i * pr.ev_pad, tile.o.data() + i * pr.ev_pad + Ev,
                  part_o.data() + (split * rows + row0 + i) * Ev);
      }
    }
  });
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(Ev);
    for (int64_t r = begin; r < end; ++r) {
      constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
      acc_t lse_max = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) lse_max = nan_max(lse_max, part_lse[sp * rows + r]);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t lse = kNegInf;
      if (lse_max != kNegInf) {
        acc_t total = 0;
        for (int64_t sp = 0; sp < splits; ++sp) {
          const acc_t w = std::exp(part_lse[sp * rows + r] - lse_max);
          total += w;
          const acc_t* src = part_o.data() + (sp * rows + r) * Ev;
          for (int64_t e = 0; e < Ev; ++e) acc[e] += w * src[e];
        }
        for (int64_t e = 0; e < Ev; ++e) acc[e] /= total;
        lse = lse_max + std::log(total);
      }
      p.lse[r] = static_cast<float>(lse);
      store_row(acc.data(), Ev, out + r * Ev);
    }
  });
}

// Backward of one key tile of kv head hk of sequence sq against every visible query tile of
// the query heads sharing it: dk/dv rows of the tile are complete afterwards; dq contributions
// are added into dq_acc [group, L, e_pad] (unscaled by softmax scale). With dq_seen (a flag per
// query tile of the head, [group, ceil(L / block_m)], only where the products' writes_dq()), the
// first key tile that a query tile meets writes its dq rows instead, and sets its flag: dq_acc
// needs no zeros.
template <typename scalar_t, typename acc_t>
struct BackwardTile {
  using Products = TileProducts<scalar_t, acc_t>;
  typename Products::Backward operands;
  std::vector<acc_t> s, t, dp, pz, dk, dv, d_rows, shifts;
  std::vector<int64_t> widths;  // shifts and widths: P's ProbsFromScores

  explicit BackwardTile(const Problem& pr)
      : operands(pr), s(pr.block_m * pr.n_pad),
        t(pr.p.softcap > 0 ? pr.block_m * pr.n_pad : 0), dp(pr.block_m * pr.n_pad),
        pz(pr.p.dropout_p > 0 ? pr.block_m * pr.n_pad : 0), dk(pr.block_n * pr.e_pad),
        dv(pr.block_n * pr.ev_pad), d_rows(pr.block_m), shifts(pr.block_m),
        widths(pr.block_m) {}

  void run(const Problem& pr, const AttentionBwdParams& bp, const acc_t* lse_rows,
           const acc_t* delta, const Sequence& sq, int64_t hk, int64_t kblock, acc_t* dq_acc,
           char* dq_seen) {
    const AttentionParams& p = pr.p;
    const int64_t ld = pr.n_pad, E = p.head_dim, Ev = p.v_head_dim;
    const int64_t k0 = kblock * pr.block_n, n = std::min(pr.block_n, sq.kv_len - k0);
    const auto* k = pr.key_row(static_cast<const scalar_t*>(p.k), p.k_stride, sq, hk, k0);
    const auto* v = pr.key_row(static_cast<const scalar_t*>(p.v), p.v_stride, sq, hk, k0);
    operands.pack_keys(pr, k, p.k_stride[2], v, p.v_stride[2], n);
    if (operands.adds_into_keys()) {
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
    }
    const int64_t n_qb = ceil_div(sq.q_len, pr.block_m);

    for (int64_t g = 0; g < pr.group; ++g) {
      const int64_t h = hk * pr.group + g;
      const auto* q = pr.q_side_row(static_cast<const scalar_t*>(p.q), p.q_stride, sq, h, 0);
      const auto* dout =
          pr.q_side_row(static_cast<const scalar_t*>(bp.grad_out), bp.grad_out_stride, sq, h, 0);
      for (int64_t qb = 0; qb < n_qb; ++qb) {
        const int64_t q0 = qb * pr.block_m, m = std::min(pr.block_m, sq.q_len - q0);
        if (!pr.tile_visible(sq, q0, m, k0, n)) continue;
        operands.pack_queries(pr, q + q0 * p.q_stride[2], p.q_stride[2],
                              dout + q0 * bp.grad_out_stride[2], bp.grad_out_stride[2], m,
                              sq.b * p.kv_heads + hk, g * n_qb + qb);
        // The forward's score products on the forward's packing, in-place rows' on the key
        // rows in place as the forward's (sums in another order than qk's): P is the
        // forward's bit for bit. With qk's scores for such rows, P = exp(s - lse) was off by the
        // rounding of s, which a large logit makes large against a probability near 1 (fp32
        // dQ, dK and dV of a one-row query at scale 1.7, E 96: up to 20x torch's error).
        const bool in_place = pr.rows_in_place(sq, m);
        Scores<scalar_t, acc_t, Products>::compute(pr, sq, h, q0, m, k0, n, ld,
                                                   operands.scores_queries(),
                                                   in_place ? nullptr : operands.kt.data(),
                                                   k, p.k_stride[2], s.data(), t.data());
        // P = exp(s - lse); a row with no visible key (lse = -inf) gets P = 0, a row that saw
        // a NaN score (lse = NaN) gets NaN (float's exp_u20 does not keep NaN). As in the
        // forward, the exp skips the whole vectors of -inf scores past a row's diagonal and
        // writes their zeros. s becomes P here, unless grads computes P in its own pass.
        const int64_t diag = pr.visible_diag(sq, q0, k0);
        const acc_t scale = in_place ? acc_t(1) : Products::score_scale(pr);
        // dS, the gradient of the final scores, is computed before grads where the mask's
        // gradient reads it or softcap changes it; else by grads, in its pass over P and dP.
        const bool ds_first = bp.dmask != nullptr || p.softcap > 0;
        const bool exp_in_grads =
            operands.probs_from_scores() && p.dropout_p == 0 && !ds_first;
        for (int64_t i = 0; i < m; ++i) {
          const acc_t lse = lse_rows[pr.row_index(sq, h, q0 + i)];
          acc_t* row = s.data() + i * ld;
          const bool nan = std::isnan(lse);
          const acc_t shift = lse == -std::numeric_limits<acc_t>::infinity()
              ? std::numeric_limits<acc_t>::infinity() : lse;
          const int64_t width =
              nan ? ld : visible_extent(i, 1, diag, ld, Vectorized<acc_t>::size());
          if (exp_in_grads) {
            shifts[i] = shift;
            widths[i] = width;
          } else if (nan) {
            std::fill(row, row + ld, lse);
          } else {  // fp32 P, whatever the products' layout: dS and dropout read it first.
            FmaProducts<scalar_t, acc_t>::exp_probs(row, width, ld, scale, shift);
          }
        }
        operands.dp(pr, m, dp.data(), diag);
        const acc_t* p_used = s.data();  // the probabilities that multiplied V
        if (p.dropout_p > 0) {
          std::copy(s.begin(), s.begin() + m * ld, pz.begin());
          apply_dropout(pr, sq, h, q0, m, k0, n, pz.data(), ld);
          apply_dropout(pr, sq, h, q0, m, k0, n, dp.data(), ld);
          p_used = pz.data();
        }
        for (int64_t i = 0; i < m; ++i) d_rows[i] = delta[pr.row_index(sq, h, q0 + i)];
        if (ds_first) {
          score_grads(s.data(), dp.data(), d_rows.data(), m, ld);
          if (bp.dmask) {
            for (int64_t i = 0; i < m; ++i) {
              acc_t* dst =
                  static_cast<acc_t*>(bp.dmask) + pr.row_index(sq, h, q0 + i) * p.kv_len + k0;
              std::copy(dp.data() + i * ld, dp.data() + i * ld + n, dst);
            }
          }
          if (p.softcap > 0) {  // d raw = d capped * (1 - tanh^2)
            for (int64_t i = 0; i < m * ld; ++i) dp[i] *= acc_t(1) - t[i] * t[i];
          }
        }
        // With dropout, dv takes (P o Z)^T dO.
        const ProbsFromScores<acc_t> from_scores{shifts.data(), widths.data(), scale};
        char* seen = dq_seen == nullptr ? nullptr : dq_seen + g * pr.query_tiles() + qb;
        operands.grads(pr, m, n, p_used, s.data(), exp_in_grads ? &from_scores : nullptr,
                       dp.data(), ds_first ? nullptr : d_rows.data(), dk.data(), dv.data(),
                       dq_acc + (g * p.q_len + q0) * pr.e_pad, seen == nullptr || *seen, diag);
        if (seen != nullptr) *seen = 1;
      }
    }
    operands.finish_keys(pr, n, dk.data(), dv.data());
    Products::release();
    auto* dk_out = pr.key_row(static_cast<scalar_t*>(bp.dk), bp.dk_stride, sq, hk, k0);
    auto* dv_out = pr.key_row(static_cast<scalar_t*>(bp.dv), bp.dv_stride, sq, hk, k0);
    for (int64_t j = 0; j < n; ++j) {
      store_row(dk.data() + j * pr.e_pad, E, dk_out + j * bp.dk_stride[2]);
      store_row(dv.data() + j * pr.ev_pad, Ev, dv_out + j * bp.dv_stride[2]);
    }
  }
};

template <typename scalar_t>
void attention_bwd_typed(const AttentionBwdParams& bp) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const AttentionParams& p = bp;
  using Products = TileProducts<scalar_t, acc_t>;
  const Problem pr =
      make_problem<acc_t, Products>(p, Products::backward_block_n());
  const int64_t E = p.head_dim, Ev = p.v_head_dim, L = p.q_len;
  // The query rows' row indices are 0 .. rows - 1 (attention_params.h); dq/dk/dv are
  // contiguous, so their sizes follow from the row counts.
  const int64_t rows = p.q_heads * (pr.varlen() ? p.cu_seqlens_q[p.batch] : p.batch * L);
  const int64_t kv_rows = p.kv_heads * (pr.varlen() ? p.cu_seqlens_k[p.batch] : p.batch * p.kv_len);
  auto* dq = static_cast<scalar_t*>(bp.dq);
  if (p.kv_len == 0 || rows == 0) {  // no key or no query: every gradient is zero
    std::fill(dq, dq + rows * E, scalar_t(0));
    auto* dk = static_cast<scalar_t*>(bp.dk);
    auto* dv = static_cast<scalar_t*>(bp.dv);
    std::fill(dk, dk + kv_rows * E, scalar_t(0));
    std::fill(dv, dv + kv_rows * Ev, scalar_t(0));
    return;
  }
  // Query tiles: item it is tile it % n_qb of head it / n_qb (past a sequence's end: none).
  const int64_t n_qb = pr.query_tiles(), q_items = p.batch * p.q_heads * n_qb;
  auto q_tile = [&](int64_t it, Sequence& sq, int64_t& h, int64_t& q0) {
    const int64_t bh = it / n_qb;
    h = bh % p.q_heads;
    sq = pr.sequence(bh / p.q_heads);
    q0 = it % n_qb * pr.block_m;
    return std::min(pr.block_m, sq.q_len - q0);
  };

  // lse by row index: the forward's float32 LSE would cap float64 gradients at float32
  // accuracy, so float64 recomputes it (float64 serves gradcheck, not speed).
  std::vector<acc_t> lse(p.lse, p.lse + rows);
  if constexpr (std::is_same_v<scalar_t, double>) {
    at::parallel_for(0, q_items, 1, [&](int64_t begin, int64_t end) {
      ForwardTile<scalar_t, acc_t> tile(pr);
      for (int64_t it = begin; it < end; ++it) {
        Sequence sq;
        int64_t h, q0;
        const int64_t m = q_tile(it, sq, h, q0);
        if (m <= 0) continue;
        tile.run(pr, sq, h, q0, m, 0, ceil_div(sq.kv_len, pr.block_n));
        for (int64_t i = 0; i < m; ++i) lse[pr.row_index(sq, h, q0 + i)] = tile.lse[i];
      }
    });
  }

  // delta by row index = rowsum(dO o O). Varlen reads out and grad_out [total_q, Hq, Ev] in
  // memory order, token by token: head by head, a head's rows lie a token apart, a stride the
  // hardware prefetchers did not follow (issue 16's case, 1 thread: fwd+bwd 167 -> 158 ms).
  std::vector<acc_t> delta(rows);
  // A vector of partial sums at a time: one element at a time (a bf16 conversion each) took
  // ~3% of the bf16 backward at L = S = 512 (Xeon with AMX).
  auto row_delta = [&](const scalar_t* o, const scalar_t* d) {
    using Vec = Vectorized<acc_t>;
    Vec sum(acc_t(0));
    for (int64_t e = 0; e < Ev; e += Vec::size()) {
      const int64_t lanes = std::min<int64_t>(Vec::size(), Ev - e);
      sum = at::vec::fmadd(load_n<acc_t>(o + e, lanes), load_n<acc_t>(d + e, lanes), sum);
    }
    return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum);
  };
  if (pr.varlen()) {
    const int64_t total = p.cu_seqlens_q[p.batch];
    const auto* o = static_cast<const scalar_t*>(p.out);
    const auto* d = static_cast<const scalar_t*>(bp.grad_out);
    at::parallel_for(0, total, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < p.q_heads; ++h) {
          delta[h * total + t] =
              row_delta(o + h * p.out_stride[1] + t * p.out_stride[2],
                        d + h * bp.grad_out_stride[1] + t * bp.grad_out_stride[2]);
        }
      }
    });
  } else {
    at::parallel_for(0, q_items, 16, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        Sequence sq;
        int64_t h, q0;
        const int64_t m = q_tile(it, sq, h, q0);
        for (int64_t i = 0; i < m; ++i) {
          const auto* o =
              pr.q_side_row(static_cast<const scalar_t*>(p.out), p.out_stride, sq, h, q0 + i);
          const auto* d = pr.q_side_row(static_cast<const scalar_t*>(bp.grad_out),
                                        bp.grad_out_stride, sq, h, q0 + i);
          delta[pr.row_index(sq, h, q0 + i)] = row_delta(o, d);
        }
      }
    });
  }

  const int64_t n_kb = ceil_div(p.kv_len, pr.block_n);
  const int64_t kv_heads = p.batch * p.kv_heads;
  const int64_t group_rows = pr.group * L;  // dq rows of one kv head
  const double flops = 4.0 * rows * p.kv_len * (E + Ev);
  const int64_t threads = flops < kParallelFlops ? 1 : at::get_num_threads();
  const acc_t scale = static_cast<acc_t>(p.scale);
  // Writes dq rows [r_begin, r_end) of kv head hk of sequence sq from the accumulator
  // acc [group, L, e_pad] (summed over n_acc copies spaced acc_stride apart); with dq_seen
  // (BackwardTile's flags), zeros for the rows of query tiles that no key tile wrote.
  auto write_dq = [&](const Sequence& sq, int64_t hk, const acc_t* acc, int64_t n_acc,
                      int64_t acc_stride, int64_t r_begin, int64_t r_end, const char* dq_seen) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t g = r / L, i = r % L;
      if (i >= sq.q_len) continue;
      scalar_t* dst = pr.q_side_row(dq, bp.dq_stride, sq, hk * pr.group + g, i);
      if (dq_seen != nullptr && !dq_seen[g * n_qb + i / pr.block_m]) {
        std::fill(dst, dst + E, scalar_t(0));
        continue;
      }
      for (int64_t e = 0; e < E; ++e) {
        acc_t sum = 0;
        for (int64_t c = 0; c < n_acc; ++c) sum += acc[c * acc_stride + r * pr.e_pad + e];
        dst[e] = static_cast<scalar_t>(sum * scale);
      }
    }
  };

  if (kv_heads >= 4 * threads || n_kb == 1 || threads == 1 || pr.varlen()) {
    // Enough kv heads (varlen: sequences x kv heads) to keep every thread busy: a thread owns
    // whole kv heads, so its dq accumulator covers only that head's query group.
    // The head's dq accumulator is zeroed, or, where the products write a query tile's first
    // dq (writes_dq: brgemm), its tiles' flags are.
    struct HeadState {
      BackwardTile<scalar_t, acc_t> tile;
      std::vector<acc_t> dq_acc;
      std::vector<char> dq_seen;
    };
    const bool writes_dq = Products::Backward::writes_dq();
    auto make_state = [&] {
      return HeadState{BackwardTile<scalar_t, acc_t>(pr), std::vector<acc_t>(group_rows * pr.e_pad),
                       std::vector<char>(writes_dq ? pr.group * n_qb : 0)};
    };
    auto run_head = [&](HeadState& st, int64_t b, int64_t hk) {
      const Sequence sq = pr.sequence(b);
      char* seen = writes_dq ? st.dq_seen.data() : nullptr;
      if (writes_dq) {
        std::fill(st.dq_seen.begin(), st.dq_seen.end(), 0);
      } else {
        std::fill(st.dq_acc.begin(), st.dq_acc.end(), acc_t(0));
      }
      for (int64_t kb = 0; kb < ceil_div(sq.kv_len, pr.block_n); ++kb) {
        st.tile.run(pr, bp, lse.data(), delta.data(), sq, hk, kb, st.dq_acc.data(), seen);
      }
      write_dq(sq, hk, st.dq_acc.data(), 1, 0, 0, group_rows, seen);
    };
    if (pr.varlen()) {
      const std::vector<VarlenRows> read = {{p.q, p.q_stride, true, p.q_heads, E},
                                            {bp.grad_out, bp.grad_out_stride, true, p.q_heads, Ev},
                                            {p.k, p.k_stride, false, p.kv_heads, E},
                                            {p.v, p.v_stride, false, p.kv_heads, Ev}};
      const std::vector<VarlenUnit> units = varlen_units<scalar_t>(pr, p.kv_heads, read);
      parallel_dynamic(threads, static_cast<int64_t>(units.size()), make_state,
                       [&](HeadState& st, int64_t u) {
        const VarlenUnit& unit = units[u];
        if (unit.warm) {
          const Sequence sq = pr.sequence(unit.b);
          for (const VarlenRows& t : read) warm_rows<scalar_t>(t, sq);
        }
        for (int64_t hk = unit.h_begin; hk < unit.h_end; ++hk) run_head(st, unit.b, hk);
      });
      return;
    }
    parallel_stealing(threads, kv_heads, make_state, [&](HeadState& st, int64_t bkh) {
      run_head(st, bkh / p.kv_heads, bkh % p.kv_heads);
    });
    return;
  }
  // Few kv heads (dense): key tiles are split into one chunk per thread, each chunk adding dq
  // into its own accumulator [B*Hk, group, L, e_pad]; the accumulators are summed at the end.
  // (Chunks are indexed explicitly rather than by thread id, so no two ever share one.)
  const int64_t acc_size = kv_heads * group_rows * pr.e_pad;
  std::vector<acc_t> dq_acc(threads * acc_size, acc_t(0));
  const int64_t items = kv_heads * n_kb;
  at::parallel_for(0, threads, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    BackwardTile<scalar_t, acc_t> tile(pr);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* acc = dq_acc.data() + chunk * acc_size;
      for (int64_t it = chunk * items / threads; it < (chunk + 1) * items / threads; ++it) {
        const int64_t bkh = it / n_kb, kb = balanced_tile(it % n_kb, n_kb);
        tile.run(pr, bp, lse.data(), delta.data(), pr.sequence(bkh / p.kv_heads),
                 bkh % p.kv_heads, kb, acc + bkh * group_rows * pr.e_pad, nullptr);
      }
    }
  });
  at::parallel_for(0, kv_heads * group_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bkh = r / group_rows, rr = r % group_rows;
      write_dq(pr.sequence(bkh / p.kv_heads), bkh % p.kv_heads,
               dq_acc.data() + bkh * group_rows * pr.e_pad, threads, acc_size, rr, rr + 1,
               nullptr);
    }
  });
}

template <typename Fn>
void dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::Float32: fn(float{}); break;
    case Dtype::Float64: fn(double{}); break;
    case Dtype::BFloat16: fn(c10::BFloat16{}); break;
    case Dtype::Float16: fn(c10::Half{}); break;
  }
}

}  // namespace

void attention_fwd_kernel(const AttentionParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { attention_fwd_typed<decltype(tag)>(params); });
}

void attention_bwd_kernel(const AttentionBwdParams& params) {
  dispatch_dtype(params.dtype,
                 [&](auto tag) { attention_bwd_typed<decltype(tag)>(params); });
}

const char* attention_fwd_tile_engine(Dtype dtype) {
  const char* engine = nullptr;
  dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    engine = TileProducts<scalar_t, acc_t>::engine();
  });
  return engine;
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
