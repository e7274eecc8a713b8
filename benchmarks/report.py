"""Turns pytest-benchmark JSON from this suite into a markdown report and PNG plots.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--out DIR]

Writes DIR/results.json (the runs merged), DIR/report.md and DIR/*.png; DIR defaults to
benchmarks/results/<machine>/<date>/. For each op, every fastattn case is listed with its
time, GFLOP/s, efficiency against the run's measured GEMM rate, and its ratio against the
fastest torch baseline of the same shape, dtype and pass (ratio = torch time / fastattn time:
above 1 fastattn is faster), with the geometric mean and the worst case per provider.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OP_TITLES = {
    "attention": "Attention (fwd, fwd+bwd)",
    "attention_decode": "Attention decode (L = 1)",
    "attention_varlen": "Varlen attention (packed) vs the padded batch with a mask",
    "attention_window": "Sliding-window attention vs an explicit mask",
    "lstm_cell": "LSTM cell step",
    "lstm": "LSTM sequence (fwd = inference, fwd+bwd = training step)",
    "lstm_layer_norm": "LayerNorm-LSTM sequence vs the plain-PyTorch reference backend",
    "mha": "MultiheadAttention layer",
    "transformer_encoder": "TransformerEncoder before/after fastattn.convert",
}


@dataclass(frozen=True)
class Case:
    op: str
    pass_: str
    provider: str
    kind: str  # "fastattn" or "torch"
    dtype: str
    device: str
    shape: dict[str, Any]
    shape_id: str
    median_s: float
    flops: float
    bytes: float
    peak_memory_bytes: int | None
    gemm_efficiency: float | None

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """Cases with the same key are the same work: their times compare directly."""
        return (self.op, self.pass_, self.dtype, self.device, self.shape_id)

    @property
    def gflops(self) -> float:
        return self.flops / self.median_s / 1e9

    @property
    def gbps(self) -> float:
        return self.bytes / self.median_s / 1e9


def load(paths: list[Path]) -> tuple[dict[str, Any], list[Case], dict[str, Any] | None]:
    """Merged JSON, the timed cases, and the roofline of the run."""
    merged: dict[str, Any] | None = None
    cases: list[Case] = []
    roofline = None
    for path in paths:
        data = json.loads(path.read_text())
        if merged is None:
            merged = dict(data, benchmarks=[], fastattn_skipped=[])
        merged["benchmarks"].extend(data.get("benchmarks", []))
        merged["fastattn_skipped"].extend(data.get("fastattn_skipped", []))
        roofline = roofline or data.get("machine_info", {}).get("fastattn", {}).get("roofline")
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if info.get("op") == "roofline":
                roofline = info.get("roofline") or roofline
                continue
            if "op" not in info or not bench.get("stats"):
                continue
            cases.append(
                Case(
                    op=info["op"],
                    pass_=info["pass_"],
                    provider=info["provider"],
                    kind=info["provider_kind"],
                    dtype=info["dtype"],
                    device=info["device"],
                    shape=info["shape"],
                    shape_id=info["shape_id"],
                    median_s=bench["stats"]["median"],
                    flops=info["flops"],
                    bytes=info["bytes"],
                    peak_memory_bytes=info.get("peak_memory_bytes"),
                    gemm_efficiency=info.get("gemm_efficiency"),
                )
            )
    if merged is None:
        raise SystemExit("benchmarks.report: no JSON files given")
    return merged, cases, roofline


def best_torch(cases: list[Case]) -> dict[tuple, Case]:
    best: dict[tuple, Case] = {}
    for case in cases:
        if case.kind == "torch" and (
            case.key not in best or case.median_s < best[case.key].median_s
        ):
            best[case.key] = case
    return best


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def op_section(op: str, cases: list[Case], best: dict[tuple, Case]) -> list[str]:
    lines = [f"## {OP_TITLES.get(op, op)}", ""]
    ours = [c for c in cases if c.kind == "fastattn"]
    if not ours:
        lines += ["No fastattn case ran for this op (each skip's reason is in the pytest log).", ""]
    else:
        lines += [
            "| provider | cases | geomean ratio | worst ratio | worst case |",
            "|---|---|---|---|---|",
        ]
        by_provider: dict[str, list[tuple[float, Case]]] = defaultdict(list)
        for case in ours:
            if case.key in best:
                by_provider[case.provider].append((best[case.key].median_s / case.median_s, case))
        for provider, ratios in sorted(by_provider.items()):
            worst_ratio, worst = min(ratios, key=lambda rc: rc[0])
            lines.append(
                f"| {provider} | {len(ratios)} | {geomean([r for r, _ in ratios]):.2f}x | "
                f"{worst_ratio:.2f}x | {worst.pass_} {worst.dtype} {worst.shape_id} |"
            )
        lines += [
            "",
            "| pass | dtype | shape | provider | time ms | GFLOP/s | of GEMM | GB/s | peak MiB "
            "| best torch | torch ms | ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case in sorted(ours, key=_order):
            ref = best.get(case.key)
            lines.append(
                f"| {case.pass_} | {case.dtype} | {case.shape_id} | {case.provider} | "
                f"{_ms(case.median_s)} | {case.gflops:.1f} | {_pct(case.gemm_efficiency)} | "
                f"{case.gbps:.1f} | {_mib(case.peak_memory_bytes)} | "
                + (
                    f"{ref.provider} | {_ms(ref.median_s)} | {ref.median_s / case.median_s:.2f}x |"
                    if ref
                    else "none ran | | |"
                )
            )
        lines.append("")
    baselines = [c for c in cases if c.kind == "torch"]
    if baselines:
        lines += [
            "Torch baselines:",
            "",
            "| pass | dtype | shape | provider | time ms | GFLOP/s | of GEMM | GB/s | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for case in sorted(baselines, key=_order):
            lines.append(
                f"| {case.pass_} | {case.dtype} | {case.shape_id} | {case.provider} | "
                f"{_ms(case.median_s)} | {case.gflops:.1f} | {_pct(case.gemm_efficiency)} | "
                f"{case.gbps:.1f} | {_mib(case.peak_memory_bytes)} |"
            )
        lines.append("")
    return lines


def skipped_section(skipped: list[dict[str, str]]) -> list[str]:
    """Skipped cases grouped by reason: which providers or shapes did not run, and why."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for entry in skipped:
        by_reason[entry["reason"]].append(entry["test"].split("::")[-1])
    lines = ["## Skipped cases", "", "| cases | reason | e.g. |", "|---|---|---|"]
    for reason, tests in sorted(by_reason.items(), key=lambda rt: -len(rt[1])):
        lines.append(f"| {len(tests)} | {reason} | `{tests[0]}` |")
    return lines + [""]


def _order(case: Case) -> tuple:
    return (case.pass_, case.dtype, tuple(sorted(case.shape.items())), case.provider)


def header(merged: dict[str, Any], roofline: dict[str, Any] | None) -> list[str]:
    facts = merged.get("machine_info", {}).get("fastattn", {})
    lines = [
        f"# fastattn benchmarks: {facts.get('machine', 'unknown machine')}",
        "",
        f"- date: {merged.get('datetime', 'unknown')}",
        f"- cpu: {facts.get('cpu_model')} ({facts.get('cores')} cores, "
        f"{facts.get('torch_threads')} torch threads)",
        f"- gpu: {facts.get('gpu') or 'none'}",
        f"- torch {facts.get('torch')} (cuda {facts.get('torch_cuda')}), "
        f"triton {facts.get('triton')}, fastattn {facts.get('fastattn')}",
        f"- commit: {facts.get('git_commit')}",
        f"- grid: {facts.get('grid')} on {facts.get('bench_device')}",
        "- fastattn backends: "
        + ", ".join(f"{k}: {v}" for k, v in facts.get("fastattn_backends", {}).items()),
    ]
    if roofline:
        note = " (smoke sizes: not a measurement)" if roofline.get("smoke") else ""
        lines.append(
            f"- roofline, same run{note}: GEMM fp32 {roofline['gemm_fp32_gflops']:.1f} GFLOP/s "
            f"(n = {roofline['gemm_fp32_n']}), "
            f"GEMM bf16 {roofline['gemm_bf16_gflops']:.1f} GFLOP/s "
            f"(n = {roofline['gemm_bf16_n']}), "
            f"copy {roofline['copy_gbps']:.1f} GB/s (read + write)"
        )
    lines += [
        "",
        "Times are medians (warm-up excluded, device synchronized in each call). ratio = fastest "
        "torch baseline's time / fastattn's time on the same shape, dtype and pass (> 1: "
        "fastattn is faster). 'of GEMM' is GFLOP/s over the GEMM rate of the same dtype measured "
        "in this run. Peak memory: the call's high-water mark above what was allocated before it "
        "(GPU: torch allocator; CPU: process RSS).",
        "",
    ]
    return lines


def _plot(
    cases: list[Case],
    x_key: str,
    y_label: str,
    y_of,
    family_keys: list[str],
    title: str,
    path: Path,
) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[tuple, list[Case]] = defaultdict(list)
    for case in cases:
        families[tuple(case.shape[k] for k in family_keys)].append(case)
    if not families:
        return False
    names = sorted(families)
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
    for ax, family in zip(axes.flat, names, strict=False):
        by_provider: dict[str, list[Case]] = defaultdict(list)
        for case in families[family]:
            by_provider[case.provider].append(case)
        for provider, series in sorted(by_provider.items()):
            series.sort(key=lambda c: c.shape[x_key])
            style = "-o" if series[0].kind == "fastattn" else "--x"
            ax.plot(
                [c.shape[x_key] for c in series], [y_of(c) for c in series], style, label=provider
            )
        ax.set_xscale("log", base=2)
        ax.set_title(
            " ".join(f"{k}={v}" for k, v in zip(family_keys, family, strict=True)), fontsize=9
        )
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# op -> (x: the shape field, y label, y value, the shape fields that split subplots, title)
PLOTS = {
    "attention": (
        "L",
        "GFLOP/s",
        lambda c: c.gflops,
        ["B", "H", "E", "causal"],
        "{op} {pass_} {dtype}: throughput vs sequence length",
    ),
    "attention_decode": (
        "S",
        "GB/s",
        lambda c: c.gbps,
        ["B", "H", "E"],
        "decode (L = 1) {dtype}: bandwidth vs keys",
    ),
    "lstm_cell": (
        "H",
        "time (ms)",
        lambda c: c.median_s * 1e3,
        ["T", "B"],
        "{op} {pass_} {dtype}: time vs hidden size",
    ),
    "lstm": (
        "H",
        "time (ms)",
        lambda c: c.median_s * 1e3,
        ["T", "B"],
        "{op} {pass_} {dtype}: time vs hidden size",
    ),
}


def plots(cases: list[Case], out: Path) -> list[str]:
    """The PNGs: attention throughput vs sequence length, LSTM time vs hidden size."""
    written = []
    groups: dict[tuple[str, str, str], list[Case]] = defaultdict(list)
    for case in cases:
        groups[(case.op, case.pass_, case.dtype)].append(case)
    for (op, pass_, dtype), group in sorted(groups.items()):
        if op not in PLOTS:
            continue
        x_key, y_label, y_of, family_keys, title = PLOTS[op]
        name = f"{op}_{pass_.replace('+', '')}_{dtype}.png"
        title = title.format(op=op, pass_=pass_, dtype=dtype)
        if _plot(group, x_key, y_label, y_of, family_keys, title, out / name):
            written.append(name)
    return written


def write_report(paths: list[Path], out: Path | None) -> Path:
    merged, cases, roofline = load(paths)
    facts = merged.get("machine_info", {}).get("fastattn", {})
    if out is None:
        date = str(merged.get("datetime", "undated"))[:10]
        out = REPO / "benchmarks" / "results" / facts.get("machine", "unknown-machine") / date
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    lines = header(merged, roofline)
    best = best_torch(cases)
    by_op: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_op[case.op].append(case)
    if not cases:
        lines += ["No timed cases in these results (a smoke run times nothing).", ""]
    for op in sorted(by_op, key=lambda o: list(OP_TITLES).index(o) if o in OP_TITLES else 99):
        lines += op_section(op, by_op[op], best)
    skipped = merged.get("fastattn_skipped", [])
    if skipped:
        lines += skipped_section(skipped)
    images = plots(cases, out)
    if images:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in images] + [""]
    (out / "report.md").write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results/<machine>/<date>/)",
    )
    args = parser.parse_args(argv)
    out = write_report(args.results, args.out)
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
