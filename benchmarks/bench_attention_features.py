"""Issue 9's features against what torch needs to express them: varlen and sliding window.

attention_varlen: packed sequences of mixed lengths (fastattn.attention_varlen on
[total, H, E] with int32 cu_seqlens) against three torch baselines:
- ``torch.sdpa[padded+mask]``: F.scaled_dot_product_attention on the padded batch
  [N, H, max_len, E] with a bool mask hiding the padded keys (and, when causal, the future:
  torch cannot combine is_causal with a mask, so the mask carries both). It computes the
  padding too: it flatters fastattn, and is kept, labelled, because it is what many users do.
- ``torch.sdpa[per-sequence]``: one SDPA call per sequence on views of the packed tensors
  (is_causal when causal): no padding, no mask; the fair baseline.
- ``torch.sdpa[nested]``: SDPA on nested (jagged) tensors over the packed values
  (torch.nested.nested_tensor_from_jagged); torch runs no causal variant of it, so causal cases
  skip with torch's own message.

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
import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fastattn
from benchmarks import harness
from benchmarks.bench_attention import attention_bytes
from benchmarks.harness import Provider
from benchmarks.shapes import AttentionShape, VarlenShape, WindowShape

VARLEN_TORCH = [
    Provider("torch.sdpa[padded+mask]", "torch", impl="padded"),
    Provider("torch.sdpa[per-sequence]", "torch", impl="per-sequence"),
    Provider("torch.sdpa[nested]", "torch", impl="nested"),
]
WINDOW_TORCH = [
    Provider("torch.sdpa[mask]", "torch", impl="mask"),
    Provider("torch.flex[block mask]", "torch", impl="flex"),
]


def fastattn_providers(device: torch.device) -> list[Provider]:
    return [
        Provider(f"fastattn[{name}]", "fastattn", backend=name)
        for name in harness.fastattn_backend_names(device)
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "provider" in metafunc.fixturenames:
        device = harness.session_of(metafunc.config).device
        torch_providers = VARLEN_TORCH if "varlen_shape" in metafunc.fixturenames else WINDOW_TORCH
        metafunc.parametrize("provider", fastattn_providers(device) + torch_providers, ids=str)


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


def padded_mask(lengths: tuple[int, ...], causal: bool, device: torch.device) -> torch.Tensor:
    """bool [N, 1, max_len, max_len], True = may attend: the keys of each sequence's own length
    (and not after the query when causal). Padded query rows still see their sequence's keys,
    so no row is empty and no NaN enters the backward."""
    width = max(lengths)
    keys = torch.arange(width, device=device)
    mask = (keys < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]
    mask = mask.expand(len(lengths), 1, width, width)
    if causal:
        mask = mask & torch.ones(width, width, dtype=torch.bool, device=device).tril()
    return mask.contiguous()


def window_mask(L: int, S: int, window: int, device: torch.device) -> torch.Tensor:
    """bool [L, S], True = may attend: i - window <= j <= i."""
    offset = torch.arange(S, device=device)[None, :] - torch.arange(L, device=device)[:, None]
    return (offset <= 0) & (offset >= -window)


def pad(packed: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
    """[total, H, E] -> [N, H, max_len, E], the padding zero-filled."""
    out = packed.new_zeros(len(lengths), packed.shape[1], max(lengths), packed.shape[2])
    start = 0
    for i, n in enumerate(lengths):
        out[i, :, :n] = packed[start : start + n].transpose(0, 1)
        start += n
    return out


def per_sequence(lengths: tuple[int, ...], causal: bool) -> Callable:
    """(q, k, v) packed [total, H, E] -> out [total, H, E]: one SDPA call per sequence."""
    bounds = list(itertools.pairwise(itertools.accumulate(lengths, initial=0)))

    def attend(q, k, v):
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1),
                    k[a:b].transpose(0, 1),
                    v[a:b].transpose(0, 1),
                    is_causal=causal,
                ).transpose(0, 1)
                for a, b in bounds
            ]
        )

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


def _call(fn: Callable, backward: bool) -> Callable[[tuple], Callable[[], object]]:
    def make_call(inputs):
        q, k, v, dout = inputs
        if backward:
            return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

        def forward():
            with torch.no_grad():
                return fn(q, k, v)

        return forward

    return make_call


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_attention_varlen(benchmark, bench, pass_, provider, features_dtype, varlen_shape):
    shape, device, dtype = varlen_shape, bench.device, features_dtype
    harness.require_backend(provider)
    width, N = max(shape.lengths), len(shape.lengths)
    packed = [(sum(shape.lengths), shape.H, shape.E)] * 3
    cu = cu_seqlens(shape.lengths, device)
    causal = shape.causal
    if provider.kind == "fastattn":
        varlen = fastattn.attention_varlen
        if provider.backend == "reference":  # one score matrix per sequence
            harness.skip_if_materialized_too_big(provider, shape.H * width * width, device)
        fn, layout = lambda q, k, v: varlen(q, k, v, cu, cu, width, width, causal=causal), packed
    elif provider.impl == "padded":
        mask = padded_mask(shape.lengths, causal, device)
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        layout = [(N, shape.H, width, shape.E)] * 3
    elif provider.impl == "per-sequence":
        fn, layout = per_sequence(shape.lengths, causal), packed
    else:
        fn, layout = nested(cu, causal), packed
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
        make_inputs=lambda: _inputs(layout, device, dtype, backward),
        make_call=_call(fn, backward),
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
        make_call=_call(fn, backward),
    )
