// smem_check.h: the shared-memory race checker and bank-conflict counter of cudasim.
//
// Why a checker and not only values: under the lockstep schedule ("rr") every warp finishes
// its work before any other warp reaches the next statement, so a deleted __syncthreads
// often changes no value there. The checker records, for every byte of the launch's dynamic
// shared memory, who last wrote it and who read it since the last block barrier, and fails
// on
//   read-after-write:  a thread reads a byte another thread wrote in the same barrier
//                      interval, with no warp collective between (same warp) or
//                      __syncthreads between (any warp);
//   write-after-read:  a thread overwrites a byte another thread read in the same interval
//                      under the same condition.
// Both are real races on a GPU whatever the schedule, so one lockstep run finds them.
//
// How accesses are seen: the kernel translation unit is compiled with -fsanitize=thread
// instrumentation but linked WITHOUT libtsan; smem_check.cpp defines the __tsan_* entry
// points GCC calls before every load and store, and keeps only the accesses that fall into
// the running block's shared memory (everything else returns after one range check). The
// PTX stand-ins (ldmatrix, cp.async) report their shared accesses explicitly.
//
// Bank conflicts (information, never a failure): the k-th execution of one access site by
// the lanes of a warp is one warp instruction; its addresses are grouped by the hardware's
// phases (32 lanes for <= 4-byte accesses, 16 for 8-byte, 8 for 16-byte) and each phase
// costs as many wavefronts as the most distinct 4-byte words that map to one of the 32 banks.
// Conflicts = wavefronts beyond one per phase, summed per kernel and printed at exit when
// CUDASIM_BANK_REPORT is set.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cudasim {
struct Block;
namespace smem_check {

// Where an access comes from: a code address (instrumented loads and stores, symbolized
// with addr2line in reports) or a source line (the PTX stand-ins).
struct Site {
  uintptr_t pc = 0;
  const char* file = nullptr;
  int line = 0;
};

void on_block_start(Block& b);
void on_barrier(Block& b);  // after every thread arrived: a new interval begins
void on_block_end(Block& b);
// Explicit accesses of the PTX stand-ins, by the running CUDA thread.
void read(const void* p, size_t n, Site site);
void write(const void* p, size_t n, Site site);
// Copies that the instrumentation must not see (the stand-ins report them with the above).
void raw_copy(void* dst, const void* src, size_t n);
// Kernel name shown in the bank-conflict report for the launches that follow.
void set_kernel(const void* kernel_address);

}  // namespace smem_check
}  // namespace cudasim
