"""Was the machine quiet while a run timed things? The verdict that keeps noise out of the README.

A run is **noisy** when the machine's speed changed during it (its fp32 GEMM rate or its copy
bandwidth, measured before the first case and again after the last, differ by more than 15%),
or when other processes took CPU time from it (read from /proc/stat: the machine's busy time
minus that of this process and the processes it started, over the whole run and over each
short window). A noisy run is still
written; benchmarks/readme.py never takes its numbers.

Reading /proc needs Linux; elsewhere other processes' use is unknown and the run counts as
noisy (nothing shows it was quiet).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

# The probes before and after may differ by this much (relative to the first) and still agree.
PROBE_TOLERANCE = 0.15
# Other processes' share of the machine's CPU time (all cores): over the whole run, and over
# any one window of WINDOW_S seconds (a 2-core machine with one other busy thread for a whole
# window reads 0.5 there).
OTHERS_MEAN_LIMIT = 0.05
OTHERS_WINDOW_LIMIT = 0.25
WINDOW_S = 5.0

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    """Machine-wide busy and total CPU seconds (all cores) and this process tree's own seconds."""

    busy_s: float
    total_s: float
    own_s: float


def read_proc_stat(text: str) -> tuple[float, float]:
    """(busy, total) CPU seconds summed over all cores from /proc/stat's first ("cpu") line.

    Busy counts user, nice, system, irq, softirq and steal (time the hypervisor gave to another
    guest is time this run did not get); idle and iowait are not busy.
    """
    fields = text.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"/proc/stat's first line is not the 'cpu' total: {fields[:1]}")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy / _CLOCK_TICKS, (busy + idle + iowait) / _CLOCK_TICKS


def parse_pid_stat(text: str) -> tuple[int, int, float]:
    """(pid, parent pid, CPU seconds) from a /proc/<pid>/stat line. The seconds count the
    process and its children that it has waited for (utime + stime + cutime + cstime). The
    command name may hold spaces and parentheses: the fields after it follow the last ')'."""
    pid, _, rest = text.partition(" (")
    fields = rest.rpartition(")")[2].split()
    # fields[0] is the state (field 3), so field n is fields[n - 3]
    ppid = int(fields[1])
    ticks = sum(int(x) for x in fields[11:15])
    return int(pid), ppid, ticks / _CLOCK_TICKS


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """The processes below ``root`` in the tree given as {pid: parent pid}."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def own_tree_seconds() -> float:
    """CPU seconds of this process, of the children it has waited for, and of every live
    process below it (a trainer run, Inductor's compile workers): the run's own work, which is
    not "something else using the CPU"."""
    own = os.times()
    seconds = own.user + own.system + own.children_user + own.children_system
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    pid, ppid, cpu = parse_pid_stat(f.read())
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
            table[pid] = (ppid, cpu)
    tree = descendants(os.getpid(), {pid: ppid for pid, (ppid, _) in table.items()})
    return seconds + sum(table[pid][1] for pid in tree)


def sample() -> CpuSample | None:
    """The machine's and this process tree's CPU time now; None where /proc cannot be read."""
    try:
        with open("/proc/stat") as f:
            busy, total = read_proc_stat(f.read())
        own = own_tree_seconds()
    except (OSError, ValueError):
        return None
    return CpuSample(busy, total, own)


def others_share(first: CpuSample, last: CpuSample) -> float:
    """Other processes' share of all the CPU time that passed between two samples (0..1)."""
    total = last.total_s - first.total_s
    if total <= 0:
        return 0.0
    others = (last.busy_s - first.busy_s) - (last.own_s - first.own_s)
    return min(1.0, max(0.0, others / total))


def load_average() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


@dataclass
class CpuMonitor:
    """Samples /proc/stat every ``window_s`` seconds on a daemon thread between start and stop."""

    window_s: float = WINDOW_S
    samples: list[CpuSample] = field(default_factory=list)
    load_before: list[float] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> CpuMonitor:
        self.load_before = load_average()
        first = sample()
        if first is None:
            return self
        self.samples.append(first)
        self._thread = threading.Thread(target=self._run, name="cpu-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.window_s):
            now = sample()
            if now is not None:
                self.samples.append(now)

    def stop(self) -> dict[str, Any]:
        """Stops sampling; returns what other processes used (see ``others_summary``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            last = sample()
            if last is not None:
                self.samples.append(last)
        return dict(
            others_summary(self.samples),
            window_s=self.window_s,
            load_before=self.load_before,
            load_after=load_average(),
        )


def others_summary(samples: list[CpuSample]) -> dict[str, Any]:
    """Other processes' mean CPU share over all the samples and the largest over one window."""
    if len(samples) < 2:
        return {"others_mean": None, "others_max_window": None, "windows": 0}
    windows = [others_share(a, b) for a, b in zip(samples, samples[1:], strict=False)]
    return {
        "others_mean": others_share(samples[0], samples[-1]),
        "others_max_window": max(windows),
        "windows": len(windows),
    }


def relative_change(before: float, after: float) -> float:
    return abs(after - before) / before if before > 0 else float("inf")


def verdict(
    probes_before: dict[str, float] | None,
    probes_after: dict[str, float] | None,
    others: dict[str, Any],
) -> dict[str, Any]:
    """{"noisy": bool, "reasons": [...], "changes": {probe: relative change}, "others": ...}.

    ``probes_*`` map a probe's name (e.g. "gemm_fp32_gflops", "copy_gbps") to its rate; only
    probes measured both times are compared. ``others`` is CpuMonitor.stop()'s summary.
    """
    reasons = []
    changes: dict[str, float] = {}
    if probes_before is None or probes_after is None:
        reasons.append("the machine's speed was not measured both before and after")
    else:
        for name in sorted(set(probes_before) & set(probes_after)):
            changes[name] = relative_change(probes_before[name], probes_after[name])
            if changes[name] > PROBE_TOLERANCE:
                reasons.append(
                    f"{name} went from {probes_before[name]:.1f} to {probes_after[name]:.1f} "
                    f"({100 * changes[name]:.0f}% > {100 * PROBE_TOLERANCE:.0f}%)"
                )
        if not changes:
            reasons.append("no speed probe was measured both before and after")
    reasons += others_reasons(others)
    return {"noisy": bool(reasons), "reasons": reasons, "changes": changes, "others": others}


def others_reasons(others: dict[str, Any]) -> list[str]:
    """Why other processes' CPU use (CpuMonitor.stop()'s summary) makes a run noisy, if it does."""
    mean, worst = others.get("others_mean"), others.get("others_max_window")
    if mean is None:
        return ["other processes' CPU use is unknown (no /proc/stat)"]
    reasons = []
    if mean > OTHERS_MEAN_LIMIT:
        reasons.append(
            f"other processes used {100 * mean:.0f}% of the CPU over the run "
            f"(> {100 * OTHERS_MEAN_LIMIT:.0f}%)"
        )
    if worst is not None and worst > OTHERS_WINDOW_LIMIT:
        reasons.append(
            f"other processes used {100 * worst:.0f}% of the CPU in one "
            f"{others.get('window_s', WINDOW_S):.0f} s window "
            f"(> {100 * OTHERS_WINDOW_LIMIT:.0f}%)"
        )
    return reasons


def repeat_verdict(rates: list[float], others: dict[str, Any]) -> dict[str, Any]:
    """The verdict on a run that repeats the same work (the trainer's steps): noisy when the
    rates' interquartile spread exceeds the probes' tolerance or other processes used the CPU."""
    reasons = []
    if len(rates) < 4:
        reasons.append(f"too few repetitions to judge ({len(rates)})")
    elif spread(rates) > PROBE_TOLERANCE:
        reasons.append(
            f"the same step's rate varied by {100 * spread(rates):.0f}% between quartiles "
            f"(> {100 * PROBE_TOLERANCE:.0f}%)"
        )
    reasons += others_reasons(others)
    return {"noisy": bool(reasons), "reasons": reasons, "spread": spread(rates), "others": others}


def spread(values: list[float]) -> float:
    """Interquartile spread of repeated measurements of the same work: q3 / q1 - 1."""
    ordered = sorted(values)
    if len(ordered) < 4:
        return 0.0
    q1 = ordered[len(ordered) // 4]
    q3 = ordered[(3 * len(ordered)) // 4]
    return q3 / q1 - 1 if q1 > 0 else float("inf")
