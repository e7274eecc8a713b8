// CPU LayerNorm-LSTM row kernels: per time step, one fused pass per batch row over the
// recurrent GEMM row (its LayerNorm over 4H), the gates, the cell (its LayerNorm over H) and h;
// and the matching backward. Compiled once per x86 ISA (csrc/include/fastattn/cpu_isa.h); the
// glue (lstm_layer_norm_cpu.cpp) runs the GEMMs around them.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "fastattn/cpu_activations.h"
#include "fastattn/lstm_layer_norm_cpu.h"
#include "lstm_dtype_dispatch.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// The first n lanes of v, zeros after them: keeps a row's tail out of its sums.
template <typename T>
inline Vec<T> head(const Vec<T>& v, int64_t n) {
  return n == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, n);
}

template <typename T>
inline T reduce_add(const Vec<T>& v) {
  __at_align__ T lanes[Vec<T>::size()];
  v.store(lanes);
  T sum = T(0);
  for (int64_t k = 0; k < Vec<T>::size(); ++k) sum += lanes[k];
  return sum;
}

// Two passes (mean, then the mean square deviation): no cancellation for rows far from zero.
template <typename T>
void row_moments(const T* x, int64_t width, T eps, T& mean, T& rstd) {
  Vec<T> sum(T(0));
  for (int64_t j = 0; j < width; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), width - j);
    sum = sum + head(Vec<T>::loadu(x + j, n), n);
  }
  mean = reduce_add(sum) / T(width);
  Vec<T> squares(T(0));
  for (int64_t j = 0; j < width; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), width - j);
    const Vec<T> d = head(Vec<T>::loadu(x + j, n) - Vec<T>(mean), n);
    squares = squares + d * d;
  }
  rstd = T(1) / std::sqrt(reduce_add(squares) / T(width) + eps);
}

// The math on one row, on opmath data. Layouts and semantics: lstm_layer_norm_cpu.h.
template <typename T>
void ln_step_fwd_row(int64_t H, T eps, const T* x_proj, const T* hh, T* hh_norm,
                     const T* ln_hh_weight, const T* ln_c_weight, const T* ln_c_bias,
                     const T* c_prev, const T* zoneout_c, const T* zoneout_h, const T* h_prev,
                     T* gates_act, T* c_norm, T* rstd, T* c_out, T* h_out) {
  T hh_mean, hh_rstd;
  row_moments(hh, 4 * H, eps, hh_mean, hh_rstd);
  for (int64_t j = 0; j < H; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), H - j);
    auto load = [&](const T* p) { return Vec<T>::loadu(p + j, n); };
    auto gate = [&](int64_t k) {  // pre-activation of chunk k; stores hh_norm's chunk on the way
      const Vec<T> a = (load(hh + k * H) - Vec<T>(hh_mean)) * Vec<T>(hh_rstd);
      a.store(hh_norm + k * H + j, n);
      return load(x_proj + k * H) + a * load(ln_hh_weight + k * H);
    };
    const Vec<T> i = sigmoid(gate(0)), f = sigmoid(gate(1)), g = tanh(gate(2));
    const Vec<T> o = sigmoid(gate(3));
    i.store(gates_act + j, n);
    f.store(gates_act + H + j, n);
    g.store(gates_act + 2 * H + j, n);
    o.store(gates_act + 3 * H + j, n);
    (f * load(c_prev) + i * g).store(c_norm + j, n);  // the cell before its LN, for now
  }
  T c_mean, c_rstd;
  row_moments(c_norm, H, eps, c_mean, c_rstd);
  for (int64_t j = 0; j < H; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), H - j);
    auto load = [&](const T* p) { return Vec<T>::loadu(p + j, n); };
    const Vec<T> cn = (load(c_norm) - Vec<T>(c_mean)) * Vec<T>(c_rstd);
    cn.store(c_norm + j, n);
    const Vec<T> c_new = cn * load(ln_c_weight) + load(ln_c_bias);
    const Vec<T> h_new = load(gates_act + 3 * H) * tanh(c_new);
    // z * prev + (1 - z) * new, written as new + z * (prev - new)
    const Vec<T> c = zoneout_c ? c_new + load(zoneout_c) * (load(c_prev) - c_new) : c_new;
    const Vec<T> h = zoneout_h ? h_new + load(zoneout_h) * (load(h_prev) - h_new) : h_new;
    c.store(c_out + j, n);
    h.store(h_out + j, n);
  }
  rstd[0] = hh_rstd;
  rstd[1] = c_rstd;
}

// LayerNorm backward without affine, given the normalized row y and its rstd:
// dx = rstd * (dy - mean(dy) - y * mean(dy * y)). Passes 1-2 do it for the cell (over H),
// passes 3-4 for hh (over 4H). grad_h_prev may alias grad_h, grad_c_prev may alias grad_c:
// each pass reads an element before it writes the element's alias.
template <typename T>
void ln_step_bwd_row(int64_t H, const T* grad_h, const T* grad_h_extra, const T* grad_c,
                     const T* grad_c_extra, const T* ln_hh_weight, const T* ln_c_weight,
                     const T* ln_c_bias, const T* gates_act, const T* hh_norm, const T* c_norm,
                     const T* rstd, const T* c_prev, const T* zoneout_c, const T* zoneout_h,
                     T* grad_gates, T* grad_hh, T* grad_c_new, T* grad_c_prev, T* grad_h_prev) {
  const Vec<T> one(T(1));
  Vec<T> sum_dy(T(0)), sum_dy_y(T(0));
  for (int64_t j = 0; j < H; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), H - j);
    auto load = [&](const T* p) { return Vec<T>::loadu(p + j, n); };
    Vec<T> dh = load(grad_h);
    if (grad_h_extra) dh = dh + load(grad_h_extra);
    if (zoneout_h) {
      const Vec<T> to_prev = load(zoneout_h) * dh;
      dh = dh - to_prev;
      to_prev.store(grad_h_prev + j, n);
    }
    Vec<T> dc = load(grad_c);
    if (grad_c_extra) dc = dc + load(grad_c_extra);
    if (zoneout_c) dc = dc - load(zoneout_c) * dc;
    const Vec<T> cn = load(c_norm), w = load(ln_c_weight);
    const Vec<T> tc = tanh(cn * w + load(ln_c_bias));
    const Vec<T> o = load(gates_act + 3 * H);
    const Vec<T> dc_new = dc + dh * o * (one - tc * tc);
    dc_new.store(grad_c_new + j, n);
    (dh * tc * o * (one - o)).store(grad_gates + 3 * H + j, n);
    const Vec<T> dy = head(dc_new * w, n);
    sum_dy = sum_dy + dy;
    sum_dy_y = sum_dy_y + dy * cn;
  }
  const Vec<T> c_mean_dy(reduce_add(sum_dy) / T(H)), c_mean_dy_y(reduce_add(sum_dy_y) / T(H));
  const Vec<T> c_rstd(rstd[1]);
  for (int64_t j = 0; j < H; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), H - j);
    auto load = [&](const T* p) { return Vec<T>::loadu(p + j, n); };
    const Vec<T> dy = load(grad_c_new) * load(ln_c_weight);
    const Vec<T> d_cell = (dy - c_mean_dy - load(c_norm) * c_mean_dy_y) * c_rstd;
    const Vec<T> i = load(gates_act), f = load(gates_act + H), g = load(gates_act + 2 * H);
    const Vec<T> cp = load(c_prev);
    (d_cell * g * i * (one - i)).store(grad_gates + j, n);
    (d_cell * cp * f * (one - f)).store(grad_gates + H + j, n);
    (d_cell * i * (one - g * g)).store(grad_gates + 2 * H + j, n);
    Vec<T> dc_prev = d_cell * f;
    if (zoneout_c) {
      Vec<T> dc = load(grad_c);
      if (grad_c_extra) dc = dc + load(grad_c_extra);
      dc_prev = dc_prev + load(zoneout_c) * dc;
    }
    dc_prev.store(grad_c_prev + j, n);
  }
  const int64_t G = 4 * H;
  sum_dy = Vec<T>(T(0));
  sum_dy_y = Vec<T>(T(0));
  for (int64_t j = 0; j < G; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), G - j);
    const Vec<T> dy = head(Vec<T>::loadu(grad_gates + j, n) * Vec<T>::loadu(ln_hh_weight + j, n), n);
    sum_dy = sum_dy + dy;
    sum_dy_y = sum_dy_y + dy * Vec<T>::loadu(hh_norm + j, n);
  }
  const Vec<T> hh_mean_dy(reduce_add(sum_dy) / T(G)), hh_mean_dy_y(reduce_add(sum_dy_y) / T(G));
  const Vec<T> hh_rstd(rstd[0]);
  for (int64_t j = 0; j < G; j += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), G - j);
    const Vec<T> dy = Vec<T>::loadu(grad_gates + j, n) * Vec<T>::loadu(ln_hh_weight + j, n);
    ((dy - hh_mean_dy - Vec<T>::loadu(hh_norm + j, n) * hh_mean_dy_y) * hh_rstd)
        .store(grad_hh + j, n);
  }
}

// Rows of bfloat16/float16 data are converted to float scratch rows around the float math;
// float32/float64 rows are used in place.
template <typename scalar_t>
struct OpmathRows {
  using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static constexpr bool kDirect = std::is_same_v<scalar_t, opmath_t>;
  std::vector<opmath_t> buffer;
  int64_t used = 0;

  explicit OpmathRows(int64_t elements) : buffer(kDirect ? 0 : elements) {}
  void reset() { used = 0; }
  const opmath_t* in(const void* data, int64_t row, int64_t width) {
    if (data == nullptr) return nullptr;
    const scalar_t* p = static_cast<const scalar_t*>(data) + row * width;
    if constexpr (kDirect) {
      return p;
    } else {
      opmath_t* dst = buffer.data() + used;
      used += width;
      at::vec::convert(p, dst, width);
      return dst;
    }
  }
  opmath_t* out(void* data, int64_t row, int64_t width) {
    if (data == nullptr) return nullptr;
    if constexpr (kDirect) {
      return static_cast<scalar_t*>(data) + row * width;
    } else {
      opmath_t* dst = buffer.data() + used;
      used += width;
      return dst;
    }
  }
  // Writes a scratch row from out() back to the data (nothing to do for in-place rows).
  void flush(const opmath_t* src, void* data, int64_t row, int64_t width) {
    if constexpr (!kDirect) {
      if (src != nullptr) at::vec::convert(src, static_cast<scalar_t*>(data) + row * width, width);
    }
  }
};

// Rows per task: enough elements that a thread's share outweighs the fork cost.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)); }

// The LayerNorm weights of a step, as opmath rows.
template <typename opmath_t>
struct LnWeights {
  const opmath_t* hh;      // [4H]
  const opmath_t* c;       // [H]
  const opmath_t* c_bias;  // [H]
};

// row(b, scratch, weights) for every row b of a step, in parallel; `scratch` is reset for each
// row and holds `scratch_elements` opmath elements (for its in/out conversions).
template <typename scalar_t, typename Args, typename Row>
void for_each_row(const Args& a, int64_t scratch_elements, const Row& row) {
  using opmath_t = typename OpmathRows<scalar_t>::opmath_t;
  const int64_t H = a.hidden;
  at::parallel_for(0, a.rows, row_grain(H), [&](int64_t begin, int64_t end) {
    OpmathRows<scalar_t> weight_rows(6 * H);
    const LnWeights<opmath_t> weights{weight_rows.in(a.ln_hh_weight, 0, 4 * H),
                                      weight_rows.in(a.ln_c_weight, 0, H),
                                      weight_rows.in(a.ln_c_bias, 0, H)};
    OpmathRows<scalar_t> scratch(scratch_elements);
    for (int64_t b = begin; b < end; ++b) {
      scratch.reset();
      row(b, scratch, weights);
    }
  });
}

template <typename scalar_t>
void ln_step_fwd(const LstmLnStepFwdArgs& a) {
  using opmath_t = typename OpmathRows<scalar_t>::opmath_t;
  const int64_t H = a.hidden, G = 4 * H;
  for_each_row<scalar_t>(a, 14 * H, [&](int64_t b, OpmathRows<scalar_t>& s,
                                        const LnWeights<opmath_t>& w) {
    const opmath_t* x_proj = s.in(a.x_proj, b, G);
    const opmath_t* hh = s.in(a.hh, b, G);
    const opmath_t* c_prev = s.in(a.c_prev, b, H);
    const opmath_t* zc = s.in(a.zoneout_c, b, H);
    const opmath_t* zh = s.in(a.zoneout_h, b, H);
    const opmath_t* h_prev = a.zoneout_h ? s.in(a.h_prev, b, H) : nullptr;
    opmath_t* hh_norm = static_cast<opmath_t*>(a.hh_norm) + b * G;
    opmath_t* gates_act = static_cast<opmath_t*>(a.gates_act) + b * G;
    opmath_t* c_norm = static_cast<opmath_t*>(a.c_norm) + b * H;
    opmath_t* c_out = s.out(a.c_out, b, H);
    opmath_t* h_out = s.out(a.h_out, b, H);
    ln_step_fwd_row(H, opmath_t(a.eps), x_proj, hh, hh_norm, w.hh, w.c, w.c_bias, c_prev, zc, zh,
                    h_prev, gates_act, c_norm, static_cast<opmath_t*>(a.rstd) + 2 * b, c_out,
                    h_out);
    s.flush(c_out, a.c_out, b, H);
    s.flush(h_out, a.h_out, b, H);
  });
}

template <typename scalar_t>
void ln_step_bwd(const LstmLnStepBwdArgs& a) {
  using opmath_t = typename OpmathRows<scalar_t>::opmath_t;
  const int64_t H = a.hidden, G = 4 * H;
  for_each_row<scalar_t>(a, 9 * H, [&](int64_t b, OpmathRows<scalar_t>& s,
                                       const LnWeights<opmath_t>& w) {
    const opmath_t* grad_h = static_cast<const opmath_t*>(a.grad_h) + b * H;
    const opmath_t* grad_h_extra = s.in(a.grad_h_extra, b, H);
    const opmath_t* grad_c = static_cast<const opmath_t*>(a.grad_c) + b * H;
    const opmath_t* grad_c_extra = s.in(a.grad_c_extra, b, H);
    const opmath_t* gates_act = static_cast<const opmath_t*>(a.gates_act) + b * G;
    const opmath_t* hh_norm = static_cast<const opmath_t*>(a.hh_norm) + b * G;
    const opmath_t* c_norm = static_cast<const opmath_t*>(a.c_norm) + b * H;
    const opmath_t* c_prev = s.in(a.c_prev, b, H);
    const opmath_t* zc = s.in(a.zoneout_c, b, H);
    const opmath_t* zh = s.in(a.zoneout_h, b, H);
    opmath_t* grad_gates = s.out(a.grad_gates, b, G);
    opmath_t* grad_hh = static_cast<opmath_t*>(a.grad_hh) + b * G;
    opmath_t* grad_c_new = static_cast<opmath_t*>(a.grad_c_new) + b * H;
    opmath_t* grad_c_prev = static_cast<opmath_t*>(a.grad_c_prev) + b * H;
    opmath_t* grad_h_prev = a.zoneout_h ? static_cast<opmath_t*>(a.grad_h_prev) + b * H : nullptr;
    ln_step_bwd_row(H, grad_h, grad_h_extra, grad_c, grad_c_extra, w.hh, w.c, w.c_bias, gates_act,
                    hh_norm, c_norm, static_cast<const opmath_t*>(a.rstd) + 2 * b, c_prev, zc, zh,
                    grad_gates, grad_hh, grad_c_new, grad_c_prev, grad_h_prev);
    s.flush(grad_gates, a.grad_gates, b, G);
  });
}

}  // namespace

void lstm_ln_step_fwd_kernel(const LstmLnStepFwdArgs& args) {
  visit_lstm_dtype(args.dtype, [&](auto type) { ln_step_fwd<decltype(type)>(args); });
}
void lstm_ln_step_bwd_kernel(const LstmLnStepBwdArgs& args) {
  visit_lstm_dtype(args.dtype, [&](auto type) { ln_step_bwd<decltype(type)>(args); });
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
