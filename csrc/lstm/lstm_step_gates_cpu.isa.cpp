// One step's gate pre-activations for a batch of a few rows (LstmStepGatesArgs): the dot
// products of the weights' rows with the batch rows, as a GEMV reads them.
//
// A one-step call of a small batch (an LSTMCell, a sampling step) reads every weight element for
// one to a few FMAs, so it runs at the rate the weights stream in. torch.mm streamed them at
// 39-49 GB/s on the Zen 4 EPYC (MKL's path there, [1, 256..1024] x [256..1024, 1024..4096]),
// where a plain dot product reads 88-96 GB/s from L2/L3. Here a weight row is loaded once per
// group of batch rows, in order, as vectors along k; the accumulators are reduced once per row.
//
// Compiled once per x86 ISA (csrc/include/fastattn/cpu_isa.h).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <functional>

#include "fastattn/lstm_cpu.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int L = Vec::size();
// A tile: kRows weight rows x up to kBatch batch rows of accumulators, plus the batch rows' k
// vector and one weight vector: 16 + 4 + 1 of AVX-512's 32 registers, 8 + 2 + 1 of AVX2's 16.
constexpr int kRows = 4;
constexpr int kBatch = L == 16 ? 4 : 2;

// acc[r][b] += a[b, :K] . w[r, :K], in vectors along k (the last one zero-filled past K).
template <int NB>
C10_ALWAYS_INLINE void accumulate(Vec (&acc)[kRows][NB], const float* w, int64_t ldw,
                                  const float* a, int64_t lda, int64_t K) {
  auto step = [&](int64_t k, int n) {
    Vec av[NB];
    for (int b = 0; b < NB; ++b) {
      av[b] = n == L ? Vec::loadu(a + b * lda + k) : Vec::loadu(a + b * lda + k, n);
    }
    for (int r = 0; r < kRows; ++r) {
      const Vec wv = n == L ? Vec::loadu(w + r * ldw + k) : Vec::loadu(w + r * ldw + k, n);
      for (int b = 0; b < NB; ++b) acc[r][b] = at::vec::fmadd(wv, av[b], acc[r][b]);
    }
  };
  int64_t k = 0;
  for (; k + L <= K; k += L) step(k, L);
  if (k < K) step(k, static_cast<int>(K - k));
}

// Rows j0 .. j0 + kRows - 1 of the gates for batch rows b0 .. b0 + nb - 1 (nb <= NB).
template <int NB>
void tile(const LstmStepGatesArgs& a, int64_t j0, int64_t b0, int64_t nb) {
  if constexpr (NB > 1) {
    if (nb < NB) return tile<NB - 1>(a, j0, b0, nb);
  }
  Vec acc[kRows][NB];
  for (auto& row : acc)
    for (auto& v : row) v = Vec(0.f);
  accumulate<NB>(acc, a.w_ih + j0 * a.ld_ih, a.ld_ih, a.x + b0 * a.ldx, a.ldx, a.I);
  accumulate<NB>(acc, a.w_hh + j0 * a.ld_hh, a.ld_hh, a.h + b0 * a.ldh, a.ldh, a.P);
  for (int r = 0; r < kRows; ++r) {
    const float bias = a.bias ? a.bias[j0 + r] : 0.f;
    for (int b = 0; b < NB; ++b) {
      a.gates[(b0 + b) * a.ld_gates + j0 + r] =
          bias + at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc[r][b]);
    }
  }
}

}  // namespace

// The batches it serves, B < this (0: none), where it beat the two GEMMs. On the Zen 4 (1
// thread, lstm_layer_infer's one-step path) the AVX2 and AVX-512 builds, at every batch of fewer
// rows than a vector and H 64-1024, by 1.3-2.7x (H64 B12-15: even); the default build's emulated
// vectors ran 1.3-10x slower than torch.mm. On the Xeon with AMX (2 threads, H256-1024) the
// AVX-512 build at B16-31 too, by 1.3-1.45x in inference, and in training steps at B32-63 by
// 3-12%, where at B64-128 it ran even or up to 13% slower; the AVX2 build there (the same CPU)
// ran training steps of B16-48 up to 26% slower than the GEMMs (B24 H512: 13% faster).
int64_t lstm_step_gates_below() {
#if defined(CPU_CAPABILITY_AVX512)
  return 64;
#elif defined(CPU_CAPABILITY_AVX2)
  return 16;
#else
  return 0;
#endif
}

void lstm_step_gates_kernel(const LstmStepGatesArgs& a) {
  // G = 4H: whole tiles of kRows rows. Blocks of rows per thread that read at least 64 KiB of
  // weights: smaller calls stay on one thread.
  static_assert(kRows == 4, "a tile is rows of the gates, 4H of them");
  const int64_t blocks = a.G / kRows;
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{16} << 10) / std::max<int64_t>(1, kRows * (a.I + a.P)));
  at::parallel_for(0, blocks, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t b0 = 0; b0 < a.B; b0 += kBatch)
        tile<kBatch>(a, i * kRows, b0, std::min<int64_t>(kBatch, a.B - b0));
    }
  });
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
