// CUDA implementations of the fastattn LSTM ops (schemas: fastattn/ops/_registry.py):
// input checks, output allocation, params structs, launch on the current stream.
// The kernels themselves (csrc/lstm/*.cu) know nothing of torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <tuple>

#include "fastattn/lstm_params.h"

namespace fastattn {
namespace {

Dtype lstm_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::Float32;
    case at::kDouble: return Dtype::Float64;
    case at::kHalf: return Dtype::Float16;
    case at::kBFloat16: return Dtype::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fastattn::", op, ": ", name,
                       " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_like(const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef shape, const char* op,
                const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fastattn::", op, ": ", name, " is on ", t.device(),
              ", expected ", ref_name, "'s device ", ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fastattn::", op, ": ", name,
                   " has dtype ", t.scalar_type(), ", expected ", ref_name, "'s ",
                   ref.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, "fastattn::", op, ": ", name, " must have shape ", shape,
                    ", got ", t.sizes());
}

// The cell kernels read rows at any stride but need each row's elements contiguous.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

// [B, 4H] gates on a CUDA device; returns H.
int64_t check_gates(const at::Tensor& gates, const char* op) {
  TORCH_CHECK(gates.is_cuda(), "fastattn::", op, " (CUDA): gates must be a CUDA tensor, got ",
              gates.device());
  TORCH_CHECK_VALUE(gates.dim() == 2 && gates.size(1) % 4 == 0, "fastattn::", op,
                    ": gates must be [B, 4H], got shape ", gates.sizes());
  lstm_dtype(gates, op, "gates");
  return gates.size(1) / 4;
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_pointwise_fwd_cuda(const at::Tensor& gates_in,
                                                                const at::Tensor& cx_in) {
  constexpr const char* op = "lstm_cell_pointwise_fwd";
  const int64_t hidden = check_gates(gates_in, op);
  const int64_t batch = gates_in.size(0);
  check_like(cx_in, gates_in, {batch, hidden}, op, "cx", "gates");

  const c10::cuda::CUDAGuard guard(gates_in.device());
  const at::Tensor gates = rows_contiguous(gates_in), cx = rows_contiguous(cx_in);
  at::Tensor hy = at::empty({batch, hidden}, gates.options());
  at::Tensor cy = at::empty({batch, hidden}, gates.options());

  LstmCellFwdParams p;
  p.dtype = lstm_dtype(gates, op, "gates");
  p.gates = gates.data_ptr();
  p.cx = cx.data_ptr();
  p.hy = hy.data_ptr();
  p.cy = cy.data_ptr();
  p.gates_row_stride = gates.stride(0);
  p.cx_row_stride = cx.stride(0);
  p.batch = batch;
  p.hidden = hidden;
  C10_CUDA_CHECK(launch_lstm_cell_fwd(p, c10::cuda::getCurrentCUDAStream(gates.device().index())));
  return {hy, cy};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_pointwise_bwd_cuda(
    const at::Tensor& grad_hy_in, const at::Tensor& grad_cy_in, const at::Tensor& gates_in,
    const at::Tensor& cx_in, const at::Tensor& cy_in) {
  constexpr const char* op = "lstm_cell_pointwise_bwd";
  const int64_t hidden = check_gates(gates_in, op);
  const int64_t batch = gates_in.size(0);
  check_like(grad_hy_in, gates_in, {batch, hidden}, op, "grad_hy", "gates");
  check_like(grad_cy_in, gates_in, {batch, hidden}, op, "grad_cy", "gates");
  check_like(cx_in, gates_in, {batch, hidden}, op, "cx", "gates");
  check_like(cy_in, gates_in, {batch, hidden}, op, "cy", "gates");

  const c10::cuda::CUDAGuard guard(gates_in.device());
  const at::Tensor grad_hy = rows_contiguous(grad_hy_in), grad_cy = rows_contiguous(grad_cy_in);
  const at::Tensor gates = rows_contiguous(gates_in), cx = rows_contiguous(cx_in),
                   cy = rows_contiguous(cy_in);
  at::Tensor grad_gates = at::empty({batch, 4 * hidden}, gates.options());
  at::Tensor grad_cx = at::empty({batch, hidden}, gates.options());

  LstmCellBwdParams p;
  p.dtype = lstm_dtype(gates, op, "gates");
  p.grad_hy = grad_hy.data_ptr();
  p.grad_cy = grad_cy.data_ptr();
  p.gates = gates.data_ptr();
  p.cx = cx.data_ptr();
  p.cy = cy.data_ptr();
  p.grad_gates = grad_gates.data_ptr();
  p.grad_cx = grad_cx.data_ptr();
  p.grad_hy_row_stride = grad_hy.stride(0);
  p.grad_cy_row_stride = grad_cy.stride(0);
  p.gates_row_stride = gates.stride(0);
  p.cx_row_stride = cx.stride(0);
  p.cy_row_stride = cy.stride(0);
  p.batch = batch;
  p.hidden = hidden;
  C10_CUDA_CHECK(launch_lstm_cell_bwd(p, c10::cuda::getCurrentCUDAStream(gates.device().index())));
  return {grad_gates, grad_cx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_sequence_fwd_cuda(const at::Tensor& x_proj_in,
                                                                      const at::Tensor& h0_in,
                                                                      const at::Tensor& c0_in,
                                                                      const at::Tensor& w_hh_in) {
  constexpr const char* op = "lstm_sequence_fwd";
  TORCH_CHECK(x_proj_in.is_cuda(), "fastattn::", op, " (CUDA): x_proj must be a CUDA tensor, got ",
              x_proj_in.device());
  TORCH_CHECK_VALUE(x_proj_in.dim() == 3 && x_proj_in.size(2) % 4 == 0, "fastattn::", op,
                    ": x_proj must be [T, B, 4H], got shape ", x_proj_in.sizes());
  const Dtype dtype = lstm_dtype(x_proj_in, op, "x_proj");
  const int64_t seq_len = x_proj_in.size(0), batch = x_proj_in.size(1);
  const int64_t hidden = x_proj_in.size(2) / 4;
  check_like(h0_in, x_proj_in, {batch, hidden}, op, "h0", "x_proj");
  check_like(c0_in, x_proj_in, {batch, hidden}, op, "c0", "x_proj");
  check_like(w_hh_in, x_proj_in, {4 * hidden, hidden}, op, "w_hh", "x_proj");
  TORCH_CHECK_VALUE(hidden >= 1 && hidden <= kLstmSequenceMaxHidden, "fastattn::", op,
                    " (CUDA): the persistent kernel serves hidden sizes 1..",
                    kLstmSequenceMaxHidden, ", got H = ", hidden);

  const c10::cuda::CUDAGuard guard(x_proj_in.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                        x_proj_in.device().index()));
  TORCH_CHECK(major >= 8, "fastattn::", op, " (CUDA): the persistent kernel needs sm_80 or newer, ",
              "device ", x_proj_in.device(), " is sm_", major, "x");

  const at::Tensor x_proj = x_proj_in.contiguous(), h0 = h0_in.contiguous(),
                   c0 = c0_in.contiguous(), w_hh = w_hh_in.contiguous();
  at::Tensor h_all = at::empty({seq_len, batch, hidden}, x_proj.options());
  at::Tensor c_all = at::empty({seq_len, batch, hidden}, x_proj.options());
  at::Tensor gates_all = at::empty({seq_len, batch, 4 * hidden}, x_proj.options());

  LstmSequenceFwdParams p;
  p.dtype = dtype;
  p.x_proj = x_proj.data_ptr();
  p.h0 = h0.data_ptr();
  p.c0 = c0.data_ptr();
  p.w_hh = w_hh.data_ptr();
  p.h_all = h_all.data_ptr();
  p.c_all = c_all.data_ptr();
  p.gates_all = gates_all.data_ptr();
  p.seq_len = seq_len;
  p.batch = batch;
  p.hidden = hidden;
  const cudaError_t err =
      launch_lstm_sequence_fwd(p, c10::cuda::getCurrentCUDAStream(x_proj.device().index()));
  if (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported) {
    (void)cudaGetLastError();  // a refused launch must not surface in a later, unrelated check
    TORCH_CHECK(false, "fastattn::", op, " (CUDA): device ", x_proj.device(),
                err == cudaErrorNotSupported
                    ? " does not support cooperative launches"
                    : " cannot hold the co-resident grid this problem needs",
                " (T = ", seq_len, ", B = ", batch, ", H = ", hidden, ")");
  }
  C10_CUDA_CHECK(err);
  return {h_all, c_all, gates_all};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("lstm_cell_pointwise_fwd", &fastattn::lstm_cell_pointwise_fwd_cuda);
  m.impl("lstm_cell_pointwise_bwd", &fastattn::lstm_cell_pointwise_bwd_cuda);
  m.impl("lstm_sequence_fwd", &fastattn::lstm_sequence_fwd_cuda);
}
