"""Multi-head attention layer, and an nn.TransformerEncoder before and after fastattn.convert.

Self-attention over x [batch, seq, d_model], batch_first, dropout 0 (so both sides time the
same math), need_weights=False (the fused path). Forward runs in eval mode under no_grad (torch
then takes its own fast path, which is the baseline users have); the training step is forward
+ backward in train mode. fastattn providers: fastattn.MultiheadAttention loaded with the torch
layer's state_dict, and fastattn.convert() of a deep copy of the torch encoder, each per backend.

FLOPs: the projections (8*N*d^2 per MHA, + 4*N*d*ff for the feed-forward, N = batch*seq) plus
the attention core (4*batch*seq^2*d); the training step counts 3x the projections and 3.5x the
core (issue 4's backward convention). Bytes: parameters and activations in and out once (fwd);
the training step adds the parameter gradients and the input/output gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from benchmarks import harness
from benchmarks.harness import Provider
from benchmarks.shapes import TransformerShape

PASSES = ["fwd", "fwd+bwd"]
FEEDFORWARD = 2048  # torch's default dim_feedforward


def providers(device: torch.device) -> list[Provider]:
    return [
        Provider(f"fastattn[{name}]", "fastattn", name)
        for name in harness.fastattn_backend_names(device)
    ] + [Provider("torch", "torch")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "provider" in metafunc.fixturenames:
        device = harness.session_of(metafunc.config).device
        metafunc.parametrize("provider", providers(device), ids=str)


def transformer_flops(shape: TransformerShape, pass_: str, feedforward: int | None) -> float:
    tokens, d = shape.batch * shape.seq, shape.d_model
    linear = 8 * tokens * d * d + (4 * tokens * d * feedforward if feedforward else 0)
    core = 4 * shape.batch * shape.seq * shape.seq * d
    if pass_ == "fwd+bwd":
        return shape.layers * (3 * linear + 3.5 * core)
    return shape.layers * (linear + core)


def transformer_bytes(shape: TransformerShape, pass_: str, module: nn.Module, dtype) -> float:
    params = sum(p.numel() for p in module.parameters())
    activations = 2 * shape.batch * shape.seq * shape.d_model  # x in, out
    total = params + activations if pass_ == "fwd" else 2 * (params + activations)
    return total * torch.empty((), dtype=dtype).element_size()


class _OpNamespaces(TorchDispatchMode):
    """Records the namespace of every op dispatched inside it ("aten", "fastattn", ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.namespace)
        return func(*args, **(kwargs or {}))


def _check_runs_fastattn_kernels(provider, run, x) -> None:
    """A fastattn provider whose call never reaches a fastattn op would time torch under our name
    (nn.TransformerEncoderLayer's eval fast path can bypass self_attn.forward). The C++ backends
    run fastattn::* ops, so for them this is checked; triton and reference run other ops."""
    if provider.backend not in ("cpu", "cuda"):
        return
    with harness.unservable_as_skip(provider), torch.no_grad(), _OpNamespaces() as ops:
        run(x)
    if "fastattn" not in ops.seen:
        raise AssertionError(f"{provider.name}: the module ran no fastattn op (saw {ops.seen})")


def _run(
    benchmark, bench, op, pass_, provider, dtype, shape, torch_module, to_fastattn, feedforward
):
    device = bench.device
    harness.require_backend(provider)
    backward = pass_ == "fwd+bwd"
    module = torch_module if provider.kind == "torch" else to_fastattn(torch_module)
    module.train(backward)
    if op == "mha":

        def run(x):
            return module(x, x, x, need_weights=False)[0]
    else:
        run = module

    def make_inputs():
        x = harness.random_tensor(
            shape.batch,
            shape.seq,
            shape.d_model,
            device=device,
            dtype=dtype,
            requires_grad=backward,
        )
        dout = harness.random_tensor(
            shape.batch, shape.seq, shape.d_model, device=device, dtype=dtype
        )
        return x, dout

    def make_call(inputs):
        x, dout = inputs
        if provider.kind == "fastattn":
            _check_runs_fastattn_kernels(provider, run, x)
        if backward:
            return lambda: torch.autograd.grad(run(x), [x] + list(module.parameters()), dout)

        def forward():
            with torch.no_grad():
                return run(x)

        return forward

    harness.run_case(
        benchmark,
        bench,
        op=op,
        pass_=pass_,
        provider=provider,
        shape=shape,
        dtype=dtype,
        flops=transformer_flops(shape, pass_, feedforward),
        bytes_moved=transformer_bytes(shape, pass_, module, dtype),
        make_inputs=make_inputs,
        make_call=make_call,
    )


@pytest.mark.parametrize("pass_", PASSES)
def test_mha(benchmark, bench, pass_, provider, mha_dtype, mha_shape):
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(
        mha_shape.d_model, mha_shape.heads, batch_first=True, device=bench.device, dtype=mha_dtype
    )

    def to_fastattn(layer: nn.MultiheadAttention) -> nn.Module:
        cls = fastattn.MultiheadAttention
        module = cls(
            layer.embed_dim, layer.num_heads, batch_first=True, device=bench.device, dtype=mha_dtype
        )
        module.load_state_dict(layer.state_dict())
        return module

    _run(
        benchmark, bench, "mha", pass_, provider, mha_dtype, mha_shape, torch_mha, to_fastattn, None
    )


@pytest.mark.parametrize("pass_", PASSES)
def test_transformer_encoder(benchmark, bench, pass_, provider, mha_dtype, encoder_shape):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        encoder_shape.d_model,
        encoder_shape.heads,
        dim_feedforward=FEEDFORWARD,
        dropout=0.0,
        batch_first=True,
        device=bench.device,
        dtype=mha_dtype,
    )
    encoder = nn.TransformerEncoder(layer, encoder_shape.layers, enable_nested_tensor=False)

    def to_fastattn(model: nn.Module) -> nn.Module:
        convert = fastattn.convert
        converted = convert(copy.deepcopy(model))
        mha_cls = fastattn.MultiheadAttention
        if not any(isinstance(m, mha_cls) for m in converted.modules()):
            raise AssertionError(
                "fastattn.convert left no fastattn.MultiheadAttention in the encoder"
            )
        return converted

    _run(
        benchmark,
        bench,
        "transformer_encoder",
        pass_,
        provider,
        mha_dtype,
        encoder_shape,
        encoder,
        to_fastattn,
        FEEDFORWARD,
    )
