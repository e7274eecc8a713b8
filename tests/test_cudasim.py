"""Every CUDA kernel in csrc/ executed on the CPU by cudasim (tests/cudasim/), checked
against float64 references, under every scheduling policy, the shared-memory race checker
and (for a subset) ASan + UBSan. No GPU, nvcc or libcudart is involved: g++ and the CUDA
toolkit's headers only; without them these tests skip with the reason.

The programs are built once per pytest run and cached by source hash under build/cudasim/
(tests/cudasim/build.py). Select them alone with `pytest -m cudasim`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastattn.ops import reference

# Alone after the path change: whether isort calls tests/cudasim/build.py first- or third-party
# depends on whether setup.py's build/ directory exists at the root.
sys.path.insert(0, str(Path(__file__).resolve().parent / "cudasim"))
import build as cudasim_build  # noqa: E402

pytestmark = pytest.mark.cudasim

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("rr", "greedy", "greedy-rev")
RUN_TIMEOUT_S = 600


def _built(variant: str, programs: list[str] | None = None, csrc: Path | None = None) -> Path:
    try:
        return cudasim_build.build(variant, csrc=csrc, programs=programs)
    except cudasim_build.ToolchainMissing as e:
        pytest.skip(f"cudasim needs g++ and the CUDA headers: {e}")


@pytest.fixture(scope="session")
def check_build() -> Path:
    return _built("check")


@pytest.fixture(scope="session")
def asan_build() -> Path:
    return _built("asan")


def run(program: Path, *args: str, schedule: str = "rr", **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CUDASIM_SCHED": schedule, **env}
    return subprocess.run(
        [str(program), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=RUN_TIMEOUT_S,
    )


def assert_passes(result: subprocess.CompletedProcess) -> None:
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "ALL OK" in result.stdout, log[-8000:]


# ---- values, under every scheduling policy -----------------------------------------------
# "rr" keeps warps in lockstep; "greedy" / "greedy-rev" let the first / last warp run ahead
# to its next barrier, which exposes missing barriers as wrong values as well.


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_attention_fwd_bwd_decode(check_build, schedule):
    assert_passes(run(check_build / "attention", schedule=schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lstm_cell_step_and_sequence(check_build, schedule):
    # The skewed schedules run one persistent-kernel grid per dtype path, forward and backward
    # (they are the slow cases: every block is an OS thread with 256 fibers); lockstep runs
    # every case.
    cases = [] if schedule == "rr" else [
        "cell", "step", "projection", "sequence f32 T4 B20 H40 4 SMs", "sequence f16",
        "sequence bwd f32 T4 B20 H40 4 SMs", "sequence bwd f16",
        "sequence bwd f32 T5 B11 H40 packed"]
    assert_passes(run(check_build / "lstm", *cases, schedule=schedule))


def test_dropout_keep_mask_is_the_cpu_philox_stream(check_build, tmp_path):
    """The forward kernels (main and split-KV decode) drop exactly what the CPU backend's
    Philox stream (fastattn.ops.reference.dropout_keep_mask) drops, bit for bit."""
    path = tmp_path / "keep.bin"
    result = run(check_build / "attention", f"--dropout-mask={path}")
    assert result.returncode == 0, result.stdout + result.stderr
    got = np.fromfile(path, dtype=np.uint8)
    seed = 0x9E3779B97F4A7C15  # the harness's seed (both halves of the Philox key in use)
    offset = 0
    for shape, p in (((2, 3, 33, 50), 0.3), ((1, 2, 3, 200), 0.5)):
        n = int(np.prod(shape))
        kernel = torch.from_numpy(got[offset : offset + n].astype(bool)).reshape(shape)
        offset += n
        expected = reference.dropout_keep_mask(seed, shape, p, torch.device("cpu"))
        assert 0.3 < expected.float().mean() < 0.8
        assert torch.equal(kernel, expected), (
            f"keep masks differ at {(kernel != expected).nonzero()[:5]}"
        )
    assert offset == got.size


def test_varlen_dropout_keep_mask_follows_the_varlen_counter(check_build, tmp_path):
    """The varlen forward drops (b, h, i, j) by VARLEN_SPEC's counter
    ((h * total_q) + cu_seqlens_q[b] + i) * max_seqlen_k + j: the keep bits of the dense
    [1, Hq, total_q, max_seqlen_k] Philox stream, at each sequence's rows and own keys."""
    path = tmp_path / "keep.bin"
    result = run(check_build / "attention", f"--varlen-dropout-mask={path}")
    assert result.returncode == 0, result.stdout + result.stderr
    lens_q, lens_k, heads, p = [3, 0, 9], [20, 5, 33], 3, 0.3  # the harness's packed sequences
    total_q, max_k = sum(lens_q), max(lens_k)
    got = torch.from_numpy(np.fromfile(path, dtype=np.uint8).astype(bool))
    got = got.reshape(heads, total_q, max_k)
    seed = 0x9E3779B97F4A7C15
    expected = reference.dropout_keep_mask(seed, (1, heads, total_q, max_k), p, torch.device("cpu"))
    row = 0
    for length_q, length_k in zip(lens_q, lens_k, strict=True):
        rows = slice(row, row + length_q)
        assert torch.equal(got[:, rows, :length_k], expected[0, :, rows, :length_k])
        row += length_q
    assert 0.5 < got.float().sum() / (heads * sum(q * k for q, k in zip(lens_q, lens_k))) < 0.9


# ---- the emulator's own checks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("race-lockstep", "shared-memory race"),
        ("race-war", "shared-memory race (write after read)"),
        ("barrier", "threads 0..63 (warps 0..1) wait at __syncthreads"),
        ("shfl", "divergent warp collective in warp 0: lane 16 at"),
        ("deadlock", "threads 96..127 (warps 3..3) exited"),
    ],
)
def test_emulator_reports(check_build, mode, expected):
    """Races (found under the lockstep schedule, where values would not show them),
    divergence and deadlocks are reported with the source line of each wait or access."""
    result = run(check_build / "selftest", mode)
    assert result.returncode != 0
    assert expected in result.stderr, result.stdout + result.stderr
    assert "selftest.cpp:" in result.stderr  # the report names the source line


def test_race_checker_accepts_warp_synchronized_exchange(check_build):
    result = run(check_build / "selftest", "warp-synced")
    assert result.returncode == 0 and "warp-synced: ok" in result.stdout, result.stderr


def test_race_checker_catches_deleted_syncthreads_under_lockstep(tmp_path):
    """A real kernel with one barrier deleted (the persistent LSTM kernel's barrier between
    the recurrent product and the pointwise pass): the race checker fails it under the
    lockstep schedule, naming the kernel source line."""
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc, ignore=shutil.ignore_patterns("*.cpp"))
    source = csrc / "lstm" / "lstm_sequence.cuh"
    text = source.read_text()
    barrier = "      __syncthreads();\n\n      for (int e = threadIdx.x; e < tile_rows * units;"
    assert text.count(barrier) == 1, "the barrier this test deletes moved: update the test"
    source.write_text(
        text.replace(barrier, "\n\n      for (int e = threadIdx.x; e < tile_rows * units;")
    )
    mutant = _built("check", ["lstm"], csrc=csrc)
    result = run(mutant / "lstm", "sequence f32 T2 B1 H1", schedule="rr")
    assert result.returncode != 0
    assert "shared-memory race" in result.stderr and "lstm_sequence.cuh:" in result.stderr, (
        result.stderr
    )


def test_bank_conflict_report(check_build, capsys):
    """Per-kernel shared-memory bank conflicts, printed for tuning (never a failure); the
    self-test's column read proves the counter sees a 32-way conflict."""
    result = run(check_build / "selftest", "banks", CUDASIM_BANK_REPORT="1")
    assert result.returncode == 0
    assert "selftest::banks(float*)" in result.stdout and "1023 conflicts" in result.stdout, (
        result.stdout
    )
    report = []
    for program, args in (
        ("attention", ["f16 E64 GQA", "decode GQA"]),
        ("lstm", ["sequence f16", "cell f16"]),
    ):
        out = run(check_build / program, *args, CUDASIM_BANK_REPORT="1")
        assert out.returncode == 0, out.stdout + out.stderr
        report += [
            line for line in out.stdout.splitlines() if line.startswith("cudasim bank conflicts")
        ]
    assert report
    with capsys.disabled():
        print("\n" + "\n".join(report))


# ---- AddressSanitizer + UBSan ---------------------------------------------------------------


def _asan_env() -> dict[str, str]:
    # The fibers switch stacks; ASan is told (start/finish_switch_fiber), but its
    # stack-use-after-return detector cannot follow ucontext switches.
    return {
        "ASAN_OPTIONS": "detect_stack_use_after_return=0:detect_leaks=0",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }


@pytest.mark.parametrize("program", ["attention", "lstm"])
def test_asan_ubsan_subset(asan_build, program):
    cases = ["cell", "step", "projection", "sequence f16", "sequence f64", "sequence bwd f16",
             "sequence bwd f64", "sequence bwd bf16"] if program == "lstm" else []
    assert_passes(run(asan_build / program, *cases, **_asan_env()))


def test_asan_catches_shared_memory_overrun(asan_build):
    result = run(asan_build / "selftest", "oob", **_asan_env())
    assert result.returncode != 0
    assert "AddressSanitizer" in result.stderr, result.stdout + result.stderr


def test_every_mutation_still_applies():
    """Each mutant of scripts/mutation_check.sh names a snippet found exactly once in today's
    sources; one a rename orphans stops the whole check there (batch-idx-ignored did)."""
    import mutations  # tests/cudasim/mutations.py, on the path like build

    for m in mutations.MUTATIONS:
        assert (ROOT / "csrc" / m.file).read_text().count(m.old) == 1, m.name
