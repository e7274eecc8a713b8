// Argument checks shared by the CPU and CUDA glue of the sequence-level LSTM ops: the shapes and options
// of one layer-direction call (schemas and semantics: fastattn/ops/_registry.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "fastattn/lstm_cpu.h"

namespace fastattn {
namespace lstm_glue {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline Dtype lstm_dtype(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::Float32;
    case at::kDouble: return Dtype::Float64;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Float16;
    default:
      TORCH_CHECK(false, op, ": expected float32, float64, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

inline void check_like(const Tensor& t, const Tensor& like, at::IntArrayRef shape, const char* op,
                       const char* name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              " (the device of the op's first tensor), got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

inline const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

struct LayerProblem {
  int64_t T, B, H, P;
  bool reverse;
  std::vector<int64_t> batch_sizes;  // rows that step at each time t (all B without packing)
  Tensor w_hr;                       // [P, H] or undefined
  Tensor zoneout_c, zoneout_h;       // contiguous [T, B, H] / [T, B, P] or undefined

  LstmLayerShape shape(Dtype dtype) const {
    return {dtype, T, B, H, P, reverse, batch_sizes.data()};
  }
  // Time index of the s-th step in processing order, and where that step's previous state is.
  int64_t time(int64_t s) const { return reverse ? T - 1 - s : s; }
  Tensor prev(const Tensor& all, const Tensor& first, int64_t s) const {
    if (s == 0) return first;
    return all[reverse ? time(s) + 1 : time(s) - 1];
  }
};

// T steps of B rows and H cell units; every tensor is checked against `like`'s dtype.
inline LayerProblem layer_problem(const char* op, const Tensor& like, int64_t T, int64_t B,
                                  int64_t H, const Tensor& h0, const Tensor& c0,
                                  const Tensor& w_hh, const OptTensor& w_hr,
                                  const OptTensor& batch_sizes, bool reverse,
                                  const OptTensor& zoneout_c, const OptTensor& zoneout_h) {
  LayerProblem p;
  p.T = T;
  p.B = B;
  p.H = H;
  p.reverse = reverse;
  if (given(w_hr)) {
    TORCH_CHECK(w_hr->dim() == 2, op, ": w_hr must be [P, H], got ", w_hr->sizes());
    p.P = w_hr->size(0);
    check_like(*w_hr, like, {p.P, p.H}, op, "w_hr");
    // h = w_hr @ hpre would be an empty product; the kernels never write h_all then (and
    // torch's nn.LSTM needs proj_size < hidden_size, so no module reaches this).
    TORCH_CHECK(p.H > 0 || p.P == 0, op, ": a projection w_hr [P, H] needs H > 0, got ",
                w_hr->sizes());
    p.w_hr = *w_hr;
  } else {
    p.P = p.H;
  }
  check_like(h0, like, {p.B, p.P}, op, "h0");
  check_like(c0, like, {p.B, p.H}, op, "c0");
  check_like(w_hh, like, {4 * p.H, p.P}, op, "w_hh");
  if (given(zoneout_c)) {
    check_like(*zoneout_c, like, {p.T, p.B, p.H}, op, "zoneout_c");
    p.zoneout_c = zoneout_c->contiguous();
  }
  if (given(zoneout_h)) {
    check_like(*zoneout_h, like, {p.T, p.B, p.P}, op, "zoneout_h");
    p.zoneout_h = zoneout_h->contiguous();
  }
  p.batch_sizes.assign(p.T, p.B);
  if (given(batch_sizes)) {
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

// `gates_like` is any [T, B, 4H] tensor of the call (x_proj forward, a saved one backward).
inline LayerProblem layer_problem(const char* op, const Tensor& gates_like, const Tensor& h0,
                                  const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr,
                                  const OptTensor& batch_sizes, bool reverse,
                                  const OptTensor& zoneout_c, const OptTensor& zoneout_h) {
  TORCH_CHECK(gates_like.dim() == 3 && gates_like.size(2) % 4 == 0, op,
              ": x_proj must be [T, B, 4H], got ", gates_like.sizes());
  lstm_dtype(gates_like, op);
  check_like(gates_like, gates_like, gates_like.sizes(), op, "x_proj");
  return layer_problem(op, gates_like, gates_like.size(0), gates_like.size(1),
                       gates_like.size(2) / 4, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                       zoneout_h);
}

}  // namespace lstm_glue
}  // namespace fastattn
