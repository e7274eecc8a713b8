// The head dims the CUDA attention kernels are compiled for (Ev == E), listed once: the
// launcher's switch (csrc/attention/attention_launch.h), the glue's check and error message
// (csrc/attention/attention_cuda.cpp) and Python's feature check (fastattn._C
// .attention_cuda_head_dims(), read by fastattn/ops/backends.py) all read this array. Each
// entry needs its csrc/attention/instances/attention_{fwd,bwd}_{fp16,bf16}_hdim<E>.cu files.
// Torch-free and CUDA-free, so the CPU-only build exposes it too.
#pragma once

#include <cstddef>

namespace fastattn {

inline constexpr int kAttentionCudaHeadDims[] = {32, 64, 96, 128, 192, 256};
inline constexpr std::size_t kNumAttentionCudaHeadDims =
    sizeof(kAttentionCudaHeadDims) / sizeof(kAttentionCudaHeadDims[0]);

constexpr bool attention_cuda_supports_head_dim(int head_dim) {
  for (int compiled : kAttentionCudaHeadDims) {
    if (compiled == head_dim) return true;
  }
  return false;
}

}  // namespace fastattn
