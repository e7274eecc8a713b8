// Persistent whole-sequence LSTM forward and backward (one layer, one direction, every layer
// option but projection: either time order, packed rows, zoneout; H <= 256), torch-free.
//
// Forward work split. The grid is (slices, batch_ctas). CTA (s, y) owns the hidden units
// [s * units, (s + 1) * units) and keeps the 4 * units rows of w_hh that produce their gates
// (i, f, g, o of each unit) in shared memory for the whole sequence, loaded once. It serves
// the batch tiles y, y + batch_ctas, ... of kBatchTile rows each. Per time step t and tile:
//   1. stage h_{t-1} [kBatchTile, H] of the tile in shared memory as the math type;
//   2. recurrent product rec [kBatchTile, 4 * units] = h_{t-1} @ w_slice^T: one warp per w row,
//      lanes split the H reduction (consecutive k, so w and h reads are bank-conflict free),
//      then a butterfly reduction across the warp;
//   3. pointwise cell for its units: gates = rec + x_proj[t], activations, c, h; writes
//      h_all[t], c_all[t] and the activated gates_all[t] for its units only. Packed: rows
//      b >= batch_sizes[t] carry their state instead (gates zero), and zoneout mixes the
//      previous state in, as lstm_step_fwd_kernel does.
//
// Backward work split: the same grid and tiles, the steps in reverse. The gradient reaching
// h_t of a unit u is grad_h[t] + sum over the 4H gate rows r of grad_gates[t+1][r] * w_hh[r][u],
// so the CTA keeps the w_hh COLUMNS of its units (again 4 * units * H elements): its row
// q * units + u is column u of w_hh's gate-q block, w_hh[q*H : (q+1)*H, u]. Per step and tile:
//   1. stage grad_gates[t+1] [kBatchTile, 4H] (every unit's, math type), unless t = T-1;
//   2. the same product, row q * units + u reducing over gate q's H gradients: 4 partial sums
//      per unit, which the pointwise pass adds, so 4 * units warps' worth of rows as forward;
//   3. pointwise backward of its units (as lstm_step_bwd_kernel): c recomputed
//      from the saved activated gates and c_{t-1}; writes grad_gates[t]; the carried gradient
//      of c lives in grad_c0 (each element read and written by one fixed thread), and the
//      share of h's that skips the gates (a carried row's, zoneout's) in grad_h0.
// After the step t = 0 and its grid barrier, one more staging and product gives grad_h0.
//
// Synchronization (cannot be tested on this machine; reasoned here). Forward step t of every
// CTA reads all of h_all[t - 1] (every slice's units), which other CTAs wrote during step t - 1.
// Exactly one grid-wide barrier per step orders this: cooperative_groups::this_grid().sync()
// at the end of each step. The kernel must be launched with cudaLaunchCooperativeKernel (the
// launcher does), which guarantees all CTAs are co-resident or fails the launch instead of
// deadlocking. grid.sync() is a gpu-scope barrier with release/acquire semantics (it fences
// before arriving and after leaving), so every h_all[t - 1] store made before it is visible
// to loads after it. One barrier suffices because a step writes only h_all[t] / c_all[t] /
// gates_all[t] and reads only h_all[t - 1] / c_all[t - 1] / x_proj[t]: no location is
// written and read by different CTAs within the same step (write-after-read across steps is
// impossible since each step writes a fresh time slice; reversed, read t + 1 for t - 1). The
// backward is the mirror image: step t writes grad_gates[t] and reads grad_gates[t + 1], the
// forward's saved tensors and the grad_c0 / grad_h0 elements of its own threads. Loads of
// values written by other CTAs use ld.global.cg (L2, the coherence point), never the SM-local
// L1, so no stale line (for example one shared with h_all[t - 2] at a slice boundary) can be
// read.
// c_{t-1} of a unit is written and read by the same CTA (and, with the fixed thread mapping,
// the same thread); it is read back through L2 as well, which costs nothing extra.
// Within a CTA, two __syncthreads() per tile separate staging, the product (reads the staged
// tile, writes rec) and the pointwise pass (reads rec); the next tile's staging only starts
// after the product that read the staged tile finished (second barrier), and its product only
// writes rec after every thread passed the next first barrier, i.e. finished the previous
// pointwise pass.
//
// Rounding: forward states are stored in the tensor dtype and the next step reads them back
// from there, exactly like a loop of lstm_cell_pointwise_fwd calls; the math is float32
// (float64 for float64), and the activated gates are saved in it (LstmSequenceFwdParams). The
// backward keeps every gradient in the math type, as the layer backward's loop does.
#pragma once

#include <cooperative_groups.h>

#include "lstm_cell.cuh"

namespace fastattn {
namespace lstm {

constexpr int kSequenceThreads = 256;
constexpr int kSequenceWarps = kSequenceThreads / 32;
constexpr int kBatchTile = 8;

// Dynamic shared memory of one CTA: the staged tile [kBatchTile, staged] (h_{t-1} forward,
// staged = H; grad_gates[t+1] backward, staged = 4H), the product tile [kBatchTile, 4 * units],
// then its 4 * units rows of w_hh (forward) or columns (backward), H elements each.
template <typename T>
struct SequenceSmem {
  int64_t hidden, units, staged;
  __host__ __device__ SequenceSmem(int64_t hidden_, int64_t units_, int64_t staged_)
      : hidden(hidden_), units(units_), staged(staged_) {}
  __host__ __device__ int64_t staged_elems() const { return kBatchTile * staged; }
  __host__ __device__ int64_t rec_elems() const { return kBatchTile * 4 * units; }
  __host__ __device__ int64_t w_elems() const { return 4 * units * hidden; }
  __host__ __device__ size_t bytes() const {
    return (staged_elems() + rec_elems()) * sizeof(acc_t<T>) + w_elems() * sizeof(T);
  }
};

// Loads through L2 only (see the synchronization note above).
__device__ __forceinline__ float load_l2(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double load_l2(const double* p) { return __ldcg(p); }
__device__ __forceinline__ float load_l2(const __half* p) { return __half2float(__ldcg(p)); }
__device__ __forceinline__ float load_l2(const __nv_bfloat16* p) { return __bfloat162float(__ldcg(p)); }

// Stages rows b0 .. b0 + tile_rows of a [B, width] matrix that other CTAs wrote into the
// [kBatchTile, width] tile `dst` as the math type; rows past the batch are zero.
template <typename A, typename S>
__device__ __forceinline__ void stage_tile(A* dst, const S* src, int64_t b0, int tile_rows,
                                           int64_t width) {
  for (int64_t e = threadIdx.x; e < kBatchTile * width; e += blockDim.x) {
    const int64_t bb = e / width;
    dst[e] = bb < tile_rows ? load_l2(src + (b0 + bb) * width + e % width) : A(0);
  }
}

// The CTA's 4 * units rows of H weights in w_s: row r serves gate r / units of unit
// unit0 + r % units, as w_hh's row of that gate and unit (forward), or with `columns` as the
// unit's column of w_hh's gate block (backward); zero for units past H.
template <typename T>
__device__ __forceinline__ void load_weight_slice(T* w_s, const T* w_hh, int64_t H, int64_t unit0,
                                                  int units, bool columns) {
  for (int64_t e = threadIdx.x; e < 4 * units * H; e += blockDim.x) {
    const int64_t r = e / H, k = e % H;
    const int64_t unit = unit0 + r % units, gate = r / units;
    const int64_t at = columns ? (gate * H + k) * H + unit : (gate * H + unit) * H + k;
    w_s[e] = unit < H ? w_hh[at] : from_acc<T>(acc_t<T>(0));
  }
}

// rec_s[bb, r] = sum over k < H of w_s[r, k] * staged[bb, (r / units) * gate_stride + k] for
// the CTA's 4 * units rows r: one warp per row, lanes split k, a butterfly across the warp.
// gate_stride 0 reads the staged h (forward); H reads gate q's gradients (backward).
template <typename T, typename A>
__device__ __forceinline__ void tile_product(const T* w_s, const A* staged, int64_t staged_width,
                                             int64_t gate_stride, int units, int64_t H, A* rec_s) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, rows = 4 * units;
  for (int r = warp; r < rows; r += kSequenceWarps) {
    A acc[kBatchTile];
#pragma unroll
    for (int bb = 0; bb < kBatchTile; ++bb) acc[bb] = A(0);
    const T* w_row = w_s + int64_t(r) * H;
    const A* s_row = staged + (r / units) * gate_stride;
    for (int64_t k = lane; k < H; k += 32) {
      const A w = to_acc(w_row[k]);
#pragma unroll
      for (int bb = 0; bb < kBatchTile; ++bb) acc[bb] += w * s_row[bb * staged_width + k];
    }
#pragma unroll
    for (int bb = 0; bb < kBatchTile; ++bb) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        acc[bb] += __shfl_xor_sync(0xffffffffu, acc[bb], offset);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int bb = 0; bb < kBatchTile; ++bb) rec_s[bb * rows + r] = acc[bb];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kSequenceThreads)
lstm_sequence_fwd_kernel(LstmSequenceFwdParams p, int units) {
  using A = acc_t<T>;
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();

  const int64_t H = p.hidden, B = p.batch;
  const int64_t unit0 = int64_t(blockIdx.x) * units;
  const SequenceSmem<T> layout(H, units, H);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* h_s = reinterpret_cast<A*>(smem_raw);                        // [kBatchTile, H]
  A* rec_s = h_s + layout.staged_elems();                         // [kBatchTile, 4 * units]
  T* w_s = reinterpret_cast<T*>(rec_s + layout.rec_elems());      // [4 * units, H]
  const int rows = 4 * units;  // w_s row r = gate (r / units) of unit unit0 + r % units

  load_weight_slice(w_s, static_cast<const T*>(p.w_hh), H, unit0, units, false);
  // The first staging barrier below also orders these stores before the first product.

  const T* x_proj = static_cast<const T*>(p.x_proj);
  T* h_all = static_cast<T*>(p.h_all);
  T* c_all = static_cast<T*>(p.c_all);
  A* gates_all = static_cast<A*>(p.gates_all);  // in A, as the layer op saves them
  const T* zoneout_c = static_cast<const T*>(p.zoneout_c);
  const T* zoneout_h = static_cast<const T*>(p.zoneout_h);
  const int64_t tiles = (B + kBatchTile - 1) / kBatchTile;

  const int64_t dir = p.reverse ? -1 : 1;  // step s runs time t = s, or T-1-s reversed
  for (int64_t s = 0; s < p.seq_len; ++s) {
    const int64_t t = p.reverse ? p.seq_len - 1 - s : s;
    const T* h_prev = s == 0 ? static_cast<const T*>(p.h0) : h_all + (t - dir) * B * H;  // [B, H]
    const T* c_prev = s == 0 ? static_cast<const T*>(p.c0) : c_all + (t - dir) * B * H;  // [B, H]
    const int64_t stepping = p.batch_sizes == nullptr ? B : p.batch_sizes[t];
    for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
      const int64_t b0 = tile * kBatchTile;
      const int tile_rows = static_cast<int>(B - b0 < kBatchTile ? B - b0 : kBatchTile);

      stage_tile(h_s, h_prev, b0, tile_rows, H);
      __syncthreads();

      tile_product(w_s, h_s, H, 0, units, H, rec_s);
      __syncthreads();

      for (int e = threadIdx.x; e < tile_rows * units; e += blockDim.x) {
        const int bb = e / units, u = e % units;
        const int64_t unit = unit0 + u, b = b0 + bb;
        if (unit >= H) continue;
        const int64_t state = (t * B + b) * H + unit;
        A* gates = gates_all + (t * B + b) * 4 * H + unit;
        if (b >= stepping) {  // a carried row: its state passes through, its gates are zero
          for (int q = 0; q < 4; ++q) gates[q * H] = A(0);
          c_all[state] = from_acc<T>(load_l2(c_prev + b * H + unit));
          h_all[state] = from_acc<T>(load_l2(h_prev + b * H + unit));
          continue;
        }
        const T* x = x_proj + (t * B + b) * 4 * H + unit;  // gate chunk q at x[q * H]
        const A* rec = rec_s + bb * rows + u;               // gate chunk q at rec[q * units]
        const A i = sigmoid(rec[0] + to_acc(x[0]));
        const A f = sigmoid(rec[units] + to_acc(x[H]));
        const A g = tanh_(rec[2 * units] + to_acc(x[2 * H]));
        const A o = sigmoid(rec[3 * units] + to_acc(x[3 * H]));
        const A c_before = load_l2(c_prev + b * H + unit);
        A c = f * c_before + i * g;
        A h = o * tanh_(c);  // from the cell's c, before zoneout mixes it
        if (zoneout_c != nullptr) c += to_acc(zoneout_c[state]) * (c_before - c);
        if (zoneout_h != nullptr) h += to_acc(zoneout_h[state]) * (load_l2(h_prev + b * H + unit) - h);
        gates[0] = i;
        gates[H] = f;
        gates[2 * H] = g;
        gates[3 * H] = o;
        c_all[state] = from_acc<T>(c);
        h_all[state] = from_acc<T>(h);
      }
    }
    grid.sync();
  }
}

template <typename T>
__global__ void __launch_bounds__(kSequenceThreads)
lstm_sequence_bwd_kernel(LstmSequenceBwdParams p, int units) {
  using A = acc_t<T>;
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();

  const int64_t H = p.hidden, B = p.batch, G = 4 * H, T_len = p.seq_len;
  const int64_t unit0 = int64_t(blockIdx.x) * units;
  const SequenceSmem<T> layout(H, units, G);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* dg_s = reinterpret_cast<A*>(smem_raw);                       // [kBatchTile, 4H]
  A* rec_s = dg_s + layout.staged_elems();                        // [kBatchTile, 4 * units]
  T* w_s = reinterpret_cast<T*>(rec_s + layout.rec_elems());      // [4 * units, H]
  const int rows = 4 * units;  // w_s row r = w_hh[q*H : (q+1)*H, unit0 + r % units], q = r / units

  load_weight_slice(w_s, static_cast<const T*>(p.w_hh), H, unit0, units, true);
  // The first staging barrier below orders these stores before the first product; the step
  // t = T-1 has no product, and its grid barrier orders them.

  const T* grad_h_all = static_cast<const T*>(p.grad_h_all);
  const T* grad_c_all = static_cast<const T*>(p.grad_c_all);
  const T* c_all = static_cast<const T*>(p.c_all);
  const T* c0 = static_cast<const T*>(p.c0);
  const A* gates_all = static_cast<const A*>(p.gates_all);
  A* grad_gates_all = static_cast<A*>(p.grad_gates_all);
  A* grad_c0 = static_cast<A*>(p.grad_c0);  // the carried gradient of c until the end
  // The gradient that passes from a step's h to the previous step's h without the gates (a
  // carried row's, zoneout's share), until the end.
  A* grad_h0 = static_cast<A*>(p.grad_h0);
  const bool packed = p.batch_sizes != nullptr;
  const T* zoneout_c = static_cast<const T*>(p.zoneout_c);
  const T* zoneout_h = static_cast<const T*>(p.zoneout_h);
  const bool h_skips = packed || zoneout_h != nullptr;
  const int64_t tiles = (B + kBatchTile - 1) / kBatchTile;

  // Forward step s ran time t = s (T-1-s reversed); s = -1 is the pass that only takes grad_h0
  // from the gradients of step 0.
  const int64_t dir = p.reverse ? -1 : 1;
  for (int64_t s = T_len - 1; s >= -1; --s) {
    const int64_t t = p.reverse ? T_len - 1 - s : s;
    const bool recurrent = s + 1 < T_len;  // step s + 1 exists: a gradient reaches h of step s
    const int64_t stepping = s < 0 || !packed ? B : p.batch_sizes[t];
    for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
      const int64_t b0 = tile * kBatchTile;
      const int tile_rows = static_cast<int>(B - b0 < kBatchTile ? B - b0 : kBatchTile);
      if (recurrent) {
        stage_tile(dg_s, grad_gates_all + (t + dir) * B * G, b0, tile_rows, G);
        __syncthreads();
        tile_product(w_s, dg_s, G, H, units, H, rec_s);
        __syncthreads();
      }
      for (int e = threadIdx.x; e < tile_rows * units; e += blockDim.x) {
        const int bb = e / units, u = e % units;
        const int64_t unit = unit0 + u, b = b0 + bb;
        if (unit >= H) continue;
        const A* rec = rec_s + bb * rows + u;  // gate q's share of the gradient at rec[q * units]
        const A dh_rec = recurrent ? (rec[0] + rec[units]) + (rec[2 * units] + rec[3 * units]) : A(0);
        A* carried_h = grad_h0 + b * H + unit;
        const A dh_carried = h_skips && recurrent ? *carried_h : A(0);
        if (s < 0) {
          *carried_h = dh_rec + dh_carried;
          continue;
        }
        const int64_t state = (t * B + b) * H + unit;
        const A dh_total = to_acc(grad_h_all[state]) + dh_rec + dh_carried;
        A* carried_c = grad_c0 + b * H + unit;
        const A dc_total = to_acc(grad_c_all[state]) + (recurrent ? *carried_c : A(0));
        A* grad_gates = grad_gates_all + (t * B + b) * G + unit;
        if (b >= stepping) {  // a carried row: its gradients pass through, its gates' are zero
          for (int q = 0; q < 4; ++q) grad_gates[q * H] = A(0);
          *carried_c = dc_total;
          *carried_h = dh_total;
          continue;
        }
        // Zoneout keeps z of the previous state: that share of each gradient skips the cell.
        const A zc = zoneout_c != nullptr ? to_acc(zoneout_c[state]) : A(0);
        const A zh = zoneout_h != nullptr ? to_acc(zoneout_h[state]) : A(0);
        if (h_skips) *carried_h = dh_total * zh;
        const A dh = dh_total * (A(1) - zh);
        const A* gates = gates_all + (t * B + b) * G + unit;
        const A i = gates[0], f = gates[H], g = gates[2 * H], o = gates[3 * H];
        const A c_prev = to_acc(s == 0 ? c0[b * H + unit] : c_all[state - dir * B * H]);
        const A tc = tanh_(f * c_prev + i * g);
        const A dc = dc_total * (A(1) - zc) + dh * o * (A(1) - tc * tc);
        *carried_c = dc * f + dc_total * zc;
        // Pre-activation gradients: sigmoid' = s (1 - s), tanh' = 1 - t^2.
        grad_gates[0] = dc * g * i * (A(1) - i);
        grad_gates[H] = dc * c_prev * f * (A(1) - f);
        grad_gates[2 * H] = dc * i * (A(1) - g * g);
        grad_gates[3 * H] = dh * tc * o * (A(1) - o);
      }
    }
    if (s >= 0) grid.sync();
  }
}

}  // namespace lstm
}  // namespace fastattn
