// What the eager CPU entries (csrc/attention/attention_eager_entry.cpp,
// csrc/lstm/lstm_eager_entry.cpp) check before they serve a call in C++ instead of the Python
// wrapper: that the Python path would pick the cpu backend and make the same op calls, with
// nothing in between that sees or rewrites them. Python glue: include it from bindings only.
#pragma once

#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace fastattn::eager_entry {

// A forced backend name (use_backend's, or FASTATTN_BACKEND's where use_backend forced none)
// that lets the cpu backend serve a CPU call, as fastattn.ops.backends.choose decides.
inline bool allows_cpu(const char* name) {
  return name[0] == '\0' || std::strcmp(name, "auto") == 0 || std::strcmp(name, "cpu") == 0;
}

// The op fastattn::<name> ("fastattn::name") as the dispatcher's typed handle: calls through it
// reach the profiler and every dispatch key, as the Python path's do. Look it up once (static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// forced: fastattn.ops.backends.forced_by_use_backend() (a name, or None outside any block).
inline bool backend_allows_cpu(PyObject* forced) {
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
inline bool nothing_intercepts() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return !torch::jit::tracer::isTracing() && !at::impl::torch_function_mode_enabled() &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set() &&
         c10::default_included_set.isSupersetOf(included) &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

// The dispatch keys of a plain dense CPU tensor (an inference tensor has a subset): a tensor
// with any other (a Python subclass or wrapper, a functorch batched or grad wrapper, a
// negative or conjugate view, sparse, meta) takes the Python path.
inline c10::DispatchKeySet plain_cpu_keys() {
  static const c10::DispatchKeySet keys = at::empty({0}).key_set();
  return keys;
}

// obj as a plain CPU tensor: an exact torch.Tensor (or nn.Parameter) on the CPU with plain
// keys; null for anything else.
inline const at::Tensor* plain_cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.device().is_cpu() && plain_cpu_keys().isSupersetOf(t.key_set()) ? &t : nullptr;
}

// fastattn/ops/_autograd.py's first_order_only message for the op fastattn::<op>
// (the entries' tests check that both paths raise the same).
inline std::string double_backward_message(const char* op) {
  return std::string("fastattn: double backward (differentiating the gradients of fastattn::") +
         op + ") is not supported; for second derivatives run the call on the reference backend "
              "(with fastattn.use_backend('reference'): ...)";
}

// What a backward that records no graph ties its results to where autograd would have recorded
// one (create_graph=True: grad mode on in the backward): the gradients and saved tensors that
// require grad; none otherwise.
inline torch::autograd::variable_list graph_anchors(const torch::autograd::variable_list& grads,
                                                    const torch::autograd::variable_list& saved) {
  torch::autograd::variable_list anchors;
  if (!at::GradMode::is_enabled()) return anchors;
  for (const auto* list : {&grads, &saved}) {
    for (const at::Tensor& t : *list) {
      if (t.defined() && t.requires_grad()) anchors.push_back(t);
    }
  }
  return anchors;
}

// (message, results, anchors) -> views of the results recorded on a node that raises `message`
// when differentiated (first_order_only's _RaiseOnBackward); the anchors tie it into the graph.
struct RaiseOnBackward : torch::autograd::Function<RaiseOnBackward> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const std::string& message,
                                                at::TensorList results, at::TensorList) {
    ctx->saved_data["message"] = message;
    torch::autograd::variable_list views;
    for (const at::Tensor& t : results) views.push_back(t.view_as(t));
    return views;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list) {
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
  }
};

// A first-order backward's results (undefined where no gradient is needed), put on a
// RaiseOnBackward node with `message` where graph_anchors found anchors (create_graph=True).
inline void raise_on_double_backward(const std::string& message,
                                     torch::autograd::variable_list& results,
                                     const torch::autograd::variable_list& anchors) {
  if (anchors.empty()) return;
  torch::autograd::variable_list defined;
  for (const at::Tensor& t : results) {
    if (t.defined()) defined.push_back(t);
  }
  const torch::autograd::variable_list views =
      RaiseOnBackward::apply(message, at::TensorList(defined), at::TensorList(anchors));
  size_t next = 0;
  for (at::Tensor& t : results) {
    if (t.defined()) t = views[next++];
  }
}

inline pybind11::object wrap(at::Tensor t) {
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(t)));
}

}  // namespace fastattn::eager_entry
