// One compiled config (backward, bf16, head dim 64): kept apart so configs compile in parallel.
#include "../attention_bwd.cuh"

namespace fastattn {
namespace attn {
template cudaError_t launch_attention_bwd<__nv_bfloat16, 64>(const AttentionBwdParams&, cudaStream_t);
}  // namespace attn
}  // namespace fastattn
