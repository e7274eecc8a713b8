// LSTM kernels under cudasim through their launchers (the ones csrc/lstm/lstm_cuda.cpp
// calls): launch_lstm_cell_fwd / _bwd (csrc/lstm/lstm_cell.cu: pointwise, 16-byte vector and
// scalar paths) and launch_lstm_sequence_fwd (csrc/lstm/lstm_sequence_fwd.cu: persistent
// kernel, cooperative launch, grid.sync per step; every block on its own OS thread), against
// float64 references. The cell backward is the gradient of the cell forward (its inputs:
// gates, cx; its outputs' gradients: hy, cy).
#include "lstm/lstm_cell.cu"
#include "lstm/lstm_sequence_fwd.cu"

#include <cstdlib>

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
template <typename T>
bool sequence_case(int64_t steps, int64_t B, int64_t H, int sms) {
  cudasim::device_sms() = sms;
  std::mt19937 rng(7 + H);
  std::vector<T> x = harness::randn<T>(steps * B * 4 * H, rng), h0 = harness::randn<T>(B * H, rng);
  std::vector<T> c0 = harness::randn<T>(B * H, rng), w = harness::randn<T>(4 * H * H, rng, 1.0 / std::sqrt(double(H)));
  std::vector<T> h_all = harness::poisoned<T>(steps * B * H), c_all = harness::poisoned<T>(steps * B * H);
  std::vector<T> g_all = harness::poisoned<T>(steps * B * 4 * H);
  fastattn::LstmSequenceFwdParams p;
  p.dtype = dtype_of<T>();
  p.x_proj = x.data(), p.h0 = h0.data(), p.c0 = c0.data(), p.w_hh = w.data();
  p.h_all = h_all.data(), p.c_all = c_all.data(), p.gates_all = g_all.data();
  p.seq_len = steps, p.batch = B, p.hidden = H;
  const unsigned long long sw0 = cudasim::rt().switches;
  if (const cudaError_t err = fastattn::launch_lstm_sequence_fwd(p, nullptr); err != cudaSuccess) {
    std::printf("sequence %s: launch error %d\n", harness::dtype_name<T>(), int(err));
    return false;
  }
  Err eh, ec, eg;
  std::vector<T> hp = h0, cp = c0;
  for (int64_t t = 0; t < steps; ++t) {
    std::vector<T> hn(B * H), cn(B * H);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t u = 0; u < H; ++u) {
        double a[4];
        for (int q = 0; q < 4; ++q) {
          double s = to_d(x[(t * B + b) * 4 * H + q * H + u]);
          for (int64_t k = 0; k < H; ++k) s += to_d(w[(q * H + u) * H + k]) * to_d(hp[b * H + k]);
          a[q] = s;
        }
        const double gi = sig(a[0]), gf = sig(a[1]), gg = std::tanh(a[2]), go = sig(a[3]);
        const double c = gf * to_d(cp[b * H + u]) + gi * gg, h = go * std::tanh(c);
        const int64_t s = (t * B + b) * H + u;
        eh.add(h, to_d(h_all[s]));
        ec.add(c, to_d(c_all[s]));
        const double gref[4] = {gi, gf, gg, go};
        for (int q = 0; q < 4; ++q) eg.add(gref[q], to_d(g_all[(t * B + b) * 4 * H + q * H + u]));
        // Continue from the kernel's own states (so one rounding flip does not propagate).
        hn[b * H + u] = h_all[s];
        cn[b * H + u] = c_all[s];
      }
    hp = hn;
    cp = cn;
  }
  const double tol = tol_of<T>() * 2;
  const bool ok = eh.rel() <= tol && ec.rel() <= tol && eg.rel() <= tol;
  std::printf("sequence %-4s T%lld B%lld H%lld (%d SMs)  %s  rel err h %.1e c %.1e gates %.1e (tol %.0e)  %llu switches\n",
              harness::dtype_name<T>(), (long long)steps, (long long)B, (long long)H, sms, ok ? "OK  " : "FAIL",
              eh.rel(), ec.rel(), eg.rel(), tol, cudasim::rt().switches - sw0);
  return ok;
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
