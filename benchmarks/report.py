"""Turns pytest-benchmark JSON from this suite into a run folder: report, plots, provenance.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--trainer DIR] [--out DIR]
    python -m benchmarks.report --readme [--check]      # the README's results section

Writes DIR/results.json (the runs merged), DIR/report.md, DIR/*.png, DIR/command.txt and,
with --trainer, DIR/trainer/ (benchmarks/trainer_run.py's output). DIR defaults to
benchmarks/results/<machine>/<date>-<commit>/, the folder a run is committed in.

For each op, every fastattn case is listed with its time, GFLOP/s, efficiency against the run's
GEMM rate of its dtype (left out where that rate is bf16 emulated in software), and its ratio
against each torch baseline of the same shape, dtype and pass (ratio = torch time / fastattn
time: above 1 fastattn is faster). Ratios come from the rounds in which the two were timed
interleaved (benchmarks/harness.py): "ratio" compares their medians, "min ratio" their
fastest calls. The summary gives the geometric mean and the worst case per provider, against
the fastest baseline and against each baseline by name.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TRAINER_DIR = "trainer"
OP_TITLES = {
    "attention": "Attention (fwd, fwd+bwd)",
    "attention_decode": "Attention decode (L = 1)",
    "attention_varlen": "Varlen attention (packed sequences)",
    "attention_paged_decode": "Paged KV-cache decode step",
    "attention_window": "Sliding-window attention",
    "lstm_cell": "LSTM cell step",
    "lstm": "LSTM sequence (fwd = inference, fwd+bwd = training step)",
    "lstm_layer_norm": "LayerNorm-LSTM sequence vs the plain-PyTorch reference backend",
    "mha": "MultiheadAttention layer",
    "transformer_encoder": "TransformerEncoder before/after fastattn.convert",
}


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, a dict key of ratios()
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
    # torch cases: fastattn provider -> that pair's interleaved min/median seconds
    interleaved: dict[str, dict[str, float]] = field(default_factory=dict)

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


@dataclass(frozen=True)
class Ratio:
    """A fastattn case against one torch baseline: torch time / fastattn time."""

    ours: Case
    theirs: Case
    torch_s: float  # torch's median seconds in the interleaved rounds (or its separate run)
    median: float  # of the interleaved rounds' medians (or the separate runs' medians)
    min: float  # of the interleaved rounds' fastest calls (= median without interleaving)
    interleaved: bool


def ratio(ours: Case, theirs: Case) -> Ratio:
    pair = theirs.interleaved.get(ours.provider)
    if pair:
        return Ratio(
            ours,
            theirs,
            pair["torch_median_s"],
            pair["torch_median_s"] / pair["fastattn_median_s"],
            pair["torch_min_s"] / pair["fastattn_min_s"],
            True,
        )
    separate = theirs.median_s / ours.median_s
    return Ratio(ours, theirs, theirs.median_s, separate, separate, False)


def merge_verdicts(first: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    if second is None:
        return {"noisy": True, "reasons": ["a merged results file has no noise verdict"]}
    return {
        "noisy": first["noisy"] or second["noisy"],
        "reasons": first["reasons"] + second["reasons"],
        "merged": [first, second],
    }


def load(paths: list[Path]) -> tuple[dict[str, Any], list[Case], dict[str, Any] | None]:
    """Merged JSON, the timed cases, and the roofline of the run."""
    merged: dict[str, Any] | None = None
    cases: list[Case] = []
    roofline = None
    for path in paths:
        data = json.loads(path.read_text())
        if merged is None:
            merged = dict(data, benchmarks=[], fastattn_skipped=[])
        elif "fastattn_noise" in merged:
            # Merged runs are as trusted as their least trusted part (a missing verdict: none).
            merged["fastattn_noise"] = merge_verdicts(
                merged["fastattn_noise"], data.get("fastattn_noise")
            )
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
                    interleaved=info.get("interleaved") or {},
                )
            )
    if merged is None:
        raise SystemExit("benchmarks.report: no JSON files given")
    return merged, cases, roofline


def ratios(cases: list[Case]) -> dict[Case, list[Ratio]]:
    """Every fastattn case's ratio against each torch baseline that ran the same work."""
    baselines: dict[tuple, list[Case]] = defaultdict(list)
    for case in cases:
        if case.kind == "torch":
            baselines[case.key].append(case)
    return {
        case: [ratio(case, theirs) for theirs in baselines[case.key]]
        for case in cases
        if case.kind == "fastattn"
    }


def fastest(against: list[Ratio]) -> Ratio | None:
    """The ratio against the fastest baseline: the smallest, the least flattering."""
    return min(against, key=lambda r: r.median, default=None)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def summarize(against: list[Ratio]) -> dict[str, Any]:
    """cases, geomean of the median and of the min ratios, and the worst case."""
    worst = min(against, key=lambda r: r.median)
    return {
        "cases": len(against),
        "geomean": geomean([r.median for r in against]),
        "geomean_min": geomean([r.min for r in against]),
        "worst": worst.median,
        "worst_case": f"{worst.ours.pass_} {worst.ours.dtype} {worst.ours.shape_id}",
        "interleaved": all(r.interleaved for r in against),
    }


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; the "of GEMM" column is left out when no row has a value for it."""
    if "of GEMM" in header:
        column = header.index("of GEMM")
        if all(row[column] == "n/a" for row in rows):
            header = header[:column] + header[column + 1 :]
            rows = [row[:column] + row[column + 1 :] for row in rows]
    return (
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(row) + " |" for row in rows]
        + [""]
    )


def op_summary(op_ratios: dict[Case, list[Ratio]]) -> dict[str, dict[str, dict[str, Any]]]:
    """provider -> {"fastest torch" or a baseline's name -> summarize(...)}."""
    groups: dict[str, dict[str, list[Ratio]]] = defaultdict(lambda: defaultdict(list))
    for case, against in op_ratios.items():
        best = fastest(against)
        if best is None:
            continue
        groups[case.provider]["fastest torch"].append(best)
        for r in against:
            groups[case.provider][r.theirs.provider].append(r)
    return {
        provider: {name: summarize(rs) for name, rs in by_baseline.items()}
        for provider, by_baseline in groups.items()
    }


def op_section(op: str, cases: list[Case], all_ratios: dict[Case, list[Ratio]]) -> list[str]:
    lines = [f"## {OP_TITLES.get(op, op)}", ""]
    ours = [c for c in cases if c.kind == "fastattn"]
    if not ours:
        lines += ["No fastattn case ran for this op (each skip's reason is in the pytest log).", ""]
    else:
        op_ratios = {c: all_ratios[c] for c in ours}
        rows = []
        for provider, by_baseline in sorted(op_summary(op_ratios).items()):
            for name, s in sorted(by_baseline.items(), key=lambda nb: nb[0] != "fastest torch"):
                rows.append(
                    [
                        provider,
                        f"vs {name}",
                        str(s["cases"]),
                        f"{s['geomean']:.2f}x",
                        f"{s['geomean_min']:.2f}x",
                        f"{s['worst']:.2f}x",
                        s["worst_case"],
                    ]
                )
        lines += table(
            ["provider", "baseline", "cases", "geomean ratio", "geomean min ratio", "worst ratio",
             "worst case"],
            rows,
        )
        rows = []
        for case in sorted(ours, key=_order):
            best = fastest(op_ratios[case])
            rows.append(
                [
                    case.pass_,
                    case.dtype,
                    case.shape_id,
                    case.provider,
                    _ms(case.median_s),
                    f"{case.gflops:.1f}",
                    _pct(case.gemm_efficiency),
                    f"{case.gbps:.1f}",
                    _mib(case.peak_memory_bytes),
                ]
                + (
                    [
                        best.theirs.provider,
                        _ms(best.torch_s),
                        f"{best.median:.2f}x",
                        f"{best.min:.2f}x",
                    ]
                    if best
                    else ["none ran", "", "", ""]
                )
            )
        lines += table(
            ["pass", "dtype", "shape", "provider", "time ms", "GFLOP/s", "of GEMM", "GB/s",
             "peak MiB", "fastest torch", "torch ms", "ratio", "min ratio"],
            rows,
        )
    baselines = [c for c in cases if c.kind == "torch"]
    if baselines:
        lines += ["Torch baselines:", ""]
        lines += table(
            ["pass", "dtype", "shape", "provider", "time ms", "GFLOP/s", "of GEMM", "GB/s",
             "peak MiB"],
            [
                [
                    c.pass_,
                    c.dtype,
                    c.shape_id,
                    c.provider,
                    _ms(c.median_s),
                    f"{c.gflops:.1f}",
                    _pct(c.gemm_efficiency),
                    f"{c.gbps:.1f}",
                    _mib(c.peak_memory_bytes),
                ]
                for c in sorted(baselines, key=_order)
            ],
        )
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


def tree_clean(facts: dict[str, Any]) -> bool | None:
    """Whether the run's tree matched its commit; None when not recorded (runs before issue 19
    recorded only a dirty tree, as a "-dirty" suffix of the commit)."""
    if facts.get("git_clean") is not None:
        return facts["git_clean"]
    return False if str(facts.get("git_commit", "")).endswith("-dirty") else None


MAIN_GRID = "quick"  # what scripts/main.sh runs; its run folders carry no grid suffix


def run_folder_name(merged: dict[str, Any]) -> str:
    """<date>-<commit, 12 digits>, then -<grid> for a grid other than the quick one (so that a
    full-grid run never lands in a quick run's folder) and -dirty when the tree had uncommitted
    changes."""
    facts = merged.get("machine_info", {}).get("fastattn", {})
    date = str(merged.get("datetime", "undated"))[:10]
    head = facts.get("git_head") or str(facts.get("git_commit", "unknown")).removesuffix("-dirty")
    grid = facts.get("grid")
    return (f"{date}-{head[:12]}" + (f"-{grid}" if grid and grid != MAIN_GRID else "")
            + ("-dirty" if tree_clean(facts) is False else ""))


def _clean_words(clean: bool | None) -> str:
    return {True: "clean tree", False: "DIRTY tree (uncommitted changes)"}.get(
        clean, "tree state unknown"
    )


def header(merged: dict[str, Any], roofline: dict[str, Any] | None) -> list[str]:
    facts = merged.get("machine_info", {}).get("fastattn", {})
    lines = [
        f"# fastattn benchmarks: {facts.get('machine', 'unknown machine')}",
        "",
        f"- date: {merged.get('datetime', 'unknown')}",
        f"- cpu: {facts.get('cpu_model')} ({facts.get('cores')} cores, "
        f"{facts.get('torch_threads')} torch threads, fastattn ISA {facts.get('cpu_isa', 'n/a')}, "
        f"bf16 hardware: {facts.get('bf16_hardware', 'n/a')})",
        f"- gpu: {facts.get('gpu') or 'none'}",
        f"- torch {facts.get('torch')} (cuda {facts.get('torch_cuda')}), "
        f"triton {facts.get('triton')}, fastattn {facts.get('fastattn')}",
        f"- commit: {facts.get('git_head') or facts.get('git_commit')} "
        f"({_clean_words(tree_clean(facts))})",
        f"- grid: {facts.get('grid')} on {facts.get('bench_device')}",
        f"- command: `{facts.get('command', 'not recorded')}`",
        "- fastattn backends: "
        + ", ".join(f"{k}: {v}" for k, v in facts.get("fastattn_backends", {}).items()),
    ]
    if roofline:
        note = " (smoke sizes: not a measurement)" if roofline.get("smoke") else ""
        emulated = " (emulated: no bf16 hardware)" if roofline.get("gemm_bf16_emulated") else ""
        lines.append(
            f"- roofline, same run{note}: GEMM fp32 {roofline['gemm_fp32_gflops']:.1f} GFLOP/s "
            f"(n = {roofline['gemm_fp32_n']}), "
            f"GEMM bf16 {roofline['gemm_bf16_gflops']:.1f} GFLOP/s{emulated} "
            f"(n = {roofline['gemm_bf16_n']}), "
            f"copy {roofline['copy_gbps']:.1f} GB/s (read + write)"
        )
    lines += noise_lines(merged.get("fastattn_noise"))
    lines += [
        "",
        "Times are medians (warm-up excluded, device synchronized in each call). ratio = a torch "
        "baseline's time / fastattn's time on the same shape, dtype and pass (> 1: fastattn is "
        "faster), from the rounds in which the two ran interleaved: 'ratio' compares medians, "
        "'min ratio' the fastest calls; 'torch ms' is torch's median in those rounds. 'fastest "
        "torch' is the baseline that gives the smallest ratio. 'of GEMM' is GFLOP/s over the "
        "GEMM rate of the same dtype measured in this run (n/a where that rate is an "
        "emulation's; the column is left out when no row has one). "
        "Peak memory: the call's high-water mark above what was allocated before it "
        "(GPU: torch allocator; CPU: process RSS).",
        "",
    ]
    return lines


def noise_lines(verdict: dict[str, Any] | None) -> list[str]:
    if verdict is None:
        return ["- noise guard: not run (these results predate it): not a trusted run"]
    if not verdict["noisy"]:
        changes = ", ".join(f"{k} {100 * v:.0f}%" for k, v in verdict.get("changes", {}).items())
        others = verdict.get("others", {})
        return [
            f"- noise guard: QUIET (speed before vs after: {changes}; other processes' CPU: "
            f"{100 * others.get('others_mean', 0):.1f}% mean, "
            f"{100 * others.get('others_max_window', 0):.1f}% worst window)"
        ]
    return ["- noise guard: NOISY, kept out of the README: " + "; ".join(verdict["reasons"])]


def trainer_lines(trainer: dict[str, Any] | None) -> list[str]:
    """The trainer section of a report (benchmarks/trainer_run.py's trainer.json)."""
    if trainer is None:
        return []
    lines = [
        "## Reference trainer (default run)",
        "",
        f"Command per backend: `{trainer['command']} --backend <backend>`; metrics.jsonl and "
        f"loss.png of each in `{TRAINER_DIR}/<backend>/`.",
        "",
    ]
    rows = []
    for backend, run in trainer["runs"].items():
        rows.append(
            [
                backend,
                str(run["steps"]),
                f"{run['wall_s']:.0f}",
                f"{run['tokens_per_s_median']:,.0f}",
                f"{100 * run['tokens_per_s_spread']:.0f}%",
                "n/a" if run["val_bpb"] is None else f"{run['val_bpb']:.3f}",
                "NOISY: " + "; ".join(run["noise"]["reasons"])
                if run["noise"]["noisy"]
                else "quiet",
            ]
        )
    lines += table(
        ["backend", "steps", "wall s", "tokens/s (median step)", "step spread (q3/q1 - 1)",
         "val bits/byte", "noise guard"],
        rows,
    )
    return lines + [f"![{b} loss]({TRAINER_DIR}/{b}/loss.png)" for b in trainer["runs"]] + [""]


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


def write_report(paths: list[Path], out: Path | None, trainer_dir: Path | None = None) -> Path:
    merged, cases, roofline = load(paths)
    facts = merged.get("machine_info", {}).get("fastattn", {})
    if out is None:
        out = RESULTS / facts.get("machine", "unknown-machine") / run_folder_name(merged)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    commands = [facts.get("command", "not recorded")]
    trainer = None
    if trainer_dir is not None:
        if (out / TRAINER_DIR).resolve() != trainer_dir.resolve():
            shutil.rmtree(out / TRAINER_DIR, ignore_errors=True)
            shutil.copytree(
                trainer_dir, out / TRAINER_DIR, ignore=shutil.ignore_patterns("*.pt", "*.tmp")
            )
        trainer = json.loads((out / TRAINER_DIR / "trainer.json").read_text())
        commands += [run["command"] for run in trainer["runs"].values()]
    (out / "command.txt").write_text("\n".join(commands) + "\n")
    lines = header(merged, roofline)
    all_ratios = ratios(cases)
    by_op: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_op[case.op].append(case)
    if not cases:
        lines += ["No timed cases in these results (a smoke run times nothing).", ""]
    for op in sorted(by_op, key=lambda o: list(OP_TITLES).index(o) if o in OP_TITLES else 99):
        lines += op_section(op, by_op[op], all_ratios)
    lines += trainer_lines(trainer)
    skipped = merged.get("fastattn_skipped", [])
    if skipped:
        lines += skipped_section(skipped)
    images = plots(cases, out)
    if images:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in images] + [""]
    (out / "report.md").write_text("\n".join(lines))
    return out


def verdict_lines(out: Path) -> list[str]:
    """What the noise guard and the commit check say of the run in ``out`` (readme.py's rule)."""
    from benchmarks import readme

    reasons = readme.distrust(out)
    lines = [
        f"benchmarks: NOT trusted, the README will not use this run: {'; '.join(reasons)}"
        if reasons
        else "benchmarks: QUIET run at a clean commit: commit the run folder, then "
        "`python -m benchmarks.report --readme` (benchmarks/README.md says how)"
    ]
    trainer = out / TRAINER_DIR / "trainer.json"
    if trainer.exists():
        for backend, run in json.loads(trainer.read_text())["runs"].items():
            noisy = run["noise"]["noisy"]
            lines.append(
                f"trainer --backend {backend}: "
                + ("NOISY: " + "; ".join(run["noise"]["reasons"]) if noisy else "quiet")
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="pytest-benchmark JSON file(s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results/<machine>/<date>-<commit>/)",
    )
    parser.add_argument(
        "--trainer", type=Path, default=None, help="benchmarks/trainer_run.py's output folder"
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="rewrite README.md's results section from the newest trusted run per machine",
    )
    parser.add_argument(
        "--check", action="store_true", help="with --readme: only say whether README.md is stale"
    )
    args = parser.parse_args(argv)
    if args.readme:
        from benchmarks import readme

        raise SystemExit(readme.main(check=args.check))
    if not args.results:
        parser.error("give pytest-benchmark JSON file(s), or --readme")
    out = write_report(args.results, args.out, args.trainer)
    print(f"wrote {out / 'report.md'}")
    print("\n".join(verdict_lines(out)))


if __name__ == "__main__":
    main()
