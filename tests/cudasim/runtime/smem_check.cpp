// smem_check.cpp: the race checker and bank-conflict counter (see smem_check.h), plus the
// __tsan_* entry points that -fsanitize=thread instrumentation calls. This file is compiled
// WITHOUT that instrumentation (its own loads and stores must not call back into it).
#include "core.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace cudasim {
namespace smem_check {
namespace {

constexpr uint32_t kNever = 0xffffffffu;
constexpr int16_t kNobody = -1, kSeveral = -2;

// What the checker knows of one byte of shared memory in the current barrier interval.
struct ByteState {
  uint32_t write_epoch = kNever;  // block barrier count at the last write
  uint32_t writer_sync = 0;       // the writer's warp collective count at that write
  uint32_t read_epoch = kNever;   // block barrier count at the reads recorded below
  uint32_t reader_sync = 0;       // the latest reader's warp collective count
  uint32_t write_site = 0, read_site = 0;  // indices into sites()
  int16_t writer = kNobody;
  int16_t reader = kNobody;       // kSeveral: more than one thread read it
  int16_t reader_warp = kNobody;  // kSeveral: readers in more than one warp
};

struct Access {
  int lane;
  uint32_t offset;
  uint32_t size;
};

struct GroupKey {
  int warp;
  uint64_t site;
  uint32_t occurrence;
  bool operator==(const GroupKey& o) const { return warp == o.warp && site == o.site && occurrence == o.occurrence; }
};
struct GroupKeyHash {
  size_t operator()(const GroupKey& k) const {
    return std::hash<uint64_t>()(k.site * 1000003u ^ (uint64_t(k.occurrence) << 8) ^ uint64_t(k.warp));
  }
};

// Per OS thread (a cooperative launch runs one block per OS thread).
struct State {
  std::vector<ByteState> bytes;
  std::vector<Site> site_table{Site{}};
  std::map<std::tuple<uintptr_t, const char*, int>, uint32_t> site_index;
  // Bank counting: per CUDA thread, how often it executed each site; per warp instruction,
  // the lanes' accesses.
  std::vector<std::unordered_map<uint64_t, uint32_t>> executions;
  std::unordered_map<GroupKey, std::vector<Access>, GroupKeyHash> groups;
};
State& state() {
  static thread_local State s;
  return s;
}

struct BankStats {
  unsigned long long instructions = 0, wavefronts = 0, conflicts = 0;
};
std::mutex stats_mutex;
// Never destroyed: the report runs from an atexit handler, after function-local statics
// constructed later than its registration would already be gone.
std::map<std::string, BankStats>& bank_stats() {
  static auto* m = new std::map<std::string, BankStats>;
  return *m;
}
std::string& kernel_name() {
  static auto* name = new std::string("?");
  return *name;
}

bool race_check_enabled() {
  static const bool on = !std::getenv("CUDASIM_RACECHECK") || std::strcmp(std::getenv("CUDASIM_RACECHECK"), "0");
  return on;
}
bool bank_report_enabled() {
  static const bool on = std::getenv("CUDASIM_BANK_REPORT") != nullptr;
  return on;
}

uint32_t site_id(const Site& s) {
  State& st = state();
  const auto key = std::make_tuple(s.pc, s.file, s.line);
  const auto it = st.site_index.find(key);
  if (it != st.site_index.end()) return it->second;
  st.site_table.push_back(s);
  const uint32_t id = static_cast<uint32_t>(st.site_table.size() - 1);
  st.site_index.emplace(key, id);
  return id;
}

// "function at file:line" of a code address, through addr2line on this executable.
std::string describe(const Site& s) {
  if (s.file) return std::string(s.file) + ":" + std::to_string(s.line);
  if (!s.pc) return "?";
  Dl_info info{};
  uintptr_t rel = s.pc - 1;  // a return address: the access is the instruction before it
  if (dladdr(reinterpret_cast<void*>(s.pc), &info) && info.dli_fbase) rel -= reinterpret_cast<uintptr_t>(info.dli_fbase);
  // The executable's own path: in the addr2line child /proc/self/exe would be addr2line.
  char exe[4096] = {};
  if (readlink("/proc/self/exe", exe, sizeof(exe) - 1) <= 0) return "?";
  char cmd[4600];
  std::snprintf(cmd, sizeof(cmd), "addr2line -C -f -i -e '%s' 0x%lx 2>/dev/null", exe, static_cast<unsigned long>(rel));
  std::string out;
  if (FILE* f = popen(cmd, "r")) {
    char line[1024];
    while (std::fgets(line, sizeof(line), f)) {
      std::string l(line);
      while (!l.empty() && l.back() == '\n') l.pop_back();
      if (l.size() > 160) l = l.substr(0, 157) + "...";
      out += "\n      " + l;
    }
    pclose(f);
  }
  char pc[64];
  std::snprintf(pc, sizeof(pc), "pc +0x%lx", static_cast<unsigned long>(rel));
  return out.empty() ? std::string(pc) : std::string(pc) + out;
}

[[noreturn]] void report(const char* kind, const Block& b, const Thread& t, uint32_t offset, int other,
                         uint32_t other_site, const Site& here) {
  const State& st = state();
  std::fprintf(stderr,
               "cudasim: shared-memory race (%s) in kernel %s, block (%u,%u,%u), barrier interval %u:\n"
               "  thread %d (warp %d) accesses shared byte %u at %s\n"
               "  thread %s (warp %s) accessed it at %s\n"
               "  with no __syncthreads (or, within a warp, no warp collective) between\n",
               kind, kernel_name().c_str(), b.idx.x, b.idx.y, b.idx.z, b.epoch, t.linear, t.warp, offset,
               describe(here).c_str(), other >= 0 ? std::to_string(other).c_str() : "(several)",
               other >= 0 ? std::to_string(other / kWarpSize).c_str() : "?", describe(st.site_table[other_site]).c_str());
  std::abort();
}

// Was `warp` synchronized (by a collective of the whole warp) after its collective count was
// `sync_then`?
bool warp_synced(const Block& b, int16_t warp, int16_t my_warp, uint32_t sync_then) {
  return warp == my_warp && b.warps[my_warp].sync_epoch > sync_then;
}

void record_for_banks(const Thread& t, uint64_t site_key, uint32_t offset, uint32_t size) {
  State& st = state();
  const uint32_t occurrence = st.executions[t.linear][site_key]++;
  st.groups[GroupKey{t.warp, site_key, occurrence}].push_back(Access{t.lane, offset, size});
}

void access(const void* p, size_t n, bool is_write, const Site& site) {
  Runtime& r = rt();
  if (!r.in_fiber || !r.block) return;
  const auto* c = static_cast<const unsigned char*>(p);
  Block& b = *r.block;
  if (c < b.dyn_smem || c >= b.dyn_smem + b.dyn_smem_size) return;
  const Thread& t = *r.current;
  const uint32_t offset = static_cast<uint32_t>(c - b.dyn_smem);
  const uint64_t site_key = site.pc ? site.pc : (reinterpret_cast<uintptr_t>(site.file) * 131u + site.line);
  if (bank_report_enabled()) record_for_banks(t, site_key, offset, static_cast<uint32_t>(n));
  if (!race_check_enabled()) return;
  State& st = state();
  const uint32_t id = site_id(site);
  const int16_t me = static_cast<int16_t>(t.linear), my_warp = static_cast<int16_t>(t.warp);
  const uint32_t my_sync = b.warps[t.warp].sync_epoch;
  for (size_t i = 0; i < n && offset + i < st.bytes.size(); ++i) {
    ByteState& s = st.bytes[offset + i];
    // Read-after-write and write-after-write: the last writer is another thread of this
    // interval that this thread has not synchronized with.
    if (s.write_epoch == b.epoch && s.writer != me &&
        !warp_synced(b, static_cast<int16_t>(s.writer / kWarpSize), my_warp, s.writer_sync)) {
      report(is_write ? "write after write" : "read after write", b, t, offset + static_cast<uint32_t>(i), s.writer,
             s.write_site, site);
    }
    if (is_write) {
      // Write-after-read: another thread of this interval read the byte this one overwrites.
      if (s.read_epoch == b.epoch && s.reader != me && !warp_synced(b, s.reader_warp, my_warp, s.reader_sync)) {
        report("write after read", b, t, offset + static_cast<uint32_t>(i), s.reader, s.read_site, site);
      }
      s.write_epoch = b.epoch;
      s.writer = me;
      s.writer_sync = my_sync;
      s.write_site = id;
    } else {
      if (s.read_epoch != b.epoch) {
        s.read_epoch = b.epoch;
        s.reader = me;
        s.reader_warp = my_warp;
      } else {
        if (s.reader != me) s.reader = kSeveral;
        if (s.reader_warp != my_warp) s.reader_warp = kSeveral;
      }
      s.reader_sync = my_sync;
      s.read_site = id;
    }
  }
}

// Wavefronts of one warp instruction: per phase, the most distinct 4-byte words in one bank.
unsigned long long wavefronts(const std::vector<Access>& accesses) {
  uint32_t size = 0;
  for (const Access& a : accesses) size = std::max(size, a.size);
  const int lanes_per_phase = size <= 4 ? 32 : size <= 8 ? 16 : 8;
  unsigned long long total = 0;
  for (int phase = 0; phase < kWarpSize / lanes_per_phase; ++phase) {
    std::vector<uint32_t> words[32];
    bool any = false;
    for (const Access& a : accesses) {
      if (a.lane / lanes_per_phase != phase) continue;
      any = true;
      for (uint32_t w = a.offset / 4; w <= (a.offset + a.size - 1) / 4; ++w) {
        auto& bank = words[w % 32];
        if (std::find(bank.begin(), bank.end(), w) == bank.end()) bank.push_back(w);
      }
    }
    if (!any) continue;
    size_t most = 1;
    for (const auto& bank : words) most = std::max(most, bank.size());
    total += most;
  }
  return total;
}

void flush_bank_groups() {
  State& st = state();
  if (st.groups.empty()) return;
  BankStats local;
  for (const auto& [key, accesses] : st.groups) {
    const unsigned long long w = wavefronts(accesses);
    uint32_t size = 0;
    for (const Access& a : accesses) size = std::max(size, a.size);
    const int phases_used = [&] {
      const int per = size <= 4 ? 32 : size <= 8 ? 16 : 8;
      bool used[4] = {};
      for (const Access& a : accesses) used[a.lane / per] = true;
      return int(used[0]) + used[1] + used[2] + used[3];
    }();
    ++local.instructions;
    local.wavefronts += w;
    local.conflicts += w - phases_used;
  }
  st.groups.clear();
  std::lock_guard<std::mutex> lock(stats_mutex);
  BankStats& s = bank_stats()[kernel_name()];
  s.instructions += local.instructions;
  s.wavefronts += local.wavefronts;
  s.conflicts += local.conflicts;
}

void print_bank_report() {
  std::lock_guard<std::mutex> lock(stats_mutex);
  for (const auto& [name, s] : bank_stats()) {
    std::printf("cudasim bank conflicts: %-120.120s %10llu shared-memory instructions %10llu wavefronts %10llu conflicts (%.2f per instruction)\n",
                name.c_str(), s.instructions, s.wavefronts, s.conflicts,
                s.instructions ? double(s.conflicts) / double(s.instructions) : 0.0);
  }
  std::fflush(stdout);
}

}  // namespace

void on_block_start(Block& b) {
  State& st = state();
  st.bytes.assign(b.dyn_smem_size, ByteState{});
  st.executions.assign(b.threads.size(), {});
  st.groups.clear();
  if (bank_report_enabled()) {
    static std::once_flag once;
    std::call_once(once, [] { std::atexit(print_bank_report); });
  }
}
void on_barrier(Block&) {
  if (bank_report_enabled()) flush_bank_groups();
}
void on_block_end(Block&) {
  if (bank_report_enabled()) flush_bank_groups();
}
void read(const void* p, size_t n, Site site) { access(p, n, false, site); }
void write(const void* p, size_t n, Site site) { access(p, n, true, site); }
void raw_copy(void* dst, const void* src, size_t n) { std::memcpy(dst, src, n); }

void set_kernel(const void* kernel_address) {
  Dl_info info{};
  std::string name = "?";
  if (dladdr(kernel_address, &info) && info.dli_sname) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    name = status == 0 && demangled ? demangled : info.dli_sname;
    std::free(demangled);
  }
  std::lock_guard<std::mutex> lock(stats_mutex);
  kernel_name() = name;
}

}  // namespace smem_check
}  // namespace cudasim

// ---- entry points of GCC's -fsanitize=thread instrumentation ---------------------------
// Loads and stores report to the checker with their code address; atomics (only in the
// host runtime: std::thread, std::function, shared state of cooperative launches) do what
// they say, sequentially consistent.
using cudasim::smem_check::Site;
#define CUDASIM_TSAN_ACCESS(N)                                                                                          \
  extern "C" void __tsan_read##N(void* p) { cudasim::smem_check::read(p, N, Site{reinterpret_cast<uintptr_t>(__builtin_return_address(0))}); } \
  extern "C" void __tsan_write##N(void* p) { cudasim::smem_check::write(p, N, Site{reinterpret_cast<uintptr_t>(__builtin_return_address(0))}); } \
  extern "C" void __tsan_unaligned_read##N(void* p) { cudasim::smem_check::read(p, N, Site{reinterpret_cast<uintptr_t>(__builtin_return_address(0))}); } \
  extern "C" void __tsan_unaligned_write##N(void* p) { cudasim::smem_check::write(p, N, Site{reinterpret_cast<uintptr_t>(__builtin_return_address(0))}); }
CUDASIM_TSAN_ACCESS(1)
CUDASIM_TSAN_ACCESS(2)
CUDASIM_TSAN_ACCESS(4)
CUDASIM_TSAN_ACCESS(8)
CUDASIM_TSAN_ACCESS(16)
extern "C" void __tsan_read_range(void* p, unsigned long n) {
  cudasim::smem_check::read(p, n, Site{reinterpret_cast<uintptr_t>(__builtin_return_address(0))});
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  cudasim::smem_check::write(p, n, Site{reinterpret_cast<uintptr_t>(__builtin_return_address(0))});
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#define CUDASIM_TSAN_ATOMIC(BITS, T)                                                                                    \
  extern "C" T __tsan_atomic##BITS##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }    \
  extern "C" void __tsan_atomic##BITS##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }    \
  extern "C" T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##BITS##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##BITS##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                            \
  }                                                                                                                     \
  extern "C" int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                  \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                             \
  }                                                                                                                     \
  extern "C" T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                      \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                  \
    return c;                                                                                                           \
  }
CUDASIM_TSAN_ATOMIC(8, unsigned char)
CUDASIM_TSAN_ATOMIC(16, unsigned short)
CUDASIM_TSAN_ATOMIC(32, unsigned int)
CUDASIM_TSAN_ATOMIC(64, unsigned long long)
