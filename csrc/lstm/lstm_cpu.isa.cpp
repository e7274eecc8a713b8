// CPU LSTM layer kernels: the whole recurrence of one layer in one direction per call.
//
// Per step, a tile of cell units x batch lanes computes its slice of h_prev @ w_hh^T in
// registers and runs the gate math on the accumulators before anything is written, so the gate
// pre-activations never go through memory and a step is one parallel region. The tile is
// weights-stationary: a weight element is broadcast and the recurrent state is kept feature-major
// with a padded batch ([units, Bp]), so the batch lanes are plain vector loads and the weights are
// read in the layout torch keeps them, without packing. The backward mirrors it: the GEMM
// dh_prev = dgates @ w_hh runs on w_hh^T rows and the next step's pointwise backward runs on its
// accumulators. Weight gradients are whole-sequence GEMMs in the glue (lstm_cpu.cpp).
//
// Compiled once per x86 ISA (csrc/include/fastattn/cpu_isa.h): at::vec::Vectorized<float> holds
// 8 lanes in the AVX2 build, 16 in the AVX-512 one.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fastattn/lstm_cpu.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Rows of a tile (cell units, or the four gates of one unit) and the most batch vectors per tile:
// 4 x 3 accumulators plus 3 batch vectors and one broadcast fill the 16 AVX2 registers.
constexpr int kTileRows = 4;
constexpr int kTileVecs = 3;

template <typename acc_t>
inline Vec<acc_t> sigmoid(const Vec<acc_t>& x) {
  const Vec<acc_t> one(acc_t(1));
  return one / (one + x.neg().exp_u20());
}

// tanh(x) = 2 * sigmoid(2x) - 1: one exp and one division, a third of the library tanh's cost;
// the absolute error near 0 stays at the dtype's rounding step.
template <typename acc_t>
inline Vec<acc_t> tanh(const Vec<acc_t>& x) {
  const Vec<acc_t> one(acc_t(1)), two(acc_t(2));
  return two / (one + (x * Vec<acc_t>(acc_t(-2))).exp_u20()) - one;
}

// Batch lanes b0 .. b0 + lanes - 1 of one (t, f) fibre of a data tensor, as math-type vectors.
template <typename scalar_t, typename acc_t>
struct Fibre {
  static constexpr int kLanes = Vec<acc_t>::size();
  const LstmSeqView& view;

  bool present() const { return view.data != nullptr; }
  scalar_t* at(int64_t t, int64_t b, int64_t f) const {
    return static_cast<scalar_t*>(view.data) + t * view.st + b * view.sb + f * view.sf;
  }
  // An absent tensor reads as zeros and ignores stores.
  Vec<acc_t> load(int64_t t, int64_t b0, int64_t f, int lanes) const {
    if (!present()) return Vec<acc_t>(acc_t(0));
    const scalar_t* p = at(t, b0, f);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (view.sb == 1) return lanes == kLanes ? Vec<acc_t>::loadu(p) : Vec<acc_t>::loadu(p, lanes);
    }
    alignas(64) acc_t tmp[kLanes] = {};
    for (int l = 0; l < lanes; ++l) tmp[l] = static_cast<acc_t>(p[l * view.sb]);
    return Vec<acc_t>::loadu(tmp);
  }
  // Feature-major fibres of one step lie one cache line apart per feature, a stride the hardware
  // prefetchers miss: the kernels ask for the next unit's lines while computing this one's.
  void prefetch(int64_t t, int64_t f, int64_t B) const {
    if (!present() || view.sb != 1) return;
    constexpr int64_t kLine = 64 / sizeof(scalar_t);
    for (int64_t b = 0; b < B; b += kLine) __builtin_prefetch(at(t, b, f));
  }
  void store(const Vec<acc_t>& v, int64_t t, int64_t b0, int64_t f, int lanes) const {
    if (!present()) return;
    scalar_t* p = at(t, b0, f);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (view.sb == 1) return lanes == kLanes ? v.store(p) : v.store(p, lanes);
    }
    alignas(64) acc_t tmp[kLanes];
    v.store(tmp);
    for (int l = 0; l < lanes; ++l) p[l * view.sb] = static_cast<scalar_t>(tmp[l]);
  }
};

// acc[r][v] = sum_k a[r][k] * b[k * ldb + v * lanes], for R rows and V batch vectors.
template <typename acc_t, int R, int V>
inline void tile_gemm(Vec<acc_t> (&acc)[R][V], const acc_t* const* a, const acc_t* b, int64_t ldb,
                      int64_t K) {
  constexpr int L = Vec<acc_t>::size();
  // Local accumulators and row pointers: through `acc` and `a` the compiler would have to assume
  // that every store may alias the loads, and keep the sums in memory.
  Vec<acc_t> c[R][V];
  const acc_t* rows[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = a[r];
    for (int v = 0; v < V; ++v) c[r][v] = Vec<acc_t>(acc_t(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec<acc_t> bv[V];
    for (int v = 0; v < V; ++v) bv[v] = Vec<acc_t>::loadu(b + k * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      const Vec<acc_t> av(rows[r][k]);
      for (int v = 0; v < V; ++v) c[r][v] = at::vec::fmadd(av, bv[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = c[r][v];
}

// Every batch vector of an R-row tile: tile_gemm over vectors [v0, v0 + V) of b, then
// epilogue(acc, v0). Vectors at or past `active` get K = 0 (zero accumulators): their rows carry.
template <typename acc_t, int R, typename Epilogue>
inline void gemm_rows(const acc_t* const* a, const acc_t* b, int64_t ldb, int64_t K, int64_t nvec,
                      int64_t active, const Epilogue& epilogue) {
  constexpr int L = Vec<acc_t>::size();
  for (int64_t v0 = 0; v0 < nvec;) {
    const int64_t k = v0 < active ? K : 0;
    const int64_t left = (v0 < active ? active : nvec) - v0;
    if (left >= kTileVecs) {
      Vec<acc_t> acc[R][kTileVecs];
      tile_gemm<acc_t, R, kTileVecs>(acc, a, b + v0 * L, ldb, k);
      epilogue(acc, v0);
      v0 += kTileVecs;
    } else if (left == 2) {
      Vec<acc_t> acc[R][2];
      tile_gemm<acc_t, R, 2>(acc, a, b + v0 * L, ldb, k);
      epilogue(acc, v0);
      v0 += 2;
    } else {
      Vec<acc_t> acc[R][1];
      tile_gemm<acc_t, R, 1>(acc, a, b + v0 * L, ldb, k);
      epilogue(acc, v0);
      v0 += 1;
    }
  }
}

// Rows [r0, r0 + rows) of a [rows_total, K] matrix `w` against b, in tiles of up to kTileRows:
// epilogue(acc, v0, r) gets the accumulators of rows r .. r + R - 1.
template <typename acc_t, typename Epilogue>
inline void gemm_row_range(const acc_t* w, int64_t K, int64_t r0, int64_t r1, const acc_t* b,
                           int64_t ldb, int64_t nvec, int64_t active, const Epilogue& epilogue) {
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const acc_t* a[kTileRows];
    for (int i = 0; i < kTileRows; ++i) a[i] = w + std::min(r + i, r1 - 1) * K;
    auto tile = [&](auto& acc, int64_t v0) { epilogue(acc, v0, r); };
    switch (std::min<int64_t>(kTileRows, r1 - r)) {
      case 4: gemm_rows<acc_t, 4>(a, b, ldb, K, nvec, active, tile); break;
      case 3: gemm_rows<acc_t, 3>(a, b, ldb, K, nvec, active, tile); break;
      case 2: gemm_rows<acc_t, 2>(a, b, ldb, K, nvec, active, tile); break;
      default: gemm_rows<acc_t, 1>(a, b, ldb, K, nvec, active, tile); break;
    }
  }
}

template <typename T>
constexpr int rows_of(const T&) { return std::extent_v<T, 0>; }
template <typename T>
constexpr int vecs_of(const T&) { return std::extent_v<T, 1>; }

// Enough tiles per thread that the parallel region's fork is a small share of a step.
inline int64_t unit_grain(int64_t K, int64_t Bp) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, 4 * K * Bp));
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

// ---- forward ---------------------------------------------------------------------------------

template <typename scalar_t>
void layer_fwd(const LstmLayerFwdArgs& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using F = Fibre<scalar_t, acc_t>;
  constexpr int L = Vec<acc_t>::size();
  const Layout<acc_t> lay(a.shape);
  const int64_t H = lay.H, P = lay.P, Bp = lay.Bp, nvec = lay.nvec;
  const bool proj = a.w_hr != nullptr;
  const auto* w_hh = static_cast<const acc_t*>(a.w_hh);
  const auto* w_hr = static_cast<const acc_t*>(a.w_hr);
  const int64_t K = w_hh ? P : 0;
  const F x_proj{a.x_proj}, h0{a.h0}, c0{a.c0}, zc{a.zoneout_c}, zh{a.zoneout_h};
  const F h_all{a.h_all}, c_all{a.c_all}, gates_all{a.gates_all}, hpre_all{a.hpre_all};

  // Feature-major state: h double-buffered (a step reads all of h_prev), c updated in place.
  std::vector<acc_t> h_buf(2 * P * Bp, acc_t(0)), c_buf(H * Bp, acc_t(0)), hpre_buf(proj ? H * Bp : 0);
  for (int64_t v = 0; v < nvec; ++v) {
    for (int64_t p = 0; p < P; ++p) h0.load(0, v * L, p, lay.lanes(v)).store(&h_buf[p * Bp + v * L]);
    for (int64_t j = 0; j < H; ++j) c0.load(0, v * L, j, lay.lanes(v)).store(&c_buf[j * Bp + v * L]);
  }

  for (int64_t s = 0; s < lay.T; ++s) {
    const int64_t t = lay.time(s), active = lay.active_vecs(t);
    const acc_t* h_prev = h_buf.data() + (s % 2) * P * Bp;
    acc_t* h_next = h_buf.data() + ((s + 1) % 2) * P * Bp;

    // h = lerp(h_new, h_prev, zoneout_h) for carried-or-stepping lanes, to state and output.
    auto emit_h = [&](Vec<acc_t> h_new, int64_t p, int64_t v) {
      const int lanes = lay.lanes(v);
      const Vec<acc_t> hp = Vec<acc_t>::loadu(h_prev + p * Bp + v * L);
      if (zh.present()) h_new = h_new + zh.load(t, v * L, p, lanes) * (hp - h_new);
      if (!lay.all_step(t, v)) h_new = Vec<acc_t>::blendv(hp, h_new, lay.step_mask(t, v));
      h_new.store(h_next + p * Bp + v * L);
      h_all.store(h_new, t, v * L, p, lanes);
    };

    // Phase 1: per cell unit j, the four gate rows of w_hh against h_prev, then the cell.
    at::parallel_for(0, H, unit_grain(4 * K, Bp), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        if (j + 1 < j1) {
          for (int g = 0; g < 4; ++g) {
            x_proj.prefetch(t, g * H + j + 1, lay.B);
            gates_all.prefetch(t, g * H + j + 1, lay.B);
          }
        }
        const acc_t* rows[kTileRows];
        for (int g = 0; g < 4; ++g) rows[g] = w_hh ? w_hh + (g * H + j) * K : nullptr;
        gemm_rows<acc_t, 4>(rows, h_prev, Bp, K, nvec, active, [&](auto& acc, int64_t v0) {
          for (int dv = 0; dv < vecs_of(acc); ++dv) {
            const int64_t v = v0 + dv;
            const int lanes = lay.lanes(v);
            const int64_t b0 = v * L;
            Vec<acc_t> gate[4];
            for (int g = 0; g < 4; ++g) gate[g] = acc[g][dv] + x_proj.load(t, b0, g * H + j, lanes);
            const Vec<acc_t> i = sigmoid(gate[0]), f = sigmoid(gate[1]);
            const Vec<acc_t> gg = tanh(gate[2]), o = sigmoid(gate[3]);
            acc_t* cp_ptr = &c_buf[j * Bp + b0];
            const Vec<acc_t> cp = Vec<acc_t>::loadu(cp_ptr);
            const Vec<acc_t> c_new = f * cp + i * gg;
            Vec<acc_t> c = zc.present() ? c_new + zc.load(t, b0, j, lanes) * (cp - c_new) : c_new;
            Vec<acc_t> hpre = o * tanh(c_new);
            Vec<acc_t> act[4] = {i, f, gg, o};
            if (!lay.all_step(t, v)) {
              const Vec<acc_t> mask = lay.step_mask(t, v), zero(acc_t(0));
              c = Vec<acc_t>::blendv(cp, c, mask);
              hpre = Vec<acc_t>::blendv(zero, hpre, mask);
              for (auto& x : act) x = Vec<acc_t>::blendv(zero, x, mask);
            }
            c.store(cp_ptr);
            c_all.store(c, t, b0, j, lanes);
            for (int g = 0; g < 4; ++g) gates_all.store(act[g], t, b0, g * H + j, lanes);
            if (proj) {
              hpre.store(&hpre_buf[j * Bp + b0]);
              hpre_all.store(hpre, t, b0, j, lanes);
            } else {
              emit_h(hpre, j, v);
            }
          }
        });
      }
    });

    // Phase 2 (projection): h_new = hpre @ w_hr^T, per tile of projected units.
    if (proj) {
      const int64_t tiles = (P + kTileRows - 1) / kTileRows;
      at::parallel_for(0, tiles, unit_grain(kTileRows * H, Bp), [&](int64_t i0, int64_t i1) {
        gemm_row_range(w_hr, H, i0 * kTileRows, std::min(P, i1 * kTileRows), hpre_buf.data(), Bp,
                       nvec, nvec, [&](auto& acc, int64_t v0, int64_t p0) {
                         for (int r = 0; r < rows_of(acc); ++r)
                           for (int dv = 0; dv < vecs_of(acc); ++dv) emit_h(acc[r][dv], p0 + r, v0 + dv);
                       });
      });
    }
  }
}

// ---- backward --------------------------------------------------------------------------------

template <typename scalar_t>
void layer_bwd(const LstmLayerBwdArgs& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using F = Fibre<scalar_t, acc_t>;
  constexpr int L = Vec<acc_t>::size();
  const Layout<acc_t> lay(a.shape);
  const int64_t T = lay.T, H = lay.H, P = lay.P, G = lay.G, Bp = lay.Bp, nvec = lay.nvec;
  const bool proj = a.w_hr_t != nullptr;
  const auto* w_hh_t = static_cast<const acc_t*>(a.w_hh_t);
  const auto* w_hr_t = static_cast<const acc_t*>(a.w_hr_t);
  const int64_t K_hh = w_hh_t ? G : 0;
  const F grad_h_all{a.grad_h_all}, grad_c_all{a.grad_c_all}, c0{a.c0}, c_all{a.c_all};
  const F gates_all{a.gates_all}, zc{a.zoneout_c}, zh{a.zoneout_h};
  const F grad_x_proj{a.grad_x_proj}, grad_h0{a.grad_h0}, grad_c0{a.grad_c0};
  const F grad_hproj_all{a.grad_hproj_all};

  // Feature-major gradients with a padded batch: dh_new (into h_new of the current step),
  // dh_share (passed straight to h_prev: zoneout's share, all of it for carried rows), dc (into
  // c of the current step), and the step's gate gradients, double-buffered because the GEMM of
  // step s reads all of them while the fused epilogue writes step s + 1's.
  std::vector<acc_t> dh_new(P * Bp, acc_t(0)), dh_share(P * Bp, acc_t(0)), dc(H * Bp, acc_t(0));
  std::vector<acc_t> dgates(2 * G * Bp, acc_t(0));

  // Backward step s undoes forward step T - 1 - s, at time btime(s).
  auto btime = [&](int64_t s) { return lay.time(T - 1 - s); };

  // dh_total = dh_carry + grad_h_all[t], split between h_new and h_prev.
  auto split = [&](int64_t s, Vec<acc_t> dh_total, int64_t p, int64_t v) {
    const int64_t t = btime(s), b0 = v * L;
    const int lanes = lay.lanes(v);
    dh_total = dh_total + grad_h_all.load(t, b0, p, lanes);
    Vec<acc_t> share = zh.present() ? zh.load(t, b0, p, lanes) * dh_total : Vec<acc_t>(acc_t(0));
    if (!lay.all_step(t, v)) share = Vec<acc_t>::blendv(dh_total, share, lay.step_mask(t, v));
    const Vec<acc_t> into_new = dh_total - share;
    share.store(&dh_share[p * Bp + b0]);
    into_new.store(&dh_new[p * Bp + b0]);
    if (proj) grad_hproj_all.store(into_new, t, b0, p, lanes);
    return into_new;
  };

  // The pointwise backward of step s for unit k, given the gradient reaching hpre.
  auto cell = [&](int64_t s, const Vec<acc_t>& dhpre, int64_t k, int64_t v) {
    const int64_t t = btime(s), b0 = v * L;
    const int lanes = lay.lanes(v);
    const Vec<acc_t> one(acc_t(1));
    const Vec<acc_t> i = gates_all.load(t, b0, k, lanes), f = gates_all.load(t, b0, H + k, lanes);
    const Vec<acc_t> g = gates_all.load(t, b0, 2 * H + k, lanes);
    const Vec<acc_t> o = gates_all.load(t, b0, 3 * H + k, lanes);
    const int64_t t_prev = lay.reverse ? t + 1 : t - 1;
    const Vec<acc_t> cp = s == T - 1 ? c0.load(0, b0, k, lanes) : c_all.load(t_prev, b0, k, lanes);
    acc_t* dc_ptr = &dc[k * Bp + b0];
    const Vec<acc_t> dc_total = Vec<acc_t>::loadu(dc_ptr) + grad_c_all.load(t, b0, k, lanes);
    const Vec<acc_t> tc = tanh(f * cp + i * g);
    Vec<acc_t> dc_to_prev(acc_t(0)), dc_new = dc_total;
    if (zc.present()) {
      dc_to_prev = zc.load(t, b0, k, lanes) * dc_total;
      dc_new = dc_total - dc_to_prev;
    }
    dc_new = dc_new + dhpre * o * (one - tc * tc);
    Vec<acc_t> d[4] = {dc_new * g * i * (one - i), dc_new * cp * f * (one - f),
                       dc_new * i * (one - g * g), dhpre * tc * o * (one - o)};
    Vec<acc_t> dc_prev = dc_new * f + dc_to_prev;
    if (!lay.all_step(t, v)) {
      const Vec<acc_t> mask = lay.step_mask(t, v), zero(acc_t(0));
      for (auto& x : d) x = Vec<acc_t>::blendv(zero, x, mask);
      dc_prev = Vec<acc_t>::blendv(dc_total, dc_prev, mask);
    }
    dc_prev.store(dc_ptr);
    acc_t* dg = dgates.data() + (s % 2) * G * Bp;
    for (int q = 0; q < 4; ++q) {
      d[q].store(dg + (q * H + k) * Bp + b0);
      grad_x_proj.store(d[q], t, b0, q * H + k, lanes);
    }
  };

  const int64_t unit_tiles_h = (H + kTileRows - 1) / kTileRows;
  const int64_t unit_tiles_p = (P + kTileRows - 1) / kTileRows;

  // Phase A of step s: the gradient reaching hpre (dh_new, through w_hr with a projection), then
  // the cell. Without a projection it runs fused into phase B of step s - 1, except for s = 0.
  auto phase_a = [&](int64_t s) {
    at::parallel_for(0, unit_tiles_h, unit_grain(kTileRows * (proj ? P : 1), Bp), [&](int64_t i0, int64_t i1) {
      const int64_t k0 = i0 * kTileRows, k1 = std::min(H, i1 * kTileRows);
      if (proj) {
        gemm_row_range(w_hr_t, P, k0, k1, dh_new.data(), Bp, nvec, nvec,
                       [&](auto& acc, int64_t v0, int64_t k) {
                         for (int r = 0; r < rows_of(acc); ++r)
                           for (int dv = 0; dv < vecs_of(acc); ++dv) cell(s, acc[r][dv], k + r, v0 + dv);
                       });
      } else {
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t v = 0; v < nvec; ++v) cell(s, Vec<acc_t>::loadu(&dh_new[k * Bp + v * L]), k, v);
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
    const acc_t* dg = dgates.data() + (s % 2) * G * Bp;
    const int64_t active = lay.active_vecs(btime(s));
    at::parallel_for(0, unit_tiles_p, unit_grain(kTileRows * K_hh, Bp), [&](int64_t i0, int64_t i1) {
      gemm_row_range(w_hh_t, K_hh, i0 * kTileRows, std::min(P, i1 * kTileRows), dg, Bp, nvec, active,
                     [&](auto& acc, int64_t v0, int64_t p) {
                       for (int r = 0; r < rows_of(acc); ++r) {
                         for (int dv = 0; dv < vecs_of(acc); ++dv) {
                           const int64_t v = v0 + dv;
                           const Vec<acc_t> carry = acc[r][dv] + Vec<acc_t>::loadu(&dh_share[(p + r) * Bp + v * L]);
                           if (s + 1 == T) {
                             grad_h0.store(carry, 0, v * L, p + r, lay.lanes(v));
                           } else {
                             const Vec<acc_t> into_new = split(s + 1, carry, p + r, v);
                             if (!proj) cell(s + 1, into_new, p + r, v);
                           }
                         }
                       }
                     });
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

template <template <typename> class Fn, typename Args>
void dispatch(const Args& a) {
  switch (a.shape.dtype) {
    case LstmDtype::Float32: return Fn<float>::run(a);
    case LstmDtype::Float64: return Fn<double>::run(a);
    case LstmDtype::BFloat16: return Fn<c10::BFloat16>::run(a);
    case LstmDtype::Float16: return Fn<c10::Half>::run(a);
  }
}

template <typename scalar_t>
struct LayerFwd {
  static void run(const LstmLayerFwdArgs& a) { layer_fwd<scalar_t>(a); }
};
template <typename scalar_t>
struct LayerBwd {
  static void run(const LstmLayerBwdArgs& a) { layer_bwd<scalar_t>(a); }
};

}  // namespace

void lstm_layer_fwd_kernel(const LstmLayerFwdArgs& args) { dispatch<LayerFwd>(args); }
void lstm_layer_bwd_kernel(const LstmLayerBwdArgs& args) { dispatch<LayerBwd>(args); }

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
