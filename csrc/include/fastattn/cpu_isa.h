// Run-time choice among the per-ISA builds of the `*.isa.cpp` kernel sources.
//
// setup.py compiles every `*.isa.cpp` file once per x86 ISA, each time with
// FASTATTN_ISA_NAMESPACE set to isa_default / isa_avx2 / isa_avx512, the matching -m flags
// and CPU_CAPABILITY=DEFAULT / AVX2 / AVX512 (at::vec's inline namespace, as in PyTorch's
// own build), so a kernel file wraps its entry points in `namespace FASTATTN_ISA_NAMESPACE`.
// Glue code declares them with FASTATTN_ISA_DECLARE and calls FASTATTN_ISA_CALL, which
// picks the widest ISA this CPU supports: an older CPU never executes an instruction it
// lacks.
#pragma once

#include <cstdint>
#include <vector>

namespace fastattn {

enum class CpuIsa { Default, Avx2, Avx512 };

// The ISA the kernels use on this machine. ATEN_CPU_CAPABILITY=default|avx2|avx512 caps it,
// as it caps ATen's own kernels.
CpuIsa cpu_isa();
// The widest ISA this CPU supports, whatever ATEN_CPU_CAPABILITY says.
CpuIsa cpu_isa_supported();
const char* cpu_isa_name(CpuIsa isa);
// Whether this CPU has AVX512-BF16 (vdpbf16ps), which the avx512 variant's bf16 tile products
// use; asked at run time because AVX-512 CPUs before Cooper Lake / Zen 4 lack it.
bool cpu_has_avx512_bf16();

// How one variant was compiled (cpu_isa_variant.isa.cpp): the mangled name of the at::vec
// float vector type it uses, and that type's number of lanes.
struct IsaVariantBuild {
  const char* vec_float_type;
  int64_t vec_float_width;
};
struct IsaVariant {
  CpuIsa isa;
  IsaVariantBuild build;
};
// Every compiled variant this CPU can run, narrowest first (each is asked by its own code).
std::vector<IsaVariant> runnable_isa_variants();

}  // namespace fastattn

#ifdef FASTATTN_X86_ISA_VARIANTS
#define FASTATTN_ISA_DECLARE(...)                 \
  namespace isa_default { __VA_ARGS__; }          \
  namespace isa_avx2 { __VA_ARGS__; }             \
  namespace isa_avx512 { __VA_ARGS__; }
#define FASTATTN_ISA_CALL(fn, ...)                                   \
  [&]() {                                                            \
    switch (::fastattn::cpu_isa()) {                                 \
      case ::fastattn::CpuIsa::Avx512: return isa_avx512::fn(__VA_ARGS__); \
      case ::fastattn::CpuIsa::Avx2: return isa_avx2::fn(__VA_ARGS__);     \
      default: return isa_default::fn(__VA_ARGS__);                  \
    }                                                                \
  }()
#else
#define FASTATTN_ISA_DECLARE(...) \
  namespace isa_default { __VA_ARGS__; }
#define FASTATTN_ISA_CALL(fn, ...) isa_default::fn(__VA_ARGS__)
#endif
