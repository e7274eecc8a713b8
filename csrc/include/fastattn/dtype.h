// The element types of every kernel's params struct (CPU and CUDA, attention and LSTM), named
// once. Torch-free and CUDA-free: kernels, glue and module.cpp all include it. Each glue maps
// the tensor's at::ScalarType to it and each kernel family switches on the ones it serves.
#pragma once

namespace fastattn {

enum class Dtype : int { Float32, Float64, BFloat16, Float16 };

}  // namespace fastattn
