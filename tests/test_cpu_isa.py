"""The per-ISA builds of the `*.isa.cpp` CPU kernels: each variant has its own at::vec, and
each one this CPU can run passes the CPU op tests.

This pytest process runs the whole suite under the widest ISA the CPU supports (or the one
ATEN_CPU_CAPABILITY caps it to); every other variant runs a chosen subset of the CPU attention
and LSTM op tests in a subprocess with ATEN_CPU_CAPABILITY set, so that no compiled variant
ships untested. A variant the CPU lacks is skipped, with the reason.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn import _extension

ROOT = Path(__file__).resolve().parents[1]
C = _extension.C
pytestmark = pytest.mark.skipif(
    C is None, reason=f"fastattn._C is not built: {_extension.LOAD_ERROR}"
)

X86 = platform.machine().lower() in ("x86_64", "amd64")
ISAS = ["default", "avx2", "avx512"] if X86 else ["default"]
# at::vec's inline namespace per variant (the CPU_CAPABILITY setup.py defines for it).
VEC_NAMESPACE = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
# float lanes of at::vec::Vectorized<float> on x86: DEFAULT emulates 256-bit vectors.
X86_FLOAT_LANES = {"default": 8, "avx2": 8, "avx512": 16}

# What a narrower variant runs: every CPU kernel entry point with every dtype (attention
# forward/backward with masks, windows, GQA, dropout, split-key decode; LSTM cell, layer and
# inference kernels with every option; the LayerNorm-LSTM kernels), leaving out what does not
# depend on the ISA (argument checks, opcheck, gradcheck, compile, other backends) and repeats
# of one kernel path at more sizes. About 70 s of CPU time per variant.
SUBSET_FILES = [
    "tests/test_attention_cpu_op.py",
    "tests/test_lstm_ops.py",
    "tests/test_lstm_layer_norm.py",
]
SUBSET_K = (
    "((test_attention_cpu_op and not opcheck and not bad_inputs and not use_avx512_bf16)"
    " or test_cell_pointwise_matches or test_layer_fwd_bwd_match_reference"
    " or test_layer_ops_with_weight_copies_past_the_scratch_cap"
    " or (test_layer_infer_matches_reference and plain and (fp32 or bf16))"
    " or (test_fwd_bwd_match_reference and ((T5B4H33 and (fp32 or bf16)) or (T5B4H7 and plain)))"
    ") and not cuda"
)


def runnable_variants() -> dict[str, tuple[str, int]]:
    return {isa: (vec_type, lanes) for isa, vec_type, lanes in C.cpu_isa_variants()}


def test_each_variant_reports_its_own_at_vec():
    variants = runnable_variants()
    assert "default" in variants
    assert C.cpu_isa() in variants
    for isa, (vec_type, lanes) in variants.items():
        ns = VEC_NAMESPACE[isa]
        # The mangled at::vec::<ns>::Vectorized<float>, as the variant's own code sees it.
        assert vec_type == f"N2at3vec{len(ns)}{ns}10VectorizedIfEE", (isa, vec_type)
        if X86:
            assert lanes == X86_FLOAT_LANES[isa], (isa, lanes)
    assert len({vec_type for vec_type, _ in variants.values()}) == len(variants)


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_linked_variants_keep_their_own_at_vec_code():
    # Every compiled variant, runnable here or not: a symbol of fastattn::isa_<x> names only
    # at::vec::<X> types and functions, so the linker had nothing to merge across variants.
    nm = subprocess.run(["nm", "-C", "--defined-only", C.__file__], capture_output=True,
                        text=True, check=True).stdout
    seen = set()
    for line in nm.splitlines():
        namespaces = set(re.findall(r"at::vec::(\w+)::", line))
        seen |= namespaces
        for isa in set(re.findall(r"fastattn::isa_(\w+)::", line)):
            assert namespaces <= {VEC_NAMESPACE[isa]}, line
    assert seen == {VEC_NAMESPACE[isa] for isa in ISAS}, seen


def _run_tests_under(isa: str, files: list[str], k: str) -> None:
    """pytest files -k k in a subprocess with ATEN_CPU_CAPABILITY=isa: every selected test must
    pass (none skipped). Skips when this CPU lacks isa or this process runs under it already."""
    variants = runnable_variants()
    if isa not in variants:
        pytest.skip(f"this CPU lacks {isa} (it runs at most {list(variants)[-1]})")
    if isa == C.cpu_isa():
        pytest.skip(f"this pytest process runs every test under {isa} already")
    args = [*files, "-q", "-p", "no:cacheprovider", "-k", k]
    script = (
        "import sys, pytest\n"
        "from fastattn import _extension\n"
        f"assert _extension.C.cpu_isa() == {isa!r}, _extension.C.cpu_isa()\n"
        f"sys.exit(pytest.main({args!r}))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    output = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, f"tests under {isa}:\n{output}"
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_op_tests_pass_under(isa):
    _run_tests_under(isa, SUBSET_FILES, SUBSET_K)


@pytest.mark.slow
def test_inductor_lstm_matches_eager_under_avx2():
    """Issue 18: on an AVX-512 Xeon, a two-layer fastattn.LSTM compiled by Inductor with
    gradients under ATEN_CPU_CAPABILITY=avx2 gave values 0.36 away from eager (and without
    gradients corrupted the heap). The fp32 cases of test_op_compile, with and without grad."""
    _run_tests_under("avx2", ["tests/test_op_compile.py"],
                     "test_inductor_lstm_matches_eager and fp32")


def test_inductor_cache_dir_is_per_isa():
    """Inductor's FX graph cache key omits ATEN_CPU_CAPABILITY: a graph compiled under AVX-512 was
    served to an avx2 run. conftest.py keys the cache dir by the ISA torch runs, here and in a
    subprocess that inherits this process's (already keyed) variable under another ISA."""
    ours = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert os.path.basename(ours) == "isa-" + torch.backends.cpu.get_cpu_capability().lower()
    script = "import conftest, os; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(ROOT / "tests")}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert run.stdout.strip() == os.path.join(os.path.dirname(ours), "isa-default")
