"""The Triton LSTM kernels compile ahead of time for sm_80 and sm_90 without a GPU.

Catches what the interpreter cannot: lowering failures (an fp32 "ieee" tl.dot in the sequence
kernel crashed LLVM for sm_90 in triton 3.9) and register spills (local memory in the PTX).
Each config compiles in a subprocess, so a compiler abort fails one case instead of pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COMPILE = r"""
import json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastattn.triton_kernels import lstm_cell, lstm_sequence

kernel, dtype, arch, block_h = json.loads(sys.argv[1])
ptr = "*" + dtype
compute = tl.float64 if dtype == "fp64" else tl.float32
if kernel == "cell_fwd":
    fn, pointers = lstm_cell._lstm_cell_fwd_kernel, ["gates_ptr", "cx_ptr", "hy_ptr", "cy_ptr"]
    constexprs, warps = {"COMPUTE_DTYPE": compute, "BLOCK": lstm_cell.BLOCK}, 4
elif kernel == "cell_bwd":
    fn = lstm_cell._lstm_cell_bwd_kernel
    pointers = ["grad_hy_ptr", "grad_cy_ptr", "gates_ptr", "cx_ptr", "cy_ptr", "grad_gates_ptr",
                "grad_cx_ptr"]
    constexprs, warps = {"COMPUTE_DTYPE": compute, "BLOCK": lstm_cell.BLOCK}, 4
else:
    fn = lstm_sequence._lstm_sequence_fwd_kernel
    pointers = ["x_ptr", "h0_ptr", "c0_ptr", "w_ptr", "h_all_ptr", "c_all_ptr", "gates_all_ptr"]
    constexprs = {"BLOCK_B": lstm_sequence.BLOCK_B, "BLOCK_H": block_h}
    warps = 4 if block_h <= 32 else 8
signature = {}
for name in fn.arg_names:
    signature[name] = ptr if name in pointers else ("constexpr" if name in constexprs else "i32")
compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
print(json.dumps({"local_memory": ".local" in compiled.asm["ptx"]}))
"""

# A small matrix (each compile costs seconds on 2 cores): every kernel, the float32 and
# float64 math paths, a half type, both archs, and the sequence kernel's largest tile.
CONFIGS = [
    pytest.param(kernel, dtype, arch, 0, id=f"{kernel}-{dtype}-sm{arch}")
    for kernel in ("cell_fwd", "cell_bwd")
    for dtype, arch in (("fp32", 90), ("fp64", 90), ("bf16", 80))
] + [
    pytest.param("sequence", dtype, arch, block_h, id=f"sequence-{dtype}-H{block_h}-sm{arch}")
    for dtype, arch, block_h in (("fp32", 90, 64), ("fp32", 80, 64), ("bf16", 90, 16))
]


@pytest.mark.parametrize("kernel, dtype, arch, block_h", CONFIGS)
def test_compiles_without_spills(kernel, dtype, arch, block_h):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", COMPILE, json.dumps([kernel, dtype, arch, block_h])],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["local_memory"], f"{kernel} {dtype} sm_{arch}: PTX uses local memory"
