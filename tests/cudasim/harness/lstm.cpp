// LSTM kernels under cudasim through their launchers (the ones csrc/lstm/lstm_cuda.cpp
// calls): launch_lstm_cell_fwd / _bwd, launch_lstm_step_fwd / _bwd and
// launch_lstm_projection_fwd / _bwd (csrc/lstm/lstm_cell.cu: pointwise, 16-byte vector and
// scalar paths, every layer option, the LayerNorm-LSTM step) and launch_lstm_sequence_fwd / _bwd
// (csrc/lstm/lstm_sequence.cu: persistent kernels, cooperative launch, grid.sync per step; every
// block on its own OS thread), against float64 references; the backward's reference is itself
// checked against central differences of a float64 forward. The cell backward is the gradient of the cell forward (its inputs:
// gates, cx; its outputs' gradients: hy, cy).
#include "lstm/lstm_cell.cu"
#include "lstm/lstm_sequence.cu"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>

#include "harness.h"

CUDASIM_DEFINE_DYNAMIC_SMEM(fastattn::lstm, smem_raw, 227 * 1024)

using fastattn::Dtype;
using harness::Err;
using harness::from_d;
using harness::to_d;

namespace {

template <typename T> constexpr Dtype dtype_of();
template <> constexpr Dtype dtype_of<float>() { return Dtype::Float32; }
template <> constexpr Dtype dtype_of<double>() { return Dtype::Float64; }
template <> constexpr Dtype dtype_of<__half>() { return Dtype::Float16; }
template <> constexpr Dtype dtype_of<__nv_bfloat16>() { return Dtype::BFloat16; }
// Tolerance relative to max |ref|: float32 math (float64 for double), then rounding to T.
template <typename T> double tol_of() {
  return std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 2e-6 : std::is_same_v<T, __half> ? 2e-3 : 1.6e-2;
}

double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Cell forward + backward on [B, H], inputs with row stride `pad` elements past the minimum
// (pad != 0 or H not a multiple of the vector width selects the scalar VEC = 1 path).
template <typename T>
bool cell_case(int64_t B, int64_t H, int64_t pad) {
  std::mt19937 rng(99 + B + H);
  const int64_t gs = 4 * H + pad, cs = H + pad;
  std::vector<T> gates = harness::randn<T>(B * gs, rng, 1.5), cx = harness::randn<T>(B * cs, rng);
  std::vector<T> ghy = harness::randn<T>(B * cs, rng), gcy = harness::randn<T>(B * cs, rng);
  std::vector<T> hy = harness::poisoned<T>(B * H), cy = harness::poisoned<T>(B * H);
  std::vector<T> ggates = harness::poisoned<T>(B * 4 * H), gcx = harness::poisoned<T>(B * H);
  fastattn::LstmCellFwdParams f;
  f.dtype = dtype_of<T>();
  f.gates = gates.data(), f.cx = cx.data(), f.hy = hy.data(), f.cy = cy.data();
  f.gates_row_stride = gs, f.cx_row_stride = cs, f.batch = B, f.hidden = H;
  if (fastattn::launch_lstm_cell_fwd(f, nullptr) != cudaSuccess) return false;
  fastattn::LstmCellBwdParams b;
  b.dtype = dtype_of<T>();
  b.grad_hy = ghy.data(), b.grad_cy = gcy.data(), b.gates = gates.data(), b.cx = cx.data(), b.cy = cy.data();
  b.grad_gates = ggates.data(), b.grad_cx = gcx.data();
  b.grad_hy_row_stride = cs, b.grad_cy_row_stride = cs, b.gates_row_stride = gs, b.cx_row_stride = cs;
  b.cy_row_stride = H, b.batch = B, b.hidden = H;
  if (fastattn::launch_lstm_cell_bwd(b, nullptr) != cudaSuccess) return false;
  Err ec, eh, eg, ex;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t u = 0; u < H; ++u) {
      const double i = to_d(gates[r * gs + u]), fg = to_d(gates[r * gs + H + u]), g = to_d(gates[r * gs + 2 * H + u]),
                   o = to_d(gates[r * gs + 3 * H + u]), c0 = to_d(cx[r * cs + u]);
      const double c = sig(fg) * c0 + sig(i) * std::tanh(g), h = sig(o) * std::tanh(c);
      ec.add(c, to_d(cy[r * H + u]));
      eh.add(h, to_d(hy[r * H + u]));
      // Backward from the kernel's own (rounded) cy, as the contract passes it.
      const double cyk = to_d(cy[r * H + u]), tc = std::tanh(cyk);
      const double dh = to_d(ghy[r * cs + u]), dc = to_d(gcy[r * cs + u]) + dh * sig(o) * (1 - tc * tc);
      const double ref[4] = {dc * std::tanh(g) * sig(i) * (1 - sig(i)), dc * c0 * sig(fg) * (1 - sig(fg)),
                             dc * sig(i) * (1 - std::tanh(g) * std::tanh(g)), dh * tc * sig(o) * (1 - sig(o))};
      for (int q = 0; q < 4; ++q) eg.add(ref[q], to_d(ggates[r * 4 * H + q * H + u]));
      ex.add(dc * sig(fg), to_d(gcx[r * H + u]));
    }
  const double tol = tol_of<T>();
  const bool ok = ec.rel() <= tol && eh.rel() <= tol && eg.rel() <= tol && ex.rel() <= tol;
  std::printf("cell %-4s B%lld H%lld pad%lld (%s)  %s  rel err cy %.1e hy %.1e dgates %.1e dcx %.1e (tol %.0e)\n",
              harness::dtype_name<T>(), (long long)B, (long long)H, (long long)pad,
              pad || H % (16 / sizeof(T)) ? "VEC 1" : "VEC 16B", ok ? "OK  " : "FAIL", ec.rel(), eh.rel(), eg.rel(),
              ex.rel(), tol);
  return ok;
}

// Whole-sequence forward; the reference continues from the kernel's own rounded states.
// Values in (0, 1): zoneout weights (Bernoulli draws in training, probabilities in eval).
template <typename T>
std::vector<T> uniform01(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(0.02, 0.98);
  std::vector<T> v(n);
  for (auto& x : v) x = from_d<T>(u(rng));
  return v;
}

// The options the persistent kernels take: the time order, packed rows (rows <
// batch_sizes[t] step at time t, the others carry their state; empty: every row steps), and
// zoneout of c and h (random weights in (0, 1), drawn by each case: zoneout_draws).
struct SequenceOptions {
  bool reverse = false;
  std::vector<int64_t> batch_sizes;
  bool zoneout = false;
  int64_t time(int64_t step, int64_t steps) const { return reverse ? steps - 1 - step : step; }
  bool steps_row(int64_t t, int64_t b) const { return batch_sizes.empty() || b < batch_sizes[t]; }
  const int64_t* device_sizes() const { return batch_sizes.empty() ? nullptr : batch_sizes.data(); }
  std::string label() const {
    return std::string(reverse ? " reverse" : "") + (batch_sizes.empty() ? "" : " packed") +
           (zoneout ? " zoneout" : "");
  }
};

// A case's zoneout weights [T, B, H] rounded to T, or none (empty) without zoneout.
template <typename T>
std::vector<T> zoneout_draws(const SequenceOptions& o, size_t n, std::mt19937& rng) {
  return o.zoneout ? uniform01<T>(n, rng) : std::vector<T>();
}
template <typename T>
const T* data_or_null(const std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

template <typename T>
bool sequence_case(int64_t steps, int64_t B, int64_t H, int sms, const SequenceOptions& o = {}) {
  cudasim::device_sms() = sms;
  std::mt19937 rng(7 + H);
  std::vector<T> x = harness::randn<T>(steps * B * 4 * H, rng), h0 = harness::randn<T>(B * H, rng);
  std::vector<T> c0 = harness::randn<T>(B * H, rng), w = harness::randn<T>(4 * H * H, rng, 1.0 / std::sqrt(double(H)));
  std::vector<T> h_all = harness::poisoned<T>(steps * B * H), c_all = harness::poisoned<T>(steps * B * H);
  std::vector<fastattn::lstm::acc_t<T>> g_all = harness::poisoned<fastattn::lstm::acc_t<T>>(steps * B * 4 * H);
  fastattn::LstmSequenceFwdParams p;
  p.dtype = dtype_of<T>();
  p.x_proj = x.data(), p.h0 = h0.data(), p.c0 = c0.data(), p.w_hh = w.data();
  p.h_all = h_all.data(), p.c_all = c_all.data(), p.gates_all = g_all.data();
  p.seq_len = steps, p.batch = B, p.hidden = H, p.reverse = o.reverse, p.batch_sizes = o.device_sizes();
  const std::vector<T> zc = zoneout_draws<T>(o, steps * B * H, rng), zh = zoneout_draws<T>(o, steps * B * H, rng);
  p.zoneout_c = data_or_null(zc), p.zoneout_h = data_or_null(zh);
  const unsigned long long sw0 = cudasim::rt().switches;
  if (const cudaError_t err = fastattn::launch_lstm_sequence_fwd(p, nullptr); err != cudaSuccess) {
    std::printf("sequence %s: launch error %d\n", harness::dtype_name<T>(), int(err));
    return false;
  }
  Err eh, ec, eg;
  std::vector<T> hp = h0, cp = c0;
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t t = o.time(step, steps);
    std::vector<T> hn(B * H), cn(B * H);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t u = 0; u < H; ++u) {
        double a[4];
        for (int q = 0; q < 4; ++q) {
          double s = to_d(x[(t * B + b) * 4 * H + q * H + u]);
          for (int64_t k = 0; k < H; ++k) s += to_d(w[(q * H + u) * H + k]) * to_d(hp[b * H + k]);
          a[q] = s;
        }
        double gref[4] = {sig(a[0]), sig(a[1]), std::tanh(a[2]), sig(a[3])};
        double c = gref[1] * to_d(cp[b * H + u]) + gref[0] * gref[2], h = gref[3] * std::tanh(c);
        const int64_t s = (t * B + b) * H + u;
        if (!o.steps_row(t, b)) {  // carried: the previous state, zero gates
          c = to_d(cp[b * H + u]), h = to_d(hp[b * H + u]);
          for (double& g : gref) g = 0.0;
        } else if (o.zoneout) {  // h from the cell's c, then both mixed with the previous state
          c += to_d(zc[s]) * (to_d(cp[b * H + u]) - c);
          h += to_d(zh[s]) * (to_d(hp[b * H + u]) - h);
        }
        eh.add(h, to_d(h_all[s]));
        ec.add(c, to_d(c_all[s]));
        for (int q = 0; q < 4; ++q) eg.add(gref[q], to_d(g_all[(t * B + b) * 4 * H + q * H + u]));
        // Continue from the kernel's own states (so one rounding flip does not propagate).
        hn[b * H + u] = h_all[s];
        cn[b * H + u] = c_all[s];
      }
    hp = hn;
    cp = cn;
  }
  const double tol = tol_of<T>() * 2, tol_gates = tol_of<fastattn::lstm::acc_t<T>>() * 2;
  const bool ok = eh.rel() <= tol && ec.rel() <= tol && eg.rel() <= tol_gates;
  std::printf("sequence %-4s T%lld B%lld H%lld%s (%d SMs)  %s  rel err h %.1e c %.1e gates %.1e (tol %.0e)  %llu switches\n",
              harness::dtype_name<T>(), (long long)steps, (long long)B, (long long)H, o.label().c_str(), sms,
              ok ? "OK  " : "FAIL",
              eh.rel(), ec.rel(), eg.rel(), tol, cudasim::rt().switches - sw0);
  return ok;
}

// A float64 LSTM forward over [T, B, 4H] pre-activations: h_all, c_all [T, B, H] and the
// activated gates [T, B, 4H]; w [4H, H] as w_hh.
struct SequenceRef {
  std::vector<double> h, c, gates;
};
SequenceRef forward_f64(const std::vector<double>& x, const std::vector<double>& h0, const std::vector<double>& c0,
                        const std::vector<double>& w, int64_t steps, int64_t B, int64_t H,
                        const SequenceOptions& o, const std::vector<double>& zc, const std::vector<double>& zh) {
  SequenceRef r{std::vector<double>(steps * B * H), std::vector<double>(steps * B * H),
                std::vector<double>(steps * B * 4 * H)};
  const int64_t dir = o.reverse ? -1 : 1;
  for (int64_t step = 0; step < steps; ++step)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t u = 0; u < H; ++u) {
        const int64_t t = o.time(step, steps);
        const double* hp = step == 0 ? &h0[b * H] : &r.h[((t - dir) * B + b) * H];
        const double cp = step == 0 ? c0[b * H + u] : r.c[((t - dir) * B + b) * H + u];
        if (!o.steps_row(t, b)) {  // carried (its gates stay zero)
          r.c[(t * B + b) * H + u] = cp;
          r.h[(t * B + b) * H + u] = hp[u];
          continue;
        }
        double a[4];
        for (int q = 0; q < 4; ++q) {
          double s = x[(t * B + b) * 4 * H + q * H + u];
          for (int64_t k = 0; k < H; ++k) s += w[(q * H + u) * H + k] * hp[k];
          a[q] = q == 2 ? std::tanh(s) : sig(s);
          r.gates[(t * B + b) * 4 * H + q * H + u] = a[q];
        }
        const int64_t e = (t * B + b) * H + u;
        r.c[e] = a[1] * cp + a[0] * a[2];
        r.h[e] = a[3] * std::tanh(r.c[e]);
        if (o.zoneout) {
          r.c[e] += zc[e] * (cp - r.c[e]);
          r.h[e] += zh[e] * (hp[u] - r.h[e]);
        }
      }
  return r;
}

// The backward of forward_f64 (either time order) by the chain rule, from the saved activated gates and c_all (c
// recomputed from them, as the kernels do): grad of the pre-activations [T, B, 4H], h0, c0.
struct SequenceGrads {
  std::vector<double> gates, h0, c0;
};
SequenceGrads backward_f64(const std::vector<double>& gh, const std::vector<double>& gc, const std::vector<double>& c0,
                           const std::vector<double>& c_all, const std::vector<double>& gates,
                           const std::vector<double>& w, int64_t steps, int64_t B, int64_t H,
                           const SequenceOptions& opt, const std::vector<double>& zc, const std::vector<double>& zh) {
  const int64_t G = 4 * H, dir = opt.reverse ? -1 : 1;
  SequenceGrads r{std::vector<double>(steps * B * G), std::vector<double>(B * H), std::vector<double>(B * H, 0.0)};
  std::vector<double> dh_rec(B * H, 0.0);  // the gradient reaching h of a step through the next
  std::vector<double> carried_h(B * H, 0.0);  // past the gates: carried rows, zoneout's share
  for (int64_t step = steps - 1; step >= 0; --step) {
    const int64_t t = opt.time(step, steps);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t u = 0; u < H; ++u) {
        const int64_t e = (t * B + b) * H + u, at = (t * B + b) * G + u;
        if (!opt.steps_row(t, b)) {  // carried: both gradients pass to the previous step unchanged
          r.c0[b * H + u] += gc[e];
          carried_h[b * H + u] += gh[e] + dh_rec[b * H + u];
          continue;
        }
        const double z_c = opt.zoneout ? zc[e] : 0.0, z_h = opt.zoneout ? zh[e] : 0.0;
        const double dh_total = gh[e] + dh_rec[b * H + u] + carried_h[b * H + u], dh = dh_total * (1 - z_h);
        carried_h[b * H + u] = dh_total * z_h;
        const double i = gates[at], f = gates[at + H], g = gates[at + 2 * H], o = gates[at + 3 * H];
        const double cp = step == 0 ? c0[b * H + u] : c_all[e - dir * B * H], tc = std::tanh(f * cp + i * g);
        const double dc_total = gc[e] + r.c0[b * H + u], dc = dc_total * (1 - z_c) + dh * o * (1 - tc * tc);
        r.c0[b * H + u] = dc * f + dc_total * z_c;
        r.gates[at] = dc * g * i * (1 - i);
        r.gates[at + H] = dc * cp * f * (1 - f);
        r.gates[at + 2 * H] = dc * i * (1 - g * g);
        r.gates[at + 3 * H] = dh * tc * o * (1 - o);
      }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < H; ++k) {
        double s = 0.0;
        for (int64_t row = 0; row < G; ++row) s += r.gates[(t * B + b) * G + row] * w[row * H + k];
        dh_rec[b * H + k] = s;
      }
  }
  for (int64_t n = 0; n < B * H; ++n) r.h0[n] = dh_rec[n] + carried_h[n];
  return r;
}

template <typename T>
std::vector<double> as_f64(const std::vector<T>& v) {
  std::vector<double> d(v.size());
  for (size_t n = 0; n < v.size(); ++n) d[n] = to_d(v[n]);
  return d;
}

// Whole-sequence backward: random rounded inputs (activated gates in the math type, as the
// forward saves them), against backward_f64 of the same values. Poisoned outputs.
template <typename T>
bool sequence_bwd_case(int64_t steps, int64_t B, int64_t H, int sms, const SequenceOptions& o = {}) {
  using A = fastattn::lstm::acc_t<T>;
  cudasim::device_sms() = sms;
  std::mt19937 rng(13 + H + B);
  const int64_t G = 4 * H;
  std::vector<T> gh = harness::randn<T>(steps * B * H, rng), gc = harness::randn<T>(steps * B * H, rng);
  std::vector<T> c0 = harness::randn<T>(B * H, rng), c_all = harness::randn<T>(steps * B * H, rng);
  std::vector<T> w = harness::randn<T>(G * H, rng, 1.0 / std::sqrt(double(H)));
  std::vector<A> gates(steps * B * G);
  for (int64_t n = 0; n < steps * B * G; ++n) {
    const double a = 1.5 * std::normal_distribution<double>()(rng);
    gates[n] = from_d<A>(n % G / H == 2 ? std::tanh(a) : sig(a));
  }
  std::vector<A> dg = harness::poisoned<A>(steps * B * G), dh0 = harness::poisoned<A>(B * H);
  std::vector<A> dc0 = harness::poisoned<A>(B * H);
  fastattn::LstmSequenceBwdParams p;
  p.dtype = dtype_of<T>();
  p.grad_h_all = gh.data(), p.grad_c_all = gc.data(), p.c0 = c0.data(), p.c_all = c_all.data();
  p.gates_all = gates.data(), p.w_hh = w.data();
  p.grad_gates_all = dg.data(), p.grad_h0 = dh0.data(), p.grad_c0 = dc0.data();
  p.seq_len = steps, p.batch = B, p.hidden = H, p.reverse = o.reverse, p.batch_sizes = o.device_sizes();
  const std::vector<T> zc = zoneout_draws<T>(o, steps * B * H, rng), zh = zoneout_draws<T>(o, steps * B * H, rng);
  p.zoneout_c = data_or_null(zc), p.zoneout_h = data_or_null(zh);
  const unsigned long long sw0 = cudasim::rt().switches;
  if (const cudaError_t err = fastattn::launch_lstm_sequence_bwd(p, nullptr); err != cudaSuccess) {
    std::printf("sequence bwd %s: launch error %d\n", harness::dtype_name<T>(), int(err));
    return false;
  }
  const SequenceGrads ref = backward_f64(as_f64(gh), as_f64(gc), as_f64(c0), as_f64(c_all), as_f64(gates),
                                         as_f64(w), steps, B, H, o, as_f64(zc), as_f64(zh));
  Err eg, eh, ec;
  for (int64_t n = 0; n < steps * B * G; ++n) eg.add(ref.gates[n], to_d(dg[n]));
  for (int64_t n = 0; n < B * H; ++n) {
    eh.add(ref.h0[n], to_d(dh0[n]));
    ec.add(ref.c0[n], to_d(dc0[n]));
  }
  // Every gradient is computed and kept in A: its rounding (the inputs are exact in A).
  const double tol = tol_of<A>();
  const bool ok = eg.rel() <= tol && eh.rel() <= tol && ec.rel() <= tol;
  std::printf("sequence bwd %-4s T%lld B%lld H%lld%s (%d SMs)  %s  rel err dgates %.1e dh0 %.1e dc0 %.1e (tol %.0e)  %llu switches\n",
              harness::dtype_name<T>(), (long long)steps, (long long)B, (long long)H, o.label().c_str(), sms,
              ok ? "OK  " : "FAIL",
              eg.rel(), eh.rel(), ec.rel(), tol, cudasim::rt().switches - sw0);
  return ok;
}

// The float64 forward kernel then the backward kernel on its saved tensors; the gradients
// against central differences of forward_f64 of L = sum(grad_h * h_all + grad_c * c_all) along
// a random direction of (x_proj, h0, c0). This checks backward_f64's chain rule (and with it
// sequence_bwd_case's reference) independently of it.
bool sequence_bwd_directional_case(int64_t steps, int64_t B, int64_t H, const SequenceOptions& o) {
  cudasim::device_sms() = 4;
  std::mt19937 rng(5 + H);
  const int64_t G = 4 * H, S = steps * B * H;
  const std::vector<double> x = harness::randn<double>(steps * B * G, rng), h0 = harness::randn<double>(B * H, rng);
  const std::vector<double> c0 = harness::randn<double>(B * H, rng);
  const std::vector<double> w = harness::randn<double>(G * H, rng, 1.0 / std::sqrt(double(H)));
  const std::vector<double> gh = harness::randn<double>(S, rng), gc = harness::randn<double>(S, rng);
  std::vector<double> h_all = harness::poisoned<double>(S), c_all = harness::poisoned<double>(S);
  std::vector<double> gates = harness::poisoned<double>(steps * B * G);
  fastattn::LstmSequenceFwdParams f;
  f.dtype = Dtype::Float64;
  f.x_proj = x.data(), f.h0 = h0.data(), f.c0 = c0.data(), f.w_hh = w.data();
  f.h_all = h_all.data(), f.c_all = c_all.data(), f.gates_all = gates.data();
  f.seq_len = steps, f.batch = B, f.hidden = H, f.reverse = o.reverse, f.batch_sizes = o.device_sizes();
  std::vector<double> dg = harness::poisoned<double>(steps * B * G), dh0 = harness::poisoned<double>(B * H);
  std::vector<double> dc0 = harness::poisoned<double>(B * H);
  fastattn::LstmSequenceBwdParams b;
  b.dtype = Dtype::Float64;
  b.grad_h_all = gh.data(), b.grad_c_all = gc.data(), b.c0 = c0.data(), b.c_all = c_all.data();
  b.gates_all = gates.data(), b.w_hh = w.data();
  b.grad_gates_all = dg.data(), b.grad_h0 = dh0.data(), b.grad_c0 = dc0.data();
  b.seq_len = steps, b.batch = B, b.hidden = H, b.reverse = o.reverse, b.batch_sizes = o.device_sizes();
  const std::vector<double> zc = zoneout_draws<double>(o, S, rng), zh = zoneout_draws<double>(o, S, rng);
  f.zoneout_c = b.zoneout_c = data_or_null(zc);
  f.zoneout_h = b.zoneout_h = data_or_null(zh);
  if (fastattn::launch_lstm_sequence_fwd(f, nullptr) != cudaSuccess ||
      fastattn::launch_lstm_sequence_bwd(b, nullptr) != cudaSuccess)
    return false;
  const std::vector<double> vx = harness::randn<double>(x.size(), rng), vh = harness::randn<double>(B * H, rng);
  const std::vector<double> vc = harness::randn<double>(B * H, rng);
  const auto loss = [&](double eps) {
    std::vector<double> xe = x, he = h0, ce = c0;
    for (size_t n = 0; n < xe.size(); ++n) xe[n] += eps * vx[n];
    for (int64_t n = 0; n < B * H; ++n) he[n] += eps * vh[n], ce[n] += eps * vc[n];
    const SequenceRef r = forward_f64(xe, he, ce, w, steps, B, H, o, zc, zh);
    double l = 0.0;
    for (int64_t n = 0; n < S; ++n) l += gh[n] * r.h[n] + gc[n] * r.c[n];
    return l;
  };
  const double eps = 1e-5, numeric = (loss(eps) - loss(-eps)) / (2 * eps);
  double analytic = 0.0, scale = 0.0;
  for (size_t n = 0; n < dg.size(); ++n) analytic += dg[n] * vx[n], scale += std::fabs(dg[n] * vx[n]);
  for (int64_t n = 0; n < B * H; ++n) {
    analytic += dh0[n] * vh[n] + dc0[n] * vc[n];
    scale += std::fabs(dh0[n] * vh[n]) + std::fabs(dc0[n] * vc[n]);
  }
  const double rel = std::fabs(analytic - numeric) / scale;
  const bool ok = rel <= 1e-8;
  std::printf("sequence bwd directional f64 T%lld B%lld H%lld%s  %s  analytic %.12g numeric %.12g rel %.1e (tol 1e-8)\n",
              (long long)steps, (long long)B, (long long)H, o.label().c_str(), ok ? "OK  " : "FAIL", analytic,
              numeric, rel);
  return ok;
}

// A copy of v whose data starts 64-byte aligned: a float32 gradient buffer of a half-precision
// step is read in 8-element (32-byte) vectors, which malloc's 16-byte alignment would not allow.
template <typename T>
struct Aligned64 {
  std::vector<T> storage;
  T* ptr;
  explicit Aligned64(const std::vector<T>& v) : storage(v.size() + 64 / sizeof(T)) {
    void* start = storage.data();
    size_t space = storage.size() * sizeof(T);
    ptr = static_cast<T*>(std::align(64, v.size() * sizeof(T), start, space));
    std::copy(v.begin(), v.end(), ptr);
  }
  T* data() { return ptr; }
  T operator[](size_t i) const { return ptr[i]; }
};

// The options of one layer step (LstmStepFwdParams / LstmStepBwdParams).
struct StepOptions {
  int64_t stepping;  // rows < stepping step, the others carry their state
  bool zoneout_c, zoneout_h, project;
  int64_t pad = 0;   // extra elements per row of the row-strided inputs (selects VEC = 1)
};

const char* vec_path(int64_t H, int64_t pad, size_t bytes) {
  return pad || H % static_cast<int64_t>(16 / bytes) ? "VEC 1" : "VEC 16B";
}

// One forward step with the recurrent GEMM's output `rec` against float64: activations, c, h
// (hpre with projection), zoneout mixing, carried rows, activated gates.
template <typename T>
bool step_fwd_case(int64_t B, int64_t H, StepOptions o) {
  std::mt19937 rng(31 + B * 7 + H);
  const int64_t xs = 4 * H + o.pad, cs = H + o.pad;
  using A = fastattn::lstm::acc_t<T>;  // the recurrent GEMM's output type
  std::vector<T> x = harness::randn<T>(B * xs, rng, 1.5);
  const Aligned64<A> rec(harness::randn<A>(B * 4 * H, rng));
  std::vector<T> cp = harness::randn<T>(B * cs, rng), hp = harness::randn<T>(B * cs, rng);
  std::vector<T> zc = uniform01<T>(B * H, rng), zh = uniform01<T>(B * H, rng);
  std::vector<T> c_out = harness::poisoned<T>(B * H), h_out = harness::poisoned<T>(B * H);
  Aligned64<A> g_out(harness::poisoned<A>(B * 4 * H));  // the saved gates, in the math type
  fastattn::LstmStepFwdParams p;
  p.dtype = dtype_of<T>();
  p.x_proj = x.data(), p.rec = rec.ptr, p.c_prev = cp.data();
  p.h_prev = o.project ? nullptr : hp.data();
  p.zoneout_c = o.zoneout_c ? zc.data() : nullptr;
  p.zoneout_h = o.zoneout_h && !o.project ? zh.data() : nullptr;
  p.c_out = c_out.data(), p.h_out = h_out.data(), p.gates_out = g_out.data();
  p.x_proj_row_stride = xs, p.c_prev_row_stride = cs, p.h_prev_row_stride = cs;
  p.batch = B, p.hidden = H, p.stepping = o.stepping, p.project = o.project;
  if (fastattn::launch_lstm_step_fwd(p, nullptr) != cudaSuccess) return false;
  Err ec, eh, eg;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t u = 0; u < H; ++u) {
      const double c_prev = to_d(cp[b * cs + u]), h_prev = to_d(hp[b * cs + u]);
      double act[4] = {0, 0, 0, 0}, c = c_prev, h = o.project ? 0.0 : h_prev;
      if (b < o.stepping) {
        for (int q = 0; q < 4; ++q) {
          const double a = to_d(x[b * xs + q * H + u]) + to_d(rec[b * 4 * H + q * H + u]);
          act[q] = q == 2 ? std::tanh(a) : sig(a);
        }
        c = act[1] * c_prev + act[0] * act[2];
        h = act[3] * std::tanh(c);
        if (o.zoneout_c) c += to_d(zc[b * H + u]) * (c_prev - c);
        if (o.zoneout_h && !o.project) h += to_d(zh[b * H + u]) * (h_prev - h);
      }
      ec.add(c, to_d(c_out[b * H + u]));
      eh.add(h, to_d(h_out[b * H + u]));
      for (int q = 0; q < 4; ++q) eg.add(act[q], to_d(g_out[b * 4 * H + q * H + u]));
    }
  const double tol = tol_of<T>();
  const bool ok = ec.rel() <= tol && eh.rel() <= tol && eg.rel() <= tol_of<A>();  // gates in A
  std::printf("step fwd %-4s B%lld H%lld stepping %lld%s%s%s (%s)  %s  rel err c %.1e h %.1e gates %.1e (tol %.0e)\n",
              harness::dtype_name<T>(), (long long)B, (long long)H, (long long)o.stepping,
              o.zoneout_c ? " zoneout_c" : "", o.zoneout_h ? " zoneout_h" : "", o.project ? " project" : "",
              vec_path(H, o.pad, sizeof(T)), ok ? "OK  " : "FAIL", ec.rel(), eh.rel(), eg.rel(), tol);
  return ok;
}

// One backward step of the layer (activated gates, c recomputed, gradients in G, the carried
// c gradient updated in place as the glue does) against float64.
template <typename T, typename G>
bool step_bwd_case(int64_t B, int64_t H, StepOptions o) {
  std::mt19937 rng(57 + B * 5 + H);
  const int64_t gs = 4 * H + o.pad, cs = H + o.pad;
  using A = fastattn::lstm::acc_t<T>;  // the forward saved the activated gates in it
  std::vector<A> gates0(B * gs);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < gs; ++k) {
      const double a = 1.5 * std::normal_distribution<double>()(rng);
      gates0[b * gs + k] = from_d<A>(k / H == 2 ? std::tanh(a) : sig(a));
    }
  Aligned64<A> gates(gates0);
  std::vector<T> cp = harness::randn<T>(B * cs, rng), gh = harness::randn<T>(B * cs, rng);
  std::vector<T> gc = harness::randn<T>(B * cs, rng);
  std::vector<T> zc = uniform01<T>(B * H, rng), zh = uniform01<T>(B * H, rng);
  const std::vector<G> ghpre0 = harness::randn<G>(B * H, rng), ch0 = harness::randn<G>(B * H, rng);
  const std::vector<G> cc0 = harness::randn<G>(B * H, rng);
  Aligned64<G> ghpre(ghpre0), ch(ch0), cc(cc0), gg(harness::poisoned<G>(B * 4 * H));
  fastattn::LstmStepBwdParams p;
  p.dtype = dtype_of<T>();
  p.grad_dtype = dtype_of<G>();
  p.gates = gates.data(), p.gates_activated = true, p.c_prev = cp.data();
  p.grad_h = o.project ? nullptr : gh.data();
  p.grad_c = gc.data();
  p.grad_hpre = o.project ? ghpre.data() : nullptr;
  p.carried_h = o.project ? nullptr : ch.data();
  p.carried_c = cc.data();
  p.zoneout_c = o.zoneout_c ? zc.data() : nullptr;
  p.zoneout_h = o.zoneout_h && !o.project ? zh.data() : nullptr;
  p.grad_gates = gg.data(), p.grad_c_prev = cc.data();
  p.gates_row_stride = gs, p.c_prev_row_stride = cs, p.grad_h_row_stride = cs, p.grad_c_row_stride = cs;
  p.batch = B, p.hidden = H, p.stepping = o.stepping;
  if (fastattn::launch_lstm_step_bwd(p, nullptr) != cudaSuccess) return false;
  Err egg, edc, edh;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t u = 0; u < H; ++u) {
      const int64_t e = b * H + u;
      const double dct = to_d(gc[b * cs + u]) + to_d(cc0[e]);
      const double dht = o.project ? 0.0 : to_d(gh[b * cs + u]) + to_d(ch0[e]);
      const double z_c = o.zoneout_c ? to_d(zc[e]) : 0.0, z_h = o.zoneout_h && !o.project ? to_d(zh[e]) : 0.0;
      double ref[4] = {0, 0, 0, 0}, dcp = dct, dskip = dht;
      if (b < o.stepping) {
        const double i = to_d(gates[b * gs + u]), f = to_d(gates[b * gs + H + u]);
        const double g = to_d(gates[b * gs + 2 * H + u]), og = to_d(gates[b * gs + 3 * H + u]);
        const double c_prev = to_d(cp[b * cs + u]), c = f * c_prev + i * g, tc = std::tanh(c);
        const double dh = o.project ? to_d(ghpre[e]) : dht * (1 - z_h);
        const double dc = dct * (1 - z_c) + dh * og * (1 - tc * tc);
        ref[0] = dc * g * i * (1 - i), ref[1] = dc * c_prev * f * (1 - f), ref[2] = dc * i * (1 - g * g);
        ref[3] = dh * tc * og * (1 - og);
        dcp = dc * f + dct * z_c;
        dskip = dht * z_h;
      }
      for (int q = 0; q < 4; ++q) egg.add(ref[q], to_d(gg[b * 4 * H + q * H + u]));
      edc.add(dcp, to_d(cc[e]));
      if (!o.project) edh.add(dskip, to_d(ch[e]));
    }
  const double tol = tol_of<G>();
  const bool ok = egg.rel() <= tol && edc.rel() <= tol && edh.rel() <= tol;
  std::printf("step bwd %-4s grads %-4s B%lld H%lld stepping %lld%s%s%s (%s)  %s  rel err dgates %.1e dc %.1e dh %.1e (tol %.0e)\n",
              harness::dtype_name<T>(), harness::dtype_name<G>(), (long long)B, (long long)H, (long long)o.stepping,
              o.zoneout_c ? " zoneout_c" : "", o.zoneout_h ? " zoneout_h" : "", o.project ? " project" : "",
              vec_path(H, o.pad, sizeof(T)), ok ? "OK  " : "FAIL", egg.rel(), edc.rel(), edh.rel(), tol);
  return ok;
}

// The layer's forward step then its backward step, reading the forward's saved gates, where
// the cell gradient cancels: grad_c = -0.97 * dh * o * (1 - tanh^2(c)), so dc = grad_c +
// dh * o * (1 - tanh^2(c)) keeps 3% of its terms and any error of the saved gates reaches dc,
// grad_c_prev and the i, f, g gradients ~33 times magnified. Gates saved rounded to a half
// type gave several percent; saved in the math type they stay at its rounding. Against float64
// of the same (rounded) inputs.
template <typename T>
bool step_cancel_case(int64_t B, int64_t H) {
  using A = fastattn::lstm::acc_t<T>;
  std::mt19937 rng(71 + B * 3 + H);
  const int64_t G = 4 * H;
  std::vector<T> x = harness::randn<T>(B * G, rng, 1.5), cp = harness::randn<T>(B * H, rng);
  const Aligned64<A> rec(harness::randn<A>(B * G, rng));
  std::vector<T> gh = harness::randn<T>(B * H, rng), gc(B * H);
  std::vector<T> c_out = harness::poisoned<T>(B * H), h_out = harness::poisoned<T>(B * H);
  Aligned64<A> gates(harness::poisoned<A>(B * G));  // the saved gates, in the math type
  std::vector<double> act(B * G), dc(B * H);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t u = 0; u < H; ++u) {
      double* a = &act[b * G + u];
      for (int q = 0; q < 4; ++q) {
        const double pre = to_d(x[b * G + q * H + u]) + to_d(rec[b * G + q * H + u]);
        a[q * H] = q == 2 ? std::tanh(pre) : sig(pre);
      }
      const double tc = std::tanh(a[H] * to_d(cp[b * H + u]) + a[0] * a[2 * H]);
      const double cell_term = to_d(gh[b * H + u]) * a[3 * H] * (1 - tc * tc);
      gc[b * H + u] = from_d<T>(-0.97 * cell_term);
      dc[b * H + u] = to_d(gc[b * H + u]) + cell_term;
    }
  fastattn::LstmStepFwdParams f;
  f.dtype = dtype_of<T>();
  f.x_proj = x.data(), f.rec = rec.ptr, f.c_prev = cp.data();
  f.c_out = c_out.data(), f.h_out = h_out.data(), f.gates_out = gates.data();
  f.x_proj_row_stride = G, f.c_prev_row_stride = H, f.batch = B, f.hidden = H, f.stepping = B;
  Aligned64<A> ggates(harness::poisoned<A>(B * G)), gcp(harness::poisoned<A>(B * H));
  fastattn::LstmStepBwdParams p;
  p.dtype = dtype_of<T>();
  p.grad_dtype = dtype_of<A>();
  p.gates = gates.data(), p.gates_activated = true, p.c_prev = cp.data();
  p.grad_h = gh.data(), p.grad_c = gc.data(), p.grad_gates = ggates.data(), p.grad_c_prev = gcp.data();
  p.gates_row_stride = G, p.c_prev_row_stride = H, p.grad_h_row_stride = H, p.grad_c_row_stride = H;
  p.batch = B, p.hidden = H, p.stepping = B;
  if (fastattn::launch_lstm_step_fwd(f, nullptr) != cudaSuccess ||
      fastattn::launch_lstm_step_bwd(p, nullptr) != cudaSuccess)
    return false;
  Err edc, eifg, eo;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t u = 0; u < H; ++u) {
      const double* a = &act[b * G + u];
      const double i = a[0], fg = a[H], g = a[2 * H], o = a[3 * H], d = dc[b * H + u];
      const double tc = std::tanh(fg * to_d(cp[b * H + u]) + i * g);
      eifg.add(d * g * i * (1 - i), to_d(ggates[b * G + u]));
      eifg.add(d * to_d(cp[b * H + u]) * fg * (1 - fg), to_d(ggates[b * G + H + u]));
      eifg.add(d * i * (1 - g * g), to_d(ggates[b * G + 2 * H + u]));
      eo.add(to_d(gh[b * H + u]) * tc * o * (1 - o), to_d(ggates[b * G + 3 * H + u]));
      edc.add(d * fg, to_d(gcp[b * H + u]));
    }
  // The math type's rounding magnified ~33 times by the cancellation, with margin.
  const double tol = std::is_same_v<A, double> ? 1e-12 : 1e-4;
  const bool ok = edc.rel() <= tol && eifg.rel() <= tol && eo.rel() <= tol;
  std::printf("step cancel %-4s B%lld H%lld  %s  rel err dc_prev %.1e dgates i,f,g %.1e o %.1e (tol %.0e)\n",
              harness::dtype_name<T>(), (long long)B, (long long)H, ok ? "OK  " : "FAIL", edc.rel(), eifg.rel(),
              eo.rel(), tol);
  return ok;
}

// The projection's zoneout / carried rows after the h = hpre @ w_hr^T GEMM, and its backward.
template <typename T, typename G>
bool projection_case(int64_t B, int64_t P, int64_t stepping, bool zoneout) {
  std::mt19937 rng(91 + B + P);
  std::vector<T> h = harness::randn<T>(B * P, rng), hp = harness::randn<T>(B * P, rng);
  std::vector<T> z = uniform01<T>(B * P, rng), gh = harness::randn<T>(B * P, rng);
  const std::vector<T> h_new = h;
  for (int64_t e = stepping * P; e < B * P; ++e) h[e] = from_d<T>(NAN);  // rows the GEMM skips
  const std::vector<G> carried0 = harness::randn<G>(B * P, rng);
  std::vector<G> carried = carried0, grad_proj = harness::poisoned<G>(B * P);
  fastattn::LstmProjectionFwdParams f;
  f.dtype = dtype_of<T>();
  f.h = h.data(), f.h_prev = hp.data(), f.zoneout_h = zoneout ? z.data() : nullptr;
  f.batch = B, f.width = P, f.stepping = stepping;
  fastattn::LstmProjectionBwdParams b;
  b.dtype = dtype_of<T>();
  b.grad_dtype = dtype_of<G>();
  b.grad_h = gh.data(), b.zoneout_h = zoneout ? z.data() : nullptr;
  b.carried_h = carried.data(), b.grad_proj = grad_proj.data();
  b.batch = B, b.width = P, b.stepping = stepping;
  if (fastattn::launch_lstm_projection_fwd(f, nullptr) != cudaSuccess ||
      fastattn::launch_lstm_projection_bwd(b, nullptr) != cudaSuccess)
    return false;
  Err eh, ep, ec;
  for (int64_t e = 0; e < B * P; ++e) {
    const bool stepped = e / P < stepping;
    const double zz = zoneout ? to_d(z[e]) : 0.0, hn = to_d(h_new[e]), hpv = to_d(hp[e]);
    eh.add(stepped ? hn + zz * (hpv - hn) : hpv, to_d(h[e]));
    const double total = to_d(carried0[e]) + to_d(gh[e]);
    ep.add(stepped ? total * (1 - zz) : 0.0, to_d(grad_proj[e]));
    ec.add(stepped ? total * zz : total, to_d(carried[e]));
  }
  const double tol = tol_of<T>();
  const bool ok = eh.rel() <= tol && ep.rel() <= tol_of<G>() && ec.rel() <= tol_of<G>();
  std::printf("projection %-4s grads %-4s B%lld P%lld stepping %lld%s  %s  rel err h %.1e grad_proj %.1e carried %.1e\n",
              harness::dtype_name<T>(), harness::dtype_name<G>(), (long long)B, (long long)P, (long long)stepping,
              zoneout ? " zoneout_h" : "", ok ? "OK  " : "FAIL", eh.rel(), ep.rel(), ec.rel());
  return ok;
}

// ---- the LayerNorm-LSTM step (LstmStepLayerNorm) -----------------------------------------

// One row of the LayerNorm step in float64 (LstmStepLayerNorm's math, zoneout, carried rows).
struct LnRow {
  std::vector<double> c_out, h_out, gates, hh_norm, c_norm;
  double rstd[2] = {0, 0};
};

LnRow ln_row_fwd(int64_t H, double eps, bool stepping, bool project, const double* x, const double* rec,
                 const double* cp, const double* hp, const double* zc, const double* zh, const double* w_hh,
                 const double* wc, const double* bc) {
  const int64_t G = 4 * H;
  LnRow r{std::vector<double>(cp, cp + H), std::vector<double>(H, 0.0), std::vector<double>(G, 0.0),
          std::vector<double>(G, 0.0), std::vector<double>(H, 0.0)};
  if (!stepping) {
    if (!project) r.h_out.assign(hp, hp + H);
    return r;
  }
  auto moments = [&](const std::vector<double>& v, double& mean) {
    mean = 0;
    for (double e : v) mean += e;
    mean /= double(v.size());
    double var = 0;
    for (double e : v) var += (e - mean) * (e - mean);
    return 1.0 / std::sqrt(var / double(v.size()) + eps);
  };
  double mean;
  r.rstd[0] = moments(std::vector<double>(rec, rec + G), mean);
  std::vector<double> cell(H);
  for (int64_t k = 0; k < G; ++k) {
    r.hh_norm[k] = (rec[k] - mean) * r.rstd[0];
    const double pre = x[k] + r.hh_norm[k] * w_hh[k];
    r.gates[k] = k / H == 2 ? std::tanh(pre) : sig(pre);
  }
  for (int64_t u = 0; u < H; ++u) cell[u] = r.gates[H + u] * cp[u] + r.gates[u] * r.gates[2 * H + u];
  r.rstd[1] = moments(cell, mean);
  for (int64_t u = 0; u < H; ++u) {
    r.c_norm[u] = (cell[u] - mean) * r.rstd[1];
    const double c = r.c_norm[u] * wc[u] + bc[u], h = r.gates[3 * H + u] * std::tanh(c);
    r.c_out[u] = zc ? c + zc[u] * (cp[u] - c) : c;
    r.h_out[u] = zh && !project ? h + zh[u] * (hp[u] - h) : h;
  }
  return r;
}

// The LayerNorm step forward and backward through launch_lstm_step_fwd / _bwd, as the layer
// ops call them (the backward reads the forward kernel's own saved rows), against float64: the
// forward by ln_row_fwd, every gradient by central differences of ln_row_fwd (an oracle that
// shares no derivation with the kernel) of the loss sum(dc * c_out) + sum(dh * h_out), where dc
// and dh are the incoming plus carried gradients (dh: of hpre with projection).
template <typename T>
bool ln_step_case(int64_t B, int64_t H, StepOptions o) {
  using A = fastattn::lstm::acc_t<T>;
  std::mt19937 rng(43 + B * 11 + H);
  const int64_t G = 4 * H, xs = G + o.pad, cs = H + o.pad;
  const double eps = 1e-5;
  std::vector<T> x = harness::randn<T>(B * xs, rng, 1.5);
  const Aligned64<A> rec(harness::randn<A>(B * G, rng, 2.0));
  std::vector<T> cp = harness::randn<T>(B * cs, rng), hp = harness::randn<T>(B * cs, rng);
  std::vector<T> zc = uniform01<T>(B * H, rng), zh = uniform01<T>(B * H, rng);
  std::vector<T> w_hh = harness::randn<T>(G, rng, 0.3), wc = harness::randn<T>(H, rng, 0.3);
  std::vector<T> bc = harness::randn<T>(H, rng, 0.5);
  for (auto& w : w_hh) w = from_d<T>(1.0 + to_d(w));  // gains away from 1 and 0
  for (auto& w : wc) w = from_d<T>(1.0 + to_d(w));
  std::vector<T> c_out = harness::poisoned<T>(B * H), h_out = harness::poisoned<T>(B * H);
  Aligned64<A> gates(harness::poisoned<A>(B * G)), hh_norm(harness::poisoned<A>(B * G));
  Aligned64<A> c_norm(harness::poisoned<A>(B * H)), rstd(harness::poisoned<A>(B * 2));
  const bool zoneout_h = o.zoneout_h && !o.project;
  fastattn::LstmStepFwdParams f;
  f.dtype = dtype_of<T>();
  f.x_proj = x.data(), f.rec = rec.ptr, f.c_prev = cp.data(), f.h_prev = o.project ? nullptr : hp.data();
  f.zoneout_c = o.zoneout_c ? zc.data() : nullptr, f.zoneout_h = zoneout_h ? zh.data() : nullptr;
  f.c_out = c_out.data(), f.h_out = h_out.data(), f.gates_out = gates.data();
  f.x_proj_row_stride = xs, f.c_prev_row_stride = cs, f.h_prev_row_stride = cs;
  f.batch = B, f.hidden = H, f.stepping = o.stepping, f.project = o.project;
  f.ln = {w_hh.data(), wc.data(), bc.data(), eps};
  f.hh_norm_out = hh_norm.data(), f.c_norm_out = c_norm.data(), f.rstd_out = rstd.data();
  if (fastattn::launch_lstm_step_fwd(f, nullptr) != cudaSuccess) return false;

  std::vector<T> gh = harness::randn<T>(B * cs, rng), gc = harness::randn<T>(B * cs, rng);
  const std::vector<A> ghpre0 = harness::randn<A>(B * H, rng), ch0 = harness::randn<A>(B * H, rng);
  const std::vector<A> cc0 = harness::randn<A>(B * H, rng);
  Aligned64<A> ghpre(ghpre0), ch(ch0), cc(cc0), ggates(harness::poisoned<A>(B * G));
  Aligned64<A> ghh(harness::poisoned<A>(B * G)), gcnew(harness::poisoned<A>(B * H));
  fastattn::LstmStepBwdParams b;
  b.dtype = dtype_of<T>();
  b.grad_dtype = dtype_of<A>();
  b.gates = gates.data(), b.gates_activated = true, b.c_prev = cp.data();
  b.grad_h = o.project ? nullptr : gh.data(), b.grad_c = gc.data();
  b.grad_hpre = o.project ? ghpre.data() : nullptr;
  b.carried_h = o.project ? nullptr : ch.data(), b.carried_c = cc.data();
  b.zoneout_c = f.zoneout_c, b.zoneout_h = f.zoneout_h;
  b.grad_gates = ggates.data(), b.grad_c_prev = cc.data();  // the carried c gradient in place
  b.gates_row_stride = G, b.c_prev_row_stride = cs, b.grad_h_row_stride = cs, b.grad_c_row_stride = cs;
  b.batch = B, b.hidden = H, b.stepping = o.stepping;
  b.ln = f.ln;
  b.hh_norm = hh_norm.data(), b.c_norm = c_norm.data(), b.rstd = rstd.data();
  b.grad_hh = ghh.data(), b.grad_c_new = gcnew.data();
  if (fastattn::launch_lstm_step_bwd(b, nullptr) != cudaSuccess) return false;

  auto row_of = [](const auto& v, int64_t r, int64_t stride, int64_t n) {
    std::vector<double> out(n);
    for (int64_t k = 0; k < n; ++k) out[k] = to_d(v[r * stride + k]);
    return out;
  };
  const std::vector<double> w_hh_d = row_of(w_hh, 0, 0, G), wc_d = row_of(wc, 0, 0, H);
  Err ec, eh, eg, en, ecn, er, egg, ehh, ecp, ech, ecn_new;
  for (int64_t r = 0; r < B; ++r) {
    std::vector<double> xr = row_of(x, r, xs, G), recr = row_of(rec, r, G, G), cpr = row_of(cp, r, cs, H);
    std::vector<double> hpr = row_of(hp, r, cs, H), bcr = row_of(bc, 0, 0, H);
    const std::vector<double> zcr = row_of(zc, r, H, H), zhr = row_of(zh, r, H, H);
    std::vector<double> dc(H), dh(H);
    for (int64_t u = 0; u < H; ++u) {
      dc[u] = to_d(gc[r * cs + u]) + to_d(cc0[r * H + u]);
      dh[u] = o.project ? to_d(ghpre0[r * H + u]) : to_d(gh[r * cs + u]) + to_d(ch0[r * H + u]);
    }
    auto run = [&] {
      return ln_row_fwd(H, eps, r < o.stepping, o.project, xr.data(), recr.data(), cpr.data(), hpr.data(),
                        o.zoneout_c ? zcr.data() : nullptr, zoneout_h ? zhr.data() : nullptr, w_hh_d.data(),
                        wc_d.data(), bcr.data());
    };
    auto loss = [&] {
      const LnRow y = run();
      double l = 0;
      for (int64_t u = 0; u < H; ++u) l += dc[u] * y.c_out[u] + dh[u] * y.h_out[u];
      return l;
    };
    // d loss / d v[k] by central differences.
    auto grad = [&](std::vector<double>& v, int64_t k) {
      const double keep = v[k], step = 1e-6 * std::max(1.0, std::fabs(keep));
      v[k] = keep + step;
      const double up = loss();
      v[k] = keep - step;
      const double down = loss();
      v[k] = keep;
      return (up - down) / (2 * step);
    };
    const LnRow ref = run();
    for (int64_t u = 0; u < H; ++u) {
      ec.add(ref.c_out[u], to_d(c_out[r * H + u]));
      eh.add(ref.h_out[u], to_d(h_out[r * H + u]));
      ecn.add(ref.c_norm[u], to_d(c_norm[r * H + u]));
      ecp.add(grad(cpr, u), to_d(cc[r * H + u]));
      if (!o.project) ech.add(grad(hpr, u), to_d(ch[r * H + u]));
      ecn_new.add(grad(bcr, u), to_d(gcnew[r * H + u]));
    }
    for (int64_t k = 0; k < G; ++k) {
      eg.add(ref.gates[k], to_d(gates[r * G + k]));
      en.add(ref.hh_norm[k], to_d(hh_norm[r * G + k]));
      egg.add(grad(xr, k), to_d(ggates[r * G + k]));
      ehh.add(grad(recr, k), to_d(ghh[r * G + k]));
    }
    for (int k = 0; k < 2; ++k) er.add(ref.rstd[k], to_d(rstd[r * 2 + k]));
  }
  // Outputs in T: T's rounding; saved rows and gradients in A: A's math, plus the central
  // differences' own error for float64.
  const double tol = tol_of<T>(), tol_a = std::is_same_v<A, double> ? 1e-7 : 2e-6;
  const bool fwd_ok = ec.rel() <= tol && eh.rel() <= tol && eg.rel() <= tol_a && en.rel() <= tol_a &&
                      ecn.rel() <= tol_a && er.rel() <= tol_a;
  const bool bwd_ok = egg.rel() <= tol_a && ehh.rel() <= tol_a && ecp.rel() <= tol_a && ech.rel() <= tol_a &&
                      ecn_new.rel() <= tol_a;
  std::printf("ln step %-4s B%lld H%lld stepping %lld%s%s%s pad %lld  %s  rel err c %.1e h %.1e gates %.1e "
              "hh_norm %.1e c_norm %.1e rstd %.1e | dgates %.1e dhh %.1e dc_prev %.1e dh_prev %.1e dc_new %.1e "
              "(tol %.0e, %.0e)\n",
              harness::dtype_name<T>(), (long long)B, (long long)H, (long long)o.stepping,
              o.zoneout_c ? " zoneout_c" : "", o.zoneout_h ? " zoneout_h" : "", o.project ? " project" : "",
              (long long)o.pad, fwd_ok && bwd_ok ? "OK  " : "FAIL", ec.rel(), eh.rel(), eg.rel(), en.rel(), ecn.rel(),
              er.rel(), egg.rel(), ehh.rel(), ecp.rel(), ech.rel(), ecn_new.rel(), tol, tol_a);
  return fwd_ok && bwd_ok;
}

struct Entry {
  const char* name;
  bool (*run)();
};

const Entry kCases[] = {
    {"cell f32 B5 H40", [] { return cell_case<float>(5, 40, 0); }},
    {"cell f64 B3 H34", [] { return cell_case<double>(3, 34, 0); }},
    {"cell f16 B5 H40", [] { return cell_case<__half>(5, 40, 0); }},
    {"cell bf16 B5 H48", [] { return cell_case<__nv_bfloat16>(5, 48, 0); }},
    {"cell f16 B4 H37 padded rows", [] { return cell_case<__half>(4, 37, 3); }},
    {"cell f32 B1 H7 padded rows", [] { return cell_case<float>(1, 7, 1); }},
    // Grids the launcher picks: 20 slices x 1 CTA serving 3 batch tiles; 40 x 2 (tiles 0, 2
    // on row 0); 23 slices of 4 units for H = 90 (2 padded units); a 1-unit hidden state.
    {"sequence f32 T4 B20 H40 4 SMs", [] { return sequence_case<float>(4, 20, 40, 4); }},
    {"sequence f32 T4 B20 H40 10 SMs", [] { return sequence_case<float>(4, 20, 40, 10); }},
    {"sequence f16 T3 B9 H90", [] { return sequence_case<__half>(3, 9, 90, 4); }},
    {"sequence bf16 T3 B5 H64", [] { return sequence_case<__nv_bfloat16>(3, 5, 64, 4); }},
    {"sequence f64 T3 B6 H32", [] { return sequence_case<double>(3, 6, 32, 2); }},
    {"sequence f32 T2 B1 H1", [] { return sequence_case<float>(2, 1, 1, 1); }},
    {"sequence f32 T4 B11 H40 reverse", [] { return sequence_case<float>(4, 11, 40, 4, {true}); }},
    {"sequence bf16 T3 B5 H64 reverse", [] { return sequence_case<__nv_bfloat16>(3, 5, 64, 4, {true}); }},
    // Packed rows (non-increasing, a step with none stepping), both time orders.
    {"sequence f32 T5 B11 H40 packed", [] { return sequence_case<float>(5, 11, 40, 4, {false, {11, 9, 9, 3, 0}}); }},
    {"sequence f16 T4 B10 H33 reverse packed", [] { return sequence_case<__half>(4, 10, 33, 4, {true, {10, 7, 2, 1}}); }},
    {"sequence f32 T4 B11 H40 zoneout", [] { return sequence_case<float>(4, 11, 40, 4, {false, {}, true}); }},
    {"sequence bf16 T4 B10 H33 reverse packed zoneout",
     [] { return sequence_case<__nv_bfloat16>(4, 10, 33, 4, {true, {10, 7, 2, 1}, true}); }},
    // The backward on the same grids, and its reference against central differences.
    {"sequence bwd f32 T4 B20 H40 4 SMs", [] { return sequence_bwd_case<float>(4, 20, 40, 4); }},
    {"sequence bwd f32 T3 B20 H40 10 SMs", [] { return sequence_bwd_case<float>(3, 20, 40, 10); }},
    {"sequence bwd f16 T3 B9 H90", [] { return sequence_bwd_case<__half>(3, 9, 90, 4); }},
    {"sequence bwd bf16 T3 B5 H64", [] { return sequence_bwd_case<__nv_bfloat16>(3, 5, 64, 4); }},
    {"sequence bwd f64 T3 B6 H32", [] { return sequence_bwd_case<double>(3, 6, 32, 2); }},
    {"sequence bwd f32 T1 B1 H1", [] { return sequence_bwd_case<float>(1, 1, 1, 1); }},
    {"sequence bwd f32 T2 B1 H1", [] { return sequence_bwd_case<float>(2, 1, 1, 1); }},
    {"sequence bwd f32 T4 B11 H40 reverse", [] { return sequence_bwd_case<float>(4, 11, 40, 4, {true}); }},
    {"sequence bwd f16 T3 B9 H90 reverse", [] { return sequence_bwd_case<__half>(3, 9, 90, 4, {true}); }},
    {"sequence bwd f32 T5 B11 H40 packed", [] { return sequence_bwd_case<float>(5, 11, 40, 4, {false, {11, 9, 9, 3, 0}}); }},
    {"sequence bwd bf16 T4 B10 H33 reverse packed",
     [] { return sequence_bwd_case<__nv_bfloat16>(4, 10, 33, 4, {true, {10, 7, 2, 1}}); }},
    {"sequence bwd f32 T4 B11 H40 zoneout", [] { return sequence_bwd_case<float>(4, 11, 40, 4, {false, {}, true}); }},
    {"sequence bwd f16 T4 B10 H33 reverse packed zoneout",
     [] { return sequence_bwd_case<__half>(4, 10, 33, 4, {true, {10, 7, 2, 1}, true}); }},
    {"sequence bwd directional f64 T3 B9 H12", [] { return sequence_bwd_directional_case(3, 9, 12, {}); }},
    {"sequence bwd directional f64 T4 B5 H6 zoneout",
     [] { return sequence_bwd_directional_case(4, 5, 6, {false, {}, true}); }},
    {"sequence bwd directional f64 T5 B9 H6 reverse packed zoneout",
     [] { return sequence_bwd_directional_case(5, 9, 6, {true, {9, 8, 5, 5, 2}, true}); }},
    {"sequence bwd directional f64 T4 B3 H7 reverse", [] { return sequence_bwd_directional_case(4, 3, 7, {true}); }},
    {"sequence bwd directional f64 T5 B9 H6 packed",
     [] { return sequence_bwd_directional_case(5, 9, 6, {false, {9, 8, 5, 5, 2}}); }},
    {"sequence bwd directional f64 T5 B9 H6 reverse packed",
     [] { return sequence_bwd_directional_case(5, 9, 6, {true, {9, 8, 5, 5, 2}}); }},
    // Layer steps: every option, carried rows (stepping < B, and none stepping), odd sizes,
    // both vector paths, every dtype; the backward with float32 gradients for half types as
    // the layer backward keeps them (T-typed gradients: the cell cases above).
    {"step fwd f32 all options", [] { return step_fwd_case<float>(5, 40, {3, true, true, false}); }},
    {"step fwd f32 project", [] { return step_fwd_case<float>(6, 8, {6, true, false, true}); }},
    {"step fwd f64 zoneout_h", [] { return step_fwd_case<double>(3, 34, {2, false, true, false}); }},
    {"step fwd f16 padded", [] { return step_fwd_case<__half>(7, 33, {4, true, true, false, 3}); }},
    {"step fwd bf16 project none stepping", [] { return step_fwd_case<__nv_bfloat16>(4, 48, {0, true, false, true}); }},
    {"step fwd f16 B1 H1", [] { return step_fwd_case<__half>(1, 1, {1, false, false, false}); }},
    {"step bwd f32 all options", [] { return step_bwd_case<float, float>(5, 40, {3, true, true, false}); }},
    {"step bwd f32 project", [] { return step_bwd_case<float, float>(6, 8, {5, true, false, true}); }},
    {"step bwd f64 zoneout_h", [] { return step_bwd_case<double, double>(3, 34, {3, false, true, false}); }},
    {"step bwd f16 padded", [] { return step_bwd_case<__half, float>(7, 33, {4, true, true, false, 3}); }},
    {"step bwd bf16 project none stepping", [] { return step_bwd_case<__nv_bfloat16, float>(4, 48, {0, true, false, true}); }},
    {"step bwd bf16 vec", [] { return step_bwd_case<__nv_bfloat16, float>(3, 16, {2, false, false, false}); }},
    {"step cancel bf16 B1 H1", [] { return step_cancel_case<__nv_bfloat16>(1, 1); }},
    {"step cancel bf16 B7 H33", [] { return step_cancel_case<__nv_bfloat16>(7, 33); }},
    {"step cancel f16 B5 H40", [] { return step_cancel_case<__half>(5, 40); }},
    {"step cancel f32 B3 H16", [] { return step_cancel_case<float>(3, 16); }},
    // The LayerNorm step: every option, carried rows (and none stepping), odd sizes, padded
    // rows, H > the block's 256 threads (two units per thread), every dtype.
    {"ln step f32 all options", [] { return ln_step_case<float>(5, 33, {3, true, true, false, 1}); }},
    {"ln step f32 project", [] { return ln_step_case<float>(4, 33, {2, true, false, true}); }},
    {"ln step f32 B1 H1", [] { return ln_step_case<float>(1, 1, {1, false, false, false}); }},
    {"ln step f64 zoneout", [] { return ln_step_case<double>(3, 34, {2, true, true, false}); }},
    {"ln step f16 padded", [] { return ln_step_case<__half>(3, 33, {3, true, true, false, 3}); }},
    {"ln step bf16 project", [] { return ln_step_case<__nv_bfloat16>(3, 33, {2, false, false, true}); }},
    {"ln step bf16 none stepping", [] { return ln_step_case<__nv_bfloat16>(2, 7, {0, true, true, false}); }},
    {"ln step f32 H260", [] { return ln_step_case<float>(2, 260, {1, true, true, false}); }},
    {"projection f32", [] { return projection_case<float, float>(5, 7, 3, true); }},
    {"projection f16", [] { return projection_case<__half, float>(4, 33, 2, false); }},
    {"projection bf16", [] { return projection_case<__nv_bfloat16, float>(3, 5, 3, true); }},
    {"projection f64", [] { return projection_case<double, double>(2, 3, 1, true); }},
};

}  // namespace

int main(int argc, char** argv) {
  setenv("CUDASIM_STACK_KB", "64", 0);  // thousands of fibers at once in a cooperative launch
  cudasim::register_dynamic_smem(fastattn::lstm::smem_raw, sizeof(fastattn::lstm::smem_raw));
  cudasim::thread_init() = fastattn::lstm::cudasim_register_smem_raw;
  const harness::Selection sel(argc, argv);
  int failed = 0, ran = 0;
  for (const Entry& e : kCases) {
    if (!sel.wants(e.name)) continue;
    ++ran;
    failed += !e.run();
  }
  return harness::finish(failed, ran);
}
