"""The benchmark suite's arithmetic and report: FLOP counts, grids, ratios (interleaved, per
baseline), geomean, the "of GEMM" column, run folders, plots."""

import json
import math

import pytest
import torch
from bench_records import attention_record, interleaved_rounds

from benchmarks import harness, report, shapes
from benchmarks.bench_attention import attention_bytes, attention_flops, fp32_baseline_applies
from benchmarks.bench_lstm import lstm_flops
from benchmarks.shapes import AttentionShape, LSTMShape


def test_attention_flops_follow_issue_4_convention():
    shape = AttentionShape(B=2, H=3, L=5, S=7, E=11, causal=False)
    forward = 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(shape, "fwd") == forward
    assert attention_flops(shape, "fwd+bwd") == 3.5 * forward
    causal = AttentionShape(B=2, H=3, L=5, S=7, E=11, causal=True)
    assert attention_flops(causal, "fwd") == forward / 2


def test_attention_bytes_count_each_tensor_once():
    shape = AttentionShape(B=1, H=2, L=3, S=5, E=4, causal=False)
    q, kv, lse = 1 * 2 * 3 * 4, 1 * 2 * 5 * 4, 1 * 2 * 3 * 4
    assert attention_bytes(shape, "fwd", torch.bfloat16) == (2 * q + 2 * kv) * 2 + lse
    fwd_bwd = (2 * q + 2 * kv) * 4 + lse + (4 * q + 4 * kv) * 4 + lse
    assert attention_bytes(shape, "fwd+bwd", torch.float32) == fwd_bwd


def test_lstm_flops_count_both_gemms_per_step():
    shape = LSTMShape(T=3, B=2, I=5, H=7)
    assert lstm_flops(shape, "fwd") == 3 * 2 * 2 * 4 * 7 * (5 + 7)
    assert lstm_flops(shape, "fwd+bwd") == 3 * lstm_flops(shape, "fwd")


@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("cuda")], ids=str)
@pytest.mark.parametrize("name", shapes.GRIDS)
def test_every_grid_has_every_op(name, device):
    grid = shapes.grid(name, device)
    for attribute in ("attention", "attention_decode", "lstm_cell", "lstm", "mha", "encoder"):
        assert getattr(grid, attribute), (name, device, attribute)
    assert all(s.L == 1 for s in grid.attention_decode)


def test_full_grid_has_issue_6_encoder_shape():
    for device in (torch.device("cpu"), torch.device("cuda")):
        encoder = shapes.grid("full", device).encoder
        assert shapes.TransformerShape(batch=4, seq=1024, d_model=512, heads=8, layers=6) in encoder


def test_unknown_grid_is_refused():
    with pytest.raises(ValueError, match="valid names"):
        shapes.grid("huge", torch.device("cpu"))


def test_report_ratios_against_the_fastest_torch_baseline(tmp_path):
    roofline = {
        "gemm_fp32_gflops": 10.0,
        "gemm_fp32_n": 256,
        "gemm_bf16_gflops": 1.0,
        "gemm_bf16_n": 256,
        "copy_gbps": 5.0,
        "smoke": False,
    }
    results = {
        "datetime": "2026-11-30T07:00:00",
        "machine_info": {"fastattn": {"machine": "test-machine", "grid": "quick"}},
        "fastattn_skipped": [
            {
                "test": "benchmarks/bench_attention.py::test_attention[fastattn[cuda]-x]",
                "reason": "fastattn backend 'cuda' is unavailable here: no GPU",
            },
        ],
        "benchmarks": [
            {
                "name": "test_roofline",
                "stats": {"median": 1.0},
                "extra_info": {"op": "roofline", "roofline": roofline},
            },
            attention_record("torch.sdpa", "torch", 0.004),
            attention_record("torch.eager", "torch", 0.010),
            attention_record("fastattn[cpu]", "fastattn", 0.002),  # 2x the best torch
            attention_record("torch.sdpa", "torch", 0.004, "B1-H1-L128-S128-E8"),
            attention_record("fastattn[cpu]", "fastattn", 0.008, "B1-H1-L128-S128-E8"),  # 0.5x
        ],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    out = report.write_report([path], tmp_path / "out")
    text = (out / "report.md").read_text()
    # Without interleaved rounds the ratios fall back to the separate medians.
    assert (
        "| fastattn[cpu] | vs fastest torch | 2 | 1.00x | 1.00x | 0.50x "
        "| fwd float32 B1-H1-L128-S128-E8 |" in text
    )
    assert "| fastattn[cpu] | vs torch.eager | 1 | 5.00x | 5.00x | 5.00x |" in text
    assert "| torch.sdpa | 4.000 | 2.00x | 2.00x |" in text
    assert "GEMM fp32 10.0 GFLOP/s" in text
    assert "| 1 | fastattn backend 'cuda' is unavailable here: no GPU |" in text
    assert (out / "attention_fwd_float32.png").stat().st_size > 0
    assert (
        json.loads((out / "results.json").read_text())["benchmarks"][1]["stats"]["median"] == 0.004
    )
    assert math.isclose(report.geomean([2.0, 0.5]), 1.0)


def _ratios(benches):
    return report.ratios([report.Case(**_case_fields(b)) for b in benches])


def _case_fields(bench):
    info = bench["extra_info"]
    return dict(
        op=info["op"], pass_=info["pass_"], provider=info["provider"], kind=info["provider_kind"],
        dtype=info["dtype"], device=info["device"], shape=info["shape"],
        shape_id=info["shape_id"], median_s=bench["stats"]["median"], flops=info["flops"],
        bytes=info["bytes"], peak_memory_bytes=None, gemm_efficiency=None,
        interleaved=info["interleaved"],
    )


def test_ratios_come_from_the_interleaved_rounds_and_the_fastest_baseline_is_the_least_flattering():
    # Separate medians say 4x and 10x; the interleaved rounds say 1.5x (min 1.2x) and 3x.
    ratios = _ratios(
        [
            attention_record("fastattn[cpu]", "fastattn", 0.001),
            attention_record("torch.sdpa", "torch", 0.004,
                             interleaved=interleaved_rounds(2.0, 3.0, 1.0, 1.2)),
            attention_record("torch.eager", "torch", 0.010,
                             interleaved=interleaved_rounds(1.0, 3.0, 1.0, 2.0)),
        ]
    )
    (case, against), = ratios.items()
    best = report.fastest(against)
    assert best.theirs.provider == "torch.sdpa" and best.interleaved
    assert math.isclose(best.median, 1.5) and math.isclose(best.min, 1.2)
    assert math.isclose(best.torch_s, 3.0)
    summary = report.op_summary(ratios)["fastattn[cpu]"]
    assert math.isclose(summary["fastest torch"]["geomean"], 1.5)
    assert math.isclose(summary["torch.eager"]["geomean"], 3.0)
    assert math.isclose(summary["torch.eager"]["geomean_min"], 2.0)


def test_of_gemm_column_is_dropped_when_no_row_has_a_rate():
    rows = [["a", "n/a", "1"], ["b", "n/a", "2"]]
    assert report.table(["x", "of GEMM", "y"], rows)[:2] == ["| x | y |", "|---|---|"]
    kept = report.table(["x", "of GEMM", "y"], [["a", "50%", "1"]])
    assert kept[0] == "| x | of GEMM | y |"


def test_bf16_gemm_rate_is_no_ceiling_where_bf16_is_emulated():
    roofline = {"gemm_fp32_gflops": 100.0, "gemm_bf16_gflops": 1.0}
    assert harness.gemm_rate(dict(roofline, gemm_bf16_emulated=True), torch.bfloat16) is None
    assert harness.gemm_rate(dict(roofline, gemm_bf16_emulated=False), torch.bfloat16) == 1.0
    assert harness.gemm_rate(dict(roofline, gemm_bf16_emulated=True), torch.float32) == 100.0
    assert fp32_baseline_applies(torch.bfloat16, bf16_hardware=False)
    assert not fp32_baseline_applies(torch.bfloat16, bf16_hardware=True)
    assert not fp32_baseline_applies(torch.float32, bf16_hardware=False)


@pytest.mark.parametrize(
    "facts, name",
    [
        ({"git_head": "0123456789abcdef", "git_clean": True}, "2026-12-01-0123456789ab"),
        ({"git_head": "0123456789abcdef", "git_clean": False}, "2026-12-01-0123456789ab-dirty"),
        ({"git_commit": "fedcba9876543210-dirty"}, "2026-12-01-fedcba987654-dirty"),
        ({"git_commit": "fedcba9876543210"}, "2026-12-01-fedcba987654"),
    ],
)
def test_run_folder_is_named_by_date_and_commit(facts, name):
    merged = {"datetime": "2026-12-01T05:00:00", "machine_info": {"fastattn": facts}}
    assert report.run_folder_name(merged) == name


def test_merged_runs_are_as_trusted_as_their_least_trusted_part(tmp_path):
    quiet = {"noisy": False, "reasons": []}
    noisy = {"noisy": True, "reasons": ["copy_gbps went from 20.0 to 10.0"]}
    paths = []
    for i, verdict in enumerate([quiet, noisy, quiet]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"benchmarks": [], "fastattn_noise": verdict}))
    merged, _, _ = report.load(paths)
    assert merged["fastattn_noise"]["noisy"]
    assert merged["fastattn_noise"]["reasons"] == noisy["reasons"]
    assert not report.load([paths[0], paths[2]])[0]["fastattn_noise"]["noisy"]
    paths[1].write_text(json.dumps({"benchmarks": []}))  # a run before the noise guard
    assert report.load(paths)[0]["fastattn_noise"]["noisy"]


@pytest.mark.parametrize("fields, generation", [
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17"}, "zen4"),  # Genoa
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1"}, "zen3"),  # Milan
    ({"vendor_id": "AuthenticAMD", "cpu family": "26", "model": "2"}, "zen5"),  # Turin
    ({"vendor_id": "AuthenticAMD", "cpu family": "27", "model": "0"}, "family27"),
    ({"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143"}, ""),
    ({}, ""),
])
def test_machine_name_holds_amds_generation(monkeypatch, fields, generation):
    """A VM's "AMD EPYC" hides its generation; Zen 4 and Zen 5 (both AVX-512) run at different
    speeds, so each gets its own results folder."""
    monkeypatch.setattr(harness, "_cpuinfo_fields", lambda *names: fields)
    monkeypatch.setattr(harness, "cpu_model", lambda: "AMD EPYC")
    assert harness.cpu_generation() == generation
    facts = harness.machine_facts(torch.device("cpu"))
    middle = f"{generation}-" if generation else ""
    assert facts["machine"] == f"amd-epyc-{middle}{facts['cpu_isa']}-{facts['cores']}c"
