"""The compiled LSTM ops (fastattn::lstm_cell_pointwise_fwd/_bwd, fastattn::lstm_sequence_fwd)
against float64 plain-PyTorch computations of the same math; on a GPU also the CUDA layer ops
(fastattn::lstm_layer_fwd/_bwd/_infer, the persistent kernels where they serve) through
fastattn.LSTM / LSTMCell against nn.LSTM / nn.LSTMCell (cuDNN) and, for the options nn.LSTM
lacks, against the reference loop.

One test body per op, parametrized over device: the ``cuda`` cases (csrc/lstm/*.cu) are marked
``gpu`` and run on a GPU; the ``cpu`` cases exercise the C++ CPU kernels of the same ops. A
missing op or CPU kernel fails; only the ``cuda`` cases of a build without CUDA skip.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastattn
from fastattn import _extension
from fastattn.ops import lstm as lstm_ops
from fastattn.ops import reference
from tests.helpers import assert_close_to_reference
from tests.lstm_math import cell_grads, cell_math, sequence_inputs, sequence_math

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
# "aligned-padded": rows padded to a 16-byte multiple (vectorized CUDA path, row stride != 4H);
# "offset": rows starting one element late (scalar CUDA path); "transposed": last dim strided.
LAYOUTS = ["contiguous", "aligned-padded", "offset", "transposed"]
CELL_SIZES = [
    pytest.param(b, h, id=f"B{b}-H{h}") for b in (1, 7, 33) for h in (1, 7, 33, 64, 100)
]


def require_kernel(op: str, device: str) -> None:
    """Fails when fastattn::<op> or its kernel for ``device`` is missing; skips (saying why) only
    the cuda cases of an extension built without CUDA."""
    assert _extension.C is not None, f"fastattn._C did not load: {_extension.LOAD_ERROR}"
    if device == "cuda" and not _extension.C.built_with_cuda():
        pytest.skip("fastattn._C was built without CUDA (FASTATTN_CUDA=0 or no nvcc)")
    assert hasattr(torch.ops.fastattn, op), f"fastattn::{op} has no schema"
    key = "CUDA" if device == "cuda" else "CPU"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", key), (
        f"fastattn._C registers no {key} kernel for fastattn::{op}"
    )


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` [R, C] in the given memory layout."""
    rows, cols = t.shape
    if layout == "contiguous":
        return t
    if layout == "aligned-padded":
        padded = torch.full((rows, cols + 8), float("nan"), dtype=t.dtype, device=t.device)
        padded[:, :cols] = t
        return padded[:, :cols]
    if layout == "offset":
        shifted = torch.full((rows, cols + 1), float("nan"), dtype=t.dtype, device=t.device)
        shifted[:, 1:] = t
        return shifted[:, 1:]
    if layout == "transposed":
        return t.t().contiguous().t()
    raise ValueError(layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch, hidden", CELL_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_cell_forward_and_backward(device, dtype, batch, hidden, layout):
    require_kernel("lstm_cell_pointwise_fwd", device)
    require_kernel("lstm_cell_pointwise_bwd", device)
    gates = 2 * torch.randn(batch, 4 * hidden, dtype=dtype, device=device)
    cx, grad_hy, grad_cy = torch.randn(3, batch, hidden, dtype=dtype, device=device).unbind(0)
    gates_in, cx_in = laid_out(gates, layout), laid_out(cx, layout)

    hy, cy = torch.ops.fastattn.lstm_cell_pointwise_fwd(gates_in, cx_in)
    assert hy.dtype == dtype and cy.dtype == dtype and hy.device.type == device
    hy64, cy64 = cell_math(gates.double(), cx.double())
    hy_torch, cy_torch = cell_math(gates, cx)
    assert_close_to_reference(hy, hy64, hy_torch, name="hy")
    assert_close_to_reference(cy, cy64, cy_torch, name="cy")

    grad_gates, grad_cx = torch.ops.fastattn.lstm_cell_pointwise_bwd(
        laid_out(grad_hy, layout), laid_out(grad_cy, layout), gates_in, cx_in, laid_out(cy, layout)
    )
    assert grad_gates.shape == (batch, 4 * hidden) and grad_cx.shape == (batch, hidden)
    expected64 = cell_grads(gates, cx, grad_hy, grad_cy, torch.float64)
    expected_torch = cell_grads(gates, cx, grad_hy, grad_cy, dtype)
    assert_close_to_reference(grad_gates, expected64[0], expected_torch[0], name="grad_gates")
    assert_close_to_reference(grad_cx, expected64[1], expected_torch[1], name="grad_cx")


def poison_cuda_allocator(shapes, dtype) -> set[int]:
    """Frees NaN-filled blocks of exactly the outputs' sizes, so the caching allocator hands
    them to the op's outputs; returns their addresses (the test asserts they were reused)."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape in shapes]
    addresses = {b.data_ptr() for b in blocks}
    del blocks
    return addresses


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cell_writes_every_element(dtype):
    """Outputs land in NaN-poisoned memory: an element the kernel skips stays NaN and fails."""
    require_kernel("lstm_cell_pointwise_fwd", "cuda")
    batch, hidden = 33, 100
    gates = 2 * torch.randn(batch, 4 * hidden, dtype=dtype, device="cuda")
    cx, grad_hy, grad_cy = torch.randn(3, batch, hidden, dtype=dtype, device="cuda").unbind(0)

    poisoned = poison_cuda_allocator([(batch, hidden)] * 2, dtype)
    hy, cy = torch.ops.fastattn.lstm_cell_pointwise_fwd(gates, cx)
    assert {hy.data_ptr(), cy.data_ptr()} == poisoned, "outputs did not reuse the poisoned blocks"
    hy64, cy64 = cell_math(gates.double(), cx.double())
    assert_close_to_reference(hy, hy64, cell_math(gates, cx)[0], name="hy")
    assert_close_to_reference(cy, cy64, cell_math(gates, cx)[1], name="cy")

    poisoned = poison_cuda_allocator([(batch, 4 * hidden), (batch, hidden)], dtype)
    grad_gates, grad_cx = torch.ops.fastattn.lstm_cell_pointwise_bwd(
        grad_hy, grad_cy, gates, cx, cy
    )
    assert {grad_gates.data_ptr(), grad_cx.data_ptr()} == poisoned
    expected64 = cell_grads(gates, cx, grad_hy, grad_cy, torch.float64)
    expected_torch = cell_grads(gates, cx, grad_hy, grad_cy, dtype)
    assert_close_to_reference(grad_gates, expected64[0], expected_torch[0], name="grad_gates")
    assert_close_to_reference(grad_cx, expected64[1], expected_torch[1], name="grad_cx")


SEQUENCE_SIZES = [
    pytest.param(t, b, h, id=f"T{t}-B{b}-H{h}")
    for t in (1, 6)
    for b in (1, 7, 33)
    for h in (1, 7, 33, 100, 256)
] + [
    # More batch tiles (of 8 rows) than the co-resident grid gives each slice: CTAs loop.
    pytest.param(3, 1100, 256, id="T3-B1100-H256"),
]


@pytest.mark.parametrize("seq_len, batch, hidden", SEQUENCE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_sequence_forward(device, dtype, seq_len, batch, hidden):
    require_kernel("lstm_sequence_fwd", device)
    inputs = sequence_inputs(seq_len, batch, hidden, dtype, device)
    h_all, c_all, gates_all = torch.ops.fastattn.lstm_sequence_fwd(*inputs)
    assert h_all.shape == (seq_len, batch, hidden) and c_all.shape == (seq_len, batch, hidden)
    assert gates_all.shape == (seq_len, batch, 4 * hidden)
    assert h_all.dtype == c_all.dtype == dtype
    # Both kernels save the gates in the math dtype (fastattn/ops/_registry.py).
    assert gates_all.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    expected64 = sequence_math(*(t.double() for t in inputs))
    expected_torch = sequence_math(*inputs)
    for name, actual, ref64, ref_torch in zip(
        ("h_all", "c_all", "gates_all"), (h_all, c_all, gates_all), expected64, expected_torch,
        strict=True,
    ):
        assert_close_to_reference(actual, ref64, ref_torch, dtype=dtype, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_writes_every_element(dtype):
    require_kernel("lstm_sequence_fwd", "cuda")
    seq_len, batch, hidden = 5, 33, 100
    inputs = sequence_inputs(seq_len, batch, hidden, dtype, "cuda")
    shapes = [(seq_len, batch, hidden)] * 2 + [(seq_len, batch, 4 * hidden)]
    poisoned = poison_cuda_allocator(shapes, dtype)
    outputs = torch.ops.fastattn.lstm_sequence_fwd(*inputs)
    assert {t.data_ptr() for t in outputs} == poisoned, "outputs did not reuse the poisoned blocks"
    expected64 = sequence_math(*(t.double() for t in inputs))
    expected_torch = sequence_math(*inputs)
    for actual, ref64, ref_torch in zip(outputs, expected64, expected_torch, strict=True):
        assert_close_to_reference(actual, ref64, ref_torch)


@pytest.mark.gpu
def test_sequence_matches_a_loop_of_cell_ops():
    """The persistent kernel and a loop of the CUDA cell op agree (fp32; rounding aside)."""
    require_kernel("lstm_sequence_fwd", "cuda")
    require_kernel("lstm_cell_pointwise_fwd", "cuda")
    x_proj, h0, c0, w_hh = sequence_inputs(4, 9, 48, torch.float32, "cuda")
    h_all, c_all, _ = torch.ops.fastattn.lstm_sequence_fwd(x_proj, h0, c0, w_hh)
    h, c = h0, c0
    for t in range(x_proj.shape[0]):
        h, c = torch.ops.fastattn.lstm_cell_pointwise_fwd(x_proj[t] + h @ w_hh.t(), c)
        torch.testing.assert_close(h_all[t], h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c_all[t], c, rtol=1e-5, atol=1e-6)


def test_sequence_against_library_reference():
    """float64 agreement of this file's oracle with fastattn.ops.reference's sequence forward."""
    inputs = sequence_inputs(4, 5, 7, torch.float64, "cpu")
    for ours, theirs in zip(sequence_math(*inputs), reference.lstm_sequence_fwd_reference(*inputs),
                            strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shapes, dtype, error, match",
    [
        pytest.param(((2, 3, 4 * 257), (3, 257), (3, 257), (4 * 257, 257)), torch.float32,
                     ValueError, "hidden sizes 1..256", id="H-too-large"),
        pytest.param(((2, 3, 16), (3, 5), (3, 4), (16, 4)), torch.float32, ValueError,
                     "h0 must have shape", id="h0-shape"),
        pytest.param(((2, 3, 16), (3, 4), (3, 4), (16, 5)), torch.float32, ValueError,
                     "w_hh must have shape", id="w_hh-shape"),
        pytest.param(((2, 3, 15), (3, 4), (3, 4), (16, 4)), torch.float32, ValueError,
                     r"x_proj must be \[T, B, 4H\]", id="x_proj-not-4H"),
    ],
)
def test_sequence_bad_inputs(shapes, dtype, error, match):
    require_kernel("lstm_sequence_fwd", "cuda")
    tensors = [torch.randn(s, dtype=dtype, device="cuda") for s in shapes]
    with pytest.raises(error, match=match):
        torch.ops.fastattn.lstm_sequence_fwd(*tensors)


@pytest.mark.gpu
def test_cell_bad_inputs():
    require_kernel("lstm_cell_pointwise_fwd", "cuda")
    gates = torch.randn(3, 8, device="cuda")
    with pytest.raises(ValueError, match="cx must have shape"):
        torch.ops.fastattn.lstm_cell_pointwise_fwd(gates, torch.randn(3, 3, device="cuda"))
    with pytest.raises(TypeError, match="cx has dtype"):
        torch.ops.fastattn.lstm_cell_pointwise_fwd(
            gates, torch.randn(3, 2, device="cuda", dtype=torch.float64)
        )
    with pytest.raises(ValueError, match=r"gates must be \[B, 4H\]"):
        torch.ops.fastattn.lstm_cell_pointwise_fwd(torch.randn(3, 9, device="cuda"), gates[:, :2])


@pytest.mark.gpu
def test_cuda_ops_opcheck():
    """Schema, fake kernels (fastattn/ops/lstm.py) and dispatch of the CUDA impls."""
    require_kernel("lstm_cell_pointwise_fwd", "cuda")
    require_kernel("lstm_sequence_fwd", "cuda")
    gates = torch.randn(5, 28, device="cuda")
    cx, grad_hy, grad_cy = torch.randn(3, 5, 7, device="cuda").unbind(0)
    _, cy = cell_math(gates, cx)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastattn.lstm_cell_pointwise_fwd, (gates, cx), test_utils=utils)
    torch.library.opcheck(
        torch.ops.fastattn.lstm_cell_pointwise_bwd, (grad_hy, grad_cy, gates, cx, cy),
        test_utils=utils,
    )
    torch.library.opcheck(
        torch.ops.fastattn.lstm_sequence_fwd, sequence_inputs(3, 5, 7, torch.float32, "cuda"),
        test_utils=utils,
    )


# ---- the layer ops on CUDA (csrc/lstm/lstm_cuda.cpp: C++ time loop, persistent kernel) ----------
# fastattn.LSTM / LSTMCell on CUDA against nn.LSTM / nn.LSTMCell themselves (cuDNN): our error
# against nn's float64 run must stay within 2x nn's own error in the same dtype (plus a floor),
# for the outputs, the final states and the gradient of every input and weight.

MODULE_FLAGS = [
    pytest.param(dict(), False, id="plain"),
    pytest.param(dict(), True, id="plain-packed"),
    pytest.param(dict(num_layers=2, bidirectional=True), False, id="L2-bi"),
    pytest.param(dict(proj_size=5), False, id="proj"),
    pytest.param(dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True, bias=False),
                 True, id="L2-bi-proj-bf-nobias-packed"),
]
# H 256: the persistent kernels serve the layers without projection; 300: they do not fit.
# float32 runs every size, the other dtypes two (the GPU test step of scripts/gpu_check.sh has
# 240 s for all).
MODULE_SIZES = [
    pytest.param(dtype, t, b, h, id=f"{name}-T{t}-B{b}-H{h}")
    for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64"),
                        (torch.float16, "fp16"), (torch.bfloat16, "bf16"))
    for t, b, h in ((1, 1, 7), (5, 7, 33), (6, 3, 256), (3, 5, 300))
    if dtype == torch.float32 or h in (33, 256)
]


def _grads(outputs, leaves, seed):
    """Gradients of every leaf for fixed random cotangents of every output (float64 inputs give
    float64 cotangents of the same values)."""
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs]
    return torch.autograd.grad(outputs, leaves, cotangents)


def _run_module(module, x, hx, packed_lengths, grad):
    if packed_lengths is not None:
        x_in = pack_padded_sequence(x, packed_lengths, batch_first=module.batch_first,
                                    enforce_sorted=False)
    else:
        x_in = x
    with torch.set_grad_enabled(grad):
        out, (h_n, c_n) = module(x_in, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    outputs = [data, h_n, c_n]
    if not grad:
        return outputs
    return outputs + list(_grads(outputs, [x, *hx, *module.parameters()], seed=1))


def _module_pair(in_features, hidden, dtype, **flags):
    """nn.LSTM on the GPU, fastattn.LSTM with its weights, and its float64 copy."""
    theirs = nn.LSTM(in_features, hidden, device="cuda", dtype=dtype, **flags)
    ours = fastattn.LSTM(in_features, hidden, device="cuda", dtype=dtype, **flags)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours, copy.deepcopy(theirs).double()


def _assert_module_matches(ours, got, ref64, ref_torch):
    """_run_module's outputs (and gradients) of ours against nn.LSTM's: float64 and cuDNN."""
    names = ["output", "h_n", "c_n", "grad input", "grad h0", "grad c0"] + [
        f"grad {n}" for n, _ in ours.named_parameters()]
    for name, (a, r64, rt) in zip(names, zip(got, ref64, ref_torch, strict=True), strict=False):
        assert a.shape == rt.shape, f"{name}: shape {tuple(a.shape)} != {tuple(rt.shape)}"
        assert_close_to_reference(a, r64, rt, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype, seq_len, batch, hidden", MODULE_SIZES)
@pytest.mark.parametrize("flags, packed", MODULE_FLAGS)
def test_lstm_module_matches_nn_lstm(flags, packed, dtype, seq_len, batch, hidden, grad):
    require_kernel("lstm_layer_fwd", "cuda")
    require_kernel("lstm_layer_bwd", "cuda")
    require_kernel("lstm_layer_infer", "cuda")
    torch.manual_seed(0)
    in_features = 11
    theirs, ours, theirs64 = _module_pair(in_features, hidden, dtype, **flags)
    batch_first = flags.get("batch_first", False)
    x = torch.randn((batch, seq_len, in_features) if batch_first else (seq_len, batch, in_features),
                    device="cuda", dtype=dtype)
    layers = flags.get("num_layers", 1) * (2 if flags.get("bidirectional") else 1)
    width = flags.get("proj_size", 0) or hidden
    hx = (torch.randn(layers, batch, width, device="cuda", dtype=dtype),
          torch.randn(layers, batch, hidden, device="cuda", dtype=dtype))
    lengths = None
    if packed:  # distinct lengths in shuffled order, the longest == seq_len
        lengths = torch.randperm(batch).add(seq_len - batch + 1).clamp_min(1)
        lengths[lengths.argmax()] = seq_len
    leaves = [t.detach().requires_grad_(grad) for t in (x, *hx)]
    leaves64 = [t.detach().double().requires_grad_(grad) for t in (x, *hx)]
    got = _run_module(ours, leaves[0], tuple(leaves[1:]), lengths, grad)
    ref64 = _run_module(theirs64, leaves64[0], tuple(leaves64[1:]), lengths, grad)
    ref_torch = _run_module(theirs, leaves[0], tuple(leaves[1:]), lengths, grad)
    _assert_module_matches(ours, got, ref64, ref_torch)


def _cuda_kernels_run(fn) -> set[str]:
    """Names of the CUDA kernels ``fn()`` launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events()}


@pytest.mark.gpu
@pytest.mark.parametrize("bidirectional, packed", [(False, False), (True, False), (True, True)],
                         ids=["uni", "bi", "bi-packed"])
@pytest.mark.parametrize("seq_len, batch, hidden", [(1, 1, 1), (6, 33, 100), (3, 1100, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_training_runs_the_persistent_kernels(dtype, seq_len, batch, hidden, bidirectional,
                                              packed):
    """A training step of fastattn.LSTM without projection (H <= 256), uni- or bidirectional,
    padded or packed, runs the persistent forward and backward kernels
    (csrc/lstm/lstm_sequence.cuh), not the per-step loop, and matches nn.LSTM: outputs and
    every gradient, against float64 and cuDNN's error."""
    require_kernel("lstm_layer_bwd", "cuda")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the persistent LSTM kernels need sm_80 or newer")
    torch.manual_seed(0)
    in_features = 9
    theirs, ours, theirs64 = _module_pair(in_features, hidden, dtype, bidirectional=bidirectional)
    x = torch.randn(seq_len, batch, in_features, device="cuda", dtype=dtype)
    directions = 2 if bidirectional else 1
    hx = (torch.randn(directions, batch, hidden, device="cuda", dtype=dtype),
          torch.randn(directions, batch, hidden, device="cuda", dtype=dtype))
    lengths = None
    if packed:  # shuffled lengths in 1..seq_len, the longest == seq_len
        lengths = torch.randint(1, seq_len + 1, (batch,))
        lengths[0] = seq_len
    leaves = [t.detach().requires_grad_() for t in (x, *hx)]
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *hx)]
    got = []
    kernels = _cuda_kernels_run(
        lambda: got.extend(_run_module(ours, leaves[0], tuple(leaves[1:]), lengths, True)))
    for direction in ("fwd", "bwd"):
        assert any(f"lstm_sequence_{direction}_kernel" in name for name in kernels), (
            f"the persistent {direction} kernel did not run; kernels: {sorted(kernels)}")
    assert not any("lstm_step" in name for name in kernels), sorted(kernels)
    ref64 = _run_module(theirs64, leaves64[0], tuple(leaves64[1:]), lengths, True)
    ref_torch = _run_module(theirs, leaves[0], tuple(leaves[1:]), lengths, True)
    _assert_module_matches(ours, got, ref64, ref_torch)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, hidden", [(1, 7), (7, 33), (33, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_cell_module_matches_nn_lstm_cell(dtype, batch, hidden):
    require_kernel("lstm_cell_pointwise_fwd", "cuda")
    torch.manual_seed(0)
    theirs = nn.LSTMCell(9, hidden, device="cuda", dtype=dtype)
    ours = fastattn.LSTMCell(9, hidden, device="cuda", dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    theirs64 = copy.deepcopy(theirs).double()
    inputs = [torch.randn(batch, n, device="cuda", dtype=dtype) for n in (9, hidden, hidden)]

    def run(module, tensors):
        x, h, c = (t.detach().requires_grad_() for t in tensors)
        outputs = list(module(x, (h, c)))
        return outputs + list(_grads(outputs, [x, h, c, *module.parameters()], seed=2))

    got = run(ours, inputs)
    ref64 = run(theirs64, [t.double() for t in inputs])
    ref_torch = run(theirs, inputs)
    names = ["hy", "cy", "grad input", "grad hx", "grad cx"] + [
        f"grad {n}" for n, _ in ours.named_parameters()]
    for name, a, r64, rt in zip(names, got, ref64, ref_torch, strict=True):
        assert_close_to_reference(a, r64, rt, name=name)


# Options nn.LSTM lacks (zoneout, reverse alone, batch_sizes with projection) are checked at the
# op level against fastattn.ops.reference's plain-PyTorch loop: float64 on the GPU as the oracle,
# the same loop in the test dtype as "torch's own" error. Without proj, in every dtype but
# float64, the persistent kernels serve them (these sizes fit); with proj, the C++ loop does.
LAYER_OPTIONS = [
    pytest.param(dict(), id="none"),
    pytest.param(dict(reverse=True), id="reverse"),
    pytest.param(dict(proj=3), id="proj"),
    pytest.param(dict(packed=True, reverse=True), id="packed-reverse"),
    pytest.param(dict(zoneout="bernoulli"), id="zoneout-train"),
    pytest.param(dict(zoneout="probability", proj=5, packed=True), id="zoneout-eval-proj-packed"),
    pytest.param(dict(zoneout="bernoulli", proj=4, reverse=True), id="zoneout-proj-reverse"),
    pytest.param(dict(zoneout="probability", packed=True), id="zoneout-eval-packed"),
    pytest.param(dict(zoneout="bernoulli", packed=True, reverse=True), id="zoneout-packed-reverse"),
]


def _layer_inputs(options, seq_len, batch, hidden, dtype):
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to("cuda", dtype)

    proj = options.get("proj")
    width = proj or hidden
    x_proj = rand(seq_len, batch, 4 * hidden, scale=1.5)
    h0, c0 = rand(batch, width), rand(batch, hidden)
    w_hh = rand(4 * hidden, width, scale=width ** -0.5)
    w_hr = rand(proj, hidden, scale=hidden ** -0.5) if proj else None
    batch_sizes = None
    if options.get("packed"):
        batch_sizes = torch.linspace(batch, 1, seq_len).round().long()
    zoneout_c = zoneout_h = None
    if options.get("zoneout") == "bernoulli":
        zoneout_c = torch.bernoulli(torch.full((seq_len, batch, hidden), 0.3), generator=gen)
        zoneout_h = torch.bernoulli(torch.full((seq_len, batch, width), 0.4), generator=gen)
    elif options.get("zoneout") == "probability":
        zoneout_c = torch.full((seq_len, batch, hidden), 0.3)
        zoneout_h = torch.full((seq_len, batch, width), 0.2)
    zoneout_c, zoneout_h = (z if z is None else z.to("cuda", dtype) for z in (zoneout_c, zoneout_h))
    return (x_proj, h0, c0, w_hh, w_hr, batch_sizes, options.get("reverse", False), zoneout_c,
            zoneout_h)


def _layer_outputs_and_grads(fn, args, grad):
    x_proj, h0, c0, w_hh, w_hr, *rest = args
    leaves = [t.detach().requires_grad_(grad) if t is not None else None
              for t in (x_proj, h0, c0, w_hh, w_hr)]
    with torch.set_grad_enabled(grad):
        h_all, c_all = fn(*leaves, *rest)[:2]
    if not grad:
        return [h_all, c_all]
    wanted = [t for t in leaves if t is not None]
    return [h_all, c_all, *_grads([h_all, c_all], wanted, seed=4)]


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("seq_len, batch, hidden", [(1, 1, 1), (5, 7, 33)])
@pytest.mark.parametrize("options", LAYER_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_op_every_option(dtype, options, seq_len, batch, hidden, grad):
    require_kernel("lstm_layer_fwd", "cuda")
    args = _layer_inputs(options, seq_len, batch, hidden, dtype)

    def ours(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zc, zh):
        # Through fastattn.ops.lstm.lstm_layer with an identity input projection, so that the
        # inference path (fastattn::lstm_layer_infer) is the one served without gradients.
        eye = torch.eye(x_proj.shape[-1], device="cuda", dtype=x_proj.dtype)
        return lstm_ops.lstm_layer(x_proj, h0, c0, eye, w_hh, None, None, w_hr,
                                   batch_sizes=batch_sizes, reverse=reverse, zoneout_c=zc,
                                   zoneout_h=zh)

    got = _layer_outputs_and_grads(ours, args, grad)
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_cuda else a for a in args]
    ref64 = _layer_outputs_and_grads(reference.lstm_layer_reference, args64, grad)
    ref_t = _layer_outputs_and_grads(reference.lstm_layer_reference, args, grad)
    names = ["h_all", "c_all", "grad x_proj", "grad h0", "grad c0", "grad w_hh", "grad w_hr"]
    for name, a, r64, rt in zip(names, got, ref64, ref_t, strict=False):
        assert_close_to_reference(a, r64, rt, name=name)


@pytest.mark.gpu
# bf16: gates_all is saved in float32, and the fakes must say so
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_ops_opcheck(dtype):
    """Schemas, fake kernels (dtypes and strides included) and dispatch of the CUDA layer ops."""
    require_kernel("lstm_layer_fwd", "cuda")
    args = _layer_inputs(dict(proj=3, packed=True, zoneout="bernoulli"), 4, 5, 7, dtype)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    ops = torch.ops.fastattn
    torch.library.opcheck(ops.lstm_layer_fwd.default, args, test_utils=utils)
    x_proj, h0, c0, w_hh, w_hr, *rest = args
    h_all, c_all, gates_all, hpre_all = ops.lstm_layer_fwd(*args)
    bwd_args = (torch.randn_like(h_all), torch.randn_like(c_all), h0, c0, w_hh, w_hr, *rest,
                h_all, c_all, gates_all, hpre_all)
    torch.library.opcheck(ops.lstm_layer_bwd.default, bwd_args, test_utils=utils[:2])
    w_ih = torch.randn(28, 6, device="cuda", dtype=dtype)
    infer_args = (torch.randn(4, 5, 6, device="cuda", dtype=dtype), w_ih,
                  torch.randn(28, device="cuda", dtype=dtype), h0, c0, w_hh, w_hr, *rest)
    torch.library.opcheck(ops.lstm_layer_infer.default, infer_args, test_utils=utils[:2])


@pytest.mark.gpu
def test_layer_op_bad_inputs_raise_before_any_kernel():
    require_kernel("lstm_layer_fwd", "cuda")
    x_proj, h0, c0, w_hh, *_ = _layer_inputs(dict(), 3, 4, 5, torch.float32)
    ops = torch.ops.fastattn
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        ops.lstm_layer_fwd(x_proj, h0[:, :2], c0, w_hh, None, None, False, None, None)
    with pytest.raises(RuntimeError, match="c0 must be on"):
        ops.lstm_layer_fwd(x_proj, h0, c0.cpu(), w_hh, None, None, False, None, None)
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        ops.lstm_layer_fwd(x_proj, h0, c0, w_hh, None, torch.tensor([1, 2, 2]), False, None, None)
    with pytest.raises(RuntimeError, match="w_hh must have dtype"):
        ops.lstm_layer_fwd(x_proj, h0, c0, w_hh.double(), None, None, False, None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
def test_lstm_module_under_inductor(grad):
    """fastattn.LSTM on CUDA compiled by Inductor (fullgraph) gives eager's outputs and
    gradients: the ops' fakes (shapes, strides) match what the CUDA kernels return."""
    require_kernel("lstm_layer_fwd", "cuda")
    torch.manual_seed(0)
    lstm = fastattn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, device="cuda")
    x = torch.randn(4, 3, 5, device="cuda")
    compiled = torch.compile(lstm, fullgraph=True)
    with torch.set_grad_enabled(grad):
        got, expected = compiled(x), lstm(x)
    torch.testing.assert_close(got, expected)
    if grad:
        params = list(lstm.parameters())
        compiled_grads = torch.autograd.grad(got[0].sum() + got[1][0].sum(), params)
        eager_grads = torch.autograd.grad(expected[0].sum() + expected[1][0].sum(), params)
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b)
