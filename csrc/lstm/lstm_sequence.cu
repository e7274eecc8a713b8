// Launchers of the persistent whole-sequence LSTM forward and backward
// (csrc/lstm/lstm_sequence.cuh), and the checks of whether they can serve a problem on the
// current device.
#include <cstdint>

#include "lstm_sequence.cuh"

namespace fastattn {
namespace {

// A co-resident grid for one problem on the current device, or why there is none.
struct SequencePlan {
  cudaError_t error = cudaSuccess;
  int64_t units = 0, slices = 0, batch_ctas = 0;
  size_t smem = 0;
};

// Picks the units per CTA and the batch CTAs so that the whole grid of `kernel` is co-resident.
// Fewer units per CTA means more CTAs share the recurrent product of a step; at most kMaxSlices
// slices keep the per-step grid barrier cheap. staged: the width of the kernel's staged rows
// (SequenceSmem). Sets the kernel's dynamic shared memory limit.
template <typename T, typename Kernel>
SequencePlan plan_sequence(Kernel* kernel, int64_t batch, int64_t hidden, int64_t staged) {
  constexpr int64_t kMaxSlices = 64;
  SequencePlan plan;
  int device = 0, sms = 0, cooperative = 0, max_smem = 0;
  cudaError_t& err = plan.error;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err != cudaSuccess) return plan;
  if (!cooperative) {
    err = cudaErrorNotSupported;
    return plan;
  }
  const int64_t tiles = (batch + lstm::kBatchTile - 1) / lstm::kBatchTile;
  for (int64_t units = (hidden + kMaxSlices - 1) / kMaxSlices; units <= hidden; units *= 2) {
    const size_t smem = lstm::SequenceSmem<T>(hidden, units, staged).bytes();
    if (smem > static_cast<size_t>(max_smem)) break;  // larger slices only need more
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return plan;
    int ctas_per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, lstm::kSequenceThreads, smem);
    if (err != cudaSuccess) return plan;
    const int64_t resident = int64_t(ctas_per_sm) * sms;
    const int64_t slices = (hidden + units - 1) / units;
    if (slices > resident) continue;
    plan.units = units;
    plan.slices = slices;
    plan.batch_ctas = tiles < resident / slices ? tiles : resident / slices;
    plan.smem = smem;
    return plan;
  }
  err = cudaErrorCooperativeLaunchTooLarge;
  return plan;
}

// The forward or the backward kernel for T, and its plan: the forward stages rows of h, the
// backward rows of the 4H gate gradients.
template <bool kBackward, typename T>
auto* sequence_kernel() {
  if constexpr (kBackward) {
    return lstm::lstm_sequence_bwd_kernel<T>;
  } else {
    return lstm::lstm_sequence_fwd_kernel<T>;
  }
}

template <bool kBackward, typename T>
SequencePlan plan(int64_t batch, int64_t hidden) {
  return plan_sequence<T>(sequence_kernel<kBackward, T>(), batch, hidden,
                          kBackward ? 4 * hidden : hidden);
}

// LstmSequenceFwdParams or LstmSequenceBwdParams: launches its kernel with the planned grid.
template <bool kBackward, typename Params>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  if (p.seq_len == 0 || p.batch == 0) return cudaSuccess;
  if (p.hidden <= 0 || p.hidden > kLstmSequenceMaxHidden) return cudaErrorInvalidValue;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const SequencePlan planned = plan<kBackward, T>(p.batch, p.hidden);
    if (planned.error != cudaSuccess) return planned.error;
    Params params = p;
    int units_arg = static_cast<int>(planned.units);
    void* args[] = {&params, &units_arg};
    return cudaLaunchCooperativeKernel(
        reinterpret_cast<const void*>(sequence_kernel<kBackward, T>()),
        dim3(static_cast<unsigned>(planned.slices), static_cast<unsigned>(planned.batch_ctas)),
        dim3(lstm::kSequenceThreads), args, planned.smem, stream);
  });
}

// Whether a problem of this size can take the kernel on the current device.
template <bool kBackward>
bool fits(Dtype dtype, int64_t batch, int64_t hidden) {
  if (hidden <= 0 || hidden > kLstmSequenceMaxHidden) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      major < 8) {
    (void)cudaGetLastError();  // a failed query must not surface in a later, unrelated check
    return false;
  }
  const cudaError_t err = lstm::dispatch_dtype(dtype, [&](auto tag) {
    return plan<kBackward, typename decltype(tag)::type>(batch, hidden).error;
  });
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err == cudaSuccess;
}

}  // namespace

cudaError_t launch_lstm_sequence_fwd(const LstmSequenceFwdParams& p, cudaStream_t stream) {
  return launch<false>(p, stream);
}

// T == 0 leaves grad_h0 / grad_c0 to the caller (no step reaches them: zeros).
cudaError_t launch_lstm_sequence_bwd(const LstmSequenceBwdParams& p, cudaStream_t stream) {
  return launch<true>(p, stream);
}

bool lstm_sequence_fwd_fits(Dtype dtype, int64_t batch, int64_t hidden) {
  return fits<false>(dtype, batch, hidden);
}

bool lstm_sequence_bwd_fits(Dtype dtype, int64_t batch, int64_t hidden) {
  return fits<true>(dtype, batch, hidden);
}

}  // namespace fastattn
