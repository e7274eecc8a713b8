#include "fastattn/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace fastattn {

FASTATTN_ISA_DECLARE(IsaVariantBuild isa_variant_build())

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
  return best;
#else
  return CpuIsa::Default;
#endif
}

CpuIsa capped_cpu_isa() {
  CpuIsa best = cpu_isa_supported();
  if (const char* cap = std::getenv("ATEN_CPU_CAPABILITY")) {
    CpuIsa asked = best;
    if (!strcasecmp(cap, "default")) asked = CpuIsa::Default;
    if (!strcasecmp(cap, "avx2")) asked = CpuIsa::Avx2;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
  }
  return best;
}

}  // namespace

CpuIsa cpu_isa_supported() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = capped_cpu_isa();
  return isa;
}

bool cpu_has_avx512_bf16() {
#ifdef FASTATTN_X86_ISA_VARIANTS
  __builtin_cpu_init();
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "default";
  }
}

std::vector<IsaVariant> runnable_isa_variants() {
  std::vector<IsaVariant> variants{{CpuIsa::Default, isa_default::isa_variant_build()}};
#ifdef FASTATTN_X86_ISA_VARIANTS
  const CpuIsa best = cpu_isa_supported();
  if (best == CpuIsa::Avx2 || best == CpuIsa::Avx512) {
    variants.push_back({CpuIsa::Avx2, isa_avx2::isa_variant_build()});
  }
  if (best == CpuIsa::Avx512) variants.push_back({CpuIsa::Avx512, isa_avx512::isa_variant_build()});
#endif
  return variants;
}

}  // namespace fastattn
