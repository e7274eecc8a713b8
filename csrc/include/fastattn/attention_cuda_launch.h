// The torch-free launch entry points of the CUDA attention kernels (csrc/attention/*.cu),
// called by the CUDA glue (attention_cuda.cpp, attention_varlen_cuda.cpp) with the params of
// fastattn/attention_params.h. Apart from that header so that the CPU build needs no CUDA
// headers.
#pragma once

#include <cuda_runtime_api.h>

#include "fastattn/attention_params.h"

namespace fastattn {

// The number of KV splits run_attention_fwd would like for this problem on a device with
// `num_sms` multiprocessors (1 = no split). The caller allocates the partial buffers.
int attention_fwd_num_splits(const AttentionParams& params, int num_sms);

// Launch on `stream`; each returns the first CUDA error (cudaSuccess when every launch
// was accepted). They do not synchronize.
cudaError_t run_attention_fwd(const AttentionParams& params, cudaStream_t stream);
cudaError_t run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);
// Writes k_new / v_new into the KV cache the params describe (cache_seqlens, block_table or
// cache_batch_idx, k / v as the cache). Rows whose position falls outside the cache (past
// kv_len, or a cache row / block index outside [0, cache_blocks)) are skipped, never written.
cudaError_t run_kv_cache_append(const AttentionParams& params, cudaStream_t stream);

}  // namespace fastattn
