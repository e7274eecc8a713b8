// CUDA implementations of the fastattn LSTM ops (schemas: fastattn/ops/_registry.py):
// input checks, output allocation, params structs, launch on the current stream. The layer ops
// (plain and LayerNorm-LSTM) run their time loop here: per step a GEMM on torch's current
// stream (cuBLAS through ATen, into preallocated buffers) and one fused step kernel; a layer
// without projection runs the persistent forward and backward kernels instead where they fit
// (sequence_kernel_serves). The weight gradients are GEMMs (and, for the LN gains, reductions)
// over all steps after either. The kernels themselves (csrc/lstm/*.cu) know nothing of torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "fastattn/lstm_params.h"
#include "lstm_layer_problem.h"

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

// The type the kernels compute in, and the backward keeps its gradients in.
at::ScalarType math_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Dtype math_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? Dtype::Float64 : Dtype::Float32;
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

// The layer options the persistent kernels take (csrc/lstm/lstm_sequence.cuh), on the device;
// lstm_sequence_fwd has none.
struct SequenceOptions {
  bool reverse = false;
  at::Tensor batch_sizes;           // int64 [T], or undefined: every row steps
  at::Tensor zoneout_c, zoneout_h;  // contiguous [T, B, H], or undefined

  // Sets them in a kernel's params (LstmSequenceFwdParams / LstmSequenceBwdParams).
  template <typename Params>
  void apply(Params& p) const {
    p.reverse = reverse;
    p.batch_sizes = batch_sizes.defined() ? batch_sizes.data_ptr<int64_t>() : nullptr;
    p.zoneout_c = zoneout_c.defined() ? zoneout_c.data_ptr() : nullptr;
    p.zoneout_h = zoneout_h.defined() ? zoneout_h.data_ptr() : nullptr;
  }
};

// The persistent forward on x_proj's current stream; every tensor contiguous, gates_all in the
// math type.
cudaError_t sequence_forward(Dtype dtype, const at::Tensor& x_proj, const at::Tensor& h0,
                             const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& h_all,
                             const at::Tensor& c_all, const at::Tensor& gates_all,
                             const SequenceOptions& o) {
  LstmSequenceFwdParams p;
  p.dtype = dtype;
  p.x_proj = x_proj.data_ptr();
  p.h0 = h0.data_ptr();
  p.c0 = c0.data_ptr();
  p.w_hh = w_hh.data_ptr();
  p.h_all = h_all.data_ptr();
  p.c_all = c_all.data_ptr();
  p.gates_all = gates_all.data_ptr();
  p.seq_len = x_proj.size(0);
  p.batch = x_proj.size(1);
  p.hidden = x_proj.size(2) / 4;
  o.apply(p);
  return launch_lstm_sequence_fwd(p, c10::cuda::getCurrentCUDAStream(x_proj.device().index()));
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
  at::Tensor gates_all =
      at::empty({seq_len, batch, 4 * hidden}, x_proj.options().dtype(math_type(x_proj)));

  const cudaError_t err =
      sequence_forward(dtype, x_proj, h0, c0, w_hh, h_all, c_all, gates_all, SequenceOptions());
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

// ---- layer ops -------------------------------------------------------------------------------

using lstm_glue::LayerProblem;
using lstm_glue::OptTensor;

// Step t of a [T, ...] tensor, or nullptr for an absent option.
void* ptr_at(const at::Tensor& all, int64_t t) {
  return all.defined() ? all[t].data_ptr() : nullptr;
}

// out[:n] = a[:n] @ b into rows of a preallocated buffer (cuBLAS on the current stream); out
// may be float32 for half / bfloat16 operands (the product is not rounded to them).
void mm_rows(const at::Tensor& out, int64_t n, const at::Tensor& a, const at::Tensor& b) {
  if (n == 0) return;
  at::Tensor rows = out.narrow(0, 0, n);
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(rows, a.narrow(0, 0, n), b);
  } else {
    at::mm_out(rows, a.narrow(0, 0, n), b, out.scalar_type());
  }
}

// Every tensor of the call on x's CUDA device (layer_problem checks shapes, dtypes, devices).
LayerProblem cuda_layer_problem(const char* op, const at::Tensor& x, const at::Tensor& h0,
                                const at::Tensor& c0, const at::Tensor& w_hh,
                                const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse,
                                const OptTensor& zoneout_c, const OptTensor& zoneout_h) {
  TORCH_CHECK(x.is_cuda(), op, " (CUDA): expected CUDA tensors, got ", x.device());
  LayerProblem p = lstm_glue::layer_problem(op, x, h0, c0, w_hh, w_hr, batch_sizes, reverse,
                                            zoneout_c, zoneout_h);
  // The step kernels read the options as contiguous [B, width] rows of step t.
  if (p.w_hr.defined()) p.w_hr = p.w_hr.contiguous();
  return p;
}

// The LayerNorm-LSTM's share of a layer call (fastattn::lstm_ln_layer_*): its weights
// (contiguous, the data dtype) and the rows the forward saves for the backward (math type).
struct LayerNorm {
  at::Tensor hh_weight, c_weight, c_bias;  // [4H], [H], [H]
  double eps = 0.0;
  at::Tensor hh_norm_all, c_norm_all, rstd_all;  // [T, B, 4H], [T, B, H], [T, B, 2]

  LstmStepLayerNorm params() const {
    return {hh_weight.data_ptr(), c_weight.data_ptr(), c_bias.data_ptr(), eps};
  }
};

// The forward time loop. x_proj [T, B, 4H] (last dim contiguous), h0 / c0 contiguous; writes
// h_all, c_all, and gates_all (the math type) when defined. hpre: [T, B, H] (hpre_all) or a
// [1, B, H] scratch when projecting, else undefined. ln: the LayerNorm-LSTM step, or nullptr.
void layer_forward(const LayerProblem& p, const at::Tensor& x_proj, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& h_all,
                   const at::Tensor& c_all, const at::Tensor& gates_all, const at::Tensor& hpre,
                   const LayerNorm* ln = nullptr) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_proj.device().index());
  const bool proj = p.w_hr.defined();
  const Dtype dtype = lstm_dtype(x_proj, "lstm_layer_fwd", "x_proj");
  // h_prev @ w_hh^T of a step, in the math type: half types add it to x_proj unrounded.
  at::Tensor rec = at::empty({p.B, 4 * p.H}, x_proj.options().dtype(math_type(x_proj)));
  const at::Tensor w_hh_t = w_hh.t(), w_hr_t = proj ? p.w_hr.t() : at::Tensor();
  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.time(s), n = p.batch_sizes[t];
    const at::Tensor h_prev = p.prev(h_all, h0, s), c_prev = p.prev(c_all, c0, s);
    mm_rows(rec, n, h_prev, w_hh_t);
    const at::Tensor h_t = h_all[t], hpre_t = proj ? hpre[hpre.size(0) == 1 ? 0 : t] : at::Tensor();
    LstmStepFwdParams sp;
    sp.dtype = dtype;
    sp.x_proj = x_proj[t].data_ptr();
    sp.rec = rec.data_ptr();
    sp.c_prev = c_prev.data_ptr();
    sp.h_prev = proj ? nullptr : h_prev.data_ptr();
    sp.zoneout_c = ptr_at(p.zoneout_c, t);
    sp.zoneout_h = proj ? nullptr : ptr_at(p.zoneout_h, t);
    sp.c_out = c_all[t].data_ptr();
    sp.h_out = proj ? hpre_t.data_ptr() : h_t.data_ptr();
    sp.gates_out = ptr_at(gates_all, t);
    sp.x_proj_row_stride = x_proj.stride(1);
    sp.c_prev_row_stride = c_prev.stride(0);
    sp.h_prev_row_stride = h_prev.stride(0);
    sp.batch = p.B;
    sp.hidden = p.H;
    sp.stepping = n;
    sp.project = proj;
    if (ln != nullptr) {
      sp.ln = ln->params();
      sp.hh_norm_out = ln->hh_norm_all[t].data_ptr();
      sp.c_norm_out = ln->c_norm_all[t].data_ptr();
      sp.rstd_out = ln->rstd_all[t].data_ptr();
    }
    C10_CUDA_CHECK(launch_lstm_step_fwd(sp, stream));
    if (!proj) continue;
    mm_rows(h_t, n, hpre_t, w_hr_t);
    LstmProjectionFwdParams pp;
    pp.dtype = dtype;
    pp.h = h_t.data_ptr();
    pp.h_prev = h_prev.data_ptr();
    pp.zoneout_h = ptr_at(p.zoneout_h, t);
    pp.batch = p.B;
    pp.width = p.P;
    pp.stepping = n;
    C10_CUDA_CHECK(launch_lstm_projection_fwd(pp, stream));
  }
}

// Of the layer options, the persistent kernels take all but projection.
bool persistent_takes_options(const LayerProblem& p) { return !p.w_hr.defined(); }

// The problem's batch_sizes on `device` for the persistent kernels, or undefined when every row
// steps at every time (the kernels then read none). Copied from pinned memory without blocking:
// a copy from pageable memory would first wait for the stream's earlier work (the layers
// before), stalling the host. The caching host allocator keeps the pinned buffer until the copy
// ran.
at::Tensor device_batch_sizes(const LayerProblem& p, const at::Device& device) {
  const bool packed = std::any_of(p.batch_sizes.begin(), p.batch_sizes.end(),
                                  [&](int64_t n) { return n != p.B; });
  if (!packed) return at::Tensor();
  at::Tensor host = at::empty({p.T}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(p.batch_sizes.begin(), p.batch_sizes.end(), host.data_ptr<int64_t>());
  return host.to(device, at::kLong, /*non_blocking=*/true);
}

SequenceOptions sequence_options(const LayerProblem& p, const at::Device& device) {
  return {p.reverse, device_batch_sizes(p, device), p.zoneout_c, p.zoneout_h};
}

// The persistent kernels (csrc/lstm/lstm_sequence.cuh) serve a problem whose options they take
// (all but projection) when they fit on this device (hidden size, sm_80+, cooperative launch,
// a co-resident grid), the forward and the backward each by its own check: a problem one
// cannot take runs the loop instead of raising. float64 stays on the loop, as the Python-side
// choice kept it before (the two have not been timed against each other).
bool sequence_kernel_serves(const LayerProblem& p, Dtype dtype, bool backward) {
  if (!persistent_takes_options(p) || dtype == Dtype::Float64 || p.T == 0 || p.B == 0) {
    return false;
  }
  return backward ? lstm_sequence_bwd_fits(dtype, p.B, p.H)
                  : lstm_sequence_fwd_fits(dtype, p.B, p.H);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cuda(
    const at::Tensor& x_proj_in, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse,
    const OptTensor& zoneout_c, const OptTensor& zoneout_h) {
  constexpr const char* op = "fastattn::lstm_layer_fwd";
  const LayerProblem p = cuda_layer_problem(op, x_proj_in, h0_in, c0_in, w_hh, w_hr, batch_sizes,
                                            reverse, zoneout_c, zoneout_h);
  const c10::cuda::CUDAGuard guard(x_proj_in.device());
  const at::Tensor x_proj = x_proj_in.contiguous(), h0 = h0_in.contiguous(),
                   c0 = c0_in.contiguous();
  const auto opts = x_proj.options();
  const bool proj = p.w_hr.defined();
  at::Tensor h_all = at::empty({p.T, p.B, p.P}, opts);
  at::Tensor c_all = at::empty({p.T, p.B, p.H}, opts);
  // In the math type: the backward's dc = grad_c + grad_h * o * (1 - tanh^2(c)) can cancel, and
  // gates rounded to a half type would reach grad c0 magnified (csrc/include/fastattn/lstm_params.h).
  at::Tensor gates_all = at::empty({p.T, p.B, 4 * p.H}, opts.dtype(math_type(x_proj)));
  at::Tensor hpre_all = proj ? at::empty({p.T, p.B, p.H}, opts) : at::empty({0}, opts);
  const Dtype dtype = lstm_glue::lstm_dtype(x_proj, op);
  if (sequence_kernel_serves(p, dtype, false)) {
    C10_CUDA_CHECK(sequence_forward(dtype, x_proj, h0, c0, w_hh.contiguous(), h_all, c_all,
                                    gates_all, sequence_options(p, x_proj.device())));
  } else {
    layer_forward(p, x_proj, h0, c0, w_hh, h_all, c_all, gates_all,
                  proj ? hpre_all : at::Tensor());
  }
  return {h_all, c_all, gates_all, hpre_all};
}

// Inference: x_proj by one GEMM, then the persistent kernel where it serves, else the loop
// (no gates saved).
std::tuple<at::Tensor, at::Tensor> lstm_layer_infer_cuda(
    const at::Tensor& input, const at::Tensor& w_ih, const OptTensor& bias, const at::Tensor& h0_in,
    const at::Tensor& c0_in, const at::Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse, const OptTensor& zoneout_c,
    const OptTensor& zoneout_h) {
  constexpr const char* op = "fastattn::lstm_layer_infer";
  TORCH_CHECK(input.is_cuda(), op, " (CUDA): expected CUDA tensors, got ", input.device());
  TORCH_CHECK(input.dim() == 3, op, ": input must be [T, B, I], got ", input.sizes());
  const Dtype dtype = lstm_dtype(input, op, "input");
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0, op, ": w_ih must be [4H, ", I,
              "], got ", w_ih.sizes());
  const int64_t H = w_ih.size(0) / 4;
  lstm_glue::check_like(w_ih, input, {4 * H, I}, op, "w_ih");
  if (lstm_glue::given(bias)) lstm_glue::check_like(*bias, input, {4 * H}, op, "bias");
  LayerProblem p = lstm_glue::layer_problem(op, input, T, B, H, h0_in, c0_in, w_hh, w_hr,
                                            batch_sizes, reverse, zoneout_c, zoneout_h);
  if (p.w_hr.defined()) p.w_hr = p.w_hr.contiguous();
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  at::Tensor h_all = at::empty({T, B, p.P}, opts);
  at::Tensor c_all = at::empty({T, B, H}, opts);
  if (T == 0 || B == 0) return {h_all, c_all};
  const at::Tensor x = input.reshape({T * B, I});
  const at::Tensor x_proj = (lstm_glue::given(bias) ? at::addmm(*bias, x, w_ih.t())
                                                    : at::mm(x, w_ih.t()))
                                .view({T, B, 4 * H});
  const at::Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  if (sequence_kernel_serves(p, dtype, false)) {
    // The kernel writes the gates regardless (in the math type).
    const at::Tensor gates_all = at::empty({T, B, 4 * H}, opts.dtype(math_type(input)));
    C10_CUDA_CHECK(sequence_forward(dtype, x_proj, h0, c0, w_hh.contiguous(), h_all, c_all,
                                    gates_all, sequence_options(p, input.device())));
    return {h_all, c_all};
  }
  const at::Tensor hpre = p.w_hr.defined() ? at::empty({1, B, H}, opts) : at::Tensor();
  layer_forward(p, x_proj, h0, c0, w_hh, h_all, c_all, at::Tensor(), hpre);
  return {h_all, c_all};
}

// A saved row tensor of the layer ops (gates_all, the LN rows): on `like`'s device, in its
// math type, of this shape.
void check_math_rows(const char* op, const at::Tensor& t, const at::Tensor& like,
                     at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == math_type(like) &&
                  t.sizes() == shape,
              op, ": ", name, " must be a ", math_type(like), " tensor of shape ", shape, " on ",
              like.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// The gradients of one layer call, in the math type, from its backward time loop.
struct LayerGrads {
  at::Tensor grad_gates_all;  // [T, B, 4H] of x_proj
  at::Tensor grad_rec_all;    // [T, B, 4H] of h_prev @ w_hh^T (grad_gates_all without LN)
  at::Tensor grad_c_new_all;  // [T, B, H] of the cell LN's output (LN only)
  at::Tensor dh, dc;          // [B, P], [B, H] of h0, c0
  at::Tensor grad_w_hh;       // [4H, P]
  at::Tensor grad_w_hr;       // [P, H], undefined without projection
};

// The backward time loop (reverse of layer_forward) and the whole-sequence weight gradients.
// Inputs contiguous; gates_all (activated) in the math type, as layer_forward saved them.
LayerGrads layer_backward(const LayerProblem& p, const at::Tensor& grad_h_all,
                          const at::Tensor& grad_c_all, const at::Tensor& h0, const at::Tensor& c0,
                          const at::Tensor& w_hh, const at::Tensor& h_all, const at::Tensor& c_all,
                          const at::Tensor& gates_all, const at::Tensor& hpre_all,
                          const LayerNorm* ln) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h0.device().index());
  const bool proj = p.w_hr.defined();
  const Dtype dtype = lstm_dtype(h0, "lstm_layer_bwd", "h0");
  const at::ScalarType math = math_type(h0);
  const Dtype grad_dtype = math_dtype(h0);
  const auto mopts = h0.options().dtype(math);
  LayerGrads r;
  // Gradients in the math type: the carried state gradients, and every step's gradients that
  // the whole-sequence weight gradients read.
  r.grad_gates_all = at::empty({p.T, p.B, 4 * p.H}, mopts);
  r.grad_rec_all = ln != nullptr ? at::empty({p.T, p.B, 4 * p.H}, mopts) : r.grad_gates_all;
  if (ln != nullptr) r.grad_c_new_all = at::empty({p.T, p.B, p.H}, mopts);
  r.dh = at::zeros({p.B, p.P}, mopts);
  r.dc = at::zeros({p.B, p.H}, mopts);
  at::Tensor grad_proj_all = proj ? at::empty({p.T, p.B, p.P}, mopts) : at::Tensor();
  at::Tensor grad_hpre = proj ? at::empty({p.B, p.H}, mopts) : at::Tensor();
  // The persistent kernel where it serves (it writes grad_gates_all, dh and dc), else the loop,
  // which alone reads the weights in the math type.
  const bool persistent = ln == nullptr && sequence_kernel_serves(p, dtype, true);
  const at::Tensor w_hh_m = persistent ? at::Tensor() : w_hh.to(math);
  const at::Tensor w_hr_m = proj ? p.w_hr.to(math) : at::Tensor();
  if (persistent) {
    LstmSequenceBwdParams sp;
    sp.dtype = dtype;
    sp.grad_h_all = grad_h_all.data_ptr();
    sp.grad_c_all = grad_c_all.data_ptr();
    sp.c0 = c0.data_ptr();
    sp.c_all = c_all.data_ptr();
    sp.gates_all = gates_all.data_ptr();
    const at::Tensor w = w_hh.contiguous();
    sp.w_hh = w.data_ptr();
    sp.grad_gates_all = r.grad_gates_all.data_ptr();
    sp.grad_h0 = r.dh.data_ptr();
    sp.grad_c0 = r.dc.data_ptr();
    sp.seq_len = p.T;
    sp.batch = p.B;
    sp.hidden = p.H;
    const SequenceOptions o = sequence_options(p, h0.device());
    o.apply(sp);
    C10_CUDA_CHECK(launch_lstm_sequence_bwd(sp, stream));
  }
  for (int64_t s = p.T - 1; !persistent && s >= 0; --s) {
    const int64_t t = p.time(s), n = p.batch_sizes[t];
    const at::Tensor c_prev = p.prev(c_all, c0, s);
    if (proj) {
      LstmProjectionBwdParams pp;
      pp.dtype = dtype;
      pp.grad_dtype = grad_dtype;
      pp.grad_h = grad_h_all[t].data_ptr();
      pp.zoneout_h = ptr_at(p.zoneout_h, t);
      pp.carried_h = r.dh.data_ptr();
      pp.grad_proj = grad_proj_all[t].data_ptr();
      pp.batch = p.B;
      pp.width = p.P;
      pp.stepping = n;
      C10_CUDA_CHECK(launch_lstm_projection_bwd(pp, stream));
      mm_rows(grad_hpre, n, grad_proj_all[t], w_hr_m);
    }
    LstmStepBwdParams sp;
    sp.dtype = dtype;
    sp.grad_dtype = grad_dtype;
    sp.gates = gates_all[t].data_ptr();
    sp.gates_activated = true;
    sp.c_prev = c_prev.data_ptr();
    sp.grad_h = proj ? nullptr : grad_h_all[t].data_ptr();
    sp.grad_c = grad_c_all[t].data_ptr();
    sp.grad_hpre = proj ? grad_hpre.data_ptr() : nullptr;
    sp.carried_h = proj ? nullptr : r.dh.data_ptr();
    sp.carried_c = r.dc.data_ptr();
    sp.zoneout_c = ptr_at(p.zoneout_c, t);
    sp.zoneout_h = proj ? nullptr : ptr_at(p.zoneout_h, t);
    sp.grad_gates = r.grad_gates_all[t].data_ptr();
    sp.grad_c_prev = r.dc.data_ptr();
    sp.gates_row_stride = 4 * p.H;
    sp.c_prev_row_stride = c_prev.stride(0);
    sp.grad_h_row_stride = p.P;
    sp.grad_c_row_stride = p.H;
    sp.batch = p.B;
    sp.hidden = p.H;
    sp.stepping = n;
    if (ln != nullptr) {
      sp.ln = ln->params();
      sp.hh_norm = ln->hh_norm_all[t].data_ptr();
      sp.c_norm = ln->c_norm_all[t].data_ptr();
      sp.rstd = ln->rstd_all[t].data_ptr();
      sp.grad_hh = r.grad_rec_all[t].data_ptr();
      sp.grad_c_new = r.grad_c_new_all[t].data_ptr();
    }
    C10_CUDA_CHECK(launch_lstm_step_bwd(sp, stream));
    // The recurrent path back to h_prev, added to the part that skipped it.
    if (n > 0) r.dh.narrow(0, 0, n).addmm_(r.grad_rec_all[t].narrow(0, 0, n), w_hh_m);
  }

  // Weight gradients for the whole sequence: sum_t grad_rec[t]^T @ h_prev(t), one GEMM for the
  // steps that read h_all and one for the step that reads h0.
  const int64_t G = 4 * p.H;
  if (p.T == 0) {
    r.grad_w_hh = at::zeros({G, p.P}, mopts);
  } else {
    const int64_t first = p.reverse ? p.T - 1 : 0;
    r.grad_w_hh = at::mm(r.grad_rec_all[first].t(), h0.to(math));
    if (p.T > 1) {
      const at::Tensor later = r.grad_rec_all.narrow(0, p.reverse ? 0 : 1, p.T - 1);
      const at::Tensor prev = h_all.narrow(0, p.reverse ? 1 : 0, p.T - 1).to(math);
      // Explicit row counts: -1 cannot be inferred from zero-size rows (H == 0 or P == 0).
      const int64_t rows = (p.T - 1) * p.B;
      r.grad_w_hh.addmm_(later.reshape({rows, G}).t(), prev.reshape({rows, p.P}));
    }
  }
  if (proj) {
    r.grad_w_hr =
        at::mm(grad_proj_all.reshape({p.T * p.B, p.P}).t(),
               hpre_all.to(math).reshape({p.T * p.B, p.H}));
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cuda(
    const at::Tensor& grad_h_all_in, const at::Tensor& grad_c_all_in, const at::Tensor& h0_in,
    const at::Tensor& c0_in, const at::Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse, const OptTensor& zoneout_c,
    const OptTensor& zoneout_h, const at::Tensor& h_all_in, const at::Tensor& c_all_in,
    const at::Tensor& gates_all_in, const at::Tensor& hpre_all) {
  constexpr const char* op = "fastattn::lstm_layer_bwd";
  TORCH_CHECK(c_all_in.is_cuda(), op, " (CUDA): expected CUDA tensors, got ", c_all_in.device());
  TORCH_CHECK(gates_all_in.dim() == 3 && gates_all_in.size(2) % 4 == 0, op,
              ": gates_all must be [T, B, 4H], got ", gates_all_in.sizes());
  lstm_glue::lstm_dtype(c_all_in, op);
  LayerProblem p = lstm_glue::layer_problem(
      op, c_all_in, gates_all_in.size(0), gates_all_in.size(1), gates_all_in.size(2) / 4, h0_in,
      c0_in, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h);
  if (p.w_hr.defined()) p.w_hr = p.w_hr.contiguous();
  const bool proj = p.w_hr.defined();
  lstm_glue::check_like(grad_h_all_in, c_all_in, {p.T, p.B, p.P}, op, "grad_h_all");
  lstm_glue::check_like(grad_c_all_in, c_all_in, {p.T, p.B, p.H}, op, "grad_c_all");
  lstm_glue::check_like(h_all_in, c_all_in, {p.T, p.B, p.P}, op, "h_all");
  lstm_glue::check_like(c_all_in, c_all_in, {p.T, p.B, p.H}, op, "c_all");
  if (proj) lstm_glue::check_like(hpre_all, c_all_in, {p.T, p.B, p.H}, op, "hpre_all");
  check_math_rows(op, gates_all_in, c_all_in, {p.T, p.B, 4 * p.H}, "gates_all");

  const c10::cuda::CUDAGuard guard(c_all_in.device());
  const LayerGrads g = layer_backward(
      p, grad_h_all_in.contiguous(), grad_c_all_in.contiguous(), h0_in.contiguous(),
      c0_in.contiguous(), w_hh, h_all_in.contiguous(), c_all_in.contiguous(),
      gates_all_in.contiguous(), proj ? hpre_all.contiguous() : at::Tensor(), nullptr);
  const at::ScalarType out = c_all_in.scalar_type();
  return {g.grad_gates_all.to(out), g.dh.to(out), g.dc.to(out), g.grad_w_hh.to(out),
          proj ? g.grad_w_hr.to(out) : at::empty({0}, c_all_in.options())};
}

// ---- LayerNorm-LSTM layer ops (the same loops with the LN stage) ---------------------------

LayerNorm ln_weights(const char* op, const LayerProblem& p, const at::Tensor& like,
                     const at::Tensor& hh_weight, const at::Tensor& c_weight,
                     const at::Tensor& c_bias, double eps) {
  lstm_glue::check_like(hh_weight, like, {4 * p.H}, op, "ln_hh_weight");
  lstm_glue::check_like(c_weight, like, {p.H}, op, "ln_c_weight");
  lstm_glue::check_like(c_bias, like, {p.H}, op, "ln_c_bias");
  LayerNorm ln;
  ln.hh_weight = hh_weight.contiguous();
  ln.c_weight = c_weight.contiguous();
  ln.c_bias = c_bias.contiguous();
  ln.eps = eps;
  return ln;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_ln_layer_fwd_cuda(const at::Tensor& x_proj_in, const at::Tensor& h0_in,
                       const at::Tensor& c0_in, const at::Tensor& w_hh,
                       const at::Tensor& ln_hh_weight, const at::Tensor& ln_c_weight,
                       const at::Tensor& ln_c_bias, double eps, const OptTensor& w_hr,
                       const OptTensor& batch_sizes, bool reverse, const OptTensor& zoneout_c,
                       const OptTensor& zoneout_h) {
  constexpr const char* op = "fastattn::lstm_ln_layer_fwd";
  const LayerProblem p = cuda_layer_problem(op, x_proj_in, h0_in, c0_in, w_hh, w_hr, batch_sizes,
                                            reverse, zoneout_c, zoneout_h);
  LayerNorm ln = ln_weights(op, p, x_proj_in, ln_hh_weight, ln_c_weight, ln_c_bias, eps);
  const c10::cuda::CUDAGuard guard(x_proj_in.device());
  const at::Tensor x_proj = x_proj_in.contiguous(), h0 = h0_in.contiguous(),
                   c0 = c0_in.contiguous();
  const auto opts = x_proj.options(), mopts = opts.dtype(math_type(x_proj));
  const bool proj = p.w_hr.defined();
  at::Tensor h_all = at::empty({p.T, p.B, p.P}, opts);
  at::Tensor c_all = at::empty({p.T, p.B, p.H}, opts);
  at::Tensor gates_all = at::empty({p.T, p.B, 4 * p.H}, mopts);
  at::Tensor hpre_all = proj ? at::empty({p.T, p.B, p.H}, opts) : at::empty({0}, opts);
  ln.hh_norm_all = at::empty({p.T, p.B, 4 * p.H}, mopts);
  ln.c_norm_all = at::empty({p.T, p.B, p.H}, mopts);
  // H == 0: zeros, as on the CPU (csrc/lstm/lstm_layer_norm_cpu.cpp), since no step writes them.
  ln.rstd_all = p.H == 0 ? at::zeros({p.T, p.B, 2}, mopts) : at::empty({p.T, p.B, 2}, mopts);
  layer_forward(p, x_proj, h0, c0, w_hh, h_all, c_all, gates_all, proj ? hpre_all : at::Tensor(),
                &ln);
  return {h_all, c_all, gates_all, hpre_all, ln.hh_norm_all, ln.c_norm_all, ln.rstd_all};
}

// sum over time and batch of a * b: [T, B, W] x2 -> [W] (math type).
at::Tensor sum_of_products(const at::Tensor& a, const at::Tensor& b) {
  return at::mul(a, b).sum({0, 1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
lstm_ln_layer_bwd_cuda(const at::Tensor& grad_h_all, const at::Tensor& grad_c_all,
                       const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                       const at::Tensor& ln_hh_weight, const at::Tensor& ln_c_weight,
                       const at::Tensor& ln_c_bias, const OptTensor& w_hr,
                       const OptTensor& batch_sizes, bool reverse, const OptTensor& zoneout_c,
                       const OptTensor& zoneout_h, const at::Tensor& h_all,
                       const at::Tensor& c_all, const at::Tensor& gates_all,
                       const at::Tensor& hpre_all, const at::Tensor& hh_norm_all,
                       const at::Tensor& c_norm_all, const at::Tensor& rstd_all) {
  constexpr const char* op = "fastattn::lstm_ln_layer_bwd";
  TORCH_CHECK(h0.is_cuda(), op, " (CUDA): expected CUDA tensors, got ", h0.device());
  TORCH_CHECK(hh_norm_all.dim() == 3 && hh_norm_all.size(2) % 4 == 0, op,
              ": hh_norm_all must be [T, B, 4H], got ", hh_norm_all.sizes());
  lstm_glue::lstm_dtype(h0, op);
  LayerProblem p = lstm_glue::layer_problem(
      op, h0, hh_norm_all.size(0), hh_norm_all.size(1), hh_norm_all.size(2) / 4, h0, c0, w_hh,
      w_hr, batch_sizes, reverse, zoneout_c, zoneout_h);
  if (p.w_hr.defined()) p.w_hr = p.w_hr.contiguous();
  LayerNorm ln = ln_weights(op, p, h0, ln_hh_weight, ln_c_weight, ln_c_bias, 0.0);
  const int64_t T = p.T, B = p.B, H = p.H, P = p.P;
  const bool proj = p.w_hr.defined();
  lstm_glue::check_like(grad_h_all, h0, {T, B, P}, op, "grad_h_all");
  lstm_glue::check_like(grad_c_all, h0, {T, B, H}, op, "grad_c_all");
  lstm_glue::check_like(h_all, h0, {T, B, P}, op, "h_all");
  lstm_glue::check_like(c_all, h0, {T, B, H}, op, "c_all");
  if (proj) lstm_glue::check_like(hpre_all, h0, {T, B, H}, op, "hpre_all");
  check_math_rows(op, gates_all, h0, {T, B, 4 * H}, "gates_all");
  check_math_rows(op, hh_norm_all, h0, {T, B, 4 * H}, "hh_norm_all");
  check_math_rows(op, c_norm_all, h0, {T, B, H}, "c_norm_all");
  check_math_rows(op, rstd_all, h0, {T, B, 2}, "rstd_all");

  const c10::cuda::CUDAGuard guard(h0.device());
  ln.hh_norm_all = hh_norm_all.contiguous();
  ln.c_norm_all = c_norm_all.contiguous();
  ln.rstd_all = rstd_all.contiguous();
  const LayerGrads g = layer_backward(
      p, grad_h_all.contiguous(), grad_c_all.contiguous(), h0.contiguous(), c0.contiguous(), w_hh,
      h_all.contiguous(), c_all.contiguous(), gates_all.contiguous(),
      proj ? hpre_all.contiguous() : at::Tensor(), &ln);
  const at::ScalarType out = h0.scalar_type();
  return {g.grad_gates_all.to(out),
          g.dh.to(out),
          g.dc.to(out),
          g.grad_w_hh.to(out),
          sum_of_products(g.grad_gates_all, ln.hh_norm_all).to(out),
          sum_of_products(g.grad_c_new_all, ln.c_norm_all).to(out),
          g.grad_c_new_all.sum({0, 1}).to(out),
          proj ? g.grad_w_hr.to(out) : at::empty({0}, h0.options())};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("lstm_cell_pointwise_fwd", &fastattn::lstm_cell_pointwise_fwd_cuda);
  m.impl("lstm_cell_pointwise_bwd", &fastattn::lstm_cell_pointwise_bwd_cuda);
  m.impl("lstm_sequence_fwd", &fastattn::lstm_sequence_fwd_cuda);
  m.impl("lstm_layer_fwd", &fastattn::lstm_layer_fwd_cuda);
  m.impl("lstm_layer_infer", &fastattn::lstm_layer_infer_cuda);
  m.impl("lstm_layer_bwd", &fastattn::lstm_layer_bwd_cuda);
  m.impl("lstm_ln_layer_fwd", &fastattn::lstm_ln_layer_fwd_cuda);
  m.impl("lstm_ln_layer_bwd", &fastattn::lstm_ln_layer_bwd_cuda);
}
