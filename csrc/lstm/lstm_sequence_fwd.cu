// Launcher of the persistent whole-sequence LSTM forward (csrc/lstm/lstm_sequence.cuh).
#include <cstdint>

#include "lstm_sequence.cuh"

namespace fastattn {
namespace {

// Picks the units per CTA and the batch CTAs so that the whole grid is co-resident, then
// launches cooperatively. Fewer units per CTA means more CTAs share the recurrent product of
// a step; at most kMaxSlices slices keep the per-step grid barrier cheap.
template <typename T>
cudaError_t launch_sequence(const LstmSequenceFwdParams& p, cudaStream_t stream) {
  constexpr int64_t kMaxSlices = 64;
  int device = 0, sms = 0, cooperative = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err != cudaSuccess) return err;
  if (!cooperative) return cudaErrorNotSupported;

  auto kernel = lstm::lstm_sequence_fwd_kernel<T>;
  const int64_t tiles = (p.batch + lstm::kBatchTile - 1) / lstm::kBatchTile;
  for (int64_t units = (p.hidden + kMaxSlices - 1) / kMaxSlices; units <= p.hidden; units *= 2) {
    const size_t smem = lstm::SequenceSmem<T>(p.hidden, units).bytes();
    if (smem > static_cast<size_t>(max_smem)) break;  // larger slices only need more
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    int ctas_per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, lstm::kSequenceThreads, smem);
    if (err != cudaSuccess) return err;
    const int64_t resident = int64_t(ctas_per_sm) * sms;
    const int64_t slices = (p.hidden + units - 1) / units;
    if (slices > resident) continue;
    const int64_t batch_ctas = tiles < resident / slices ? tiles : resident / slices;
    LstmSequenceFwdParams params = p;
    int units_arg = static_cast<int>(units);
    void* args[] = {&params, &units_arg};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                       dim3(static_cast<unsigned>(slices), static_cast<unsigned>(batch_ctas)),
                                       dim3(lstm::kSequenceThreads), args, smem, stream);
  }
  return cudaErrorCooperativeLaunchTooLarge;
}

}  // namespace

cudaError_t launch_lstm_sequence_fwd(const LstmSequenceFwdParams& p, cudaStream_t stream) {
  if (p.seq_len == 0 || p.batch == 0) return cudaSuccess;
  if (p.hidden <= 0 || p.hidden > kLstmSequenceMaxHidden) return cudaErrorInvalidValue;
  return lstm::dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_sequence<typename decltype(tag)::type>(p, stream);
  });
}

}  // namespace fastattn
