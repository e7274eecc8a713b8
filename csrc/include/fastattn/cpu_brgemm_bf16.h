// bf16 tile products of the CPU kernels (the attention's forward and backward tiles, the LSTM's
// recurrent products) through ATen's oneDNN micro-kernels (at::native::cpublas::brgemm): on a CPU
// with AMX-BF16 they run on AMX tiles, which no at::vec or AVX-512 kernel of ours can reach. The
// interface is torch-free so that the per-ISA kernels (attention_cpu.isa.cpp, lstm_cpu.isa.cpp)
// can call it; csrc/cpu_brgemm_bf16.cpp is the glue to ATen.
//
// Operands follow the layout of the attention's AVX512-BF16 dot products: A row-major bf16, B in
// oneDNN's VNNI-2 layout (pair (2p, 2p+1) of the reduction dimension at row p, as 32-bit
// words, leading dim ldb words), C fp32. That layout is the one cpublas::pack produces for
// oneDNN's AMX kernels (and the one its AVX512-BF16 brgemm reads), so B needs no second pack.
#pragma once

#include <cstdint>

namespace fastattn::cpu_brgemm {

// Whether the kernels' bf16 products go through brgemm: where the CPU has AMX-BF16 (ATen's
// cpublas::could_pack(bf16)), unless FASTATTN_CPU_TILE_ENGINE=native keeps our micro-kernels
// (to compare the engines); or where FASTATTN_CPU_TILE_ENGINE=brgemm forces it (to test the
// path on CPUs without AMX, where oneDNN's brgemm runs on AVX512-BF16). Either way the CPU
// must have AVX512-BF16 (the kernel converts P to bf16 pairs with it; every AMX CPU has it)
// and oneDNN's bf16 brgemm must run on it. Decided once per process.
bool use_for_bf16();
// The engine's name for _C.cpu_attention_tile_engine: "oneDNN brgemm bf16 (AMX)", or
// "oneDNN brgemm bf16 (forced, no AMX)".
const char* bf16_engine_name();

// C[m, n] (add ? += : =) A[m, 2 kp] B[2 kp, n] over kp pairs of the reduction: A row-major
// pairs (a bf16 row read as 32-bit words, leading dim lda pairs), B VNNI-2 pairs (leading dim
// ldb pairs), C fp32 (leading dim ldc).
void bf16_product(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t lda,
                  const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool add);

// Releases the AMX tile state brgemm configured on this thread (a no-op without AMX): called
// after a thread's run of tile products, before the thread runs other code.
void release();

}  // namespace fastattn::cpu_brgemm
