// Fused pointwise LSTM cell kernels (forward and backward), torch-free.
// One thread handles VEC consecutive hidden units of one batch row: it reads the four gate
// chunks i, f, g, o of those units with one VEC-wide load each (16 bytes when the launcher
// found every row aligned, else VEC = 1), so a warp reads 4 x 512 contiguous bytes per pass.
#pragma once

#include <cstdint>

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

template <typename T, int VEC>
__global__ void lstm_cell_fwd_kernel(LstmCellFwdParams p) {
  using A = acc_t<T>;
  const int64_t vecs_per_row = p.hidden / VEC;
  const int64_t total = p.batch * vecs_per_row;
  for (int64_t linear = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; linear < total;
       linear += int64_t(gridDim.x) * blockDim.x) {
    const CellIndex<VEC> at(linear, vecs_per_row);
    const T* gates = static_cast<const T*>(p.gates) + at.row * p.gates_row_stride + at.col;
    A i[VEC], f[VEC], g[VEC], o[VEC], c[VEC], h[VEC];
    load_acc<T, VEC>(gates, i);
    load_acc<T, VEC>(gates + p.hidden, f);
    load_acc<T, VEC>(gates + 2 * p.hidden, g);
    load_acc<T, VEC>(gates + 3 * p.hidden, o);
    load_acc<T, VEC>(static_cast<const T*>(p.cx) + at.row * p.cx_row_stride + at.col, c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      c[e] = sigmoid(f[e]) * c[e] + sigmoid(i[e]) * tanh_(g[e]);
      h[e] = sigmoid(o[e]) * tanh_(c[e]);
    }
    const int64_t out = at.row * p.hidden + at.col;
    store_acc<T, VEC>(static_cast<T*>(p.cy) + out, c);
    store_acc<T, VEC>(static_cast<T*>(p.hy) + out, h);
  }
}

template <typename T, int VEC>
__global__ void lstm_cell_bwd_kernel(LstmCellBwdParams p) {
  using A = acc_t<T>;
  const int64_t vecs_per_row = p.hidden / VEC;
  const int64_t total = p.batch * vecs_per_row;
  for (int64_t linear = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; linear < total;
       linear += int64_t(gridDim.x) * blockDim.x) {
    const CellIndex<VEC> at(linear, vecs_per_row);
    const T* gates = static_cast<const T*>(p.gates) + at.row * p.gates_row_stride + at.col;
    A i[VEC], f[VEC], g[VEC], o[VEC], c_prev[VEC], c[VEC], grad_h[VEC], grad_c[VEC];
    load_acc<T, VEC>(gates, i);
    load_acc<T, VEC>(gates + p.hidden, f);
    load_acc<T, VEC>(gates + 2 * p.hidden, g);
    load_acc<T, VEC>(gates + 3 * p.hidden, o);
    load_acc<T, VEC>(static_cast<const T*>(p.cx) + at.row * p.cx_row_stride + at.col, c_prev);
    load_acc<T, VEC>(static_cast<const T*>(p.cy) + at.row * p.cy_row_stride + at.col, c);
    load_acc<T, VEC>(static_cast<const T*>(p.grad_hy) + at.row * p.grad_hy_row_stride + at.col,
                     grad_h);
    load_acc<T, VEC>(static_cast<const T*>(p.grad_cy) + at.row * p.grad_cy_row_stride + at.col,
                     grad_c);
    A grad_cx[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const A si = sigmoid(i[e]), sf = sigmoid(f[e]), tg = tanh_(g[e]), so = sigmoid(o[e]);
      const A tc = tanh_(c[e]);
      // Gradient reaching c: directly through cy, and through hy = o * tanh(c).
      const A dc = grad_c[e] + grad_h[e] * so * (A(1) - tc * tc);
      // Pre-activation gradients: sigmoid' = s (1 - s), tanh' = 1 - t^2.
      i[e] = dc * tg * si * (A(1) - si);
      f[e] = dc * c_prev[e] * sf * (A(1) - sf);
      g[e] = dc * si * (A(1) - tg * tg);
      o[e] = grad_h[e] * tc * so * (A(1) - so);
      grad_cx[e] = dc * sf;
    }
    T* grad_gates = static_cast<T*>(p.grad_gates) + at.row * 4 * p.hidden + at.col;
    store_acc<T, VEC>(grad_gates, i);
    store_acc<T, VEC>(grad_gates + p.hidden, f);
    store_acc<T, VEC>(grad_gates + 2 * p.hidden, g);
    store_acc<T, VEC>(grad_gates + 3 * p.hidden, o);
    store_acc<T, VEC>(static_cast<T*>(p.grad_cx) + at.row * p.hidden + at.col, grad_cx);
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

}  // namespace lstm
}  // namespace fastattn
