"""`python -m fastattn.info`: versions, build facts, backends, CPU ISA and GPU."""

from __future__ import annotations

import platform
import sys

import torch

import fastattn
from fastattn import _extension


def facts() -> dict[str, object]:
    C = _extension.C
    out: dict[str, object] = {
        "fastattn": fastattn.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu threads": torch.get_num_threads(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    if C is None:
        out["fastattn._C"] = f"not loaded: {_extension.LOAD_ERROR}"
    else:
        out["fastattn._C"] = f"built against torch {C.torch_version()}"
        out["cpu isa used"] = C.cpu_isa()
        out["tile engine"] = ", ".join(
            f"{dtype}: {C.cpu_attention_tile_engine(dtype)}"
            for dtype in ("float32", "float64", "bfloat16", "float16")
        )
        # fastattn.ops.linear's choice (MultiheadAttention's projections): its own GEMM or torch's
        out["linear gemm"] = (
            "fastattn (oneDNN brgemm)" if C.cpu_gemm_beats_torch_mm() else "torch.mm")
        out["cuda kernels"] = f"archs {C.cuda_archs()}" if C.built_with_cuda() else "not built"
    out["gpu"] = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else "none"
    )
    return out


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    for key, value in facts().items():
        print(f"{key:>14}: {value}")
    print("      backends:")
    for name, status in fastattn.backends().items():
        state = (
            "usable" if status.usable else ("built, not usable" if status.built else "not built")
        )
        print(f"{name:>14}: {state}{' (' + status.reason + ')' if status.reason else ''}")


if __name__ == "__main__":
    main()
