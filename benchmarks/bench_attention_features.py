"""Issues 9 and 16's features against what torch needs to express them: varlen, paged decode
and sliding window.

attention_varlen: packed sequences of mixed lengths (fastattn.attention_varlen, one fused op on
[total, H, E] with int32 cu_seqlens) against
- ``torch.sdpa[per-sequence]``: one SDPA call per sequence on views of the packed tensors
  (is_causal when causal): no padding, no mask; the fair baseline.
- ``torch.sdpa[nested]``: SDPA on nested (jagged) tensors over the packed values
  (torch.nested.nested_tensor_from_jagged); torch runs no causal variant of it, so causal cases
  skip with torch's own message.
- ``fastattn[<backend>,per-sequence]``: one fastattn.attention call per sequence, the Python
  loop attention_varlen was before issue 16 (a fastattn provider: its ratio is its own).
(A padded batch with a mask computes the padding too: it measured skipped padding, not the
kernel, and was dropped.)

attention_paged_decode: one decode step (append one token, attend over 2k-token contexts) of
fastattn.attention_with_kv_cache on a paged cache with a shuffled block table against
- ``torch.sdpa[gather pages]``: the same append by index_put_, the pages gathered into a
  contiguous [B, H, S, E] batch, then SDPA.

attention_window: causal sliding window, fastattn.attention(causal=True, window=(w, 0)) against
- ``torch.sdpa[mask]``: SDPA with the window's explicit bool mask [L, S], which computes every
  masked-out pair (flatters fastattn; kept, labelled);
- ``torch.flex[block mask]``: torch.nn.attention.flex_attention under torch.compile with a
  BlockMask built from the window, which skips the blocks outside it; the fair baseline. On CPU
  torch has no FlexAttention backward, so fwd+bwd skips with torch's own message.

Providers: every fastattn backend that can serve the device (forced with use_backend; an
unusable one skips with its reason) and the torch baselines above.

FLOPs: 4*E per visible (query, key) pair and head, counted exactly and only for the useful
work (no padding, no masked-out keys), the same number for fastattn and torch so that their
GFLOP/s compare like with like; 3.5x the forward for fwd+bwd (bench_attention's convention).
Bytes: the unpadded inputs read and outputs written once (bench_attention.attention_bytes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fastattn
from benchmarks import harness
from benchmarks.bench_attention import attention_bytes
from benchmarks.harness import Provider
from benchmarks.shapes import AttentionShape, PagedDecodeShape, VarlenShape, WindowShape

VARLEN_TORCH = [
    Provider("torch.sdpa[per-sequence]", "torch", impl="per-sequence"),
    Provider("torch.sdpa[nested]", "torch", impl="nested"),
]
PAGED_TORCH = [Provider("torch.sdpa[gather pages]", "torch", impl="gather")]
WINDOW_TORCH = [
    Provider("torch.sdpa[mask]", "torch", impl="mask"),
    Provider("torch.flex[block mask]", "torch", impl="flex"),
]


def fastattn_providers(device: torch.device) -> list[Provider]:
    return [
        Provider(f"fastattn[{name}]", "fastattn", backend=name)
        for name in harness.fastattn_backend_names(device)
    ]


def varlen_loop_provider(device: torch.device) -> Provider:
    """The pre-issue-16 attention_varlen on the device's first fused backend."""
    name = harness.fastattn_backend_names(device)[0]
    return Provider(f"fastattn[{name},per-sequence]", "fastattn", backend=name, impl="loop")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "provider" in metafunc.fixturenames:
        device = harness.session_of(metafunc.config).device
        if "varlen_shape" in metafunc.fixturenames:
            extra = [varlen_loop_provider(device), *VARLEN_TORCH]
        elif "paged_shape" in metafunc.fixturenames:
            extra = PAGED_TORCH
        else:
            extra = WINDOW_TORCH
        metafunc.parametrize("provider", fastattn_providers(device) + extra, ids=str)


def visible_pairs(L: int, S: int, left: int, right: int) -> int:
    """(query, key) pairs with -left <= j - i <= right (a negative bound is unbounded)."""
    total = 0
    for i in range(L):
        first = 0 if left < 0 else max(0, i - left)
        last = S - 1 if right < 0 else min(S - 1, i + right)
        total += max(0, last - first + 1)
    return total


def _pass_factor(pass_: str) -> float:
    return 3.5 if pass_ == "fwd+bwd" else 1.0


def varlen_flops(shape: VarlenShape, pass_: str) -> float:
    right = 0 if shape.causal else -1
    pairs = sum(visible_pairs(n, n, -1, right) for n in shape.lengths)
    return 4 * shape.H * pairs * shape.E * _pass_factor(pass_)


def window_flops(shape: WindowShape, pass_: str) -> float:
    pairs = visible_pairs(shape.L, shape.S, shape.window, 0)
    return 4 * shape.B * shape.H * pairs * shape.E * _pass_factor(pass_)


def varlen_bytes(shape: VarlenShape, pass_: str, dtype: torch.dtype) -> float:
    tokens = sum(shape.lengths)  # one batch of all tokens moves the same bytes as the packed one
    return attention_bytes(
        AttentionShape(1, shape.H, tokens, tokens, shape.E, shape.causal), pass_, dtype
    )


def window_bytes(shape: WindowShape, pass_: str, dtype: torch.dtype) -> float:
    return attention_bytes(
        AttentionShape(shape.B, shape.H, shape.L, shape.S, shape.E, True), pass_, dtype
    )


def cu_seqlens(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 [N + 1]: 0 and the running sum of the lengths."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def window_mask(L: int, S: int, window: int, device: torch.device) -> torch.Tensor:
    """bool [L, S], True = may attend: i - window <= j <= i."""
    offset = torch.arange(S, device=device)[None, :] - torch.arange(L, device=device)[:, None]
    return (offset <= 0) & (offset >= -window)


def per_sequence(lengths: tuple[int, ...], causal: bool, sdpa: Callable | None = None) -> Callable:
    """(q, k, v) packed [total, H, E] -> out [total, H, E]: one call of ``sdpa`` (default
    F.scaled_dot_product_attention; torch's signature) per sequence, on the views torch.split
    gives. (Views by slicing, q[a:b], would cost torch's backward one zero-filled
    [total, H, E] gradient per sequence and input: O(N * total) memory traffic that measures
    autograd's slice backward, not attention; split's backward concatenates once.)"""
    sizes = list(lengths)
    sdpa = sdpa or F.scaled_dot_product_attention

    def attend(q, k, v):
        return torch.cat(
            [
                sdpa(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                     is_causal=causal).transpose(0, 1)
                for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes))
            ]
        )

    return attend


def paged_cache(shape: PagedDecodeShape, device: torch.device, dtype: torch.dtype):
    """(k_cache, v_cache [num_blocks, H, block_size, E], block_table int32 [B, S / block_size])
    with every sequence's pages at shuffled places of the cache."""
    blocks = -(-shape.S // shape.block_size)
    generator = torch.Generator().manual_seed(0)
    table = torch.randperm(shape.B * blocks, generator=generator).view(shape.B, blocks)
    cache_shape = (shape.B * blocks, shape.H, shape.block_size, shape.E)
    k_cache, v_cache = (harness.random_tensor(*cache_shape, device=device, dtype=dtype)
                        for _ in range(2))
    return k_cache, v_cache, table.to(device=device, dtype=torch.int32)


def gather_pages_sdpa(block_table: torch.Tensor, S: int) -> Callable:
    """attention_with_kv_cache's call for sequences that all hold S - L_new positions, in
    torch: k_new / v_new [B, H, L_new, E] written into the pages by index_put_, each sequence's
    pages gathered into [B, H, S, E], then SDPA (bottom-right causal: the new queries see every
    earlier position and the new ones up to their own)."""
    def attend(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
        B, H, L, _ = q.shape
        block_size = k_cache.shape[2]
        pos = torch.arange(S, device=q.device)
        blocks, rows = block_table.long()[:, pos // block_size], pos % block_size  # [B, S]
        appended = slice(S - k_new.shape[2], S)
        k_cache[blocks[:, appended], :, rows[appended]] = k_new.transpose(1, 2)
        v_cache[blocks[:, appended], :, rows[appended]] = v_new.transpose(1, 2)
        # [B, S, H, E] -> [B, H, S, E]
        keys = k_cache[blocks, :, rows.expand_as(blocks)].transpose(1, 2)
        values = v_cache[blocks, :, rows.expand_as(blocks)].transpose(1, 2)
        mask = None
        if L > 1:
            mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    return attend


def nested(cu: torch.Tensor, causal: bool) -> Callable:
    """(q, k, v) packed [total, H, E] -> out [total, H, E] through nested (jagged) tensors
    [N, j, H, E] viewing the packed values (no copy), transposed to SDPA's [N, H, j, E]."""
    offsets = cu.long()

    def attend(q, k, v):
        q, k, v = (
            torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2) for x in (q, k, v)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2).values()

    return attend


def window_mod(window: int) -> Callable:
    """FlexAttention's mask_mod for the causal window: key j is visible to query i when
    i - window <= j <= i."""

    def visible(batch, head, i, j):
        return (j <= i) & (j >= i - window)

    return visible


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_window(shape: WindowShape, device: torch.device, compiled: bool = True) -> Callable:
    """(q, k, v) -> out: flex_attention (compiled unless told not) with the window's BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(
        window_mod(shape.window), shape.B, shape.H, shape.L, shape.S, device=device.type
    )
    flex = _compiled_flex() if compiled else flex_attention
    return lambda q, k, v: flex(q, k, v, block_mask=mask)


def _inputs(shapes: list[tuple[int, ...]], device, dtype, backward: bool):
    """q, k, v of shapes[0..2] (with grad when backward) and dout of shapes[0]."""
    q, k, v = (
        harness.random_tensor(*s, device=device, dtype=dtype, requires_grad=backward)
        for s in shapes
    )
    return q, k, v, harness.random_tensor(*shapes[0], device=device, dtype=dtype)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_attention_varlen(benchmark, bench, pass_, provider, features_dtype, varlen_shape):
    shape, device, dtype = varlen_shape, bench.device, features_dtype
    harness.require_backend(provider)
    width = max(shape.lengths)
    packed = [(sum(shape.lengths), shape.H, shape.E)] * 3
    cu = cu_seqlens(shape.lengths, device)
    causal = shape.causal
    if provider.impl == "loop":
        fn = per_sequence(shape.lengths, causal, fastattn.scaled_dot_product_attention)
    elif provider.kind == "fastattn":
        varlen = fastattn.attention_varlen
        if provider.backend == "reference":  # one score matrix per sequence
            harness.skip_if_materialized_too_big(provider, shape.H * width * width, device)
        fn = lambda q, k, v: varlen(q, k, v, cu, cu, width, width, causal=causal)
    elif provider.impl == "per-sequence":
        fn = per_sequence(shape.lengths, causal)
    else:
        fn = nested(cu, causal)
    backward = pass_ == "fwd+bwd"
    harness.run_case(
        benchmark,
        bench,
        op="attention_varlen",
        pass_=pass_,
        provider=provider,
        shape=shape,
        dtype=dtype,
        flops=varlen_flops(shape, pass_),
        bytes_moved=varlen_bytes(shape, pass_, dtype),
        make_inputs=lambda: _inputs(packed, device, dtype, backward),
        make_call=harness.attention_call(fn, backward),
    )


def paged_decode_bytes(shape: PagedDecodeShape, dtype: torch.dtype) -> float:
    """The S cached keys and values of every head read once, q read and out written."""
    item = torch.empty((), dtype=dtype).element_size()
    return item * shape.B * shape.H * shape.E * (2 * shape.S + 2)


def test_attention_paged_decode(benchmark, bench, provider, features_dtype, paged_shape):
    shape, device, dtype = paged_shape, bench.device, features_dtype
    harness.require_backend(provider)
    k_cache, v_cache, table = paged_cache(shape, device, dtype)
    # Each sequence holds S - 1 positions; the step appends its one new token (every timed call
    # writes the same position, so the cache stays the same between calls).
    seqlens = torch.full((shape.B,), shape.S - 1, dtype=torch.int32, device=device)
    if provider.kind == "fastattn":
        if provider.backend == "reference":
            harness.skip_if_materialized_too_big(provider, shape.B * shape.H * shape.S, device)
        with_cache = fastattn.attention_with_kv_cache

        def fn(q, k_new, v_new):
            return with_cache(q, k_cache, v_cache, seqlens, k_new, v_new, block_table=table)
    else:
        gathered = gather_pages_sdpa(table, shape.S)

        def fn(q, k_new, v_new):
            return gathered(q, k_cache, v_cache, seqlens, k_new, v_new)

    step = (shape.B, shape.H, 1, shape.E)
    harness.run_case(
        benchmark,
        bench,
        op="attention_paged_decode",
        pass_="fwd",
        provider=provider,
        shape=shape,
        dtype=dtype,
        flops=4 * shape.B * shape.H * shape.S * shape.E,
        bytes_moved=paged_decode_bytes(shape, dtype),
        make_inputs=lambda: _inputs([step] * 3, device, dtype, False),
        make_call=harness.attention_call(fn, False),
    )


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_attention_window(benchmark, bench, pass_, provider, features_dtype, window_shape):
    shape, device, dtype = window_shape, bench.device, features_dtype
    harness.require_backend(provider)
    window = shape.window
    if provider.kind == "fastattn":
        attention = fastattn.attention
        if provider.backend == "reference":
            harness.skip_if_materialized_too_big(
                provider, shape.B * shape.H * shape.L * shape.S, device
            )
        fn = lambda q, k, v: attention(q, k, v, causal=True, window=(window, 0))
    elif provider.impl == "mask":
        mask = window_mask(shape.L, shape.S, window, device)
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        fn = flex_window(shape, device)
    backward = pass_ == "fwd+bwd"
    q_shape = (shape.B, shape.H, shape.L, shape.E)
    kv_shape = (shape.B, shape.H, shape.S, shape.E)
    harness.run_case(
        benchmark,
        bench,
        op="attention_window",
        pass_=pass_,
        provider=provider,
        shape=shape,
        dtype=dtype,
        flops=window_flops(shape, pass_),
        bytes_moved=window_bytes(shape, pass_, dtype),
        make_inputs=lambda: _inputs([q_shape, kv_shape, kv_shape], device, dtype, backward),
        make_call=harness.attention_call(fn, backward),
    )
