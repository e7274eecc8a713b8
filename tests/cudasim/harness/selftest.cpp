// The emulator's own checks, each provoked on purpose by a tiny kernel: every mode must end
// in the report named in tests/test_cudasim.py, never in "not detected".
//   race-lockstep   a missing __syncthreads between a shared write and another warp's read;
//                   reported by the race checker even though lockstep order gives right values
//   race-war        a shared write while another warp may still read the old value
//   warp-synced     the same exchange within one warp, after __syncwarp: no report (ok)
//   barrier         __syncthreads reached by part of the block: divergence report
//   shfl            a shuffle reached by half a warp: divergence report naming both sites
//   deadlock        threads wait at a barrier that exited threads never reach
//   banks           a 32-way bank-conflicted column read, counted for the bank report (ok)
//   oob             a shared read past the launch's size (ASan build)
#include <cstdio>
#include <cstring>

namespace selftest {

__global__ void race_lockstep(float* out) {
  extern __shared__ __align__(16) unsigned char dyn[];
  float* s = reinterpret_cast<float*>(dyn);
  s[threadIdx.x] = float(threadIdx.x);
  // (the __syncthreads() that belongs here is missing)
  out[threadIdx.x] = s[(threadIdx.x + 32) % blockDim.x];
}
__global__ void race_war(float* out) {
  extern __shared__ __align__(16) unsigned char dyn[];
  float* s = reinterpret_cast<float*>(dyn);
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  const float mine = s[(threadIdx.x + 32) % blockDim.x];
  s[threadIdx.x] = mine + 1.0f;  // warp w overwrites what warp w - 1 may not have read yet
  out[threadIdx.x] = mine;
}
__global__ void warp_synced(float* out) {
  extern __shared__ __align__(16) unsigned char dyn[];
  float* s = reinterpret_cast<float*>(dyn);
  s[threadIdx.x] = float(threadIdx.x);
  __syncwarp();
  out[threadIdx.x] = s[threadIdx.x ^ 1];
}
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = 1.0f;
}
__global__ void divergent_shfl(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 2);
  out[threadIdx.x] = v;
}
__global__ void deadlock(float* out) {
  if (threadIdx.x >= 96) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}
__global__ void banks(float* out) {
  extern __shared__ __align__(16) unsigned char dyn[];
  float* s = reinterpret_cast<float*>(dyn);
  for (int i = 0; i < 32; ++i) s[threadIdx.x * 32 + i] = float(i);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x * 32];  // column read: every lane in bank 0
}
__global__ void smem_oob(float* out, int n_floats) {
  extern __shared__ __align__(16) unsigned char dyn[];
  float* s = reinterpret_cast<float*>(dyn);
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + n_floats - 1];  // the last thread reads past the launch's size
}

}  // namespace selftest

CUDASIM_DEFINE_DYNAMIC_SMEM(selftest, dyn, 64 * 1024)

int main(int argc, char** argv) {
  static float out[1024];
  cudasim::register_dynamic_smem(selftest::dyn, sizeof(selftest::dyn));
  const char* which = argc > 1 ? argv[1] : "";
  const dim3 one(1), block(128);
  const size_t bytes = 128 * sizeof(float);
  using namespace selftest;
  if (!std::strcmp(which, "race-lockstep")) cudasim::launch_kernel(race_lockstep, {one, block, bytes}, out);
  else if (!std::strcmp(which, "race-war")) cudasim::launch_kernel(race_war, {one, block, bytes}, out);
  else if (!std::strcmp(which, "warp-synced")) cudasim::launch_kernel(warp_synced, {one, block, bytes}, out);
  else if (!std::strcmp(which, "barrier")) cudasim::launch_kernel(divergent_barrier, {one, block, 0}, out);
  else if (!std::strcmp(which, "shfl")) cudasim::launch_kernel(divergent_shfl, {one, block, 0}, out);
  else if (!std::strcmp(which, "deadlock")) cudasim::launch_kernel(deadlock, {one, block, 0}, out);
  else if (!std::strcmp(which, "banks")) cudasim::launch_kernel(banks, {one, dim3(32), 32 * 32 * sizeof(float)}, out);
  else if (!std::strcmp(which, "oob")) cudasim::launch_kernel(smem_oob, {one, block, bytes}, out, 128);
  else {
    std::printf("unknown mode '%s'\n", which);
    return 2;
  }
  const bool expect_clean = !std::strcmp(which, "warp-synced") || !std::strcmp(which, "banks");
  std::printf("%s: %s\n", which, expect_clean ? "ok" : "not detected");
  return expect_clean ? 0 : 1;
}
