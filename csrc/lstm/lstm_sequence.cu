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

// The plan of the forward (backward) kernel for T: it stages rows of h (of the 4H gate
// gradients).
template <typename T>
SequencePlan plan_fwd(int64_t batch, int64_t hidden) {
  return plan_sequence<T>(lstm::lstm_sequence_fwd_kernel<T>, batch, hidden, hidden);
}

template <typename T>
SequencePlan plan_bwd(int64_t batch, int64_t hidden) {
  return plan_sequence<T>(lstm::lstm_sequence_bwd_kernel<T>, batch, hidden, 4 * hidden);
}

template <typename Params, typename Kernel>
cudaError_t launch_planned(const SequencePlan& plan, Kernel* kernel, const Params& p,
                           cudaStream_t stream) {
  if (plan.error != cudaSuccess) return plan.error;
  Params params = p;
  int units_arg = static_cast<int>(plan.units);
  void* args[] = {&params, &units_arg};
  return cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(kernel),
      dim3(static_cast<unsigned>(plan.slices), static_cast<unsigned>(plan.batch_ctas)),
      dim3(lstm::kSequenceThreads), args, plan.smem, stream);
}

// Whether a problem of this size can take a persistent kernel on the current device; `plan`
// returns the dtype's plan (its error says why not).
template <typename Plan>
bool sequence_fits(Dtype dtype, int64_t hidden, Plan plan) {
  if (hidden <= 0 || hidden > kLstmSequenceMaxHidden) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      major < 8) {
    (void)cudaGetLastError();  // a failed query must not surface in a later, unrelated check
    return false;
  }
  const cudaError_t err = lstm::dispatch_dtype(dtype, plan);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err == cudaSuccess;
}

}  // namespace

cudaError_t launch_lstm_sequence_fwd(const LstmSequenceFwdParams& p, cudaStream_t stream) {
  if (p.seq_len == 0 || p.batch == 0) return cudaSuccess;
  if (p.hidden <= 0 || p.hidden > kLstmSequenceMaxHidden) return cudaErrorInvalidValue;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_planned(plan_fwd<T>(p.batch, p.hidden), lstm::lstm_sequence_fwd_kernel<T>, p,
                          stream);
  });
}

// T == 0 leaves grad_h0 / grad_c0 to the caller (no step reaches them: zeros).
cudaError_t launch_lstm_sequence_bwd(const LstmSequenceBwdParams& p, cudaStream_t stream) {
  if (p.seq_len == 0 || p.batch == 0) return cudaSuccess;
  if (p.hidden <= 0 || p.hidden > kLstmSequenceMaxHidden) return cudaErrorInvalidValue;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_planned(plan_bwd<T>(p.batch, p.hidden), lstm::lstm_sequence_bwd_kernel<T>, p,
                          stream);
  });
}

bool lstm_sequence_fwd_fits(Dtype dtype, int64_t batch, int64_t hidden) {
  return sequence_fits(dtype, hidden, [&](auto tag) {
    return plan_fwd<typename decltype(tag)::type>(batch, hidden).error;
  });
}

bool lstm_sequence_bwd_fits(Dtype dtype, int64_t batch, int64_t hidden) {
  return sequence_fits(dtype, hidden, [&](auto tag) {
    return plan_bwd<typename decltype(tag)::type>(batch, hidden).error;
  });
}

}  // namespace fastattn
