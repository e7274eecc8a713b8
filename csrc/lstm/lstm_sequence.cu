// Launchers of the persistent whole-sequence LSTM forward and backward
// (csrc/lstm/lstm_sequence.cuh), and the checks of whether they can serve a problem on the
// current device.
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "lstm_sequence.cuh"

namespace fastattn {
namespace {

// A co-resident grid for one problem on the current device, or why there is none.
struct SequencePlan {
  cudaError_t error = cudaSuccess;
  int64_t units = 0, slices = 0, batch_ctas = 0;
  size_t smem = 0;
};

// The slice width that planning picks for one kernel, device and hidden size, and how many CTAs
// of it are co-resident: everything of a plan but its batch CTAs.
struct SliceChoice {
  cudaError_t error = cudaSuccess;
  int64_t units = 0, slices = 0, resident = 0;
  size_t smem = 0;
};

// Picks the units per CTA of `kernel` so that a grid of its slices is co-resident. Fewer units
// per CTA means more CTAs share the recurrent product of a step; at most kMaxSlices slices keep
// the per-step grid barrier cheap. staged: the width of the kernel's staged rows (SequenceSmem).
// Raises the kernel's dynamic shared memory limit to the device's opt-in maximum, so that any
// width chosen, now or for another hidden size, can launch.
template <typename T, typename Kernel>
SliceChoice choose_slices(Kernel* kernel, int device, int sms, int64_t hidden, int64_t staged) {
  constexpr int64_t kMaxSlices = 64;
  SliceChoice choice;
  int cooperative = 0, max_smem = 0;
  cudaError_t& err = choice.error;
  err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
  }
  if (err != cudaSuccess) return choice;
  if (!cooperative) {
    err = cudaErrorNotSupported;
    return choice;
  }
  for (int64_t units = (hidden + kMaxSlices - 1) / kMaxSlices; units <= hidden; units *= 2) {
    const size_t smem = lstm::SequenceSmem<T>(hidden, units, staged).bytes();
    if (smem > static_cast<size_t>(max_smem)) break;  // larger slices only need more
    int ctas_per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, lstm::kSequenceThreads, smem);
    if (err != cudaSuccess) return choice;
    const int64_t resident = int64_t(ctas_per_sm) * sms;
    const int64_t slices = (hidden + units - 1) / units;
    if (slices > resident) continue;
    choice.units = units;
    choice.slices = slices;
    choice.resident = resident;
    choice.smem = smem;
    return choice;
  }
  err = cudaErrorCooperativeLaunchTooLarge;
  return choice;
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

// Choosing the slices costs an attribute call and an occupancy query per candidate width, and
// every layer call plans twice (the glue's fits check, then the launch), so each kernel keeps
// its choices by device, SM count (fixed on a device; the emulator varies it) and hidden size.
// A failed query is not kept: the next call asks again.
template <bool kBackward, typename T>
SequencePlan plan(int64_t batch, int64_t hidden) {
  SequencePlan planned;
  int device = 0, sms = 0;
  planned.error = cudaGetDevice(&device);
  if (planned.error == cudaSuccess) {
    planned.error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (planned.error != cudaSuccess) return planned;
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int64_t>, SliceChoice> chosen;
  SliceChoice choice;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(device, sms, hidden);
    const auto found = chosen.find(key);
    if (found != chosen.end()) {
      choice = found->second;
    } else {
      choice = choose_slices<T>(sequence_kernel<kBackward, T>(), device, sms, hidden,
                                kBackward ? 4 * hidden : hidden);
      if (choice.error == cudaSuccess || choice.error == cudaErrorCooperativeLaunchTooLarge ||
          choice.error == cudaErrorNotSupported) {
        chosen.emplace(key, choice);
      }
    }
  }
  planned.error = choice.error;
  if (planned.error != cudaSuccess) return planned;
  const int64_t tiles = (batch + lstm::kBatchTile - 1) / lstm::kBatchTile;
  planned.units = choice.units;
  planned.slices = choice.slices;
  planned.batch_ctas = std::min(tiles, choice.resident / choice.slices);
  planned.smem = choice.smem;
  return planned;
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
