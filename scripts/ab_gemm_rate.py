"""The CPU attention forward's rate as a fraction of torch.mm's rate, in one process (issue 15
item 4: fp32 forward >= 90% of the same run's fp32 GEMM rate on long sequences).

    python scripts/ab_gemm_rate.py [--dtype float32] [--rounds 7] [--reps 3] [--threads N]

The rounds interleave the forward and torch.mm of n x n (n = 2048, the benchmark roofline's
size on CPUs); each keeps its fastest repetition per round, and the printed fraction is
(forward GFLOP/s) / (torch.mm GFLOP/s) per round: median and spread. Forward FLOPs count as in
benchmarks/bench_attention.py (4 B H L S E, halved when causal). The same fractions from
process CPU time (every thread's) are printed too: on a shared machine wall-clock rates mean
nothing, while CPU time still compares the work each side does on the cores it gets.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import fastattn  # noqa: F401  (registers torch.ops.fastattn)

CASES = [  # B, H, L, E, causal
    (4, 8, 1024, 64, False),
    (1, 8, 4096, 64, True),
]


def fastest(fn, reps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the fastest of reps calls."""
    wall, cpu = math.inf, math.inf
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def forward(B: int, H: int, L: int, E: int, causal: bool, dtype: torch.dtype):
    q, k, v = (torch.randn(B, H, L, E, dtype=dtype) for _ in range(3))
    args = (None, None, 0.0, None, 1 / math.sqrt(E), -1, 0 if causal else -1, False, 0.0)
    flops = 4 * B * H * L * L * E * (0.5 if causal else 1.0)
    return (lambda: torch.ops.fastattn.attention_fwd(q, k, v, *args)), flops


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    mm_flops = 2 * n**3
    print(f"threads {args.threads}, {args.dtype}, fraction of torch.mm {n}^3's rate per round: "
          "median [min, max]")
    for B, H, L, E, causal in CASES:
        fwd, flops = forward(B, H, L, E, causal, dtype)
        fwd()
        torch.mm(a, b)
        by_wall, by_cpu = [], []
        for _ in range(args.rounds):
            fwd_wall, fwd_cpu = fastest(fwd, args.reps)
            mm_wall, mm_cpu = fastest(lambda: torch.mm(a, b), args.reps)
            by_wall.append(flops / fwd_wall / (mm_flops / mm_wall))
            by_cpu.append(flops / fwd_cpu / (mm_flops / mm_cpu))
        print(f"B{B} H{H} L{L} E{E}{' causal' if causal else ''}: "
              f"wall {spread(by_wall)}, cpu time {spread(by_cpu)}", flush=True)


if __name__ == "__main__":
    main()
