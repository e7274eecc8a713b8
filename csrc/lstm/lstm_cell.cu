// Launchers of the fused pointwise LSTM step kernels (csrc/lstm/lstm_cell.cuh) for every dtype:
// the cell ops, and one time step of the layer ops (the LayerNorm-LSTM's too).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "lstm_cell.cuh"

namespace fastattn {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; the kernels loop beyond that.
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

// VEC-element vector accesses are legal when the hidden size and every row stride are
// multiples of VEC and every tensor starts aligned to its VEC-element vector (an absent
// tensor, nullptr, is aligned).
template <int VEC>
bool vectorizable(int64_t hidden, std::initializer_list<std::pair<const void*, size_t>> ptrs,
                  std::initializer_list<int64_t> row_strides) {
  if (hidden % VEC != 0) return false;
  for (const auto& [ptr, element_bytes] : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(ptr) % (element_bytes * VEC) != 0) return false;
  }
  for (int64_t stride : row_strides) {
    if (stride % VEC != 0) return false;
  }
  return true;
}

dim3 grid_for(int64_t threads_needed) {
  return dim3(static_cast<unsigned>(std::min(kMaxBlocks, (threads_needed + kThreads - 1) / kThreads)));
}

// A LayerNorm step runs one block per batch row, one thread per hidden unit up to kThreads
// (whole warps: the block reduction shuffles across full warps); its dynamic shared memory holds
// the reduction's per-warp partial sums (two values at a time).
template <typename Params>
cudaError_t launch_ln_step(void (*kernel)(Params), const Params& p, size_t math_bytes,
                           cudaStream_t stream) {
  const int64_t threads = std::min<int64_t>(kThreads, (p.hidden + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(std::min(kMaxBlocks, p.batch)));
  kernel<<<grid, static_cast<unsigned>(threads), 2 * 32 * math_bytes, stream>>>(p);
  return cudaGetLastError();
}

bool ln_math_dtype(Dtype dtype, Dtype grad_dtype) {
  return grad_dtype == (dtype == Dtype::Float64 ? Dtype::Float64 : Dtype::Float32);
}

}  // namespace

cudaError_t launch_lstm_step_fwd(const LstmStepFwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  if (p.stepping < 0 || p.stepping > p.batch) return cudaErrorInvalidValue;
  if (p.ln.hh_weight != nullptr) {
    if (p.rec == nullptr || p.gates_out == nullptr || p.hh_norm_out == nullptr ||
        p.c_norm_out == nullptr || p.rstd_out == nullptr || p.ln.c_weight == nullptr ||
        p.ln.c_bias == nullptr) {
      return cudaErrorInvalidValue;
    }
    return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return launch_ln_step(lstm::lstm_ln_step_fwd_kernel<T>, p, sizeof(lstm::acc_t<T>), stream);
    });
  }
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    constexpr size_t t = sizeof(T);
    if (vectorizable<kVec>(p.hidden,
                           {{p.x_proj, t}, {p.rec, sizeof(lstm::acc_t<T>)}, {p.c_prev, t}, {p.h_prev, t},
                            {p.zoneout_c, t}, {p.zoneout_h, t}, {p.c_out, t}, {p.h_out, t},
                            {p.gates_out, sizeof(lstm::acc_t<T>)}},
                           {p.x_proj_row_stride, p.c_prev_row_stride, p.h_prev_row_stride})) {
      lstm::lstm_step_fwd_kernel<T, kVec><<<grid_for(p.batch * (p.hidden / kVec)), kThreads, 0, stream>>>(p);
    } else {
      lstm::lstm_step_fwd_kernel<T, 1><<<grid_for(p.batch * p.hidden), kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_lstm_step_bwd(const LstmStepBwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  if (p.stepping < 0 || p.stepping > p.batch) return cudaErrorInvalidValue;
  if (p.ln.hh_weight != nullptr) {
    if (!ln_math_dtype(p.dtype, p.grad_dtype) || p.hh_norm == nullptr || p.c_norm == nullptr ||
        p.rstd == nullptr || p.grad_hh == nullptr || p.grad_c_new == nullptr ||
        p.ln.c_weight == nullptr || p.ln.c_bias == nullptr) {
      return cudaErrorInvalidValue;
    }
    return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return launch_ln_step(lstm::lstm_ln_step_bwd_kernel<T>, p, sizeof(lstm::acc_t<T>), stream);
    });
  }
  return lstm::dispatch_dtype_pair(p.dtype, p.grad_dtype, [&](auto tag, auto grad_tag) {
    using T = typename decltype(tag)::type;
    using G = typename decltype(grad_tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    constexpr size_t t = sizeof(T), g = sizeof(G);
    const size_t gates_bytes = p.gates_activated ? sizeof(lstm::acc_t<T>) : t;
    if (vectorizable<kVec>(p.hidden,
                           {{p.gates, gates_bytes}, {p.c_prev, t}, {p.c_new, t}, {p.grad_h, t}, {p.grad_c, t},
                            {p.zoneout_c, t}, {p.zoneout_h, t}, {p.grad_hpre, g}, {p.carried_h, g},
                            {p.carried_c, g}, {p.grad_gates, g}, {p.grad_c_prev, g}},
                           {p.gates_row_stride, p.c_prev_row_stride, p.c_new_row_stride,
                            p.grad_h_row_stride, p.grad_c_row_stride})) {
      lstm::lstm_step_bwd_kernel<T, G, kVec><<<grid_for(p.batch * (p.hidden / kVec)), kThreads, 0, stream>>>(p);
    } else {
      lstm::lstm_step_bwd_kernel<T, G, 1><<<grid_for(p.batch * p.hidden), kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_lstm_projection_fwd(const LstmProjectionFwdParams& p, cudaStream_t stream) {
  if (p.stepping < 0 || p.stepping > p.batch) return cudaErrorInvalidValue;
  // Nothing to mix and no carried row: the GEMM's output already is the state.
  if (p.batch * p.width == 0 || (p.zoneout_h == nullptr && p.stepping == p.batch)) return cudaSuccess;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    lstm::lstm_projection_fwd_kernel<T><<<grid_for(p.batch * p.width), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_lstm_projection_bwd(const LstmProjectionBwdParams& p, cudaStream_t stream) {
  if (p.stepping < 0 || p.stepping > p.batch) return cudaErrorInvalidValue;
  if (p.batch * p.width == 0) return cudaSuccess;
  return lstm::dispatch_dtype_pair(p.dtype, p.grad_dtype, [&](auto tag, auto grad_tag) {
    using T = typename decltype(tag)::type;
    using G = typename decltype(grad_tag)::type;
    lstm::lstm_projection_bwd_kernel<T, G><<<grid_for(p.batch * p.width), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

// The cell ops are one step without options: every row steps, nothing carried or saved.
cudaError_t launch_lstm_cell_fwd(const LstmCellFwdParams& p, cudaStream_t stream) {
  LstmStepFwdParams s;
  s.dtype = p.dtype;
  s.x_proj = p.gates;
  s.c_prev = p.cx;
  s.c_out = p.cy;
  s.h_out = p.hy;
  s.x_proj_row_stride = p.gates_row_stride;
  s.c_prev_row_stride = p.cx_row_stride;
  s.batch = s.stepping = p.batch;
  s.hidden = p.hidden;
  return launch_lstm_step_fwd(s, stream);
}

cudaError_t launch_lstm_cell_bwd(const LstmCellBwdParams& p, cudaStream_t stream) {
  LstmStepBwdParams s;
  s.dtype = s.grad_dtype = p.dtype;
  s.gates = p.gates;
  s.c_prev = p.cx;
  s.c_new = p.cy;
  s.grad_h = p.grad_hy;
  s.grad_c = p.grad_cy;
  s.grad_gates = p.grad_gates;
  s.grad_c_prev = p.grad_cx;
  s.gates_row_stride = p.gates_row_stride;
  s.c_prev_row_stride = p.cx_row_stride;
  s.c_new_row_stride = p.cy_row_stride;
  s.grad_h_row_stride = p.grad_hy_row_stride;
  s.grad_c_row_stride = p.grad_cy_row_stride;
  s.batch = s.stepping = p.batch;
  s.hidden = p.hidden;
  return launch_lstm_step_bwd(s, stream);
}

}  // namespace fastattn
