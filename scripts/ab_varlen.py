"""A/B timing of CPU varlen attention (issue 16's rows) in one process: the fused
fastattn.attention_varlen against the per-sequence SDPA loop, the per-sequence fastattn loop it
replaced and (non-causal) SDPA on nested tensors, with the benchmarks' own baselines.

Run it from the repository root on a quiet machine (wall timings on a shared one mean little;
--clock cpu compares CPU time instead, best with --threads 1):
    python -m scripts.ab_varlen [--case many|long|long-noncausal|...] [--pass fwd|fwd+bwd]
                                [--rounds 7] [--reps 5] [--threads N] [--clock wall|cpu]

The rounds interleave the candidates (fastattn, then each baseline), and each candidate keeps
its fastest repetition in each round; a ratio is (time of the baseline / time of the fused op)
in the same round, so above 1 means fastattn is faster. Printed: the median ratio over rounds
and the spread (min..max), whose width says how noisy the machine was.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastattn
from benchmarks.bench_attention_features import cu_seqlens, nested, per_sequence
from benchmarks.harness import attention_call, fastest
from benchmarks.shapes import VARLEN_FULL_LENGTHS, VARLEN_MANY_LENGTHS

CASES = {
    "many": (VARLEN_MANY_LENGTHS, True),
    "many-noncausal": (VARLEN_MANY_LENGTHS, False),
    "long": (VARLEN_FULL_LENGTHS, True),
    "long-noncausal": (VARLEN_FULL_LENGTHS, False),
}
# wall: what a user waits; cpu: the process's CPU time (all threads), which ignores
# descheduling and so still compares the work of each side on a shared machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def candidates(lengths: tuple[int, ...], causal: bool) -> dict:
    """name -> (q, k, v) -> out, fastattn's fused op first."""
    cu = cu_seqlens(lengths, torch.device("cpu"))
    width = max(lengths)
    fns = {
        "fastattn": lambda q, k, v: fastattn.attention_varlen(
            q, k, v, cu, cu, width, width, causal=causal
        ),
        "torch loop": per_sequence(lengths, causal),
        "fastattn loop": per_sequence(lengths, causal, fastattn.scaled_dot_product_attention),
    }
    if not causal:  # torch has no causal SDPA on nested tensors
        fns["torch nested"] = nested(cu, causal)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="many")
    parser.add_argument("--pass", dest="pass_", choices=["fwd", "fwd+bwd"], default="fwd")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--skip", default="", help="comma-separated candidates to leave out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths, causal = CASES[args.case]
    backward = args.pass_ == "fwd+bwd"
    shape = (sum(lengths), args.heads, args.dim)
    torch.manual_seed(0)
    inputs = tuple(torch.randn(shape, requires_grad=backward and i < 3) for i in range(4))
    skip = set(filter(None, args.skip.split(",")))
    fns = {
        name: attention_call(fn, backward)(inputs)
        for name, fn in candidates(lengths, causal).items()
        if name not in skip
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(fastest(fn, args.reps, CLOCKS[args.clock]))
    print(
        f"{args.case} ({len(lengths)} sequences of {min(lengths)}..{max(lengths)}, "
        f"causal={causal}), H {args.heads}, E {args.dim}, {args.pass_}, threads {args.threads}, "
        f"{args.rounds} rounds x {args.reps} reps, {args.clock} clock"
    )
    ours = times["fastattn"]
    print(f"  fastattn: median {statistics.median(ours) * 1e3:.2f} ms")
    for name, ts in times.items():
        if name == "fastattn":
            continue
        r = [t / o for t, o in zip(ts, ours)]
        print(
            f"  {name}: median {statistics.median(ts) * 1e3:.2f} ms; {name} / fastattn = "
            f"{statistics.median(r):.2f}x (min {min(r):.2f}, max {max(r):.2f})"
        )


if __name__ == "__main__":
    main()
