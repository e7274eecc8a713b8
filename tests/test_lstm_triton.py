"""The Triton fused pointwise LSTM cell ops against a float64 plain-PyTorch computation.

Runs on CPU tensors under TRITON_INTERPRET=1 (set before Python starts) or on a CUDA GPU:
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python -m pytest tests/test_lstm_triton.py -q
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import assert_close_to_reference, poison_
from tests.lstm_math import cell_grads, cell_math, sequence_inputs, sequence_math

pytestmark = pytest.mark.triton

pytest.importorskip("triton")  # an optional dependency; our own modules below must import
from fastattn.ops import reference as lib_ref  # noqa: E402
from fastattn.triton_kernels import lstm_cell, lstm_sequence  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
# Every size contiguous; transposed / sliced input views at B = 7 for every H.
CASES = [
    pytest.param(b, h, False, id=f"B{b}-H{h}") for b in (1, 7, 33) for h in (1, 7, 33, 100)
] + [pytest.param(7, h, True, id=f"B7-H{h}-strided") for h in (1, 7, 33, 100)]


def make_inputs(batch: int, hidden: int, dtype: torch.dtype, *, strided: bool):
    """Fresh random gates [B, 4H], cx [B, H]; `strided` gives transposed / sliced views."""
    if strided:
        gates = (2 * torch.randn(4 * hidden, batch, dtype=dtype, device=DEVICE)).t()
        cx = torch.randn(batch, 2 * hidden, dtype=dtype, device=DEVICE)[:, ::2]
        assert not gates.is_contiguous() or batch == 1
        assert not cx.is_contiguous() or hidden == 1
    else:
        gates = 2 * torch.randn(batch, 4 * hidden, dtype=dtype, device=DEVICE)
        cx = torch.randn(batch, hidden, dtype=dtype, device=DEVICE)
    return gates, cx


@pytest.mark.parametrize("batch, hidden, strided", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_float64(dtype, batch, hidden, strided):
    gates, cx = make_inputs(batch, hidden, dtype, strided=strided)
    hy, cy = torch.ops.fastattn.lstm_cell_pointwise_fwd_triton(gates, cx)
    assert hy.dtype == dtype and cy.dtype == dtype
    assert hy.shape == (batch, hidden) and cy.shape == (batch, hidden)

    hy64, cy64 = cell_math(gates.double(), cx.double())
    hy_torch, cy_torch = cell_math(gates, cx)
    assert_close_to_reference(hy, hy64, hy_torch, name="hy")
    assert_close_to_reference(cy, cy64, cy_torch, name="cy")


@pytest.mark.parametrize("batch, hidden, strided", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_float64_autograd(dtype, batch, hidden, strided):
    gates, cx = make_inputs(batch, hidden, dtype, strided=strided)
    _, grad_hy = make_inputs(batch, hidden, dtype, strided=strided)  # strided like cx
    grad_cy = torch.randn(batch, hidden, dtype=dtype, device=DEVICE)
    _, cy = cell_math(gates, cx)
    grad_gates, grad_cx = torch.ops.fastattn.lstm_cell_pointwise_bwd_triton(
        grad_hy, grad_cy, gates, cx, cy
    )
    assert grad_gates.dtype == dtype and grad_gates.shape == (batch, 4 * hidden)
    assert grad_cx.dtype == dtype and grad_cx.shape == (batch, hidden)

    # The kernel is given cy rounded to `dtype`; the float64 oracle recomputes it exactly,
    # and torch's own low-precision autograd sees the same rounding the kernel does.
    grad_gates64, grad_cx64 = cell_grads(gates, cx, grad_hy, grad_cy, torch.float64)
    grad_gates_torch, grad_cx_torch = cell_grads(gates, cx, grad_hy, grad_cy, dtype)
    assert_close_to_reference(grad_gates, grad_gates64, grad_gates_torch, name="grad_gates")
    assert_close_to_reference(grad_cx, grad_cx64, grad_cx_torch, name="grad_cx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_output_element_is_written(dtype):
    """NaN-poisoned outputs: an element a kernel forgets to write stays NaN and fails."""
    batch, hidden = 33, 100  # 3300 elements: 4 blocks of 1024, the last one partial
    gates, cx = make_inputs(batch, hidden, dtype, strided=False)
    hy = poison_(torch.empty(batch, hidden, dtype=dtype, device=DEVICE))
    cy = poison_(torch.empty_like(hy))
    lstm_cell.lstm_cell_pointwise_fwd_into(gates, cx, hy, cy)
    hy64, cy64 = cell_math(gates.double(), cx.double())
    assert_close_to_reference(hy, hy64, cell_math(gates, cx)[0], name="hy")
    assert_close_to_reference(cy, cy64, cell_math(gates, cx)[1], name="cy")

    grad_hy, grad_cy = torch.randn_like(cx), torch.randn_like(cx)
    grad_gates = poison_(torch.empty(batch, 4 * hidden, dtype=dtype, device=DEVICE))
    grad_cx = poison_(torch.empty_like(cx))
    lstm_cell.lstm_cell_pointwise_bwd_into(grad_hy, grad_cy, gates, cx, cy, grad_gates, grad_cx)
    expected64 = cell_grads(gates, cx, grad_hy, grad_cy, torch.float64)
    expected_torch = cell_grads(gates, cx, grad_hy, grad_cy, dtype)
    assert_close_to_reference(grad_gates, expected64[0], expected_torch[0], name="grad_gates")
    assert_close_to_reference(grad_cx, expected64[1], expected_torch[1], name="grad_cx")


def test_saturated_gates_stay_finite():
    """Large pre-activations saturate sigmoid/tanh instead of overflowing into NaN."""
    gates = torch.tensor([[-200.0, 200.0, -90.0, 90.0, 60.0, -60.0, 1e4, -1e4]], device=DEVICE)
    cx = torch.tensor([[3.0, -3.0]], device=DEVICE)
    hy, cy = torch.ops.fastattn.lstm_cell_pointwise_fwd_triton(gates, cx)
    hy64, cy64 = cell_math(gates.double(), cx.double())
    torch.testing.assert_close(hy.double(), hy64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cy.double(), cy64, rtol=1e-6, atol=1e-7)
    grads = torch.ops.fastattn.lstm_cell_pointwise_bwd_triton(
        torch.ones_like(cx), torch.ones_like(cx), gates, cx, cy
    )
    expected = cell_grads(gates, cx, torch.ones_like(cx), torch.ones_like(cx), torch.float64)
    for actual, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(actual.double(), reference, rtol=1e-6, atol=1e-7)


def test_empty_batch():
    gates = torch.randn(0, 12, device=DEVICE)
    cx = torch.randn(0, 3, device=DEVICE)
    hy, cy = torch.ops.fastattn.lstm_cell_pointwise_fwd_triton(gates, cx)
    assert hy.shape == (0, 3) and cy.shape == (0, 3)


@pytest.mark.parametrize(
    "gates_shape, cx_shape, cx_dtype, error, match",
    [
        pytest.param((3, 10), (3, 2), torch.float32, ValueError, "gates must", id="gates-not-4H"),
        pytest.param((3, 8), (3, 3), torch.float32, ValueError, "cx must be", id="cx-wrong-H"),
        pytest.param((3, 8), (4, 2), torch.float32, ValueError, "cx must be", id="cx-wrong-B"),
        pytest.param((3, 8), (3, 2), torch.float64, TypeError, "cx has dtype", id="cx-dtype"),
    ],
)
def test_bad_inputs_raise_before_launch(gates_shape, cx_shape, cx_dtype, error, match):
    gates = torch.randn(gates_shape, device=DEVICE)
    cx = torch.randn(cx_shape, dtype=cx_dtype, device=DEVICE)
    with pytest.raises(error, match=match):
        torch.ops.fastattn.lstm_cell_pointwise_fwd_triton(gates, cx)


def test_bad_gradient_shape_raises():
    gates, cx = make_inputs(3, 5, torch.float32, strided=False)
    with pytest.raises(ValueError, match="grad_hy must be"):
        torch.ops.fastattn.lstm_cell_pointwise_bwd_triton(
            torch.randn(3, 4, device=DEVICE), cx, gates, cx, cx
        )


def test_integer_gates_rejected():
    with pytest.raises(TypeError, match="gates must be float16"):
        torch.ops.fastattn.lstm_cell_pointwise_fwd_triton(
            torch.ones(2, 8, dtype=torch.int32, device=DEVICE),
            torch.ones(2, 2, dtype=torch.int32, device=DEVICE),
        )


def _opcheck_both(test_utils: tuple[str, ...]) -> None:
    gates, cx = make_inputs(5, 7, torch.float32, strided=True)
    torch.library.opcheck(
        torch.ops.fastattn.lstm_cell_pointwise_fwd_triton, (gates, cx), test_utils=test_utils
    )
    _, cy = cell_math(gates, cx)
    grads = (torch.randn_like(cx), torch.randn_like(cx))
    torch.library.opcheck(
        torch.ops.fastattn.lstm_cell_pointwise_bwd_triton, (*grads, gates, cx, cy),
        test_utils=test_utils,
    )


def test_opcheck_schema():
    """Schema consistency (no mutation, no aliasing) and autograd registration of both ops."""
    _opcheck_both(("test_schema", "test_autograd_registration"))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="the Triton interpreter executes kernels on FakeTensors, which cannot work; "
    "fake-tensor tracing is checked when the triton tests run on a GPU",
)
def test_opcheck_fake_tensor():
    """Fake-tensor (meta) propagation and AOT dispatch of both ops."""
    _opcheck_both(("test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_library_reference(dtype):
    """Agreement with fastattn.ops.reference's LSTM pointwise functions (same rounding)."""
    gates, cx = make_inputs(7, 33, dtype, strided=True)
    grad_hy, grad_cy = torch.randn_like(cx), torch.randn_like(cx)
    ours = torch.ops.fastattn.lstm_cell_pointwise_fwd_triton(gates, cx)
    ours += torch.ops.fastattn.lstm_cell_pointwise_bwd_triton(grad_hy, grad_cy, gates, cx, ours[1])
    theirs = lib_ref.lstm_cell_pointwise_fwd_reference(gates, cx)
    theirs += lib_ref.lstm_cell_pointwise_bwd_reference(grad_hy, grad_cy, gates, cx, ours[1])
    for actual, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(actual, expected)


SEQUENCE_DTYPES = [d for d in DTYPES if d.values[0] != torch.float64]
SEQUENCE_CASES = [
    pytest.param(5, b, h, False, id=f"T5-B{b}-H{h}") for b in (1, 7, 33) for h in (1, 7, 33, 64)
] + [
    pytest.param(1, 7, 7, False, id="T1-B7-H7"),
    pytest.param(4, 7, 33, True, id="T4-B7-H33-strided"),
]


@pytest.mark.parametrize("seq_len, batch, hidden, strided", SEQUENCE_CASES)
@pytest.mark.parametrize("dtype", SEQUENCE_DTYPES)
def test_sequence_forward_matches_float64(dtype, seq_len, batch, hidden, strided):
    inputs = sequence_inputs(seq_len, batch, hidden, dtype, DEVICE)
    if strided:  # batch-major x_proj seen as [T, B, 4H]; transposed w_hh; sliced states
        x_proj, h0, c0, w_hh = inputs
        x_proj = x_proj.transpose(0, 1).contiguous().transpose(0, 1)
        w_hh = w_hh.t().contiguous().t()
        h0 = torch.cat([h0, torch.randn_like(h0)], dim=1)[:, :hidden]
        inputs = (x_proj, h0, c0.t().contiguous().t(), w_hh)
    outputs = torch.ops.fastattn.lstm_sequence_fwd_triton(*inputs)
    expected64 = sequence_math(*(t.double() for t in inputs))
    expected_torch = sequence_math(*inputs)
    for name, actual, ref64, ref_torch in zip(
        ("h_all", "c_all", "gates_all"), outputs, expected64, expected_torch, strict=True
    ):
        assert actual.dtype == dtype
        assert_close_to_reference(actual, ref64, ref_torch, name=name)


@pytest.mark.parametrize("dtype", SEQUENCE_DTYPES)
def test_sequence_writes_every_element(dtype):
    seq_len, batch, hidden = 3, 17, 33  # 2 programs of 16 rows, the last one partial
    inputs = sequence_inputs(seq_len, batch, hidden, dtype, DEVICE)
    h_all = poison_(torch.empty(seq_len, batch, hidden, dtype=dtype, device=DEVICE))
    c_all = poison_(torch.empty_like(h_all))
    gates_all = poison_(torch.empty(seq_len, batch, 4 * hidden, dtype=dtype, device=DEVICE))
    lstm_sequence.lstm_sequence_fwd_into(*inputs, h_all, c_all, gates_all)
    expected64 = sequence_math(*(t.double() for t in inputs))
    expected_torch = sequence_math(*inputs)
    for actual, ref64, ref_torch in zip(
        (h_all, c_all, gates_all), expected64, expected_torch, strict=True
    ):
        assert_close_to_reference(actual, ref64, ref_torch)


@pytest.mark.parametrize(
    "hidden, dtype, error, match",
    [
        pytest.param(65, torch.float32, ValueError, "hidden sizes 1..64", id="H-too-large"),
        pytest.param(8, torch.float64, TypeError, "float32, float16 or bfloat16", id="fp64"),
    ],
)
def test_sequence_rejects_unserved_inputs(hidden, dtype, error, match):
    with pytest.raises(error, match=match):
        torch.ops.fastattn.lstm_sequence_fwd_triton(*sequence_inputs(2, 3, hidden, dtype, DEVICE))


def test_sequence_rejects_bad_shapes():
    x_proj, h0, c0, w_hh = sequence_inputs(2, 3, 8, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="c0 must have shape"):
        torch.ops.fastattn.lstm_sequence_fwd_triton(x_proj, h0, c0[:2], w_hh)
    with pytest.raises(ValueError, match="w_hh must have shape"):
        torch.ops.fastattn.lstm_sequence_fwd_triton(x_proj, h0, c0, w_hh[:, :4])
    with pytest.raises(ValueError, match=r"x_proj must be \[T, B, 4H\]"):
        torch.ops.fastattn.lstm_sequence_fwd_triton(x_proj[..., 1:], h0, c0, w_hh)
