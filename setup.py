"""Builds fastattn._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

Environment:
  FASTATTN_CUDA=0|1        force the CUDA kernels off / on (on fails loudly if impossible)
  FASTATTN_CUDA_ARCHS      e.g. "8.0;9.0a" (else TORCH_CUDA_ARCH_LIST, else "8.0;9.0a")
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build)
  FASTATTN_ASAN=1          AddressSanitizer + UndefinedBehaviorSanitizer build of the C++ CPU code
                           (for scripts/asan_check.sh; Python must then run with libasan preloaded)
"""

import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "fastattn: torch is not importable in the build environment. fastattn compiles against "
        "the torch you already have: install torch first, then run "
        "`pip install --no-build-isolation .`"
    )

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "8.0;9.0a"

# Sources (`*.isa.cpp`) compiled once per x86 ISA and picked at run time
# (csrc/include/fastattn/cpu_isa.h). Each variant defines CPU_CAPABILITY=<ISA> and
# CPU_CAPABILITY_<ISA> as PyTorch's own build does: at::vec's `inline namespace
# CPU_CAPABILITY` then differs per variant, so no at::vec inline function of one width can
# stand in for another variant's at link time.
ISA_SOURCE_SUFFIX = ".isa.cpp"


def isa_flags(capability, machine_flags=()):
    return [*machine_flags, f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]


X86_ISAS = {
    "isa_default": isa_flags("DEFAULT"),
    "isa_avx2": isa_flags("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    "isa_avx512": isa_flags(
        "AVX512",
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    ),
}


def rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


# FASTATTN_ASAN=1: every C++ CPU source, per-ISA kernels included, built with these (compile and
# link). UBSan's findings abort instead of printing and going on, so that a test run fails.
SANITIZER_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
]


def asan_requested():
    value = os.environ.get("FASTATTN_ASAN", "0")
    if value not in ("", "0", "1"):
        sys.exit(f"fastattn: FASTATTN_ASAN must be 0 or 1, got {value!r}")
    return value == "1"


def cuda_decision():
    """Returns (build_cuda, reason) without ever probing for a GPU."""
    forced = os.environ.get("FASTATTN_CUDA")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"fastattn: FASTATTN_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "FASTATTN_CUDA=0"
    if asan_requested():
        return False, "FASTATTN_ASAN=1 (the sanitized build is CPU-only)"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if (
        cpp_extension.CUDA_HOME is None
        or shutil.which(
            "nvcc",
            path=os.path.join(cpp_extension.CUDA_HOME or "", "bin")
            + os.pathsep
            + os.environ.get("PATH", ""),
        )
        is None
    ):
        problems.append("nvcc was not found (set CUDA_HOME)")
    if problems:
        if forced == "1":
            sys.exit(
                "fastattn: FASTATTN_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(problems)
            )
        return False, "; ".join(problems)
    return True, ""


def cuda_arch_flags():
    archs = (
        os.environ.get("FASTATTN_CUDA_ARCHS")
        or os.environ.get("TORCH_CUDA_ARCH_LIST")
        or DEFAULT_ARCHS
    )
    flags = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        arch = arch.replace("+PTX", "")
        num = arch.replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return archs, flags


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension plus per-ISA objects for the `*.isa.cpp` kernel sources."""

    def build_extension(self, ext):
        isa_sources = getattr(ext, "isa_sources", [])
        if isa_sources:
            cxx_flags = (
                ext.extra_compile_args["cxx"]
                if isinstance(ext.extra_compile_args, dict)
                else list(ext.extra_compile_args)
            )
            isas = (
                X86_ISAS
                if platform.machine().lower() in ("x86_64", "amd64")
                else {"isa_default": X86_ISAS["isa_default"]}
            )
            for namespace, flags in isas.items():
                objects = self.compiler.compile(
                    isa_sources,
                    output_dir=os.path.join(self.build_temp, namespace),
                    include_dirs=ext.include_dirs,
                    extra_postargs={
                        "cxx": cxx_flags + flags + [f"-DFASTATTN_ISA_NAMESPACE={namespace}"],
                        "nvcc": [],
                    },
                    depends=ext.depends,
                )
                ext.extra_objects = list(ext.extra_objects) + objects
        super().build_extension(ext)


def make_extension():
    build_cuda, why_not = cuda_decision()
    all_cpp = [p for p in CSRC.rglob("*.cpp")]
    isa_sources = rel(p for p in all_cpp if p.name.endswith(ISA_SOURCE_SUFFIX))
    glue_cuda = [p for p in all_cpp if p.name.endswith("_cuda.cpp")]
    sources = rel(
        p for p in all_cpp if not p.name.endswith(ISA_SOURCE_SUFFIX) and p not in glue_cuda
    )
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    # Hidden inline functions: at::vec helpers the compiler keeps out of line are then called
    # directly instead of through the PLT.
    cxx = ["-O3", "-std=c++17", "-fvisibility-inlines-hidden",
           "-fopenmp" if sys.platform == "linux" else "", "-DFASTATTN_BUILD"]
    cxx = [f for f in cxx if f]
    if x86:
        cxx.append("-DFASTATTN_X86_ISA_VARIANTS")
    link = ["-fopenmp"] if sys.platform == "linux" else []
    asan = asan_requested()
    if asan:
        # -O1 keeps the sanitizers' reports readable and their run time bearable.
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-g", *SANITIZER_FLAGS]
        link += SANITIZER_FLAGS
        print("fastattn: AddressSanitizer/UBSan build (FASTATTN_ASAN=1)")
    kwargs = dict(
        name="fastattn._C",
        include_dirs=[str(CSRC / "include")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        # The `*.isa.cpp` sources too: build_ext relinks only when a source or a depends
        # entry is newer than the library, and the per-ISA objects are not its sources.
        depends=rel(CSRC.rglob("*.h")) + rel(CSRC.rglob("*.cuh")) + isa_sources,
    )
    if build_cuda:
        archs, arch_flags = cuda_arch_flags()
        sources += rel(glue_cuda) + rel(CSRC.rglob("*.cu"))
        kwargs["extra_compile_args"] = {
            "cxx": cxx + ["-DFASTATTN_WITH_CUDA", f'-DFASTATTN_CUDA_ARCHS="{archs}"'],
            "nvcc": [
                "-O3",
                "-std=c++17",
                "--use_fast_math",
                "-lineinfo",
                "--expt-relaxed-constexpr",
                "-DFASTATTN_WITH_CUDA",
            ]
            + arch_flags,
        }
        ext = cpp_extension.CUDAExtension(sources=sources, **kwargs)
        print(f"fastattn: building CUDA kernels for archs {archs}")
    else:
        ext = cpp_extension.CppExtension(sources=sources, **kwargs)
        print(f"fastattn: CUDA kernels skipped: {why_not}")
    ext.isa_sources = isa_sources
    return ext


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
