#include "fastattn/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace fastattn {

namespace {

CpuIsa detect_cpu_isa() {
#ifdef FASTATTN_X86_ISA_VARIANTS
  __builtin_cpu_init();
  CpuIsa best = CpuIsa::Default;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
  if (best == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    best = CpuIsa::Avx512;
  }
  if (const char* cap = std::getenv("ATEN_CPU_CAPABILITY")) {
    CpuIsa asked = best;
    if (!strcasecmp(cap, "default")) asked = CpuIsa::Default;
    if (!strcasecmp(cap, "avx2")) asked = CpuIsa::Avx2;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
  }
  return best;
#else
  return CpuIsa::Default;
#endif
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace fastattn
