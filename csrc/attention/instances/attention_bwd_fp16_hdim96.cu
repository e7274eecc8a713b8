// One compiled config (backward, fp16, head dim 96): kept apart so configs compile in parallel.
#include "../attention_bwd.cuh"

namespace fastattn {
namespace attn {
template cudaError_t launch_attention_bwd<__half, 96>(const AttentionBwdParams&, cudaStream_t);
}  // namespace attn
}  // namespace fastattn
