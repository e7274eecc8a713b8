"""Attention: forward, forward+backward, and decode (L = 1 over a long S).

Providers: every fastattn backend that can serve the device (forced with use_backend; an
unusable one skips with its reason) and three torch baselines: F.scaled_dot_product_attention
with torch's own choice of kernel, the same under SDPBackend.MATH, and eager softmax(QK^T)V.
A fourth, ``torch.sdpa[fp32]``, runs bf16 cases' SDPA on fp32 inputs, on machines without bf16
hardware only: there torch emulates bf16, so a bf16 model would run faster kept in fp32, and
beating torch's bf16 alone flatters fastattn.

FLOPs (issue 4's convention): 4*B*H*L*S*E forward, half of it when causal, 2.5x the forward
for the backward. Bytes: each input read once and each output written once (the lower bound).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn
from benchmarks import harness
from benchmarks.harness import Provider
from benchmarks.shapes import AttentionShape

TORCH_PROVIDERS = [
    Provider("torch.sdpa", "torch"),
    Provider("torch.sdpa[math]", "torch"),
    Provider("torch.eager", "torch"),
    Provider("torch.sdpa[fp32]", "torch", impl="fp32"),
]
# These build the B*H*L*S score matrix, so the largest shapes are out of their reach.
MATERIALIZING = {"torch.sdpa[math]", "torch.eager", "fastattn[reference]"}


def providers(device: torch.device) -> list[Provider]:
    fastattn_providers = [
        Provider(f"fastattn[{name}]", "fastattn", backend=name)
        for name in harness.fastattn_backend_names(device)
    ]
    return fastattn_providers + TORCH_PROVIDERS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "provider" in metafunc.fixturenames:
        device = harness.session_of(metafunc.config).device
        metafunc.parametrize("provider", providers(device), ids=str)


def attention_flops(shape: AttentionShape, pass_: str) -> float:
    forward = 4 * shape.B * shape.H * shape.L * shape.S * shape.E * (0.5 if shape.causal else 1.0)
    return forward * (3.5 if pass_ == "fwd+bwd" else 1.0)


def attention_bytes(shape: AttentionShape, pass_: str, dtype: torch.dtype) -> float:
    size = torch.empty((), dtype=dtype).element_size()
    q = shape.B * shape.H * shape.L * shape.E  # also the size of out, dout and dq
    kv = shape.B * shape.H * shape.S * shape.E  # each of k, v, dk, dv
    lse = shape.B * shape.H * shape.L * 4
    forward = (2 * q + 2 * kv) * size + lse  # read q, k, v; write out, lse
    if pass_ == "fwd":
        return forward
    return forward + (4 * q + 4 * kv) * size + lse  # read q, k, v, out, dout, lse; write dq, dk, dv


def _eager_attention(causal: bool, L: int, S: int, device: torch.device) -> Callable:
    blocked = torch.ones(L, S, dtype=torch.bool, device=device).triu(1) if causal else None

    def eager(q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    return eager


def attention_fn(provider: Provider, shape: AttentionShape, device: torch.device) -> Callable:
    """(q, k, v) -> out for this provider."""
    causal = shape.causal
    if provider.kind == "fastattn":
        sdpa = fastattn.scaled_dot_product_attention
        return lambda q, k, v: sdpa(q, k, v, is_causal=causal)
    if provider.name in ("torch.sdpa", "torch.sdpa[fp32]"):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if provider.name == "torch.sdpa[math]":

        def math_sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return math_sdpa
    return _eager_attention(causal, shape.L, shape.S, device)


def fp32_baseline_applies(dtype: torch.dtype, bf16_hardware: bool) -> bool:
    """torch.sdpa[fp32] is a baseline for bf16 cases where bf16 is emulated."""
    return dtype == torch.bfloat16 and not bf16_hardware


def _run(benchmark, bench, op: str, pass_: str, provider: Provider, dtype, shape: AttentionShape):
    device = bench.device
    harness.require_backend(provider)
    timed_dtype = dtype
    if provider.impl == "fp32":
        if not fp32_baseline_applies(dtype, bench.facts["bf16_hardware"]):
            pytest.skip(
                "torch.sdpa[fp32] is a baseline for bf16 cases on machines without bf16 hardware"
            )
        timed_dtype = torch.float32
    if provider.name in MATERIALIZING:
        harness.skip_if_materialized_too_big(
            provider, shape.B * shape.H * shape.L * shape.S, device
        )
    fn = attention_fn(provider, shape, device)
    backward = pass_ == "fwd+bwd"

    def make_inputs():
        def tensor(length: int, requires_grad: bool = backward) -> torch.Tensor:
            return harness.random_tensor(
                shape.B, shape.H, length, shape.E,
                device=device, dtype=timed_dtype, requires_grad=requires_grad,
            )

        return tensor(shape.L), tensor(shape.S), tensor(shape.S), tensor(shape.L, False)

    harness.run_case(
        benchmark,
        bench,
        op=op,
        pass_=pass_,
        provider=provider,
        shape=shape,
        dtype=dtype,
        flops=attention_flops(shape, pass_),
        bytes_moved=attention_bytes(shape, pass_, dtype),
        make_inputs=make_inputs,
        make_call=harness.attention_call(fn, backward),
    )


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_attention(benchmark, bench, pass_, provider, attention_dtype, attention_shape):
    _run(benchmark, bench, "attention", pass_, provider, attention_dtype, attention_shape)


def test_attention_decode(benchmark, bench, provider, attention_dtype, decode_shape):
    _run(benchmark, bench, "attention_decode", "fwd", provider, attention_dtype, decode_shape)
