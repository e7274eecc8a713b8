"""fastattn::lstm_* ops: the CPU kernels against the plain-PyTorch reference, opcheck, gradcheck."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPE_RTOL, LSTM_LAYER_CASES, assert_close_to_reference, nan_heap, randn
from helpers import lstm_layer_inputs as _layer_inputs
from lstm_math import cancelling_cell_gradient_grads

import fastattn
from fastattn.ops import lstm as lstm_ops
from fastattn.ops import reference

OPS = torch.ops.fastattn
# fastattn::lstm_step_gates runs its GEMV-style kernel for float32 batches below this (64 on
# avx512, 16 on avx2, 0 where it has no kernel: ATEN_CPU_CAPABILITY=default), two GEMMs above.
GEMV_BELOW = fastattn._extension.C.cpu_lstm_step_gates_below() if fastattn._extension.C else 0
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16"]
needs_cpu_kernels = pytest.mark.skipif(
    not fastattn.backends()["cpu"].usable, reason="fastattn._C (CPU kernels) is not built")


# ---- cell pointwise ops ------------------------------------------------------------------------


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,H", [(1, 1), (7, 33), (5, 64)], ids=["B1H1", "B7H33", "B5H64"])
def test_cell_pointwise_matches_reference(dtype, B, H):
    gates, cx = randn(B, 4 * H, dtype=dtype, scale=2), randn(B, H, dtype=dtype)
    nan_heap((B, H), dtype=dtype)
    hy, cy = OPS.lstm_cell_pointwise_fwd(gates, cx)
    hy64, cy64 = reference.lstm_cell_pointwise_fwd_reference(gates.double(), cx.double())
    hy_t, cy_t = reference.lstm_cell_pointwise_fwd_reference(gates, cx)
    assert_close_to_reference(hy, hy64, hy_t, name="hy")
    assert_close_to_reference(cy, cy64, cy_t, name="cy")

    grad_hy, grad_cy = randn(B, H, dtype=dtype), randn(B, H, dtype=dtype)
    nan_heap((B, 4 * H), (B, H), dtype=dtype)
    grad_gates, grad_cx = OPS.lstm_cell_pointwise_bwd(grad_hy, grad_cy, gates, cx, cy)
    # float64 oracle: autograd through the reference forward
    g64, c64 = gates.double().requires_grad_(), cx.double().requires_grad_()
    h_ref, c_ref = reference.lstm_cell_pointwise_fwd_reference(g64, c64)
    want_gates, want_cx = torch.autograd.grad(
        (h_ref * grad_hy.double()).sum() + (c_ref * grad_cy.double()).sum(), (g64, c64))
    ref_gates, ref_cx = reference.lstm_cell_pointwise_bwd_reference(grad_hy, grad_cy, gates, cx, cy)
    assert_close_to_reference(grad_gates, want_gates, ref_gates, name="grad_gates")
    assert_close_to_reference(grad_cx, want_cx, ref_cx, name="grad_cx")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saturated_gates_keep_their_relative_accuracy(dtype):
    # Input, forget and output gates far below zero (sigmoid 1e-11 .. 7e-3), as a trained
    # network's closed gates are: hy = o * tanh(f * cx + i * g) is then tiny, and every element
    # (of hy, cy and the gates' gradients) must keep the dtype's relative accuracy, as torch's
    # sigmoid does. (An exp-free (1 + tanh(x / 2)) / 2 was off by half an ulp of 1 in absolute
    # terms: 3e-4 relative at -10, 0 instead of 1e-7 below -16.) The ranges keep every sum clear
    # of cancellation: |f * cx| < 1e-8 against |i * g| > 3e-6 in cy, and grad_cy >= 1 against
    # grad_hy * o < 0.03 in the cell's gradient; |g| <= 1.5 keeps tanh's derivative 1 - tanh(g)^2
    # from multiplying tanh's own relative error (by 2 tanh / (1 - tanh^2): 200x at |g| = 3).
    B, H = 5, 37
    gen = torch.Generator().manual_seed(7)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(B, H, generator=gen)

    i, f, o = uniform(-12, -5), uniform(-25, -20), uniform(-25, -5)
    g = uniform(0.5, 1.5) * torch.where(torch.rand(B, H, generator=gen) < 0.5, -1.0, 1.0)
    gates = torch.cat([i, f, g, o], dim=1).to(dtype)
    cx = uniform(-3, 3).to(dtype)
    grad_hy, grad_cy = uniform(-1, 1).to(dtype), uniform(1, 2).to(dtype)
    hy, cy = OPS.lstm_cell_pointwise_fwd(gates, cx)
    grad_gates, _ = OPS.lstm_cell_pointwise_bwd(grad_hy, grad_cy, gates, cx, cy)
    g64 = gates.double().requires_grad_()
    hy64, cy64 = reference.lstm_cell_pointwise_fwd_reference(g64, cx.double())
    (want_gates,) = torch.autograd.grad(
        (hy64 * grad_hy.double()).sum() + (cy64 * grad_cy.double()).sum(), g64)
    rtol = DTYPE_RTOL[dtype]
    for name, got, want in (("hy", hy, hy64), ("cy", cy, cy64),
                            ("grad_gates", grad_gates, want_gates)):
        want = want.detach()
        assert (want != 0).all(), name
        rel = ((got.double() - want) / want).abs().max().item()
        assert rel <= rtol, f"{name}: elementwise relative error {rel:.2e} > {rtol:.0e}"


@needs_cpu_kernels
def test_tanh_is_rounded_as_torchs():
    # The cell's float tanh against torch.tanh, both against float64, over a dense sweep: cy is
    # i * g + f * cx = tanh(g) exactly with i = sigmoid(40) = 1 and cx = 0, and with grad_cy = 1
    # the gradient reaching g is 1 - tanh(g)^2, whose relative error near saturation is
    # tanh's absolute error times 2 tanh / (1 - tanh^2) (200x at |g| = 3). Neither may be more
    # than 2x torch's own error: the exp-free rational tanh this replaced failed both (4.5x and
    # 6.6x).
    g = torch.cat([torch.linspace(-12, 12, 48001), torch.logspace(-6, 0, 2001),
                   torch.tensor([30.0, -100.0, float("inf"), -float("inf")])])
    H = g.numel()
    gates = torch.cat([torch.full((1, H), 40.0), torch.full((1, H), -3.0), g[None],
                       torch.full((1, H), 40.0)], dim=1)
    cx = torch.zeros(1, H)
    _, cy = OPS.lstm_cell_pointwise_fwd(gates, cx)
    grad_gates, _ = OPS.lstm_cell_pointwise_bwd(torch.zeros(1, H), torch.ones(1, H), gates, cx, cy)
    grad_g = grad_gates[0, 2 * H:3 * H]
    want = torch.tanh(g.double())
    want_grad = 1 - want ** 2
    g32 = g.clone().requires_grad_()
    torch_tanh = torch.tanh(g32)
    (torch_grad,) = torch.autograd.grad(torch_tanh.sum(), g32)

    def rel(got, ref, where):
        return ((got.double() - ref) / ref).abs()[where].max().item()

    nonzero = g != 0
    ours, torchs = rel(cy[0], want, nonzero), rel(torch_tanh.detach(), want, nonzero)
    assert ours <= 2 * torchs, f"tanh: relative error {ours:.2e}, torch's {torchs:.2e}"
    # From |g| = 9.011 on, tanh rounds to +-1, as torch's does (a clamp at 9 gave 1 - 6e-8).
    rounds_to_one = g.abs() > 9.02
    assert torch.equal(cy[0][rounds_to_one], torch_tanh.detach()[rounds_to_one])
    # c = -0 (f * -0 + i * -0) gives h = o * tanh(-0) = -0, as in torch.
    hy, cy = OPS.lstm_cell_pointwise_fwd(torch.tensor([[40.0, 40.0, -0.0, 40.0]]),
                                         torch.tensor([[-0.0]]))
    assert torch.signbit(cy).all() and torch.signbit(hy).all()
    saturated = (g.abs() > 1.5) & (g.abs() < 5)
    ours, torchs = rel(grad_g, want_grad, saturated), rel(torch_grad, want_grad, saturated)
    assert ours <= 2 * torchs, f"1 - tanh^2: relative error {ours:.2e}, torch's {torchs:.2e}"


@needs_cpu_kernels
def test_cell_pointwise_reads_strided_inputs():
    base = randn(6, 4 * 24)
    gates = base[::2]  # rows 2 apart: not contiguous
    cx = randn(24, 3).t()
    hy, cy = OPS.lstm_cell_pointwise_fwd(gates, cx)
    want = reference.lstm_cell_pointwise_fwd_reference(gates.contiguous(), cx.contiguous())
    torch.testing.assert_close((hy, cy), want, rtol=1e-6, atol=1e-6)


# ---- layer ops ---------------------------------------------------------------------------------



# B = 4: one partial batch vector. B = 37: the CPU kernel's batch panels of 3 and 2 vectors, the
# last one partial; H = 10 and P = 6 leave partial tiles of 4 rows.
LAYER_SIZES = [pytest.param((5, 4, 9, 4), id="B4H9"), pytest.param((5, 37, 10, 6), id="B37H10")]


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", LSTM_LAYER_CASES)
@pytest.mark.parametrize("sizes", LAYER_SIZES)
def test_layer_fwd_bwd_match_reference(dtype, case, sizes):
    _check_layer_ops_against_reference(dtype, case, sizes)


@needs_cpu_kernels
@pytest.mark.parametrize("B", [3, 40], ids=["unit-lanes", "batch-lanes"])
def test_layer_ops_with_weight_copies_past_the_scratch_cap(B):
    # H = 1040: the unit-lane kernels' transposed w_hh (65 blocks of 16 units x 1040 x 4 gates)
    # and the backward's column groups of w_hh take more than the 16 MiB that a thread keeps for
    # later calls (csrc/include/fastattn/cpu_scratch.h), so they are the call's own; B = 40 runs
    # the batch lanes' packed columns of w_hh (17.3 MB) that way. Sums over 1040 terms also
    # hold the step GEMMs' rounding to torch's (one chain over K: 2.3x its error under AVX2).
    plain = dict(proj=False, zoneout=False, lengths=None, reverse=False)
    _check_layer_ops_against_reference(torch.float32, plain, (2, B, 1040, 1040))


@needs_cpu_kernels
@pytest.mark.parametrize("sizes", [pytest.param((3, 37, 161, 161), id="B37H161"),
                                   pytest.param((2, 33, 520, 520), id="B33H520")])
def test_bf16_layer_at_brgemm_tile_edges(sizes):
    # Where bf16 layers run their recurrent products on oneDNN's brgemm
    # (C.cpu_lstm_bf16_rows_on_brgemm(), tests/test_cpu_tile_engine.py; elsewhere these check
    # the fp32 FMA path): 32-row products with a tail (B = 37, 33), a thread's forward products
    # of 4 blocks of 16 units with a tail (H = 161: 11 blocks) and the backward's of 16 blocks
    # (H = 520: 33), an odd reduction padded to whole bf16 pairs (P = 161).
    plain = dict(proj=False, zoneout=False, lengths=None, reverse=False)
    _check_layer_ops_against_reference(torch.bfloat16, plain, sizes)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_fwd_infinite_weight_stays_in_its_gate(dtype):
    # An infinite recurrent weight saturates its own gate (sigmoid / tanh of +-inf) and nothing
    # else: a kernel that multiplies it by padding (the zero that completes an odd P's last bf16
    # pair for brgemm, or lanes past the end of a row) makes another gate NaN. P = 9 is odd;
    # the infinity sits at feature 0 of gate row 11, whose neighbour row 10 ends in that pair.
    T, B, H = 2, 3, 9
    x_proj, h0, c0, w_hh, *_ = _layer_inputs(T, B, H, H, dtype, proj=False, zoneout=False,
                                             lengths=None)
    w_hh[11, 0] = float("inf")
    got = OPS.lstm_layer_fwd(x_proj, h0, c0, w_hh, None, None, False, None, None)
    want = reference.lstm_layer_reference(x_proj.double(), h0.double(), c0.double(),
                                          w_hh.double(), None, None, False, None, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, g, w in zip(("h_all", "c_all"), got[:2], want[:2], strict=False):
        assert w.isfinite().all(), name  # the reference saturates, as the kernels must
        assert g.isfinite().all(), name
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=name)


def _check_layer_ops_against_reference(dtype, case, sizes):
    T, B, H, P_proj = sizes
    P = P_proj if case["proj"] else H
    lengths = case["lengths"]
    if lengths is not None:  # the case's pattern of lengths spread over the batch, sorted
        lengths = sorted((lengths[i % len(lengths)] for i in range(B)), reverse=True)
    inputs = _layer_inputs(T, B, H, P, dtype, proj=case["proj"], zoneout=case["zoneout"],
                           lengths=lengths)
    x_proj, h0, c0, w_hh, w_hr, batch_sizes, zc, zh = inputs
    reverse = case["reverse"]
    nan_heap((T, B, P), (T, B, H), (T, B, 4 * H), dtype=dtype)
    out = OPS.lstm_layer_fwd(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zc, zh)

    def f64(t):
        return None if t is None else t.double()

    ref64 = reference.lstm_layer_reference(*map(f64, (x_proj, h0, c0, w_hh, w_hr)), batch_sizes,
                                           reverse, f64(zc), f64(zh))
    ref_t = reference.lstm_layer_reference(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zc, zh)
    for name, got, want, same_dtype in zip(("h_all", "c_all", "gates_all", "hpre_all"), out, ref64,
                                           ref_t, strict=True):
        assert_close_to_reference(got, want, same_dtype, name=name)

    grad_h_all, grad_c_all = randn(T, B, P, dtype=dtype), randn(T, B, H, dtype=dtype)
    h_all, c_all, gates_all, hpre_all = out
    got = OPS.lstm_layer_bwd(grad_h_all, grad_c_all, h0, c0, w_hh, w_hr, batch_sizes, reverse, zc,
                             zh, h_all, c_all, gates_all, hpre_all)
    # float64 oracle: autograd through the reference forward
    leaves = [t.double().requires_grad_() for t in (x_proj, h0, c0, w_hh)]
    if w_hr is not None:
        leaves.append(w_hr.double().requires_grad_())
    h_ref, c_ref, _, _ = reference.lstm_layer_reference(
        *leaves[:4], leaves[4] if w_hr is not None else None, batch_sizes, reverse, f64(zc),
        f64(zh))
    want = torch.autograd.grad(
        (h_ref * grad_h_all.double()).sum() + (c_ref * grad_c_all.double()).sum(), leaves)
    same_dtype = reference.lstm_layer_bwd_reference(grad_h_all, grad_c_all, h0, c0, w_hh, w_hr,
                                                    batch_sizes, reverse, zc, zh, *out)
    names = ("grad_x_proj", "grad_h0", "grad_c0", "grad_w_hh", "grad_w_hr")
    for i, wanted in enumerate(want):
        assert_close_to_reference(got[i], wanted, same_dtype[i], name=names[i])
    if w_hr is None:
        assert got[4].numel() == 0


# The backward's cell gradient cancels (tests/lstm_math.py): the CPU and CUDA kernels once saved
# the gates rounded to bfloat16 / float16 and got grad c0 several percent wrong. The CUDA step
# kernels' version of this case also runs under cudasim (harness/lstm.cpp, "step cancel").
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_cpu_kernels),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H", [(1, 1), (7, 33)], ids=["B1H1", "B7H33"])
def test_layer_bwd_where_the_cell_gradient_cancels(dtype, B, H, device):
    x_proj, h0, c0, w_hh, *_ = _layer_inputs(1, B, H, H, dtype, proj=False, zoneout=False,
                                             lengths=None)
    grad_h = randn(1, B, H, dtype=dtype)
    got, want, same_dtype = cancelling_cell_gradient_grads(
        OPS.lstm_layer_fwd, *(t.to(device) for t in (x_proj, h0, c0, w_hh, grad_h)))
    for name, a, w, r in zip(("grad_x_proj", "grad_h0", "grad_c0", "grad_w_hh"), got, want,
                             same_dtype, strict=True):
        assert_close_to_reference(a, w, r, name=name)


# T = 70 steps of H = 256 units: lstm_layer_infer computes x_proj about 4 MiB at a time, so at
# B = 20 fp32 runs two chunks (51 + 19 steps) and fp64 three, fp16 and bf16 one; at B = 40, three
# or more. The CPU kernel puts its lanes along the units below two vectors of rows (B < 32 on
# avx512, < 16 on avx2), along the batch above: B = 5 and 40 run one each everywhere, B = 16 and
# 20 the unit lanes on avx512 and the batch lanes on avx2 (one full vector there at 16). One step
# (T = 1) of a batch the unit lanes would take (B = 3, and 20 on avx512) adds h0 @ w_hh^T to
# x_proj and runs the cell alone; of B = 20 on avx2, one step of the batch lanes; of B = 40, one
# step of the batch lanes everywhere, whose float32 projection (brgemm, cpu_gemm.cpp) then has
# fewer column blocks than threads and splits its rows.
@needs_cpu_kernels
@pytest.mark.parametrize(("T", "B"),
                         [(70, 5), (70, 16), (70, 20), (70, 40), (1, 3), (1, 20), (1, 40)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", LSTM_LAYER_CASES)
def test_layer_infer_matches_reference(dtype, case, T, B):
    n_in, H = 24, 256
    P = 96 if case["proj"] else H
    lengths = case["lengths"]
    if lengths is not None:  # the case's pattern of lengths, stretched over T, sorted
        lengths = sorted((lengths[i % len(lengths)] * T // 5 for i in range(B)), reverse=True)
    _, h0, c0, w_hh, w_hr, batch_sizes, zc, zh = _layer_inputs(
        T, B, H, P, dtype, proj=case["proj"], zoneout=case["zoneout"], lengths=lengths)
    # A contracting recurrence over 70 steps: with the short tests' weight scales it turns
    # chaotic, and any two float32 computations (torch's included) drift apart.
    w_hh = (w_hh.double() / 8).to(dtype)
    w_hr = None if w_hr is None else (w_hr.double() / 8).to(dtype)
    x = randn(T, B, n_in, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)  # batch-first
    w_ih, bias = randn(4 * H, n_in, dtype=dtype, scale=0.3), randn(4 * H, dtype=dtype)
    reverse = case["reverse"]
    nan_heap((T, B, P), (T, B, H), dtype=dtype)
    got = OPS.lstm_layer_infer(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, zc, zh)

    def reference_layer(t):  # the layer in dtype t, with x_proj computed as one GEMM
        def cast(v):
            return None if v is None else v.to(t)
        flat = cast(x).reshape(T * B, n_in)
        x_proj = torch.addmm(cast(bias), flat, cast(w_ih).t()).view(T, B, 4 * H)
        return reference.lstm_layer_reference(x_proj, *map(cast, (h0, c0, w_hh, w_hr)),
                                              batch_sizes, reverse, cast(zc), cast(zh))[:2]

    for name, g, want, same_dtype in zip(("h_all", "c_all"), got, reference_layer(torch.float64),
                                         reference_layer(dtype), strict=True):
        assert_close_to_reference(g, want, same_dtype, name=name)


def _assert_infer_matches_reference(got, args):
    """got, lstm_layer_infer's (h_all, c_all) for args without lengths or zoneout, against the
    reference computed in float64 and in the inputs' dtype, x_proj as one GEMM."""
    x, w_ih, bias, h0, c0, w_hh, w_hr, _, reverse = args[:9]
    T, B, n_in = x.shape

    def reference_layer(t):
        def cast(v):
            return None if v is None else v.to(t)
        x_proj = torch.addmm(cast(bias), cast(x).reshape(T * B, n_in), cast(w_ih).t())
        return reference.lstm_layer_reference(x_proj.view(T, B, -1),
                                              *map(cast, (h0, c0, w_hh, w_hr)), None, reverse,
                                              None, None)[:2]

    for name, g, want, same_dtype in zip(("h_all", "c_all"), got, reference_layer(torch.float64),
                                         reference_layer(x.dtype), strict=True):
        assert_close_to_reference(g, want, same_dtype, name=name)


def _assert_nan_row_stays_in_its_state(args):
    """NaN in the last row's input of a one-step lstm_layer_infer reaches that row's state only."""
    x = args[0].clone()
    x[0, -1, -1] = float("nan")
    h_all, c_all = OPS.lstm_layer_infer(x, *args[1:])
    assert h_all[0, -1].isnan().all() and c_all[0, -1].isnan().all()
    assert h_all[0, :-1].isfinite().all() and c_all[0, :-1].isfinite().all()


# One step (T = 1) of fewer rows than two vectors (B < 32 on avx512, < 16 on avx2) computes its
# gates as dot products of the weights' rows with the batch rows (lstm_step_gates_cpu.isa.cpp:
# float32 on avx2 and avx512; elsewhere and with FASTATTN_LSTM_GEMM=torch, two GEMMs): B = 9 and
# 17 past one vector of avx2 and avx512, 31 the last batch of avx512's, 17 and 31 past avx2's (one
# step of the batch lanes there). Odd widths leave partial vectors along k, a projection makes h0
# narrower than the units, and x and h0 are row-strided views read in place.
@needs_cpu_kernels
@pytest.mark.parametrize("B", [1, 2, 5, 7, 9, 17, 31])
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_layer_infer_one_step_gates(B, proj, monkeypatch):
    n_in, H = 7, 33
    P = 5 if proj else H
    x = randn(1, B, n_in + 3)[:, :, :n_in]
    h0, c0 = randn(B, P + 2)[:, :P], randn(B, H)
    w_ih, w_hh = randn(4 * H, n_in, scale=0.5), randn(4 * H, P, scale=0.5)
    w_hr = randn(P, H, scale=0.5) if proj else None
    bias = randn(4 * H)
    args = [x, w_ih, bias, h0, c0, w_hh, w_hr, None, False, None, None]
    nan_heap((4 * H * B,), (1, B, P), (1, B, H), dtype=torch.float32)
    got = OPS.lstm_layer_infer(*args)

    _assert_infer_matches_reference(got, args)
    monkeypatch.setenv("FASTATTN_LSTM_GEMM", "torch")
    torch.testing.assert_close(got, OPS.lstm_layer_infer(*args), rtol=2e-6, atol=2e-6)
    monkeypatch.delenv("FASTATTN_LSTM_GEMM")
    _assert_nan_row_stays_in_its_state(args)


# fastattn::lstm_step_gates: a training cell step's products (fastattn.lstm_cell with grad), on
# the same kernel for B < GEMV_BELOW, else on two GEMMs: B = 17 and 40 are within the kernel's
# batches on avx512 and past avx2's, B = 70 past both, and the last batch of the kernel and the
# first past it at this ISA; B = 0 an empty step. Odd widths, row-strided input and state read
# in place, and every gradient, against float64.
@needs_cpu_kernels
@pytest.mark.parametrize("B", sorted({0, 1, 3, 7, 17, 40, 70, max(GEMV_BELOW - 1, 1), GEMV_BELOW}))
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_step_gates_op(B, bias, monkeypatch):
    n_in, H = 7, 33
    x, hx = randn(B, n_in + 3)[:, :n_in], randn(B, H + 2)[:, :H]
    w_ih, w_hh = randn(4 * H, n_in, scale=0.5), randn(4 * H, H, scale=0.5)
    b = randn(4 * H) if bias else None
    inputs = [t for t in (x, hx, w_ih, w_hh, b) if t is not None]

    def product(x, hx, w_ih, w_hh, *b):
        gates = x @ w_ih.t() + hx @ w_hh.t()
        return gates + b[0] if b else gates

    nan_heap((B, 4 * H), dtype=torch.float32)
    got = OPS.lstm_step_gates(x, hx, w_ih, w_hh, b)
    assert got.shape == (B, 4 * H) and got.is_contiguous()
    inputs64 = [t.double().requires_grad_() for t in inputs]
    want64 = product(*inputs64)
    assert_close_to_reference(got, want64, product(*inputs), name="gates")
    monkeypatch.setenv("FASTATTN_LSTM_GEMM", "torch")
    torch.testing.assert_close(got, OPS.lstm_step_gates(x, hx, w_ih, w_hh, b), rtol=2e-6,
                               atol=2e-6)
    monkeypatch.delenv("FASTATTN_LSTM_GEMM")
    args = [t.clone().requires_grad_() if t is not None else None for t in (x, hx, w_ih, w_hh, b)]
    grad = randn(B, 4 * H)
    got_grads = torch.autograd.grad(OPS.lstm_step_gates(*args), [t for t in args if t is not None],
                                    grad)
    want_grads = torch.autograd.grad(want64, inputs64, grad.double())
    for name, g, want in zip(("input", "hx", "w_ih", "w_hh", "bias"), got_grads, want_grads,
                             strict=False):
        assert_close_to_reference(g, want, name=f"grad_{name}")
    torch.library.opcheck(OPS.lstm_step_gates.default, args)
    if B:  # NaN in one row's input reaches that row's gates only
        x_nan = x.clone()
        x_nan[B - 1, n_in - 1] = float("nan")
        gates = OPS.lstm_step_gates(x_nan, hx, w_ih, w_hh, b)
        assert gates[B - 1].isnan().all() and gates[:B - 1].isfinite().all()


@needs_cpu_kernels
def test_step_gates_op_rejects_bad_shapes():
    x, hx, w_ih, w_hh = randn(2, 3), randn(2, 4), randn(16, 3), randn(16, 4)
    with pytest.raises(RuntimeError, match="hx must have shape"):
        OPS.lstm_step_gates(x, randn(2, 5), w_ih, w_hh, None)
    with pytest.raises(RuntimeError, match="w_ih must be"):
        OPS.lstm_step_gates(x, hx, randn(15, 3), w_hh, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        OPS.lstm_step_gates(x, hx, w_ih, w_hh, randn(15))
    with pytest.raises(RuntimeError, match="w_hh must have dtype"):
        OPS.lstm_step_gates(x, hx, w_ih, w_hh.double(), None)


# One bf16 step where bf16 runs on AMX (C.cpu_lstm_bf16_rows_on_brgemm(); elsewhere this checks
# the other one-step paths) takes its gates from two GEMMs with the weights on the left,
# gates^T = w_ih x^T + w_hh h0^T + bias, and runs the cell alone on that feature-major layout:
# batches below a vector (1, 7), between one and two (17: unit lanes read it strided) and above
# (33: batch lanes), an odd H and n_in, a projection (h0 narrower than the units, w_hh [4H, P]),
# row-strided views. A NaN in one row's input reaches that row's state only.
@needs_cpu_kernels
@pytest.mark.parametrize("B", [1, 7, 17, 33])
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_layer_infer_bf16_step(B, proj):
    n_in, H = 7, 33
    P = 5 if proj else H
    bf16 = torch.bfloat16
    x = randn(1, B, n_in + 3, dtype=bf16)[:, :, :n_in]
    h0, c0 = randn(B, P + 2, dtype=bf16)[:, :P], randn(B, H, dtype=bf16)
    w_ih = randn(4 * H, n_in, dtype=bf16, scale=0.5)
    w_hh = randn(4 * H, P + 1, dtype=bf16, scale=0.5)[:, :P]
    w_hr = randn(P, H, dtype=bf16, scale=0.5) if proj else None
    bias = randn(4 * H, dtype=bf16)
    args = [x, w_ih, bias, h0, c0, w_hh, w_hr, None, False, None, None]
    nan_heap((4 * H * B,), (1, B, P), (1, B, H), dtype=bf16)
    got = OPS.lstm_layer_infer(*args)

    _assert_infer_matches_reference(got, args)
    _assert_nan_row_stays_in_its_state(args)


# bf16 inference computes x_proj in chunks of at least 2048 rows where bf16 runs on AMX (about
# 4 MiB elsewhere): T = 110 steps of B = 20 rows (H = 256) run two chunks there (103 + 7 steps)
# and elsewhere (102 + 8), each later chunk starting from the state the one before left, in
# either direction.
@needs_cpu_kernels
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_layer_infer_bf16_chunks(reverse):
    T, B, n_in, H = 110, 20, 24, 256
    bf16 = torch.bfloat16
    x = randn(T, B, n_in, dtype=bf16)
    h0, c0 = randn(B, H, dtype=bf16), randn(B, H, dtype=bf16)
    w_ih, bias = randn(4 * H, n_in, dtype=bf16, scale=0.3), randn(4 * H, dtype=bf16)
    # A contracting recurrence (test_layer_infer_matches_reference's scale).
    w_hh = randn(4 * H, H, dtype=bf16, scale=0.5 / 8)
    args = [x, w_ih, bias, h0, c0, w_hh, None, None, reverse, None, None]
    nan_heap((T, B, H), (T, B, H), dtype=bf16)
    _assert_infer_matches_reference(OPS.lstm_layer_infer(*args), args)


@needs_cpu_kernels
def test_layer_infer_without_bias_is_the_layer_forward():
    x, w_ih = randn(5, 3, 7), randn(32, 7)
    _, h0, c0, w_hh, *_ = _layer_inputs(5, 3, 8, 8, torch.float32, proj=False, zoneout=False,
                                        lengths=None)
    got = OPS.lstm_layer_infer(x, w_ih, None, h0, c0, w_hh, None, None, False, None, None)
    x_proj = (x.reshape(15, 7) @ w_ih.t()).view(5, 3, 32)
    want = OPS.lstm_layer_fwd(x_proj, h0, c0, w_hh, None, None, False, None, None)[:2]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_cpu_kernels
def test_sequence_fwd_is_the_option_free_layer():
    x_proj, h0, c0, w_hh, *_ = _layer_inputs(4, 3, 8, 8, torch.float32, proj=False, zoneout=False,
                                             lengths=None)
    got = OPS.lstm_sequence_fwd(x_proj, h0, c0, w_hh)
    want = OPS.lstm_layer_fwd(x_proj, h0, c0, w_hh, None, None, False, None, None)[:3]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@needs_cpu_kernels
@pytest.mark.parametrize("T, B", [(0, 3), (4, 0)], ids=["T0", "B0"])
def test_layer_with_no_steps_or_no_rows(T, B):
    """Training through a layer of zero steps or zero rows: empty outputs, the final state's
    gradient passed straight to h0 / c0 (T = 0), zero weight gradients."""
    n_in, H = 5, 7
    x = randn(T, B, n_in).requires_grad_()
    h0, c0 = randn(B, H).requires_grad_(), randn(B, H).requires_grad_()
    w_ih, w_hh = randn(4 * H, n_in).requires_grad_(), randn(4 * H, H).requires_grad_()
    b = randn(4 * H).requires_grad_()
    with fastattn.use_backend("cpu"):
        h_all, c_all = lstm_ops.lstm_layer(x, h0, c0, w_ih, w_hh, b)
    assert h_all.shape == c_all.shape == (T, B, H)
    grads = torch.autograd.grad(h_all.sum() + c_all.sum(), [x, h0, c0, w_ih, w_hh, b],
                                allow_unused=True)
    for t, g in zip((x, h0, c0, w_ih, w_hh, b), grads, strict=True):
        assert g is None or torch.equal(g, torch.zeros_like(t))


@needs_cpu_kernels
@pytest.mark.parametrize("extra", ["plain", "layer_norm", "zoneout"])
def test_layer_with_zero_hidden_size(extra):
    """H == 0 over T > 1 steps, forward and backward (nn.LSTMCell takes hidden_size 0, and
    fastattn.LSTMCell's extras run these layer ops): zero-size states, a zero input gradient."""
    T, B, width = 3, 2, 4
    x = randn(T, B, width).requires_grad_()
    empty = [torch.zeros(*s, requires_grad=True) for s in ((B, 0), (B, 0), (0, width), (0, 0))]
    zoneout = torch.full((T, B, 0), 0.5)
    options = {
        "plain": {},
        "layer_norm": {"layer_norm": (torch.ones(0), torch.ones(0), torch.ones(0), torch.zeros(0),
                                      1e-5)},
        "zoneout": {"zoneout_c": zoneout, "zoneout_h": zoneout},
    }[extra]
    with fastattn.use_backend("cpu"):
        h_all, c_all = lstm_ops.lstm_layer(x, *empty, **options)
        assert h_all.shape == c_all.shape == (T, B, 0)
        grads = torch.autograd.grad(h_all.sum() + c_all.sum(), [x, *empty])
    assert torch.equal(grads[0], torch.zeros_like(x))
    assert [g.shape for g in grads[1:]] == [e.shape for e in empty]


@needs_cpu_kernels
def test_layer_ops_reject_bad_arguments():
    x_proj, h0, c0, w_hh, *_ = _layer_inputs(4, 3, 8, 8, torch.float32, proj=False, zoneout=False,
                                             lengths=None)
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        OPS.lstm_layer_fwd(x_proj, h0[:2], c0, w_hh, None, None, False, None, None)
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        OPS.lstm_layer_fwd(x_proj, h0, c0, w_hh, None, torch.tensor([1, 3, 3, 3]), False, None,
                           None)
    with pytest.raises(RuntimeError, match="w_hh must have dtype"):
        OPS.lstm_layer_fwd(x_proj, h0, c0, w_hh.double(), None, None, False, None, None)
    h_all, c_all, gates_all, hpre_all = OPS.lstm_layer_fwd(x_proj, h0, c0, w_hh, None, None,
                                                           False, None, None)
    with pytest.raises(RuntimeError, match="gates_all must be Float"):  # the math dtype
        OPS.lstm_layer_bwd(h_all, c_all, h0, c0, w_hh, None, None, False, None, None, h_all,
                           c_all, gates_all.double(), hpre_all)
    with pytest.raises(RuntimeError, match=r"a projection w_hr \[P, H\] needs H > 0"):
        OPS.lstm_layer_fwd(x_proj[..., :0], h0[:, :2], c0[:, :0], w_hh[:0, :2], randn(2, 0),
                           None, False, None, None)
    x, w_ih, bias = randn(4, 3, 5), randn(32, 5), randn(32)
    with pytest.raises(RuntimeError, match=r"input must be \[T, B, I\]"):
        OPS.lstm_layer_infer(x[0], w_ih, bias, h0, c0, w_hh, None, None, False, None, None)
    with pytest.raises(RuntimeError, match="w_ih must have shape"):
        OPS.lstm_layer_infer(x, w_ih[:, :4], bias, h0, c0, w_hh, None, None, False, None, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        OPS.lstm_layer_infer(x, w_ih, bias[:8], h0, c0, w_hh, None, None, False, None, None)
    with pytest.raises(RuntimeError, match="c0 must have dtype"):
        OPS.lstm_layer_infer(x, w_ih, bias, h0, c0.double(), w_hh, None, None, False, None, None)


# ---- training input projection -----------------------------------------------------------------


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
# S = 3: 23-column steps, which the 64-column brgemm blocks cut across; S = 0 and N = 0: empty
@pytest.mark.parametrize("S, N", [(1, 69), (3, 23), (0, 5), (4, 0)])
def test_weight_mm_matches_torch(dtype, bias, S, N):
    # Sizes off every brgemm block (64 rows and columns, 512 deep); x a transposed view, as
    # fastattn.ops.lstm passes the input; then the gradients, as the module's backward takes them.
    M, K = 130, 515
    w, x = randn(M, K, dtype=dtype), randn(S, N, K, dtype=dtype).transpose(1, 2)
    b = randn(M, dtype=dtype) if bias else None

    def product(w, x, b):  # torch.matmul's broadcast of w over the S steps
        return w @ x + (b[:, None] if b is not None else 0)

    want64 = product(w.double(), x.double(), b.double() if bias else None)
    nan_heap((S, M, N), dtype=dtype)
    got = OPS.lstm_weight_mm(w, x, b)
    assert got.shape == (S, M, N) and got.is_contiguous()
    assert_close_to_reference(got, want64, product(w, x, b), name="out")
    args = [t.clone().requires_grad_() if t is not None else None for t in (w, x, b)]
    grad = randn(S, M, N, dtype=dtype)
    inputs = [t for t in args if t is not None]
    got_grads = torch.autograd.grad(OPS.lstm_weight_mm(*args), inputs, grad)
    args64 = [t.detach().double().requires_grad_() for t in inputs]
    want_grads = torch.autograd.grad(product(*args64, *([None] if not bias else [])), args64,
                                     grad.double())
    for name, g, want in zip(("grad_weight", "grad_x", "grad_bias"), got_grads, want_grads,
                             strict=False):
        assert_close_to_reference(g, want, name=name)
    torch.library.opcheck(OPS.lstm_weight_mm.default, args)


# ---- opcheck and gradcheck ---------------------------------------------------------------------


@needs_cpu_kernels
@pytest.mark.parametrize("step_major", [False, True], ids=["contiguous", "step_major"])
# no options / every option
@pytest.mark.parametrize("case", [LSTM_LAYER_CASES[0], LSTM_LAYER_CASES[-1]])
# bf16: the CPU kernel saves gates_all in float32, and the fakes must say so
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_opcheck_layer_ops(case, step_major, dtype):
    T, B, H = 3, 4, 5
    P = 3 if case["proj"] else H
    x_proj, h0, c0, w_hh, w_hr, batch_sizes, zc, zh = _layer_inputs(
        T, B, H, P, dtype, proj=case["proj"], zoneout=case["zoneout"],
        lengths=[3, 3, 2, 1] if case["lengths"] else None)
    if step_major:  # the layout fastattn.ops.lstm computes x_proj in
        x_proj = x_proj.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        assert x_proj.stride() == (4 * H * B, 1, B)
    grads = [t.requires_grad_() for t in (x_proj, h0, c0, w_hh, w_hr) if t is not None]
    assert grads
    args = (x_proj, h0, c0, w_hh, w_hr, batch_sizes, case["reverse"], zc, zh)
    torch.library.opcheck(OPS.lstm_layer_fwd.default, args)
    with torch.no_grad():
        out = OPS.lstm_layer_fwd(*args)
    bwd_args = (randn(T, B, P, dtype=dtype), randn(T, B, H, dtype=dtype),
                *(t.detach() if isinstance(t, torch.Tensor) else t for t in args[1:]), *out)
    torch.library.opcheck(OPS.lstm_layer_bwd.default, bwd_args)
    x, w_ih, bias = randn(T, B, 2, dtype=dtype), randn(4 * H, 2, dtype=dtype), (
        randn(4 * H, dtype=dtype))
    infer_args = (x, w_ih, bias, *(t.detach() if isinstance(t, torch.Tensor) else t
                                   for t in args[1:]))
    torch.library.opcheck(OPS.lstm_layer_infer.default, infer_args)  # inference: no autograd


@needs_cpu_kernels
@pytest.mark.parametrize("step_major", [False, True], ids=["row-major", "step-major"])
def test_layer_op_fakes_match_the_kernels_layouts(step_major):
    # gates_all takes x_proj's layout and grad_x_proj gates_all's: step-major / feature-major
    # where x_proj's batch stride is 1, row-major otherwise, whatever lanes the kernels run at
    # that batch (lstm_ops._cpu_unit_lanes). The fakes must say the same for every batch, on
    # either side of the lane bounds (at B <= 1 both layouts' strides are row-major's).
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, H = 2, 3
    for B in range(2 * lstm_ops._UNIT_LANES_BELOW + 2):
        x_proj = randn(T, B, 4 * H)
        if step_major:
            x_proj = x_proj.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        args = (x_proj, randn(B, H), randn(B, H), randn(4 * H, H), None, None, False, None, None)
        h_all, c_all, gates_all, hpre_all = OPS.lstm_layer_fwd(*args)
        grads = (randn(T, B, H), randn(T, B, H))
        grad_x_proj = OPS.lstm_layer_bwd(*grads, *args[1:], h_all, c_all, gates_all, hpre_all)[0]
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
            fake_out = OPS.lstm_layer_fwd(*fake)
            fake_grads = [mode.from_tensor(t) for t in grads]
            fake_grad_x_proj = OPS.lstm_layer_bwd(*fake_grads, *fake[1:], *fake_out)[0]
        assert fake_out[2].stride() == gates_all.stride(), B
        assert fake_grad_x_proj.stride() == grad_x_proj.stride(), B
        assert gates_all.stride() == x_proj.stride(), B


@needs_cpu_kernels
def test_opcheck_cell_and_sequence_ops():
    gates = randn(3, 20, dtype=torch.float64).requires_grad_()
    cx = randn(3, 5, dtype=torch.float64).requires_grad_()
    torch.library.opcheck(OPS.lstm_cell_pointwise_fwd.default, (gates, cx))
    hy, cy = OPS.lstm_cell_pointwise_fwd(gates.detach(), cx.detach())
    torch.library.opcheck(OPS.lstm_cell_pointwise_bwd.default,
                          (torch.randn_like(hy), torch.randn_like(cy), gates.detach(),
                           cx.detach(), cy))
    x_proj, h0, c0, w_hh, *_ = _layer_inputs(3, 2, 4, 4, torch.float64, proj=False,
                                             zoneout=False, lengths=None)
    for t in (x_proj, h0, c0, w_hh):
        t.requires_grad_()
    torch.library.opcheck(OPS.lstm_sequence_fwd.default, (x_proj, h0, c0, w_hh))


@pytest.mark.parametrize("fwd", ["lstm_layer_fwd", "lstm_sequence_fwd"])
def test_layer_backward_runs_on_meta_tensors(fwd):
    # The backward of both forwards calls fastattn::lstm_layer_bwd, whose fake serves meta
    # tensors (shape propagation), as the forwards' fakes do.
    T, B, H = 3, 2, 4
    x_proj, w_hh = (torch.empty(shape, device="meta", requires_grad=True)
                    for shape in ((T, B, 4 * H), (4 * H, H)))
    h0, c0 = torch.empty(B, H, device="meta"), torch.empty(B, H, device="meta")
    extra = (None, None, False, None, None) if fwd == "lstm_layer_fwd" else ()
    h_all, c_all = getattr(OPS, fwd)(x_proj, h0, c0, w_hh, *extra)[:2]
    grads = torch.autograd.grad((h_all.sum(), c_all.sum()), (x_proj, w_hh))
    assert [g.shape for g in grads] == [x_proj.shape, w_hh.shape]


@needs_cpu_kernels
@pytest.mark.parametrize("case", LSTM_LAYER_CASES)
def test_gradcheck_lstm_layer(case):
    T, B, in_features, H = 4, 4, 3, 4
    P = 2 if case["proj"] else H
    x = randn(T, B, in_features, dtype=torch.float64).requires_grad_()
    w_ih = randn(4 * H, in_features, dtype=torch.float64).requires_grad_()
    b_ih = randn(4 * H, dtype=torch.float64).requires_grad_()
    _, h0, c0, w_hh, w_hr, batch_sizes, zc, zh = _layer_inputs(
        T, B, H, P, torch.float64, proj=case["proj"], zoneout=case["zoneout"],
        lengths=[4, 3, 3, 1] if case["lengths"] else None)
    tensors = [x, h0, c0, w_ih, w_hh, b_ih] + ([w_hr] if w_hr is not None else [])
    for t in tensors:
        t.requires_grad_()

    def f(x, h0, c0, w_ih, w_hh, b_ih, w_hr=None):
        return fastattn.ops.lstm.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, None, w_hr,
                                            batch_sizes=batch_sizes, reverse=case["reverse"],
                                            zoneout_c=zc, zoneout_h=zh)

    with fastattn.use_backend("cpu"):
        assert torch.autograd.gradcheck(f, tensors)


@needs_cpu_kernels
def test_gradcheck_lstm_cell():
    B, in_features, H = 3, 4, 5
    tensors = [randn(*s, dtype=torch.float64).requires_grad_()
               for s in ((B, in_features), (B, H), (B, H), (4 * H, in_features), (4 * H, H),
                         (4 * H,), (4 * H,))]
    with fastattn.use_backend("cpu"):
        assert torch.autograd.gradcheck(fastattn.lstm_cell, tensors)


# ---- backend choice ----------------------------------------------------------------------------


def test_forced_backends_on_cpu_tensors():
    x, h, c = randn(2, 3), randn(2, 4), randn(2, 4)
    w_ih, w_hh = randn(16, 3), randn(16, 4)
    with fastattn.use_backend("reference"):
        want = fastattn.lstm_cell(x, h, c, w_ih, w_hh)
    with pytest.raises(RuntimeError, match="cuda"):
        with fastattn.use_backend("cuda"):
            fastattn.lstm_cell(x, h, c, w_ih, w_hh)
    if fastattn.backends()["cpu"].usable:
        with fastattn.use_backend("cpu"):
            torch.testing.assert_close(fastattn.lstm_cell(x, h, c, w_ih, w_hh), want)


@pytest.mark.triton
def test_triton_cell_backend_matches_reference():
    assert lstm_ops._triton_cell_ops() is not None, "the Triton LSTM cell ops did not register"
    x, h, c = randn(3, 5), randn(3, 8), randn(3, 8)
    w_ih, w_hh, b = randn(32, 5), randn(32, 8), randn(32)
    tensors = [t.requires_grad_() for t in (x, h, c, w_ih, w_hh, b)]
    with fastattn.use_backend("triton"):
        got = fastattn.lstm_cell(*tensors[:5], tensors[5])
        got_grads = torch.autograd.grad(got[0].sum() + 2 * got[1].sum(), tensors)
    with fastattn.use_backend("reference"):
        want = fastattn.lstm_cell(*tensors[:5], tensors[5])
        want_grads = torch.autograd.grad(want[0].sum() + 2 * want[1].sum(), tensors)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_triton_backend_serves_the_lstm_module():
    assert lstm_ops._triton_cell_ops() is not None, "the Triton LSTM cell ops did not register"
    m = fastattn.LSTM(4, 8, bidirectional=True, proj_size=3)
    x = randn(5, 2, 4).requires_grad_()
    results = []
    for backend in ("triton", "reference"):
        with fastattn.use_backend(backend):
            out, (h, c) = m(x)
            loss = out.sum() + h.sum() + c.sum()
            results.append((out, h, c, *torch.autograd.grad(loss, [x, *m.parameters()])))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
