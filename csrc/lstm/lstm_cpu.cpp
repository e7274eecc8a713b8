// CPU implementations of the fastattn::lstm_* ops (schemas: fastattn/ops/_registry.py): input
// checks, outputs, and the whole-sequence weight-gradient GEMMs. The recurrence itself, GEMMs and
// gate math fused per step, is one kernel call (csrc/lstm/lstm_cpu.isa.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <new>
#include <optional>
#include <tuple>
#include <vector>

#include "fastattn/cpu_gemm.h"
#include "fastattn/cpu_isa.h"
#include "fastattn/cpu_transpose_copy.h"
#include "fastattn/lstm_cell_cpu.h"
#include "fastattn/lstm_cpu.h"
#include "lstm_layer_problem.h"

namespace fastattn {

// Below which batch the kernels put their lanes along the units (else along the batch), whether
// bf16 layers without a projection put them along the units at every batch (their recurrent
// product on oneDNN's brgemm), and whether a one-step call of this batch (one that the unit lanes
// would take) computes its recurrent product here, before the kernel (lstm_cpu.isa.cpp); below
// which batch lstm_step_gates runs its GEMV-style kernel (lstm_step_gates_cpu.isa.cpp).
FASTATTN_ISA_DECLARE(int64_t lstm_unit_lanes_below())
FASTATTN_ISA_DECLARE(bool lstm_bf16_rows_on_brgemm())
FASTATTN_ISA_DECLARE(bool lstm_layer_step_on_gemm(int64_t batch))
FASTATTN_ISA_DECLARE(int64_t lstm_step_gates_below())
FASTATTN_ISA_DECLARE(void lstm_step_gates_kernel(const LstmStepGatesArgs&))
FASTATTN_ISA_DECLARE(void lstm_layer_fwd_kernel(const LstmLayerFwdArgs&))
FASTATTN_ISA_DECLARE(void lstm_layer_bwd_kernel(const LstmLayerBwdArgs&))
FASTATTN_ISA_DECLARE(void lstm_cell_pointwise_fwd_kernel(const LstmCellPointwiseArgs&))
FASTATTN_ISA_DECLARE(void lstm_cell_pointwise_bwd_kernel(const LstmCellPointwiseArgs&))

namespace {

using namespace lstm_glue;

// A [T, B, F] tensor (or a [B, F] state, as T = 1) for the kernels; undefined -> absent.
LstmSeqView seq_view(const Tensor& t) {
  LstmSeqView v;
  if (!t.defined()) return v;
  v.data = t.data_ptr();
  const bool state = t.dim() == 2;
  v.st = state ? 0 : t.stride(0);
  v.sb = t.stride(state ? 0 : 1);
  v.sf = t.stride(state ? 1 : 2);
  return v;
}

// The kernels' math type: float for float32/bfloat16/float16, double for float64.
at::ScalarType math_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A weight for the kernels: contiguous, in the math type.
Tensor kernel_weight(const Tensor& w) { return w.to(math_type(w)).contiguous(); }

// Whether a layer's recurrent products run on brgemm in bf16 (LstmLayerShape::bf16_products),
// and its w_hh for the kernels then: bf16 as given (contiguous), else in the math type.
bool bf16_products(Dtype dtype, const Tensor& w_hh, const Tensor& w_hr) {
  return dtype == Dtype::BFloat16 && w_hh.defined() && !w_hr.defined() &&
         FASTATTN_ISA_CALL(lstm_bf16_rows_on_brgemm);
}
Tensor recurrent_weight(const Tensor& w_hh, bool bf16_products) {
  return bf16_products ? w_hh.contiguous() : kernel_weight(w_hh);
}

// out [M, N] = w @ x (+ bias[:, None]) on at::mm, for the dtypes and CPUs that cpu_gemm::mm_out
// leaves out.
void torch_mm_out(Tensor out, const Tensor& w, const Tensor& x, const Tensor& bias) {
  if (bias.defined()) {
    at::addmm_out(out, bias.unsqueeze(1), w, x);
  } else {
    at::mm_out(out, w, x);
  }
}

// numel elements of dtype for the inference op's x_proj chunks, in a block that the calling
// thread keeps across calls (up to kKeptChunkBytes; the tensor must not outlive the call).
// Allocated and freed on every call, the buffer lay at the top of glibc's heap, whose trim then
// gave it back to the system together with the pages of the op's freed outputs: each call
// faulted them all in anew (T32 B64 H256 on the Xeon with AMX: ~3000 page faults a call, 0 with
// the block kept; 7.7 -> 7.4 ms).
constexpr int64_t kKeptChunkBytes = int64_t{16} << 20;
Tensor chunk_buffer(int64_t numel, const at::TensorOptions& opts) {
  const int64_t bytes = numel * static_cast<int64_t>(opts.dtype().itemsize());
  if (bytes > kKeptChunkBytes) return at::empty({numel}, opts);
  struct FreeAligned {
    void operator()(char* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  thread_local std::unique_ptr<char[], FreeAligned> block;
  thread_local int64_t block_bytes = 0;
  if (block_bytes < bytes) {
    block.reset(static_cast<char*>(::operator new[](bytes, std::align_val_t{64})));
    block_bytes = bytes;
  }
  return at::from_blob(block.get(), {numel}, opts);
}

// ---- cell pointwise ops ----------------------------------------------------------------------

std::tuple<Tensor, Tensor> lstm_cell_pointwise_fwd_cpu(const Tensor& gates_in, const Tensor& cx) {
  constexpr const char* op = "fastattn::lstm_cell_pointwise_fwd";
  TORCH_CHECK(gates_in.dim() == 2 && gates_in.size(1) % 4 == 0, op,
              ": gates must be [B, 4H], got ", gates_in.sizes());
  const int64_t B = gates_in.size(0), H = gates_in.size(1) / 4;
  check_like(gates_in, gates_in, {B, 4 * H}, op, "gates");
  check_like(cx, gates_in, {B, H}, op, "cx");
  const Tensor gates = gates_in.contiguous(), c_prev = cx.contiguous();
  Tensor hy = at::empty({B, H}, cx.options()), cy = at::empty({B, H}, cx.options());
  LstmCellPointwiseArgs a{};
  a.dtype = lstm_dtype(gates, op);
  a.B = B;
  a.H = H;
  a.gates = gates.data_ptr();
  a.cx = c_prev.data_ptr();
  a.hy = hy.data_ptr();
  a.cy = cy.data_ptr();
  FASTATTN_ISA_CALL(lstm_cell_pointwise_fwd_kernel, a);
  return {hy, cy};
}

std::tuple<Tensor, Tensor> lstm_cell_pointwise_bwd_cpu(const Tensor& grad_hy, const Tensor& grad_cy,
                                                       const Tensor& gates_in, const Tensor& cx,
                                                       const Tensor& cy) {
  constexpr const char* op = "fastattn::lstm_cell_pointwise_bwd";
  TORCH_CHECK(gates_in.dim() == 2 && gates_in.size(1) % 4 == 0, op,
              ": gates must be [B, 4H], got ", gates_in.sizes());
  const int64_t B = gates_in.size(0), H = gates_in.size(1) / 4;
  check_like(gates_in, gates_in, {B, 4 * H}, op, "gates");
  check_like(grad_hy, gates_in, {B, H}, op, "grad_hy");
  check_like(grad_cy, gates_in, {B, H}, op, "grad_cy");
  check_like(cx, gates_in, {B, H}, op, "cx");
  check_like(cy, gates_in, {B, H}, op, "cy");
  // The kernel recomputes the activations and c from the pre-activation gates (cy is unused).
  const Tensor gates = gates_in.contiguous(), c_prev = cx.contiguous();
  const Tensor gh = grad_hy.contiguous(), gc = grad_cy.contiguous();
  Tensor grad_gates = at::empty({B, 4 * H}, gates.options());
  Tensor grad_cx = at::empty({B, H}, gates.options());
  LstmCellPointwiseArgs a{};
  a.dtype = lstm_dtype(gates, op);
  a.B = B;
  a.H = H;
  a.gates = gates.data_ptr();
  a.cx = c_prev.data_ptr();
  a.grad_hy = gh.data_ptr();
  a.grad_cy = gc.data_ptr();
  a.grad_gates = grad_gates.data_ptr();
  a.grad_cx = grad_cx.data_ptr();
  FASTATTN_ISA_CALL(lstm_cell_pointwise_bwd_kernel, a);
  return {grad_gates, grad_cx};
}

// ---- sequence ops ----------------------------------------------------------------------------

// Whether a [T, B, 4H] tensor is step-major ([T, 4H, B] in memory) rather than row-major: its
// batch stride is 1. The op fakes (fastattn/ops/lstm.py, _step_major) decide alike.
bool step_major(const Tensor& t) { return t.stride(1) == 1; }

// The forward kernel over steps [t0, t0 + n) of the outputs: x_proj holds those n steps, the
// state before them is (h_start, c_start), and gates_all / hpre_all (whole-sequence, or
// undefined) receive what the backward reads. bf16: w_hh_k is recurrent_weight(w_hh, true).
void run_layer_fwd(const LayerProblem& p, Dtype dtype, bool bf16, const Tensor& w_hh_k,
                   const Tensor& w_hr_k, const Tensor& x_proj, const Tensor& h_start,
                   const Tensor& c_start, int64_t t0, int64_t n, const Tensor& h_all,
                   const Tensor& c_all, const Tensor& gates_all, const Tensor& hpre_all) {
  auto steps = [&](const Tensor& all) { return all.defined() ? all.narrow(0, t0, n) : Tensor(); };
  LstmLayerFwdArgs a{};
  a.shape = {dtype, n, p.B, p.H, p.P, p.reverse, p.batch_sizes.data() + t0, bf16};
  a.w_hh = ptr_or_null(w_hh_k);
  a.w_hr = ptr_or_null(w_hr_k);
  a.x_proj = seq_view(x_proj);
  a.h0 = seq_view(h_start);
  a.c0 = seq_view(c_start);
  a.zoneout_c = seq_view(steps(p.zoneout_c));
  a.zoneout_h = seq_view(steps(p.zoneout_h));
  a.h_all = seq_view(steps(h_all));
  a.c_all = seq_view(steps(c_all));
  a.gates_all = seq_view(steps(gates_all));
  a.hpre_all = seq_view(steps(hpre_all));
  FASTATTN_ISA_CALL(lstm_layer_fwd_kernel, a);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_fwd_cpu(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse, const OptTensor& zoneout_c,
    const OptTensor& zoneout_h) {
  constexpr const char* op = "fastattn::lstm_layer_fwd";
  const LayerProblem p = layer_problem(op, x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse,
                                       zoneout_c, zoneout_h);
  const auto opts = x_proj.options();
  const bool proj = p.w_hr.defined();
  Tensor h_all = at::empty({p.T, p.B, p.P}, opts);
  Tensor c_all = at::empty({p.T, p.B, p.H}, opts);
  // gates_all is in the math type (csrc/include/fastattn/lstm_cpu.h says why) and in the layout
  // of x_proj, which the caller picks for the kernel's lanes (fastattn/ops/lstm.py): step-major
  // ([T, 4H, B] in memory) where x_proj's batch stride is 1, else row-major. A rule on x_proj's
  // strides, not on B, so that the op fakes, which follow it, need no guard on a symbolic batch.
  const auto gates_opts = opts.dtype(math_type(x_proj));
  Tensor gates_all = step_major(x_proj)
                         ? at::empty({p.T, 4 * p.H, p.B}, gates_opts).permute({0, 2, 1})
                         : at::empty({p.T, p.B, 4 * p.H}, gates_opts);
  Tensor hpre_all = proj ? at::empty({p.T, p.B, p.H}, opts) : at::empty({0}, opts);
  const Dtype dtype = lstm_dtype(x_proj, op);
  const bool bf16 = bf16_products(dtype, w_hh, p.w_hr);
  run_layer_fwd(p, dtype, bf16, recurrent_weight(w_hh, bf16),
                proj ? kernel_weight(p.w_hr) : Tensor(), x_proj, h0, c0, 0, p.T, h_all, c_all,
                gates_all, proj ? hpre_all : Tensor());
  return {h_all, c_all, gates_all, hpre_all};
}

// rows = (bias +) x @ w_ih^T + h0 @ w_hh^T, the gate pre-activations of one step: by the
// GEMV-style kernel (lstm_step_gates_cpu.isa.cpp) for the batches that it serves at this ISA
// (lstm_step_gates_below: float32, unit column strides, FASTATTN_LSTM_GEMM not torch), else by
// two GEMMs.
void step_gates(Tensor& rows, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                const Tensor& w_hh, const Tensor& bias) {
  const bool f32 = rows.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat;
  const auto unit_cols = [](const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; };
  if (rows.size(0) >= FASTATTN_ISA_CALL(lstm_step_gates_below) || !f32 ||
      cpu_gemm::torch_mm_forced() ||
      !unit_cols(rows) || !unit_cols(x) || !unit_cols(h0) || !unit_cols(w_ih) ||
      !unit_cols(w_hh) || (bias.defined() && !bias.is_contiguous())) {
    cpu_gemm::linear_out(rows, x, w_ih, bias);
    rows.addmm_(h0, w_hh.t());
    return;
  }
  LstmStepGatesArgs a{};
  a.B = rows.size(0);
  a.G = rows.size(1);
  a.I = x.size(1);
  a.P = h0.size(1);
  a.x = x.const_data_ptr<float>();
  a.ldx = x.stride(0);
  a.h = h0.const_data_ptr<float>();
  a.ldh = h0.stride(0);
  a.w_ih = w_ih.const_data_ptr<float>();
  a.ld_ih = w_ih.stride(0);
  a.w_hh = w_hh.const_data_ptr<float>();
  a.ld_hh = w_hh.stride(0);
  a.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  a.gates = rows.mutable_data_ptr<float>();
  a.ld_gates = rows.stride(0);
  FASTATTN_ISA_CALL(lstm_step_gates_kernel, a);
}

// gates [B, 4H] = input @ w_ih^T + hx @ w_hh^T (+ bias), before the activations: the products of
// one training cell step (fastattn.ops.lstm's cell with grad; autograd's four products are its
// backward), by step_gates: its kernel ran a B1 H256 step 1.65x faster than the two GEMMs with
// the weights in L2, and about even when a training step's backward had pushed them out to L3.
Tensor lstm_step_gates_cpu(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                           const Tensor& w_hh, const OptTensor& bias) {
  constexpr const char* op = "fastattn::lstm_step_gates";
  lstm_dtype(input, op);
  TORCH_CHECK(input.dim() == 2, op, ": input must be [B, I], got ", input.sizes());
  const int64_t B = input.size(0), I = input.size(1);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0, op, ": w_ih must be [4H, ", I, "], got ",
              w_ih.sizes());
  const int64_t G = w_ih.size(0);
  check_like(w_ih, input, {G, I}, op, "w_ih");
  check_like(hx, input, {B, G / 4}, op, "hx");
  check_like(w_hh, input, {G, G / 4}, op, "w_hh");
  if (given(bias)) check_like(*bias, input, {G}, op, "bias");
  Tensor gates = at::empty({B, G}, input.options());
  step_gates(gates, input, hx, w_ih, w_hh, given(bias) ? *bias : Tensor());
  return gates;
}

// Inference: the input projection runs a chunk of steps at a time into one reused buffer, which
// the kernel reads while it is still in cache, and no gates are saved. A whole-sequence x_proj
// (or gates_all) is a fresh allocation of T * B * 4H elements whose pages the allocator maps anew
// on every call: first touching them cost about a third of the x_proj GEMM's time on a 2-core
// EPYC, and was the larger part of the gap to torch at T = 128, B = 64.
std::tuple<Tensor, Tensor> lstm_layer_infer_cpu(
    const Tensor& input, const Tensor& w_ih, const OptTensor& bias, const Tensor& h0,
    const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse, const OptTensor& zoneout_c, const OptTensor& zoneout_h) {
  constexpr const char* op = "fastattn::lstm_layer_infer";
  TORCH_CHECK(input.dim() == 3, op, ": input must be [T, B, I], got ", input.sizes());
  const Dtype dtype = lstm_dtype(input, op);
  check_like(input, input, input.sizes(), op, "input");
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0, op, ": w_ih must be [4H, ", I, "], got ",
              w_ih.sizes());
  const int64_t H = w_ih.size(0) / 4;
  check_like(w_ih, input, {4 * H, I}, op, "w_ih");
  if (given(bias)) check_like(*bias, input, {4 * H}, op, "bias");
  const LayerProblem p = layer_problem(op, input, T, B, H, h0, c0, w_hh, w_hr, batch_sizes,
                                       reverse, zoneout_c, zoneout_h);
  Tensor h_all = at::empty({T, B, p.P}, input.options());
  Tensor c_all = at::empty({T, B, H}, input.options());
  if (T == 0 || B == 0) return {h_all, c_all};
  // One step of a batch below two vectors (a cell, a sampling loop's step): the recurrent
  // product h0 @ w_hh^T goes into x_proj with the input's (step_gates, or one more GEMM), and
  // the kernel runs the cell alone (no w_hh). Its unit lanes would pack w_hh for this one step:
  // T1 B1 H256 took 111 us through the unit-lane kernel, 76 us on two GEMMs (torch's
  // lstm_cell: 75), 43 us on step_gates (1 thread, Zen 4); B16 H256 138 us, 125 and 84 (Xeon
  // with AMX, 2 threads; lstm_cpu.isa.cpp's lstm_layer_step_on_gemm).
  // A bf16 step where bf16 runs on AMX (the unit-lane brgemm products' CPUs) goes to two GEMMs
  // as well, whatever its batch, with the weights as their left operands: gates^T [4H, B] =
  // w_ih x^T + w_hh h0^T (+ bias). oneDNN's AMX matmul packs its right operand into VNNI pairs on
  // every call, so x and h0 cost it little where w_ih and w_hh as right operands (torch's
  // lstm_cell; ours with the unit-lane product's own pack of w_hh) cost a pass over each weight:
  // B64 H1024 two GEMMs 0.57 ms against 0.94 (Xeon with AMX, 2 threads).
  const bool step_on_weight_gemms = T == 1 && dtype == Dtype::BFloat16 &&
                                    FASTATTN_ISA_CALL(lstm_bf16_rows_on_brgemm);
  const bool step_on_gemm = step_on_weight_gemms ||
                            (T == 1 && FASTATTN_ISA_CALL(lstm_layer_step_on_gemm, B));
  const bool bf16 = !step_on_gemm && bf16_products(dtype, w_hh, p.w_hr);
  const Tensor w_hh_k = step_on_gemm ? Tensor() : recurrent_weight(w_hh, bf16);
  const Tensor w_hr_k = p.w_hr.defined() ? kernel_weight(p.w_hr) : Tensor();

  // About 4 MiB of x_proj per chunk (L2/L3-sized), but at least 256 GEMM columns. bf16 on AMX
  // takes at least 2048 rows a chunk, as many as the kept buffer holds: oneDNN's AMX matmul packs
  // its right operand, w_ih, into VNNI pairs on every call, and with 4 MiB chunks the packs of
  // the 8 MB w_ih cost 10-15% of the op (bf16 T16 B128 H1024 21.2 -> 18.0 ms, T64 B32 H1024
  // 22.5 -> 19.8: one 16 MiB chunk instead of four of 4 MiB, Xeon with AMX, min of 10
  // alternating runs; T32 B64 H512 5.7 -> 5.3).
  const int64_t step_bytes = 4 * H * B * input.element_size();
  const int64_t min_steps = bf16 ? std::min((2048 + B - 1) / B,
                                            std::max<int64_t>(1, kKeptChunkBytes / step_bytes))
                                 : (256 + B - 1) / B;
  const int64_t chunk = std::min(
      T, std::max({int64_t(1), (int64_t(4) << 20) / step_bytes, min_steps}));
  const Tensor buffer = chunk_buffer(4 * H * chunk * B, input.options());
  const Tensor b = given(bias) ? *bias : Tensor();
  // A small batch, and bf16 on brgemm, run with lanes along the units (lstm_cpu.isa.cpp), which
  // read a row's gates as vectors: x_proj row-major [n, B, 4H] there. The weights-left step's
  // x_proj stays feature-major whatever the lanes (the kernel reads any layout; only the cell
  // reads it).
  const bool unit_lanes = step_on_gemm || bf16 || B < FASTATTN_ISA_CALL(lstm_unit_lanes_below);
  for (int64_t done = 0; done < T; done += chunk) {
    const int64_t n = std::min(chunk, T - done);
    const int64_t t0 = reverse ? T - done - n : done;
    // Step-major [n, 4H, B] (the batch-lane kernel's fast layout) from brgemm; at::mm's
    // feature-major [4H, n * B] where brgemm does not run (the kernel reads any layout).
    const Tensor x = input.narrow(0, t0, n).reshape({n * B, I});
    const Tensor proj_buf = buffer.narrow(0, 0, 4 * H * n * B);
    Tensor x_proj = proj_buf.view({n, 4 * H, B});
    if (step_on_weight_gemms) {
      const Tensor cols = proj_buf.view({4 * H, B});
      torch_mm_out(cols, w_ih, x.t(), b);
      cols.addmm_(w_hh, h0.t());
      x_proj = proj_buf.view({4 * H, 1, B}).permute({1, 0, 2});
    } else if (unit_lanes) {
      x_proj = proj_buf.view({n, B, 4 * H});
      Tensor rows = x_proj.view({n * B, 4 * H});
      step_on_gemm ? step_gates(rows, x, h0, w_ih, w_hh, b)
                   : cpu_gemm::linear_out(rows, x, w_ih, b);
      x_proj = x_proj.permute({0, 2, 1});
    } else if (!cpu_gemm::mm_out(x_proj, w_ih, x.t(), b)) {
      torch_mm_out(proj_buf.view({4 * H, n * B}), w_ih, x.t(), b);
      x_proj = proj_buf.view({4 * H, n, B}).permute({1, 0, 2});
    }
    const bool first = done == 0;
    const int64_t prev = reverse ? t0 + n : t0 - 1;
    run_layer_fwd(p, dtype, bf16, w_hh_k, w_hr_k, x_proj.permute({0, 2, 1}),
                  first ? h0 : h_all[prev], first ? c0 : c_all[prev], t0, n, h_all, c_all,
                  Tensor(), Tensor());
  }
  return {h_all, c_all};
}

std::tuple<Tensor, Tensor, Tensor> lstm_sequence_fwd_cpu(const Tensor& x_proj, const Tensor& h0,
                                                         const Tensor& c0, const Tensor& w_hh) {
  auto [h_all, c_all, gates_all, hpre_all] = lstm_layer_fwd_cpu(
      x_proj, h0, c0, w_hh, std::nullopt, std::nullopt, false, std::nullopt, std::nullopt);
  return {h_all, c_all, gates_all};
}

// The training input projection (weight = w_ih, x = input.transpose(1, 2): x_proj step-major, as
// lstm_layer_infer computes it): float32 on oneDNN's brgemm (fastattn/cpu_gemm.h, kernels that
// depend on the weight's shape alone), other dtypes and FASTATTN_LSTM_GEMM=torch on at::mm.
Tensor lstm_weight_mm_cpu(const Tensor& weight, const Tensor& x, const OptTensor& bias) {
  constexpr const char* op = "fastattn::lstm_weight_mm";
  lstm_dtype(weight, op);
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 3 && weight.size(1) == x.size(1), op,
              ": weight must be [M, K] and x [S, K, N], got ", weight.sizes(), " and ", x.sizes());
  check_like(x, weight, x.sizes(), op, "x");
  if (given(bias)) check_like(*bias, weight, {weight.size(0)}, op, "bias");
  const int64_t S = x.size(0), M = weight.size(0), K = x.size(1), N = x.size(2);
  Tensor out = at::empty({S, M, N}, weight.options());
  // The S products as one: columns (s, n) of x's [K, S * N] (a view for a transposed input).
  const Tensor w = contiguous_matrix(weight), b = given(bias) ? *bias : Tensor();
  const Tensor x_cols = x.permute({1, 0, 2}).reshape({K, S * N});
  if (!cpu_gemm::mm_out(out, w, x_cols, b)) {
    const Tensor product = at::empty({M, S * N}, weight.options());
    torch_mm_out(product, w, x_cols, b);
    out.permute({1, 0, 2}).copy_(product.view({M, S, N}));
  }
  return out;
}

// grad_w_hh = sum_t grad_gates[t]^T @ h_prev(t) as one product of grad_x_proj's [4H, T * B]
// (its memory after a step-major forward) and every step's h_prev, on oneDNN's brgemm
// (cpu_gemm::mm_out: torch.mm's MKL runs its AVX2 code on AMD; T32 B16 H256 on the Zen 5,
// ~400 GFLOP/s against ~210). Undefined where that does not run (another dtype or layout,
// FASTATTN_LSTM_GEMM=torch, a CPU without brgemm): the caller sums at::mm's products then.
Tensor grad_w_hh_on_brgemm(const LayerProblem& p, bool reverse, const Tensor& grad_x_proj,
                           const Tensor& h0, const Tensor& h_all) {
  if (p.T == 0 || h_all.scalar_type() != at::kFloat || !step_major(grad_x_proj) ||
      cpu_gemm::torch_mm_forced()) {
    return Tensor();
  }
  const Tensor h_prev_all = (reverse ? at::cat({h_all.narrow(0, 1, p.T - 1), h0.unsqueeze(0)})
                                     : at::cat({h0.unsqueeze(0), h_all.narrow(0, 0, p.T - 1)}))
                                .reshape({p.T * p.B, p.P});
  const int64_t G = 4 * p.H;
  const Tensor out = at::empty({1, G, p.P}, h_all.options());
  const Tensor grad_cols = grad_x_proj.permute({2, 0, 1}).reshape({G, p.T * p.B});
  return cpu_gemm::mm_out(out, grad_cols, h_prev_all) ? out[0] : Tensor();
}

// The same sum on at::mm: one GEMM for the steps that read h_all and one for the step that reads
// h0.
Tensor grad_w_hh_on_mm(const LayerProblem& p, bool reverse, const Tensor& grad_x_proj,
                       const Tensor& h0, const Tensor& h_all) {
  const int64_t G = 4 * p.H;
  if (p.T == 0) return at::zeros({G, p.P}, h_all.options());
  const int64_t first = reverse ? p.T - 1 : 0;
  Tensor grad_w_hh = at::mm(grad_x_proj[first].t(), h0);
  if (p.T > 1) {
    const Tensor later =
        reverse ? grad_x_proj.narrow(0, 0, p.T - 1) : grad_x_proj.narrow(0, 1, p.T - 1);
    const Tensor prev = reverse ? h_all.narrow(0, 1, p.T - 1) : h_all.narrow(0, 0, p.T - 1);
    // Explicit row counts: -1 cannot be inferred from zero-size rows (H == 0 or P == 0).
    const int64_t rows = (p.T - 1) * p.B;
    grad_w_hh.addmm_(later.reshape({rows, G}).t(), prev.reshape({rows, p.P}));
  }
  return grad_w_hh;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_bwd_cpu(
    const Tensor& grad_h_all, const Tensor& grad_c_all, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse,
    const OptTensor& zoneout_c, const OptTensor& zoneout_h, const Tensor& h_all,
    const Tensor& c_all, const Tensor& gates_all, const Tensor& hpre_all) {
  constexpr const char* op = "fastattn::lstm_layer_bwd";
  TORCH_CHECK(gates_all.dim() == 3 && gates_all.size(2) % 4 == 0, op,
              ": gates_all must be [T, B, 4H], got ", gates_all.sizes());
  const int64_t H = gates_all.size(2) / 4;
  const Dtype dtype = lstm_dtype(c_all, op);
  const LayerProblem p = layer_problem(op, c_all, gates_all.size(0), gates_all.size(1), H, h0, c0,
                                       w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h);
  const bool proj = p.w_hr.defined();
  check_like(grad_h_all, c_all, {p.T, p.B, p.P}, op, "grad_h_all");
  check_like(grad_c_all, c_all, {p.T, p.B, p.H}, op, "grad_c_all");
  check_like(h_all, c_all, {p.T, p.B, p.P}, op, "h_all");
  check_like(c_all, c_all, {p.T, p.B, p.H}, op, "c_all");
  if (proj) check_like(hpre_all, c_all, {p.T, p.B, p.H}, op, "hpre_all");
  // The forward saves the gates in the math type.
  TORCH_CHECK(gates_all.device() == c_all.device() && gates_all.scalar_type() == math_type(c_all),
              op, ": gates_all must be ", math_type(c_all), " on ", c_all.device(), ", got ",
              gates_all.scalar_type(), " on ", gates_all.device());
  const auto opts = c_all.options();
  // Feature-major ([4H, T, B] in memory, as the fake says) after a step-major forward, and
  // after a row-major one (lanes along the units) where fastattn's GEMM takes the weight
  // gradients (cpu_gemm::wins_on_this_cpu), here and in the backward of the input projection
  // (fastattn/ops/lstm.py): its brgemm reads their A operand, [4H, T * B], along rows. The kernel
  // writes it in gates_all's layout, so after a row-major forward into row-major rows first,
  // transposed after (transpose_copy), which costs less than those products on torch.mm's MKL on
  // AMD. Elsewhere it stays row-major: torch.mm takes the products with either operand
  // transposed, and a second [T, B, 4H] buffer and its transpose took ~4% of a T64 B24 H256
  // training step on the Xeon with AMX.
  const bool feature_major = step_major(gates_all) || cpu_gemm::wins_on_this_cpu();
  const Tensor grad_x_proj = feature_major
      ? at::empty({4 * p.H, p.T, p.B}, opts).permute({1, 2, 0})
      : at::empty({p.T, p.B, 4 * p.H}, opts);
  const Tensor grad_rows = step_major(gates_all) == step_major(grad_x_proj)
      ? grad_x_proj : at::empty({p.T, p.B, 4 * p.H}, opts);
  Tensor grad_h0 = at::empty({p.B, p.P}, opts);
  Tensor grad_c0 = at::empty({p.B, p.H}, opts);
  Tensor grad_hproj_all = proj ? at::empty({p.T, p.B, p.P}, opts) : Tensor();
  const bool bf16 = bf16_products(dtype, w_hh, p.w_hr);
  const Tensor w_hh_k = recurrent_weight(w_hh, bf16);
  const Tensor w_hr_k = proj ? kernel_weight(p.w_hr) : Tensor();

  LstmLayerBwdArgs a{};
  a.shape = p.shape(dtype);
  a.shape.bf16_products = bf16;
  a.w_hh = w_hh_k.data_ptr();
  a.w_hr = proj ? w_hr_k.data_ptr() : nullptr;
  a.grad_h_all = seq_view(grad_h_all);
  a.grad_c_all = seq_view(grad_c_all);
  a.c0 = seq_view(c0);
  a.c_all = seq_view(c_all);
  a.gates_all = seq_view(gates_all);
  a.zoneout_c = seq_view(p.zoneout_c);
  a.zoneout_h = seq_view(p.zoneout_h);
  a.grad_x_proj = seq_view(grad_rows);
  a.grad_h0 = seq_view(grad_h0);
  a.grad_c0 = seq_view(grad_c0);
  a.grad_hproj_all = seq_view(grad_hproj_all);
  FASTATTN_ISA_CALL(lstm_layer_bwd_kernel, a);
  if (!grad_rows.is_same(grad_x_proj)) {
    transpose_copy(grad_x_proj.permute({2, 0, 1}).view({4 * p.H, p.T * p.B}),
                   grad_rows.view({p.T * p.B, 4 * p.H}));
  }

  // Weight gradients for the whole sequence.
  Tensor grad_w_hh = grad_w_hh_on_brgemm(p, reverse, grad_x_proj, h0, h_all);
  if (!grad_w_hh.defined()) grad_w_hh = grad_w_hh_on_mm(p, reverse, grad_x_proj, h0, h_all);
  const int64_t rows = p.T * p.B;
  Tensor grad_w_hr = proj ? at::mm(grad_hproj_all.reshape({rows, p.P}).t(), hpre_all.reshape({rows, p.H}))
                          : at::empty({0}, opts);
  return {grad_x_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("lstm_cell_pointwise_fwd", &lstm_cell_pointwise_fwd_cpu);
  m.impl("lstm_cell_pointwise_bwd", &lstm_cell_pointwise_bwd_cpu);
  m.impl("lstm_sequence_fwd", &lstm_sequence_fwd_cpu);
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cpu);
  m.impl("lstm_layer_infer", &lstm_layer_infer_cpu);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cpu);
  m.impl("lstm_weight_mm", &lstm_weight_mm_cpu);
  m.impl("lstm_step_gates", &lstm_step_gates_cpu);
}

}  // namespace fastattn
