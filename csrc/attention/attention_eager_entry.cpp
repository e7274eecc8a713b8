// The eager CPU entries of fastattn.scaled_dot_product_attention, fastattn.attention and
// fastattn.attention_with_kv_cache: a call that needs none of the Python wrapper's work (no
// ALiBi or dropout; plain CPU tensors of one float dtype in the [B, H, len, dim] layout the op
// takes, a mask that broadcasts to them; nothing intercepting the call) runs
// fastattn::attention_fwd (or attention_kv_cache_fwd) from here, and where a gradient is needed
// records it on a C++ autograd node whose backward runs fastattn::attention_bwd; any other call
// gets None and takes the Python path, which checks, normalizes and raises. The Python path
// costs ~11 us per call (two thirds of a short decode step's time on 2 cores; ~25 us for the
// KV-cache op's many arguments) and its autograd.Function ~55 us more per forward and backward;
// this one under 2 and a few.
//
// Declining is always safe, so the gates below only list conditions under which the Python path
// makes exactly these op calls with these arguments; they raise nothing. The autograd node gives
// the gradients of the Python path's (fastattn/ops/attention.py: _AttentionFunction), first
// order only as there (fastattn/ops/_autograd.py: first_order_only).
#include <torch/extension.h>

#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>

#include "fastattn/eager_entry.h"

namespace fastattn {
namespace {

using eager_entry::backend_allows_cpu;
using eager_entry::nothing_intercepts;
using eager_entry::plain_cpu_tensor;
using eager_entry::wrap;

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

// The options of an attention_fwd call without mask, ALiBi or dropout.
struct Options {
  double scale;
  int64_t window_left, window_right;
  bool bottom_right;
  double softcap;
};

// An undefined tensor as the op's absent optional one.
std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// fastattn::attention_fwd (out, lse) through the dispatcher (the profiler records it there),
// below autograd; mask: the op's [B, Hq, L, S] attn_mask or undefined.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& mask,
                                                 const Options& o) {
  static const auto op = eager_entry::op_handle<AttentionFwd>("fastattn::attention_fwd");
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(q, k, v, optional(mask), std::nullopt, 0.0, std::nullopt, o.scale,
                 o.window_left, o.window_right, o.bottom_right, o.softcap);
}

// Its gradients dq, dk, dv (fastattn::attention_bwd, no graph recorded; none for the mask).
// grad_out as it comes: the CPU op reads it through its strides (the gradient of a merge of the
// heads, out.transpose(1, 2).reshape(B, L, -1), is such a strided view).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& mask, const Options& o) {
  static const auto op = eager_entry::op_handle<AttentionBwd>("fastattn::attention_bwd");
  at::AutoDispatchBelowAutograd below_autograd;
  const auto [dq, dk, dv, dmask] =
      op.call(grad_out, q, k, v, out, lse, optional(mask), std::nullopt, 0.0,
              std::nullopt, o.scale, o.window_left, o.window_right, o.bottom_right, o.softcap,
              false);
  return {dq, dk, dv};
}

// The message of fastattn/ops/_autograd.py's first_order_only for fastattn::attention_fwd
// (tests/test_attention_eager_entry.py checks that the two paths raise the same).
const std::string kDoubleBackwardMessage = eager_entry::double_backward_message("attention_fwd");

// (out, lse) = attention(q, k, v, mask) recorded for autograd (lse not differentiable, as the
// Python path's detached one; the mask, if defined, requires no grad). The backward records no
// graph; where autograd would have recorded one (create_graph=True), the gradients come back on a
// RaiseOnBackward node, as the Python path's do.
struct Attention : torch::autograd::Function<Attention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& mask,
                               double scale, int64_t window_left, int64_t window_right,
                               bool bottom_right, double softcap) {
    const Options o{scale, window_left, window_right, bottom_right, softcap};
    const at::Tensor mask_or_undefined = mask.value_or(at::Tensor());
    auto [out, lse] = attention_fwd(q, k, v, mask_or_undefined, o);
    ctx->save_for_backward({q, k, v, out, lse, mask_or_undefined});
    ctx->mark_non_differentiable({lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["softcap"] = softcap;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const variable_list anchors = eager_entry::graph_anchors(grads, saved);
    const Options o{ctx->saved_data["scale"].toDouble(), ctx->saved_data["window_left"].toInt(),
                    ctx->saved_data["window_right"].toInt(),
                    ctx->saved_data["bottom_right"].toBool(),
                    ctx->saved_data["softcap"].toDouble()};
    at::Tensor dq, dk, dv;
    {
      at::NoGradGuard no_grad;
      std::tie(dq, dk, dv) =
          attention_bwd(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], o);
    }
    variable_list input_grads{dq, dk, dv};
    eager_entry::raise_on_double_backward(kDoubleBackwardMessage, input_grads, anchors);
    const at::Tensor none;
    return {input_grads[0], input_grads[1], input_grads[2], none, none, none, none, none, none};
  }
};

// q, k or v as the op takes it without help: an exact torch.Tensor (or nn.Parameter) on the
// CPU, 4-D, of q's float dtype, no dim empty, with plain keys.
const at::Tensor* plain_operand(PyObject* obj, const at::Tensor* q) {
  const at::Tensor* plain = plain_cpu_tensor(obj);
  if (plain == nullptr || plain->dim() != 4) return nullptr;
  const at::Tensor& t = *plain;
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

bool is_float_zero(PyObject* obj) {
  return PyFloat_CheckExact(obj) && PyFloat_AS_DOUBLE(obj) == 0.0;
}

// attn_mask as the Python path's _mask_4d hands it to the op: its view expanded to
// [B, Hq, L, S], for a plain CPU tensor of 2 to 4 dims, bool, float32 or q's dtype (the ones it
// keeps as they are), requiring no grad (its gradient is the Python path's), that broadcasts to
// that shape; none for anything else.
std::optional<at::Tensor> broadcast_mask(PyObject* obj, const at::Tensor& q, int64_t S) {
  const at::Tensor* plain = plain_cpu_tensor(obj);
  if (plain == nullptr) return std::nullopt;
  const at::Tensor& m = *plain;
  const at::ScalarType dtype = m.scalar_type();
  if (m.dim() < 2 || m.dim() > 4 || m.requires_grad() ||
      !(dtype == at::kBool || dtype == at::kFloat || dtype == q.scalar_type())) {
    return std::nullopt;
  }
  const std::array<int64_t, 4> target{q.size(0), q.size(1), q.size(2), S};
  for (int64_t d = 1; d <= m.dim(); ++d) {
    const int64_t size = m.size(-d);
    if (size != 1 && size != target[4 - d]) return std::nullopt;
  }
  return m.expand(target);
}

// q, k, v (and attn_mask, which may be None) of a call the op serves as it is, or none: nothing
// forces another backend or intercepts the call, the tensors are plain, 4-D and nonempty, and the
// shapes match (grouped query heads where allowed).
struct Operands {
  const at::Tensor *q, *k, *v;
  at::Tensor mask;  // the op's [B, Hq, L, S] attn_mask, or undefined
};

std::optional<Operands> plain_operands(py::handle query, py::handle key, py::handle value,
                                       py::handle attn_mask, py::handle forced,
                                       bool grouped_heads) {
  if (!backend_allows_cpu(forced.ptr()) || !nothing_intercepts()) return std::nullopt;
  const at::Tensor* q = plain_operand(query.ptr(), nullptr);
  const at::Tensor* k = q ? plain_operand(key.ptr(), q) : nullptr;
  const at::Tensor* v = k ? plain_operand(value.ptr(), q) : nullptr;
  if (v == nullptr) return std::nullopt;
  const int64_t B = q->size(0), Hq = q->size(1), E = q->size(3), Hk = k->size(1);
  if (k->size(0) != B || v->size(0) != B || v->size(1) != Hk || k->size(3) != E ||
      v->size(2) != k->size(2) || (grouped_heads ? Hq % Hk != 0 : Hq != Hk)) {
    return std::nullopt;
  }
  at::Tensor mask;
  if (!attn_mask.is_none()) {
    auto expanded = broadcast_mask(attn_mask.ptr(), *q, k->size(2));
    if (!expanded) return std::nullopt;
    mask = std::move(*expanded);
  }
  return Operands{q, k, v, std::move(mask)};
}

// The op's (out, lse) for the operands, on the autograd node where a gradient is needed, or
// none where the call takes the Python path after all (forward-mode AD: dual tensors, which
// the Python path's autograd.Function rejects).
std::optional<std::tuple<at::Tensor, at::Tensor>> run(const Operands& in, const Options& o) {
  const at::Tensor &q = *in.q, &k = *in.k, &v = *in.v;
  const bool records_graph =
      at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (records_graph &&
      (q._fw_grad(0).defined() || k._fw_grad(0).defined() || v._fw_grad(0).defined() ||
       (in.mask.defined() && in.mask._fw_grad(0).defined()))) {
    return std::nullopt;
  }
  py::gil_scoped_release no_gil;
  if (!records_graph) return attention_fwd(q, k, v, in.mask, o);
  const variable_list out = Attention::apply(q, k, v, optional(in.mask), o.scale, o.window_left,
                                             o.window_right, o.bottom_right, o.softcap);
  return std::tuple{out[0], out[1]};
}

// The Python path's default scale for head dim E.
double default_scale(int64_t E) { return 1.0 / std::sqrt(double(E)); }

py::object sdpa_entry(py::handle query, py::handle key, py::handle value, py::handle attn_mask,
                      py::handle dropout_p, py::handle is_causal, py::handle scale,
                      py::handle enable_gqa, py::handle forced) {
  // The arguments as the Python path takes them at once: anything else (dropout, an int or
  // tensor scale, one NaN or infinite in float32, a mask with is_causal, which torch's kernel
  // choice decides) needs its conversions and checks.
  if (!is_float_zero(dropout_p.ptr()) || !is_bool(is_causal.ptr()) ||
      !is_bool(enable_gqa.ptr()) || (!attn_mask.is_none() && is_causal.ptr() == Py_True)) {
    return py::none();
  }
  if (!scale.is_none() && !(PyFloat_CheckExact(scale.ptr()) &&
                            std::fabs(PyFloat_AS_DOUBLE(scale.ptr())) <= FLT_MAX)) {
    return py::none();
  }
  const auto in =
      plain_operands(query, key, value, attn_mask, forced, enable_gqa.ptr() == Py_True);
  if (!in) return py::none();
  const double s = scale.is_none() ? default_scale(in->q->size(3)) : PyFloat_AS_DOUBLE(scale.ptr());
  const Options o{s, -1, is_causal.ptr() == Py_True ? 0 : -1, false, 0.0};
  const auto result = run(*in, o);
  return result ? wrap(std::get<0>(*result)) : py::none();
}

// An exact int >= -1 (a window bound; -1 = unbounded), or none.
std::optional<int64_t> window_bound(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) return std::nullopt;
  int overflow = 0;
  const long long bound = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || bound < -1) return std::nullopt;
  return bound;
}

// fastattn.attention's options as the Python path's attention_options takes them without
// conversions or errors, for q's head dim E; none for anything else (a non-bool causal, an
// unknown alignment, a window that is not (left, right) exact ints >= -1, a softcap or scale that
// is not a finite float, a softcap <= 0).
std::optional<Options> attention_options(py::handle causal, py::handle causal_align,
                                         py::handle window, py::handle softcap, py::handle scale,
                                         int64_t E) {
  if (!is_bool(causal.ptr()) || !PyUnicode_CheckExact(causal_align.ptr())) return std::nullopt;
  const char* align = PyUnicode_AsUTF8(causal_align.ptr());
  if (align == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  const bool bottom_right = std::strcmp(align, "bottom_right") == 0;
  if (!bottom_right && std::strcmp(align, "top_left") != 0) return std::nullopt;
  if (!(PyTuple_CheckExact(window.ptr()) || PyList_CheckExact(window.ptr())) ||
      PySequence_Fast_GET_SIZE(window.ptr()) != 2) {
    return std::nullopt;
  }
  const auto left = window_bound(PySequence_Fast_GET_ITEM(window.ptr(), 0));
  auto right = window_bound(PySequence_Fast_GET_ITEM(window.ptr(), 1));
  if (!left || !right) return std::nullopt;
  // The op refuses a softcap or scale that is not finite: the Python path raises that.
  double cap = 0.0;
  if (!softcap.is_none()) {
    if (!PyFloat_CheckExact(softcap.ptr())) return std::nullopt;
    cap = PyFloat_AS_DOUBLE(softcap.ptr());
    if (!(cap > 0.0 && std::isfinite(cap))) return std::nullopt;
  }
  if (!scale.is_none() &&
      !(PyFloat_CheckExact(scale.ptr()) && std::isfinite(PyFloat_AS_DOUBLE(scale.ptr())))) {
    return std::nullopt;
  }
  if (causal.ptr() == Py_True) right = *right < 0 ? 0 : std::min<int64_t>(*right, 0);
  return Options{scale.is_none() ? default_scale(E) : PyFloat_AS_DOUBLE(scale.ptr()),
                 *left, *right, bottom_right, cap};
}

py::object attention_entry(py::handle query, py::handle key, py::handle value, py::handle causal,
                           py::handle causal_align, py::handle window, py::handle softcap,
                           py::handle alibi_slopes, py::handle attn_mask, py::handle dropout_p,
                           py::handle scale, py::handle return_lse, py::handle forced) {
  if (!alibi_slopes.is_none() || !is_float_zero(dropout_p.ptr()) ||
      !is_bool(return_lse.ptr())) {
    return py::none();
  }
  const auto in = plain_operands(query, key, value, attn_mask, forced, /*grouped_heads=*/true);
  if (!in) return py::none();
  const auto o = attention_options(causal, causal_align, window, softcap, scale, in->q->size(3));
  if (!o) return py::none();
  const auto result = run(*in, *o);
  if (!result) return py::none();
  if (return_lse.ptr() == Py_True) {
    return py::make_tuple(wrap(std::get<0>(*result)), wrap(std::get<1>(*result)));
  }
  return wrap(std::get<0>(*result));
}

// An exact int32 CPU tensor of `dim` dims with plain keys (the KV-cache op's index tensors), or
// null.
const at::Tensor* plain_index(PyObject* obj, int64_t dim) {
  const at::Tensor* t = plain_cpu_tensor(obj);
  return t != nullptr && t->dim() == dim && t->scalar_type() == at::kInt ? t : nullptr;
}

// None, or an index tensor as plain_index takes it; false for anything else.
bool optional_index(py::handle obj, int64_t dim, std::optional<at::Tensor>& out) {
  if (obj.is_none()) return true;
  const at::Tensor* t = plain_index(obj.ptr(), dim);
  if (t != nullptr) out = *t;
  return t != nullptr;
}

using AttentionKvCacheFwd = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, int64_t, int64_t, bool, double);

// fastattn.attention_with_kv_cache's plain calls (no ALiBi; plain CPU tensors, int32 index
// tensors; no input requiring grad). The op checks every shape and value before it writes
// anything (csrc/attention/attention_cpu.cpp), and the Python path makes the same op call after
// checks of its own that raise where the op would: so where the op raises, nothing was written,
// and the call goes to the Python path, which raises its own error (type and message) for it.
py::object kv_cache_entry(py::handle query, py::handle k_cache, py::handle v_cache,
                          py::handle cache_seqlens, py::handle k_new, py::handle v_new,
                          py::handle block_table, py::handle cache_batch_idx, py::handle causal,
                          py::handle causal_align, py::handle window, py::handle softcap,
                          py::handle alibi_slopes, py::handle scale, py::handle return_lse,
                          py::handle forced) {
  if (!alibi_slopes.is_none() || !is_bool(return_lse.ptr()) ||
      k_new.is_none() != v_new.is_none() || !backend_allows_cpu(forced.ptr()) ||
      !nothing_intercepts()) {
    return py::none();
  }
  const at::Tensor* q = plain_operand(query.ptr(), nullptr);
  const at::Tensor* kc = q ? plain_operand(k_cache.ptr(), q) : nullptr;
  const at::Tensor* vc = kc ? plain_operand(v_cache.ptr(), q) : nullptr;
  const at::Tensor* seqlens = vc ? plain_index(cache_seqlens.ptr(), 1) : nullptr;
  if (seqlens == nullptr) return py::none();
  std::optional<at::Tensor> kn, vn, table, batch_idx;
  if (!k_new.is_none()) {
    const at::Tensor* k = plain_operand(k_new.ptr(), q);
    const at::Tensor* v = k ? plain_operand(v_new.ptr(), q) : nullptr;
    if (v == nullptr) return py::none();
    kn = *k, vn = *v;
  }
  if (!optional_index(block_table, 2, table) || !optional_index(cache_batch_idx, 1, batch_idx)) {
    return py::none();
  }
  // The Python path records a node that raises on backward where an input requires grad.
  if (at::GradMode::is_enabled()) {
    const bool new_rows_require_grad = kn && (kn->requires_grad() || vn->requires_grad());
    if (q->requires_grad() || kc->requires_grad() || vc->requires_grad() ||
        new_rows_require_grad) {
      return py::none();
    }
  }
  const auto o = attention_options(causal, causal_align, window, softcap, scale, q->size(3));
  if (!o) return py::none();
  static const auto op =
      eager_entry::op_handle<AttentionKvCacheFwd>("fastattn::attention_kv_cache_fwd");
  std::tuple<at::Tensor, at::Tensor> result;
  try {
    py::gil_scoped_release no_gil;
    // Through autograd's fallback, as the Python path's call under no_grad: it bumps the
    // caches' version counters.
    at::NoGradGuard no_grad;
    result = op.call(*q, *kc, *vc, *seqlens, kn, vn, table, batch_idx, std::nullopt, o->scale,
                     o->window_left, o->window_right, o->bottom_right, o->softcap);
  } catch (const c10::Error&) {
    return py::none();
  }
  if (return_lse.ptr() == Py_True) {
    return py::make_tuple(wrap(std::get<0>(result)), wrap(std::get<1>(result)));
  }
  return wrap(std::get<0>(result));
}

}  // namespace

void bind_attention_eager_entry(py::module_& m) {
  m.def("attention_eager_entry", &sdpa_entry,
        "scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, "
        "enable_gqa) for a plain eager CPU call, given use_backend's forced backend (or None); "
        "None where the call needs the Python path");
  m.def("attention_options_eager_entry", &attention_entry,
        "fastattn.attention(q, k, v, causal, causal_align, window, softcap, alibi_slopes, "
        "attn_mask, dropout_p, scale, return_lse) for a plain eager CPU call, given "
        "use_backend's forced backend (or None); None where the call needs the Python path");
  m.def("attention_kv_cache_eager_entry", &kv_cache_entry,
        "fastattn.attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, "
        "block_table, cache_batch_idx, causal, causal_align, window, softcap, alibi_slopes, "
        "scale, return_lse) for a plain eager CPU call, given use_backend's forced backend (or "
        "None); None where the call needs the Python path");
}

}  // namespace fastattn
