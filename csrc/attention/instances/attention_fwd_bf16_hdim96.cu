// One compiled config (forward, bf16, head dim 96): kept apart so configs compile in parallel.
#include "../attention_fwd.cuh"

namespace fastattn {
namespace attn {
template cudaError_t launch_attention_fwd<__nv_bfloat16, 96>(const AttentionParams&, cudaStream_t);
}  // namespace attn
}  // namespace fastattn
