// Launcher of the persistent whole-sequence LSTM forward (csrc/lstm/lstm_sequence.cuh), and
// the check of whether it can serve a problem on the current device.
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

// Picks the units per CTA and the batch CTAs so that the whole grid is co-resident. Fewer
// units per CTA means more CTAs share the recurrent product of a step; at most kMaxSlices
// slices keep the per-step grid barrier cheap. Sets the kernel's dynamic shared memory limit.
template <typename T>
SequencePlan plan_sequence(const LstmSequenceFwdParams& p) {
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
  auto kernel = lstm::lstm_sequence_fwd_kernel<T>;
  const int64_t tiles = (p.batch + lstm::kBatchTile - 1) / lstm::kBatchTile;
  for (int64_t units = (p.hidden + kMaxSlices - 1) / kMaxSlices; units <= p.hidden; units *= 2) {
    const size_t smem = lstm::SequenceSmem<T>(p.hidden, units).bytes();
    if (smem > static_cast<size_t>(max_smem)) break;  // larger slices only need more
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return plan;
    int ctas_per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, lstm::kSequenceThreads, smem);
    if (err != cudaSuccess) return plan;
    const int64_t resident = int64_t(ctas_per_sm) * sms;
    const int64_t slices = (p.hidden + units - 1) / units;
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

template <typename T>
cudaError_t launch_sequence(const LstmSequenceFwdParams& p, cudaStream_t stream) {
  const SequencePlan plan = plan_sequence<T>(p);
  if (plan.error != cudaSuccess) return plan.error;
  LstmSequenceFwdParams params = p;
  int units_arg = static_cast<int>(plan.units);
  void* args[] = {&params, &units_arg};
  return cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(lstm::lstm_sequence_fwd_kernel<T>),
      dim3(static_cast<unsigned>(plan.slices), static_cast<unsigned>(plan.batch_ctas)),
      dim3(lstm::kSequenceThreads), args, plan.smem, stream);
}

}  // namespace

cudaError_t launch_lstm_sequence_fwd(const LstmSequenceFwdParams& p, cudaStream_t stream) {
  if (p.seq_len == 0 || p.batch == 0) return cudaSuccess;
  if (p.hidden <= 0 || p.hidden > kLstmSequenceMaxHidden) return cudaErrorInvalidValue;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_sequence<typename decltype(tag)::type>(p, stream);
  });
}

bool lstm_sequence_fwd_fits(const LstmSequenceFwdParams& p) {
  if (p.hidden <= 0 || p.hidden > kLstmSequenceMaxHidden) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      major < 8) {
    (void)cudaGetLastError();  // a failed query must not surface in a later, unrelated check
    return false;
  }
  const cudaError_t err = lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    return plan_sequence<typename decltype(tag)::type>(p).error;
  });
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err == cudaSuccess;
}

}  // namespace fastattn
