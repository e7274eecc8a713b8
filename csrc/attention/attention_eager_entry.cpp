// The eager CPU entry of fastattn.scaled_dot_product_attention: a call that needs none of the
// Python wrapper's work (no mask, no dropout, plain CPU tensors of one float dtype in the
// [B, H, len, dim] layout the op takes, nothing intercepting the call) runs fastattn::attention_fwd
// from here, and where a gradient is needed records it on a C++ autograd node whose backward runs
// fastattn::attention_bwd; any other call gets None and takes the Python path, which checks,
// normalizes and raises. The Python path costs ~11 us per call (two thirds of a short decode
// step's time on 2 cores) and its autograd.Function ~45 us more per forward and backward; this
// one under 2 and a few.
//
// Declining is always safe, so the gate below only lists conditions under which the Python path
// makes exactly these op calls with these arguments; it raises nothing. The autograd node gives
// the gradients of the Python path's (fastattn/ops/attention.py: _AttentionFunction), first
// order only as there (fastattn/ops/_autograd.py: first_order_only).
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

namespace fastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using AttentionFwd = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, double, int64_t,
    int64_t, bool, double);
using AttentionBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&, double, int64_t, int64_t, bool, double, bool);

// fastattn::attention_fwd (out, lse) without mask, ALiBi, dropout or softcap, through the
// dispatcher (the profiler records it there), below autograd.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, double scale,
                                                 int64_t window_right) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::attention_fwd", "")
                             .typed<AttentionFwd>();
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(q, k, v, std::nullopt, std::nullopt, 0.0, std::nullopt, scale, -1, window_right,
                 false, 0.0);
}

// Its gradients dq, dk, dv (fastattn::attention_bwd, no graph recorded).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, int64_t window_right) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::attention_bwd", "")
                             .typed<AttentionBwd>();
  at::AutoDispatchBelowAutograd below_autograd;
  const auto [dq, dk, dv, dmask] =
      op.call(grad_out.contiguous(), q, k, v, out, lse, std::nullopt, std::nullopt, 0.0,
              std::nullopt, scale, -1, window_right, false, 0.0, false);
  return {dq, dk, dv};
}

// The message of fastattn/ops/_autograd.py's first_order_only for fastattn::attention_fwd
// (tests/test_attention_eager_entry.py checks that the two paths raise the same).
constexpr const char* kDoubleBackwardMessage =
    "fastattn: double backward (differentiating the gradients of fastattn::attention_fwd) is "
    "not supported; for second derivatives run the call on the reference backend "
    "(with fastattn.use_backend('reference'): ...)";

// results -> views of them recorded on a node that raises kDoubleBackwardMessage when
// differentiated; the anchors (tensors that require grad) tie the node into the graph.
struct RaiseOnBackward : torch::autograd::Function<RaiseOnBackward> {
  static variable_list forward(AutogradContext*, at::TensorList results, at::TensorList) {
    variable_list views;
    for (const at::Tensor& t : results) views.push_back(t.view_as(t));
    return views;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, kDoubleBackwardMessage);
  }
};

// out = attention(q, k, v) recorded for autograd. The backward records no graph; where autograd
// would have recorded one (create_graph=True), the gradients come back on a RaiseOnBackward
// node, as the Python path's do.
struct Attention : torch::autograd::Function<Attention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, int64_t window_right) {
    auto [out, lse] = attention_fwd(q, k, v, scale, window_right);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_right"] = window_right;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    variable_list anchors;
    if (at::GradMode::is_enabled()) {
      for (const variable_list& list : {grads, saved}) {
        for (const at::Tensor& t : list) {
          if (t.defined() && t.requires_grad()) anchors.push_back(t);
        }
      }
    }
    at::Tensor dq, dk, dv;
    {
      at::NoGradGuard no_grad;
      std::tie(dq, dk, dv) = attention_bwd(grads[0], saved[0], saved[1], saved[2], saved[3],
                                           saved[4], ctx->saved_data["scale"].toDouble(),
                                           ctx->saved_data["window_right"].toInt());
    }
    if (!anchors.empty()) {
      const variable_list raising = RaiseOnBackward::apply(at::TensorList{dq, dk, dv},
                                                           at::TensorList(anchors));
      dq = raising[0], dk = raising[1], dv = raising[2];
    }
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

// A forced backend name (use_backend's, or FASTATTN_BACKEND's where use_backend forced none)
// that lets the cpu backend serve a CPU call, as fastattn.ops.backends.choose decides.
bool allows_cpu(const char* name) {
  return name[0] == '\0' || std::strcmp(name, "auto") == 0 || std::strcmp(name, "cpu") == 0;
}

bool backend_allows_cpu(PyObject* forced) {
  if (forced == Py_None) {
    // os.environ's writes reach the C environment (putenv / unsetenv).
    const char* env = std::getenv("FASTATTN_BACKEND");
    return env == nullptr || allows_cpu(env);
  }
  if (!PyUnicode_CheckExact(forced)) return false;
  const char* name = PyUnicode_AsUTF8(forced);
  if (name == nullptr) {
    PyErr_Clear();
    return false;
  }
  return allows_cpu(name);
}

// Nothing between the caller and the kernel: no tracer, torch function or dispatch mode,
// functorch transform, functionalization or autocast, all of which see (or rewrite) the op
// call on the Python path.
bool nothing_intercepts() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return !torch::jit::tracer::isTracing() && !at::impl::torch_function_mode_enabled() &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set() &&
         c10::default_included_set.isSupersetOf(included) &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

// The dispatch keys of a plain dense CPU tensor (an inference tensor has a subset): a tensor
// with any other (a Python subclass or wrapper, a functorch batched or grad wrapper, a
// negative or conjugate view, sparse, meta) takes the Python path.
c10::DispatchKeySet plain_cpu_keys() {
  static const c10::DispatchKeySet keys = at::empty({0}).key_set();
  return keys;
}

// q, k or v as the op takes it without help: an exact torch.Tensor (or nn.Parameter) on the
// CPU, 4-D, of q's float dtype, no dim empty, with plain keys.
const at::Tensor* plain_operand(PyObject* obj, const at::Tensor* q) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.dim() != 4 || !plain_cpu_keys().isSupersetOf(t.key_set()) || !t.device().is_cpu()) {
    return nullptr;
  }
  const at::ScalarType dtype = t.scalar_type();
  if (q != nullptr ? dtype != q->scalar_type()
                   : !(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                       dtype == at::kDouble)) {
    return nullptr;
  }
  for (const int64_t size : t.sizes()) {
    if (size == 0) return nullptr;
  }
  return &t;
}

bool is_bool(PyObject* obj) { return obj == Py_True || obj == Py_False; }

py::object attention_eager_entry(py::handle query, py::handle key, py::handle value,
                                 py::handle attn_mask, py::handle dropout_p, py::handle is_causal,
                                 py::handle scale, py::handle enable_gqa, py::handle forced) {
  const py::object decline = py::none();
  // The arguments as the Python path takes them at once: anything else (a mask, dropout, an
  // int or tensor scale, one NaN or infinite in float32) needs its conversions and checks.
  if (!attn_mask.is_none() || !PyFloat_CheckExact(dropout_p.ptr()) ||
      PyFloat_AS_DOUBLE(dropout_p.ptr()) != 0.0 || !is_bool(is_causal.ptr()) ||
      !is_bool(enable_gqa.ptr())) {
    return decline;
  }
  std::optional<double> given_scale;
  if (!scale.is_none()) {
    if (!PyFloat_CheckExact(scale.ptr())) return decline;
    given_scale = PyFloat_AS_DOUBLE(scale.ptr());
    if (!(std::fabs(*given_scale) <= FLT_MAX)) return decline;
  }
  if (!backend_allows_cpu(forced.ptr()) || !nothing_intercepts()) return decline;
  const at::Tensor* q = plain_operand(query.ptr(), nullptr);
  const at::Tensor* k = q ? plain_operand(key.ptr(), q) : nullptr;
  const at::Tensor* v = k ? plain_operand(value.ptr(), q) : nullptr;
  if (v == nullptr) return decline;
  // Shapes the op takes as they are (no broadcast batch dims; grouped heads only with
  // enable_gqa, as torch).
  const int64_t B = q->size(0), Hq = q->size(1), E = q->size(3), Hk = k->size(1);
  const bool gqa = enable_gqa.ptr() == Py_True;
  if (k->size(0) != B || v->size(0) != B || v->size(1) != Hk || k->size(3) != E ||
      v->size(2) != k->size(2) || (gqa ? Hq % Hk != 0 : Hq != Hk)) {
    return decline;
  }
  const double softmax_scale = given_scale ? *given_scale : 1.0 / std::sqrt(double(E));
  const int64_t window_right = is_causal.ptr() == Py_True ? 0 : -1;
  const bool records_graph = at::GradMode::is_enabled() &&
                             (q->requires_grad() || k->requires_grad() || v->requires_grad());
  // Forward-mode AD (dual tensors) takes the Python path, whose autograd.Function rejects it.
  if (records_graph && (q->_fw_grad(0).defined() || k->_fw_grad(0).defined() ||
                        v->_fw_grad(0).defined())) {
    return decline;
  }
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = records_graph ? Attention::apply(*q, *k, *v, softmax_scale, window_right)
                        : std::get<0>(attention_fwd(*q, *k, *v, softmax_scale, window_right));
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

}  // namespace

void bind_attention_eager_entry(py::module_& m) {
  m.def("attention_eager_entry", &attention_eager_entry,
        "scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, "
        "enable_gqa) for a plain eager CPU call, given use_backend's forced backend (or None); "
        "None where the call needs the Python path");
}

}  // namespace fastattn
