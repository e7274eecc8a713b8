"""Whether ATen's oneDNN micro-kernels (at::native::cpublas::brgemm, issue 15 item 3) could
serve fastattn's CPU tile products on this machine, and how fast they are.

Compiles a small probe against the installed torch (torch.utils.cpp_extension.load_inline,
about a minute), then prints cpublas::could_pack per dtype (true only where oneDNN has a
VNNI-packed kernel, i.e. AMX) and the single-thread GFLOP/s of one attention tile product
C[64, 64] += A[64, K] B[K, 64] through brgemm (bf16 with B VNNI-packed when could_pack says
so, fp32) next to torch.mm of the same tile, interleaved in rounds in one process (each
rate is the median over rounds of the best of `--reps` timed loops). fastattn's own at::vec
micro-kernel rate is the fp32 forward's in the benchmark suite. Run it on a quiet machine:
    python scripts/probe_brgemm.py [--rounds 5] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>

namespace cpublas = at::native::cpublas;

std::vector<bool> could_pack() {
  return {cpublas::could_pack(at::kFloat), cpublas::could_pack(at::kBFloat16),
          cpublas::could_pack(at::kHalf)};
}

// Best seconds per call, over reps loops of iters calls, of C[M,N] += A[M,K] B[K,N] through
// brgemm (B packed when could_pack(dtype)); returns -1 when the result is wrong.
template <typename T>
double time_tile(torch::Tensor a, torch::Tensor b, int64_t iters, int64_t reps) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const bool vnni = cpublas::could_pack(a.scalar_type());
  torch::Tensor bp = b;
  if (vnni) {
    bp = torch::empty_like(b);
    cpublas::pack(K, N, N, N, a.scalar_type(), a.scalar_type(), b.data_ptr(), bp.data_ptr());
  }
  auto c = torch::zeros({M, N}, a.options().dtype(torch::kFloat));
  cpublas::brgemm(M, N, K, K, N, N, false, a.data_ptr<T>(), bp.data_ptr<T>(),
                  c.data_ptr<float>(), vnni);
  const bool right = torch::allclose(c, torch::mm(a.to(torch::kFloat), b.to(torch::kFloat)),
                                     1e-2, 1e-2);
  double best = 1e9;
  for (int64_t r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) {
      cpublas::brgemm(M, N, K, K, N, N, true, a.data_ptr<T>(), bp.data_ptr<T>(),
                      c.data_ptr<float>(), vnni);
    }
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    best = std::min(best, dt.count() / iters);
  }
  cpublas::brgemm_release(vnni);
  return right ? best : -1.0;
}

double time_bf16(torch::Tensor a, torch::Tensor b, int64_t iters, int64_t reps) {
  return time_tile<at::BFloat16>(a, b, iters, reps);
}
double time_fp32(torch::Tensor a, torch::Tensor b, int64_t iters, int64_t reps) {
  return time_tile<float>(a, b, iters, reps);
}
"""

ITERS = 2000


def time_mm(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(ITERS):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - start) / ITERS)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as build_dir:
        probe = load_inline("fastattn_brgemm_probe", cpp_sources=[SOURCE],
                            functions=["could_pack", "time_bf16", "time_fp32"],
                            build_directory=build_dir, extra_cflags=["-O2"])
    torch.set_num_threads(1)
    fp32, bf16, fp16 = probe.could_pack()
    print(f"cpublas::could_pack: fp32 {fp32}, bf16 {bf16}, fp16 {fp16}")
    print("GFLOP/s of C[64,64] += A[64,K] B[K,64], one thread, median over rounds "
          "(nan: brgemm gave a wrong result):")
    print(f"{'K':>4} {'brgemm bf16':>12} {'torch.mm bf16':>14} {'brgemm fp32':>12} "
          f"{'torch.mm fp32':>14}")
    for K in (32, 64, 128):
        a, b = torch.randn(64, K), torch.randn(K, 64)
        ab, bb = a.bfloat16(), b.bfloat16()
        rates = {name: [] for name in ("bb", "mb", "bf", "mf")}
        flops = 2 * 64 * 64 * K
        for _ in range(args.rounds):
            for name, seconds in (
                ("bb", probe.time_bf16(ab, bb, ITERS, args.reps)),
                ("mb", time_mm(ab, bb, args.reps)),
                ("bf", probe.time_fp32(a, b, ITERS, args.reps)),
                ("mf", time_mm(a, b, args.reps)),
            ):
                rates[name].append(flops / seconds / 1e9 if seconds > 0 else float("nan"))
        med = {name: statistics.median(r) for name, r in rates.items()}
        print(f"{K:>4} {med['bb']:>12.1f} {med['mb']:>14.1f} {med['bf']:>12.1f} "
              f"{med['mf']:>14.1f}")


if __name__ == "__main__":
    main()
