// Glue from the CPU kernels' bf16 products to ATen's oneDNN brgemm (fastattn/cpu_brgemm_bf16.h).
#include "fastattn/cpu_brgemm_bf16.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <cstdlib>
#include <cstring>

#include "fastattn/brgemm_probe.h"
#include "fastattn/cpu_isa.h"

namespace fastattn::cpu_brgemm {
namespace {

namespace cpublas = at::native::cpublas;

// FASTATTN_CPU_TILE_ENGINE: "brgemm" or "native" (our micro-kernels) overrides the choice by
// CPU, to test brgemm without AMX and to compare the two engines on one machine.
bool asked(const char* name) {
  const char* engine = std::getenv("FASTATTN_CPU_TILE_ENGINE");
  return engine != nullptr && !strcasecmp(engine, name);
}

bool decide() {
  if (!cpu_has_avx512_bf16()) return false;
  if (asked("native")) return false;
  if (!cpublas::could_pack(at::kBFloat16) && !asked("brgemm")) return false;
  return brgemm_runs<c10::BFloat16>(/*vnni=*/true);
}

}  // namespace

bool use_for_bf16() {
  static const bool use = decide();
  return use;
}

const char* bf16_engine_name() {
  return cpublas::could_pack(at::kBFloat16) ? "oneDNN brgemm bf16 (AMX)"
                                            : "oneDNN brgemm bf16 (forced, no AMX)";
}

void bf16_product(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t lda,
                  const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool add) {
  // brgemm counts A's reduction and leading dim in bf16 elements, B's leading dim in pairs.
  cpublas::brgemm(m, n, 2 * kp, 2 * lda, ldb, ldc, add, reinterpret_cast<const c10::BFloat16*>(a),
                  reinterpret_cast<const c10::BFloat16*>(b), c, true);
}

void release() { cpublas::brgemm_release(true); }

}  // namespace fastattn::cpu_brgemm
