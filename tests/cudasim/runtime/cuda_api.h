// cuda_api.h: what kernel sources and their launchers use from CUDA, for host C++ under
// cudasim: the built-in variables and intrinsics as macros over the fiber runtime (core.h),
// the runtime-API calls our launchers make (answered for a modelled device), the typed
// launch the source rewriter turns `<<<...>>>` into, and the part of cooperative_groups the
// kernels use. Included by cudasim.h after core.h.
#pragma once

#include "core.h"


#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::cudasim::self().idx)
#define blockIdx (::cudasim::block().idx)
#define blockDim (::cudasim::block().dim)
#define gridDim (::cudasim::block().grid)
#define warpSize 32

#define __syncthreads() ::cudasim::barrier(__FILE__, __LINE__, 0)
#define __syncthreads_or(p) (::cudasim::barrier(__FILE__, __LINE__, (p)), ::cudasim::block().barrier_result_or)
#define __syncthreads_and(p) (::cudasim::barrier(__FILE__, __LINE__, (p)), ::cudasim::block().barrier_result_and)
#define __syncthreads_count(p) (::cudasim::barrier(__FILE__, __LINE__, (p)), ::cudasim::block().barrier_result_count)
#define __shfl_xor_sync(mask, v, lm, ...) ::cudasim::shfl_generic(::cudasim::kShflXor, (mask), (v), (lm), ::cudasim::width_or_32(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_sync(mask, v, src, ...) ::cudasim::shfl_generic(::cudasim::kShfl, (mask), (v), (src), ::cudasim::width_or_32(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) ::cudasim::shfl_generic(::cudasim::kShflDown, (mask), (v), (d), ::cudasim::width_or_32(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) ::cudasim::shfl_generic(::cudasim::kShflUp, (mask), (v), (d), ::cudasim::width_or_32(__VA_ARGS__ + 0), __FILE__, __LINE__)
// __syncwarp(mask) is a collective of the lanes in mask (all of them when omitted).
#define __syncwarp(...) ::cudasim::syncwarp(::cudasim::mask_or_full(__VA_ARGS__ + 0u), __FILE__, __LINE__)
namespace cudasim {
constexpr int width_or_32(int w) { return w == 0 ? 32 : w; }
constexpr unsigned mask_or_full(unsigned m) { return m == 0 ? 0xffffffffu : m; }
inline void syncwarp(unsigned mask, const char* file, int line) {
  warp_collective(kSyncwarp, mask, file, line, [](Thread**) {});
}
}  // namespace cudasim

// Device math that host C++ lacks under these names.
using std::max;
using std::min;

// ---- host launch API -------------------------------------------------------------------
#include <map>
#include <tuple>

namespace cudasim {

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = 0) : grid(g), block(b), smem(s), stream(st) {}
};

inline std::map<const void*, int>& max_dynamic_smem() {
  static std::map<const void*, int> m;
  return m;
}

// Typed launchers by kernel address, for the runtime calls that take `const void* func`
// (cudaLaunchCooperativeKernel): filled when the typed kernel pointer passes through
// cudaFuncSetAttribute / cudaOccupancyMaxActiveBlocksPerMultiprocessor / launch_kernel.
using CoopInvoker = std::function<void(dim3, dim3, size_t, void**)>;
inline std::map<const void*, CoopInvoker>& kernels() {
  static std::map<const void*, CoopInvoker> m;
  return m;
}
template <typename... P, size_t... I>
std::tuple<std::decay_t<P>...> params_from_args(void** args, std::index_sequence<I...>) {
  return std::tuple<std::decay_t<P>...>(*static_cast<std::decay_t<P>*>(args[I])...);
}
template <typename... P>
void register_kernel(void (*kernel)(P...)) {
  kernels()[reinterpret_cast<const void*>(kernel)] = [kernel](dim3 g, dim3 b, size_t smem, void** args) {
    const std::tuple<std::decay_t<P>...> params = params_from_args<P...>(args, std::index_sequence_for<P...>{});
    launch_cooperative(g, b, smem, [&] { std::apply(kernel, params); });
  };
}
template <typename T>
void register_kernel(T*) {}

// The device the runtime stubs describe: CUDASIM_SMS multiprocessors (default 4), each with
// 2048 threads, 32 blocks and 228 KiB of shared memory (1 KiB reserved per block).
inline int& device_sms() {
  static int sms = std::getenv("CUDASIM_SMS") ? std::atoi(std::getenv("CUDASIM_SMS")) : 4;
  return sms;
}
inline int blocks_per_sm(int threads, size_t smem) {
  const int warps = (threads + kWarpSize - 1) / kWarpSize;
  int n = std::min(32, 64 / std::max(warps, 1));
  n = std::min<int>(n, static_cast<int>((228 * 1024) / (smem + 1024)));
  return n;
}

// A launch as the runtime would check it, then run under the simulator. Arguments are
// converted to the kernel's parameter types once, like a real launch.
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), LaunchConfig c, A&&... args) {
  const auto it = max_dynamic_smem().find(reinterpret_cast<const void*>(kernel));
  const size_t limit = it == max_dynamic_smem().end() ? 48 * 1024 : static_cast<size_t>(it->second);
  if (c.smem > limit) {
    std::fprintf(stderr, "cudasim: launch with %zu bytes of dynamic shared memory > %zu allowed for this kernel\n", c.smem, limit);
    return cudaErrorInvalidValue;
  }
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.y > 65535 || c.grid.z > 65535) return cudaErrorInvalidConfiguration;
  register_kernel(kernel);
  smem_check::set_kernel(reinterpret_cast<const void*>(kernel));
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  launch(c.grid, c.block, c.smem, [&] { std::apply(kernel, params); });
  return cudaSuccess;
}

}  // namespace cudasim

extern "C" __attribute__((weak)) cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > 227 * 1024) return cudaErrorInvalidValue;
    ::cudasim::max_dynamic_smem()[func] = value;
  }
  return cudaSuccess;
}
extern "C" __attribute__((weak)) cudaError_t cudaGetLastError(void) { return cudaSuccess; }
// The C++ overload cuda_runtime.h declares only for nvcc.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, enum cudaFuncAttribute attr, int value) {
  ::cudasim::register_kernel(entry);
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

extern "C" __attribute__((weak)) cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
extern "C" __attribute__((weak)) cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = ::cudasim::device_sms(); return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: ::cudasim::fail("cudaDeviceGetAttribute(%d) is not modelled", static_cast<int>(attr));
  }
}
extern "C" __attribute__((weak)) cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* func, int block_size, size_t smem) {
  const auto it = ::cudasim::max_dynamic_smem().find(func);
  const size_t limit = it == ::cudasim::max_dynamic_smem().end() ? 48 * 1024 : static_cast<size_t>(it->second);
  *num_blocks = smem > limit || block_size <= 0 || block_size > 1024 ? 0 : ::cudasim::blocks_per_sm(block_size, smem);
  return cudaSuccess;
}
// What cuda_runtime.h's template overload calls.
extern "C" __attribute__((weak)) cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* num_blocks, const void* func, int block_size, size_t smem, unsigned int) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, func, block_size, smem);
}
// Runs every block at once (one OS thread each); refuses a grid that could not be
// co-resident on the modelled device, like the real runtime.
extern "C" __attribute__((weak)) cudaError_t cudaLaunchCooperativeKernel(const void* func, dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t) {
  const auto k = ::cudasim::kernels().find(func);
  if (k == ::cudasim::kernels().end()) ::cudasim::fail("cudaLaunchCooperativeKernel of a kernel cudasim has not seen typed (pass it through cudaFuncSetAttribute or cudasim::register_kernel first)");
  const auto it = ::cudasim::max_dynamic_smem().find(func);
  const size_t limit = it == ::cudasim::max_dynamic_smem().end() ? 48 * 1024 : static_cast<size_t>(it->second);
  if (smem > limit) return cudaErrorInvalidValue;
  const long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (blocks > static_cast<long long>(::cudasim::blocks_per_sm(threads, smem)) * ::cudasim::device_sms()) return cudaErrorCooperativeLaunchTooLarge;
  ::cudasim::smem_check::set_kernel(func);
  k->second(grid, block, smem, args);
  return cudaSuccess;
}

// ld.global.cg: on the CPU every load is coherent.
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

// The part of cooperative_groups the kernels use (the real header is empty without nvcc).
namespace cooperative_groups {
struct grid_group {
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const { ::cudasim::grid_sync(file, line); }
  bool is_valid() const { return ::cudasim::block().coop != nullptr; }
};
inline grid_group this_grid() { return grid_group{}; }
struct thread_block {
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const { ::cudasim::barrier(file, line, 0); }
};
inline thread_block this_thread_block() { return thread_block{}; }
}  // namespace cooperative_groups
