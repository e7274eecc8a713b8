// CPU implementations of fastattn::lstm_ln_layer_fwd / _bwd, the LayerNorm-LSTM layer ops
// (schemas: fastattn/ops/_registry.py). Per time step: one GEMM (h_prev @ W_hh^T) and one fused
// row kernel (lstm_layer_norm_cpu.isa.cpp); backward: the fused row kernel and one GEMM for
// dh_prev per step, then the weight gradients as whole-sequence GEMMs and reductions.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "fastattn/cpu_isa.h"
#include "fastattn/lstm_layer_norm_cpu.h"
#include "lstm_layer_problem.h"

namespace fastattn {

FASTATTN_ISA_DECLARE(void lstm_ln_step_fwd_kernel(const LstmLnStepFwdArgs&))
FASTATTN_ISA_DECLARE(void lstm_ln_step_bwd_kernel(const LstmLnStepBwdArgs&))

namespace {

using namespace lstm_glue;

// The dtype of the kernels' math and of the opmath rows saved for the backward.
at::ScalarType opmath_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_opmath(const char* op, const Tensor& t, const Tensor& like, at::IntArrayRef shape,
                  const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == opmath_type(like) && t.sizes() == shape,
              op, ": ", name, " must be a CPU ", opmath_type(like), " tensor of shape ", shape,
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_ln_weights(const char* op, const LayerProblem& p, const Tensor& like,
                      const Tensor& ln_hh_weight, const Tensor& ln_c_weight,
                      const Tensor& ln_c_bias) {
  check_like(ln_hh_weight, like, {4 * p.H}, op, "ln_hh_weight");
  check_like(ln_c_weight, like, {p.H}, op, "ln_c_weight");
  check_like(ln_c_bias, like, {p.H}, op, "ln_c_bias");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_ln_layer_fwd_cpu(
    const Tensor& x_proj_in, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_hh,
    const Tensor& ln_hh_weight_in, const Tensor& ln_c_weight_in, const Tensor& ln_c_bias_in,
    double eps, const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse,
    const OptTensor& zoneout_c, const OptTensor& zoneout_h) {
  constexpr const char* op = "fastattn::lstm_ln_layer_fwd";
  const LayerProblem p = layer_problem(op, x_proj_in, h0_in, c0_in, w_hh, w_hr, batch_sizes,
                                       reverse, zoneout_c, zoneout_h);
  check_ln_weights(op, p, x_proj_in, ln_hh_weight_in, ln_c_weight_in, ln_c_bias_in);
  const Tensor x_proj = x_proj_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const Tensor ln_hh_weight = ln_hh_weight_in.contiguous();
  const Tensor ln_c_weight = ln_c_weight_in.contiguous(), ln_c_bias = ln_c_bias_in.contiguous();
  const auto opts = x_proj.options();
  const int64_t T = p.T, B = p.B, H = p.H, P = p.P;
  Tensor h_all = at::empty({T, B, P}, opts);
  Tensor c_all = at::empty({T, B, H}, opts);
  const auto opmath_opts = opts.dtype(opmath_type(x_proj));
  Tensor gates_all = at::empty({T, B, 4 * H}, opmath_opts);
  const bool proj = p.w_hr.defined();
  Tensor hpre_all = proj ? at::empty({T, B, H}, opts) : at::empty({0}, opts);
  Tensor hh_norm_all = at::empty({T, B, 4 * H}, opmath_opts);
  Tensor hh_buf = at::empty({B, 4 * H}, opts);  // h_prev @ W_hh^T of the current step
  Tensor c_norm_all = at::empty({T, B, H}, opmath_opts);
  // An LN over no elements (H == 0) has no statistics and no step writes them: saved as zeros,
  // as for rows that do not step (nothing reads them; torch's native_layer_norm says NaN).
  Tensor rstd_all = H == 0 ? at::zeros({T, B, 2}, opmath_opts) : at::empty({T, B, 2}, opmath_opts);
  const Tensor w_hh_t = w_hh.t(), w_hr_t = proj ? p.w_hr.t() : Tensor();
  const Dtype dtype = lstm_dtype(x_proj, op);

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.time(s), n = p.batch_sizes[t];
    const Tensor h_prev = p.prev(h_all, h0, s), c_prev = p.prev(c_all, c0, s);
    if (n < B) {  // rows whose sequence is not running carry their state
      h_all[t].narrow(0, n, B - n).copy_(h_prev.narrow(0, n, B - n));
      c_all[t].narrow(0, n, B - n).copy_(c_prev.narrow(0, n, B - n));
      for (const Tensor& saved : {gates_all, hh_norm_all, c_norm_all, rstd_all}) {
        saved[t].narrow(0, n, B - n).zero_();
      }
      if (proj) hpre_all[t].narrow(0, n, B - n).zero_();
    }
    if (n == 0 || H == 0) continue;
    Tensor hh = hh_buf.narrow(0, 0, n);
    at::mm_out(hh, h_prev.narrow(0, 0, n), w_hh_t);
    const Tensor zc = p.zoneout_c.defined() ? p.zoneout_c[t] : Tensor();
    const Tensor zh = p.zoneout_h.defined() ? p.zoneout_h[t] : Tensor();
    LstmLnStepFwdArgs a{};
    a.dtype = dtype;
    a.rows = n;
    a.hidden = H;
    a.eps = eps;
    a.x_proj = x_proj[t].data_ptr();
    a.hh = hh.data_ptr();
    a.hh_norm = hh_norm_all[t].data_ptr();
    a.ln_hh_weight = ln_hh_weight.data_ptr();
    a.ln_c_weight = ln_c_weight.data_ptr();
    a.ln_c_bias = ln_c_bias.data_ptr();
    a.c_prev = c_prev.data_ptr();
    a.zoneout_c = ptr_or_null(zc);
    a.zoneout_h = proj ? nullptr : ptr_or_null(zh);  // with w_hr, lerped after the projection
    a.h_prev = h_prev.data_ptr();
    a.gates_act = gates_all[t].data_ptr();
    a.c_norm = c_norm_all[t].data_ptr();
    a.rstd = rstd_all[t].data_ptr();
    a.c_out = c_all[t].data_ptr();
    a.h_out = proj ? hpre_all[t].data_ptr() : h_all[t].data_ptr();
    FASTATTN_ISA_CALL(lstm_ln_step_fwd_kernel, a);
    if (proj) {
      Tensor h = h_all[t].narrow(0, 0, n);
      at::mm_out(h, hpre_all[t].narrow(0, 0, n), w_hr_t);
      if (zh.defined()) h.lerp_(h_prev.narrow(0, 0, n), zh.narrow(0, 0, n));
    }
  }
  return {h_all, c_all, gates_all, hpre_all, hh_norm_all, c_norm_all, rstd_all};
}

// sum over time and batch of a * b, in opmath: [T, B, W] x2 -> [W] in a's dtype.
Tensor sum_of_products(const Tensor& a, const Tensor& b) {
  const at::ScalarType op = opmath_type(a);
  return at::mul(a.to(op), b.to(op)).sum({0, 1}).to(a.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_ln_layer_bwd_cpu(
    const Tensor& grad_h_all_in, const Tensor& grad_c_all_in, const Tensor& h0_in,
    const Tensor& c0_in, const Tensor& w_hh, const Tensor& ln_hh_weight_in,
    const Tensor& ln_c_weight_in, const Tensor& ln_c_bias_in, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse, const OptTensor& zoneout_c,
    const OptTensor& zoneout_h, const Tensor& h_all_in, const Tensor& c_all_in,
    const Tensor& gates_all_in, const Tensor& hpre_all_in, const Tensor& hh_norm_all_in,
    const Tensor& c_norm_all_in, const Tensor& rstd_all_in) {
  constexpr const char* op = "fastattn::lstm_ln_layer_bwd";
  TORCH_CHECK(hh_norm_all_in.dim() == 3 && hh_norm_all_in.size(2) % 4 == 0, op,
              ": hh_norm_all must be [T, B, 4H], got ", hh_norm_all_in.sizes());
  const Tensor& like = h0_in;  // of the data dtype (hh_norm_all is opmath)
  const Dtype dtype = lstm_dtype(like, op);
  const LayerProblem p = layer_problem(op, like, hh_norm_all_in.size(0), hh_norm_all_in.size(1),
                                       hh_norm_all_in.size(2) / 4, h0_in, c0_in, w_hh, w_hr,
                                       batch_sizes, reverse, zoneout_c, zoneout_h);
  check_ln_weights(op, p, like, ln_hh_weight_in, ln_c_weight_in, ln_c_bias_in);
  const int64_t T = p.T, B = p.B, H = p.H, P = p.P, G = 4 * H;
  const bool proj = p.w_hr.defined();
  check_like(grad_h_all_in, like, {T, B, P}, op, "grad_h_all");
  check_like(grad_c_all_in, like, {T, B, H}, op, "grad_c_all");
  check_like(h_all_in, like, {T, B, P}, op, "h_all");
  check_like(c_all_in, like, {T, B, H}, op, "c_all");
  if (proj) check_like(hpre_all_in, like, {T, B, H}, op, "hpre_all");
  check_opmath(op, gates_all_in, like, {T, B, G}, "gates_all");
  check_opmath(op, hh_norm_all_in, like, {T, B, G}, "hh_norm_all");
  check_opmath(op, c_norm_all_in, like, {T, B, H}, "c_norm_all");
  check_opmath(op, rstd_all_in, like, {T, B, 2}, "rstd_all");
  const Tensor grad_h_all = grad_h_all_in.contiguous(), grad_c_all = grad_c_all_in.contiguous();
  const Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const Tensor h_all = h_all_in.contiguous(), c_all = c_all_in.contiguous();
  const Tensor gates_all = gates_all_in.contiguous();
  const Tensor hpre_all = proj ? hpre_all_in.contiguous() : Tensor();
  const Tensor hh_norm_all = hh_norm_all_in.contiguous(), c_norm_all = c_norm_all_in.contiguous();
  const Tensor rstd_all = rstd_all_in.contiguous();
  const Tensor ln_hh_weight = ln_hh_weight_in.contiguous();
  const Tensor ln_c_weight = ln_c_weight_in.contiguous(), ln_c_bias = ln_c_bias_in.contiguous();
  const auto opts = like.options();

  // What the recurrence carries from step to step is opmath (lstm_layer_norm_cpu.h), and so are
  // the weights of its GEMMs.
  const auto opmath_opts = opts.dtype(opmath_type(like));
  const Tensor w_hh_op = w_hh.to(opmath_opts.dtype());
  const Tensor w_hr_op = proj ? p.w_hr.to(opmath_opts.dtype()) : Tensor();
  Tensor grad_x_proj = at::empty({T, B, G}, opts);
  Tensor grad_hh_all = at::empty({T, B, G}, opmath_opts);     // of h_prev @ W_hh^T, per step
  Tensor grad_c_new_all = at::empty({T, B, H}, opmath_opts);  // of the cell LN's output
  Tensor dh = at::zeros({B, P}, opmath_opts);  // gradient reaching the state h of the current time
  Tensor dc = at::zeros({B, H}, opmath_opts);
  Tensor grad_hproj_all = proj ? at::empty({T, B, P}, opmath_opts) : Tensor();  // of hpre @ W_hr^T
  Tensor grad_hpre = proj ? at::empty({B, H}, opmath_opts) : Tensor();

  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = p.time(s), n = p.batch_sizes[t];
    const Tensor c_prev = p.prev(c_all, c0, s);
    if (n < B) {  // carried rows pass their gradient on unchanged
      dh.narrow(0, n, B - n).add_(grad_h_all[t].narrow(0, n, B - n));
      dc.narrow(0, n, B - n).add_(grad_c_all[t].narrow(0, n, B - n));
      for (const Tensor& grad : {grad_x_proj, grad_hh_all, grad_c_new_all}) {
        grad[t].narrow(0, n, B - n).zero_();
      }
      if (proj) grad_hproj_all[t].narrow(0, n, B - n).zero_();
    }
    if (n == 0 || H == 0) continue;
    const Tensor zc = p.zoneout_c.defined() ? p.zoneout_c[t] : Tensor();
    const Tensor zh = p.zoneout_h.defined() ? p.zoneout_h[t] : Tensor();
    Tensor dh_n = dh.narrow(0, 0, n);
    Tensor grad_hh = grad_hh_all[t].narrow(0, 0, n);  // [n, 4H]
    LstmLnStepBwdArgs a{};
    a.dtype = dtype;
    a.rows = n;
    a.hidden = H;
    if (proj) {
      // h_t = z * h_prev + (1 - z) * (hpre @ W_hr^T): split dh_total between the two terms.
      Tensor grad_hproj = grad_hproj_all[t].narrow(0, 0, n);
      at::add_out(grad_hproj, dh_n, grad_h_all[t].narrow(0, 0, n));
      if (zh.defined()) {
        at::mul_out(dh_n, grad_hproj, zh.narrow(0, 0, n));
        grad_hproj.sub_(dh_n);
      }
      Tensor grad_hpre_n = grad_hpre.narrow(0, 0, n);
      at::mm_out(grad_hpre_n, grad_hproj, w_hr_op);
      a.grad_h = grad_hpre.data_ptr();
    } else {
      a.grad_h = dh_n.data_ptr();
      a.grad_h_extra = grad_h_all[t].data_ptr();
      a.zoneout_h = ptr_or_null(zh);
      a.grad_h_prev = dh_n.data_ptr();
    }
    a.grad_c = dc.data_ptr();
    a.grad_c_extra = grad_c_all[t].data_ptr();
    a.ln_hh_weight = ln_hh_weight.data_ptr();
    a.ln_c_weight = ln_c_weight.data_ptr();
    a.ln_c_bias = ln_c_bias.data_ptr();
    a.gates_act = gates_all[t].data_ptr();
    a.hh_norm = hh_norm_all[t].data_ptr();
    a.c_norm = c_norm_all[t].data_ptr();
    a.rstd = rstd_all[t].data_ptr();
    a.c_prev = c_prev.data_ptr();
    a.zoneout_c = ptr_or_null(zc);
    a.grad_gates = grad_x_proj[t].data_ptr();
    a.grad_hh = grad_hh.data_ptr();
    a.grad_c_new = grad_c_new_all[t].data_ptr();
    a.grad_c_prev = dc.data_ptr();
    FASTATTN_ISA_CALL(lstm_ln_step_bwd_kernel, a);
    // dh_prev = (zoneout share of dh_total, already in dh_n) + grad_hh @ W_hh
    if (zh.defined()) {
      dh_n.addmm_(grad_hh, w_hh_op);
    } else {
      at::mm_out(dh_n, grad_hh, w_hh_op);
    }
  }

  // Weight gradients for the whole sequence: grad_w_hh = sum_t grad_hh[t]^T @ h_prev(t), in
  // opmath, rounded once.
  const auto dtype_of = opts.dtype();
  Tensor grad_w_hh;
  if (T == 0) {
    grad_w_hh = at::zeros({G, P}, opts);
  } else {
    Tensor sum = at::mm(grad_hh_all[p.time(0)].t(), h0.to(opmath_opts.dtype()));
    if (T > 1) {
      const Tensor later = reverse ? grad_hh_all.narrow(0, 0, T - 1) : grad_hh_all.narrow(0, 1, T - 1);
      const Tensor prev = reverse ? h_all.narrow(0, 1, T - 1) : h_all.narrow(0, 0, T - 1);
      // Explicit row counts: -1 cannot be inferred from zero-size rows (H == 0 or P == 0).
      const int64_t rows = (T - 1) * B;
      sum.addmm_(later.reshape({rows, G}).t(), prev.reshape({rows, P}).to(opmath_opts.dtype()));
    }
    grad_w_hh = sum.to(dtype_of);
  }
  Tensor grad_ln_hh_weight = sum_of_products(grad_x_proj, hh_norm_all);
  Tensor grad_ln_c_weight = sum_of_products(grad_c_new_all, c_norm_all).to(dtype_of);
  Tensor grad_ln_c_bias = grad_c_new_all.sum({0, 1}).to(dtype_of);
  Tensor grad_w_hr =
      proj ? at::mm(grad_hproj_all.reshape({T * B, P}).t(),
                    hpre_all.reshape({T * B, H}).to(opmath_opts.dtype())).to(dtype_of)
           : at::empty({0}, opts);
  return {grad_x_proj, dh.to(dtype_of), dc.to(dtype_of), grad_w_hh, grad_ln_hh_weight,
          grad_ln_c_weight, grad_ln_c_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("lstm_ln_layer_fwd", &lstm_ln_layer_fwd_cpu);
  m.impl("lstm_ln_layer_bwd", &lstm_ln_layer_bwd_cpu);
}

}  // namespace fastattn
