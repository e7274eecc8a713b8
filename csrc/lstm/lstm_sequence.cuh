// Persistent whole-sequence LSTM forward (one layer, one direction, H <= 256), torch-free.
//
// Work split. The grid is (slices, batch_ctas). CTA (s, y) owns the hidden units
// [s * units, (s + 1) * units) and keeps the 4 * units rows of w_hh that produce their gates
// (i, f, g, o of each unit) in shared memory for the whole sequence, loaded once. It serves
// the batch tiles y, y + batch_ctas, ... of kBatchTile rows each. Per time step t and tile:
//   1. stage h_{t-1} [kBatchTile, H] of the tile in shared memory as the math type;
//   2. recurrent product rec [kBatchTile, 4 * units] = h_{t-1} @ w_slice^T: one warp per w row,
//      lanes split the H reduction (consecutive k, so w and h reads are bank-conflict free),
//      then a butterfly reduction across the warp;
//   3. pointwise cell for its units: gates = rec + x_proj[t], activations, c, h; writes
//      h_all[t], c_all[t] and the activated gates_all[t] for its units only.
//
// Synchronization (cannot be tested on this machine; reasoned here). Step t of every CTA
// reads all of h_all[t - 1] (every slice's units), which other CTAs wrote during step t - 1.
// Exactly one grid-wide barrier per step orders this: cooperative_groups::this_grid().sync()
// at the end of each step. The kernel must be launched with cudaLaunchCooperativeKernel (the
// launcher does), which guarantees all CTAs are co-resident or fails the launch instead of
// deadlocking. grid.sync() is a gpu-scope barrier with release/acquire semantics (it fences
// before arriving and after leaving), so every h_all[t - 1] store made before it is visible
// to loads after it. One barrier suffices because a step writes only h_all[t] / c_all[t] /
// gates_all[t] and reads only h_all[t - 1] / c_all[t - 1] / x_proj[t]: no location is
// written and read by different CTAs within the same step (write-after-read across steps is
// impossible since each step writes a fresh time slice). Loads of states written by other
// CTAs use ld.global.cg (L2, the coherence point), never the SM-local L1, so no stale line
// (for example one shared with h_all[t - 2] at a slice boundary) can be read.
// c_{t-1} of a unit is written and read by the same CTA (and, with the fixed thread mapping,
// the same thread); it is read back through L2 as well, which costs nothing extra.
// Within a CTA, two __syncthreads() per tile separate staging h, the product (reads h,
// writes rec) and the pointwise pass (reads rec); the next tile's staging of h only starts
// after the product that read h finished (second barrier), and its product only writes rec
// after every thread passed the next first barrier, i.e. finished the previous pointwise pass.
//
// Rounding: states are stored in the tensor dtype and the next step reads them back from
// there, exactly like a loop of lstm_cell_pointwise_fwd calls; the math is float32 (float64
// for float64), and the activated gates are saved in it (LstmSequenceFwdParams).
#pragma once

#include <cooperative_groups.h>

#include "lstm_cell.cuh"

namespace fastattn {
namespace lstm {

constexpr int kSequenceThreads = 256;
constexpr int kSequenceWarps = kSequenceThreads / 32;
constexpr int kBatchTile = 8;

// Dynamic shared memory of one CTA: h tile, recurrent-product tile, then its w_hh rows.
template <typename T>
struct SequenceSmem {
  int64_t hidden, units;
  __host__ __device__ SequenceSmem(int64_t hidden_, int64_t units_) : hidden(hidden_), units(units_) {}
  __host__ __device__ int64_t h_elems() const { return kBatchTile * hidden; }     // [kBatchTile, H]
  __host__ __device__ int64_t rec_elems() const { return kBatchTile * 4 * units; }  // [kBatchTile, 4 * units]
  __host__ __device__ int64_t w_elems() const { return 4 * units * hidden; }       // [4 * units, H]
  __host__ __device__ size_t bytes() const {
    return (h_elems() + rec_elems()) * sizeof(acc_t<T>) + w_elems() * sizeof(T);
  }
};

// Loads through L2 only (see the synchronization note above).
__device__ __forceinline__ float load_l2(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double load_l2(const double* p) { return __ldcg(p); }
__device__ __forceinline__ float load_l2(const __half* p) { return __half2float(__ldcg(p)); }
__device__ __forceinline__ float load_l2(const __nv_bfloat16* p) { return __bfloat162float(__ldcg(p)); }

template <typename T>
__global__ void __launch_bounds__(kSequenceThreads)
lstm_sequence_fwd_kernel(LstmSequenceFwdParams p, int units) {
  using A = acc_t<T>;
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();

  const int64_t H = p.hidden, B = p.batch;
  const int64_t unit0 = int64_t(blockIdx.x) * units;
  const SequenceSmem<T> layout(H, units);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* h_s = reinterpret_cast<A*>(smem_raw);                        // [kBatchTile, H]
  A* rec_s = h_s + layout.h_elems();                              // [kBatchTile, 4 * units]
  T* w_s = reinterpret_cast<T*>(rec_s + layout.rec_elems());      // [4 * units, H]
  const int rows = 4 * units;  // w_s row r = gate (r / units) of unit unit0 + r % units

  const T* w_hh = static_cast<const T*>(p.w_hh);
  for (int64_t e = threadIdx.x; e < layout.w_elems(); e += blockDim.x) {
    const int64_t r = e / H, k = e % H;
    const int64_t unit = unit0 + r % units, gate = r / units;
    w_s[e] = unit < H ? w_hh[(gate * H + unit) * H + k] : from_acc<T>(A(0));
  }
  // The first staging barrier below also orders these stores before the first product.

  const T* x_proj = static_cast<const T*>(p.x_proj);
  T* h_all = static_cast<T*>(p.h_all);
  T* c_all = static_cast<T*>(p.c_all);
  A* gates_all = static_cast<A*>(p.gates_all);  // in A, as the layer op saves them
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tiles = (B + kBatchTile - 1) / kBatchTile;

  for (int64_t t = 0; t < p.seq_len; ++t) {
    const T* h_prev = t == 0 ? static_cast<const T*>(p.h0) : h_all + (t - 1) * B * H;  // [B, H]
    const T* c_prev = t == 0 ? static_cast<const T*>(p.c0) : c_all + (t - 1) * B * H;  // [B, H]
    for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
      const int64_t b0 = tile * kBatchTile;
      const int tile_rows = static_cast<int>(B - b0 < kBatchTile ? B - b0 : kBatchTile);

      for (int64_t e = threadIdx.x; e < layout.h_elems(); e += blockDim.x) {
        const int64_t bb = e / H;
        h_s[e] = bb < tile_rows ? load_l2(h_prev + (b0 + bb) * H + e % H) : A(0);
      }
      __syncthreads();

      for (int r = warp; r < rows; r += kSequenceWarps) {
        A acc[kBatchTile];
#pragma unroll
        for (int bb = 0; bb < kBatchTile; ++bb) acc[bb] = A(0);
        const T* w_row = w_s + int64_t(r) * H;
        for (int64_t k = lane; k < H; k += 32) {
          const A w = to_acc(w_row[k]);
#pragma unroll
          for (int bb = 0; bb < kBatchTile; ++bb) acc[bb] += w * h_s[bb * H + k];
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
      __syncthreads();

      for (int e = threadIdx.x; e < tile_rows * units; e += blockDim.x) {
        const int bb = e / units, u = e % units;
        const int64_t unit = unit0 + u, b = b0 + bb;
        if (unit >= H) continue;
        const T* x = x_proj + (t * B + b) * 4 * H + unit;  // gate chunk q at x[q * H]
        const A* rec = rec_s + bb * rows + u;               // gate chunk q at rec[q * units]
        const A i = sigmoid(rec[0] + to_acc(x[0]));
        const A f = sigmoid(rec[units] + to_acc(x[H]));
        const A g = tanh_(rec[2 * units] + to_acc(x[2 * H]));
        const A o = sigmoid(rec[3 * units] + to_acc(x[3 * H]));
        const A c = f * load_l2(c_prev + b * H + unit) + i * g;
        const A h = o * tanh_(c);
        const int64_t state = (t * B + b) * H + unit;
        A* gates = gates_all + (t * B + b) * 4 * H + unit;
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

}  // namespace lstm
}  // namespace fastattn
