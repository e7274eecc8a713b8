// The eager CPU entry of fastattn.ops.lstm_cell (and so of fastattn.LSTMCell) for a step that
// needs no gradient: plain CPU tensors of one float dtype in the shapes the Python path checks,
// nothing intercepting the call. It makes the Python path's op call (fastattn::lstm_layer_infer
// on the one-step sequence, fastattn/ops/lstm.py: _cell) from here; any other call gets None and
// takes the Python path, which checks, raises and records gradients. That path's checks and
// reshaping cost ~15 us per step, more than half of a B1 H256 step's ~25 us on the Xeon with AMX
// (2 threads), where torch's whole nn.LSTMCell took ~39.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

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

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// obj as a plain CPU tensor of `shape` and x's dtype, or null.
const at::Tensor* operand(py::handle obj, const at::Tensor& x, at::IntArrayRef shape) {
  const at::Tensor* t = plain_cpu_tensor(obj.ptr());
  return t != nullptr && t->sizes() == shape && t->scalar_type() == x.scalar_type() ? t
                                                                                    : nullptr;
}

// Whether t (or null: an absent bias) records a graph on the Python path, or carries a
// forward-mode tangent: such a step is the Python path's.
bool differentiated(const at::Tensor* t) {
  return t != nullptr &&
         ((at::GradMode::is_enabled() && t->requires_grad()) || t->_fw_grad(0).defined());
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
  for (const at::Tensor* t : {x, h, c, wi, wh, bi, bh}) {
    if (differentiated(t)) return py::none();
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::lstm_layer_infer", "")
                             .typed<LstmLayerInfer>();
  at::Tensor hy, cy;
  {
    py::gil_scoped_release no_gil;
    std::optional<at::Tensor> bias;  // the Python path's _sum_biases
    if (bi != nullptr && bh != nullptr) {
      bias = *bi + *bh;
    } else if (bi != nullptr || bh != nullptr) {
      bias = bi != nullptr ? *bi : *bh;
    }
    const at::Tensor x2 = unbatched ? x->unsqueeze(0) : *x;
    const at::Tensor h2 = unbatched ? h->unsqueeze(0) : *h;
    const at::Tensor c2 = unbatched ? c->unsqueeze(0) : *c;
    auto [h_all, c_all] = op.call(x2.unsqueeze(0), *wi, bias, h2, c2, *wh, std::nullopt,
                                  std::nullopt, false, std::nullopt, std::nullopt);
    hy = h_all.select(0, 0);
    cy = c_all.select(0, 0);
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
        "step that needs no gradient, given use_backend's forced backend (or None); None where "
        "the call needs the Python path");
}

}  // namespace fastattn
