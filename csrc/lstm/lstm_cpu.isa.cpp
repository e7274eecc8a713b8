// CPU LSTM layer kernels: the whole recurrence of one layer in one direction per call.
//
// Per step, a tile of cell units x batch lanes computes its slice of h_prev @ w_hh^T in
// registers and runs the gate math on the accumulators before anything is written, so the gate
// pre-activations never go through memory and a step is one parallel region. The tile is
// weights-stationary: a weight element is broadcast and the recurrent state is kept feature-major
// with a padded batch, in panels of a few batch vectors (Panels), so the batch lanes are
// plain vector loads streamed in order, and the forward reads the weights in the layout torch
// keeps them. The backward mirrors it: the GEMM dh_prev = dgates @ w_hh runs on groups of columns
// of w_hh (packed once per call) and the next step's pointwise backward runs on its accumulators.
// Weight gradients are whole-sequence GEMMs in the glue (lstm_cpu.cpp). The cell ops' pointwise
// kernels share the cell math but put their lanes along the features of row-major data.
//
// Compiled once per x86 ISA (csrc/include/fastattn/cpu_isa.h): at::vec::Vectorized<float> holds
// 8 lanes in the AVX2 build, 16 in the AVX-512 one.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>  // convert_from_float for half and bf16
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "fastattn/cpu_activations.h"
#include "fastattn/cpu_brgemm_bf16.h"
#include "fastattn/cpu_exp.h"
#include "fastattn/cpu_scratch.h"
#include "fastattn/cpu_transpose.h"
#include "fastattn/lstm_cell_cpu.h"
#include "fastattn/lstm_cpu.h"
#include "lstm_dtype_dispatch.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Rows of a tile (the four gates of one unit, or four columns of a weight) and the most
// batch vectors per tile: 4 x 3 accumulators plus 3 batch vectors and one broadcast fill the 16
// AVX2 registers.
constexpr int kTileRows = 4;
static_assert(kTileRows == 4, "the forward tiles are the four gates of one unit");
constexpr int kTileVecs = 3;
// The forward's tiles on AVX-512: 4 x 4 accumulators, 4 batch vectors and a broadcast fit its 32
// registers, and B = 64 runs as one panel instead of 3 + 1 vectors, whose 4 x 1 tile (a vector
// load and four broadcasts per four FMAs) took a third of the GEMM time for a quarter of the FMAs
// (T32 B64 H256). The backward's 8-row tiles keep 3 (8 x 3 accumulators).
constexpr int kFwdTileVecs = at::vec::Vectorized<float>::size() == 16 ? 4 : kTileVecs;
// The backward's dh_prev GEMM reduces over all 4H gates, so its B operand (a step's gate
// gradients, 4H x padded batch) streams from L2 rather than L1: tiles of 8 weight rows halve its
// reads per FMA. 8 x 3 accumulators need AVX-512's 32 vector registers; AVX2 keeps 4 rows.
constexpr int kBwdRows = at::vec::Vectorized<float>::size() == 16 ? 8 : kTileRows;

// With lanes along the batch, a batch of fewer rows than a vector leaves lanes idle (15 of 16 at
// B = 1 on AVX-512) and every weight element is broadcast for one or two FMAs: fastattn.LSTM ran
// 2.5-4x slower than nn.LSTM at B <= 4. For batches below kUnitLaneBatch, the forward and the
// backward turn the tiles around, as GEMV-shaped kernels do: a vector holds L consecutive units
// (features), loaded from a weight packed once per call, and each batch row's state element is
// the broadcast. A tile is up to kUnitRows batch rows; the state is row-major [B, features].
constexpr int kUnitRows = at::vec::Vectorized<float>::size() == 16 ? 4 : 2;
// Below two vectors of rows. At exactly one vector the unit lanes won too (forward op, Zen 5, 2
// threads): B16 T32 H256 0.84-1.01 ms against 1.18-1.45 on AVX-512, H512 2.7-3.3 against 3.7-4.4;
// B8 T32 H256 0.76-0.85 against 1.21-1.45 on AVX2. (On a Zen 4, 1 thread, they had run alike at
// B16 H256 and the batch lanes 8-10% faster at H1024.) At B32-64 the two ran alike.
constexpr int64_t kUnitLaneBatch = 2 * at::vec::Vectorized<float>::size();
C10_ALWAYS_INLINE bool unit_lanes(int64_t batch) { return batch < kUnitLaneBatch; }

// The cell's math on one vector of lanes, shared by the layer kernels (lanes along the batch) and
// the cell pointwise kernels (lanes along the features). Gates in torch's order i, f, g, o.
template <typename acc_t>
C10_ALWAYS_INLINE void activate(Vec<acc_t> (&gate)[4]) {
  gate[0] = sigmoid(gate[0]);
  gate[1] = sigmoid(gate[1]);
  gate[2] = tanh(gate[2]);
  gate[3] = sigmoid(gate[3]);
}

// gate: pre-activations in, activated gates out; returns c_new = f * c_prev + i * g and
// hpre = o * tanh(c_new).
template <typename acc_t>
struct CellOut {
  Vec<acc_t> c_new, hpre;
};
template <typename acc_t>
C10_ALWAYS_INLINE CellOut<acc_t> cell_fwd(Vec<acc_t> (&gate)[4], const Vec<acc_t>& cp) {
  activate(gate);
  const Vec<acc_t> c_new = gate[1] * cp + gate[0] * gate[2];
  return {c_new, gate[3] * tanh(c_new)};
}

// The backward of cell_fwd from its activated gates act and c_prev, given the gradients reaching
// hpre (dhpre) and c_new from later steps (dc): d receives the pre-activation gate gradients;
// returns the gradient passed to c_prev through f.
template <typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> cell_bwd(const Vec<acc_t> (&act)[4], const Vec<acc_t>& cp,
                                      const Vec<acc_t>& dhpre, Vec<acc_t> dc, Vec<acc_t> (&d)[4]) {
  const Vec<acc_t> one(acc_t(1));
  const Vec<acc_t> i = act[0], f = act[1], g = act[2], o = act[3];
  const Vec<acc_t> tc = tanh(f * cp + i * g);
  dc = dc + dhpre * o * (one - tc * tc);
  d[0] = dc * g * i * (one - i);
  d[1] = dc * cp * f * (one - f);
  d[2] = dc * i * (one - g * g);
  d[3] = dhpre * tc * o * (one - o);
  return dc * f;
}

// Zoneout with mix weight w, where `present`: the forward keeps w of the previous state,
// x + w * (prev - x); the backward passes w of a state's gradient g straight to the previous one.
template <typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> zoneout_mix(bool present, const Vec<acc_t>& w, const Vec<acc_t>& x,
                                         const Vec<acc_t>& prev) {
  return present ? x + w * (prev - x) : x;
}
template <typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> zoneout_share(bool present, const Vec<acc_t>& w,
                                           const Vec<acc_t>& g) {
  return present ? w * g : Vec<acc_t>(acc_t(0));
}

// cell_bwd under zoneout_c (weight zc where `zoneout`): dc_total, the gradient reaching c, gives
// its zoneout share straight to c_prev and the rest to c_new; returns c_prev's whole gradient.
template <typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> cell_bwd_zoneout(const Vec<acc_t> (&act)[4], const Vec<acc_t>& cp,
                                              const Vec<acc_t>& dhpre, const Vec<acc_t>& dc_total,
                                              bool zoneout, const Vec<acc_t>& zc,
                                              Vec<acc_t> (&d)[4]) {
  const Vec<acc_t> dc_to_prev = zoneout_share(zoneout, zc, dc_total);
  return cell_bwd(act, cp, dhpre, dc_total - dc_to_prev, d) + dc_to_prev;
}

// Batch lanes b0 .. b0 + lanes - 1 of one (t, f) fibre of a data tensor, as math-type vectors.
template <typename scalar_t, typename acc_t>
struct Fibre {
  static constexpr int kLanes = Vec<acc_t>::size();
  const LstmSeqView& view;

  C10_ALWAYS_INLINE bool present() const { return view.data != nullptr; }
  C10_ALWAYS_INLINE scalar_t* at(int64_t t, int64_t b, int64_t f) const {
    return static_cast<scalar_t*>(view.data) + t * view.st + b * view.sb + f * view.sf;
  }
  // An absent tensor reads as zeros and ignores stores.
  C10_ALWAYS_INLINE Vec<acc_t> load(int64_t t, int64_t b0, int64_t f, int lanes) const {
    return present() ? gather(at(t, b0, f), view.sb, lanes) : Vec<acc_t>(acc_t(0));
  }
  // Features f0 .. f0 + n - 1 of one (t, b) row instead (the unit-lane kernel's lanes).
  C10_ALWAYS_INLINE Vec<acc_t> load_row(int64_t t, int64_t b, int64_t f0, int n) const {
    return present() ? gather(at(t, b, f0), view.sf, n) : Vec<acc_t>(acc_t(0));
  }
  // A unit reads or writes the fibres of its four gates, H features apart: four streams that the
  // hardware prefetchers pick up late in a step-major tensor ([T, 4H, B] in memory; 4-5% slower
  // forward without this at T128 B16 H256) and miss in a feature-major one ([4H, T, B], fibres
  // T * B elements apart; 25-30% slower). The forward asks for the next units' lines while
  // computing this one's, the backward for the next step's (kWrite: lines about to be written).
  template <bool kWrite = false>
  void prefetch(int64_t t, int64_t f, int64_t B) const {
    if (!present() || view.sb != 1) return;
    constexpr int64_t kLine = 64 / sizeof(scalar_t);
    for (int64_t b = 0; b < B; b += kLine) __builtin_prefetch(at(t, b, f), kWrite);
  }
  // The line holding feature f0 of row (t, b), in a tensor whose rows are dense (the unit-lane
  // kernels' layout); nothing otherwise.
  template <bool kWrite = false>
  C10_ALWAYS_INLINE void prefetch_row(int64_t t, int64_t b, int64_t f0) const {
    if (present() && view.sf == 1) __builtin_prefetch(at(t, b, f0), kWrite);
  }
  C10_ALWAYS_INLINE void store(const Vec<acc_t>& v, int64_t t, int64_t b0, int64_t f, int lanes) const {
    if (present()) scatter(v, at(t, b0, f), view.sb, lanes);
  }
  C10_ALWAYS_INLINE void store_row(const Vec<acc_t>& v, int64_t t, int64_t b, int64_t f0, int n) const {
    if (present()) scatter(v, at(t, b, f0), view.sf, n);
  }

 private:
  // n elements `stride` apart from p as the first n lanes (the others zero), and back.
  static C10_ALWAYS_INLINE Vec<acc_t> gather(const scalar_t* p, int64_t stride, int n) {
    if (stride == 1) return load_n<acc_t>(p, n);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      // A strided fibre (a row-major [T, B, F] tensor read along the batch) by a gather
      // instruction: through the buffer below, the vector load of the lanes' scalar stores
      // cannot be store-forwarded and waits for the store queue to drain (two thirds of the
      // backward's time outside its GEMM at T32 B16 H256). Lanes past n read element n - 1.
      using index_t = at::vec::int_same_size_t<acc_t>;
      if (stride > 0 && stride <= std::numeric_limits<index_t>::max() / kLanes) {
        const Vec<index_t> lane = at::vec::minimum(Vec<index_t>::arange(0, 1), Vec<index_t>(n - 1));
        const Vec<acc_t> v = at::vec::gather<sizeof(acc_t)>(p, lane * Vec<index_t>(stride));
        return n == kLanes ? v : Vec<acc_t>::set(Vec<acc_t>(acc_t(0)), v, n);
      }
    }
    alignas(64) acc_t tmp[kLanes] = {};
    for (int l = 0; l < n; ++l) tmp[l] = static_cast<acc_t>(p[l * stride]);
    return Vec<acc_t>::loadu(tmp);
  }
  static C10_ALWAYS_INLINE void scatter(const Vec<acc_t>& v, scalar_t* p, int64_t stride, int n) {
    if (stride == 1) return store_n(v, p, n);
    alignas(64) acc_t tmp[kLanes];
    v.store(tmp);
    for (int l = 0; l < n; ++l) p[l * stride] = static_cast<scalar_t>(tmp[l]);
  }
};

// The A operand of the forward's tiles: R rows of a row-major weight, read in place (the four
// gate rows of a unit, or rows of w_hr). No packing: a one-step call would pay as much for it as
// for its GEMM, and packing the gate rows per call (or per inference chunk) cost more than it
// saved at T8 B64 H1024. A partial tile repeats its last row.
template <typename acc_t, int R = kTileRows>
struct WeightTile {
  static constexpr int kRows = R;
  const acc_t* row[R];
  C10_ALWAYS_INLINE acc_t at(int64_t k, int r) const { return row[r][k]; }

  // Rows first .. first + 3 of w (rows `ld` long), clamped to `count` rows.
  static WeightTile rows(const acc_t* w, int64_t ld, int64_t first, int64_t count) {
    WeightTile t{};
    for (int r = 0; r < R; ++r) t.row[r] = w ? w + std::min(first + r, count - 1) * ld : nullptr;
    return t;
  }
};

// acc[r][v] = sum_k a.at(k, r) * b[k * ldb + v * lanes]: one weight tile against V batch vectors
// of a panel. Never inlined: inside the large epilogue functions the compiler spills accumulators.
// The tile comes by reference: by value, the callee's copy read the caller's four pointer stores as
// one 32-byte load, which cannot be forwarded from them and waited for the store queue to drain
// behind the previous epilogue's scattered stores (a third of the forward's time at T32 B16 H256).
template <typename acc_t, int R, int V, typename A>
C10_NOINLINE void tile_gemm(Vec<acc_t> (&acc)[R][V], const A& a_in, const acc_t* b,
                            int64_t ldb, int64_t K) {
  constexpr int L = Vec<acc_t>::size();
  // Independent sums: keeping both FMA pipes busy through a 4-cycle latency takes 8 chains, so a
  // tile with fewer accumulators (4 gate rows x one batch vector at B = 16) splits k over S sets
  // of them, summed at the end.
  constexpr int S = std::min(4, (8 + R * V - 1) / (R * V));
  // Local copies: through `acc` and `a_in` the compiler would have to assume that every store may
  // alias the loads, and keep the sums in memory.
  const A a = a_in;
  auto step = [&](int64_t k, Vec<acc_t> (&sum)[R][V]) {
    Vec<acc_t> bv[V];
    for (int v = 0; v < V; ++v) bv[v] = Vec<acc_t>::loadu(b + k * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      const Vec<acc_t> av(a.at(k, r));
      for (int v = 0; v < V; ++v) sum[r][v] = at::vec::fmadd(av, bv[v], sum[r][v]);
    }
  };
  // The chains sum kSumBlock products of k at a time, then go into totals: one chain over all
  // of K (H = 1040 in test_lstm_ops) carried more than 2x the rounding error of torch's blocked
  // GEMM against float64 (gates 2.1x, h 2.3x with AVX2's lanes).
  constexpr int64_t kSumBlock = 64;
  Vec<acc_t> total[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) total[r][v] = Vec<acc_t>(acc_t(0));
  for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
    const int64_t k_end = std::min(K, k0 + kSumBlock);
    Vec<acc_t> c[S][R][V];
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) c[s][r][v] = Vec<acc_t>(acc_t(0));
    int64_t k = k0;
#pragma GCC unroll 4
    for (; k + S <= k_end; k += S)
      for (int s = 0; s < S; ++s) step(k + s, c[s]);
    for (; k < k_end; ++k) step(k, c[0]);
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        for (int s = 0; s < S; ++s) total[r][v] = total[r][v] + c[s][r][v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = total[r][v];
}

// The B operand of the step GEMMs, a feature-major [K, padded batch] state, stored as panels of
// up to W batch vectors: each panel a contiguous [K, width] block, so that a tile streams its
// operand sequentially instead of striding across the whole batch.
template <typename acc_t, int W>
struct Panels {
  static constexpr int L = Vec<acc_t>::size();
  int64_t K, nvec;

  int64_t size() const { return K * nvec * L; }
  int64_t width(int64_t v0) const { return std::min<int64_t>(W, nvec - v0); }
  // Where batch vector v of row k lies.
  int64_t at(int64_t k, int64_t v) const {
    const int64_t v0 = v - v % W;
    return v0 * L * K + k * width(v0) * L + (v - v0) * L;
  }
};

// fn(std::integral_constant<int, n>) for a count 1 <= n <= N known only at run time (a panel's
// vectors, a unit-lane tile's rows): a tile of exactly that size.
template <int N, typename Fn>
C10_ALWAYS_INLINE void with_count(int64_t n, const Fn& fn) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, fn);
  }
  fn(std::integral_constant<int, N>());
}

// One weight tile against every panel: tile_gemm over the panel's vectors [v0, v0 + width),
// reducing over the first K rows of b, then epilogue(acc, v0). Panels at or past `active` vectors
// get no reduction (zero accumulators): their rows carry their state.
template <typename acc_t, typename A, int W, typename Epilogue>
inline void gemm_tile(const A& a, const acc_t* b, const Panels<acc_t, W>& panels, int64_t K,
                      int64_t active, const Epilogue& epilogue) {
  constexpr int L = Vec<acc_t>::size();
  for (int64_t v0 = 0; v0 < panels.nvec; v0 += W) {
    const int64_t k = v0 < active ? K : 0;
    const acc_t* panel = b + panels.at(0, v0);
    with_count<W>(panels.width(v0), [&](auto width) {
      constexpr int V = decltype(width)::value;
      Vec<acc_t> acc[A::kRows][V];
      tile_gemm<acc_t, A::kRows, V>(acc, a, panel, V * L, k);
      epilogue(acc, v0);
    });
  }
}

template <typename T>
constexpr int vecs_of(const T&) { return std::extent_v<T, 1>; }
// The rows of a tile's accumulators: a unit-lane tile has as many as its batch rows.
template <typename T>
constexpr int rows_of(const T&) { return std::extent_v<T, 0>; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The A operand of the backward's tiles: the columns of a row-major [rows, cols] weight in groups
// of R, each group stored as [rows][R] (column c0 + r of row k at k * R + r), so that a tile
// reads one sequential stream of R-element pieces. Rows of w^T (a transpose per call, and R
// streams per tile) made the whole backward op 6-8% slower at T8 B64 H1024 on the Zen 4 EPYC (the
// same within noise at T32 B16 H256). Building it copies R-element pieces of each row: 16 rows at
// a time, so that the reads run along rows of w and the writes along each group (a group is
// rows * R elements long, a multiple of 4 KiB at H >= 128: walking all groups per row would put
// every write in one L1 set). Columns past `cols` are zero.
template <typename acc_t, int R>
struct ColumnGroups {
  const int64_t rows;
  const bool present;
  ScratchBuffer<acc_t> data;

  struct Tile {
    static constexpr int kRows = R;
    const acc_t* base;
    C10_ALWAYS_INLINE acc_t at(int64_t k, int r) const { return base[k * R + r]; }
  };
  // Group i: columns i * R .. i * R + R - 1.
  Tile tile(int64_t i) const { return {present ? data.data() + i * rows * R : nullptr}; }

  // w's groups; none (null tiles) for a null w.
  ColumnGroups(const acc_t* w, int64_t rows, int64_t cols)
      : rows(rows), present(w != nullptr), data(w ? ceil_div(cols, R) * rows * R : 0) {
    constexpr int64_t kRowBlock = 16;
    if (!w) return;
    const int64_t groups = ceil_div(cols, R);
    acc_t* dst = data.data();
    at::parallel_for(0, ceil_div(rows, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t k0 = b0 * kRowBlock; k0 < std::min(rows, b1 * kRowBlock); k0 += kRowBlock) {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t c0 = g * R, n = std::min<int64_t>(R, cols - c0);
          for (int64_t k = k0; k < std::min(rows, k0 + kRowBlock); ++k) {
            acc_t* piece = dst + (g * rows + k) * R;
            std::copy_n(w + k * cols + c0, n, piece);
            std::fill(piece + n, piece + R, acc_t(0));
          }
        }
      }
    });
  }
};

// Enough tiles per thread that the parallel region's fork is a small share of a step. A cell
// without a product (K = 0: the step's gates came from GEMMs) counts as K = 4, about its
// activations' cost: counted as nothing, its whole step went to one thread (B64 H1024 bf16).
inline int64_t unit_grain(int64_t K, int64_t Bp) {
  const int64_t work = 4 * std::max<int64_t>(K, 4) * std::max<int64_t>(Bp, 1);
  return std::max<int64_t>(1, (int64_t{1} << 15) / work);
}

// The problem sizes and per-step facts shared by the forward and the backward.
template <typename acc_t>
struct Layout {
  static constexpr int L = Vec<acc_t>::size();
  int64_t T, B, H, P, G, nvec, Bp;
  bool reverse;
  const int64_t* batch_sizes;

  explicit Layout(const LstmLayerShape& s)
      : T(s.T), B(s.B), H(s.H), P(s.P), G(4 * s.H), nvec((s.B + L - 1) / L), Bp(nvec * L),
        reverse(s.reverse), batch_sizes(s.batch_sizes) {}
  int64_t time(int64_t s) const { return reverse ? T - 1 - s : s; }
  int64_t rows(int64_t t) const { return batch_sizes ? batch_sizes[t] : B; }
  int64_t active_vecs(int64_t t) const { return (rows(t) + L - 1) / L; }
  int lanes(int64_t v) const { return static_cast<int>(std::min<int64_t>(L, B - v * L)); }
  // Lanes of vector v whose row steps at time t (the others carry their state).
  bool all_step(int64_t t, int64_t v) const { return (v + 1) * L <= rows(t); }
  Vec<acc_t> step_mask(int64_t t, int64_t v) const {
    return Vec<acc_t>::arange(acc_t(v * L), acc_t(1)) < Vec<acc_t>(acc_t(rows(t)));
  }
};

// ---- forward, lanes along the units (small batches, bf16 on brgemm) --------------------------

// Rows of the row-major [*, K] weight w, transposed in blocks of up to L rows into out: block i
// (block(i) = {first row, rows, offset}) becomes a [K, L] panel at out + offset whose row k holds
// w[first .. first + rows - 1, k] (then zeros), rows `ld` apart. Register-blocked transposes
// (cpu_transpose.h). Nothing for a null w.
struct RowBlock {
  int64_t first, rows, offset;
};
template <typename acc_t, typename Block>
void transposed_rows(acc_t* out, const acc_t* w, int64_t K, int64_t ld, int64_t blocks,
                     const Block& block) {
  constexpr int64_t L = Vec<acc_t>::size();
  if (!w) return;
  at::parallel_for(0, blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const RowBlock blk = block(i);
      pack_transposed(w + blk.first * K, K, blk.rows, K, out + blk.offset, ld, L);
    }
  });
}

// A unit-lane tile of rows 0 .. nb - 1 (nb <= R) of the row-major a (rows lda apart) against V
// vectors of b per k: tile_gemm with exactly nb rows (a batch smaller than R computes no
// repeated rows), then epilogue(acc).
template <typename acc_t, int R, int V, typename Epilogue>
inline void unit_tile(int64_t nb, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                      int64_t K, const Epilogue& epilogue) {
  with_count<R>(nb, [&](auto rows) {
    constexpr int kRows = decltype(rows)::value;
    Vec<acc_t> acc[kRows][V];
    tile_gemm<acc_t, kRows, V>(acc, WeightTile<acc_t, kRows>::rows(a, lda, 0, kRows), b, ldb, K);
    epilogue(acc);
  });
}

// fn(i, b0, nb) for every block i < blocks of features, across threads (at least `grain` blocks
// per thread), and every tile of nb <= R batch rows b0 .. b0 + nb - 1: how the unit-lane kernels
// visit their tiles.
template <int R, typename Fn>
inline void for_unit_tiles(int64_t blocks, int64_t grain, int64_t batch, const Fn& fn) {
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t b0 = 0; b0 < batch; b0 += R) fn(i, b0, std::min<int64_t>(R, batch - b0));
    }
  });
}

// The recurrent product of the unit-lane forward on our FMA tiles: w_hh^T per block u of L units
// as a contiguous [P, 4, L] panel, row k holding gates i, f, g, o of units u * L .. u * L + L - 1
// (a tile reads its four B vectors per k adjacent, and its panel as one sequential stream: panels
// interleaved along k, 4 * H elements apart, made the inference op 2.6x slower at T32 B1 H1024,
// where the weights come from memory every step). The state h is row-major [B, P] in the math
// type.
template <typename acc_t>
struct FmaGateProduct {
  using state_t = acc_t;
  static constexpr int L = Vec<acc_t>::size(), R = kUnitRows;
  const int64_t K, units, ld_state, panel;
  const ScratchBuffer<acc_t> w_hh_t;

  FmaGateProduct(const acc_t* w_hh, int64_t H, int64_t P)
      : K(w_hh ? P : 0), units(ceil_div(H, L)), ld_state(P), panel(K * 4 * L),
        w_hh_t(units * panel) {
    transposed_rows(w_hh_t.data(), w_hh, P, 4 * L, 4 * units, [&](int64_t i) {
      const int64_t g = i % 4, u = i / 4;
      return RowBlock{g * H + u * L, std::min<int64_t>(L, H - u * L), u * panel + g * L};
    });
  }

  // cell(pre, b, u) for every row b < B and block u of units, across threads, with pre the four
  // gates' recurrent pre-activations h_prev[b] @ w_hh^T of the block's units.
  template <typename Cell>
  void run(const acc_t* h_prev, int64_t B, const Cell& cell) const {
    for_unit_tiles<R>(units, unit_grain(4 * K, B) / L, B, [&](int64_t u, int64_t b0, int64_t nb) {
      unit_tile<acc_t, R, 4>(nb, h_prev + b0 * ld_state, ld_state, w_hh_t.data() + u * panel,
                             4 * L, K, [&](auto& acc) {
        for (int64_t r = 0; r < rows_of(acc); ++r) cell(acc[r], b0 + r, u);
      });
    });
  }
};

#ifdef CPU_CAPABILITY_AVX512
// bf16 with LstmLayerShape::bf16_products (a CPU with AMX-BF16, cpu_brgemm::use_for_bf16(); no
// projection): the unit-lane forward's recurrent product on AMX tiles through oneDNN's brgemm,
// from w_hh in bf16, with the state h in bf16 (rounded as the h_all it outputs is, and as
// nn.LSTM's oneDNN kernel rounds it) and c, the gates and the cell in fp32. With the weights
// converted to fp32 for our FMA tiles, the bf16 LSTM ran at 0.39-0.49x nn.LSTM's speed there
// (T64 B24 H256 and T32 B64 H512 inference; nn.LSTM runs bf16 on AMX).

// The loop of both brgemm products: rows 0 .. B - 1 of a (bf16, `pairs` words per row) against
// the blocks of `width` columns of w (VNNI-2 pairs, rows ld_w words apart), the blocks split
// across threads (at least `grain` each), kRows rows and kBlocks blocks per product into an fp32
// buffer that stays in L1 for epilogue(out, b, i), out pointing at row b's results of block i.
template <int64_t kRows, int64_t kBlocks, typename Epilogue>
void brgemm_row_blocks(const uint32_t* a, int64_t B, int64_t pairs, const uint32_t* w,
                       int64_t ld_w, int64_t blocks, int64_t width, int64_t grain,
                       const Epilogue& epilogue) {
  at::parallel_for(0, blocks, grain, [&](int64_t i0, int64_t i1) {
    const ScratchBuffer<float> out(kRows * kBlocks * width);
    for (int64_t c0 = i0; c0 < i1; c0 += kBlocks) {
      const int64_t nb = std::min(kBlocks, i1 - c0), ld_out = nb * width;
      for (int64_t b0 = 0; b0 < B; b0 += kRows) {
        const int64_t m = std::min(kRows, B - b0);
        cpu_brgemm::bf16_product(m, ld_out, pairs, a + b0 * pairs, pairs, w + c0 * width, ld_w,
                                 out.data(), ld_out, false);
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t c = 0; c < nb; ++c) epilogue(&out[r * ld_out + c * width], b0 + r, c0 + c);
        }
      }
    }
    cpu_brgemm::release();
  });
}

// w_hh^T as brgemm's B operand: VNNI-2 pairs of the reduction (h's features 2k and 2k + 1 as
// one 32-bit word in row k), its columns gate-interleaved per block of L units - column
// (u * 4 + g) * L + l is gate g of unit u * L + l - so that row b of a product over whole blocks
// holds each block's four gates as four vectors. The columns past H are left unwritten: they
// only feed lanes that the cell does not store. h is row-major [B, 2 * pairs] in bf16 (brgemm's
// A; a zero column pads an odd P).
struct BrgemmGateProduct {
  using state_t = c10::BFloat16;
  static constexpr int L = Vec<float>::size();
  static_assert(L == kTransposeBlock, "a block of units is one register transpose wide");
  // A product's rows and blocks of units: its fp32 result (32 KB) stays in L1 for the cells
  // that read it.
  static constexpr int64_t kRows = 32, kBlocks = 4;
  const int64_t P, pairs, units, ld_state, ld_w;
  const ScratchBuffer<uint32_t> w_pairs;

  // Per block of L units, L pairs at a time, each gate: the gate's L rows hold 2L bf16 features
  // of each unit as L words, which a register transpose puts in their L packed rows (the block's
  // four gates side by side there). An even P's rows are whole words, read in place; an odd P's
  // go through a buffer that gives their last pair a zero high half. (With the pairs outermost,
  // each block of pairs read a line of every gate row, rows 2P bytes apart: one bf16 inference
  // step of B64 H1024, which packed w_hh for its one product then, ran 1.48-1.56 ms against
  // 1.36-1.44 with this order, Xeon with AMX, 2 threads.)
  BrgemmGateProduct(const c10::BFloat16* w_hh, int64_t H, int64_t P)
      : P(P), pairs(ceil_div(P, 2)), units(ceil_div(H, L)), ld_state(2 * pairs),
        ld_w(4 * L * units), w_pairs(pairs * ld_w) {
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int rows = static_cast<int>(std::min<int64_t>(L, H - u * L));
        for (int64_t k0 = 0; k0 < pairs; k0 += L) {
          const int cols = static_cast<int>(std::min<int64_t>(L, pairs - k0));
          const int64_t f0 = 2 * k0, nf = std::min<int64_t>(2 * L, P - f0);
          const __mmask32 features = static_cast<__mmask32>((uint64_t{1} << nf) - 1);
          for (int64_t g = 0; g < 4; ++g) {
            const c10::BFloat16* gate_rows = w_hh + (g * H + u * L) * P + f0;
            // The transpose moves 32-bit lanes without arithmetic: words pass through as floats.
            float* dst = reinterpret_cast<float*>(w_pairs.data() + k0 * ld_w + (u * 4 + g) * L);
            if (P % 2 == 0) {
              transpose_block(reinterpret_cast<const float*>(gate_rows), P / 2, dst, ld_w, rows,
                              cols);
              continue;
            }
            alignas(64) uint32_t words[L][L];
            for (int l = 0; l < rows; ++l) {
              _mm512_store_si512(words[l], _mm512_maskz_loadu_epi16(features, gate_rows + l * P));
            }
            transpose_block(reinterpret_cast<const float*>(&words[0][0]), L, dst, ld_w, rows,
                            cols);
          }
        }
      }
    });
  }

  // FmaGateProduct::run's contract: per thread a range of unit blocks, in products of up to
  // kRows rows and kBlocks blocks.
  template <typename Cell>
  void run(const c10::BFloat16* h_prev, int64_t B, const Cell& cell) const {
    const int64_t grain = std::max<int64_t>(1, unit_grain(4 * P, B) / L);
    brgemm_row_blocks<kRows, kBlocks>(
        reinterpret_cast<const uint32_t*>(h_prev), B, pairs, w_pairs.data(), ld_w, units, 4 * L,
        grain, [&](const float* gates, int64_t b, int64_t u) {
          Vec<float> pre[4];
          for (int g = 0; g < 4; ++g) pre[g] = Vec<float>::loadu(gates + g * L);
          cell(pre, b, u);
        });
  }
};
#endif  // CPU_CAPABILITY_AVX512

template <typename scalar_t, typename Product>
void layer_fwd_unit_lanes(const LstmLayerFwdArgs& a, const Product& product) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using state_t = typename Product::state_t;
  using F = Fibre<scalar_t, acc_t>;
  constexpr int L = Vec<acc_t>::size(), R = kUnitRows;
  const Layout<acc_t> lay(a.shape);
  const int64_t B = lay.B, H = lay.H, P = lay.P, ld_h = product.ld_state;
  const bool proj = a.w_hr != nullptr;
  const int64_t p_blocks = ceil_div(P, L);
  // With a projection, w_hr^T per block of L projected features: a [H, L] panel.
  auto w_hr_block = [&](int64_t i) {
    return RowBlock{i * L, std::min<int64_t>(L, P - i * L), i * H * L};
  };
  const ScratchBuffer<acc_t> w_hr_t(proj ? p_blocks * H * L : 0);
  transposed_rows(w_hr_t.data(), static_cast<const acc_t*>(a.w_hr), H, L, p_blocks, w_hr_block);
  const F x_proj{a.x_proj}, h0{a.h0}, c0{a.c0}, zc{a.zoneout_c}, zh{a.zoneout_h};
  const F h_all{a.h_all}, c_all{a.c_all}, hpre_all{a.hpre_all};
  const Fibre<acc_t, acc_t> gates_all{a.gates_all};

  // Row-major state: h [B, ld_h] in the product's state type, double-buffered (the product
  // reads all of h_prev; columns past P stay zero), c [B, H] updated in place, hpre [B, H] (the
  // projection's broadcasts).
  const ScratchBuffer<state_t> h_buf(2 * B * ld_h, zero_filled);
  const ScratchBuffer<acc_t> c_buf(B * H, zero_filled);
  const ScratchBuffer<acc_t> hpre_buf(proj ? B * H : 0, zero_filled);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = 0; p < P; p += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, P - p));
      store_n(h0.load_row(0, b, p, n), &h_buf[b * ld_h + p], n);
    }
    for (int64_t j = 0; j < H; j += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, H - j));
      store_n(c0.load_row(0, b, j, n), &c_buf[b * H + j], n);
    }
  }

  for (int64_t s = 0; s < lay.T; ++s) {
    const int64_t t = lay.time(s), stepping = lay.rows(t);
    const state_t* h_prev = h_buf.data() + (s % 2) * B * ld_h;
    state_t* h_next = h_buf.data() + ((s + 1) % 2) * B * ld_h;

    // h = lerp(h_new, h_prev, zoneout_h) for row b's features p0 .. p0 + n - 1; a row that does
    // not step carries h_prev.
    auto emit_h = [&](Vec<acc_t> h_new, int64_t b, int64_t p0, int n) {
      const Vec<acc_t> hp = load_n<acc_t>(h_prev + b * ld_h + p0, n);
      if (b >= stepping) h_new = hp;
      else h_new = zoneout_mix(zh.present(), zh.load_row(t, b, p0, n), h_new, hp);
      store_n(h_new, h_next + b * ld_h + p0, n);
      h_all.store_row(h_new, t, b, p0, n);
    };

    // Phase 1: row b's cell for the units of block u, from their gates' recurrent part. Each
    // cell asks for the lines that the same units' cell of row b + kAhead reads and writes: a
    // product's rows come in order, each cell reading L features of each gate of its row (rows
    // 4H elements apart), a stride the hardware prefetchers do not follow (bf16 T16 B128 H1024
    // inference: the first x_proj load was a quarter of the cell's time; with the lines asked
    // for 12 rows ahead, 6% faster there and 15% at T32 B64 H512, T64 B24 H256 unchanged, Xeon
    // with AMX, min of 10 alternating runs; 24 rows ahead was no better).
    constexpr int64_t kAhead = 12;
    product.run(h_prev, B, [&](Vec<acc_t> (&act)[4], int64_t b, int64_t u) {
      const int64_t j0 = u * L;
      const int n = static_cast<int>(std::min<int64_t>(L, H - j0));
      if (b + kAhead < B) {
        for (int g = 0; g < 4; ++g) {
          x_proj.prefetch_row(t, b + kAhead, g * H + j0);
          gates_all.template prefetch_row<true>(t, b + kAhead, g * H + j0);
        }
        __builtin_prefetch(&c_buf[(b + kAhead) * H + j0], 1);
      }
      for (int g = 0; g < 4; ++g) act[g] = act[g] + x_proj.load_row(t, b, g * H + j0, n);
      acc_t* cp_ptr = &c_buf[b * H + j0];
      const Vec<acc_t> cp = load_n<acc_t>(cp_ptr, n);
      const CellOut<acc_t> out = cell_fwd(act, cp);
      Vec<acc_t> c = zoneout_mix(zc.present(), zc.load_row(t, b, j0, n), out.c_new, cp);
      Vec<acc_t> hpre = out.hpre;
      if (b >= stepping) {
        c = cp;
        hpre = act[0] = act[1] = act[2] = act[3] = Vec<acc_t>(acc_t(0));
      }
      store_n(c, cp_ptr, n);
      c_all.store_row(c, t, b, j0, n);
      for (int g = 0; g < 4; ++g) gates_all.store_row(act[g], t, b, g * H + j0, n);
      if (proj) {
        store_n(hpre, &hpre_buf[b * H + j0], n);
        hpre_all.store_row(hpre, t, b, j0, n);
      } else {
        emit_h(hpre, b, j0, n);
      }
    });

    // Phase 2 (projection): h_new = hpre @ w_hr^T, per block of L projected features.
    if (proj) {
      for_unit_tiles<R>(p_blocks, unit_grain(H, B) / L, B, [&](int64_t i, int64_t b0, int64_t nb) {
        const int64_t p0 = i * L;
        const int n = static_cast<int>(std::min<int64_t>(L, P - p0));
        unit_tile<acc_t, R, 1>(nb, hpre_buf.data() + b0 * H, H, w_hr_t.data() + i * H * L, L, H,
                               [&](auto& acc) {
          for (int64_t r = 0; r < rows_of(acc); ++r) emit_h(acc[r][0], b0 + r, p0, n);
        });
      });
    }
  }
}

// ---- forward, lanes along the batch (and the choice of lanes) --------------------------------

template <typename scalar_t>
void layer_fwd(const LstmLayerFwdArgs& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
#ifdef CPU_CAPABILITY_AVX512
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (a.shape.bf16_products) {
      return layer_fwd_unit_lanes<scalar_t>(
          a, BrgemmGateProduct(static_cast<const c10::BFloat16*>(a.w_hh), a.shape.H, a.shape.P));
    }
  }
#endif
  if (unit_lanes(a.shape.B)) {
    return layer_fwd_unit_lanes<scalar_t>(
        a, FmaGateProduct<acc_t>(static_cast<const acc_t*>(a.w_hh), a.shape.H, a.shape.P));
  }
  using F = Fibre<scalar_t, acc_t>;
  constexpr int L = Vec<acc_t>::size();
  const Layout<acc_t> lay(a.shape);
  const int64_t H = lay.H, P = lay.P, Bp = lay.Bp, nvec = lay.nvec;
  const bool proj = a.w_hr != nullptr;
  const auto* w_hh = static_cast<const acc_t*>(a.w_hh);
  const auto* w_hr = static_cast<const acc_t*>(a.w_hr);
  const int64_t K = w_hh ? P : 0, p_tiles = ceil_div(P, kTileRows);
  const F x_proj{a.x_proj}, h0{a.h0}, c0{a.c0}, zc{a.zoneout_c}, zh{a.zoneout_h};
  const F h_all{a.h_all}, c_all{a.c_all}, hpre_all{a.hpre_all};
  const Fibre<acc_t, acc_t> gates_all{a.gates_all};
  // float h_all and c_all rows ([T, B, F], features contiguous) without a projection: the batch
  // lanes hold one unit's value for L rows, and storing those lane by lane (Fibre::store's
  // scalar stores) took 8-13% of the float32 inference op at B32-128 (Xeon with AMX: T64 B64
  // H256 13.3 -> 11.6 ms with the two stores left out). A block of L units stages its vectors
  // and stores them transposed (pack_transposed), into lines that its units have asked for
  // ahead: the staging alone gained 2-4%, with the prefetches 3-15% (T64 B32-64 H256-512).
  const bool staged_rows = std::is_same_v<scalar_t, float> && !proj && a.h_all.sf == 1 &&
                           a.c_all.sf == 1;

  // Feature-major state: h, the B operand of phase 1, in panels and double-buffered (a step reads
  // all of h_prev); hpre, the B operand of the projection, likewise; c updated in place, [H, Bp].
  const Panels<acc_t, kFwdTileVecs> h_panels{P, nvec}, hpre_panels{H, nvec};
  const ScratchBuffer<acc_t> h_buf(2 * h_panels.size(), zero_filled);
  const ScratchBuffer<acc_t> c_buf(H * Bp, zero_filled);
  const ScratchBuffer<acc_t> hpre_buf(proj ? hpre_panels.size() : 0, zero_filled);
  for (int64_t v = 0; v < nvec; ++v) {
    for (int64_t p = 0; p < P; ++p) h0.load(0, v * L, p, lay.lanes(v)).store(&h_buf[h_panels.at(p, v)]);
    for (int64_t j = 0; j < H; ++j) c0.load(0, v * L, j, lay.lanes(v)).store(&c_buf[j * Bp + v * L]);
  }

  for (int64_t s = 0; s < lay.T; ++s) {
    const int64_t t = lay.time(s), active = lay.active_vecs(t);
    const acc_t* h_prev = h_buf.data() + (s % 2) * h_panels.size();
    acc_t* h_next = h_buf.data() + ((s + 1) % 2) * h_panels.size();

    // h = lerp(h_new, h_prev, zoneout_h) for carried-or-stepping lanes, to state and output
    // (to `staged` instead of h_all, where given).
    auto emit_h = [&](Vec<acc_t> h_new, int64_t p, int64_t v, acc_t* staged = nullptr) {
      const int lanes = lay.lanes(v);
      const Vec<acc_t> hp = Vec<acc_t>::loadu(h_prev + h_panels.at(p, v));
      h_new = zoneout_mix(zh.present(), zh.load(t, v * L, p, lanes), h_new, hp);
      if (!lay.all_step(t, v)) h_new = Vec<acc_t>::blendv(hp, h_new, lay.step_mask(t, v));
      h_new.store(h_next + h_panels.at(p, v));
      staged ? h_new.store(staged) : h_all.store(h_new, t, v * L, p, lanes);
    };

    // Phase 1: per cell unit j, the four gate rows of w_hh against h_prev, then the cell. With
    // staged rows, whole blocks of L units per thread.
    const int64_t U = staged_rows ? L : 1;
    at::parallel_for(0, ceil_div(H, U), std::max<int64_t>(1, unit_grain(4 * K, Bp) / U),
                     [&](int64_t i0, int64_t i1) {
      // h and c of the block's units: [2][nvec][L units][L lanes] (every slot written before
      // the block is stored).
      const ScratchBuffer<acc_t> stage(staged_rows ? 2 * nvec * L * L : 0);
      auto stage_slot = [&](int tensor, int64_t j, int64_t v) {
        return staged_rows ? &stage[((tensor * nvec + v) * L + j % L) * L] : nullptr;
      };
      const int64_t j0 = i0 * U, j1 = std::min(H, i1 * U);
      for (int64_t j = j0; j < j1; ++j) {
        if (j + 2 < j1) {
          for (int g = 0; g < 4; ++g) {
            x_proj.prefetch(t, g * H + j + 2, lay.B);
            gates_all.prefetch(t, g * H + j + 2, lay.B);
          }
        }
        if (staged_rows) {  // an L-th of the rows of the block's h_all and c_all lines
          const int64_t first = j - j % L, per = ceil_div(lay.B, L);
          for (int64_t b = (j % L) * per; b < std::min(lay.B, (j % L + 1) * per); ++b) {
            __builtin_prefetch(h_all.at(t, b, first), 1);
            __builtin_prefetch(c_all.at(t, b, first), 1);
          }
        }
        // Unit j's gate rows i, f, g, o: rows j, H + j, 2H + j, 3H + j of w_hh.
        WeightTile<acc_t> gate_rows;
        for (int g = 0; g < 4; ++g) gate_rows.row[g] = w_hh ? w_hh + (g * H + j) * P : nullptr;
        gemm_tile(gate_rows, h_prev, h_panels, K, active, [&](auto& acc, int64_t v0) {
          for (int dv = 0; dv < vecs_of(acc); ++dv) {
            const int64_t v = v0 + dv;
            const int lanes = lay.lanes(v);
            const int64_t b0 = v * L;
            Vec<acc_t> act[4];
            for (int g = 0; g < 4; ++g) act[g] = acc[g][dv] + x_proj.load(t, b0, g * H + j, lanes);
            acc_t* cp_ptr = &c_buf[j * Bp + b0];
            const Vec<acc_t> cp = Vec<acc_t>::loadu(cp_ptr);
            const CellOut<acc_t> cell = cell_fwd(act, cp);
            const Vec<acc_t> c_new = cell.c_new;
            Vec<acc_t> c = zoneout_mix(zc.present(), zc.load(t, b0, j, lanes), c_new, cp);
            Vec<acc_t> hpre = cell.hpre;
            if (!lay.all_step(t, v)) {
              const Vec<acc_t> mask = lay.step_mask(t, v), zero(acc_t(0));
              c = Vec<acc_t>::blendv(cp, c, mask);
              hpre = Vec<acc_t>::blendv(zero, hpre, mask);
              for (auto& x : act) x = Vec<acc_t>::blendv(zero, x, mask);
            }
            c.store(cp_ptr);
            staged_rows ? c.store(stage_slot(1, j, v)) : c_all.store(c, t, b0, j, lanes);
            for (int g = 0; g < 4; ++g) gates_all.store(act[g], t, b0, g * H + j, lanes);
            if (proj) {
              hpre.store(&hpre_buf[hpre_panels.at(j, v)]);
              hpre_all.store(hpre, t, b0, j, lanes);
            } else {
              emit_h(hpre, j, v, stage_slot(0, j, v));
            }
          }
        });
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (staged_rows && (j % L == L - 1 || j == j1 - 1)) {
            const int64_t first = j - j % L, units = j - first + 1;
            for (int64_t v = 0; v < nvec; ++v) {
              pack_transposed(stage_slot(0, first, v), L, units, lay.lanes(v),
                              h_all.at(t, v * L, first), a.h_all.sb, units);
              pack_transposed(stage_slot(1, first, v), L, units, lay.lanes(v),
                              c_all.at(t, v * L, first), a.c_all.sb, units);
            }
          }
        }
      }
    });

    // Phase 2 (projection): h_new = hpre @ w_hr^T, per tile of projected units.
    if (proj) {
      at::parallel_for(0, p_tiles, unit_grain(kTileRows * H, Bp), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t p0 = i * kTileRows, rows = std::min<int64_t>(kTileRows, P - p0);
          gemm_tile(WeightTile<acc_t>::rows(w_hr, H, p0, P), hpre_buf.data(), hpre_panels, H, nvec, [&](auto& acc, int64_t v0) {
            for (int r = 0; r < rows; ++r)
              for (int dv = 0; dv < vecs_of(acc); ++dv) emit_h(acc[r][dv], p0 + r, v0 + dv);
          });
        }
      });
    }
  }
}

// ---- backward, lanes along the units (small batches, bf16 on brgemm) -------------------------

// layer_bwd with the forward's unit lanes (small batches, and bf16 on brgemm): the state
// gradients are row-major [B, features], and a Product computes dh_prev = dgates @ w_hh from the
// step's gate gradients, row-major [B, G] in its grad_t.

// dh_prev on our FMA tiles: w_hh's rows read in place as vectors of kBwdUnitVecs * L columns
// (packed into contiguous panels, ColumnGroups), each row's gate gradients broadcast.
constexpr int kBwdUnitVecs = 4;

template <typename acc_t>
struct FmaDhProduct {
  using grad_t = acc_t;
  static constexpr int L = Vec<acc_t>::size(), R = kUnitRows, V = kBwdUnitVecs;
  const int64_t G, P, K;
  const ColumnGroups<acc_t, V * L> w_hh_cols;

  FmaDhProduct(const acc_t* w_hh, int64_t G, int64_t P)
      : G(G), P(P), K(w_hh ? G : 0), w_hh_cols(w_hh, G, P) {}

  // fn(dh, b, i) for every row b < B and block i of L columns, across threads, with dh the
  // block's dgates[b] @ w_hh.
  template <typename Fn>
  void run(const acc_t* dgates, int64_t B, const Fn& fn) const {
    for_unit_tiles<R>(ceil_div(P, V * L), 1, B, [&](int64_t i, int64_t b0, int64_t nb) {
      unit_tile<acc_t, R, V>(nb, dgates + b0 * G, G, w_hh_cols.tile(i).base, V * L, K,
                             [&](auto& acc) {
        for (int64_t r = 0; r < rows_of(acc); ++r) {
          for (int v = 0; v < V && (i * V + v) * L < P; ++v) fn(acc[r][v], b0 + r, i * V + v);
        }
      });
    });
  }
};

#ifdef CPU_CAPABILITY_AVX512
// dh_prev on brgemm (LstmLayerShape::bf16_products): dgates rounded to bf16 (brgemm's A, as
// nn.LSTM's oneDNN backward rounds them; grad_x_proj keeps the fp32 values' rounding), w_hh (bf16)
// as B in VNNI-2 pairs of its rows (gates 2k and 2k + 1 of column p as word k of column p).
struct BrgemmDhProduct {
  using grad_t = c10::BFloat16;
  static constexpr int L = Vec<float>::size();
  // A product's rows and blocks of columns: 32 x 256 floats (32 KB) of result.
  static constexpr int64_t kRows = 32, kBlocks = 16;
  const int64_t G, blocks, ld_w;
  const ScratchBuffer<uint32_t> w_pairs;

  BrgemmDhProduct(const c10::BFloat16* w_hh, int64_t G, int64_t P)
      : G(G), blocks(ceil_div(P, L)), ld_w(blocks * L), w_pairs(G / 2 * ld_w) {
    at::parallel_for(0, G / 2, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const c10::BFloat16* even = w_hh + 2 * k * P;
        for (int64_t p0 = 0; p0 < P; p0 += L) {
          const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(L, P - p0)) - 1);
          const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, even + p0));
          const __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, even + P + p0));
          _mm512_store_si512(w_pairs.data() + k * ld_w + p0,
                             _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
      }
    });
  }

  template <typename Fn>
  void run(const c10::BFloat16* dgates, int64_t B, const Fn& fn) const {
    const int64_t grain = std::max<int64_t>(1, unit_grain(G, B) / L);
    brgemm_row_blocks<kRows, kBlocks>(
        reinterpret_cast<const uint32_t*>(dgates), B, G / 2, w_pairs.data(), ld_w, blocks, L,
        grain, [&](const float* dh, int64_t b, int64_t i) { fn(Vec<float>::loadu(dh), b, i); });
  }
};
#endif  // CPU_CAPABILITY_AVX512

template <typename scalar_t, typename Product>
void layer_bwd_unit_lanes(const LstmLayerBwdArgs& a, const Product& product) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using grad_t = typename Product::grad_t;
  using F = Fibre<scalar_t, acc_t>;
  constexpr int L = Vec<acc_t>::size(), R = kUnitRows;
  const Layout<acc_t> lay(a.shape);
  const int64_t T = lay.T, B = lay.B, H = lay.H, P = lay.P, G = lay.G;
  const bool proj = a.w_hr != nullptr;
  const ColumnGroups<acc_t, L> w_hr_cols(static_cast<const acc_t*>(a.w_hr), P, H);
  const F grad_h_all{a.grad_h_all}, grad_c_all{a.grad_c_all}, c0{a.c0}, c_all{a.c_all};
  const F zc{a.zoneout_c}, zh{a.zoneout_h};
  const Fibre<acc_t, acc_t> gates_all{a.gates_all};
  const F grad_x_proj{a.grad_x_proj}, grad_h0{a.grad_h0}, grad_c0{a.grad_c0};
  const F grad_hproj_all{a.grad_hproj_all};

  // dh_new, dh_share and dc as layer_bwd's, row-major; the step's gate gradients [B, G] in the
  // product's grad_t, double-buffered (the product of step s reads them all while its epilogue
  // writes step s + 1's).
  const ScratchBuffer<acc_t> dh_new(B * P, zero_filled), dh_share(B * P, zero_filled);
  const ScratchBuffer<acc_t> dc(B * H, zero_filled);
  const ScratchBuffer<grad_t> dgates(2 * B * G, zero_filled);
  auto btime = [&](int64_t s) { return lay.time(T - 1 - s); };
  auto lanes = [](int64_t size, int64_t f0) {
    return static_cast<int>(std::min<int64_t>(L, size - f0));
  };

  // Row b's features p0 .. p0 + n - 1: dh_total = dh_carry + grad_h_all[t], split between h_new
  // and h_prev (a row that does not step passes all of it to h_prev).
  auto split = [&](int64_t s, Vec<acc_t> dh_total, int64_t b, int64_t p0, int n) {
    const int64_t t = btime(s);
    if (s + 1 < T) grad_h_all.prefetch_row(btime(s + 1), b, p0);  // as the cell's lines below
    dh_total = dh_total + grad_h_all.load_row(t, b, p0, n);
    Vec<acc_t> share = zoneout_share(zh.present(), zh.load_row(t, b, p0, n), dh_total);
    if (b >= lay.rows(t)) share = dh_total;
    const Vec<acc_t> into_new = dh_total - share;
    store_n(share, &dh_share[b * P + p0], n);
    store_n(into_new, &dh_new[b * P + p0], n);
    if (proj) grad_hproj_all.store_row(into_new, t, b, p0, n);
    return into_new;
  };

  // The pointwise backward of step s for row b's units k0 .. k0 + n - 1.
  auto cell = [&](int64_t s, const Vec<acc_t>& dhpre, int64_t b, int64_t k0, int n) {
    const int64_t t = btime(s);
    // As in the batch lanes' cell: the saved gates and cells come back from L3 or memory long
    // after the forward wrote them, and grad_x_proj's lines are written for the first time, so
    // the lines of the same row and units one step on are asked for now.
    if (s + 1 < T) {
      const int64_t t_next = btime(s + 1);
      for (int q = 0; q < 4; ++q) {
        gates_all.prefetch_row(t_next, b, q * H + k0);
        grad_x_proj.template prefetch_row<true>(t_next, b, q * H + k0);
      }
      if (s + 2 < T) c_all.prefetch_row(lay.reverse ? t_next + 1 : t_next - 1, b, k0);
    }
    Vec<acc_t> act[4];
    for (int q = 0; q < 4; ++q) act[q] = gates_all.load_row(t, b, q * H + k0, n);
    const int64_t t_prev = lay.reverse ? t + 1 : t - 1;
    const Vec<acc_t> cp = s == T - 1 ? c0.load_row(0, b, k0, n) : c_all.load_row(t_prev, b, k0, n);
    acc_t* dc_ptr = &dc[b * H + k0];
    const Vec<acc_t> dc_total = load_n<acc_t>(dc_ptr, n) + grad_c_all.load_row(t, b, k0, n);
    Vec<acc_t> d[4];
    Vec<acc_t> dc_prev =
        cell_bwd_zoneout(act, cp, dhpre, dc_total, zc.present(), zc.load_row(t, b, k0, n), d);
    if (b >= lay.rows(t)) {
      for (auto& x : d) x = Vec<acc_t>(acc_t(0));
      dc_prev = dc_total;
    }
    store_n(dc_prev, dc_ptr, n);
    grad_t* dg = dgates.data() + (s % 2) * B * G + b * G;
    for (int q = 0; q < 4; ++q) {
      store_n(d[q], dg + q * H + k0, n);
      grad_x_proj.store_row(d[q], t, b, q * H + k0, n);
    }
  };

  // Phase A of step s: the gradient reaching hpre (through w_hr with a projection), then the
  // cell; without a projection it runs fused into phase B of step s - 1, except for s = 0.
  auto phase_a = [&](int64_t s) {
    for_unit_tiles<R>(ceil_div(H, L), 1, B, [&](int64_t u, int64_t b0, int64_t nb) {
      const int64_t k0 = u * L;
      const int n = lanes(H, k0);
      if (proj) {
        unit_tile<acc_t, R, 1>(nb, dh_new.data() + b0 * P, P, w_hr_cols.tile(u).base, L, P,
                               [&](auto& acc) {
          for (int64_t r = 0; r < rows_of(acc); ++r) cell(s, acc[r][0], b0 + r, k0, n);
        });
      } else {
        for (int64_t b = b0; b < b0 + nb; ++b)
          cell(s, load_n<acc_t>(&dh_new[b * P + k0], n), b, k0, n);
      }
    });
  };

  if (T > 0) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p0 = 0; p0 < P; p0 += L) split(0, Vec<acc_t>(acc_t(0)), b, p0, lanes(P, p0));
    phase_a(0);
  }
  for (int64_t s = 0; s < T; ++s) {
    if (s > 0 && proj) phase_a(s);
    // Phase B: dh_prev = dgates_s @ w_hh (+ the share passed straight on) per block of L
    // columns, then the split of the next step (and, without a projection, its cell).
    const grad_t* dg = dgates.data() + (s % 2) * B * G;
    product.run(dg, B, [&](const Vec<acc_t>& dh, int64_t b, int64_t i) {
      const int64_t p0 = i * L;
      const int n = lanes(P, p0);
      const Vec<acc_t> carry = dh + load_n<acc_t>(&dh_share[b * P + p0], n);
      if (s + 1 == T) {
        grad_h0.store_row(carry, 0, b, p0, n);
      } else {
        const Vec<acc_t> into_new = split(s + 1, carry, b, p0, n);
        if (!proj) cell(s + 1, into_new, b, p0, n);
      }
    });
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k0 = 0; k0 < H; k0 += L)
      grad_c0.store_row(load_n<acc_t>(&dc[b * H + k0], lanes(H, k0)), 0, b, k0, lanes(H, k0));
    if (T == 0)  // nothing ran: the gradients of h0 are zero
      for (int64_t p0 = 0; p0 < P; p0 += L)
        grad_h0.store_row(Vec<acc_t>(acc_t(0)), 0, b, p0, lanes(P, p0));
  }
}

// ---- backward, lanes along the batch (and the choice of lanes) -------------------------------

template <typename scalar_t>
void layer_bwd(const LstmLayerBwdArgs& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
#ifdef CPU_CAPABILITY_AVX512
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (a.shape.bf16_products) {
      return layer_bwd_unit_lanes<scalar_t>(
          a, BrgemmDhProduct(static_cast<const c10::BFloat16*>(a.w_hh), 4 * a.shape.H, a.shape.P));
    }
  }
#endif
  if (unit_lanes(a.shape.B)) {
    return layer_bwd_unit_lanes<scalar_t>(
        a, FmaDhProduct<acc_t>(static_cast<const acc_t*>(a.w_hh), 4 * a.shape.H, a.shape.P));
  }
  using F = Fibre<scalar_t, acc_t>;
  constexpr int L = Vec<acc_t>::size();
  const Layout<acc_t> lay(a.shape);
  const int64_t T = lay.T, H = lay.H, P = lay.P, G = lay.G, Bp = lay.Bp, nvec = lay.nvec;
  const bool proj = a.w_hr != nullptr;
  // dh_prev = dgates @ w_hh and dhpre = dh_new @ w_hr reduce over the weights' rows: their tiles
  // are groups of columns.
  const ColumnGroups<acc_t, kBwdRows> w_hh_cols(static_cast<const acc_t*>(a.w_hh), G, P);
  const auto* w_hr = static_cast<const acc_t*>(a.w_hr);
  const ColumnGroups<acc_t, kTileRows> w_hr_cols(w_hr, P, H);
  const int64_t K_hh = a.w_hh ? G : 0;
  const int64_t h_tiles = ceil_div(H, kTileRows), p_tiles = ceil_div(P, kBwdRows);
  const F grad_h_all{a.grad_h_all}, grad_c_all{a.grad_c_all}, c0{a.c0}, c_all{a.c_all};
  const F zc{a.zoneout_c}, zh{a.zoneout_h};
  const Fibre<acc_t, acc_t> gates_all{a.gates_all};
  const F grad_x_proj{a.grad_x_proj}, grad_h0{a.grad_h0}, grad_c0{a.grad_c0};
  const F grad_hproj_all{a.grad_hproj_all};

  // Feature-major gradients with a padded batch: dh_new (into h_new of the current step),
  // dh_share (passed straight to h_prev: zoneout's share, all of it for carried rows), dc (into
  // c of the current step), and the step's gate gradients, double-buffered because the GEMM of
  // step s reads all of them while the fused epilogue writes step s + 1's. dh_new and dgates are
  // GEMM B operands (phase A with a projection, phase B), in panels.
  const Panels<acc_t, kTileVecs> dh_panels{P, nvec}, dgates_panels{G, nvec};
  const ScratchBuffer<acc_t> dh_new(dh_panels.size(), zero_filled);
  const ScratchBuffer<acc_t> dh_share(P * Bp, zero_filled), dc(H * Bp, zero_filled);
  const ScratchBuffer<acc_t> dgates(2 * dgates_panels.size(), zero_filled);

  // Backward step s undoes forward step T - 1 - s, at time btime(s).
  auto btime = [&](int64_t s) { return lay.time(T - 1 - s); };

  // dh_total = dh_carry + grad_h_all[t], split between h_new and h_prev.
  auto split = [&](int64_t s, Vec<acc_t> dh_total, int64_t p, int64_t v) {
    const int64_t t = btime(s), b0 = v * L;
    const int lanes = lay.lanes(v);
    dh_total = dh_total + grad_h_all.load(t, b0, p, lanes);
    Vec<acc_t> share = zoneout_share(zh.present(), zh.load(t, b0, p, lanes), dh_total);
    if (!lay.all_step(t, v)) share = Vec<acc_t>::blendv(dh_total, share, lay.step_mask(t, v));
    const Vec<acc_t> into_new = dh_total - share;
    share.store(&dh_share[p * Bp + b0]);
    into_new.store(&dh_new[dh_panels.at(p, v)]);
    if (proj) grad_hproj_all.store(into_new, t, b0, p, lanes);
    return into_new;
  };

  // The pointwise backward of step s for unit k, given the gradient reaching hpre.
  auto cell = [&](int64_t s, const Vec<acc_t>& dhpre, int64_t k, int64_t v) {
    const int64_t t = btime(s), b0 = v * L;
    const int lanes = lay.lanes(v);
    // The backward reads the saved gates long after the forward wrote them, from L3 or memory:
    // fetched a whole step ahead, they no longer stall each cell (10-12% of the backward at
    // T128 B16 H256); so do the lines of grad_x_proj, written feature-major.
    if (v == 0 && s + 1 < T) {
      for (int q = 0; q < 4; ++q) {
        gates_all.prefetch(btime(s + 1), q * H + k, lay.B);
        grad_x_proj.template prefetch<true>(btime(s + 1), q * H + k, lay.B);
      }
    }
    Vec<acc_t> act[4];
    for (int q = 0; q < 4; ++q) act[q] = gates_all.load(t, b0, q * H + k, lanes);
    const int64_t t_prev = lay.reverse ? t + 1 : t - 1;
    const Vec<acc_t> cp = s == T - 1 ? c0.load(0, b0, k, lanes) : c_all.load(t_prev, b0, k, lanes);
    acc_t* dc_ptr = &dc[k * Bp + b0];
    const Vec<acc_t> dc_total = Vec<acc_t>::loadu(dc_ptr) + grad_c_all.load(t, b0, k, lanes);
    Vec<acc_t> d[4];
    Vec<acc_t> dc_prev =
        cell_bwd_zoneout(act, cp, dhpre, dc_total, zc.present(), zc.load(t, b0, k, lanes), d);
    if (!lay.all_step(t, v)) {
      const Vec<acc_t> mask = lay.step_mask(t, v), zero(acc_t(0));
      for (auto& x : d) x = Vec<acc_t>::blendv(zero, x, mask);
      dc_prev = Vec<acc_t>::blendv(dc_total, dc_prev, mask);
    }
    dc_prev.store(dc_ptr);
    acc_t* dg = dgates.data() + (s % 2) * dgates_panels.size();
    for (int q = 0; q < 4; ++q) {
      d[q].store(dg + dgates_panels.at(q * H + k, v));
      grad_x_proj.store(d[q], t, b0, q * H + k, lanes);
    }
  };

  // Phase A of step s: the gradient reaching hpre (dh_new, through w_hr with a projection), then
  // the cell. Without a projection it runs fused into phase B of step s - 1, except for s = 0.
  auto phase_a = [&](int64_t s) {
    at::parallel_for(0, h_tiles, unit_grain(kTileRows * (proj ? P : 1), Bp), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k0 = i * kTileRows, rows = std::min<int64_t>(kTileRows, H - k0);
        if (proj) {
          gemm_tile(w_hr_cols.tile(i), dh_new.data(), dh_panels, P, nvec, [&](auto& acc, int64_t v0) {
            for (int r = 0; r < rows; ++r)
              for (int dv = 0; dv < vecs_of(acc); ++dv) cell(s, acc[r][dv], k0 + r, v0 + dv);
          });
        } else {
          for (int64_t k = k0; k < k0 + rows; ++k)
            for (int64_t v = 0; v < nvec; ++v) cell(s, Vec<acc_t>::loadu(&dh_new[dh_panels.at(k, v)]), k, v);
        }
      }
    });
  };

  if (T > 0) {
    at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t v = 0; v < nvec; ++v) split(0, Vec<acc_t>(acc_t(0)), p, v);
    });
    phase_a(0);
  }
  for (int64_t s = 0; s < T; ++s) {
    if (s > 0 && proj) phase_a(s);
    // Phase B: dh_prev = dgates_s @ w_hh (+ the share passed straight on), then the split of the
    // next step (and, without a projection, its cell).
    const acc_t* dg = dgates.data() + (s % 2) * dgates_panels.size();
    const int64_t active = lay.active_vecs(btime(s));
    at::parallel_for(0, p_tiles, unit_grain(kBwdRows * K_hh, Bp), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t p0 = i * kBwdRows, rows = std::min<int64_t>(kBwdRows, P - p0);
        gemm_tile(w_hh_cols.tile(i), dg, dgates_panels, K_hh, active, [&](auto& acc, int64_t v0) {
          for (int r = 0; r < rows; ++r) {
            for (int dv = 0; dv < vecs_of(acc); ++dv) {
              const int64_t p = p0 + r, v = v0 + dv;
              const Vec<acc_t> carry = acc[r][dv] + Vec<acc_t>::loadu(&dh_share[p * Bp + v * L]);
              if (s + 1 == T) {
                grad_h0.store(carry, 0, v * L, p, lay.lanes(v));
              } else {
                const Vec<acc_t> into_new = split(s + 1, carry, p, v);
                if (!proj) cell(s + 1, into_new, p, v);
              }
            }
          }
        });
      }
    });
  }
  for (int64_t k = 0; k < H; ++k)
    for (int64_t v = 0; v < nvec; ++v)
      grad_c0.store(Vec<acc_t>::loadu(&dc[k * Bp + v * L]), 0, v * L, k, lay.lanes(v));
  if (T == 0) {  // nothing ran: the gradients of h0 / c0 are zero
    const Vec<acc_t> zero(acc_t(0));
    for (int64_t p = 0; p < P; ++p)
      for (int64_t v = 0; v < nvec; ++v) grad_h0.store(zero, 0, v * L, p, lay.lanes(v));
  }
}

// ---- cell pointwise (row-major, lanes along the features) ------------------------------------

// body(b, j, n) for each row b and each run of n <= lanes features from j, rows split across
// threads once a task holds enough gate elements to pay for the fork.
template <typename acc_t, typename Body>
void for_each_cell_vector(int64_t B, int64_t H, const Body& body) {
  constexpr int L = Vec<acc_t>::size();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, 4 * H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = 0; j < H; j += L) body(b, j, static_cast<int>(std::min<int64_t>(L, H - j)));
  });
}

template <typename scalar_t>
void cell_pointwise_fwd(const LstmCellPointwiseArgs& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t H = a.H;
  const auto* gates = static_cast<const scalar_t*>(a.gates);
  const auto* cx = static_cast<const scalar_t*>(a.cx);
  auto* hy = static_cast<scalar_t*>(a.hy);
  auto* cy = static_cast<scalar_t*>(a.cy);
  for_each_cell_vector<acc_t>(a.B, H, [&](int64_t b, int64_t j, int n) {
    Vec<acc_t> gate[4];
    for (int g = 0; g < 4; ++g) gate[g] = load_n<acc_t>(gates + b * 4 * H + g * H + j, n);
    const CellOut<acc_t> cell = cell_fwd(gate, load_n<acc_t>(cx + b * H + j, n));
    store_n(cell.c_new, cy + b * H + j, n);
    store_n(cell.hpre, hy + b * H + j, n);
  });
}

template <typename scalar_t>
void cell_pointwise_bwd(const LstmCellPointwiseArgs& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t H = a.H;
  const auto* gates = static_cast<const scalar_t*>(a.gates);
  const auto* cx = static_cast<const scalar_t*>(a.cx);
  const auto* grad_hy = static_cast<const scalar_t*>(a.grad_hy);
  const auto* grad_cy = static_cast<const scalar_t*>(a.grad_cy);
  auto* grad_gates = static_cast<scalar_t*>(a.grad_gates);
  auto* grad_cx = static_cast<scalar_t*>(a.grad_cx);
  for_each_cell_vector<acc_t>(a.B, H, [&](int64_t b, int64_t j, int n) {
    Vec<acc_t> act[4], d[4];
    for (int g = 0; g < 4; ++g) act[g] = load_n<acc_t>(gates + b * 4 * H + g * H + j, n);
    activate(act);
    const int64_t row = b * H + j;
    const Vec<acc_t> dc_prev = cell_bwd(act, load_n<acc_t>(cx + row, n),
                                        load_n<acc_t>(grad_hy + row, n),
                                        load_n<acc_t>(grad_cy + row, n), d);
    for (int g = 0; g < 4; ++g) store_n(d[g], grad_gates + b * 4 * H + g * H + j, n);
    store_n(dc_prev, grad_cx + row, n);
  });
}

}  // namespace

void lstm_cell_pointwise_fwd_kernel(const LstmCellPointwiseArgs& args) {
  visit_lstm_dtype(args.dtype, [&](auto type) { cell_pointwise_fwd<decltype(type)>(args); });
}
void lstm_cell_pointwise_bwd_kernel(const LstmCellPointwiseArgs& args) {
  visit_lstm_dtype(args.dtype, [&](auto type) { cell_pointwise_bwd<decltype(type)>(args); });
}
int64_t lstm_unit_lanes_below() { return kUnitLaneBatch; }
bool lstm_bf16_rows_on_brgemm() {
#ifdef CPU_CAPABILITY_AVX512
  return cpu_brgemm::use_for_bf16();
#else
  return false;
#endif
}
// A one-step call takes its recurrent product outside the kernel wherever the kernel would put
// its lanes along the units: those pack w_hh for the step, a pass over the weight as long as
// the step's own product. With the gates from lstm_step_gates (float32 on avx2 and avx512),
// inference steps of B16-31 ran 1.4-1.8x faster than through the kernel and 1.3-1.45x faster
// than on two GEMMs, training steps 1.25-1.45x faster at H256-512 and even at H1024 (Xeon with
// AMX, 2 threads; the avx2 build at B8-15 on the same CPU: inference 1.2-1.7x, training
// 1.05-1.3x). From two vectors the batch lanes read w_hh in place, and the kernel beat
// lstm_step_gates there by 1.2-1.35x (inference, B32-128).
bool lstm_layer_step_on_gemm(int64_t batch) { return unit_lanes(batch); }
void lstm_layer_fwd_kernel(const LstmLayerFwdArgs& args) {
  visit_lstm_dtype(args.shape.dtype, [&](auto type) { layer_fwd<decltype(type)>(args); });
}
void lstm_layer_bwd_kernel(const LstmLayerBwdArgs& args) {
  visit_lstm_dtype(args.shape.dtype, [&](auto type) { layer_bwd<decltype(type)>(args); });
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
