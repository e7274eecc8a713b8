// Fused pointwise LSTM step kernels (forward and backward), torch-free: the cell ops and one
// time step of the layer ops (projection, batch_sizes rows, zoneout, the LayerNorm-LSTM's LN
// stage; fastattn/ops/_registry.py).
// One thread handles VEC consecutive hidden units of one batch row: it reads the four gate
// chunks i, f, g, o of those units with one VEC-wide load each (16 bytes when the launcher
// found every row aligned, else VEC = 1), so a warp reads 4 x 512 contiguous bytes per pass.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastattn/lstm_params.h"

namespace fastattn {
namespace lstm {

// The type the math runs in: float64 stays float64, everything narrower is computed in float32.
template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename T> using acc_t = typename AccumulateType<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

// VEC elements moved as one aligned load / store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_acc(const T* ptr, acc_t<T> (&out)[VEC]) {
  const Vec<T, VEC> packed = *reinterpret_cast<const Vec<T, VEC>*>(ptr);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_acc(packed.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_acc(T* ptr, const acc_t<T> (&in)[VEC]) {
  Vec<T, VEC> packed;
#pragma unroll
  for (int e = 0; e < VEC; ++e) packed.v[e] = from_acc<T>(in[e]);
  *reinterpret_cast<Vec<T, VEC>*>(ptr) = packed;
}

// Thread -> (batch row, first of its VEC hidden units); a grid-stride loop covers B * H / VEC.
template <int VEC>
struct CellIndex {
  int64_t row, col;
  __device__ CellIndex(int64_t linear, int64_t vecs_per_row)
      : row(linear / vecs_per_row), col((linear % vecs_per_row) * VEC) {}
};

template <typename A, int VEC>
__device__ __forceinline__ void fill(A (&out)[VEC], A value) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = value;
}

// out += the VEC elements at ptr (any element type).
template <typename T, typename A, int VEC>
__device__ __forceinline__ void add_acc(const T* ptr, A (&out)[VEC]) {
  A more[VEC];
  load_acc<T, VEC>(ptr, more);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] += more[e];
}

// The four gate chunks i, f, g, o of VEC units: chunk q starts at gates + q * H.
template <typename S, typename A, int VEC>
__device__ __forceinline__ void load_gates(const S* gates, int64_t H, A (&i)[VEC], A (&f)[VEC],
                                           A (&g)[VEC], A (&o)[VEC]) {
  load_acc<S, VEC>(gates, i);
  load_acc<S, VEC>(gates + H, f);
  load_acc<S, VEC>(gates + 2 * H, g);
  load_acc<S, VEC>(gates + 3 * H, o);
}

// One step of a layer-direction (and the cell op): gates = x_proj (+ rec), activations, the
// new c and h, zoneout mixing, carried rows (LstmStepFwdParams). The options are uniform
// branches on null pointers: every thread of a launch takes the same ones, except the
// stepping / carried row split.
template <typename T, int VEC>
__global__ void lstm_step_fwd_kernel(LstmStepFwdParams p) {
  using A = acc_t<T>;
  const int64_t H = p.hidden, vecs_per_row = H / VEC;
  const int64_t total = p.batch * vecs_per_row;
  for (int64_t linear = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; linear < total;
       linear += int64_t(gridDim.x) * blockDim.x) {
    const CellIndex<VEC> at(linear, vecs_per_row);
    const int64_t out = at.row * H + at.col;
    const int64_t h_prev_at = at.row * p.h_prev_row_stride + at.col;  // read only when given
    A c_prev[VEC], c[VEC], h[VEC];
    load_acc<T, VEC>(static_cast<const T*>(p.c_prev) + at.row * p.c_prev_row_stride + at.col,
                     c_prev);
    if (at.row < p.stepping) {
      A i[VEC], f[VEC], g[VEC], o[VEC];
      load_gates<T, A, VEC>(static_cast<const T*>(p.x_proj) + at.row * p.x_proj_row_stride + at.col,
                            H, i, f, g, o);
      if (p.rec != nullptr) {
        const A* rec = static_cast<const A*>(p.rec) + at.row * 4 * H + at.col;
        add_acc<A, A, VEC>(rec, i);
        add_acc<A, A, VEC>(rec + H, f);
        add_acc<A, A, VEC>(rec + 2 * H, g);
        add_acc<A, A, VEC>(rec + 3 * H, o);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        i[e] = sigmoid(i[e]);
        f[e] = sigmoid(f[e]);
        g[e] = tanh_(g[e]);
        o[e] = sigmoid(o[e]);
        c[e] = f[e] * c_prev[e] + i[e] * g[e];
        h[e] = o[e] * tanh_(c[e]);  // from the cell's c, before zoneout mixes it
      }
      if (p.gates_out != nullptr) {  // in A: the backward's dc can cancel (LstmStepBwdParams)
        A* gates = static_cast<A*>(p.gates_out) + at.row * 4 * H + at.col;
        store_acc<A, VEC>(gates, i);
        store_acc<A, VEC>(gates + H, f);
        store_acc<A, VEC>(gates + 2 * H, g);
        store_acc<A, VEC>(gates + 3 * H, o);
      }
      if (p.zoneout_c != nullptr) {
        A z[VEC];
        load_acc<T, VEC>(static_cast<const T*>(p.zoneout_c) + out, z);
#pragma unroll
        for (int e = 0; e < VEC; ++e) c[e] += z[e] * (c_prev[e] - c[e]);
      }
      if (!p.project && p.zoneout_h != nullptr) {
        A z[VEC], hp[VEC];
        load_acc<T, VEC>(static_cast<const T*>(p.zoneout_h) + out, z);
        load_acc<T, VEC>(static_cast<const T*>(p.h_prev) + h_prev_at, hp);
#pragma unroll
        for (int e = 0; e < VEC; ++e) h[e] += z[e] * (hp[e] - h[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) c[e] = c_prev[e];
      if (p.project) {
        fill<A, VEC>(h, A(0));  // hpre of a carried row
      } else {
        load_acc<T, VEC>(static_cast<const T*>(p.h_prev) + h_prev_at, h);
      }
      if (p.gates_out != nullptr) {
        A zero[VEC];
        fill<A, VEC>(zero, A(0));
        A* gates = static_cast<A*>(p.gates_out) + at.row * 4 * H + at.col;
#pragma unroll
        for (int q = 0; q < 4; ++q) store_acc<A, VEC>(gates + q * H, zero);
      }
    }
    store_acc<T, VEC>(static_cast<T*>(p.c_out) + out, c);
    store_acc<T, VEC>(static_cast<T*>(p.h_out) + out, h);
  }
}

// The backward of lstm_step_fwd_kernel (LstmStepBwdParams); T: the forward's tensors, G: the
// gradient buffers (T for the cell op, the math type inside the layer backward).
template <typename T, typename G, int VEC>
__global__ void lstm_step_bwd_kernel(LstmStepBwdParams p) {
  using A = acc_t<T>;
  const int64_t H = p.hidden, vecs_per_row = H / VEC;
  const int64_t total = p.batch * vecs_per_row;
  for (int64_t linear = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; linear < total;
       linear += int64_t(gridDim.x) * blockDim.x) {
    const CellIndex<VEC> at(linear, vecs_per_row);
    const int64_t out = at.row * H + at.col;
    // The gradients of this step's c and h outputs (h: without projection).
    A dc_total[VEC], dh_total[VEC];
    load_acc<T, VEC>(static_cast<const T*>(p.grad_c) + at.row * p.grad_c_row_stride + at.col,
                     dc_total);
    if (p.carried_c != nullptr) add_acc<G, A, VEC>(static_cast<const G*>(p.carried_c) + out, dc_total);
    fill<A, VEC>(dh_total, A(0));
    if (p.grad_h != nullptr) {
      load_acc<T, VEC>(static_cast<const T*>(p.grad_h) + at.row * p.grad_h_row_stride + at.col,
                       dh_total);
    }
    if (p.carried_h != nullptr) add_acc<G, A, VEC>(static_cast<G*>(p.carried_h) + out, dh_total);
    A i[VEC], f[VEC], g[VEC], o[VEC], dc_prev[VEC], dh_skip[VEC];
    if (at.row < p.stepping) {
      const int64_t gates_at = at.row * p.gates_row_stride + at.col;
      A c_prev[VEC], c[VEC], dh[VEC], zc[VEC], zh[VEC];
      if (p.gates_activated) {  // the layer forward's saved gates, in A
        load_gates<A, A, VEC>(static_cast<const A*>(p.gates) + gates_at, H, i, f, g, o);
      } else {  // the cell op's pre-activation input
        load_gates<T, A, VEC>(static_cast<const T*>(p.gates) + gates_at, H, i, f, g, o);
      }
      load_acc<T, VEC>(static_cast<const T*>(p.c_prev) + at.row * p.c_prev_row_stride + at.col,
                       c_prev);
      if (p.c_new != nullptr) {
        load_acc<T, VEC>(static_cast<const T*>(p.c_new) + at.row * p.c_new_row_stride + at.col,
                         c);
      }
      fill<A, VEC>(zc, A(0));
      fill<A, VEC>(zh, A(0));
      if (p.zoneout_c != nullptr) load_acc<T, VEC>(static_cast<const T*>(p.zoneout_c) + out, zc);
      if (p.zoneout_h != nullptr) load_acc<T, VEC>(static_cast<const T*>(p.zoneout_h) + out, zh);
      if (p.grad_hpre != nullptr) load_acc<G, VEC>(static_cast<const G*>(p.grad_hpre) + out, dh);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (!p.gates_activated) {
          i[e] = sigmoid(i[e]);
          f[e] = sigmoid(f[e]);
          g[e] = tanh_(g[e]);
          o[e] = sigmoid(o[e]);
        }
        // Without a saved c_new (zoneout stores the mixed state), the cell's c from its gates.
        if (p.c_new == nullptr) c[e] = f[e] * c_prev[e] + i[e] * g[e];
        if (p.grad_hpre == nullptr) dh[e] = dh_total[e] * (A(1) - zh[e]);
        const A tc = tanh_(c[e]);
        // Gradient reaching the cell's c: through zoneout's (1 - z_c) share of c_all[t], and
        // through h = o * tanh(c).
        const A dc = dc_total[e] * (A(1) - zc[e]) + dh[e] * o[e] * (A(1) - tc * tc);
        // Pre-activation gradients: sigmoid' = s (1 - s), tanh' = 1 - t^2.
        dc_prev[e] = dc * f[e] + dc_total[e] * zc[e];
        dh_skip[e] = dh_total[e] * zh[e];
        const A gi = dc * g[e] * i[e] * (A(1) - i[e]);
        const A gf = dc * c_prev[e] * f[e] * (A(1) - f[e]);
        const A gg = dc * i[e] * (A(1) - g[e] * g[e]);
        o[e] = dh[e] * tc * o[e] * (A(1) - o[e]);
        i[e] = gi;
        f[e] = gf;
        g[e] = gg;
      }
    } else {
      // A carried row: its state passed through unchanged, and so do its gradients.
      fill<A, VEC>(i, A(0));
      fill<A, VEC>(f, A(0));
      fill<A, VEC>(g, A(0));
      fill<A, VEC>(o, A(0));
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dc_prev[e] = dc_total[e];
        dh_skip[e] = dh_total[e];
      }
    }
    G* grad_gates = static_cast<G*>(p.grad_gates) + at.row * 4 * H + at.col;
    store_acc<G, VEC>(grad_gates, i);
    store_acc<G, VEC>(grad_gates + H, f);
    store_acc<G, VEC>(grad_gates + 2 * H, g);
    store_acc<G, VEC>(grad_gates + 3 * H, o);
    store_acc<G, VEC>(static_cast<G*>(p.grad_c_prev) + out, dc_prev);
    if (p.carried_h != nullptr) store_acc<G, VEC>(static_cast<G*>(p.carried_h) + out, dh_skip);
  }
}

// ---- the LayerNorm stage (LstmStepLayerNorm) ------------------------------------------------
// Its LNs reduce over a row, so a LayerNorm step runs one block per batch row (a grid-stride
// loop over rows); thread k of the block owns hidden units k, k + blockDim.x, ... and all four
// gate elements of each. Every element a thread reads back within a step it wrote itself, so
// the only exchange between threads is the block reduction (and its barriers).

__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

// Sums each of v[0..N) over the block (blockDim.x a multiple of 32, at most 1024) and hands
// every thread the totals; scratch: N * 32 elements of dynamic shared memory. Every thread of
// the block must call it.
template <int N, typename A>
__device__ __forceinline__ void block_sum(A (&v)[N], A* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[n] += __shfl_xor_sync(0xffffffffu, v[n], offset);
    if (lane == 0) scratch[n * 32 + warp] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    v[n] = A(0);
    for (int w = 0; w < warps; ++w) v[n] += scratch[n * 32 + w];  // one order: every thread agrees
  }
  __syncthreads();  // the scratch is free for the next reduction
}

// Every LN reduction, forward and backward: one pass over this thread's units u of the row
// (u = threadIdx.x, + blockDim.x, ... < H) in which add(u, sums) adds unit u's share to
// sums[0..N) (and may do the pass's other per-unit work), then the block reduction. Every thread
// gets the sums over the row divided by count (the row's element count). Every thread of the
// block must call it.
template <int N, typename A, typename Add>
__device__ __forceinline__ void row_means(int64_t H, A count, const Add& add, A* scratch,
                                          A (&means)[N]) {
  fill<A, N>(means, A(0));
  for (int64_t u = threadIdx.x; u < H; u += blockDim.x) add(u, means);
  block_sum(means, scratch);
#pragma unroll
  for (int n = 0; n < N; ++n) means[n] /= count;
}

// 1 / sqrt(var + eps) of the row values value(u, q) (units u, chunks q < Q: Q * H elements)
// and their mean: two passes (mean, then the mean square deviation), so a row far from zero
// loses nothing to cancellation.
template <int Q, typename A, typename Value>
__device__ __forceinline__ void row_moments(int64_t H, A eps, const Value& value, A* scratch,
                                            A& mean, A& rstd) {
  A means[1];
  row_means(H, A(Q * H), [&](int64_t u, A (&sum)[1]) {
#pragma unroll
    for (int q = 0; q < Q; ++q) sum[0] += value(u, q);
  }, scratch, means);
  mean = means[0];
  row_means(H, A(Q * H), [&](int64_t u, A (&squares)[1]) {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const A d = value(u, q) - mean;
      squares[0] += d * d;
    }
  }, scratch, means);
  rstd = A(1) / sqrt_(means[0] + eps);
}

// The LayerNorm-LSTM forward step (LstmStepFwdParams with ln): T the data, A the math type of
// rec and of the saved rows.
template <typename T>
__global__ void lstm_ln_step_fwd_kernel(LstmStepFwdParams p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* scratch = reinterpret_cast<A*>(smem_raw);
  const int64_t H = p.hidden, G = 4 * H;
  const A eps = static_cast<A>(p.ln.eps);
  const T* hh_weight = static_cast<const T*>(p.ln.hh_weight);
  const T* c_weight = static_cast<const T*>(p.ln.c_weight);
  const T* c_bias = static_cast<const T*>(p.ln.c_bias);
  for (int64_t row = blockIdx.x; row < p.batch; row += gridDim.x) {  // uniform in the block
    const T* c_prev = static_cast<const T*>(p.c_prev) + row * p.c_prev_row_stride;
    const T* h_prev = p.h_prev == nullptr
                          ? nullptr
                          : static_cast<const T*>(p.h_prev) + row * p.h_prev_row_stride;
    A* gates = static_cast<A*>(p.gates_out) + row * G;
    A* hh_norm = static_cast<A*>(p.hh_norm_out) + row * G;
    A* c_norm = static_cast<A*>(p.c_norm_out) + row * H;
    A* rstd = static_cast<A*>(p.rstd_out) + row * 2;
    T* c_out = static_cast<T*>(p.c_out) + row * H;
    T* h_out = static_cast<T*>(p.h_out) + row * H;
    if (row >= p.stepping) {  // a carried row: state through, zeros saved
      for (int64_t u = threadIdx.x; u < H; u += blockDim.x) {
        c_out[u] = c_prev[u];
        h_out[u] = p.project ? from_acc<T>(A(0)) : h_prev[u];
        c_norm[u] = A(0);
#pragma unroll
        for (int q = 0; q < 4; ++q) gates[q * H + u] = hh_norm[q * H + u] = A(0);
      }
      if (threadIdx.x < 2) rstd[threadIdx.x] = A(0);
      continue;
    }
    const A* rec = static_cast<const A*>(p.rec) + row * G;
    const T* x = static_cast<const T*>(p.x_proj) + row * p.x_proj_row_stride;
    A hh_mean, hh_rstd;
    row_moments<4>(H, eps, [&](int64_t u, int q) { return rec[q * H + u]; }, scratch, hh_mean,
                   hh_rstd);
    for (int64_t u = threadIdx.x; u < H; u += blockDim.x) {
      A act[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = q * H + u;
        const A normed = (rec[k] - hh_mean) * hh_rstd;
        hh_norm[k] = normed;
        const A pre = to_acc(x[k]) + normed * to_acc(hh_weight[k]);
        act[q] = q == 2 ? tanh_(pre) : sigmoid(pre);
        gates[k] = act[q];
      }
      c_norm[u] = act[1] * to_acc(c_prev[u]) + act[0] * act[2];  // the cell before its LN, for now
    }
    A c_mean, c_rstd;
    row_moments<1>(H, eps, [&](int64_t u, int) { return c_norm[u]; }, scratch, c_mean, c_rstd);
    for (int64_t u = threadIdx.x; u < H; u += blockDim.x) {
      const A cn = (c_norm[u] - c_mean) * c_rstd;
      c_norm[u] = cn;
      A c = cn * to_acc(c_weight[u]) + to_acc(c_bias[u]);
      A h = gates[3 * H + u] * tanh_(c);  // from the cell's c, before zoneout mixes it
      if (p.zoneout_c != nullptr) {
        c += to_acc(static_cast<const T*>(p.zoneout_c)[row * H + u]) * (to_acc(c_prev[u]) - c);
      }
      if (!p.project && p.zoneout_h != nullptr) {
        h += to_acc(static_cast<const T*>(p.zoneout_h)[row * H + u]) * (to_acc(h_prev[u]) - h);
      }
      c_out[u] = from_acc<T>(c);
      h_out[u] = from_acc<T>(h);
    }
    if (threadIdx.x == 0) {
      rstd[0] = hh_rstd;
      rstd[1] = c_rstd;
    }
  }
}

// The backward of lstm_ln_step_fwd_kernel (LstmStepBwdParams with ln; the gradients in A).
// The LN backward without affine, from the normalized row y and its rstd:
// dx = rstd * (dy - mean(dy) - y * mean(dy * y)).
template <typename T>
__global__ void lstm_ln_step_bwd_kernel(LstmStepBwdParams p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* scratch = reinterpret_cast<A*>(smem_raw);
  const int64_t H = p.hidden, G = 4 * H;
  const T* hh_weight = static_cast<const T*>(p.ln.hh_weight);
  const T* c_weight = static_cast<const T*>(p.ln.c_weight);
  const T* c_bias = static_cast<const T*>(p.ln.c_bias);
  for (int64_t row = blockIdx.x; row < p.batch; row += gridDim.x) {  // uniform in the block
    const T* grad_h = p.grad_h == nullptr
                          ? nullptr
                          : static_cast<const T*>(p.grad_h) + row * p.grad_h_row_stride;
    const T* grad_c = static_cast<const T*>(p.grad_c) + row * p.grad_c_row_stride;
    A* carried_h = p.carried_h == nullptr ? nullptr : static_cast<A*>(p.carried_h) + row * H;
    const A* carried_c =
        p.carried_c == nullptr ? nullptr : static_cast<const A*>(p.carried_c) + row * H;
    const T* zc = p.zoneout_c == nullptr ? nullptr : static_cast<const T*>(p.zoneout_c) + row * H;
    const T* zh = p.zoneout_h == nullptr ? nullptr : static_cast<const T*>(p.zoneout_h) + row * H;
    A* grad_gates = static_cast<A*>(p.grad_gates) + row * G;
    A* grad_hh = static_cast<A*>(p.grad_hh) + row * G;
    A* grad_c_new = static_cast<A*>(p.grad_c_new) + row * H;
    A* grad_c_prev = static_cast<A*>(p.grad_c_prev) + row * H;
    // The gradients reaching this step's c and h outputs (h: without projection).
    auto dc_total = [&](int64_t u) {
      return to_acc(grad_c[u]) + (carried_c == nullptr ? A(0) : carried_c[u]);
    };
    auto dh_total = [&](int64_t u) {
      return (grad_h == nullptr ? A(0) : to_acc(grad_h[u])) +
             (carried_h == nullptr ? A(0) : carried_h[u]);
    };
    if (row >= p.stepping) {  // a carried row: its gradients pass through unchanged
      for (int64_t u = threadIdx.x; u < H; u += blockDim.x) {
        if (carried_h != nullptr) carried_h[u] = dh_total(u);
        grad_c_prev[u] = dc_total(u);  // after dc_total(u): may alias carried_c
        grad_c_new[u] = A(0);
#pragma unroll
        for (int q = 0; q < 4; ++q) grad_gates[q * H + u] = grad_hh[q * H + u] = A(0);
      }
      continue;
    }
    const A* gates = static_cast<const A*>(p.gates) + row * G;
    const A* hh_norm = static_cast<const A*>(p.hh_norm) + row * G;
    const A* c_norm = static_cast<const A*>(p.c_norm) + row * H;
    const A* rstd = static_cast<const A*>(p.rstd) + row * 2;
    const T* c_prev = static_cast<const T*>(p.c_prev) + row * p.c_prev_row_stride;
    // The cell LN's output gradient, and o's; the means of dy and dy * y of the cell LN.
    A c_means[2];
    row_means(H, A(H), [&](int64_t u, A (&c_sums)[2]) {
      const A z_c = zc == nullptr ? A(0) : to_acc(zc[u]);
      const A z_h = zh == nullptr ? A(0) : to_acc(zh[u]);
      A dh;
      if (p.grad_hpre != nullptr) {
        dh = static_cast<const A*>(p.grad_hpre)[row * H + u];
      } else {
        const A total = dh_total(u);
        dh = total * (A(1) - z_h);
        if (carried_h != nullptr) carried_h[u] = total * z_h;  // the share that skips the GEMM
      }
      const A cn = c_norm[u], w = to_acc(c_weight[u]);
      const A tc = tanh_(cn * w + to_acc(c_bias[u]));
      const A o = gates[3 * H + u];
      const A dc_new = dc_total(u) * (A(1) - z_c) + dh * o * (A(1) - tc * tc);
      grad_c_new[u] = dc_new;
      grad_gates[3 * H + u] = dh * tc * o * (A(1) - o);
      c_sums[0] += dc_new * w;
      c_sums[1] += dc_new * w * cn;
    }, scratch, c_means);
    const A c_mean_dy = c_means[0], c_mean_dy_y = c_means[1];
    // The gates' gradients through the cell LN; the means of the hh LN's backward.
    A hh_means[2];
    row_means(H, A(G), [&](int64_t u, A (&hh_sums)[2]) {
      const A dy = grad_c_new[u] * to_acc(c_weight[u]);
      const A d_cell = (dy - c_mean_dy - c_norm[u] * c_mean_dy_y) * rstd[1];
      const A i = gates[u], f = gates[H + u], g = gates[2 * H + u], cp = to_acc(c_prev[u]);
      const A z_c = zc == nullptr ? A(0) : to_acc(zc[u]);
      const A d_pre[4] = {d_cell * g * i * (A(1) - i), d_cell * cp * f * (A(1) - f),
                          d_cell * i * (A(1) - g * g), grad_gates[3 * H + u]};
      grad_c_prev[u] = d_cell * f + dc_total(u) * z_c;  // after dc_total(u): may alias carried_c
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = q * H + u;
        grad_gates[k] = d_pre[q];
        const A hh_dy = d_pre[q] * to_acc(hh_weight[k]);
        hh_sums[0] += hh_dy;
        hh_sums[1] += hh_dy * hh_norm[k];
      }
    }, scratch, hh_means);
    const A hh_mean_dy = hh_means[0], hh_mean_dy_y = hh_means[1];
    for (int64_t u = threadIdx.x; u < H; u += blockDim.x)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = q * H + u;
        const A dy = grad_gates[k] * to_acc(hh_weight[k]);
        grad_hh[k] = (dy - hh_mean_dy - hh_norm[k] * hh_mean_dy_y) * rstd[0];
      }
  }
}

// Grid-stride over the [B, P] state after the projection GEMM (LstmProjectionFwdParams).
template <typename T>
__global__ void lstm_projection_fwd_kernel(LstmProjectionFwdParams p) {
  using A = acc_t<T>;
  const int64_t total = p.batch * p.width;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    T* h = static_cast<T*>(p.h) + e;
    const A h_prev = to_acc(static_cast<const T*>(p.h_prev)[e]);
    if (e / p.width >= p.stepping) {
      *h = from_acc<T>(h_prev);
    } else if (p.zoneout_h != nullptr) {
      const A z = to_acc(static_cast<const T*>(p.zoneout_h)[e]), h_new = to_acc(*h);
      *h = from_acc<T>(h_new + z * (h_prev - h_new));
    }
  }
}

// The projection's share of the step backward (LstmProjectionBwdParams).
template <typename T, typename G>
__global__ void lstm_projection_bwd_kernel(LstmProjectionBwdParams p) {
  using A = acc_t<T>;
  const int64_t total = p.batch * p.width;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    G* carried = static_cast<G*>(p.carried_h) + e;
    const A grad = to_acc(*carried) + to_acc(static_cast<const T*>(p.grad_h)[e]);
    const bool stepped = e / p.width < p.stepping;
    const A z = p.zoneout_h == nullptr ? A(0) : to_acc(static_cast<const T*>(p.zoneout_h)[e]);
    static_cast<G*>(p.grad_proj)[e] = from_acc<G>(stepped ? grad * (A(1) - z) : A(0));
    *carried = from_acc<G>(stepped ? grad * z : grad);
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The one dtype switch of the LSTM kernels: calls fn(TypeTag<Element>{}).
template <typename Fn>
cudaError_t dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::Float32: return fn(TypeTag<float>{});
    case Dtype::Float64: return fn(TypeTag<double>{});
    case Dtype::Float16: return fn(TypeTag<__half>{});
    case Dtype::BFloat16: return fn(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// dispatch_dtype for a pair (T, G) where G is T or T's math type: calls fn(TypeTag<T>{},
// TypeTag<G>{}); any other pair is invalid.
template <typename Fn>
cudaError_t dispatch_dtype_pair(Dtype dtype, Dtype grad_dtype, Fn&& fn) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (grad_dtype == dtype) return fn(tag, tag);
    if (grad_dtype == (std::is_same_v<acc_t<T>, double> ? Dtype::Float64 : Dtype::Float32)) {
      return fn(tag, TypeTag<acc_t<T>>{});
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace lstm
}  // namespace fastattn
