"""The reference trainer's default run per backend: evidence that goes with a benchmark run.

    python -m benchmarks.trainer_run OUT_DIR [-- extra trainer flags, e.g. --max-steps 20]

Runs ``python -m fastattn.lm train`` with --backend fastattn and then --backend torch (the
same model, weights and batches: only the attention modules differ), each into
OUT_DIR/<backend>/ (metrics.jsonl, loss.png, ckpt.pt), timing its wall clock and watching
other processes' CPU use (benchmarks/noise.py). Writes OUT_DIR/trainer.json: per backend the
wall time, the exact command, steps, median tokens/s over the steps, their spread, the last
validation bits per byte and the noise verdict. benchmarks/report.py copies all of it but the
checkpoints into the run folder; benchmarks/readme.py writes the README's trainer sentence
from it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import noise

BACKENDS = ("fastattn", "torch")
TRAIN = [sys.executable, "-m", "fastattn.lm", "train", "--overwrite", "--no-progress"]


def summarize_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, median tokens/s and its spread over the training steps, last val bits/byte."""
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    val = [r["val_bpb"] for r in records if "val_bpb" in r]
    return {
        "steps": max((r["step"] for r in records), default=0),
        "tokens_per_s_median": statistics.median(rates) if rates else 0.0,
        "tokens_per_s_spread": noise.spread(rates),
        "val_bpb": val[-1] if val else None,
        "rates": rates,
    }


def run_backend(backend: str, out: Path, extra: list[str]) -> dict[str, Any]:
    command = TRAIN + ["--backend", backend, "--out-dir", str(out)] + extra
    monitor = noise.CpuMonitor().start()
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    others = monitor.stop()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = summarize_metrics(records)
    rates = summary.pop("rates")
    shown = shlex.join(["python"] + command[1:])
    return dict(summary, wall_s=wall, command=shown, noise=noise.repeat_verdict(rates, others))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where each backend's run and trainer.json go")
    parser.add_argument("extra", nargs="*", help="flags passed to every trainer run (after --)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for backend in BACKENDS:
        print(f"== trainer, --backend {backend}", flush=True)
        runs[backend] = run_backend(backend, args.out / backend, args.extra)
    shown = ["python", "-m", "fastattn.lm", "train"] + args.extra
    evidence = {"command": shlex.join(shown), "runs": runs}
    (args.out / "trainer.json").write_text(json.dumps(evidence, indent=1) + "\n")
    for backend, run in runs.items():
        verdict = "NOISY" if run["noise"]["noisy"] else "quiet"
        print(
            f"trainer --backend {backend}: {run['wall_s']:.0f} s, "
            f"{run['tokens_per_s_median']:,.0f} tokens/s, val {run['val_bpb']} bits/byte, {verdict}"
        )


if __name__ == "__main__":
    main()
