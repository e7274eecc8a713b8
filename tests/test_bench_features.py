"""bench_attention_features: its FLOP counts, its grids, and that each torch baseline computes
the same attention as the fastattn call it is timed against (else the ratio means nothing)."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from benchmarks import shapes
from benchmarks.bench_attention_features import (
    cu_seqlens,
    flex_window,
    gather_pages_sdpa,
    nested,
    paged_cache,
    per_sequence,
    varlen_flops,
    visible_pairs,
    window_flops,
    window_mask,
)
from benchmarks.shapes import PagedDecodeShape, VarlenShape, WindowShape


@pytest.mark.parametrize(
    "L, S, left, right", [(7, 7, -1, -1), (7, 7, -1, 0), (9, 5, 3, 0), (33, 40, 4, 2)]
)
def test_visible_pairs_counts_the_mask(L, S, left, right):
    offset = torch.arange(S)[None, :] - torch.arange(L)[:, None]
    visible = torch.ones(L, S, dtype=torch.bool)
    if left >= 0:
        visible &= offset >= -left
    if right >= 0:
        visible &= offset <= right
    assert visible_pairs(L, S, left, right) == int(visible.sum())


def test_flops_count_only_useful_work():
    shape = VarlenShape((3, 5), H=2, E=4, causal=False)
    assert varlen_flops(shape, "fwd") == 4 * 2 * (9 + 25) * 4
    causal = VarlenShape((3, 5), H=2, E=4, causal=True)
    assert varlen_flops(causal, "fwd+bwd") == 3.5 * 4 * 2 * (6 + 15) * 4
    window = WindowShape(B=2, H=3, L=10, S=10, E=8, window=4)
    pairs = sum(min(i, 4) + 1 for i in range(10))
    assert window_flops(window, "fwd") == 4 * 2 * 3 * pairs * 8


@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("cuda")], ids=str)
@pytest.mark.parametrize("name", shapes.GRIDS)
def test_every_grid_has_the_feature_cases(name, device):
    grid = shapes.grid(name, device)
    assert grid.attention_varlen and grid.attention_window and grid.attention_features_dtypes
    assert grid.attention_paged_decode
    assert any(len(s.lengths) == 8 for s in grid.attention_varlen)
    assert all(s.L == s.S for s in grid.attention_window)


def test_full_grids_hold_issue_9_targets():
    for device in (torch.device("cpu"), torch.device("cuda")):
        grid = shapes.grid("full", device)
        assert any(s.lengths == shapes.VARLEN_FULL_LENGTHS for s in grid.attention_varlen)
        assert any(s.L == 8192 and s.window == 256 for s in grid.attention_window)
    assert min(shapes.VARLEN_FULL_LENGTHS) == 64 and max(shapes.VARLEN_FULL_LENGTHS) == 2048


VARLEN_LENGTHS = (5, 1, 12, 7)


def _varlen_case(causal):
    """Packed float64 q, k, v [total, H, E] of VARLEN_LENGTHS, their cu_seqlens, and the
    reference backend's varlen attention: what each baseline must reproduce."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(sum(VARLEN_LENGTHS), 2, 8, dtype=torch.float64) for _ in range(3))
    cu = cu_seqlens(VARLEN_LENGTHS, q.device)
    with fastattn.use_backend("reference"):
        expected = fastattn.attention_varlen(q, k, v, cu, cu, 12, 12, causal=causal)
    return q, k, v, cu, expected


def test_full_grids_hold_issue_16_targets():
    lengths = shapes.VARLEN_MANY_LENGTHS
    assert len(lengths) == 256 and min(lengths) == 16 and max(lengths) == 128
    for device in (torch.device("cpu"), torch.device("cuda")):
        grid = shapes.grid("full", device)
        assert any(s.lengths == lengths and s.H == 8 and s.E == 64 and s.causal
                   for s in grid.attention_varlen)
        assert shapes.PAGED_DECODE_FULL in grid.attention_paged_decode
    assert shapes.PAGED_DECODE_FULL == PagedDecodeShape(B=32, H=8, S=2048, E=64, block_size=16)


@pytest.mark.parametrize("L_new", [1, 3])
def test_gather_pages_baseline_matches_kv_cache(L_new):
    torch.manual_seed(0)
    shape = PagedDecodeShape(B=3, H=2, S=37, E=8, block_size=8)
    k_cache, v_cache, table = paged_cache(shape, torch.device("cpu"), torch.float64)
    assert sorted(table.flatten().tolist()) == list(range(3 * 5))
    q = torch.randn(3, 2, L_new, 8, dtype=torch.float64)
    k_new, v_new = (torch.randn(3, 2, L_new, 8, dtype=torch.float64) for _ in range(2))
    seqlens = torch.full((3,), 37 - L_new, dtype=torch.int32)
    caches = (k_cache.clone(), v_cache.clone())
    with fastattn.use_backend("reference"):
        expected = fastattn.attention_with_kv_cache(q, *caches, seqlens, k_new, v_new,
                                                    block_table=table, causal=True)
    out = gather_pages_sdpa(table, 37)(q, k_cache, v_cache, seqlens, k_new, v_new)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(k_cache, caches[0])


def test_window_mask_baseline_matches_window():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 8, dtype=torch.float64) for _ in range(3))
    with fastattn.use_backend("reference"):
        expected = fastattn.attention(q, k, v, causal=True, window=(5, 0))
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(37, 37, 5, q.device))
    torch.testing.assert_close(masked, expected)


@pytest.mark.parametrize("causal", [False, True])
def test_per_sequence_and_nested_baselines_match_varlen(causal):
    q, k, v, cu, expected = _varlen_case(causal)
    torch.testing.assert_close(per_sequence(VARLEN_LENGTHS, causal)(q, k, v), expected)
    loop = per_sequence(VARLEN_LENGTHS, causal, fastattn.scaled_dot_product_attention)
    with fastattn.use_backend("reference"):
        torch.testing.assert_close(loop(q, k, v), expected)
    if causal:  # torch has no causal nested-tensor SDPA; the benchmark skips with its message
        with pytest.raises(RuntimeError, match="No viable backend"):
            nested(cu, causal)(q.float(), k.float(), v.float())
    else:
        torch.testing.assert_close(nested(cu, causal)(q, k, v), expected)


def test_flex_block_mask_baseline_matches_window():
    torch.manual_seed(0)
    shape = WindowShape(B=1, H=2, L=37, S=37, E=8, window=5)
    q, k, v = (torch.randn(1, 2, 37, 8) for _ in range(3))
    with fastattn.use_backend("reference"):
        expected = fastattn.attention(q, k, v, causal=True, window=(5, 0))
    # Eager flex_attention: the same block mask and mask_mod the benchmark compiles.
    out = flex_window(shape, q.device, compiled=False)(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
