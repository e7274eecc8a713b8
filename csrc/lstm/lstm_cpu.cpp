// CPU implementations of the fastattn::lstm_* ops (schemas: fastattn/ops/_registry.py).
// Sequence ops: per time step one GEMM (h_prev @ W_hh^T added to the precomputed input
// projection) and one fused pointwise kernel; the backward runs the pointwise part per step and
// the weight-gradient GEMMs once for the whole sequence.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "fastattn/cpu_isa.h"
#include "fastattn/lstm_cpu.h"

namespace fastattn {

FASTATTN_ISA_DECLARE(void lstm_step_fwd_kernel(const LstmStepFwdArgs&))
FASTATTN_ISA_DECLARE(void lstm_step_bwd_kernel(const LstmStepBwdArgs&))

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

LstmDtype lstm_dtype(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return LstmDtype::Float32;
    case at::kDouble: return LstmDtype::Float64;
    case at::kBFloat16: return LstmDtype::BFloat16;
    case at::kHalf: return LstmDtype::Float16;
    default:
      TORCH_CHECK(false, op, ": expected float32, float64, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_like(const Tensor& t, const Tensor& like, at::IntArrayRef shape, const char* op,
                const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mut_ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// ---- cell pointwise ops ----------------------------------------------------------------------

std::tuple<Tensor, Tensor> lstm_cell_pointwise_fwd_cpu(const Tensor& gates_in, const Tensor& cx_in) {
  constexpr const char* op = "fastattn::lstm_cell_pointwise_fwd";
  TORCH_CHECK(gates_in.dim() == 2 && gates_in.size(1) % 4 == 0, op,
              ": gates must be [B, 4H], got ", gates_in.sizes());
  const int64_t B = gates_in.size(0), H = gates_in.size(1) / 4;
  check_like(gates_in, gates_in, {B, 4 * H}, op, "gates");
  check_like(cx_in, gates_in, {B, H}, op, "cx");
  const Tensor gates = gates_in.contiguous(), cx = cx_in.contiguous();
  Tensor hy = at::empty({B, H}, cx.options()), cy = at::empty({B, H}, cx.options());
  LstmStepFwdArgs a{lstm_dtype(gates, op), B, H, gates.data_ptr(), nullptr, cx.data_ptr(),
                    cy.data_ptr(), hy.data_ptr(), nullptr, nullptr, nullptr};
  if (B > 0 && H > 0) FASTATTN_ISA_CALL(lstm_step_fwd_kernel, a);
  return {hy, cy};
}

std::tuple<Tensor, Tensor> lstm_cell_pointwise_bwd_cpu(const Tensor& grad_hy_in,
                                                       const Tensor& grad_cy_in,
                                                       const Tensor& gates_in, const Tensor& cx_in,
                                                       const Tensor& cy_in) {
  constexpr const char* op = "fastattn::lstm_cell_pointwise_bwd";
  TORCH_CHECK(gates_in.dim() == 2 && gates_in.size(1) % 4 == 0, op,
              ": gates must be [B, 4H], got ", gates_in.sizes());
  const int64_t B = gates_in.size(0), H = gates_in.size(1) / 4;
  check_like(gates_in, gates_in, {B, 4 * H}, op, "gates");
  check_like(grad_hy_in, gates_in, {B, H}, op, "grad_hy");
  check_like(grad_cy_in, gates_in, {B, H}, op, "grad_cy");
  check_like(cx_in, gates_in, {B, H}, op, "cx");
  check_like(cy_in, gates_in, {B, H}, op, "cy");
  const Tensor grad_hy = grad_hy_in.contiguous(), grad_cy = grad_cy_in.contiguous();
  const Tensor gates = gates_in.contiguous(), cx = cx_in.contiguous(), cy = cy_in.contiguous();
  Tensor grad_gates = at::empty({B, 4 * H}, gates.options());
  Tensor grad_cx = at::empty({B, H}, gates.options());
  LstmStepBwdArgs a{};
  a.dtype = lstm_dtype(gates, op);
  a.rows = B;
  a.hidden = H;
  a.grad_h = grad_hy.data_ptr();
  a.grad_c = grad_cy.data_ptr();
  a.gates = gates.data_ptr();
  a.gates_preactivation = true;
  a.c_prev = cx.data_ptr();
  a.c_new = cy.data_ptr();
  a.grad_gates = grad_gates.data_ptr();
  a.grad_c_prev = grad_cx.data_ptr();
  if (B > 0 && H > 0) FASTATTN_ISA_CALL(lstm_step_bwd_kernel, a);
  return {grad_gates, grad_cx};
}

// ---- sequence ops ----------------------------------------------------------------------------

// Shapes and options of one layer-direction call, checked once.
struct LayerProblem {
  int64_t T, B, H, P;
  bool reverse;
  std::vector<int64_t> batch_sizes;  // rows that step at each time t (all B without packing)
  Tensor w_hh_t;                     // [P, 4H] view
  Tensor w_hr;                       // [P, H] or undefined
  Tensor zoneout_c, zoneout_h;       // contiguous [T, B, H] / [T, B, P] or undefined

  // Time index of the s-th step in processing order, and where that step's previous state is.
  int64_t time(int64_t s) const { return reverse ? T - 1 - s : s; }
  Tensor prev(const Tensor& all, const Tensor& first, int64_t s) const {
    if (s == 0) return first;
    return all[reverse ? time(s) + 1 : time(s) - 1];
  }
};

LayerProblem layer_problem(const char* op, const Tensor& x_proj, const Tensor& h0, const Tensor& c0,
                           const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
                           bool reverse, const OptTensor& zoneout_c, const OptTensor& zoneout_h) {
  TORCH_CHECK(x_proj.dim() == 3 && x_proj.size(2) % 4 == 0, op, ": x_proj must be [T, B, 4H], got ",
              x_proj.sizes());
  lstm_dtype(x_proj, op);
  LayerProblem p;
  p.T = x_proj.size(0);
  p.B = x_proj.size(1);
  p.H = x_proj.size(2) / 4;
  p.reverse = reverse;
  check_like(x_proj, x_proj, x_proj.sizes(), op, "x_proj");
  if (w_hr.has_value() && w_hr->defined()) {
    TORCH_CHECK(w_hr->dim() == 2, op, ": w_hr must be [P, H], got ", w_hr->sizes());
    p.P = w_hr->size(0);
    check_like(*w_hr, x_proj, {p.P, p.H}, op, "w_hr");
    p.w_hr = *w_hr;
  } else {
    p.P = p.H;
  }
  check_like(h0, x_proj, {p.B, p.P}, op, "h0");
  check_like(c0, x_proj, {p.B, p.H}, op, "c0");
  check_like(w_hh, x_proj, {4 * p.H, p.P}, op, "w_hh");
  p.w_hh_t = w_hh.t();
  if (zoneout_c.has_value() && zoneout_c->defined()) {
    check_like(*zoneout_c, x_proj, {p.T, p.B, p.H}, op, "zoneout_c");
    p.zoneout_c = zoneout_c->contiguous();
  }
  if (zoneout_h.has_value() && zoneout_h->defined()) {
    check_like(*zoneout_h, x_proj, {p.T, p.B, p.P}, op, "zoneout_h");
    p.zoneout_h = zoneout_h->contiguous();
  }
  p.batch_sizes.assign(p.T, p.B);
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1 &&
                    bs.size(0) == p.T,
                op, ": batch_sizes must be an int64 CPU tensor of shape [", p.T, "], got ",
                bs.scalar_type(), " ", bs.sizes(), " on ", bs.device());
    const Tensor bsc = bs.contiguous();
    const int64_t* v = bsc.data_ptr<int64_t>();
    for (int64_t t = 0; t < p.T; ++t) {
      TORCH_CHECK(v[t] >= 0 && v[t] <= p.B && (t == 0 || v[t] <= v[t - 1]), op,
                  ": batch_sizes must be non-increasing values in [0, ", p.B, "], got ", bs);
      p.batch_sizes[t] = v[t];
    }
  }
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_fwd_cpu(
    const Tensor& x_proj_in, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse, const OptTensor& zoneout_c,
    const OptTensor& zoneout_h) {
  constexpr const char* op = "fastattn::lstm_layer_fwd";
  const LayerProblem p = layer_problem(op, x_proj_in, h0_in, c0_in, w_hh, w_hr, batch_sizes,
                                       reverse, zoneout_c, zoneout_h);
  const Tensor x_proj = x_proj_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const auto opts = x_proj.options();
  Tensor h_all = at::empty({p.T, p.B, p.P}, opts);
  Tensor c_all = at::empty({p.T, p.B, p.H}, opts);
  Tensor gates_all = at::empty({p.T, p.B, 4 * p.H}, opts);
  const bool proj = p.w_hr.defined();
  Tensor hpre_all = proj ? at::empty({p.T, p.B, p.H}, opts) : at::empty({0}, opts);
  const Tensor w_hr_t = proj ? p.w_hr.t() : Tensor();
  const LstmDtype dtype = lstm_dtype(x_proj, op);

  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.time(s), n = p.batch_sizes[t];
    const Tensor h_prev = p.prev(h_all, h0, s), c_prev = p.prev(c_all, c0, s);
    if (n < p.B) {  // rows whose sequence is not running carry their state
      h_all[t].narrow(0, n, p.B - n).copy_(h_prev.narrow(0, n, p.B - n));
      c_all[t].narrow(0, n, p.B - n).copy_(c_prev.narrow(0, n, p.B - n));
      gates_all[t].narrow(0, n, p.B - n).zero_();
      if (proj) hpre_all[t].narrow(0, n, p.B - n).zero_();
    }
    if (n == 0 || p.H == 0) continue;
    Tensor gates = gates_all[t].narrow(0, 0, n);  // [n, 4H]
    at::addmm_out(gates, x_proj[t].narrow(0, 0, n), h_prev.narrow(0, 0, n), p.w_hh_t);
    const Tensor zc = p.zoneout_c.defined() ? p.zoneout_c[t] : Tensor();
    const Tensor zh = p.zoneout_h.defined() ? p.zoneout_h[t] : Tensor();
    LstmStepFwdArgs a{dtype, n, p.H, gates.data_ptr(), gates.data_ptr(), c_prev.data_ptr(),
                      c_all[t].data_ptr(), proj ? hpre_all[t].data_ptr() : h_all[t].data_ptr(),
                      ptr_or_null(zc), proj ? nullptr : ptr_or_null(zh), h_prev.data_ptr()};
    FASTATTN_ISA_CALL(lstm_step_fwd_kernel, a);
    if (proj) {
      Tensor h = h_all[t].narrow(0, 0, n);
      at::mm_out(h, hpre_all[t].narrow(0, 0, n), w_hr_t);
      if (zh.defined()) h.lerp_(h_prev.narrow(0, 0, n), zh.narrow(0, 0, n));
    }
  }
  return {h_all, c_all, gates_all, hpre_all};
}

std::tuple<Tensor, Tensor, Tensor> lstm_sequence_fwd_cpu(const Tensor& x_proj, const Tensor& h0,
                                                         const Tensor& c0, const Tensor& w_hh) {
  auto [h_all, c_all, gates_all, hpre_all] = lstm_layer_fwd_cpu(
      x_proj, h0, c0, w_hh, std::nullopt, std::nullopt, false, std::nullopt, std::nullopt);
  return {h_all, c_all, gates_all};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_bwd_cpu(
    const Tensor& grad_h_all_in, const Tensor& grad_c_all_in, const Tensor& h0_in,
    const Tensor& c0_in, const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse, const OptTensor& zoneout_c, const OptTensor& zoneout_h, const Tensor& h_all_in,
    const Tensor& c_all_in, const Tensor& gates_all_in, const Tensor& hpre_all_in) {
  constexpr const char* op = "fastattn::lstm_layer_bwd";
  const LayerProblem p = layer_problem(op, gates_all_in, h0_in, c0_in, w_hh, w_hr, batch_sizes,
                                       reverse, zoneout_c, zoneout_h);
  const bool proj = p.w_hr.defined();
  check_like(grad_h_all_in, gates_all_in, {p.T, p.B, p.P}, op, "grad_h_all");
  check_like(grad_c_all_in, gates_all_in, {p.T, p.B, p.H}, op, "grad_c_all");
  check_like(h_all_in, gates_all_in, {p.T, p.B, p.P}, op, "h_all");
  check_like(c_all_in, gates_all_in, {p.T, p.B, p.H}, op, "c_all");
  if (proj) check_like(hpre_all_in, gates_all_in, {p.T, p.B, p.H}, op, "hpre_all");
  const Tensor grad_h_all = grad_h_all_in.contiguous(), grad_c_all = grad_c_all_in.contiguous();
  const Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const Tensor h_all = h_all_in.contiguous(), c_all = c_all_in.contiguous();
  const Tensor gates_all = gates_all_in.contiguous();
  const Tensor hpre_all = proj ? hpre_all_in.contiguous() : Tensor();
  const auto opts = gates_all.options();
  const LstmDtype dtype = lstm_dtype(gates_all, op);

  Tensor grad_gates_all = at::empty({p.T, p.B, 4 * p.H}, opts);
  Tensor dh = at::zeros({p.B, p.P}, opts);  // gradient reaching the state h of the current time
  Tensor dc = at::zeros({p.B, p.H}, opts);
  Tensor grad_hproj_all = proj ? at::empty({p.T, p.B, p.P}, opts) : Tensor();  // of h_new @ W_hr^T
  Tensor grad_hpre = proj ? at::empty({p.B, p.H}, opts) : Tensor();
  const Tensor w_hr_mat = proj ? p.w_hr : Tensor();

  for (int64_t s = p.T - 1; s >= 0; --s) {
    const int64_t t = p.time(s), n = p.batch_sizes[t];
    const Tensor c_prev = p.prev(c_all, c0, s);
    if (n < p.B) {  // carried rows pass their gradient on unchanged
      dh.narrow(0, n, p.B - n).add_(grad_h_all[t].narrow(0, n, p.B - n));
      dc.narrow(0, n, p.B - n).add_(grad_c_all[t].narrow(0, n, p.B - n));
      grad_gates_all[t].narrow(0, n, p.B - n).zero_();
      if (proj) grad_hproj_all[t].narrow(0, n, p.B - n).zero_();
    }
    if (n == 0 || p.H == 0) continue;
    const Tensor zc = p.zoneout_c.defined() ? p.zoneout_c[t] : Tensor();
    const Tensor zh = p.zoneout_h.defined() ? p.zoneout_h[t] : Tensor();
    Tensor dh_n = dh.narrow(0, 0, n);
    Tensor grad_gates = grad_gates_all[t].narrow(0, 0, n);  // [n, 4H]
    LstmStepBwdArgs a{};
    a.dtype = dtype;
    a.rows = n;
    a.hidden = p.H;
    if (proj) {
      // h_t = z * h_prev + (1 - z) * (hpre @ W_hr^T): split dh_total between the two terms.
      Tensor grad_hproj = grad_hproj_all[t].narrow(0, 0, n);
      at::add_out(grad_hproj, dh_n, grad_h_all[t].narrow(0, 0, n));
      if (zh.defined()) {
        at::mul_out(dh_n, grad_hproj, zh.narrow(0, 0, n));
        grad_hproj.sub_(dh_n);
      }
      Tensor grad_hpre_n = grad_hpre.narrow(0, 0, n);
      at::mm_out(grad_hpre_n, grad_hproj, w_hr_mat);
      a.grad_h = grad_hpre.data_ptr();
    } else {
      a.grad_h = dh_n.data_ptr();
      a.grad_h_extra = grad_h_all[t].data_ptr();
      a.zoneout_h = ptr_or_null(zh);
      a.grad_h_prev = dh_n.data_ptr();
    }
    a.grad_c = dc.data_ptr();
    a.grad_c_extra = grad_c_all[t].data_ptr();
    a.gates = gates_all[t].data_ptr();
    a.gates_preactivation = false;
    a.c_prev = c_prev.data_ptr();
    a.c_new = zc.defined() ? nullptr : c_all[t].data_ptr();
    a.zoneout_c = ptr_or_null(zc);
    a.grad_gates = grad_gates.data_ptr();
    a.grad_c_prev = dc.data_ptr();
    FASTATTN_ISA_CALL(lstm_step_bwd_kernel, a);
    // dh_prev = (zoneout share of dh_total, already in dh_n) + grad_gates @ W_hh
    if (zh.defined()) {
      dh_n.addmm_(grad_gates, p.w_hh_t.t());
    } else {
      at::mm_out(dh_n, grad_gates, p.w_hh_t.t());
    }
  }

  // Weight gradients for the whole sequence: sum_t grad_gates[t]^T @ h_prev(t).
  const int64_t G = 4 * p.H;
  Tensor grad_w_hh;
  if (p.T == 0) {
    grad_w_hh = at::zeros({G, p.P}, opts);
  } else {
    const int64_t first = p.time(0);
    grad_w_hh = at::mm(grad_gates_all[first].t(), h0);
    if (p.T > 1) {
      const Tensor later = reverse ? grad_gates_all.narrow(0, 0, p.T - 1) : grad_gates_all.narrow(0, 1, p.T - 1);
      const Tensor prev = reverse ? h_all.narrow(0, 1, p.T - 1) : h_all.narrow(0, 0, p.T - 1);
      grad_w_hh.addmm_(later.reshape({-1, G}).t(), prev.reshape({-1, p.P}));
    }
  }
  Tensor grad_w_hr = proj ? at::mm(grad_hproj_all.reshape({-1, p.P}).t(), hpre_all.reshape({-1, p.H}))
                          : at::empty({0}, opts);
  return {grad_gates_all, dh, dc, grad_w_hh, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("lstm_cell_pointwise_fwd", &lstm_cell_pointwise_fwd_cpu);
  m.impl("lstm_cell_pointwise_bwd", &lstm_cell_pointwise_bwd_cpu);
  m.impl("lstm_sequence_fwd", &lstm_sequence_fwd_cpu);
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cpu);
}

}  // namespace fastattn
