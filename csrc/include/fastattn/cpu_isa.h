// Run-time choice among the per-ISA builds of the `*.isa.cpp` kernel sources.
//
// setup.py compiles every `*.isa.cpp` file once per x86 ISA, each time with
// FASTATTN_ISA_NAMESPACE set to isa_default / isa_avx2 / isa_avx512 and the matching
// -m flags, so a kernel file wraps its entry points in `namespace FASTATTN_ISA_NAMESPACE`.
// Glue code declares them with FASTATTN_ISA_DECLARE and calls FASTATTN_ISA_CALL, which
// picks the widest ISA this CPU supports: an older CPU never executes an instruction it
// lacks.
#pragma once

namespace fastattn {

enum class CpuIsa { Default, Avx2, Avx512 };

// The ISA the kernels use on this machine. ATEN_CPU_CAPABILITY=default|avx2|avx512 caps it,
// as it caps ATen's own kernels.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

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
