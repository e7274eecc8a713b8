// The eager CPU entry of fastattn.ops.lstm_cell (and so of fastattn.LSTMCell): plain CPU tensors
// of one float dtype in the shapes the Python path checks, nothing intercepting the call. A step
// that needs no gradient makes the Python path's op call (fastattn::lstm_layer_infer on the
// one-step sequence, fastattn/ops/lstm.py: _cell) from here; a training step that _cell gives
// to lstm_step_gates (all but float32 steps on fastattn::linear's GEMM) runs its two ops,
// step_gates and the fused pointwise, on a C++ autograd node whose backward computes what their
// registered Python backwards do. Any other call gets None and takes the Python path, which
// checks and raises. That path's checks and reshaping cost ~15 us per step, more than half of a
// B1 H256 inference step's ~25 us on the Xeon with AMX (2 threads), where torch's whole
// nn.LSTMCell took ~39; in training, its autograd cost ~60 us more. The bfloat16, float16,
// float64 and larger float32 training steps, which took the Python path on two GEMMs before,
// run 1.1-2.3x faster here (same machine, alternating builds: bf16 B1 H256 585 -> 425 us against
// torch's ~461, B16 H256 639 -> 473; fp16 B1 H256 547 -> 348; fp64 B4 H64 245 -> 108; float32
// B40 H256 783 -> 615, B128 H512 4792 -> 4312).
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "fastattn/cpu_gemm.h"
#include "fastattn/eager_entry.h"

namespace fastattn {

namespace {

using eager_entry::backend_allows_cpu;
using eager_entry::nothing_intercepts;
using eager_entry::plain_cpu_tensor;
using eager_entry::wrap;

using LstmLayerInfer = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using CellPointwiseFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);
using CellPointwiseBwd = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using StepGates = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const std::optional<at::Tensor>&);

// The Python path's bias: b_ih + b_hh, whichever is given, or none (_sum_biases).
std::optional<at::Tensor> summed_bias(const std::optional<at::Tensor>& b_ih,
                                      const std::optional<at::Tensor>& b_hh) {
  if (b_ih && b_hh) return *b_ih + *b_hh;
  return b_ih ? b_ih : b_hh;
}

std::optional<at::Tensor> optional(const at::Tensor* t) {
  return t != nullptr ? std::optional<at::Tensor>(*t) : std::nullopt;
}

// (hy, cy) of one training step: gates = lstm_step_gates(x, h, w_ih, w_hh, bias), then
// lstm_cell_pointwise_fwd(gates, c), as the Python path's _cell calls them (below autograd). The
// backward is their registered backwards' (fastattn/ops/lstm.py: _register_cell_autograd,
// _step_gates_backward), gradients of the biases included (b_ih + b_hh passes its gradient to
// both), first order only as there: the gradients of x, h, the weights and biases raise
// lstm_step_gates' double-backward error, that of c lstm_cell_pointwise_fwd's.
struct CellStep : torch::autograd::Function<CellStep> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h,
                               const at::Tensor& c, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh) {
    static const auto step_gates = eager_entry::op_handle<StepGates>("fastattn::lstm_step_gates");
    static const auto pointwise =
        eager_entry::op_handle<CellPointwiseFwd>("fastattn::lstm_cell_pointwise_fwd");
    at::AutoDispatchBelowAutograd below_autograd;
    const at::Tensor gates = step_gates.call(x, h, w_ih, w_hh, summed_bias(b_ih, b_hh));
    auto [hy, cy] = pointwise.call(gates, c);
    ctx->save_for_backward({x, h, w_ih, w_hh, gates, c, cy});
    ctx->saved_data["has_b_ih"] = b_ih.has_value();
    ctx->saved_data["has_b_hh"] = b_hh.has_value();
    return {hy, cy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto pointwise_bwd =
        eager_entry::op_handle<CellPointwiseBwd>("fastattn::lstm_cell_pointwise_bwd");
    static const std::string step_gates_message =
        eager_entry::double_backward_message("lstm_step_gates");
    static const std::string pointwise_message =
        eager_entry::double_backward_message("lstm_cell_pointwise_fwd");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &h = saved[1], &w_ih = saved[2], &w_hh = saved[3];
    const at::Tensor &gates = saved[4], &c = saved[5], &cy = saved[6];
    // The pointwise node's anchors are its gradients and saved gates, c and cy; step_gates' its
    // gradient (the gates', which then requires grad) and saved x, h, w_ih, w_hh.
    const variable_list pointwise_anchors =
        eager_entry::graph_anchors(grads, {gates, c, cy});
    at::Tensor grad_gates, grad_c;
    {
      at::NoGradGuard no_grad;
      const at::Tensor grad_hy = grads[0].defined() ? grads[0] : at::zeros_like(cy);
      const at::Tensor grad_cy = grads[1].defined() ? grads[1] : at::zeros_like(cy);
      std::tie(grad_gates, grad_c) = pointwise_bwd.call(grad_hy, grad_cy, gates, c, cy);
    }
    variable_list pointwise{grad_gates, grad_c};
    eager_entry::raise_on_double_backward(pointwise_message, pointwise, pointwise_anchors);
    grad_gates = pointwise[0], grad_c = pointwise[1];
    const variable_list step_anchors =
        eager_entry::graph_anchors({grad_gates}, {x, h, w_ih, w_hh});
    // needs_input_grad counts the tensors given: an absent b_ih moves b_hh to 5.
    const bool has_b_ih = ctx->saved_data["has_b_ih"].toBool();
    const bool needs_b_ih = has_b_ih && ctx->needs_input_grad(5);
    const bool needs_b_hh =
        ctx->saved_data["has_b_hh"].toBool() && ctx->needs_input_grad(has_b_ih ? 6 : 5);
    variable_list step(6);  // x, h, w_ih, w_hh, b_ih, b_hh
    {
      at::NoGradGuard no_grad;
      if (ctx->needs_input_grad(0)) step[0] = at::matmul(grad_gates, w_ih);
      if (ctx->needs_input_grad(1)) step[1] = at::matmul(grad_gates, w_hh);
      if (ctx->needs_input_grad(3)) step[2] = at::matmul(grad_gates.t(), x);
      if (ctx->needs_input_grad(4)) step[3] = at::matmul(grad_gates.t(), h);
      if (needs_b_ih || needs_b_hh) {
        const at::Tensor grad_bias = grad_gates.sum(0);
        if (needs_b_ih) step[4] = grad_bias;
        if (needs_b_hh) step[5] = grad_bias;
      }
    }
    eager_entry::raise_on_double_backward(step_gates_message, step, step_anchors);
    return {step[0], step[1], grad_c, step[2], step[3], step[4], step[5]};
  }
};

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// obj as a plain CPU tensor of `shape` and x's dtype, or null.
const at::Tensor* operand(py::handle obj, const at::Tensor& x, at::IntArrayRef shape) {
  const at::Tensor* t = plain_cpu_tensor(obj.ptr());
  return t != nullptr && t->sizes() == shape && t->scalar_type() == x.scalar_type() ? t
                                                                                    : nullptr;
}

// Whether t (or null: an absent bias) records a graph on the Python path.
bool records_graph(const at::Tensor* t) {
  return t != nullptr && at::GradMode::is_enabled() && t->requires_grad();
}

bool forward_ad(const at::Tensor* t) { return t != nullptr && t->_fw_grad(0).defined(); }

// Whether the Python path's training step runs its products on fastattn::linear instead of
// lstm_step_gates (fastattn/ops/linear.py: takes_op, for the plain x rows of this entry): a
// float32 x of at least kLinearMinRows rows where fastattn's GEMM beats torch.mm, which that
// module asks once, at import.
bool on_fastattn_linear(const at::Tensor& x) {
  static const bool gemm_wins = cpu_gemm::beats_torch_mm();
  return gemm_wins && x.scalar_type() == at::kFloat &&
         x.numel() >= cpu_gemm::kLinearMinRows * x.size(-1);
}

py::object lstm_cell_entry(py::handle input, py::handle hx, py::handle cx, py::handle w_ih,
                           py::handle w_hh, py::handle b_ih, py::handle b_hh, py::handle forced) {
  if (!backend_allows_cpu(forced.ptr()) || !nothing_intercepts()) return py::none();
  const at::Tensor* x = plain_cpu_tensor(input.ptr());
  if (x == nullptr || (x->dim() != 1 && x->dim() != 2) || !float_dtype(x->scalar_type())) {
    return py::none();
  }
  const bool unbatched = x->dim() == 1;
  const int64_t B = unbatched ? 1 : x->size(0), I = x->size(-1);
  const at::Tensor* wi = plain_cpu_tensor(w_ih.ptr());
  if (wi == nullptr || wi->dim() != 2 || wi->size(0) % 4 != 0 || wi->size(1) != I ||
      wi->scalar_type() != x->scalar_type()) {
    return py::none();
  }
  const int64_t H = wi->size(0) / 4;
  const std::vector<int64_t> state =
      unbatched ? std::vector<int64_t>{H} : std::vector<int64_t>{B, H};
  const at::Tensor* h = operand(hx, *x, state);
  const at::Tensor* c = h ? operand(cx, *x, state) : nullptr;
  const at::Tensor* wh = c ? operand(w_hh, *x, {4 * H, H}) : nullptr;
  if (wh == nullptr) return py::none();
  const at::Tensor *bi = nullptr, *bh = nullptr;
  if (!b_ih.is_none() && (bi = operand(b_ih, *x, {4 * H})) == nullptr) return py::none();
  if (!b_hh.is_none() && (bh = operand(b_hh, *x, {4 * H})) == nullptr) return py::none();
  const std::initializer_list<const at::Tensor*> operands{x, h, c, wi, wh, bi, bh};
  // Forward-mode tangents are the Python path's.
  if (std::any_of(operands.begin(), operands.end(), forward_ad)) return py::none();
  // A training step: the Python path's step_gates and pointwise ops, recorded on CellStep; the
  // steps whose products that path runs on fastattn::linear stay in Python.
  const bool training = std::any_of(operands.begin(), operands.end(), records_graph);
  if (training && on_fastattn_linear(*x)) return py::none();
  static const auto infer = eager_entry::op_handle<LstmLayerInfer>("fastattn::lstm_layer_infer");
  at::Tensor hy, cy;
  {
    py::gil_scoped_release no_gil;
    // [B, *] rows, as the Python path makes an unbatched step's.
    const at::Tensor x2 = unbatched ? x->unsqueeze(0) : *x;
    const at::Tensor h2 = unbatched ? h->unsqueeze(0) : *h;
    const at::Tensor c2 = unbatched ? c->unsqueeze(0) : *c;
    if (training) {
      const variable_list out = CellStep::apply(x2, h2, c2, *wi, *wh, optional(bi), optional(bh));
      hy = out[0], cy = out[1];
    } else {
      auto [h_all, c_all] =
          infer.call(x2.unsqueeze(0), *wi, summed_bias(optional(bi), optional(bh)), h2, c2, *wh,
                     std::nullopt, std::nullopt, false, std::nullopt, std::nullopt);
      hy = h_all.select(0, 0), cy = c_all.select(0, 0);
    }
    if (unbatched) {
      hy = hy.squeeze(0);
      cy = cy.squeeze(0);
    }
  }
  return py::make_tuple(wrap(std::move(hy)), wrap(std::move(cy)));
}

}  // namespace

void bind_lstm_eager_entry(py::module_& m) {
  m.def("lstm_cell_eager_entry", &lstm_cell_entry,
        "fastattn.ops.lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh) for a plain eager CPU "
        "step (inference, or a training step that lstm_step_gates serves), given "
        "use_backend's forced backend (or None); None where the call needs the Python path");
}

}  // namespace fastattn
