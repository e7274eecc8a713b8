"""The Triton LSTM ops (the fused pointwise cell, the persistent layer forward and backward)
against float64 plain-PyTorch computations, and fastattn.LSTM on the triton backend against
torch.nn.LSTM.

Runs on CPU tensors under TRITON_INTERPRET=1 (set before Python starts) or on a CUDA GPU:
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python -m pytest tests/test_lstm_triton.py -q
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from tests.helpers import (
    LSTM_LAYER_CASES,
    assert_close_to_reference,
    ln_layer_inputs,
    lstm_layer_inputs,
    poison_,
)
from tests.lstm_math import (
    cancelling_cell_gradient_grads,
    cell_grads,
    cell_math,
    layer_oracles,
    ln_layer_oracles,
)

pytestmark = pytest.mark.triton

pytest.importorskip("triton")  # an optional dependency; our own modules below must import
import fastattn  # noqa: E402
from fastattn.ops import lstm as lstm_ops  # noqa: E402
from fastattn.ops import reference as lib_ref  # noqa: E402
from fastattn.triton_kernels import lstm_cell, lstm_layer  # noqa: E402

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


# ---- the layer ops (fastattn::lstm_layer_fwd_triton / _bwd_triton) -------------------------------

LAYER_DTYPES = [d for d in DTYPES if d.values[0] != torch.float64]
# (T, B, H, P): one step of one row, and odd sizes with a projection narrower than H (P applies
# with the proj option only). float32 runs every option; float16 and bfloat16 (the same kernel
# code, other loads and stores) none and all of them at once; then once, all options in float32
# at the largest served tile with B past one 16-row program. (The interpreter takes ~1.5 s a case.)
_SMALL_SIZES = (((1, 1, 8, 5), "T1-B1-H8"), ((5, 3, 24, 5), "T5-B3-H24"))
_ALL_OPTIONS = LSTM_LAYER_CASES[-1]
LAYER_CASES = [
    pytest.param(torch.float32, c.values[0], sizes, id=f"fp32-{c.id}-{size_id}")
    for c in LSTM_LAYER_CASES for sizes, size_id in _SMALL_SIZES
] + [
    pytest.param(d.values[0], c.values[0], (5, 3, 24, 5), id=f"{d.id}-{c.id}-T5-B3-H24")
    for d in LAYER_DTYPES[1:] for c in (LSTM_LAYER_CASES[0], _ALL_OPTIONS)
] + [pytest.param(torch.float32, _ALL_OPTIONS.values[0], (4, 17, 32, 17),
                  id=f"fp32-{_ALL_OPTIONS.id}-T4-B17-H32-P17")]
# Past 32 the weights are streamed (RESIDENT=False): 32-wide column blocks, the last partial.
# Each option in float32 at H 33 or 40 (the proj case with P 33 > H: streamed for P alone),
# packing within the all-options case (lengths 3, 3, 2); every option at once in bfloat16 and
# none in float16. (The interpreter takes ~1..4 s a case.)
_STREAMED_SIZES = {"plain": (1, 3, 40, 40), "reverse": (1, 1, 33, 33), "proj": (1, 1, 17, 33),
                   "zoneout": (1, 1, 40, 40), _ALL_OPTIONS.id: (3, 3, 33, 17)}
STREAMED_CASES = [
    pytest.param(torch.float32, c.values[0], _STREAMED_SIZES[c.id],
                 id="fp32-{}-T{}-B{}-H{}-P{}".format(c.id, *_STREAMED_SIZES[c.id]))
    for c in LSTM_LAYER_CASES if c.id in _STREAMED_SIZES
] + [pytest.param(torch.bfloat16, _ALL_OPTIONS.values[0], (3, 3, 40, 17),
                  id=f"bf16-{_ALL_OPTIONS.id}-T3-B3-H40-P17"),
     pytest.param(torch.float16, LSTM_LAYER_CASES[0].values[0], (2, 1, 33, 33),
                  id="fp16-plain-T2-B1-H33-P33")]



def _on_device(inputs: tuple) -> tuple:
    """lstm_layer_inputs on DEVICE; batch_sizes stays on the CPU, as the schema wants."""
    return tuple(t.to(DEVICE) if t is not None and t.dim() > 1 else t for t in inputs)


def _layer_case(sizes, dtype, case):
    T, B, H, P = sizes
    P = P if case["proj"] else H
    lengths = case["lengths"]
    if lengths is not None:  # the case's pattern of lengths spread over the batch, sorted
        lengths = sorted((min(lengths[i % len(lengths)], T) for i in range(B)), reverse=True)
    return _on_device(lstm_layer_inputs(T, B, H, P, dtype, proj=case["proj"],
                                        zoneout=case["zoneout"], lengths=lengths))


@pytest.mark.parametrize("dtype, case, sizes", LAYER_CASES + STREAMED_CASES)
def test_layer_matches_float64(dtype, case, sizes):
    """Every output and gradient of every option against float64, errors <= 2x torch's own."""
    inputs = _layer_case(sizes, dtype, case)
    reverse = case["reverse"]
    x_proj, h0, c0, w_hh, w_hr, batch_sizes, zc, zh = inputs
    out = torch.ops.fastattn.lstm_layer_fwd_triton(x_proj, h0, c0, w_hh, w_hr, batch_sizes,
                                                   reverse, zc, zh)
    grad_h_all, grad_c_all = torch.randn_like(out[0]), torch.randn_like(out[1])
    forward64, forward_torch, grads64, grads_torch = layer_oracles(
        inputs, reverse, grad_h_all, grad_c_all)
    grads = torch.ops.fastattn.lstm_layer_bwd_triton(grad_h_all, grad_c_all, h0, c0, w_hh, w_hr,
                                                     batch_sizes, reverse, zc, zh, *out)
    for name, got, want, same_dtype in zip(("h_all", "c_all", "gates_all", "hpre_all"), out,
                                           forward64, forward_torch, strict=True):
        # The gates are saved in float32 (the module doc says why).
        assert got.dtype == (torch.float32 if name == "gates_all" else dtype), name
        assert got.is_contiguous(), name
        assert_close_to_reference(got, want, same_dtype, dtype=dtype, name=name)
    names = ("grad_x_proj", "grad_h0", "grad_c0", "grad_w_hh", "grad_w_hr")
    for name, got, want, same_dtype in zip(names, grads, grads64, grads_torch):
        assert got.dtype == dtype, name
        assert_close_to_reference(got, want, same_dtype, name=name)
    if w_hr is None:
        assert grads[4].numel() == 0 and out[3].numel() == 0


# The backward's cell gradient cancels (tests/lstm_math.py): the kernels once saved the gates
# rounded to bfloat16 / float16 and got grad c0 several percent wrong. On chip and streamed.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H", [(1, 1), (7, 33)], ids=["B1H1", "B7H33-streamed"])
def test_layer_bwd_where_the_cell_gradient_cancels(dtype, B, H):
    x_proj, h0, c0, w_hh, *_ = _layer_case((1, B, H, H), dtype, LSTM_LAYER_CASES[0].values[0])
    grad_h = torch.randn(1, B, H, device=DEVICE).to(dtype)
    got, want, same_dtype = cancelling_cell_gradient_grads(
        lstm_ops._triton_layer_fwd(), x_proj, h0, c0, w_hh, grad_h)
    for name, a, w, r in zip(("grad_x_proj", "grad_h0", "grad_c0", "grad_w_hh"), got, want,
                             same_dtype, strict=True):
        assert_close_to_reference(a, w, r, name=name)


@pytest.mark.parametrize("sizes", [(5, 3, 24, 5), (2, 3, 33, 17)],
                         ids=["T5-B3-H24-P5", "T2-B3-H33-P17-streamed"])
def test_layer_reads_strided_inputs(sizes):
    """Transposed x_proj (batch-major in memory), w_hh, w_hr and states; strided gradients."""
    case = dict(proj=True, zoneout=True, lengths=[5, 4, 2], reverse=True)
    T, B, H, P = sizes
    x_proj, h0, c0, w_hh, w_hr, batch_sizes, zc, zh = _layer_case(sizes, torch.float32, case)
    def batch_major(t):
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    c0_every_other = torch.stack([c0, c0 + 1], dim=-1)[..., 0]  # strides (2H, 2)
    views = (batch_major(x_proj), h0.t().contiguous().t(), c0_every_other,
             w_hh.t().contiguous().t(), w_hr.t().contiguous().t(), batch_sizes, batch_major(zc),
             zh)
    grad_h_all = torch.randn(B, T, P, device=DEVICE).transpose(0, 1)  # [T, B, P], batch-major
    grad_c_all = torch.randn(T, B, 1, device=DEVICE).expand(T, B, H)  # broadcast, as from sum()
    out = torch.ops.fastattn.lstm_layer_fwd_triton(*views[:6], True, *views[6:])
    grads = torch.ops.fastattn.lstm_layer_bwd_triton(grad_h_all, grad_c_all, *views[1:6], True,
                                                     *views[6:], *out)
    plain = (x_proj, h0, c0, w_hh, w_hr, batch_sizes, zc, zh)
    want_out = torch.ops.fastattn.lstm_layer_fwd_triton(*plain[:6], True, *plain[6:])
    want_grads = torch.ops.fastattn.lstm_layer_bwd_triton(
        grad_h_all.contiguous(), grad_c_all.contiguous(), *plain[1:6], True, *plain[6:],
        *want_out)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(grads, want_grads, rtol=1e-6, atol=1e-6)


# 2 programs of 16 rows, the last one partial; on chip, and streamed (2 column blocks of H)
# (whose state scratch is the poisoned grad_h0 / grad_c0) in float32.
WRITE_CASES = [pytest.param(d.values[0], (3, 17, 24, 5), id=f"{d.id}-T3-B17-H24-P5")
               for d in LAYER_DTYPES] + [
    pytest.param(torch.float32, (2, 17, 33, 17), id="fp32-T2-B17-H33-P17")]


@pytest.mark.parametrize("dtype, sizes", WRITE_CASES)
def test_layer_writes_every_element(dtype, sizes):
    """NaN-poisoned outputs of both kernels: an element left unwritten stays NaN and fails."""
    case = dict(proj=True, zoneout=False, lengths=[3, 1], reverse=False)
    T, B, H, P = sizes
    inputs = _layer_case((T, B, H, P), dtype, case)
    x_proj, h0, c0, w_hh, w_hr, batch_sizes, zc, zh = inputs
    out = [poison_(torch.empty(T, B, n, dtype=d, device=DEVICE))
           for n, d in ((P, dtype), (H, dtype), (4 * H, torch.float32), (H, dtype))]
    lstm_layer.lstm_layer_fwd_into(*inputs[:6], False, zc, zh, *out)
    grad_h_all, grad_c_all = torch.randn_like(out[0]), torch.randn_like(out[1])
    forward64, forward_torch, grads64, grads_torch = layer_oracles(
        inputs, False, grad_h_all, grad_c_all)
    for name, got, want, same_dtype in zip(("h_all", "c_all", "gates_all", "hpre_all"), out,
                                           forward64, forward_torch, strict=True):
        assert_close_to_reference(got, want, same_dtype, name=name)

    f32 = dict(dtype=torch.float32, device=DEVICE)
    grad_gates_all, grad_hy_all = poison_(torch.empty(T, B, 4 * H, **f32)), poison_(
        torch.empty(T, B, P, **f32))
    grad_h0, grad_c0 = poison_(torch.empty_like(h0)), poison_(torch.empty_like(c0))
    lstm_layer.lstm_layer_bwd_into(grad_h_all, grad_c_all, c0, w_hh, w_hr, batch_sizes, False, zc,
                                   zh, out[1], out[2], grad_gates_all, grad_h0, grad_c0,
                                   grad_hy_all)
    for name, got, want, same_dtype in (("grad_x_proj", grad_gates_all, grads64[0], grads_torch[0]),
                                        ("grad_h0", grad_h0, grads64[1], grads_torch[1]),
                                        ("grad_c0", grad_c0, grads64[2], grads_torch[2])):
        assert_close_to_reference(got.to(dtype), want, same_dtype, name=name)
    assert not grad_hy_all.isnan().any(), "grad_hy_all (grad_w_hr's input) has unwritten elements"


@pytest.mark.parametrize("H", [8, 33], ids=["H8", "H33-streamed"])
def test_layer_zero_sizes(H):
    for T, B in ((0, 3), (4, 0)):
        x_proj, h0, c0, w_hh, *_ = _on_device(lstm_layer_inputs(
            T, B, H, H, torch.float32, proj=False, zoneout=False, lengths=None))
        out = torch.ops.fastattn.lstm_layer_fwd_triton(x_proj, h0, c0, w_hh, None, None, False,
                                                       None, None)
        assert [tuple(t.shape) for t in out] == [(T, B, H), (T, B, H), (T, B, 4 * H), (0,)]
        grads = torch.ops.fastattn.lstm_layer_bwd_triton(
            torch.ones_like(out[0]), torch.ones_like(out[1]), h0, c0, w_hh, None, None, False,
            None, None, *out)
        assert [tuple(t.shape) for t in grads] == [(T, B, 4 * H), (B, H), (B, H), (4 * H, H),
                                                   (0,)]
        # No step ran: the initial state's gradient is zero, as no output depends on it.
        assert not grads[1].any() and not grads[3].any()


def test_layer_rejects_float64():
    x_proj, h0, c0, w_hh, *_ = _on_device(lstm_layer_inputs(
        2, 3, 8, 8, torch.float64, proj=False, zoneout=False, lengths=None))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.fastattn.lstm_layer_fwd_triton(x_proj, h0, c0, w_hh, None, None, False, None,
                                                 None)


def test_layer_rejects_bad_shapes():
    x_proj, h0, c0, w_hh, *_ = _on_device(lstm_layer_inputs(
        2, 3, 8, 8, torch.float32, proj=False, zoneout=False, lengths=None))
    fwd = torch.ops.fastattn.lstm_layer_fwd_triton
    with pytest.raises(ValueError, match="c0 must have shape"):
        fwd(x_proj, h0, c0[:2], w_hh, None, None, False, None, None)
    with pytest.raises(ValueError, match="w_hh must have shape"):
        fwd(x_proj, h0, c0, w_hh[:, :4], None, None, False, None, None)
    with pytest.raises(ValueError, match=r"x_proj must be \[T, B, 4H\]"):
        fwd(x_proj[..., 1:], h0, c0, w_hh, None, None, False, None, None)
    with pytest.raises(ValueError, match="zoneout_h must have shape"):
        fwd(x_proj, h0, c0, w_hh, None, None, False, None, h0)
    with pytest.raises(ValueError, match="batch_sizes must be an int64 CPU tensor"):
        fwd(x_proj, h0, c0, w_hh, None, torch.tensor([3]), False, None, None)
    with pytest.raises(ValueError, match=r"a projection w_hr \[P, H\] needs H > 0"):
        fwd(x_proj[..., :0], h0[:, :2], c0[:, :0], w_hh[:0, :2], w_hh.new_empty(2, 0), None,
            False, None, None)


def _layer_opcheck_args():
    case = dict(proj=True, zoneout=True, lengths=[3, 2, 2], reverse=True)
    inputs = _layer_case((3, 3, 8, 5), torch.float32, case)
    fwd_args = (*inputs[:6], True, *inputs[6:])
    out = torch.ops.fastattn.lstm_layer_fwd_triton(*fwd_args)
    grads = (torch.randn_like(out[0]), torch.randn_like(out[1]))
    return fwd_args, (*grads, *fwd_args[1:], *out)


@pytest.mark.parametrize("prefix", ["lstm_layer", "lstm_ln_layer"], ids=["plain", "layer_norm"])
def test_layer_opcheck_schema(prefix):
    """Schema consistency (no mutation, no aliasing) and autograd registration of each pair."""
    lstm_ops._triton_layer_fwd()  # registers the autograd
    fwd_args, bwd_args = {"lstm_layer": _layer_opcheck_args, "lstm_ln_layer": _ln_opcheck_args}[
        prefix]()
    utils = ("test_schema", "test_autograd_registration")
    for suffix, args in (("fwd", fwd_args), ("bwd", bwd_args)):
        op = getattr(torch.ops.fastattn, f"{prefix}_{suffix}_triton")
        torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="the Triton interpreter executes kernels on FakeTensors, which cannot work; "
    "fake-tensor tracing is checked when the triton tests run on a GPU",
)
def test_layer_opcheck_fake_tensor():
    """Fake-tensor propagation and AOT dispatch of the layer ops, with and without the LN."""
    lstm_ops._triton_layer_fwd()
    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    for (fwd_args, bwd_args), prefix in ((_layer_opcheck_args(), "lstm_layer"),
                                         (_ln_opcheck_args(), "lstm_ln_layer")):
        torch.library.opcheck(getattr(torch.ops.fastattn, f"{prefix}_fwd_triton"), fwd_args,
                              test_utils=utils)
        torch.library.opcheck(getattr(torch.ops.fastattn, f"{prefix}_bwd_triton"), bwd_args,
                              test_utils=utils)


# ---- the triton backend of fastattn.LSTM against torch.nn.LSTM ----------------------------------

_MODULE_FLAGS = [
    (dict(hidden_size=24, num_layers=2, bidirectional=True, proj_size=3), "L2-bi-H24-P3"),
    (dict(hidden_size=24, num_layers=1, bidirectional=False, proj_size=0, batch_first=True),
     "L1-uni-H24-batch_first"),
]
# Every flag set padded and packed with the weights on chip; packed once with them streamed.
MODULE_CASES = [pytest.param(flags, packed, id=f"{name}-{'packed' if packed else 'padded'}")
                for flags, name in _MODULE_FLAGS for packed in (False, True)] + [
    pytest.param(dict(hidden_size=33, num_layers=1, bidirectional=False, proj_size=17), True,
                 id="L1-uni-H33-P17-packed")]


@pytest.mark.parametrize("flags, packed", MODULE_CASES)
def test_triton_backend_matches_nn_lstm(flags, packed):
    """fastattn.LSTM on the triton backend (the persistent layer kernels) against nn.LSTM:
    output, final states and the gradients of the input, the initial states and every weight."""
    theirs = torch.nn.LSTM(6, **flags).to(DEVICE)
    ours = fastattn.LSTM(6, **flags).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    T, B = 5, 3
    batch_first = flags.get("batch_first", False)
    x = torch.randn(*((B, T) if batch_first else (T, B)), 6, device=DEVICE, requires_grad=True)
    layers = flags["num_layers"] * (2 if flags["bidirectional"] else 1)
    hidden = flags["hidden_size"]
    hx = (torch.randn(layers, B, flags["proj_size"] or hidden, device=DEVICE, requires_grad=True),
          torch.randn(layers, B, hidden, device=DEVICE, requires_grad=True))

    def run(module):
        inp = x
        if packed:
            inp = pack_padded_sequence(x, torch.tensor([5, 4, 2]), batch_first=batch_first)
        out, (h_n, c_n) = module(inp, hx)
        data = out.data if packed else out
        loss = (data * torch.linspace(-1, 1, data.shape[-1], device=DEVICE)).sum() + (
            h_n ** 2).sum() + 0.5 * c_n.sum()
        return (data, h_n, c_n), torch.autograd.grad(loss, [x, *hx, *module.parameters()])

    with fastattn.use_backend("triton"):
        got, got_grads = run(ours)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full float32 on a GPU
        want, want_grads = run(theirs)
    names = ["output", "h_n", "c_n", "grad input", "grad h0", "grad c0"] + [
        f"grad {n}" for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, (*got, *got_grads), (*want, *want_grads), strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor compiles the triton ops for a "
                    "GPU; the interpreter cannot run their kernels on the FakeTensors it traces")
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_triton_backend_compiles_with_inductor(layer_norm):
    """torch.compile of fastattn.LSTM on the triton backend: the same outputs and gradients."""
    torch.manual_seed(0)
    module = fastattn.LSTM(6, 24, proj_size=5, bidirectional=True,
                           layer_norm=layer_norm).to(DEVICE)
    x = torch.randn(5, 3, 6, device=DEVICE, requires_grad=True)
    results = []
    with fastattn.use_backend("triton"):
        for run in (module, torch.compile(module, fullgraph=True, dynamic=False)):
            out, (h_n, c_n) = run(x)
            loss = out.sum() + (h_n ** 2).sum() + c_n.sum()
            results.append((out, h_n, c_n, *torch.autograd.grad(loss, [x, *module.parameters()])))
    torch.testing.assert_close(results[1], results[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cuda_kernels", [True, False], ids=["cuda-built", "triton-only"])
def test_auto_serves_cuda_layers_without_the_python_loop(monkeypatch, cuda_kernels):
    """On CUDA tensors auto takes the cuda backend's C++-loop op where the extension has it
    (first in backends.choose's order, whatever H), else the triton kernels, which serve any H
    and P, with or without the LayerNorm: never the reference backend's Python time loop.
    Metadata only (no GPU needed)."""
    from fastattn.ops import backends

    monkeypatch.setattr(backends, "_status", lambda name: backends.BackendStatus(True, True, ""))
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    monkeypatch.setattr(lstm_ops, "_has_kernel", lambda op, key: cuda_kernels or key != "CUDA")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layer_norm in (False, True):
            got = lstm_ops._choose_backend("lstm_layer", torch.device("cuda"), dtype, layer_norm)
            assert got == ("cuda" if cuda_kernels else "triton"), (dtype, layer_norm)


# ---- the LayerNorm-LSTM layer ops (fastattn::lstm_ln_layer_fwd_triton / _bwd_triton) ------------

LN_EPS = 1e-5
_LN_OPTIONS = {c.id: c.values[0] for c in LSTM_LAYER_CASES}
# (dtype, option case, (T, B, H, P)): H 1 and 7 on chip (P 5 < H), H 33 streamed (P 17 < H), and
# H 1 and 7 streamed for P 33 > H alone; T 1 to 5, B 1 and 3 (packed: lengths 5, 4, 2 cut at T);
# every option at once in each dtype, each path. (The interpreter takes ~1..5 s a case.)
LN_CASES = [
    pytest.param(dtype, _LN_OPTIONS[option], sizes,
                 id="{}-{}-T{}-B{}-H{}-P{}".format(dtype_id, option, *sizes))
    for dtype, dtype_id, option, sizes in (
        (torch.float32, "fp32", "plain", (1, 1, 1, 1)),
        (torch.float32, "fp32", _ALL_OPTIONS.id, (5, 3, 7, 5)),
        (torch.bfloat16, "bf16", _ALL_OPTIONS.id, (5, 3, 7, 5)),
        (torch.float16, "fp16", _ALL_OPTIONS.id, (2, 3, 7, 5)),
        (torch.float32, "fp32", "proj", (1, 1, 1, 33)),
        (torch.float32, "fp32", _ALL_OPTIONS.id, (2, 3, 7, 33)),
        (torch.float32, "fp32", _ALL_OPTIONS.id, (3, 3, 33, 17)),
        (torch.bfloat16, "bf16", _ALL_OPTIONS.id, (2, 3, 33, 17)),
        (torch.float16, "fp16", "zoneout", (2, 1, 33, 33)),
    )
]
_LN_FORWARD = ("h_all", "c_all", "gates_all", "hpre_all", "hh_norm_all", "c_norm_all",
               "rstd_all")
_LN_GRADS = ("grad_x_proj", "grad_h0", "grad_c0", "grad_w_hh", "grad_ln_hh_weight",
             "grad_ln_c_weight", "grad_ln_c_bias", "grad_w_hr")


def _ln_case(sizes, dtype, case):
    """ln_layer_inputs on DEVICE (batch_sizes on the CPU); P applies with the proj option. The
    LN weights are stride-2 views: the ops must not assume contiguous ones."""
    T, B, H, P = sizes
    x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = ln_layer_inputs(
        T, B, H, P, dtype, proj=case["proj"], zoneout=case["zoneout"], lengths=case["lengths"])
    x_proj, h0, c0, w_hh, w_hr, zc, zh = _on_device((x_proj, h0, c0, w_hh, w_hr, zc, zh))
    ln = tuple(torch.stack([t, t + 1], dim=-1).to(DEVICE)[..., 0] for t in ln)
    return x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh


def _cpu(inputs):
    return tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs)


@pytest.mark.parametrize("dtype, case, sizes", LN_CASES)
def test_ln_layer_matches_float64_and_the_cpu_op(dtype, case, sizes):
    """Every output, saved row and gradient of the LN ops against float64 (errors <= 2x those
    of the reference at the same dtype) and against the CPU LN op (fastattn::lstm_ln_layer_*),
    where the extension is built."""
    inputs = _ln_case(sizes, dtype, case)
    x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = inputs
    reverse = case["reverse"]
    out = torch.ops.fastattn.lstm_ln_layer_fwd_triton(x_proj, h0, c0, w_hh, *ln, LN_EPS, w_hr,
                                                      batch_sizes, reverse, zc, zh)
    grad_h_all, grad_c_all = torch.randn_like(out[0]), torch.randn_like(out[1])
    grads = torch.ops.fastattn.lstm_ln_layer_bwd_triton(
        grad_h_all, grad_c_all, h0, c0, w_hh, *ln, w_hr, batch_sizes, reverse, zc, zh, *out)
    forward64, forward_torch, saved64, grads64, grads_torch = ln_layer_oracles(
        _cpu(inputs), reverse, LN_EPS, grad_h_all.cpu(), grad_c_all.cpu())
    assert [t.dtype for t in out] == [dtype, dtype, torch.float32, dtype] + [torch.float32] * 3
    assert [t.dtype for t in grads] == [dtype] * 8
    if w_hr is None:
        assert out[3].numel() == 0 and grads[7].numel() == 0
    names, ours = _LN_FORWARD + _LN_GRADS, (*out, *grads)
    wanted64 = (*forward64, *saved64, *grads64)  # grads64 lacks grad_w_hr without w_hr
    for name, got, want, same_dtype in zip(names, ours, wanted64,
                                           (*forward_torch, None, None, None, *grads_torch)):
        assert got.is_contiguous(), name
        assert_close_to_reference(got.cpu(), want, same_dtype, dtype=dtype, name=name)
    if not fastattn.backends()["cpu"].usable:
        return  # a build without the CPU kernels: the float64 checks above are the test
    cpu_inputs = _cpu(inputs)
    cpu_out = torch.ops.fastattn.lstm_ln_layer_fwd(*cpu_inputs[:4], *cpu_inputs[4], LN_EPS,
                                                   *cpu_inputs[5:7], reverse, *cpu_inputs[7:])
    cpu_grads = torch.ops.fastattn.lstm_ln_layer_bwd(
        grad_h_all.cpu(), grad_c_all.cpu(), *cpu_inputs[1:4], *cpu_inputs[4], *cpu_inputs[5:7],
        reverse, *cpu_inputs[7:], *cpu_out)
    # The CPU op as the same-dtype baseline: errors vs float64 <= 2x its own, plus the floor.
    for name, got, want, cpu in zip(names, ours, wanted64, (*cpu_out, *cpu_grads)):
        assert_close_to_reference(got.cpu(), want, cpu, dtype=dtype,
                                  name=f"{name} (against the CPU op's error)")


# 2 programs of 16 rows, the last one partial, packed; on chip and streamed, in float32.
LN_WRITE_CASES = [pytest.param((2, 17, 7, 5), id="T2-B17-H7-P5"),
                  pytest.param((2, 17, 33, 17), id="T2-B17-H33-P17-streamed")]


@pytest.mark.parametrize("sizes", LN_WRITE_CASES)
def test_ln_layer_writes_every_element(sizes):
    """NaN-poisoned outputs and scratch of both kernels: an element left unwritten stays NaN."""
    T, B, H, P = sizes
    case = dict(proj=True, zoneout=True, lengths=[T] * 9 + [1] * (B - 9), reverse=False)
    inputs = _ln_case(sizes, torch.float32, case)
    x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = inputs
    f32 = dict(dtype=torch.float32, device=DEVICE)
    out = [poison_(torch.empty(T, B, n, **f32)) for n in (P, H, 4 * H, H, 4 * H, H, 2)]
    lstm_layer.lstm_layer_fwd_into(x_proj, h0, c0, w_hh, w_hr, batch_sizes, False, zc, zh,
                                   *out[:4], layer_norm=(*ln, LN_EPS), ln_saved=out[4:])
    grad_h_all, grad_c_all = torch.randn_like(out[0]), torch.randn_like(out[1])
    forward64, forward_torch, saved64, grads64, grads_torch = ln_layer_oracles(
        _cpu(inputs), False, LN_EPS, grad_h_all.cpu(), grad_c_all.cpu())
    for name, got, want, same_dtype in zip(_LN_FORWARD, out, (*forward64, *saved64),
                                           (*forward_torch, None, None, None), strict=True):
        assert_close_to_reference(got.cpu(), want, same_dtype, name=name)

    grad_gates_all, grad_hh_all = (poison_(torch.empty(T, B, 4 * H, **f32)) for _ in range(2))
    grad_c_new_all, grad_hy_all = poison_(torch.empty(T, B, H, **f32)), poison_(
        torch.empty(T, B, P, **f32))
    grad_h0, grad_c0 = poison_(torch.empty_like(h0)), poison_(torch.empty_like(c0))
    lstm_layer.lstm_layer_bwd_into(grad_h_all, grad_c_all, c0, w_hh, w_hr, batch_sizes, False, zc,
                                   zh, out[1], out[2], grad_gates_all, grad_h0, grad_c0,
                                   grad_hy_all, layer_norm=ln, ln_saved=out[4:],
                                   ln_grads=(grad_hh_all, grad_c_new_all))
    for name, got, want, same_dtype in (("grad_x_proj", grad_gates_all, grads64[0], grads_torch[0]),
                                        ("grad_h0", grad_h0, grads64[1], grads_torch[1]),
                                        ("grad_c0", grad_c0, grads64[2], grads_torch[2])):
        assert_close_to_reference(got.cpu(), want, same_dtype, name=name)
    for name, scratch in (("grad_hh_all", grad_hh_all), ("grad_c_new_all", grad_c_new_all),
                          ("grad_hy_all", grad_hy_all)):  # the weight gradients' inputs
        assert not scratch.isnan().any(), f"{name} has unwritten elements"


def _ln_opcheck_args():
    case = dict(proj=True, zoneout=True, lengths=[3, 2, 2], reverse=True)
    x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = _ln_case((3, 3, 8, 5), torch.float32,
                                                                   case)
    fwd_args = (x_proj, h0, c0, w_hh, *ln, LN_EPS, w_hr, batch_sizes, True, zc, zh)
    out = torch.ops.fastattn.lstm_ln_layer_fwd_triton(*fwd_args)
    grads = (torch.randn_like(out[0]), torch.randn_like(out[1]))
    return fwd_args, (*grads, *fwd_args[1:7], *fwd_args[8:], *out)


@pytest.mark.parametrize("H", [8, 33], ids=["H8", "H33-streamed"])
def test_ln_layer_zero_sizes(H):
    for T, B in ((0, 3), (4, 0)):
        x_proj, h0, c0, w_hh, ln, *_ = _ln_case((T, B, H, H), torch.float32, _LN_OPTIONS["plain"])
        out = torch.ops.fastattn.lstm_ln_layer_fwd_triton(x_proj, h0, c0, w_hh, *ln, LN_EPS,
                                                          None, None, False, None, None)
        assert [tuple(t.shape) for t in out] == [(T, B, H), (T, B, H), (T, B, 4 * H), (0,),
                                                 (T, B, 4 * H), (T, B, H), (T, B, 2)]
        grads = torch.ops.fastattn.lstm_ln_layer_bwd_triton(
            torch.ones_like(out[0]), torch.ones_like(out[1]), h0, c0, w_hh, *ln, None, None,
            False, None, None, *out)
        assert [tuple(t.shape) for t in grads] == [(T, B, 4 * H), (B, H), (B, H), (4 * H, H),
                                                   (4 * H,), (H,), (H,), (0,)]
        # No step ran: no output depends on the initial state or the weights.
        assert not any(g.any() for g in grads[1:])


def test_ln_layer_rejects_bad_arguments():
    x_proj, h0, c0, w_hh, ln, *_ = _ln_case((2, 3, 8, 8), torch.float32, _LN_OPTIONS["plain"])
    fwd = torch.ops.fastattn.lstm_ln_layer_fwd_triton
    with pytest.raises(ValueError, match=r"ln_hh_weight must be a torch.float32 tensor of shape "
                                         r"\[32\]"):
        fwd(x_proj, h0, c0, w_hh, ln[0][:8], *ln[1:], LN_EPS, None, None, False, None, None)
    with pytest.raises(ValueError, match="ln_c_bias must be a torch.float32 tensor"):
        fwd(x_proj, h0, c0, w_hh, *ln[:2], ln[2].half(), LN_EPS, None, None, False, None, None)
    out = fwd(x_proj, h0, c0, w_hh, *ln, LN_EPS, None, None, False, None, None)
    grads = (torch.ones_like(out[0]), torch.ones_like(out[1]))
    bwd = torch.ops.fastattn.lstm_ln_layer_bwd_triton
    with pytest.raises(TypeError, match="rstd_all must be float32"):
        bwd(*grads, h0, c0, w_hh, *ln, None, None, False, None, None, *out[:6], out[6].half())
    with pytest.raises(ValueError, match=r"c_norm_all must have shape \[2, 3, 8\]"):
        bwd(*grads, h0, c0, w_hh, *ln, None, None, False, None, None, *out[:5], out[5][:1],
            out[6])
