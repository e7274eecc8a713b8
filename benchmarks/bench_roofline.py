"""The roofline of this run: fp32 and bf16 GEMM rate and copy bandwidth on the bench device.

Measured once, first (conftest orders it so), and recorded here and in every case's
extra_info, so each case can state its efficiency against ceilings measured in the same run.
"""

from __future__ import annotations


def test_roofline(benchmark, bench):
    roofline = benchmark.pedantic(bench.measure_roofline, rounds=1, iterations=1)
    benchmark.extra_info.update(
        op="roofline",
        roofline=roofline,
        device=bench.device.type,
        grid=bench.grid.name,
        machine=bench.facts["machine"],
        git_commit=bench.facts["git_commit"],
    )
