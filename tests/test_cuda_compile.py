"""The CUDA sources compile without a GPU (issue 2, item 7).

Every ``csrc/**/*.cu`` is compiled with bare nvcc (the kernels are torch-free) for sm_80 and
sm_90a, two files at a time; any compile error fails, and so does any register spill in the
main attention configs (head dims 64 and 128). ptxas' register / spill report goes to a
temporary directory (tests never write tracked files), or to $FASTATTN_PTXAS_REPORT when set:
scripts/ptxas_report.sh sets it to refresh the committed
benchmarks/results/ptxas/ptxas_report.txt. Every ``csrc/**/*_cuda.cpp`` glue file is
syntax-checked with g++ against the installed torch's headers (a CPU wheel ships the
c10/cuda headers) and the CUDA headers. Skips, with the reason, where nvcc is absent.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ("80", "90a")
PARALLEL_JOBS = 2
# Files whose kernels must not spill: the attention configs users run most.
NO_SPILL_FILES = re.compile(r"hdim(64|128)\.cu$")
# setup.py's nvcc flags plus the half / bfloat16 operator bans torch's extension build adds.
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "-Xptxas",
    "-v",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    f"-I{CSRC / 'include'}",
] + [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") or shutil.which("nvcc", path=os.path.join(cuda_home, "bin"))


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (PATH, CUDA_HOME): CUDA compile check skipped"
)


def report_path(tmp_dir: Path) -> Path:
    """Where the ptxas report goes: $FASTATTN_PTXAS_REPORT (scripts/ptxas_report.sh) or tmp_dir."""
    chosen = os.environ.get("FASTATTN_PTXAS_REPORT")
    return Path(chosen) if chosen else tmp_dir / "ptxas_report.txt"


@dataclass
class KernelUsage:
    function: str
    arch: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


@dataclass
class Compiled:
    source: Path
    returncode: int
    seconds: float
    log: str
    kernels: list[KernelUsage] = field(default_factory=list)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> list[KernelUsage]:
    kernels: list[KernelUsage] = []
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            kernels.append(KernelUsage(m.group(1), m.group(2)))
        elif kernels and (m := _SPILLS.search(line)):
            kernels[-1].spill_stores, kernels[-1].spill_loads = int(m.group(1)), int(m.group(2))
        elif kernels and (m := _REGISTERS.search(line)):
            kernels[-1].registers = int(m.group(1))
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines(), strict=False))


def compile_one(source: Path, out_dir: Path) -> Compiled:
    start = time.monotonic()
    obj = out_dir / (source.relative_to(CSRC).as_posix().replace("/", "__") + ".o")
    proc = subprocess.run(
        [NVCC, *NVCC_FLAGS, "-c", str(source), "-o", str(obj)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    log = proc.stdout + proc.stderr
    return Compiled(source, proc.returncode, time.monotonic() - start, log, parse_ptxas(log))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_report(
    results: list[Compiled], wall_seconds: float, cpu_seconds: float, report: Path
) -> None:
    names = demangle(sorted({k.function for r in results for k in r.kernels}))
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    lines = [
        "# ptxas register / spill report (tests/test_cuda_compile.py)",
        f"# nvcc: {version.strip().splitlines()[-1]}",
        f"# flags: {' '.join(f for f in NVCC_FLAGS if not f.startswith('-I'))}",
        f"# {len(results)} files, {PARALLEL_JOBS} parallel jobs, wall {wall_seconds:.0f} s "
        f"(sum of per-file times {sum(r.seconds for r in results):.0f} s), "
        f"compiler CPU time {cpu_seconds:.0f} s, {os.cpu_count()} CPUs "
        f"(load average at the end {os.getloadavg()[0]:.1f})",
        "",
    ]
    for r in results:
        lines.append(f"## {r.source.relative_to(ROOT)}  ({r.seconds:.0f} s, rc {r.returncode})")
        for k in sorted(r.kernels, key=lambda k: (names.get(k.function, k.function), k.arch)):
            lines.append(
                f"  {k.arch:7} regs {k.registers:3}  spill stores {k.spill_stores:5}  "
                f"loads {k.spill_loads:5}  {names.get(k.function, k.function)}"
            )
        lines.append("")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[Compiled]:
    sources = sorted(CSRC.rglob("*.cu"))
    if not sources:
        pytest.skip("no .cu sources under csrc/")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(PARALLEL_JOBS) as pool:
        start, cpu_start = time.monotonic(), children_cpu_seconds()
        # The slowest files first, so that two jobs finish close together.
        order = sorted(sources, key=lambda p: ("bwd" not in p.name, p.name))
        results = list(pool.map(lambda s: compile_one(s, Path(tmp)), order))
        wall, cpu = time.monotonic() - start, children_cpu_seconds() - cpu_start
    results.sort(key=lambda r: r.source)
    write_report(results, wall, cpu, report_path(tmp_path_factory.mktemp("ptxas")))
    return results


def test_the_report_is_not_written_into_the_checkout_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FASTATTN_PTXAS_REPORT", raising=False)
    assert report_path(tmp_path) == tmp_path / "ptxas_report.txt"
    monkeypatch.setenv("FASTATTN_PTXAS_REPORT", str(tmp_path / "chosen.txt"))
    assert report_path(tmp_path) == tmp_path / "chosen.txt"


@needs_nvcc
def test_every_cu_compiles_for_sm80_and_sm90a(compiled: list[Compiled]) -> None:
    failed = [r for r in compiled if r.returncode != 0]
    assert not failed, "\n\n".join(
        f"{r.source.relative_to(ROOT)}:\n{r.log[-4000:]}" for r in failed
    )
    for r in compiled:
        archs = {k.arch for k in r.kernels}
        assert not r.kernels or archs == {f"sm_{a}" for a in ARCHS}, (
            f"{r.source.name}: compiled for {archs}"
        )


@needs_nvcc
def test_main_attention_configs_do_not_spill(compiled: list[Compiled]) -> None:
    checked = [r for r in compiled if NO_SPILL_FILES.search(r.source.name)]
    assert checked, "no main-config (hdim64 / hdim128) sources found"
    names = demangle(sorted({k.function for r in checked for k in r.kernels}))
    spills = [
        f"{r.source.name} {k.arch} {names[k.function]}: "
        f"{k.spill_stores} B stores, {k.spill_loads} B loads"
        for r in checked
        for k in r.kernels
        if k.spill_stores or k.spill_loads
    ]
    assert not spills, "register spills in main configs:\n" + "\n".join(spills)
    assert all(r.kernels for r in checked), "ptxas printed no kernel usage for a main-config file"


def _glue_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    cuda_include = Path(os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))) / "include"
    return [
        "-fsyntax-only",
        "-std=c++17",
        *[f"-I{p}" for p in include_paths()],
        f"-I{cuda_include}",
        "-I/usr/local/cuda/include",
        f"-I{CSRC / 'include'}",
        "-DFASTATTN_WITH_CUDA",
        # A CPU torch wheel ships c10/cuda but not the build-generated cuda_cmake_macros.h.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
    ]


@needs_nvcc
@pytest.mark.parametrize("glue", sorted(CSRC.rglob("*_cuda.cpp")), ids=lambda p: p.name)
def test_cuda_glue_syntax(glue: Path) -> None:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no g++ / c++ to syntax-check the CUDA glue")
    proc = subprocess.run(
        [cxx, *_glue_flags(), str(glue)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
