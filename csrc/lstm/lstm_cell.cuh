// Fused pointwise LSTM step kernels (forward and backward), torch-free: the cell ops and one
// time step of the layer ops (projection, batch_sizes rows, zoneout; fastattn/ops/_registry.py).
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
      const T* x = static_cast<const T*>(p.x_proj) + at.row * p.x_proj_row_stride + at.col;
      A i[VEC], f[VEC], g[VEC], o[VEC];
      load_acc<T, VEC>(x, i);
      load_acc<T, VEC>(x + H, f);
      load_acc<T, VEC>(x + 2 * H, g);
      load_acc<T, VEC>(x + 3 * H, o);
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
      if (p.gates_out != nullptr) {
        T* gates = static_cast<T*>(p.gates_out) + at.row * 4 * H + at.col;
        store_acc<T, VEC>(gates, i);
        store_acc<T, VEC>(gates + H, f);
        store_acc<T, VEC>(gates + 2 * H, g);
        store_acc<T, VEC>(gates + 3 * H, o);
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
        T* gates = static_cast<T*>(p.gates_out) + at.row * 4 * H + at.col;
#pragma unroll
        for (int q = 0; q < 4; ++q) store_acc<T, VEC>(gates + q * H, zero);
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
      const T* gates = static_cast<const T*>(p.gates) + at.row * p.gates_row_stride + at.col;
      A c_prev[VEC], c[VEC], dh[VEC], zc[VEC], zh[VEC];
      load_acc<T, VEC>(gates, i);
      load_acc<T, VEC>(gates + H, f);
      load_acc<T, VEC>(gates + 2 * H, g);
      load_acc<T, VEC>(gates + 3 * H, o);
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
