// CPU LSTM pointwise kernels: one fused pass per time step over the gate and state rows.
// Compiled once per x86 ISA (see csrc/include/fastattn/cpu_isa.h); at::vec::Vectorized is
// 8 floats wide in the AVX2 build. The glue (lstm_cpu.cpp) runs the GEMMs around them.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fastattn/lstm_cpu.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}

// tanh(x) = 2 * sigmoid(2x) - 1: one exp and one division cost about a third of the vectorized
// library tanh here; the absolute error near 0 stays at the dtype's rounding step.
template <typename T>
inline Vec<T> tanh(const Vec<T>& x) {
  const Vec<T> one(T(1)), two(T(2));
  return two / (one + (x * Vec<T>(T(-2))).exp()) - one;
}

// The math on one row, on opmath (float or double) data. Row layouts as in lstm_cpu.h.
template <typename T>
void step_fwd_row(int64_t H, const T* gates, T* gates_act, const T* c_prev, T* c_out, T* h_out,
                  const T* zoneout_c, const T* zoneout_h, const T* h_prev) {
  for (int64_t j = 0; j < H; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), H - j);
    auto load = [&](const T* p) { return Vec<T>::loadu(p + j, n); };
    const Vec<T> i = sigmoid(load(gates));
    const Vec<T> f = sigmoid(load(gates + H));
    const Vec<T> g = tanh(load(gates + 2 * H));
    const Vec<T> o = sigmoid(load(gates + 3 * H));
    if (gates_act != nullptr) {
      i.store(gates_act + j, n);
      f.store(gates_act + H + j, n);
      g.store(gates_act + 2 * H + j, n);
      o.store(gates_act + 3 * H + j, n);
    }
    const Vec<T> cp = load(c_prev);
    const Vec<T> c_new = f * cp + i * g;
    const Vec<T> h_new = o * tanh(c_new);
    // z * prev + (1 - z) * new, written as new + z * (prev - new)
    const Vec<T> c = zoneout_c ? c_new + load(zoneout_c) * (cp - c_new) : c_new;
    const Vec<T> h = zoneout_h ? h_new + load(zoneout_h) * (load(h_prev) - h_new) : h_new;
    c.store(c_out + j, n);
    h.store(h_out + j, n);
  }
}

template <typename T>
void step_bwd_row(int64_t H, const T* grad_h, const T* grad_h_extra, const T* grad_c,
                  const T* grad_c_extra, const T* gates, bool gates_preactivation,
                  const T* c_prev, const T* c_new, const T* zoneout_c, const T* zoneout_h,
                  T* grad_gates, T* grad_c_prev, T* grad_h_prev) {
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), H - j);
    auto load = [&](const T* p) { return Vec<T>::loadu(p + j, n); };
    Vec<T> i = load(gates), f = load(gates + H), g = load(gates + 2 * H), o = load(gates + 3 * H);
    if (gates_preactivation) {
      i = sigmoid(i);
      f = sigmoid(f);
      g = tanh(g);
      o = sigmoid(o);
    }
    Vec<T> dh = load(grad_h);
    if (grad_h_extra) dh = dh + load(grad_h_extra);
    if (zoneout_h) {
      const Vec<T> to_prev = load(zoneout_h) * dh;
      dh = dh - to_prev;
      to_prev.store(grad_h_prev + j, n);
    }
    Vec<T> dc_total = load(grad_c);
    if (grad_c_extra) dc_total = dc_total + load(grad_c_extra);
    const Vec<T> cp = load(c_prev);
    const Vec<T> cn = c_new ? load(c_new) : f * cp + i * g;
    const Vec<T> tc = tanh(cn);
    Vec<T> dc_to_prev(T(0));
    Vec<T> dc_new = dc_total;
    if (zoneout_c) {
      dc_to_prev = load(zoneout_c) * dc_total;
      dc_new = dc_total - dc_to_prev;
    }
    dc_new = dc_new + dh * o * (one - tc * tc);
    (dc_new * g * i * (one - i)).store(grad_gates + j, n);
    (dc_new * cp * f * (one - f)).store(grad_gates + H + j, n);
    (dc_new * i * (one - g * g)).store(grad_gates + 2 * H + j, n);
    (dh * tc * o * (one - o)).store(grad_gates + 3 * H + j, n);
    (dc_new * f + dc_to_prev).store(grad_c_prev + j, n);
  }
}

// Rows of bfloat16/float16 data are converted to float scratch rows around the float math.
template <typename scalar_t>
struct RowScratch {
  using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static constexpr bool kDirect = std::is_same_v<scalar_t, opmath_t>;
  std::vector<opmath_t> buffer;
  int64_t used = 0;

  explicit RowScratch(int64_t elements) : buffer(kDirect ? 0 : elements) {}
  void reset() { used = 0; }
  opmath_t* take(int64_t n) {
    opmath_t* p = buffer.data() + used;
    used += n;
    return p;
  }
  // The row as opmath data: the row itself, or a converted copy.
  const opmath_t* in(const void* data, int64_t row, int64_t width) {
    if (data == nullptr) return nullptr;
    const scalar_t* p = static_cast<const scalar_t*>(data) + row * width;
    if constexpr (kDirect) {
      return p;
    } else {
      opmath_t* dst = take(width);
      at::vec::convert(p, dst, width);
      return dst;
    }
  }
  // Where the math writes the row: the row itself, or a scratch row flushed by out_done.
  opmath_t* out(void* data, int64_t row, int64_t width) {
    if (data == nullptr) return nullptr;
    scalar_t* p = static_cast<scalar_t*>(data) + row * width;
    if constexpr (kDirect) {
      return p;
    } else {
      return take(width);
    }
  }
  void out_done(opmath_t* src, void* data, int64_t row, int64_t width) {
    if constexpr (!kDirect) {
      if (src != nullptr) at::vec::convert(src, static_cast<scalar_t*>(data) + row * width, width);
    }
  }
};

// Rows per task: enough elements that a thread's share outweighs the fork cost.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

template <typename scalar_t>
void step_fwd(const LstmStepFwdArgs& a) {
  const int64_t H = a.hidden;
  at::parallel_for(0, a.rows, row_grain(H), [&](int64_t begin, int64_t end) {
    RowScratch<scalar_t> s(16 * H);
    for (int64_t b = begin; b < end; ++b) {
      s.reset();
      auto* gates = s.in(a.gates, b, 4 * H);
      auto* c_prev = s.in(a.c_prev, b, H);
      auto* zc = s.in(a.zoneout_c, b, H);
      auto* zh = s.in(a.zoneout_h, b, H);
      auto* h_prev = a.zoneout_h ? s.in(a.h_prev, b, H) : nullptr;
      auto* gates_act = s.out(a.gates_act, b, 4 * H);
      auto* c_out = s.out(a.c_out, b, H);
      auto* h_out = s.out(a.h_out, b, H);
      step_fwd_row(H, gates, gates_act, c_prev, c_out, h_out, zc, zh, h_prev);
      s.out_done(gates_act, a.gates_act, b, 4 * H);
      s.out_done(c_out, a.c_out, b, H);
      s.out_done(h_out, a.h_out, b, H);
    }
  });
}

template <typename scalar_t>
void step_bwd(const LstmStepBwdArgs& a) {
  const int64_t H = a.hidden;
  at::parallel_for(0, a.rows, row_grain(H), [&](int64_t begin, int64_t end) {
    RowScratch<scalar_t> s(24 * H);
    for (int64_t b = begin; b < end; ++b) {
      s.reset();
      auto* grad_h = s.in(a.grad_h, b, H);
      auto* grad_h_extra = s.in(a.grad_h_extra, b, H);
      auto* grad_c = s.in(a.grad_c, b, H);
      auto* grad_c_extra = s.in(a.grad_c_extra, b, H);
      auto* gates = s.in(a.gates, b, 4 * H);
      auto* c_prev = s.in(a.c_prev, b, H);
      auto* c_new = s.in(a.c_new, b, H);
      auto* zc = s.in(a.zoneout_c, b, H);
      auto* zh = s.in(a.zoneout_h, b, H);
      auto* grad_gates = s.out(a.grad_gates, b, 4 * H);
      auto* grad_c_prev = s.out(a.grad_c_prev, b, H);
      auto* grad_h_prev = a.zoneout_h ? s.out(a.grad_h_prev, b, H) : nullptr;
      step_bwd_row(H, grad_h, grad_h_extra, grad_c, grad_c_extra, gates, a.gates_preactivation,
                   c_prev, c_new, zc, zh, grad_gates, grad_c_prev, grad_h_prev);
      s.out_done(grad_gates, a.grad_gates, b, 4 * H);
      s.out_done(grad_c_prev, a.grad_c_prev, b, H);
      if (a.zoneout_h) s.out_done(grad_h_prev, a.grad_h_prev, b, H);
    }
  });
}

template <template <typename> class Fn, typename Args>
void dispatch(const Args& a) {
  switch (a.dtype) {
    case LstmDtype::Float32: return Fn<float>::run(a);
    case LstmDtype::Float64: return Fn<double>::run(a);
    case LstmDtype::BFloat16: return Fn<c10::BFloat16>::run(a);
    case LstmDtype::Float16: return Fn<c10::Half>::run(a);
  }
}

template <typename scalar_t>
struct StepFwd {
  static void run(const LstmStepFwdArgs& a) { step_fwd<scalar_t>(a); }
};
template <typename scalar_t>
struct StepBwd {
  static void run(const LstmStepBwdArgs& a) { step_bwd<scalar_t>(a); }
};

}  // namespace

void lstm_step_fwd_kernel(const LstmStepFwdArgs& args) { dispatch<StepFwd>(args); }
void lstm_step_bwd_kernel(const LstmStepBwdArgs& args) { dispatch<StepBwd>(args); }

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
