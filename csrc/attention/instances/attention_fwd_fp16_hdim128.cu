// One compiled config (forward, fp16, head dim 128): kept apart so configs compile in parallel.
#include "../attention_fwd.cuh"

namespace fastattn {
namespace attn {
template cudaError_t launch_attention_fwd<__half, 128>(const AttentionParams&, cudaStream_t);
}  // namespace attn
}  // namespace fastattn
