// harness.h: what every cudasim test program shares: element conversions, error tracking
// against a float64 reference, and case selection from the command line.
//
// A program runs the cases whose name contains any command-line argument (all without
// arguments), prints one line per case and exits non-zero when any case fails. Emulator
// faults (races, deadlocks, divergence, bad PTX) abort with a report instead.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace harness {

template <typename T>
double to_d(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return static_cast<double>(x);
}
template <typename T>
T from_d(double x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(x));
  else return static_cast<T>(x);
}
template <typename T>
const char* dtype_name() {
  return std::is_same_v<T, float> ? "f32" : std::is_same_v<T, double> ? "f64" : std::is_same_v<T, __half> ? "f16" : "bf16";
}

// Fresh random values rounded to T (never zeros: a kernel that skips work must not pass).
template <typename T>
std::vector<T> randn(size_t n, std::mt19937& rng, double scale = 1.0) {
  std::normal_distribution<double> normal;
  std::vector<T> v(n);
  for (auto& x : v) x = from_d<T>(scale * normal(rng));
  return v;
}
// Outputs start as NaN so that an element the kernel forgets cannot pass.
template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, from_d<T>(NAN));
}

// Largest absolute error, and the largest |reference| it is judged against. NaN never passes.
struct Err {
  double max_abs = 0.0, max_ref = 0.0;
  void add(double ref, double got) {
    const double e = std::fabs(ref - got);
    if (!(e <= max_abs)) max_abs = std::isnan(e) ? INFINITY : std::max(max_abs, e);
    max_ref = std::max(max_ref, std::fabs(ref));
  }
  // Relative to the data's scale, with a floor so all-tiny references do not divide by ~0.
  double rel() const { return max_abs / std::max(max_ref, 1e-3); }
};

struct Selection {
  std::vector<std::string> patterns;
  Selection(int argc, char** argv) {
    for (int i = 1; i < argc; ++i)
      if (argv[i][0] != '-') patterns.emplace_back(argv[i]);
  }
  bool wants(const char* name) const {
    if (patterns.empty()) return true;
    for (const auto& p : patterns)
      if (std::strstr(name, p.c_str())) return true;
    return false;
  }
};

// Value of `--NAME=VALUE` on the command line, or nullptr.
inline const char* option(int argc, char** argv, const char* name) {
  const size_t n = std::strlen(name);
  for (int i = 1; i < argc; ++i)
    if (!std::strncmp(argv[i], "--", 2) && !std::strncmp(argv[i] + 2, name, n) && argv[i][2 + n] == '=') return argv[i] + 3 + n;
  return nullptr;
}

inline int finish(int failed, int ran) {
  std::printf("%s: %d of %d cases failed\n", failed ? "FAILED" : "ALL OK", failed, ran);
  if (ran == 0) {
    std::printf("no case matched the selection\n");
    return 2;
  }
  return failed ? 1 : 0;
}

}  // namespace harness
