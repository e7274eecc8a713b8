"""A/B timing of the two engines of the CPU attention's bf16 tile products (issue 15 item 3):
oneDNN brgemm (the default where the CPU has AMX-BF16) and our vdpbf16ps micro-kernel (the
default elsewhere on AVX512-BF16), forward and forward+backward, each against torch's SDPA in
the same process.

The engine is chosen once per process (FASTATTN_CPU_TILE_ENGINE), so each round runs one child
process per engine, alternating; a child times fastattn and torch interleaved and keeps the
fastest of `--reps` calls of each. Printed per case: the median over rounds of each engine's
time, native / brgemm (> 1: brgemm is faster) and torch / fastattn for each engine. Run it on a
quiet machine with AVX512-BF16 (on AMX-BF16 it decides which engine the products should use):
    python -m scripts.ab_tile_engine [--rounds 3] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ENGINES = ("native", "brgemm")
CASES = [  # B, H, L, E, causal: the quick grid's bf16 shapes and a head dim of 128
    (1, 8, 128, 64, False),
    (1, 8, 512, 64, False),
    (1, 8, 512, 64, True),
    (1, 8, 1024, 64, False),
    (1, 8, 1024, 64, True),
    (1, 8, 1024, 128, False),
]


def timed(fn, q, k, v, grad, causal: bool, backward: bool, reps: int) -> float:
    """The fastest of `reps` calls of fn's forward (no grad) or forward+backward."""
    import torch

    from benchmarks.harness import fastest

    def run():
        if backward:
            torch.autograd.grad(fn(q, k, v, is_causal=causal), (q, k, v), grad)
        else:
            with torch.no_grad():
                fn(q, k, v, is_causal=causal)

    return fastest(run, reps)


def child(reps: int) -> None:
    """Prints {case: {pass: [fastattn s, torch s]}} under this process's engine."""
    import torch
    import torch.nn.functional as F

    import fastattn

    results = {}
    for B, H, L, E, causal in CASES:
        q, k, v = (torch.randn(B, H, L, E, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(B, H, L, E, dtype=torch.bfloat16)
        results[repr((B, H, L, E, causal))] = {
            name: [timed(fn, q, k, v, grad, causal, backward, reps)
                   for fn in (fastattn.scaled_dot_product_attention,
                              F.scaled_dot_product_attention)]
            for name, backward in (("fwd", False), ("fwd+bwd", True))
        }
    engine = fastattn._extension.C.cpu_attention_tile_engine("bfloat16")
    print(json.dumps({"engine": engine, "results": results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.reps)
    runs = {engine: [] for engine in ENGINES}
    names = {}
    for _ in range(args.rounds):
        for engine in ENGINES:
            env = {**os.environ, "FASTATTN_CPU_TILE_ENGINE": engine}
            out = subprocess.run(
                [sys.executable, "-m", "scripts.ab_tile_engine", "--child", "--reps",
                 str(args.reps)], env=env, check=True, capture_output=True, text=True,
            ).stdout
            report = json.loads(out.strip().splitlines()[-1])
            names[engine] = report["engine"]
            runs[engine].append(report["results"])
    print(" / ".join(f"{engine}: {names[engine]}" for engine in ENGINES))
    print(f"{'case (B, H, L, E, causal)':32} {'pass':8} {'native ms':>10} {'brgemm ms':>10} "
          f"{'native/brgemm':>14} {'torch/native':>13} {'torch/brgemm':>13}")
    for case in runs["native"][0]:
        for pass_ in ("fwd", "fwd+bwd"):
            med = {e: statistics.median(r[case][pass_][0] for r in runs[e]) for e in ENGINES}
            vs_torch = {e: statistics.median(r[case][pass_][1] / r[case][pass_][0]
                                             for r in runs[e]) for e in ENGINES}
            print(f"{case:32} {pass_:8} {med['native'] * 1e3:10.3f} {med['brgemm'] * 1e3:10.3f} "
                  f"{med['native'] / med['brgemm']:14.2f} {vs_torch['native']:13.2f} "
                  f"{vs_torch['brgemm']:13.2f}")


if __name__ == "__main__":
    main()
