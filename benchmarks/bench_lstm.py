"""LSTM: one cell step, a one-layer sequence, and a LayerNorm-LSTM sequence (inference and
training step).

Providers for a cell step: fastattn.lstm_cell (the functional op), fastattn.LSTMCell, each per
fastattn backend, against nn.LSTMCell. For a sequence: fastattn.LSTM per backend against
nn.LSTM (oneDNN on CPU, cuDNN on GPU) and a Python loop over nn.LSTMCell. Every provider runs
the same weights (the fastattn modules load the torch module's state_dict). LayerNorm-LSTM:
fastattn.LSTM(layer_norm=True) on each fused backend (cpu; on a GPU cuda and triton: the
fastattn::lstm_ln_layer_* ops and their *_triton kernels) against the same module on the
reference backend (plain PyTorch ops per step; torch has no LayerNorm-LSTM), which counts as the
torch baseline of the ratios.

FLOPs: the two GEMMs, 2*B*4H*(I+H) per step (the pointwise part is not counted), times T; a
training step (forward + backward) is 3x the forward. Bytes: weights, inputs and states read
once and outputs written once; the training step adds reading the output gradient and
writing every input and weight gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastattn
from benchmarks import harness
from benchmarks.harness import Provider
from benchmarks.shapes import LSTMShape

PASSES = ["fwd", "fwd+bwd"]


def cell_providers(device: torch.device) -> list[Provider]:
    out = []
    for name in harness.fastattn_backend_names(device):
        out.append(Provider(f"fastattn.lstm_cell[{name}]", "fastattn", name, impl="lstm_cell"))
        out.append(Provider(f"fastattn.LSTMCell[{name}]", "fastattn", name, impl="LSTMCell"))
    return out + [Provider("torch.nn.LSTMCell", "torch", impl="LSTMCell")]


def sequence_providers(device: torch.device) -> list[Provider]:
    out = [
        Provider(f"fastattn.LSTM[{name}]", "fastattn", name, impl="LSTM")
        for name in harness.fastattn_backend_names(device)
    ]
    return out + [
        Provider("torch.nn.LSTM", "torch", impl="LSTM"),
        Provider("torch.nn.LSTMCell-loop", "torch", impl="LSTMCell-loop"),
    ]


def layer_norm_providers(device: torch.device) -> list[Provider]:
    fused = [name for name in harness.fastattn_backend_names(device) if name != "reference"]
    return [
        Provider(f"fastattn.LSTM(layer_norm)[{name}]", "fastattn", name, impl="LSTM")
        for name in fused
    ] + [Provider("fastattn.LSTM(layer_norm)[reference]", "torch", "reference", impl="LSTM")]


PROVIDERS = {
    "test_lstm_cell": cell_providers,
    "test_lstm": sequence_providers,
    "test_lstm_layer_norm": layer_norm_providers,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "provider" in metafunc.fixturenames:
        device = harness.session_of(metafunc.config).device
        make = PROVIDERS[metafunc.function.__name__]
        metafunc.parametrize("provider", make(device), ids=str)


def lstm_flops(shape: LSTMShape, pass_: str) -> float:
    forward = shape.T * 2 * shape.B * 4 * shape.H * (shape.I + shape.H)
    return forward * (3.0 if pass_ == "fwd+bwd" else 1.0)


def lstm_bytes(shape: LSTMShape, pass_: str, dtype: torch.dtype) -> float:
    T, B, I, H = shape.T, shape.B, shape.I, shape.H  # noqa: E741
    weights = 4 * H * (I + H) + 8 * H
    forward = weights + T * B * I + 2 * B * H + T * B * H + 2 * B * H  # + x, h0, c0; out, hn, cn
    total = forward if pass_ == "fwd" else forward + T * B * H + weights + T * B * I + 2 * B * H
    return total * torch.empty((), dtype=dtype).element_size()


def _module_for(provider: Provider, torch_module: nn.Module) -> nn.Module:
    """The provider's module with ``torch_module``'s weights (same device and dtype)."""
    if provider.kind == "torch":
        return torch_module
    cls = getattr(fastattn, provider.impl)
    ref = next(torch_module.parameters())
    module = cls(
        torch_module.input_size, torch_module.hidden_size, device=ref.device, dtype=ref.dtype
    )
    module.load_state_dict(torch_module.state_dict())
    return module


def _grad_call(outputs, inputs, grads):
    return lambda: torch.autograd.grad(outputs(), inputs, grads)


@pytest.mark.parametrize("pass_", PASSES)
def test_lstm_cell(benchmark, bench, pass_, provider, lstm_dtype, lstm_cell_shape):
    device, dtype, shape = bench.device, lstm_dtype, lstm_cell_shape
    harness.require_backend(provider)
    backward = pass_ == "fwd+bwd"
    lstm_cell = (
        fastattn.lstm_cell if provider.impl == "lstm_cell" else None
    )
    torch.manual_seed(0)
    torch_cell = nn.LSTMCell(shape.I, shape.H, device=device, dtype=dtype)
    cell = _module_for(provider, torch_cell) if provider.impl == "LSTMCell" else torch_cell

    def make_inputs():
        x = harness.random_tensor(
            shape.B, shape.I, device=device, dtype=dtype, requires_grad=backward
        )
        h = harness.random_tensor(
            shape.B, shape.H, device=device, dtype=dtype, requires_grad=backward
        )
        c = harness.random_tensor(
            shape.B, shape.H, device=device, dtype=dtype, requires_grad=backward
        )
        grads = tuple(
            harness.random_tensor(shape.B, shape.H, device=device, dtype=dtype) for _ in range(2)
        )
        return x, h, c, grads

    def make_call(inputs):
        x, h, c, grads = inputs
        params = list(cell.parameters())
        if provider.impl == "lstm_cell":

            def step():
                return lstm_cell(
                    x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
                )
        else:

            def step():
                return cell(x, (h, c))

        if backward:
            return _grad_call(step, [x, h, c] + params, grads)

        def forward():
            with torch.no_grad():
                return step()

        return forward

    harness.run_case(
        benchmark,
        bench,
        op="lstm_cell",
        pass_=pass_,
        provider=provider,
        shape=shape,
        dtype=dtype,
        flops=lstm_flops(shape, pass_),
        bytes_moved=lstm_bytes(shape, pass_, dtype),
        make_inputs=make_inputs,
        make_call=make_call,
    )


def _run_sequence_case(benchmark, bench, op, pass_, provider, shape, dtype, run, params):
    """One sequence case: run(x, h0, c0) -> output, timed forward or forward + backward into
    x and params."""
    device, backward = bench.device, pass_ == "fwd+bwd"

    def make_inputs():
        x = harness.random_tensor(
            shape.T, shape.B, shape.I, device=device, dtype=dtype, requires_grad=backward
        )
        h0 = harness.random_tensor(1, shape.B, shape.H, device=device, dtype=dtype)
        c0 = harness.random_tensor(1, shape.B, shape.H, device=device, dtype=dtype)
        dout = harness.random_tensor(shape.T, shape.B, shape.H, device=device, dtype=dtype)
        return x, h0, c0, dout

    def make_call(inputs):
        x, h0, c0, dout = inputs
        if backward:
            return _grad_call(lambda: run(x, h0, c0), [x] + params, dout)

        def forward():
            with torch.no_grad():
                return run(x, h0, c0)

        return forward

    harness.run_case(
        benchmark,
        bench,
        op=op,
        pass_=pass_,
        provider=provider,
        shape=shape,
        dtype=dtype,
        flops=lstm_flops(shape, pass_),
        bytes_moved=lstm_bytes(shape, pass_, dtype),
        make_inputs=make_inputs,
        make_call=make_call,
    )


@pytest.mark.parametrize("pass_", PASSES)
def test_lstm(benchmark, bench, pass_, provider, lstm_dtype, lstm_shape):
    device, dtype, shape = bench.device, lstm_dtype, lstm_shape
    harness.require_backend(provider)
    backward = pass_ == "fwd+bwd"
    torch.manual_seed(0)
    torch_lstm = nn.LSTM(shape.I, shape.H, device=device, dtype=dtype)
    if provider.impl == "LSTMCell-loop":
        cell = nn.LSTMCell(shape.I, shape.H, device=device, dtype=dtype)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(torch_lstm, f"{name}_l0"))
        module = cell
    else:
        module = _module_for(provider, torch_lstm)
    module.train(backward)

    def run(x, h0, c0):
        if provider.impl == "LSTMCell-loop":
            h, c = h0[0], c0[0]
            outputs = []
            for x_t in x:
                h, c = module(x_t, (h, c))
                outputs.append(h)
            return torch.stack(outputs)
        return module(x, (h0, c0))[0]

    _run_sequence_case(benchmark, bench, "lstm", pass_, provider, shape, dtype, run,
                       list(module.parameters()))


@pytest.mark.parametrize("pass_", PASSES)
def test_lstm_layer_norm(benchmark, bench, pass_, provider, lstm_dtype, lstm_shape):
    device, dtype, shape = bench.device, lstm_dtype, lstm_shape
    harness.require_backend(provider)
    backward = pass_ == "fwd+bwd"
    lstm_cls = fastattn.LSTM
    torch.manual_seed(0)
    module = lstm_cls(shape.I, shape.H, layer_norm=True, device=device, dtype=dtype)
    module.train(backward)

    _run_sequence_case(benchmark, bench, "lstm_layer_norm", pass_, provider, shape, dtype,
                       lambda x, h0, c0: module(x, (h0, c0))[0], list(module.parameters()))
