"""Builds the cudasim test programs, cached by the hash of everything that goes into them.

Used by tests/test_cudasim.py (once per pytest run) and scripts/mutation_check.sh. The kernel
sources (csrc/attention, csrc/lstm, csrc/include) are copied and rewritten by
rewrite_sources.py, then compiled with g++ and the CUDA toolkit's headers only (no nvcc, no
libcudart, no GPU) together with the emulator (runtime/) and the test programs (harness/).

Variants:
  check  every program, kernels instrumented for the shared-memory race checker and bank
         counter (-fsanitize=thread instrumentation, linked against runtime/smem_check.cpp
         instead of libtsan);
  subset the same with the attention program reduced to two configs (CUDASIM_CONFIG_SUBSET):
         what the mutation check rebuilds per mutant;
  asan   AddressSanitizer + UBSan: the LSTM program, the self-test and the attention program
         reduced to the two configs, because ASan builds of all 24 attention configs take
         minutes.

Outputs go to <repo>/build/cudasim/<variant>-<hash>/ (build/ is git-ignored); a finished
directory is reused as is. Command line: python tests/cudasim/build.py [--variant V]
[--csrc DIR] [--out DIR] [PROGRAM ...] prints the output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNTIME = HERE / "runtime"
HARNESS = HERE / "harness"
CACHE = ROOT / "build" / "cudasim"
KERNEL_DIRS = ("attention", "lstm", "include")

PROGRAMS = {"attention": "attention.cpp", "lstm": "lstm.cpp", "selftest": "selftest.cpp"}
BASE_FLAGS = ["-std=c++17", "-O1", "-g", "-w", "-pthread", "-fno-extern-tls-init"]
# GCC's thread-sanitizer instrumentation without its runtime: smem_check.cpp answers the calls.
RACE_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]
ASAN_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
]


class ToolchainMissing(RuntimeError):
    """g++ or the CUDA headers are not installed: the cudasim tests skip with this reason."""


def find_toolchain() -> tuple[str, Path]:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not shutil.which(cxx):
        raise ToolchainMissing("g++ not found (PATH or CXX)")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for home in filter(None, candidates):
        include = Path(home) / "include"
        if (include / "cuda_runtime.h").is_file() and (include / "cuda_fp16.h").is_file():
            return cxx, include
    raise ToolchainMissing("CUDA headers (cuda_runtime.h, cuda_fp16.h) not found: set CUDA_HOME")


def _inputs(csrc: Path) -> list[Path]:
    files = [p for d in KERNEL_DIRS for p in sorted((csrc / d).rglob("*")) if p.is_file()]
    files += sorted(RUNTIME.iterdir()) + sorted(HARNESS.iterdir())
    return files + [HERE / "rewrite_sources.py", Path(__file__)]


def cache_key(csrc: Path, cxx: str, include: Path, variant: str, programs: list[str]) -> str:
    h = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(f"{variant} {programs} {version} {include}".encode())
    for path in _inputs(csrc):
        if path.suffix in (".pyc",) or not path.is_file():
            continue
        h.update(str(path.relative_to(csrc if path.is_relative_to(csrc) else HERE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _compile(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"cudasim build failed: {' '.join(cmd)}\n{result.stderr[-6000:]}")


def build(
    variant: str = "check",
    csrc: Path | None = None,
    out: Path | None = None,
    programs: list[str] | None = None,
) -> Path:
    """Returns the directory holding the built programs (building them if not cached)."""
    cxx, include = find_toolchain()
    csrc = Path(csrc or ROOT / "csrc").resolve()
    programs = sorted(programs or PROGRAMS)
    if out is None:
        out = CACHE / f"{variant}-{cache_key(csrc, cxx, include, variant, programs)}"
    if all((out / p).is_file() for p in programs):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        gen = work / "gen"
        for d in KERNEL_DIRS:
            subprocess.run(
                [sys.executable, str(HERE / "rewrite_sources.py"), str(csrc / d), str(gen / d)],
                check=True,
            )
        common = [
            cxx,
            *BASE_FLAGS,
            f"-I{include}",
            f"-I{RUNTIME}",
            f"-I{HARNESS}",
            f"-I{gen}",
            f"-I{gen / 'include'}",
        ]
        if variant == "asan":
            flags, link_flags = ASAN_FLAGS, ASAN_FLAGS
        else:
            flags, link_flags = RACE_FLAGS, []
        extra = ["-DCUDASIM_CONFIG_SUBSET"] if variant in ("subset", "asan") else []
        jobs = [
            [
                *common,
                *(flags if variant == "asan" else []),
                "-c",
                str(RUNTIME / "smem_check.cpp"),
                "-o",
                str(work / "smem_check.o"),
            ]
        ]
        for p in programs:
            jobs.append(
                [
                    *common,
                    *flags,
                    *extra,
                    "-include",
                    "cudasim.h",
                    "-c",
                    str(HARNESS / PROGRAMS[p]),
                    "-o",
                    str(work / f"{p}.o"),
                ]
            )
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            list(pool.map(_compile, jobs))
        for p in programs:
            _compile(
                [
                    cxx,
                    *BASE_FLAGS,
                    *link_flags,
                    "-rdynamic",
                    str(work / f"{p}.o"),
                    str(work / "smem_check.o"),
                    "-ldl",
                    "-o",
                    str(work / p),
                ]
            )
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=("check", "subset", "asan"), default="check")
    parser.add_argument("--csrc", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("programs", nargs="*", help=f"some of {sorted(PROGRAMS)} (default: all)")
    args = parser.parse_args()
    print(build(args.variant, args.csrc, args.out, args.programs or None))


if __name__ == "__main__":
    main()
