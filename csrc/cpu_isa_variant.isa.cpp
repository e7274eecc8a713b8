// What one ISA variant of the `*.isa.cpp` sources was compiled as, reported by code of that
// variant itself: the at::vec type its kernels use and that type's float width. A test
// compares the variants, so a build whose variants share one at::vec namespace (and could
// then share inline at::vec code of the wrong width at link time) fails.
#include <ATen/cpu/vec/vec.h>

#include <typeinfo>

#include "fastattn/cpu_isa.h"

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {

IsaVariantBuild isa_variant_build() {
  return {typeid(at::vec::Vectorized<float>).name(), at::vec::Vectorized<float>::size()};
}

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
