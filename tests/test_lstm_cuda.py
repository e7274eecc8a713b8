"""The compiled LSTM ops (fastattn::lstm_cell_pointwise_fwd/_bwd, fastattn::lstm_sequence_fwd)
against float64 plain-PyTorch computations of the same math.

One test body per op, parametrized over device: the ``cuda`` cases (csrc/lstm/*.cu) are marked
``gpu`` and run on a GPU; the ``cpu`` cases exercise the C++ CPU kernels of the same ops. A
missing op or CPU kernel fails; only the ``cuda`` cases of a build without CUDA skip.
"""

from __future__ import annotations

import pytest
import torch

from fastattn import _extension
from fastattn.ops import lstm as _lstm_ops  # noqa: F401  (registers the fake kernels)
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
    assert h_all.dtype == c_all.dtype == gates_all.dtype == dtype

    expected64 = sequence_math(*(t.double() for t in inputs))
    expected_torch = sequence_math(*inputs)
    for name, actual, ref64, ref_torch in zip(
        ("h_all", "c_all", "gates_all"), (h_all, c_all, gates_all), expected64, expected_torch,
        strict=True,
    ):
        assert_close_to_reference(actual, ref64, ref_torch, name=name)


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
