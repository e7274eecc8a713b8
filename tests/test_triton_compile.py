"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU.

Catches what the interpreter cannot: lowering failures (an fp32 "ieee" tl.dot crashed LLVM's
SLP vectorizer for sm_90 in triton 3.9), local memory in the PTX, and tiles whose shared memory
exceeds the arch's limit. tests/triton_aot.py lists the specialisations the launchers produce
and compiles one. CI compiles the subset ``cases(full=False)`` describes (each compile costs
seconds of CPU, a minute for a big fp32 tile); FASTATTN_TRITON_AOT=full compiles the ~2500
cases of ``cases(full=True)``, every autotune config, head block, flag, dtype and arch (hours
on a few cores).

The cases run in a few worker processes, each compiling a batch in sequence (one import of
torch and triton per batch); a case whose worker aborts is compiled again in a process of its
own, so a compiler abort fails that case only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests import triton_aot  # noqa: E402  (needs triton)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CASES = triton_aot.cases(full=os.environ.get("FASTATTN_TRITON_AOT") == "full")
WORKERS = 2


def _compile(batch: list[dict]) -> tuple[list[dict], str]:
    """Results of the batch's leading cases that compiled before the worker ended; its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tests.triton_aot", json.dumps(batch)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines], proc.stderr


def _compile_all(cases: list[dict]) -> dict[str, dict]:
    """case id -> {"result": summary} or {"error": the compiler's stderr}."""
    batches = [cases[i::WORKERS] for i in range(WORKERS)]
    outcome = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        retry = []
        for batch, (results, _) in zip(batches, pool.map(_compile, batches)):
            for case, result in zip(batch, results):
                outcome[triton_aot.case_id(case)] = {"result": result}
            retry += batch[len(results):]
        for case, (results, stderr) in zip(retry, pool.map(lambda c: _compile([c]), retry)):
            outcome[triton_aot.case_id(case)] = (
                {"result": results[0]} if results else {"error": stderr[-3000:]}
            )
    return outcome


@pytest.fixture(scope="module")
def compiled(request) -> dict[str, dict]:
    """Compiles the cases pytest selected from this module, all at once in parallel."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    return _compile_all(selected)


@pytest.mark.parametrize("case", CASES, ids=[triton_aot.case_id(c) for c in CASES])
def test_compiles_for_the_gpu(case: dict, compiled: dict[str, dict]) -> None:
    outcome = compiled[triton_aot.case_id(case)]
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert not result["local_memory"], "the PTX uses local memory (an array not in registers)"
    # A config over the limit would only be skipped by the autotuner, but the first config is
    # the one FASTATTN_TRITON_AUTOTUNE=0 keeps, and every other kernel has no alternative.
    if case.get("config") is None or case["config"] == triton_aot.first_config(case):
        assert result["shared"] <= triton_aot.MAX_SHARED[case["arch"]], (
            f"{result['shared']} bytes of shared memory, sm_{case['arch']} has "
            f"{triton_aot.MAX_SHARED[case['arch']]}"
        )
