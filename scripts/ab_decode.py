"""A/B timing of CPU decode attention (L = 1 over S keys): fastattn's CPU kernel on one thread
and on all threads, against torch's scaled_dot_product_attention, in one process.

fastattn is timed as a user calls it, through fastattn.scaled_dot_product_attention (its eager
entry). Through the dispatcher (torch.ops.fastattn.attention_fwd, as this script called it until
then) a call cost ~7 us more on the Zen 5: 16.2 us against 9.1 at S = 512, 2 heads, fp32 (torch
12.7), which made a short sequence look slower than torch's.

Run it from the repository root on a quiet machine (timings on a shared one mean nothing):
    python -m scripts.ab_decode [--heads 1] [--dim 128] [--rounds 7] [--reps 50]

The rounds interleave the candidates, and each candidate keeps its fastest repetition in
each round; a ratio is the median over rounds of (time of the baseline / time of the
candidate), so above 1 means faster than the baseline. Where "fastattn 1 thread / all" stays
below 1 at small S, the kernel's kSplitParallelFlops (csrc/attention/attention_cpu.isa.cpp)
should rise to that S's flops, printed in the first column.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import fastattn
from benchmarks.harness import fastest


def ratios(dtype: torch.dtype, S: int, H: int, E: int, rounds: int, reps: int,
           threads: int) -> tuple[float, float]:
    """(1 thread / all threads, torch / fastattn on all threads), medians over rounds."""
    q = torch.randn(1, H, 1, E, dtype=dtype)
    k, v = torch.randn(1, H, S, E, dtype=dtype), torch.randn(1, H, S, E, dtype=dtype)

    def ours():
        return fastattn.scaled_dot_product_attention(q, k, v)

    def theirs():
        return F.scaled_dot_product_attention(q, k, v)

    split, vs_torch = [], []
    for _ in range(rounds):
        torch.set_num_threads(1)
        one = fastest(ours, reps)
        torch.set_num_threads(threads)
        all_threads = fastest(ours, reps)
        torch_time = fastest(theirs, reps)
        split.append(one / all_threads)
        vs_torch.append(torch_time / all_threads)
    return statistics.median(split), statistics.median(vs_torch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    E, H = args.dim, args.heads
    print(f"threads {threads}, heads {H}, head dim {E}; ratios: median over {args.rounds} rounds")
    print(f"{'dtype':>9} {'S':>6} {'flops':>8} {'1 thread / all':>15} {'torch / fastattn':>17}")
    for dtype in (torch.float32, torch.bfloat16):
        for S in (int(s) for s in args.lengths.split(",")):
            split, vs_torch = ratios(dtype, S, H, E, args.rounds, args.reps, threads)
            flops = 2.0 * H * S * 2 * E
            print(f"{str(dtype)[6:]:>9} {S:>6} {flops:>8.1e} {split:>15.2f} {vs_torch:>17.2f}")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
