"""Synthetic benchmark records as benchmarks/bench_attention.py writes them (pytest-benchmark
JSON with fastattn's extra_info), for the report's tests and the README section's."""


def attention_record(
    provider, kind, median, shape_id="B1-H1-L64-S64-E8", interleaved=None, flops=1e9,
    efficiency=0.5, dtype="float32",
):
    """One forward attention benchmark of ``provider`` (kind "fastattn" or "torch") taking
    ``median`` seconds; the shape is read from shape_id."""
    shape = {part[0]: int(part[1:]) for part in shape_id.split("-")}
    return {
        "name": f"test_attention[{provider}]",
        "stats": {"median": median},
        "extra_info": {
            "op": "attention",
            "pass_": "fwd",
            "provider": provider,
            "provider_kind": kind,
            "dtype": dtype,
            "device": "cpu",
            "shape_id": shape_id,
            "shape": {**shape, "causal": False},
            "flops": flops,
            "bytes": 1e6,
            "peak_memory_bytes": 2**20,
            "gemm_efficiency": efficiency,
            "interleaved": interleaved or {},
        },
    }


def interleaved_rounds(fastattn_median, torch_median, fastattn_min=None, torch_min=None):
    """A torch baseline record's interleaved rounds against fastattn[cpu] (seconds; the minimums
    default to 0.9 x the medians)."""
    return {
        "fastattn[cpu]": {
            "rounds": 5,
            "fastattn_median_s": fastattn_median,
            "torch_median_s": torch_median,
            "fastattn_min_s": 0.9 * fastattn_median if fastattn_min is None else fastattn_min,
            "torch_min_s": 0.9 * torch_median if torch_min is None else torch_min,
        }
    }
