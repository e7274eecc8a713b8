"""The benchmark suite's arithmetic and report: FLOP counts, grids, ratios, geomean, plots."""

import json
import math

import pytest
import torch

from benchmarks import report, shapes
from benchmarks.bench_attention import attention_bytes, attention_flops
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


def _bench(provider, kind, median, shape_id="B1-H1-L64-S64-E8", L=64, flops=1e9):
    return {
        "name": f"test_attention[{provider}]",
        "stats": {"median": median},
        "extra_info": {
            "op": "attention",
            "pass_": "fwd",
            "provider": provider,
            "provider_kind": kind,
            "dtype": "float32",
            "device": "cpu",
            "shape_id": shape_id,
            "shape": {"B": 1, "H": 1, "L": L, "S": L, "E": 8, "causal": False},
            "flops": flops,
            "bytes": 1e6,
            "peak_memory_bytes": 2**20,
            "gemm_efficiency": 0.5,
        },
    }


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
            _bench("torch.sdpa", "torch", 0.004),
            _bench("torch.eager", "torch", 0.010),
            _bench("fastattn[cpu]", "fastattn", 0.002),  # 2x the best torch
            _bench("torch.sdpa", "torch", 0.004, "B1-H1-L128-S128-E8", L=128),
            _bench("fastattn[cpu]", "fastattn", 0.008, "B1-H1-L128-S128-E8", L=128),  # 0.5x
        ],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    out = report.write_report([path], tmp_path / "out")
    text = (out / "report.md").read_text()
    assert "| fastattn[cpu] | 2 | 1.00x | 0.50x | fwd float32 B1-H1-L128-S128-E8 |" in text
    assert "| torch.sdpa | 4.000 | 2.00x |" in text
    assert "GEMM fp32 10.0 GFLOP/s" in text
    assert "| 1 | fastattn backend 'cuda' is unavailable here: no GPU |" in text
    assert (out / "attention_fwd_float32.png").stat().st_size > 0
    assert (
        json.loads((out / "results.json").read_text())["benchmarks"][1]["stats"]["median"] == 0.004
    )
    assert math.isclose(report.geomean([2.0, 0.5]), 1.0)
