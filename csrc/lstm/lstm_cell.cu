// Launchers of the fused pointwise LSTM cell kernels (csrc/lstm/lstm_cell.cuh) for every dtype.
#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "lstm_cell.cuh"

namespace fastattn {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; the kernels loop beyond that.
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

// 16-byte vectors are legal when every row of every tensor starts 16-byte aligned.
template <typename T>
bool rows_aligned(int64_t hidden, std::initializer_list<const void*> ptrs,
                  std::initializer_list<int64_t> row_strides) {
  constexpr int64_t vec = 16 / sizeof(T);
  if (hidden % vec != 0) return false;
  for (const void* ptr : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
  }
  for (int64_t stride : row_strides) {
    if (stride % vec != 0) return false;
  }
  return true;
}

template <int VEC>
dim3 cell_grid(int64_t batch, int64_t hidden) {
  const int64_t threads_needed = batch * (hidden / VEC);
  return dim3(static_cast<unsigned>(std::min(kMaxBlocks, (threads_needed + kThreads - 1) / kThreads)));
}

}  // namespace

cudaError_t launch_lstm_cell_fwd(const LstmCellFwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    if (rows_aligned<T>(p.hidden, {p.gates, p.cx, p.hy, p.cy}, {p.gates_row_stride, p.cx_row_stride})) {
      lstm::lstm_cell_fwd_kernel<T, kVec><<<cell_grid<kVec>(p.batch, p.hidden), kThreads, 0, stream>>>(p);
    } else {
      lstm::lstm_cell_fwd_kernel<T, 1><<<cell_grid<1>(p.batch, p.hidden), kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_lstm_cell_bwd(const LstmCellBwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    if (rows_aligned<T>(p.hidden,
                        {p.grad_hy, p.grad_cy, p.gates, p.cx, p.cy, p.grad_gates, p.grad_cx},
                        {p.grad_hy_row_stride, p.grad_cy_row_stride, p.gates_row_stride,
                         p.cx_row_stride, p.cy_row_stride})) {
      lstm::lstm_cell_bwd_kernel<T, kVec><<<cell_grid<kVec>(p.batch, p.hidden), kThreads, 0, stream>>>(p);
    } else {
      lstm::lstm_cell_bwd_kernel<T, 1><<<cell_grid<1>(p.batch, p.hidden), kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace fastattn
