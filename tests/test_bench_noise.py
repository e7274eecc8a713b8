"""The benchmark noise guard (benchmarks/noise.py) and the interleaved timing of baselines
(benchmarks/harness.py), on synthetic numbers: what makes a run noisy, and what does not."""

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import harness, noise, shapes
from benchmarks.harness import Provider

QUIET_OTHERS = {"others_mean": 0.01, "others_max_window": 0.04, "window_s": 5.0}
PROBES = {"gemm_fp32_gflops": 100.0, "copy_gbps": 20.0}


def test_proc_stat_counts_steal_as_busy_and_iowait_as_idle():
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice
    text = f"cpu  {ticks} 0 {ticks} {5 * ticks} {ticks} 0 0 {2 * ticks} 0 0\ncpu0 1 2 3\n"
    assert noise.read_proc_stat(text) == (4.0, 10.0)
    with pytest.raises(ValueError, match="'cpu' total"):
        noise.read_proc_stat("intr 1 2 3\n")


def test_others_share_subtracts_this_process():
    first = noise.CpuSample(busy_s=10.0, total_s=100.0, own_s=5.0)
    # 20 s of CPU passed on the machine: 8 busy, of which 6 were this process's.
    last = noise.CpuSample(busy_s=18.0, total_s=120.0, own_s=11.0)
    assert noise.others_share(first, last) == pytest.approx(0.1)
    alone = noise.CpuSample(busy_s=16.0, total_s=120.0, own_s=11.0)
    assert noise.others_share(first, alone) == 0.0  # own time counted a tick late: not negative


def test_others_summary_keeps_the_worst_window():
    samples = [
        noise.CpuSample(0.0, 0.0, 0.0),
        noise.CpuSample(1.0, 10.0, 1.0),  # quiet window
        noise.CpuSample(7.0, 20.0, 2.0),  # others took 5 of 10 s
        noise.CpuSample(8.0, 30.0, 3.0),  # quiet again
    ]
    summary = noise.others_summary(samples)
    assert summary["windows"] == 3
    assert summary["others_max_window"] == pytest.approx(0.5)
    assert summary["others_mean"] == pytest.approx(5 / 30)
    assert noise.others_summary(samples[:1])["others_mean"] is None


def test_quiet_run_is_not_noisy():
    after = {"gemm_fp32_gflops": 90.0, "copy_gbps": 21.0}  # 10% and 5%: within 15%
    verdict = noise.verdict(PROBES, after, QUIET_OTHERS)
    assert not verdict["noisy"], verdict["reasons"]
    assert verdict["changes"]["gemm_fp32_gflops"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "after, others, reason",
    [
        ({"gemm_fp32_gflops": 80.0, "copy_gbps": 20.0}, QUIET_OTHERS, "gemm_fp32_gflops went"),
        ({"gemm_fp32_gflops": 100.0, "copy_gbps": 24.0}, QUIET_OTHERS, "copy_gbps went"),
        (PROBES, dict(QUIET_OTHERS, others_mean=0.06), "over the run"),
        (PROBES, dict(QUIET_OTHERS, others_max_window=0.3), "in one 5 s window"),
        (PROBES, {"others_mean": None}, "unknown"),
        (None, QUIET_OTHERS, "not measured both"),
        ({}, QUIET_OTHERS, "no speed probe"),
    ],
    ids=["gemm-slower", "copy-faster", "others-mean", "others-burst", "no-proc", "no-after",
         "no-common-probe"],
)
def test_each_sign_of_noise_makes_the_run_noisy(after, others, reason):
    verdict = noise.verdict(PROBES, after, others)
    assert verdict["noisy"]
    assert any(reason in r for r in verdict["reasons"]), verdict["reasons"]


def test_repeated_work_is_noisy_when_its_rate_spreads():
    steady = [1000.0, 1010.0, 990.0, 1005.0, 995.0, 1002.0, 998.0, 1001.0]
    assert noise.spread(steady) < 0.05
    assert not noise.repeat_verdict(steady, QUIET_OTHERS)["noisy"]
    swinging = [1000.0, 150.0, 1000.0, 150.0, 1000.0, 150.0, 1000.0, 150.0]  # the 10x
    verdict = noise.repeat_verdict(swinging, QUIET_OTHERS)
    assert verdict["noisy"] and "varied" in verdict["reasons"][0]
    assert noise.repeat_verdict(steady[:3], QUIET_OTHERS)["noisy"]  # too few to judge


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc/stat")
def test_cpu_monitor_samples_between_start_and_stop():
    monitor = noise.CpuMonitor(window_s=0.01).start()
    sum(i * i for i in range(200_000))  # some CPU time of our own
    summary = monitor.stop()
    assert summary["windows"] >= 1
    assert 0.0 <= summary["others_mean"] <= 1.0
    assert len(summary["load_after"]) == 3


def _session(disabled: bool) -> harness.BenchSession:
    grid = dataclasses.replace(
        shapes.grid("smoke", torch.device("cpu")), time_budget_s=1.0, min_rounds=4, max_rounds=6
    )
    return harness.BenchSession(torch.device("cpu"), grid, disabled, facts={})


def test_baselines_run_interleaved_with_the_held_fastattn_calls_in_abba_order():
    session = _session(disabled=False)
    calls = []
    ours = Provider("fastattn[cpu]", "fastattn", backend="cpu")
    theirs = Provider("torch.sdpa", "torch")
    key = ("attention", "fwd", "float32", "B1")
    session.hold(key, ours, lambda: calls.append("F"), t_call=0.5)
    timings = session.interleave(key, theirs, lambda: calls.append("T"), t_call=0.5)
    # budget 1 s / (0.5 + 0.5) s = 1 round, raised to min_rounds = 4
    assert calls == ["F", "T", "T", "F", "F", "T", "T", "F"]
    pair = timings["fastattn[cpu]"]
    assert pair["rounds"] == 4
    assert 0 < pair["fastattn_min_s"] <= pair["fastattn_median_s"]
    assert 0 < pair["torch_min_s"] <= pair["torch_median_s"]
    # another key: the held call is dropped, nothing to pair with
    assert session.interleave(("attention", "fwd", "float32", "B2"), theirs, calls.clear, 0.1) == {}


def test_a_call_slower_than_slow_call_s_is_timed_once():
    grid = dataclasses.replace(shapes.grid("smoke", torch.device("cpu")), slow_call_s=5.0)
    assert grid.rounds(0.001) == grid.max_rounds
    assert grid.rounds(4.0) == grid.min_rounds
    assert grid.rounds(6.0) == 1
    session = harness.BenchSession(torch.device("cpu"), grid, False, facts={})
    calls = []
    key = ("attention_varlen", "fwd", "float32", "N8")
    session.hold(key, Provider("fastattn[cpu]", "fastattn", backend="cpu"), lambda: calls.append(1),
                 t_call=0.5)
    pair = session.interleave(key, Provider("torch.sdpa[nested]", "torch"),
                              lambda: calls.append(2), t_call=12.0)
    assert pair["fastattn[cpu]"]["rounds"] == 1 and calls == [1, 2]


def test_untimed_run_interleaves_once_and_is_never_trusted():
    session = _session(disabled=True)
    calls = []
    key = ("lstm", "fwd", "float32", "T1")
    session.hold(key, Provider("fastattn.LSTM[cpu]", "fastattn", "cpu"), lambda: calls.append(1), 0)
    pair = session.interleave(key, Provider("torch.nn.LSTM", "torch"), lambda: calls.append(2), 0)
    assert pair["fastattn.LSTM[cpu]"]["rounds"] == 1 and calls == [1, 2]
    assert session.noise_verdict()["noisy"]


def test_pid_stat_parsing_survives_odd_command_names():
    ticks = os.sysconf("SC_CLK_TCK")
    fields = ["S", "41"] + ["0"] * 9 + [str(ticks), str(ticks), str(2 * ticks), "0"] + ["0"] * 30
    line = "4242 (py (worker) 1) " + " ".join(fields) + "\n"
    assert noise.parse_pid_stat(line) == (4242, 41, 4.0)


def test_descendants_are_the_whole_subtree():
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert noise.descendants(10, parents) == {11, 12, 13}
    assert noise.descendants(12, parents) == set()


def _self_seconds() -> float:
    own = os.times()
    return own.user + own.system


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux's /proc")
def test_a_busy_child_counts_as_our_own_work():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    child = subprocess.Popen([sys.executable, "-c", burn + "input()"], stdin=subprocess.PIPE)
    try:
        before = noise.own_tree_seconds() - _self_seconds()
        with open(f"/proc/{child.pid}/stat") as f:
            assert noise.parse_pid_stat(f.read())[:2] == (child.pid, os.getpid())
        deadline = time.monotonic() + 30
        # The live (unwaited) child's CPU shows in the tree's seconds, beyond our own.
        while noise.own_tree_seconds() - _self_seconds() - before < 0.2:
            assert time.monotonic() < deadline, "the child's CPU time never showed"
            time.sleep(0.05)
    finally:
        child.communicate(b"\n")
