// Temporary buffers of the CPU kernels, kept per thread across calls.
//
// A buffer of a few MB allocated and freed on every call (the LSTM layer kernels' transposed
// weights and state, the attention forward's packed key tiles) goes back to the system on free
// whenever glibc trims its heap, and the next call faults every page in afresh: at T32 B16 H256
// (Zen 5, 2 threads) that made the LSTM's training forward 1.65 ms a call in one process and
// 0.90 in the next, from ~1100 page faults a call. A scratch buffer instead takes a block that its
// thread keeps for later calls.
//
// For the per-ISA kernel builds (`*.isa.cpp`, see cpu_isa.h): included inside no namespace, it
// opens fastattn::FASTATTN_ISA_NAMESPACE itself, so that no inline function compiled for one ISA
// stands in for another's at link time (each build keeps its own blocks; one build runs a call).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace fastattn {
namespace FASTATTN_ISA_NAMESPACE {

// Up to this many bytes a buffer's block is kept for the thread's later calls; a larger one is
// the call's alone, so that one long sequence does not pin its memory in every pool thread for
// the life of the process. 16 MiB holds an H1024 LSTM's transposed w_hh.
constexpr int64_t kMaxKeptScratchBytes = int64_t{16} << 20;

namespace scratch_detail {

struct FreeAligned {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t{64}); }
};
using Block = std::unique_ptr<char[], FreeAligned>;

inline Block allocate(int64_t bytes) {
  return Block(static_cast<char*>(::operator new[](bytes, std::align_val_t{64})));
}

// A thread's kept blocks, each held by at most one buffer at a time. They never shrink.
struct Kept {
  Block block;
  int64_t bytes = 0;
  bool busy = false;
};
inline std::vector<Kept>& thread_blocks() {
  thread_local std::vector<Kept> blocks;
  return blocks;
}

// The block for a request of `bytes`: the smallest free one that holds it, else the largest free
// one (to be grown), else blocks.size() (a new one). Calls that repeat the same requests find
// their blocks again, and a thread keeps about as many as it has buffers alive at once.
inline size_t pick(const std::vector<Kept>& blocks, int64_t bytes) {
  size_t fit = blocks.size(), largest = blocks.size();
  for (size_t i = 0; i < blocks.size(); ++i) {
    const Kept& k = blocks[i];
    if (k.busy) continue;
    if (k.bytes >= bytes && (fit == blocks.size() || k.bytes < blocks[fit].bytes)) fit = i;
    if (largest == blocks.size() || k.bytes > blocks[largest].bytes) largest = i;
  }
  return fit != blocks.size() ? fit : largest;
}

}  // namespace scratch_detail

// ScratchBuffer's zero-filled form.
struct ZeroFilled {};
inline constexpr ZeroFilled zero_filled{};

// n elements of T, 64-byte aligned, for the current thread's use in one call; their values are
// unspecified until written, or zeros when made with zero_filled. Not copyable or movable; it
// must end on the thread that created it.
template <typename T>
class ScratchBuffer {
 public:
  ScratchBuffer(int64_t n, ZeroFilled) : ScratchBuffer(n) {
    std::memset(static_cast<void*>(data_), 0, n_ * sizeof(T));
  }
  explicit ScratchBuffer(int64_t n) : n_(n) {
    const int64_t bytes = std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T));
    if (bytes > kMaxKeptScratchBytes) {
      owned_ = scratch_detail::allocate(bytes);
      data_ = reinterpret_cast<T*>(owned_.get());
      return;
    }
    auto& blocks = scratch_detail::thread_blocks();
    kept_ = scratch_detail::pick(blocks, bytes);
    if (kept_ == blocks.size()) blocks.emplace_back();
    scratch_detail::Kept& k = blocks[kept_];
    if (k.bytes < bytes) {
      k.block = scratch_detail::allocate(bytes);
      k.bytes = bytes;
    }
    k.busy = true;
    data_ = reinterpret_cast<T*>(k.block.get());
  }
  ~ScratchBuffer() {
    if (kept_ != kNone) scratch_detail::thread_blocks()[kept_].busy = false;
  }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;

  T* data() const { return data_; }
  int64_t size() const { return n_; }
  T& operator[](int64_t i) const { return data_[i]; }

 private:
  static constexpr size_t kNone = ~size_t{0};
  int64_t n_;
  scratch_detail::Block owned_;
  T* data_ = nullptr;
  size_t kept_ = kNone;  // the index of the thread's kept block this buffer holds
};

}  // namespace FASTATTN_ISA_NAMESPACE
}  // namespace fastattn
