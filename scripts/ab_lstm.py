"""fastattn.LSTM against nn.LSTM on CPU, interleaved in one process (issue 17 item 4).

    python -m scripts.ab_lstm [--rounds 15] [--threads 1] [--cases T32B16H512,...]

For each case of issue 5's grid (T in {32, 128}, B in {16, 64}, H = I in {256, 512, 1024}),
float32, the rounds alternate one call of each provider, inference (no grad) and a training
step (forward + backward into the input and every weight), and keep each one's fastest thread
CPU time. Printed: torch_time / fastattn_time per case and pass, and the geomeans. With one
thread, CPU time still compares the work each side does while other processes share the cores
(it ignores descheduling, not cache contention); it is no substitute for the quiet benchmark
(benchmarks/bench_lstm.py).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fastattn
from benchmarks.harness import fastest_interleaved
from benchmarks.report import geomean


def case_ratios(T: int, B: int, H: int, rounds: int) -> tuple[float, float]:
    """(inference, training) ratios torch_time / fastattn_time of one case."""
    torch.manual_seed(0)
    ref = nn.LSTM(H, H)
    ours = fastattn.LSTM(H, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H)
    state = (torch.randn(1, B, H), torch.randn(1, B, H))
    x_grad, dout = x.clone().requires_grad_(), torch.randn(T, B, H)

    def infer(module):
        def call():
            with torch.no_grad():
                module(x, state)
        return call

    def train(module):
        params = [x_grad, *module.parameters()]
        return lambda: torch.autograd.grad(module(x_grad, state)[0], params, dout)

    fns = [infer(ref), infer(ours), train(ref), train(ours)]
    for fn in fns:
        fn()
    t = fastest_interleaved(fns, rounds, time.thread_time)
    return t[0] / t[1], t[2] / t[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default="", help="comma-separated, e.g. T32B16H512")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(T, B, H) for T in (32, 128) for B in (16, 64) for H in (256, 512, 1024)]
    if args.cases:
        cases = [c for c in cases if "T{}B{}H{}".format(*c) in args.cases.split(",")]
    print(f"threads {args.threads}, float32, torch time / fastattn time (thread CPU time, "
          f"fastest of {args.rounds})")
    infer, train = [], []
    for T, B, H in cases:
        r_infer, r_train = case_ratios(T, B, H, args.rounds)
        infer.append(r_infer)
        train.append(r_train)
        print(f"T{T} B{B} H{H}: inference {r_infer:.2f}x, training {r_train:.2f}x", flush=True)

    print(f"geomean: inference {geomean(infer):.2f}x, training {geomean(train):.2f}x")


if __name__ == "__main__":
    main()
