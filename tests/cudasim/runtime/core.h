// core.h: the execution model of cudasim (CUDA C++ kernel source run on the CPU).
//
// Included through cudasim.h, which the build force-includes before any kernel source.
// Every CUDA thread of a block is a fiber (ucontext) with its own stack, so per-thread
// "register" arrays are ordinary locals. The fibers of a block run on one OS thread and
// switch only where a CUDA thread must wait for others: __syncthreads*, warp collectives
// (__shfl_*_sync, __syncwarp and the PTX stand-ins ldmatrix / mma in ptx.h). Blocks run one
// after another, except in cooperative launches (one OS thread per block, see Coop).
// Host-side half/bfloat16 types and conversions come from the real CUDA headers (bit-exact
// rounding).
//
// Shared memory: __shared__ becomes thread_local, so a block-scope `__shared__ T x[N]`
// is one array shared by the fibers of the running block, and
// `extern __shared__ T smem[]` refers to a thread_local array the test harness defines
// (CUDASIM_DEFINE_DYNAMIC_SMEM) and registers as the dynamic shared memory.
#pragma once

// Static __shared__ arrays are per block: thread_local makes them shared by the fibers of
// the block that runs on this OS thread (our kernels use only dynamic shared memory, which
// is what the race checker watches).
#define __shared__ thread_local
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDASIM_ASAN 1
#endif

#include "smem_check.h"

// CUDA's device math library declares the classification functions in the global namespace
// (kernels call a bare isnan); host C++ keeps them in std:: only.
using std::isinf;
using std::isnan;

namespace cudasim {

constexpr int kWarpSize = 32;

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "cudasim: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::abort();
}

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
  int size;
};

struct Thread {
  ucontext_t ctx;
  unsigned char* stack = nullptr;  // usable part (above the guard page)
  size_t stack_size = 0;
  void* asan_fake_stack = nullptr;
  uint3 idx{};
  int linear = 0, lane = 0, warp = 0;
  State state = State::kRunnable;
  const char* wait_what = "";
  const char* wait_file = "";
  int wait_line = 0;
  // Warp collectives: what a lane brings in, what it gets back.
  alignas(16) unsigned char in[64];
  alignas(16) unsigned char out[64];
  // cp.async: copies issued but not committed, and committed groups (oldest first).
  std::vector<PendingCopy> uncommitted;
  std::vector<std::vector<PendingCopy>> groups;
};

struct WarpState {
  int arrived = 0;
  int op = 0;
  unsigned mask = 0;
  const char* file = "";
  int line = 0;
  uint32_t sync_epoch = 0;  // completed collectives of this warp (the race checker's warp sync)
};

struct Block {
  uint3 idx{};
  dim3 dim, grid;
  std::vector<Thread> threads;
  std::vector<WarpState> warps;
  int barrier_arrived = 0;
  const char* barrier_file = "";
  int barrier_line = 0;
  int barrier_or = 0, barrier_and = 1, barrier_count = 0;
  int barrier_result_or = 0, barrier_result_and = 0, barrier_result_count = 0;
  unsigned char* dyn_smem = nullptr;
  size_t dyn_smem_size = 0;
  const char* barrier_what = "";
  struct Coop* coop = nullptr;  // set for cooperative launches (grid.sync allowed)
  uint32_t epoch = 0;           // completed block barriers (the race checker's intervals)
};

// Cooperative launches run every block on its own OS thread (all blocks co-resident, as
// cudaLaunchCooperativeKernel guarantees); grid.sync() is a barrier across those threads
// (mutex + condition variable: release / acquire, like the gpu-scope fences of grid.sync).
// A block that exits while others wait at (or later reach) a grid.sync is reported as the
// deadlock it would be on a GPU.
struct Coop {
  std::mutex m;
  std::condition_variable cv;
  int blocks = 0, arrived = 0, exited = 0;
  unsigned long long generation = 0;
  void arrive_and_wait(uint3 idx, const char* file, int line) {
    std::unique_lock<std::mutex> lock(m);
    if (exited) fail("grid.sync at %s:%d in block (%u,%u,%u) after %d block(s) exited: deadlock on a GPU", file, line, idx.x, idx.y, idx.z, exited);
    const unsigned long long gen = generation;
    if (++arrived == blocks) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    cv.wait(lock, [&] { return generation != gen || exited > 0; });
    if (generation == gen) fail("grid.sync at %s:%d: block (%u,%u,%u) waits for a block that exited: deadlock on a GPU", file, line, idx.x, idx.y, idx.z);
  }
  void exit() {
    std::lock_guard<std::mutex> lock(m);
    ++exited;
    cv.notify_all();
  }
};

struct Runtime {
  ucontext_t scheduler;
  Block* block = nullptr;
  Thread* current = nullptr;
  std::function<void()> kernel;
  std::mt19937 rng{12345};
  bool shuffle = false;  // randomize the fiber order each scheduling round
  // Scheduling policy (CUDASIM_SCHED): "rr" runs every runnable fiber once per round (warps
  // stay in lockstep); "greedy" always resumes the lowest-numbered runnable fiber, so warp 0
  // runs ahead to the next __syncthreads before warp 1 starts; "greedy-rev" does the same
  // from the last warp. Skewed warps expose missing barriers that lockstep hides.
  int policy = 0;  // 0 rr, 1 greedy, 2 greedy-rev
  unsigned long long switches = 0;
  bool in_fiber = false;  // a CUDA thread runs (its shared accesses are checked)
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  // Registered dynamic shared memory (a thread_local array of the harness).
  unsigned char* smem_base = nullptr;
  size_t smem_capacity = 0;
};

inline Runtime& rt() {
  static thread_local Runtime r;
  return r;
}
inline Thread& self() { return *rt().current; }
inline Block& block() { return *rt().block; }

// ---- fiber switching -------------------------------------------------------------------

inline void switch_to_scheduler() {
  Runtime& r = rt();
  Thread& t = *r.current;
  ++r.switches;
#if CUDASIM_ASAN
  __sanitizer_start_switch_fiber(t.state == State::kDone ? nullptr : &t.asan_fake_stack,
                                 r.sched_stack_bottom, r.sched_stack_size);
#endif
  swapcontext(&t.ctx, &r.scheduler);
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(t.asan_fake_stack, &r.sched_stack_bottom, &r.sched_stack_size);
#endif
}

inline void fiber_entry() {
  Runtime& r = rt();
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_stack_bottom, &r.sched_stack_size);
#endif
  r.kernel();
  Thread& t = *r.current;
  if (!t.uncommitted.empty() || !t.groups.empty()) {
    std::fprintf(stderr, "cudasim: warning: thread %d of block (%u,%u,%u) exits with cp.async copies not waited for\n",
                 t.linear, r.block->idx.x, r.block->idx.y, r.block->idx.z);
  }
  t.state = State::kDone;
  switch_to_scheduler();  // never resumed
  fail("a finished fiber was resumed");
}

// ---- block barrier ---------------------------------------------------------------------

inline int live_threads(const Block& b) {
  int n = 0;
  for (const Thread& t : b.threads) n += t.state != State::kDone;
  return n;
}

// Every thread of the block must arrive at the same __syncthreads (same source line).
// grid.sync() arrives here too (what = "grid.sync"); the last thread of the block to arrive
// then waits for the other blocks before the block goes on.
inline void barrier(const char* file, int line, int predicate, const char* what = "__syncthreads") {
  Block& b = block();
  Thread& t = self();
  if (b.barrier_arrived == 0) {
    b.barrier_file = file;
    b.barrier_line = line;
    b.barrier_what = what;
    b.barrier_or = 0;
    b.barrier_and = 1;
    b.barrier_count = 0;
  } else if (b.barrier_line != line || std::strcmp(b.barrier_file, file) != 0 || std::strcmp(b.barrier_what, what) != 0) {
    fail("divergent %s: thread %d at %s:%d, others wait at %s %s:%d", what, t.linear, file, line, b.barrier_what,
         b.barrier_file, b.barrier_line);
  }
  b.barrier_or |= predicate != 0;
  b.barrier_and &= predicate != 0;
  b.barrier_count += predicate != 0;
  t.state = State::kBarrier;
  t.wait_what = what;
  t.wait_file = file;
  t.wait_line = line;
  if (++b.barrier_arrived == static_cast<int>(b.threads.size())) {
    b.barrier_result_or = b.barrier_or;
    b.barrier_result_and = b.barrier_and;
    b.barrier_result_count = b.barrier_count;
    b.barrier_arrived = 0;
    ++b.epoch;
    smem_check::on_barrier(b);
    if (std::strcmp(what, "grid.sync") == 0) b.coop->arrive_and_wait(b.idx, file, line);
    for (Thread& u : b.threads) u.state = State::kRunnable;
    return;  // the last one to arrive goes on without a switch
  }
  switch_to_scheduler();
}

inline void grid_sync(const char* file, int line) {
  if (!block().coop) fail("grid.sync() at %s:%d in a kernel not launched with cudaLaunchCooperativeKernel", file, line);
  barrier(file, line, 0, "grid.sync");
}

// ---- warp collectives ------------------------------------------------------------------

// Every lane named in `mask` must reach the same collective (op and source line) with the
// same mask; the last to arrive runs `compute(lanes)` for the whole warp, which reads each
// lane's `in` and writes each lane's `out`.
template <typename Compute>
inline void warp_collective(int op, unsigned mask, const char* file, int line, Compute&& compute) {
  Block& b = block();
  Thread& t = self();
  WarpState& w = b.warps[t.warp];
  const int warp_first = t.warp * kWarpSize;
  const int warp_lanes = std::min<int>(kWarpSize, static_cast<int>(b.threads.size()) - warp_first);
  const unsigned present = warp_lanes == 32 ? 0xffffffffu : ((1u << warp_lanes) - 1u);
  if (!(mask >> t.lane & 1u)) fail("lane %d calls a warp collective (%s:%d) with a mask 0x%08x without itself", t.lane, file, line, mask);
  if (mask & ~present) fail("warp collective at %s:%d names lanes that do not exist (mask 0x%08x)", file, line, mask);
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
    w.file = file;
    w.line = line;
  } else if (w.op != op || w.mask != mask || w.line != line || std::strcmp(w.file, file) != 0) {
    fail("divergent warp collective in warp %d: lane %d at %s:%d (mask 0x%08x), other lanes at %s:%d (mask 0x%08x)",
         t.warp, t.lane, file, line, mask, w.file, w.line, w.mask);
  }
  t.state = State::kWarp;
  t.wait_what = "warp collective";
  t.wait_file = file;
  t.wait_line = line;
  if (++w.arrived == __builtin_popcount(mask)) {
    Thread* lanes[kWarpSize] = {};
    for (int l = 0; l < warp_lanes; ++l) {
      if (mask >> l & 1u) lanes[l] = &b.threads[warp_first + l];
    }
    compute(lanes);
    w.arrived = 0;
    ++w.sync_epoch;
    for (int l = 0; l < warp_lanes; ++l) {
      if (mask >> l & 1u) lanes[l]->state = State::kRunnable;
    }
    return;
  }
  switch_to_scheduler();
}

enum Op { kShflXor = 1, kShfl, kShflDown, kShflUp, kLdmatrix, kLdmatrixTrans, kMma, kSyncwarp };

template <typename T>
inline T shfl_generic(int op, unsigned mask, T value, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8, "shuffle of up to 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width %d at %s:%d", width, file, line);
  std::memcpy(self().in, &value, sizeof(T));
  warp_collective(op, mask, file, line, [&](Thread** lanes) {
    for (int l = 0; l < kWarpSize; ++l) {
      if (!lanes[l]) continue;
      const int base = l & ~(width - 1);
      int src = l;
      switch (op) {
        case kShflXor: src = l ^ arg; if (src >= base + width) src = l; break;   // outside the segment: own value
        case kShfl: src = base + (arg & (width - 1)); break;
        case kShflDown: src = (l - base) + arg < width ? l + arg : l; break;
        case kShflUp: src = (l - base) - arg >= 0 ? l - arg : l; break;
      }
      if (!lanes[src]) fail("shuffle at %s:%d reads lane %d, which is not in the mask", file, line, src);
      std::memcpy(lanes[l]->out, lanes[src]->in, sizeof(T));
    }
  });
  T result;
  std::memcpy(&result, self().out, sizeof(T));
  return result;
}

// ---- launch ----------------------------------------------------------------------------

inline size_t stack_bytes() {
  const char* s = std::getenv("CUDASIM_STACK_KB");
  return (s ? std::strtoul(s, nullptr, 10) : 256) * 1024;
}

// Hook run at the start of every OS thread that runs blocks of a cooperative launch: it must
// register that thread's dynamic shared memory (CUDASIM_DEFINE_DYNAMIC_SMEM defines
// NS::cudasim_register_NAME for this).
inline void (*&thread_init())() {
  static void (*f)() = nullptr;
  return f;
}

inline void read_policy(Runtime& r) {
  if (const char* sched = std::getenv("CUDASIM_SCHED")) {
    r.policy = !std::strcmp(sched, "greedy") ? 1 : !std::strcmp(sched, "greedy-rev") ? 2 : 0;
  }
  if (const char* seed = std::getenv("CUDASIM_SEED")) {
    r.shuffle = true;
    r.rng.seed(std::strtoul(seed, nullptr, 10));
  }
}

// No fiber can run and some have not finished: on a GPU the block would hang. Names where
// every thread waits (or that it exited), so a divergent barrier or collective is visible.
[[noreturn]] inline void report_deadlock(const Block& b) {
  std::fprintf(stderr, "cudasim: deadlock in block (%u,%u,%u):\n", b.idx.x, b.idx.y, b.idx.z);
  // One line per run of consecutive threads in the same place.
  auto where = [](const Thread& t) {
    return t.state == State::kDone ? std::string("exited")
                                   : std::string("wait at ") + t.wait_what + " " + t.wait_file + ":" + std::to_string(t.wait_line);
  };
  for (size_t first = 0; first < b.threads.size();) {
    size_t last = first;
    while (last + 1 < b.threads.size() && where(b.threads[last + 1]) == where(b.threads[first])) ++last;
    std::fprintf(stderr, "  threads %zu..%zu (warps %zu..%zu) %s\n", first, last, first / kWarpSize, last / kWarpSize,
                 where(b.threads[first]).c_str());
    first = last + 1;
  }
  std::abort();
}

// Runs the blocks `idxs` one after another on the calling OS thread.
inline void run_blocks(const std::vector<uint3>& idxs, dim3 grid, dim3 block_dim, size_t dyn_smem,
                       const std::function<void()>& kernel, Coop* coop) {
  Runtime& r = rt();
  read_policy(r);
  if (dyn_smem > r.smem_capacity) {
    fail("launch asks for %zu bytes of dynamic shared memory; %zu registered", dyn_smem, r.smem_capacity);
  }
  const int nthreads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (nthreads <= 0 || nthreads > 1024) fail("block of %d threads", nthreads);
  const size_t stack = stack_bytes();
  const size_t page = 4096;
  // One mapping per thread: a guard page below each stack catches overflows.
  std::vector<unsigned char*> maps(nthreads);
  for (auto& m : maps) {
    m = static_cast<unsigned char*>(mmap(nullptr, stack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (m == MAP_FAILED) fail("mmap of a fiber stack failed");
    mprotect(m, page, PROT_NONE);
  }
  r.kernel = kernel;
  Block b;
  b.dim = block_dim;
  b.grid = grid;
  b.coop = coop;
  b.threads.resize(nthreads);
  b.warps.resize((nthreads + kWarpSize - 1) / kWarpSize);
  b.dyn_smem = r.smem_base;
  b.dyn_smem_size = dyn_smem;
  r.block = &b;
  std::vector<int> order(nthreads);
  for (const uint3 idx : idxs) {
    b.idx = idx;
    b.barrier_arrived = 0;
    b.epoch = 0;
    for (auto& w : b.warps) w = WarpState{};
    // Fresh shared memory holds garbage on a GPU: fill it with a NaN pattern.
    if (r.smem_base) {
#if CUDASIM_ASAN
      ASAN_UNPOISON_MEMORY_REGION(r.smem_base, r.smem_capacity);
#endif
      std::memset(r.smem_base, 0xff, r.smem_capacity);
#if CUDASIM_ASAN
      ASAN_POISON_MEMORY_REGION(r.smem_base + dyn_smem, r.smem_capacity - dyn_smem);
#endif
    }
    smem_check::on_block_start(b);
    for (int i = 0; i < nthreads; ++i) {
      Thread& t = b.threads[i];
      t.linear = i;
      t.idx = uint3{static_cast<unsigned>(i % block_dim.x), static_cast<unsigned>(i / block_dim.x % block_dim.y),
                    static_cast<unsigned>(i / (block_dim.x * block_dim.y))};
      t.lane = i % kWarpSize;
      t.warp = i / kWarpSize;
      t.state = State::kRunnable;
      t.uncommitted.clear();
      t.groups.clear();
      t.stack = maps[i] + page;
      t.stack_size = stack;
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = t.stack;
      t.ctx.uc_stack.ss_size = stack;
      t.ctx.uc_link = nullptr;
      makecontext(&t.ctx, fiber_entry, 0);
      order[i] = r.policy == 2 ? nthreads - 1 - i : i;
    }
    for (;;) {
      if (r.shuffle) std::shuffle(order.begin(), order.end(), r.rng);
      bool ran = false;
      for (int i : order) {
        Thread& t = b.threads[i];
        if (t.state != State::kRunnable) continue;
        ran = true;
        r.current = &t;
#if CUDASIM_ASAN
        void* fake = nullptr;
        __sanitizer_start_switch_fiber(&fake, t.stack, t.stack_size);
#endif
        r.in_fiber = true;
        swapcontext(&r.scheduler, &t.ctx);
        r.in_fiber = false;
#if CUDASIM_ASAN
        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
        if (r.policy != 0) break;  // greedy: rescan from the first fiber
      }
      if (live_threads(b) == 0) break;
      if (!ran) report_deadlock(b);
    }
    smem_check::on_block_end(b);
  }
#if CUDASIM_ASAN
  // The poison past dyn_smem outlives the thread: the shared memory is a thread_local array,
  // and glibc hands an exited thread's stack and TLS to the next thread it creates, whose own
  // thread_locals (this runtime's rng) then hit the stale poison (a use-after-poison report
  // that came and went with the OS's thread reuse in cooperative launches).
  if (r.smem_base) ASAN_UNPOISON_MEMORY_REGION(r.smem_base, r.smem_capacity);
#endif
  r.block = nullptr;
  r.current = nullptr;
  for (auto m : maps) munmap(m, stack + page);
}

inline std::vector<uint3> block_indices(dim3 grid) {
  std::vector<uint3> idxs;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) idxs.push_back(uint3{bx, by, bz});
  return idxs;
}

// Runs kernel() for every thread of every block of the grid, block after block.
inline void launch(dim3 grid, dim3 block_dim, size_t dyn_smem, const std::function<void()>& kernel) {
  run_blocks(block_indices(grid), grid, block_dim, dyn_smem, kernel, nullptr);
}

// A cooperative launch: every block on its own OS thread, all running at once.
inline void launch_cooperative(dim3 grid, dim3 block_dim, size_t dyn_smem, const std::function<void()>& kernel) {
  Coop coop;
  const std::vector<uint3> idxs = block_indices(grid);
  coop.blocks = static_cast<int>(idxs.size());
  if (std::getenv("CUDASIM_VERBOSE")) {
    std::fprintf(stderr, "cudasim: cooperative launch of (%u,%u,%u) x (%u,%u,%u), %zu bytes of dynamic shared memory\n",
                 grid.x, grid.y, grid.z, block_dim.x, block_dim.y, block_dim.z, dyn_smem);
  }
  std::atomic<unsigned long long> switches{0};
  std::vector<std::thread> workers;
  for (const uint3 idx : idxs) {
    workers.emplace_back([&, idx] {
      if (thread_init()) thread_init()();
      run_blocks({idx}, grid, block_dim, dyn_smem, kernel, &coop);
      coop.exit();
      switches += rt().switches;
    });
  }
  for (auto& w : workers) w.join();
  rt().switches += switches;
}

// The harness hands the thread_local array that `extern __shared__` names to the runtime.
inline void register_dynamic_smem(void* base, size_t capacity) {
  rt().smem_base = static_cast<unsigned char*>(base);
  rt().smem_capacity = capacity;
}

}  // namespace cudasim

// Defines the thread_local array behind `extern __shared__ ... NAME[]` in namespace NS.
// Also defines NS::cudasim_register_NAME(), which registers the calling OS thread's copy
// (hand it to cudasim::thread_init() for cooperative launches).
#define CUDASIM_DEFINE_DYNAMIC_SMEM(NS, NAME, BYTES)                              \
  namespace NS {                                                                  \
  alignas(128) thread_local unsigned char NAME[BYTES];                            \
  inline void cudasim_register_##NAME() { ::cudasim::register_dynamic_smem(NAME, sizeof(NAME)); } \
  }

// ---- CUDA built-ins ----------------------------------------------------------------------
