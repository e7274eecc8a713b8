"""The engine of the CPU attention's bf16 tile products, forward and backward (issue 15 item 3),
and of the CPU LSTM's bf16 recurrent products.

Where the CPU has AMX-BF16 the products run through ATen's oneDNN brgemm (AMX tiles); elsewhere
the attention's on AVX512-BF16 through our vdpbf16ps micro-kernel, the LSTM's on fp32 FMAs (the
weights converted). FASTATTN_CPU_TILE_ENGINE=brgemm|native
overrides the choice (oneDNN's bf16 brgemm also runs without AMX, on AVX512-BF16), so that both
engines are tested on either kind of machine: the cases here run under this process's engine,
and test_bf16_tests_pass_on_the_other_engine reruns them, and the bf16 op tests (dense, varlen
and KV cache, forward and backward) and the bf16 LSTM layer op tests, under the other one in a
subprocess (the engine is chosen once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_attention_cpu_op import check, cpu_flags, expected_bf16_engine, inputs, make_opts

from fastattn import _extension

ROOT = Path(__file__).resolve().parents[1]
C = _extension.C
pytestmark = pytest.mark.skipif(
    C is None, reason=f"fastattn._C is not built: {_extension.LOAD_ERROR}"
)

FLAGS = cpu_flags()
AVX512_BF16 = C is not None and C.cpu_isa() == "avx512" and "avx512_bf16" in FLAGS
ASKED = os.environ.get("FASTATTN_CPU_TILE_ENGINE", "").lower()
OTHER_ENGINE = "native" if "amx_bf16" in FLAGS else "brgemm"


def test_bf16_engine_follows_cpu_and_environment():
    assert C.cpu_attention_tile_engine("bfloat16") == expected_bf16_engine()
    # The other dtypes keep our micro-kernel whatever the variable says.
    assert C.cpu_attention_tile_engine("float32") == "at::vec fp32 FMA"


def test_lstm_bf16_engine_follows_the_attention_one():
    # bf16 LSTM layers without a projection take brgemm exactly where the attention's bf16 tiles
    # do (one switch, csrc/include/fastattn/cpu_brgemm_bf16.h), and only in the avx512 kernels.
    on_brgemm = expected_bf16_engine().startswith("oneDNN brgemm")
    assert C.cpu_lstm_bf16_rows_on_brgemm() == on_brgemm


def _no_brgemm_reason() -> str | None:
    if "amx_bf16" not in FLAGS:
        return ("this CPU lacks AMX-BF16 (no amx_bf16 in /proc/cpuinfo; brgemm runs here only "
                "when asked, in test_bf16_tests_pass_on_the_other_engine)")
    if ASKED == "native":
        return "FASTATTN_CPU_TILE_ENGINE=native keeps the micro-kernels"
    if not AVX512_BF16:
        return (f"the {C.cpu_isa() if C else 'missing'} kernels run here (ATEN_CPU_CAPABILITY), "
                "not the avx512 ones that use brgemm")
    return None


@pytest.mark.skipif(_no_brgemm_reason() is not None, reason=str(_no_brgemm_reason()))
def test_amx_cpu_uses_brgemm():
    assert C.cpu_attention_tile_engine("bfloat16") == "oneDNN brgemm bf16 (AMX)"


# B, Hq, Hk, L, S, E, Ev: the odd sizes of the issue (1, 7, 33, 130: tails of the 64- and
# 128-row and -key tiles and of a key pair), GQA, E off the 32-lane padding, Ev != E.
SHAPES = [
    pytest.param((1, 2, 1, 1, 7, 8, 8), id="L1-S7-E8-gqa"),
    pytest.param((2, 2, 2, 7, 33, 40, 24), id="L7-S33-E40-Ev24"),
    pytest.param((1, 4, 2, 33, 130, 72, 72), id="L33-S130-E72-gqa"),
    pytest.param((1, 2, 2, 130, 130, 64, 64), id="L130-S130-E64"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_engine_matches_reference(shape, causal):
    B, Hq, Hk, L, S, E, Ev = shape
    q, k, v = inputs(B, Hq, Hk, L, S, E, Ev, torch.bfloat16)
    check(q, k, v, make_opts(window_right=0 if causal else -1), against_torch=Ev == E)


def test_bf16_engine_non_contiguous_views():
    # [B, L, H, E] storage seen as [B, H, L, E]; v additionally strided along its last dim.
    B, H, L, S, E = 2, 2, 33, 70, 40
    q = torch.randn(B, L, H, E, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, S, H, E, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(B, S, H, 2 * E, dtype=torch.bfloat16).transpose(1, 2)[..., ::2]
    assert not q.is_contiguous() and v.stride(-1) == 2
    check(q, k, v, make_opts(window_right=0), against_torch=True)


@pytest.mark.slow
@pytest.mark.skipif(
    not AVX512_BF16,
    reason="both bf16 engines need AVX512-BF16 and the kernels' avx512 variant, which this "
    "machine lacks",
)
@pytest.mark.skipif(ASKED != "", reason="this process's engine was asked for by the variable")
def test_bf16_tests_pass_on_the_other_engine():
    env = {**os.environ, "FASTATTN_CPU_TILE_ENGINE": OTHER_ENGINE}
    args = [
        "tests/test_cpu_tile_engine.py",
        "tests/test_attention_cpu_op.py",
        "tests/test_packed_attention.py",  # varlen and KV-cache calls of the same kernels
        "tests/test_lstm_ops.py",  # the bf16 LSTM layer ops' recurrent products
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-k",
        "bf16 and not opcheck and not bad_inputs and not cuda or test_cpu_tile_engine",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, output
    # There only this test and the AMX one (no AMX, or asked for native) skip.
    assert " passed" in run.stdout and " 2 skipped" in run.stdout, run.stdout[-3000:]
