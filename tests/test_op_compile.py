"""Every fastattn::* CPU op under torch.library.opcheck in every dtype, with its options and in
the layouts fastattn.ops passes (its schema declares what it mutates and aliases, its fake kernel
returns the real kernel's shapes, dtypes and strides, its autograd is registered), and the public
functions and modules compiled by Inductor against eager, with and without gradients (Inductor's
generated code also asserts that every op output has the strides the fake kernel promised)."""

from __future__ import annotations

import pytest
import torch
from helpers import randn

import fastattn
from fastattn.ops.attention import AttentionOptions

OPS = torch.ops.fastattn
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16"]
# compiled vs eager: the same kernels on the same data, so only Inductor's own rounding of the
# surrounding GEMMs, adds and casts differs (a few units of the dtype's last place).
COMPILE_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}

pytestmark = pytest.mark.skipif(
    not fastattn.backends()["cpu"].usable, reason="fastattn._C (CPU kernels) is not built")


# ---- opcheck -----------------------------------------------------------------------------------

# opcheck's autograd and AOT-dispatch checks (the slow part) do not depend on the dtype: they run
# for float32; every dtype gets the schema check (no undeclared mutation or output aliasing) and
# the fake-vs-real check (shapes, dtypes, strides).
CHEAP_CHECKS = ("test_schema", "test_faketensor")


def opcheck(op, args, dtype):
    if dtype == torch.float32:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=CHEAP_CHECKS)



def test_attention_options_are_the_schema_arguments():
    """The ops layer passes AttentionOptions positionally (``*options.op_args()``) after
    attn_mask and alibi_slopes, and reads it back the same way: its fields must be the schema's
    arguments there, in order."""
    names = list(AttentionOptions._fields)
    fwd = [a.name for a in OPS.attention_fwd.default._schema.arguments]
    bwd = [a.name for a in OPS.attention_bwd.default._schema.arguments]
    assert fwd[:5] == ["q", "k", "v", "attn_mask", "alibi_slopes"] and fwd[5:] == names
    assert bwd[6:8] == ["attn_mask", "alibi_slopes"] and bwd[8:] == [*names, "mask_grad"]

def _attention_args(dtype, case):
    """attention_fwd's arguments: GQA, non-contiguous q, and each option group."""
    B, Hq, Hk, L, S, E = 2, 4, 2, 7, 9, 8
    q = randn(B, L, Hq, E, dtype=dtype).transpose(1, 2)  # strided heads and rows
    k, v = randn(B, Hk, S, E, dtype=dtype), randn(B, Hk, S, E, dtype=dtype)
    mask = alibi = seed = None
    dropout_p, window, bottom_right, softcap = 0.0, (-1, -1), False, 0.0
    if case == "bool-mask-alibi-window-softcap":
        mask = (torch.rand(L, S) > 0.3).expand(B, Hq, L, S)  # broadcast view, stride 0
        alibi = torch.rand(Hq)
        window, bottom_right, softcap = (3, 1), True, 5.0
    elif case == "additive-mask-dropout":
        mask = randn(B, 1, L, S, dtype=dtype).expand(B, Hq, L, S).requires_grad_()
        dropout_p, seed = 0.3, torch.tensor(1234)
    elif case == "float32-mask":  # any q dtype: the CPU kernel adds it at float32
        mask = randn(B, 1, L, S).expand(B, Hq, L, S).requires_grad_()
    for t in (q, k, v):
        t.requires_grad_()
    return (q, k, v, mask, alibi, dropout_p, seed, E**-0.5, *window, bottom_right, softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["gqa", "bool-mask-alibi-window-softcap",
                                  "additive-mask-dropout", "float32-mask"])
def test_opcheck_attention(dtype, case):
    args = _attention_args(dtype, case)
    opcheck(OPS.attention_fwd.default, args, dtype)
    with torch.no_grad():
        out, lse = OPS.attention_fwd(*args)
    mask = args[3]
    mask_grad = mask is not None and mask.requires_grad
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    bwd_args = (torch.randn_like(out), *detached[:3], out, lse, *detached[3:], mask_grad)
    opcheck(OPS.attention_bwd.default, bwd_args, dtype)


def _layer_inputs(dtype, step_major, options, B=5):
    T, H = 4, 6
    P = 3 if options else H
    x_proj = randn(T, B, 4 * H, dtype=dtype, scale=1.5)
    if step_major:  # the layout fastattn.ops.lstm computes x_proj in
        x_proj = x_proj.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    h0, c0 = randn(B, P, dtype=dtype), randn(B, H, dtype=dtype)
    w_hh = randn(4 * H, P, dtype=dtype, scale=0.5)
    w_hr = batch_sizes = zc = zh = None
    if options:
        w_hr = randn(P, H, dtype=dtype, scale=0.5)
        batch_sizes = torch.tensor([B, B - 1, B - 1, 2])
        zc = torch.bernoulli(torch.full((T, B, H), 0.3)).to(dtype)
        zh = torch.full((T, B, P), 0.25, dtype=dtype)
    for t in (x_proj, h0, c0, w_hh, w_hr):
        if t is not None:
            t.requires_grad_()
    return (x_proj, h0, c0, w_hh, w_hr, batch_sizes, options, zc, zh)  # reverse = options


def _detached(args):
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("step_major", [False, True], ids=["contiguous", "step-major"])
@pytest.mark.parametrize("options", [False, True], ids=["plain", "proj-packed-zoneout-reverse"])
# The CPU kernels' two orientations, whose saved gates and gate gradients have different layouts
# (fastattn.ops.lstm._cpu_unit_lanes): B = 5 runs the unit lanes on every ISA, B = 37 the batch
# lanes (from two vectors up: 32 rows on avx512, 16 on avx2).
@pytest.mark.parametrize("batch", [5, 37], ids=["unit-lanes", "batch-lanes"])
def test_opcheck_lstm_layer_ops(dtype, step_major, options, batch):
    args = _layer_inputs(dtype, step_major, options, batch)
    opcheck(OPS.lstm_layer_fwd.default, args, dtype)
    plain = _detached(args)
    with torch.no_grad():
        saved = OPS.lstm_layer_fwd(*plain)
    T, B, P = saved[0].shape
    H = saved[1].shape[2]
    grads = (randn(T, B, P, dtype=dtype), randn(T, B, H, dtype=dtype))
    opcheck(OPS.lstm_layer_bwd.default, (*grads, *plain[1:], *saved), dtype)
    x, w_ih = randn(T, B, 3, dtype=dtype), randn(4 * H, 3, dtype=dtype)
    bias = randn(4 * H, dtype=dtype)
    opcheck(OPS.lstm_layer_infer.default, (x, w_ih, bias, *plain[1:]), dtype)
    # The composite op over both (its autograd: the training path's).
    opcheck(OPS.lstm_layer.default, (x, w_ih, bias, *plain[1:]), dtype)
    opcheck(OPS.lstm_layer.default, (*(t.requires_grad_() for t in (x, w_ih, bias)), *args[1:]),
            dtype)
    if not options:
        opcheck(OPS.lstm_sequence_fwd.default, args[:4], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", [False, True], ids=["plain", "proj-packed-zoneout-reverse"])
def test_opcheck_lstm_layer_norm_ops(dtype, options):
    x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zc, zh = _layer_inputs(dtype, False,
                                                                            options)
    H = c0.shape[1]
    ln = [randn(n, dtype=dtype, mean=1.0, scale=0.1).requires_grad_() for n in (4 * H, H)]
    ln.append(randn(H, dtype=dtype, scale=0.1).requires_grad_())
    args = (x_proj, h0, c0, w_hh, *ln, 1e-5, w_hr, batch_sizes, reverse, zc, zh)
    opcheck(OPS.lstm_ln_layer_fwd.default, args, dtype)
    plain = _detached(args)
    with torch.no_grad():
        saved = OPS.lstm_ln_layer_fwd(*plain)
    grads = (torch.randn_like(saved[0]), torch.randn_like(saved[1]))
    opcheck(OPS.lstm_ln_layer_bwd.default, (*grads, *plain[1:7], *plain[8:], *saved), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_lstm_cell_pointwise_ops(dtype):
    gates = randn(10, 4 * 6, dtype=dtype, scale=2)[::2].requires_grad_()  # strided rows
    cx = randn(6, 5, dtype=dtype).t().requires_grad_()  # transposed: the outputs are not
    opcheck(OPS.lstm_cell_pointwise_fwd.default, (gates, cx), dtype)
    hy, cy = OPS.lstm_cell_pointwise_fwd(gates.detach(), cx.detach())
    grads = (torch.randn_like(hy), torch.randn_like(cy))
    opcheck(OPS.lstm_cell_pointwise_bwd.default, (*grads, gates.detach(), cx.detach(), cy), dtype)
    x, w_ih, w_hh = randn(5, 3, dtype=dtype), randn(24, 3, dtype=dtype), randn(24, 6, dtype=dtype)
    hx, bias = randn(5, 6, dtype=dtype), randn(24, dtype=dtype)
    cell_args = (x, hx, cx.detach(), w_ih, w_hh, bias)
    opcheck(OPS.lstm_cell.default, cell_args, dtype)  # the composite op: inference
    opcheck(OPS.lstm_cell.default, tuple(t.requires_grad_() for t in cell_args), dtype)


# ---- Inductor ----------------------------------------------------------------------------------


def _outputs_and_grads(f, inputs, params, grad):
    """f(*inputs)'s tensor outputs, then (grad) the gradients of the inputs and params that
    require grad, for a fixed random weighting of the outputs."""
    inputs = [t.detach().clone().requires_grad_(grad and t.is_floating_point()) for t in inputs]
    with torch.set_grad_enabled(grad):
        outs = f(*inputs)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    if not grad:
        return outs
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    leaves = [t for t in (*inputs, *params) if t.requires_grad]
    return [*outs, *torch.autograd.grad(loss, leaves)]


def _check_compiled(compile_fn, f, inputs, params, dtype, grad, compiled_f=None):
    """compile_fn(f) (or the given compiled_f) against f on inputs: outputs and gradients."""
    eager = _outputs_and_grads(f, inputs, params, grad)
    compiled = _outputs_and_grads(compiled_f or compile_fn(f), inputs, params, grad)
    assert len(compiled) == len(eager)
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert c.shape == e.shape and c.dtype == e.dtype, i
        assert not c.isnan().any(), f"result {i} has NaN"
        torch.testing.assert_close(c, e, **COMPILE_TOL[dtype], msg=f"result {i} differs")


# Every dtype, with and without gradients (one Inductor compile costs seconds: each case covers
# several options and the cases share the dtypes and modes between the modules).
LSTM_CASES = [
    pytest.param(torch.float32, False, {}, id="fp32-inference"),  # issue 18's heap corruption
    pytest.param(torch.float32, True, dict(bidirectional=True, proj_size=3), id="fp32-train"),
    pytest.param(torch.float64, True, dict(layer_norm=True), id="fp64-train-layer-norm"),
    pytest.param(torch.bfloat16, False, dict(proj_size=3, batch_first=True),
                 id="bf16-inference"),
    pytest.param(torch.float16, True, dict(zoneout=(0.2, 0.1)), id="fp16-train-zoneout"),
]


@pytest.mark.parametrize("dtype,grad,options", LSTM_CASES)
def test_inductor_lstm_matches_eager(inductor, dtype, grad, options):
    lstm = fastattn.LSTM(8, 16, num_layers=2, **options).to(dtype).eval()
    x = randn(3, 6, 8, dtype=dtype) if options.get("batch_first") else randn(6, 3, 8,
                                                                              dtype=dtype)
    h0 = randn(2 * (2 if options.get("bidirectional") else 1), 3,
               options.get("proj_size") or 16, dtype=dtype)
    c0 = randn(h0.shape[0], 3, 16, dtype=dtype)

    def f(x, h0, c0):
        out, (h_n, c_n) = lstm(x, (h0, c0))
        return out, h_n, c_n

    _check_compiled(inductor, f, (x, h0, c0), list(lstm.parameters()), dtype, grad)


# fp32 training at B = 5 takes the gates from fastattn::lstm_step_gates (avx2 and avx512).
# bf16 inference: one-step calls take their gates from GEMMs with the weights on the left
# where bf16 runs on AMX (csrc/lstm/lstm_cpu.cpp, lstm_layer_infer).
@pytest.mark.parametrize("dtype,grad", [(torch.float32, False), (torch.float32, True),
                                        (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32-inference", "fp32-train", "bf16-inference", "bf16-train"])
def test_inductor_lstm_cell_matches_eager(inductor, dtype, grad):
    cell = fastattn.LSTMCell(8, 16).to(dtype)
    inputs = (randn(5, 8, dtype=dtype), randn(5, 16, dtype=dtype), randn(5, 16, dtype=dtype))

    def f(x, h, c):  # two steps: the second reads the first's state
        h, c = cell(x, (h, c))
        return cell(x * 2, (h, c))

    _check_compiled(inductor, f, inputs, list(cell.parameters()), dtype, grad)


@pytest.mark.parametrize("grad", [False, True], ids=["fp32-inference", "fp32-train"])
def test_inductor_multihead_attention_matches_eager(inductor, grad):
    """Projections of 66 and 80 rows: fastattn::linear where its GEMM beats torch.mm's (AMD
    CPUs), F.linear elsewhere."""
    mha = fastattn.MultiheadAttention(16, 2, batch_first=True)

    def f(x, kv):
        return mha(x, kv, kv, need_weights=False)[0]

    _check_compiled(inductor, f, (randn(2, 33, 16), randn(2, 40, 16)), list(mha.parameters()),
                    torch.float32, grad)


ATTENTION_CASES = [
    pytest.param(torch.float32, True, "mask", id="fp32-train-mask"),
    pytest.param(torch.bfloat16, True, "flash-options", id="bf16-train-window-softcap-alibi"),
    pytest.param(torch.float16, False, "gqa-causal", id="fp16-inference-gqa-causal"),
    pytest.param(torch.bfloat16, True, "float32-mask-broadcast",
                 id="bf16-train-float32-mask-broadcast-kv"),
]


@pytest.mark.parametrize("dtype,grad,case", ATTENTION_CASES)
def test_inductor_attention_matches_eager(inductor, dtype, grad, case):
    q, k, v = randn(2, 4, 7, 16, dtype=dtype), randn(2, 2, 9, 16, dtype=dtype), randn(
        2, 2, 9, 16, dtype=dtype)
    mask, slopes = torch.rand(7, 9) > 0.3, torch.rand(4)
    float_mask = torch.randn(7, 9) * 3

    def f(q, k, v):
        if case == "mask":
            kv = (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
            return fastattn.scaled_dot_product_attention(q * 2, *kv, attn_mask=mask) + 1
        if case == "float32-mask-broadcast":  # one kv head broadcast to all, as torch takes it
            return fastattn.scaled_dot_product_attention(q, k[:, :1], v[:, :1],
                                                         attn_mask=float_mask)
        if case == "gqa-causal":
            return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         enable_gqa=True)
        return fastattn.attention(q, k, v, window=(3, 2), softcap=4.0, causal=True,
                                  causal_align="bottom_right", alibi_slopes=slopes)

    _check_compiled(inductor, f, (q, k, v), [], dtype, grad)


def test_inductor_dynamic_shapes_compile_once(inductor):
    """torch.compile(dynamic=True): other sequence lengths and batch sizes reuse the one graph
    (the backend choice must not need them; head dims are specialized), forward and backward."""
    def f(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    compiled = inductor(f, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B, L, S in ((2, 7, 9), (5, 12, 20)):  # all distinct from H and E: no duck sizing
            q, k, v = randn(B, 3, L, 16), randn(B, 3, S, 16), randn(B, 3, S, 16)
            _check_compiled(inductor, f, (q, k, v), [], torch.float32, True, compiled)
