// Launchers of the fused pointwise LSTM step kernels (csrc/lstm/lstm_cell.cuh) for every dtype:
// the cell ops, and one time step of the layer ops.
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

}  // namespace

cudaError_t launch_lstm_step_fwd(const LstmStepFwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  if (p.stepping < 0 || p.stepping > p.batch) return cudaErrorInvalidValue;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    constexpr size_t t = sizeof(T);
    if (vectorizable<kVec>(p.hidden,
                           {{p.x_proj, t}, {p.rec, sizeof(lstm::acc_t<T>)}, {p.c_prev, t}, {p.h_prev, t},
                            {p.zoneout_c, t}, {p.zoneout_h, t}, {p.c_out, t}, {p.h_out, t},
                            {p.gates_out, t}},
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
  return lstm::dispatch_dtype_pair(p.dtype, p.grad_dtype, [&](auto tag, auto grad_tag) {
    using T = typename decltype(tag)::type;
    using G = typename decltype(grad_tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    constexpr size_t t = sizeof(T), g = sizeof(G);
    if (vectorizable<kVec>(p.hidden,
                           {{p.gates, t}, {p.c_prev, t}, {p.c_new, t}, {p.grad_h, t}, {p.grad_c, t},
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
