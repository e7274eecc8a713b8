"""fastattn.LSTM against nn.LSTM on CPU, interleaved in one process (issue 17 item 4).

    python -m scripts.ab_lstm [--rounds 15] [--threads 1] [--cases T32B16H512,...] [--gemm]
    python -m scripts.ab_lstm --cells [--rounds 15] [--threads 1] [--cases B64H1024,...]
    python -m scripts.ab_lstm --parts [--rounds 15] [--threads 2] [--cases T32B16H256,...]

For each case of issue 5's grid (T in {32, 128}, B in {16, 64}, H = I in {256, 512, 1024}),
float32, the rounds alternate one call of each provider, inference (no grad) and a training
step (forward + backward into the input and every weight), and keep each one's fastest time:
thread CPU time with one thread, wall clock with more (thread CPU time would see the calling
thread only). Printed: torch_time / fastattn_time per case and pass, and the geomeans. With one
thread, CPU time still compares the work each side does while other processes share the cores
(it ignores descheduling, not cache contention); it is no substitute for the quiet benchmark
(benchmarks/bench_lstm.py). With --gemm, fastattn's inference also runs with
FASTATTN_LSTM_GEMM=torch (its input projection on torch.mm instead of oneDNN brgemm,
csrc/include/fastattn/cpu_gemm.h) in the same rounds, and that ratio is printed too.

With --cells, the benchmark's cell-step cases instead (B in {16, 64}, H = I in {256, 512, 1024}):
fastattn.lstm_cell and fastattn.LSTMCell against nn.LSTMCell, forward (no grad) and a training
step (forward + backward into the input, both states and every weight).

With --parts, where a training step's time goes: torch's whole step and ours, and ours split into
the ops it runs (input projection, forward recurrence, backward op with the w_hh gradient, the
projection's two backward GEMMs), each with its GFLOP/s, and the rest (autograd, allocation,
gradient accumulation). Wall clock when --threads > 1 (thread CPU time would see one thread only).
That is the bound issue 17 asks for where a case stays below torch: the step's six GEMM-sized
products at torch's rate against ours, op by op.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import torch
from torch import nn

import fastattn
from benchmarks.harness import fastest_interleaved
from benchmarks.report import geomean


def with_gemm_engine(engine: str, fn):
    """fn with FASTATTN_LSTM_GEMM set to engine (read by the kernels on every call)."""
    def call():
        os.environ["FASTATTN_LSTM_GEMM"] = engine
        fn()
    return call


def step_clock(threads: int):
    """Thread CPU time with one thread; wall clock with more (thread time sees the caller only)."""
    return time.perf_counter if threads > 1 else time.thread_time


def clock_name(threads: int) -> str:
    return "wall" if threads > 1 else "thread CPU"


def parse_cases(spec: str, pattern: str) -> list[tuple[int, ...]]:
    """The --cases list as tuples of the pattern's groups: 'T32B16H512' -> (32, 16, 512)."""
    cases = []
    for item in spec.split(","):
        match = re.fullmatch(pattern, item.strip())
        if not match:
            raise SystemExit(f"--cases: {item!r} does not match {pattern}")
        cases.append(tuple(int(g) for g in match.groups()))
    return cases


def case_ratios(T: int, B: int, H: int, rounds: int, gemm_ab: bool,
                clock) -> tuple[list[float], list[float]]:
    """Ratios torch_time / fastattn_time of one case: inference, training, and with gemm_ab
    inference with fastattn's projection on torch.mm. Then the GEMM rate each of torch's and
    ours reaches (inference: two [T * B, H] x [H, 4H] products; training: six) as a fraction of
    torch.mm's rate on one such product, timed in the same rounds: torch inference, ours, torch
    training, ours. A fraction near 1 is a bound: no kernel of the same FLOPs runs much faster."""
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

    rows, weight = x.reshape(T * B, H), ref.weight_ih_l0.detach()
    fns = [infer(ref), infer(ours), train(ref), train(ours), lambda: torch.mm(rows, weight.t())]
    if gemm_ab:
        fns = [with_gemm_engine("brgemm", fn) for fn in fns]
        fns.append(with_gemm_engine("torch", infer(ours)))
    for fn in fns:
        fn()
    t = fastest_interleaved(fns, rounds, clock)
    ratios = [t[0] / t[1], t[2] / t[3], *([t[0] / t[5]] if gemm_ab else [])]
    products = [2, 2, 6, 6]  # [T * B, H] x [H, 4H] products per call
    return ratios, [n * t[4] / ti for n, ti in zip(products, t[:4], strict=True)]


def cell_ratios(B: int, H: int, rounds: int, clock) -> list[float]:
    """Ratios nn.LSTMCell time / fastattn time: lstm_cell and LSTMCell, forward and training."""
    torch.manual_seed(0)
    ref = nn.LSTMCell(H, H)
    ours = fastattn.LSTMCell(H, H)
    ours.load_state_dict(ref.state_dict())
    x, h, c = (torch.randn(B, H, requires_grad=True) for _ in range(3))
    grads = (torch.randn(B, H), torch.randn(B, H))
    params = [x, h, c, *ref.parameters()]

    def functional():
        return fastattn.lstm_cell(x, h, c, ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh)

    def forward(step):
        def call():
            with torch.no_grad():
                step()
        return call

    def train(step, inputs):
        return lambda: torch.autograd.grad(step(), inputs, grads)

    steps = [lambda: ref(x, (h, c)), functional, lambda: ours(x, (h, c))]
    ours_params = [x, h, c, *ours.parameters()]
    fns = [forward(s) for s in steps] + [
        train(steps[0], params), train(steps[1], params), train(steps[2], ours_params)]
    # The functional call shares torch's weights and the module has its own: without a warm
    # call first, the module alone would find its weights evicted by the two calls before it.
    t = fastest_interleaved(fns, rounds, clock, warm_calls=1)
    return [t[0] / t[1], t[0] / t[2], t[3] / t[4], t[3] / t[5]]


def part_times(T: int, B: int, H: int, rounds: int, clock) -> dict[str, tuple[float, float]]:
    """Seconds and GFLOP of torch's training step, ours, and our step's ops (I = H)."""
    ops = torch.ops.fastattn
    torch.manual_seed(0)
    ref = nn.LSTM(H, H)
    ours = fastattn.LSTM(H, H)
    ours.load_state_dict(ref.state_dict())
    x, dout = torch.randn(T, B, H), torch.randn(T, B, H)
    state = (torch.randn(1, B, H), torch.randn(1, B, H))
    x_grad = x.clone().requires_grad_()
    w_ih, w_hh = ref.weight_ih_l0.detach(), ref.weight_hh_l0.detach()
    bias = (ref.bias_ih_l0 + ref.bias_hh_l0).detach()
    h0, c0 = state[0][0], state[1][0]
    # The ops' arguments as fastattn.LSTM's training path passes them (fastattn/ops/lstm.py).
    x_proj = ops.lstm_weight_mm(w_ih, x.transpose(1, 2), bias).permute(0, 2, 1)
    layer = (h0, c0, w_hh, None, None, False, None, None)
    h_all, c_all, gates_all, hpre_all = ops.lstm_layer_fwd(x_proj, *layer)
    grad_x_proj = ops.lstm_layer_bwd(dout, torch.randn_like(c_all), *layer, h_all, c_all,
                                     gates_all, hpre_all)[0]
    grad = grad_x_proj.permute(2, 0, 1).reshape(4 * H, T * B)  # a view: feature-major
    x_cols = x.reshape(T * B, H).t()

    def train(module):
        params = [x_grad, *module.parameters()]
        return lambda: torch.autograd.grad(module(x_grad, state)[0], params, dout)

    product = 2 * T * B * 4 * H * H / 1e9  # GFLOP of one [T * B, H] x [H, 4H] product
    parts = {
        "torch step": (train(ref), 6 * product),
        "ours step": (train(ours), 6 * product),
        "projection": (lambda: ops.lstm_weight_mm(w_ih, x.transpose(1, 2), bias), product),
        "forward": (lambda: ops.lstm_layer_fwd(x_proj, *layer), product),
        "backward op": (lambda: ops.lstm_layer_bwd(dout, c_all, *layer, h_all, c_all, gates_all,
                                                   hpre_all), 2 * product),
        # The two products of the projection's backward, on the GEMM the step takes them on.
        "grad w_ih": (lambda: ops.lstm_weight_mm(grad, x_cols.t().unsqueeze(0), None), product),
        "grad input": (lambda: ops.lstm_weight_mm(w_ih.t().contiguous(), grad.unsqueeze(0), None),
                       product),
    }
    for fn, _ in parts.values():
        fn()
    seconds = fastest_interleaved([fn for fn, _ in parts.values()], rounds, clock)
    return {name: (t, flop) for name, t, (_, flop) in zip(parts, seconds, parts.values())}


def main_parts(args: argparse.Namespace, cases: list[tuple[int, int, int]]) -> None:
    print(f"threads {args.threads}, float32, training step, ms (GFLOP/s), "
          f"{clock_name(args.threads)} time, fastest of {args.rounds}")
    for T, B, H in cases:
        times = part_times(T, B, H, args.rounds, step_clock(args.threads))
        ours_parts = [name for name in times if name not in ("torch step", "ours step")]
        rest = times["ours step"][0] - sum(times[name][0] for name in ours_parts)
        cells = [f"{name} {t * 1e3:.2f} ({flop / t:.0f})" for name, (t, flop) in times.items()]
        print(f"T{T} B{B} H{H}: " + ", ".join(cells) + f", rest {rest * 1e3:.2f}; "
              f"ratio {times['torch step'][0] / times['ours step'][0]:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default="",
                        help="comma-separated, e.g. T32B16H512,T64B24H256 (B64H1024 with --cells)"
                             "; default: issue 5's grid")
    parser.add_argument("--cells", action="store_true",
                        help="the cell-step cases (lstm_cell, LSTMCell) instead of nn.LSTM's")
    parser.add_argument("--gemm", action="store_true",
                        help="also time fastattn's inference with FASTATTN_LSTM_GEMM=torch")
    parser.add_argument("--parts", action="store_true",
                        help="the training step split into fastattn's ops, with GFLOP/s")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cells:
        main_cells(args)
        return
    cases = [(T, B, H) for T in (32, 128) for B in (16, 64) for H in (256, 512, 1024)]
    if args.cases:
        cases = parse_cases(args.cases, r"T(\d+)B(\d+)H(\d+)")
    if args.parts:
        main_parts(args, cases)
        return
    print(f"threads {args.threads}, float32, torch time / fastattn time "
          f"({clock_name(args.threads)} time, fastest of {args.rounds})")
    print("and each one's GEMM rate as a fraction of torch.mm's on a [T * B, H] x [H, 4H] product")
    columns = ["inference", "training"] + (["inference torch.mm"] if args.gemm else [])
    ratios = []
    for T, B, H in cases:
        case, rates = case_ratios(T, B, H, args.rounds, args.gemm, step_clock(args.threads))
        ratios.append(case)
        print(f"T{T} B{B} H{H}: " + ", ".join(
            f"{name} {r:.2f}x" for name, r in zip(columns, case, strict=True))
            + "; of torch.mm's rate: inference torch {:.0%} ours {:.0%}, training torch {:.0%} "
              "ours {:.0%}".format(*rates), flush=True)

    print("geomean: " + ", ".join(f"{name} {geomean([r[i] for r in ratios]):.2f}x"
                                  for i, name in enumerate(columns)))


def main_cells(args: argparse.Namespace) -> None:
    cases = [(B, H) for B in (16, 64) for H in (256, 512, 1024)]
    if args.cases:
        cases = parse_cases(args.cases, r"B(\d+)H(\d+)")
    print(f"threads {args.threads}, float32, nn.LSTMCell time / fastattn time "
          f"({clock_name(args.threads)} time, fastest of {args.rounds})")
    columns = ["lstm_cell fwd", "LSTMCell fwd", "lstm_cell train", "LSTMCell train"]
    ratios = []
    for B, H in cases:
        ratios.append(cell_ratios(B, H, args.rounds, step_clock(args.threads)))
        print(f"B{B} H{H}: " + ", ".join(
            f"{name} {r:.2f}x" for name, r in zip(columns, ratios[-1], strict=True)), flush=True)
    print("geomean: " + ", ".join(f"{name} {geomean([r[i] for r in ratios]):.2f}x"
                                  for i, name in enumerate(columns)))


if __name__ == "__main__":
    main()
