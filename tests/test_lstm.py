"""fastattn.LSTM / fastattn.LSTMCell against torch.nn.LSTM / nn.LSTMCell and plain references."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference
from torch.nn.utils.rnn import pack_padded_sequence

import fastattn

FLAG_NAMES = ("num_layers", "bidirectional", "proj_size", "batch_first", "bias")
FLAG_CASES = [
    pytest.param(dict(zip(FLAG_NAMES, values, strict=True)),
                 id="L{}-{}-P{}-{}-{}".format(values[0], "bi" if values[1] else "uni", values[2],
                                              "bf" if values[3] else "tf",
                                              "bias" if values[4] else "nobias"))
    for values in itertools.product((1, 2), (False, True), (0, 3), (False, True), (True, False))
]


def _pair(flags: dict, dtype=torch.float64, **extra) -> tuple[torch.nn.LSTM, fastattn.LSTM]:
    theirs = torch.nn.LSTM(5, 7, dtype=dtype, **flags)
    ours = fastattn.LSTM(5, 7, dtype=dtype, **flags, **extra)
    ours.load_state_dict(theirs.state_dict(), strict=not extra.get("layer_norm", False))
    return theirs, ours


def _state(flags: dict, batch: int | None, dtype=torch.float64):
    layers = flags.get("num_layers", 1) * (2 if flags.get("bidirectional") else 1)
    p = flags.get("proj_size", 0) or 7
    lead = (layers,) if batch is None else (layers, batch)
    return torch.randn(*lead, p, dtype=dtype), torch.randn(*lead, 7, dtype=dtype)


def _run(module, x, hx, weights):
    """Forward, then the gradients of a loss using every output, for x, hx and the weights."""
    out, (h_n, c_n) = module(x, hx)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = (data * torch.linspace(-1, 1, data.shape[-1], dtype=data.dtype)).sum() \
        + (h_n ** 2).sum() + 0.5 * c_n.sum()
    leaves = [x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x, *hx, *weights]
    return (data, h_n, c_n), torch.autograd.grad(loss, leaves, retain_graph=True)


def _assert_same_on_packed(theirs, ours, x, lengths, enforce_sorted, hx, seed=None):
    """Both modules on x packed with lengths (each run seeded with seed, if given): the packed
    output, the final states and every gradient agree."""
    results = []
    for module in (theirs, ours):
        if seed is not None:
            torch.manual_seed(seed)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        results.append(_run(module, packed, hx, list(module.parameters())))
    (outs_t, grads_t), (outs_o, grads_o) = results
    _assert_same(outs_o, outs_t, ("packed output", "h_n", "c_n"))
    names = ["grad packed input", "grad h0", "grad c0"] + [n for n, _ in ours.named_parameters()]
    _assert_same(grads_o, grads_t, names)


def _assert_same(ours, theirs, names, atol=1e-10):
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _assert_same_on_padded(theirs, ours, flags, T, B):
    """Both modules on a padded [T, B, 5] input (batch-first where flags say) and a random
    state: the output, the final states and every gradient agree."""
    shape = (B, T, 5) if flags["batch_first"] else (T, B, 5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = [t.requires_grad_() for t in _state(flags, B)]
    outs_t, grads_t = _run(theirs, x, hx, list(theirs.parameters()))
    outs_o, grads_o = _run(ours, x, hx, list(ours.parameters()))
    _assert_same(outs_o, outs_t, ("output", "h_n", "c_n"))
    names = ["grad input", "grad h0", "grad c0"] + [f"grad {n}" for n, _ in ours.named_parameters()]
    _assert_same(grads_o, grads_t, names)


@pytest.mark.parametrize("flags", FLAG_CASES)
def test_lstm_matches_torch(flags):
    _assert_same_on_padded(*_pair(flags), flags, T=4, B=3)


# The batch picks the kernels' lanes (along the units below two float32 vectors of rows: 32 on
# avx512, 16 on avx2; float64 vectors hold 8 rows on avx512, 4 on avx2): B = 1 along the units;
# B = 40, and on avx2 16 and 17, along the batch, in panels of several vectors, the last one
# partial at 17 and 40. test_lstm_matches_torch runs every flag at B = 3 (unit lanes) only.
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("B", [1, 16, 17, 40])
@pytest.mark.parametrize("flags", [
    dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True, bias=True),
    dict(num_layers=1, bidirectional=False, proj_size=0, batch_first=False, bias=False),
], ids=["L2-bi-P3-bf-bias", "L1-uni-P0-tf-nobias"])
def test_lstm_matches_torch_at_every_lane_layout(flags, B, packed):
    theirs, ours = _pair(flags)
    T = 4
    if not packed:
        _assert_same_on_padded(theirs, ours, flags, T, B)
        return
    hx = [t.requires_grad_() for t in _state(flags, B)]
    lengths = [1 + (5 * b) % T for b in range(B)]  # 1 .. T, unsorted: rows stop within a vector
    x = torch.randn(T, B, 5, dtype=torch.float64, requires_grad=True)
    _assert_same_on_packed(theirs, ours, x, lengths, False, hx)


def test_lstm_without_hx_and_unbatched():
    flags = dict(num_layers=2, bidirectional=True, proj_size=3)
    theirs, ours = _pair(flags)
    x = torch.randn(6, 5, dtype=torch.float64)
    for hx in (None, _state(flags, None)):  # unbatched [T, I], state [L * D, P]
        o_t, (h_t, c_t) = theirs(x, hx)
        o_o, (h_o, c_o) = ours(x, hx)
        _assert_same((o_o, h_o, c_o), (o_t, h_t, c_t), ("output", "h_n", "c_n"))
        assert o_o.shape == (6, 6) and h_o.shape == (4, 3)
    xb = torch.randn(4, 2, 5, dtype=torch.float64)
    _assert_same([t for o in ours(xb) for t in (o if isinstance(o, tuple) else (o,))],
                 [t for o in theirs(xb) for t in (o if isinstance(o, tuple) else (o,))],
                 ("output", "h_n", "c_n"))


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("flags", [dict(num_layers=1), dict(num_layers=2, bidirectional=True),
                                   dict(bidirectional=True, proj_size=3)],
                         ids=["L1", "L2-bi", "bi-proj"])
def test_lstm_packed_sequences(flags, enforce_sorted):
    theirs, ours = _pair(flags)
    lengths = [7, 5, 5, 2, 1] if enforce_sorted else [2, 7, 1, 5, 4]
    x = torch.randn(7, 5, 5, dtype=torch.float64, requires_grad=True)
    hx = [t.requires_grad_() for t in _state(flags, 5)]
    _assert_same_on_packed(theirs, ours, x, lengths, enforce_sorted, hx)


def _assert_close_to_float64(module64, ours, theirs, x64, hx64, dtype):
    """ours and theirs (nn.LSTM), both in dtype, against module64 (float64, the same weights) on
    x64 and hx64: the outputs, final states and every gradient within the bound of
    assert_close_to_reference (2x torch's own error)."""
    results = {}
    for key, module, cast in (("64", module64, torch.float64), ("ours", ours, dtype),
                              ("torch", theirs, dtype)):
        x = x64.to(cast).requires_grad_()
        hx = [t.to(cast).requires_grad_() for t in hx64]
        results[key] = _run(module, x, hx, list(module.parameters()))
    for i, name in enumerate(["output", "h_n", "c_n"]):
        assert_close_to_reference(results["ours"][0][i], results["64"][0][i],
                                  results["torch"][0][i], name=name)
    grad_names = ["grad input", "grad h0", "grad c0"] + [n for n, _ in ours.named_parameters()]
    for i, name in enumerate(grad_names):
        assert_close_to_reference(results["ours"][1][i], results["64"][1][i],
                                  results["torch"][1][i], name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_lstm_low_precision_vs_float64(dtype):
    flags = dict(num_layers=2, bidirectional=True, proj_size=3)
    theirs64, ours64 = _pair(flags)
    theirs, ours = _pair(flags, dtype=dtype)
    ours.load_state_dict(ours64.state_dict())
    theirs.load_state_dict(ours64.state_dict())
    x64 = torch.randn(6, 4, 5, dtype=torch.float64)
    hx64 = _state(flags, 4)
    _assert_close_to_float64(ours64, ours, theirs, x64, hx64, dtype)


@pytest.mark.parametrize("engine", ["brgemm", "torch"])
@pytest.mark.parametrize("B", [5, 16, 24, 40])
def test_lstm_fp32_training_vs_float64(engine, B, monkeypatch):
    """Float32 training at batches whose lanes run along the units (B = 5 and 24: row-major
    x_proj, its projection on fastattn::linear, 216 rows at B = 24, too few for brgemm at B = 5) and
    along the batch (16, 40: step-major x_proj): the weight gradients are one product over every
    step of the feature-major gate gradients (cpu_gemm.cpp's brgemm, or torch.mm where
    FASTATTN_LSTM_GEMM=torch), each direction's steps paired with its own h_prev. Off every
    block: 4H = 100 rows, I = 37, T = 9, both directions, two layers."""
    monkeypatch.setenv("FASTATTN_LSTM_GEMM", engine)
    flags = dict(num_layers=2, bidirectional=True)
    theirs64 = torch.nn.LSTM(37, 25, dtype=torch.float64, **flags)
    ours, theirs = fastattn.LSTM(37, 25, **flags), torch.nn.LSTM(37, 25, **flags)
    ours.load_state_dict(theirs64.state_dict())
    theirs.load_state_dict(theirs64.state_dict())
    x64 = torch.randn(9, B, 37, dtype=torch.float64)
    hx64 = [torch.randn(4, B, 25, dtype=torch.float64) for _ in range(2)]
    _assert_close_to_float64(theirs64, ours, theirs, x64, hx64, torch.float32)


@pytest.mark.parametrize("engine,bias,B,strided", [
    ("brgemm", True, 17, False), ("brgemm", False, 17, False), ("brgemm", True, 17, True),
    ("brgemm", True, 48, True), ("brgemm", False, 48, False), ("torch", True, 17, False)])
def test_lstm_fp32_inference_projection_vs_float64(engine, bias, B, strided, monkeypatch):
    """The float32 inference input projection (csrc/cpu_gemm.cpp, or torch.mm where
    FASTATTN_LSTM_GEMM=torch) at sizes off every block: 4H = 600, I = 520 (two reduction
    blocks), both directions, with and without the bias. B = 17 (lanes along the units) computes
    a row-major x_proj, two chunks of 102 and 8 steps (1734 and 136 rows, neither a whole number
    of 64-row blocks); B = 48 (lanes along the batch) a step-major one, three chunks of 36 steps
    and a last of 2 (1728 and 96 columns). A strided input is the GEMM's column operand there,
    and takes torch.mm at B = 17 (brgemm reads rows with unit stride)."""
    monkeypatch.setenv("FASTATTN_LSTM_GEMM", engine)
    flags = dict(bidirectional=True, bias=bias)
    theirs64 = torch.nn.LSTM(520, 150, dtype=torch.float64, **flags)
    ours, theirs = fastattn.LSTM(520, 150, **flags), torch.nn.LSTM(520, 150, **flags)
    ours.load_state_dict(theirs64.state_dict())
    theirs.load_state_dict(theirs64.state_dict())
    x64 = torch.randn(110, B, 1040, dtype=torch.float64)[..., ::2] if strided else \
        torch.randn(110, B, 520, dtype=torch.float64)
    hx64 = [torch.randn(2, B, 150, dtype=torch.float64) for _ in range(2)]
    results = {}
    with torch.no_grad():
        for key, module in (("64", theirs64), ("ours", ours), ("torch", theirs)):
            dtype = torch.float64 if key == "64" else torch.float32
            out, (h_n, c_n) = module(x64.to(dtype), [t.to(dtype) for t in hx64])
            results[key] = [out, h_n, c_n]
    for name, a, r, t in zip(["output", "h_n", "c_n"], results["ours"], results["64"],
                             results["torch"], strict=True):
        assert_close_to_reference(a, r, t, name=name)


def test_dropout_between_layers_matches_torch_in_training_only():
    theirs, ours = _pair(dict(num_layers=3, dropout=0.5))
    x = torch.randn(5, 3, 5, dtype=torch.float64)
    torch.manual_seed(11)
    o_t = theirs(x)[0]
    torch.manual_seed(11)
    o_o = ours(x)[0]
    torch.testing.assert_close(o_o, o_t, rtol=1e-9, atol=1e-10)  # same masks from the same RNG
    torch.manual_seed(11)
    assert not torch.allclose(ours(x)[0], ours.eval()(x)[0])
    torch.testing.assert_close(ours(x)[0], theirs.eval()(x)[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
def test_dropout_between_layers_on_packed_input_matches_torch(enforce_sorted):
    """nn.LSTM drops out the packed rows; dropping out the padded [T, B, *] tensor instead drew
    other masks from the same seed (and a padded row's draw for nothing)."""
    theirs, ours = _pair(dict(num_layers=3, dropout=0.5, bidirectional=True))
    lengths = [5, 4, 4, 2, 1] if enforce_sorted else [2, 5, 1, 4, 4]
    x = torch.randn(5, 5, 5, dtype=torch.float64, requires_grad=True)
    hx = [t.requires_grad_() for t in _state(dict(num_layers=3, bidirectional=True), 5)]
    _assert_same_on_packed(theirs, ours, x, lengths, enforce_sorted, hx, seed=11)


def test_seeded_init_and_state_dict_both_ways():
    flags = dict(num_layers=2, bidirectional=True, proj_size=2)
    torch.manual_seed(3)
    theirs = torch.nn.LSTM(5, 7, **flags)
    torch.manual_seed(3)
    ours = fastattn.LSTM(5, 7, **flags)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert a.shape == b.shape and torch.equal(a, b), name
    fresh = torch.nn.LSTM(5, 7, **flags)
    fresh.load_state_dict(ours.state_dict())
    ours2 = fastattn.LSTM(5, 7, **flags)
    ours2.load_state_dict(fresh.state_dict())
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(ours2(x)[0], theirs(x)[0])
    torch.manual_seed(4)
    cell_t = torch.nn.LSTMCell(5, 7)
    torch.manual_seed(4)
    cell_o = fastattn.LSTMCell(5, 7)
    for (name, a), b in zip(cell_o.state_dict().items(), cell_t.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ours.flatten_parameters()  # exists and changes nothing
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
def test_lstm_cell_matches_torch(batched, bias, with_hx):
    theirs = torch.nn.LSTMCell(6, 9, bias=bias, dtype=torch.float64)
    ours = fastattn.LSTMCell(6, 9, bias=bias, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    lead = (4,) if batched else ()
    x = torch.randn(*lead, 6, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(*lead, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    results = []
    for module in (theirs, ours):
        h, c = module(x, hx if with_hx else None)
        leaves = [x, *(hx if with_hx else ()), *module.parameters()]
        results.append(((h, c), torch.autograd.grad((h * h).sum() + c.sum(), leaves)))
    _assert_same(results[1][0], results[0][0], ("h", "c"))
    _assert_same(results[1][1], results[0][1], [f"grad {i}" for i in range(len(results[0][1]))])


def _cells_fp64_torch_ours(input_size: int, hidden_size: int, dtype=torch.float32):
    """A float64 nn.LSTMCell (the reference: torch's own op, sharing no code with ours), and
    nn.LSTMCell and fastattn.LSTMCell of ``dtype`` with its weights."""
    cell64 = torch.nn.LSTMCell(input_size, hidden_size, dtype=torch.float64)
    theirs = torch.nn.LSTMCell(input_size, hidden_size, dtype=dtype)
    ours = fastattn.LSTMCell(input_size, hidden_size, dtype=dtype)
    theirs.load_state_dict(cell64.state_dict())
    ours.load_state_dict(cell64.state_dict())
    return cell64, theirs, ours


# Batch sizes 7, 40, 70: the inference input projection's panels 16 and 48 wide (a narrow b,
# csrc/cpu_gemm.cpp), then 64 wide with a partial second block.
@pytest.mark.parametrize("B", [7, 40, 70])
def test_lstm_cell_fp32_vs_float64(B):
    cell64, theirs, ours = _cells_fp64_torch_ours(33, 17)
    x = torch.randn(B, 33, dtype=torch.float64)
    hx = (torch.randn(B, 17, dtype=torch.float64), torch.randn(B, 17, dtype=torch.float64))
    want = cell64(x, hx)
    theirs_out = theirs(x.float(), tuple(t.float() for t in hx))
    # With grad the cell runs two GEMMs and the fused pointwise op, without it the fused
    # one-step layer kernel (fastattn/ops/lstm.py's lstm_cell).
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            ours_out = ours(x.float(), tuple(t.float() for t in hx))
        for name, a, b, c in zip("hc", ours_out, want, theirs_out, strict=True):
            assert_close_to_reference(a, b, c, name=f"{name} (grad {grad})")


# Training steps: the gates from fastattn::lstm_step_gates, on its GEMV-style kernel for float32
# batches below 64 on AVX-512 (B 1, 7, 17, 40) and 16 on AVX2 (B 1, 7), else on two GEMMs (B 70,
# every bfloat16 and float16 batch), except where fastattn::linear's GEMM beats torch.mm's
# (float32 B 70 on AVX-512 AMD CPUs: two fastattn::linear calls). Every gradient against
# float64, within twice torch's own error.
@pytest.mark.parametrize("B", [1, 7, 17, 40, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lstm_cell_gradients_vs_float64(B, dtype):
    cell64, theirs, ours = _cells_fp64_torch_ours(33, 17, dtype)
    x, h, c, grad_h, grad_c = (torch.randn(B, n, dtype=torch.float64) for n in (33, 17, 17, 17, 17))

    def gradients(module, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, h, c)]
        hy, cy = module(leaves[0], (leaves[1], leaves[2]))
        loss = (hy * grad_h.to(dtype)).sum() + (cy * grad_c.to(dtype)).sum()
        return torch.autograd.grad(loss, [*leaves, *module.parameters()])

    names = ("input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
    for name, a, b, t in zip(names, gradients(ours, dtype), gradients(cell64, torch.float64),
                             gradients(theirs, dtype), strict=True):
        assert_close_to_reference(a, b, t, name=f"grad {name}")


# ---- extras: layer_norm, zoneout, recurrent_dropout vs a plain per-step reference ---------------


def _layer_norm(v, weight, bias, eps):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = (v - mean) / torch.sqrt(var + eps) * weight
    return out if bias is None else out + bias


def _extras_reference(m: fastattn.LSTM, x, h0, c0):
    """nn.LSTM's math plus the extras, step by step; draws its masks from the RNG in the order
    the module documents (per layer and direction: weight_hh mask, cell zoneout, hidden zoneout)."""
    T, B, _ = x.shape
    H, D = m.hidden_size, 2 if m.bidirectional else 1
    P = m.proj_size or H
    p_cell, p_hidden = m.zoneout
    h_n, c_n = [], []
    for layer in range(m.num_layers):
        outs = []
        for d, sfx in enumerate(("", "_reverse")[:D]):
            def get(kind, layer=layer, sfx=sfx):
                return getattr(m, f"{kind}_l{layer}{sfx}", None)
            w_hh = get("weight_hh")
            if m.training and m.recurrent_dropout > 0:
                keep = 1 - m.recurrent_dropout
                w_hh = w_hh * torch.bernoulli(torch.full_like(w_hh, keep)) / keep
            masks = []
            for p, width in ((p_cell, H), (p_hidden, P)):
                full = torch.full((T, B, width), p, dtype=x.dtype)
                masks.append(None if p == 0 else torch.bernoulli(full) if m.training else full)
            k = layer * D + d
            h, c = h0[k], c0[k]
            hs = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                gi, gh = x[t] @ get("weight_ih").t(), h @ w_hh.t()
                if m.layer_norm:
                    gi = _layer_norm(gi, get("layer_norm_ih"), None, m.layer_norm_eps)
                    gh = _layer_norm(gh, get("layer_norm_hh"), None, m.layer_norm_eps)
                gates = gi + gh
                if m.bias:
                    gates = gates + get("bias_ih") + get("bias_hh")
                i, f, g, o = gates.chunk(4, -1)
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                if m.layer_norm:
                    c_new = _layer_norm(c_new, get("layer_norm_c_weight"), get("layer_norm_c_bias"),
                                        m.layer_norm_eps)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
                if m.proj_size:
                    h_new = h_new @ get("weight_hr").t()
                c = c_new if masks[0] is None else masks[0][t] * c + (1 - masks[0][t]) * c_new
                h = h_new if masks[1] is None else masks[1][t] * h + (1 - masks[1][t]) * h_new
                hs[t] = h
            outs.append(torch.stack(hs))
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, -1)
        if m.training and m.dropout > 0 and layer < m.num_layers - 1:
            x = F.dropout(x, m.dropout)
    return x, (torch.stack(h_n), torch.stack(c_n))


EXTRA_CASES = [
    pytest.param(dict(layer_norm=True), True, id="layer_norm-train"),
    pytest.param(dict(layer_norm=True, proj_size=3, bidirectional=True), False,
                 id="layer_norm-proj-bi-eval"),
    pytest.param(dict(zoneout=(0.3, 0.2)), True, id="zoneout-train"),
    pytest.param(dict(zoneout=(0.3, 0.2), proj_size=3), False, id="zoneout-proj-eval"),
    pytest.param(dict(zoneout=(0.0, 0.4), bidirectional=True), True, id="zoneout-hidden-bi-train"),
    pytest.param(dict(recurrent_dropout=0.3, num_layers=2, dropout=0.2), True,
                 id="recurrent_dropout-train"),
    pytest.param(dict(recurrent_dropout=0.3), False, id="recurrent_dropout-eval"),
    pytest.param(dict(layer_norm=True, zoneout=(0.2, 0.2), recurrent_dropout=0.2, num_layers=2),
                 True, id="all-train"),
]


@pytest.mark.parametrize("options,training", EXTRA_CASES)
def test_extras_match_plain_reference(options, training):
    flag_keys = ("num_layers", "bidirectional", "proj_size", "dropout")
    flags = {k: v for k, v in options.items() if k in flag_keys}
    extra = {k: v for k, v in options.items() if k not in flag_keys}
    m = fastattn.LSTM(5, 7, dtype=torch.float64, **flags, **extra).train(training)
    with torch.no_grad():  # layer-norm gains away from their init of ones / zeros
        for name, p in m.named_parameters():
            if name.startswith("layer_norm_"):
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(5, 3, 5, dtype=torch.float64, requires_grad=True)
    hx = [t.requires_grad_() for t in _state(flags, 3)]
    torch.manual_seed(21)
    outs_o, grads_o = _run(m, x, hx, list(m.parameters()))
    torch.manual_seed(21)
    outs_r, grads_r = _run(lambda x, hx: _extras_reference(m, x, *hx), x, hx, list(m.parameters()))
    _assert_same(outs_o, outs_r, ("output", "h_n", "c_n"))
    _assert_same(grads_o, grads_r, ["grad x", "grad h0", "grad c0"]
                 + [n for n, _ in m.named_parameters()])


CELL_EXTRA_CASES = [
    pytest.param(dict(layer_norm=True), True, True, id="layer_norm-train"),
    pytest.param(dict(layer_norm=True), False, False, id="layer_norm-eval-unbatched"),
    pytest.param(dict(zoneout=(0.3, 0.2)), True, True, id="zoneout-train"),
    pytest.param(dict(zoneout=(0.3, 0.2)), False, True, id="zoneout-eval"),
    pytest.param(dict(recurrent_dropout=0.3), True, True, id="recurrent_dropout-train"),
    pytest.param(dict(layer_norm=True, zoneout=(0.2, 0.4), recurrent_dropout=0.2), True, False,
                 id="all-train-unbatched"),
]


@pytest.mark.parametrize("options,training,batched", CELL_EXTRA_CASES)
def test_cell_extras_match_one_lstm_step(options, training, batched):
    """LSTMCell's extras compute one step of a one-layer LSTM with the same weights and masks
    (the LSTM's extras are checked against the plain reference above)."""
    lstm = fastattn.LSTM(5, 7, dtype=torch.float64, **options).train(training)
    cell = fastattn.LSTMCell(5, 7, dtype=torch.float64, **options).train(training)
    with torch.no_grad():
        for name, p in cell.named_parameters():
            p.copy_(getattr(lstm, f"{name}_l0") + (0.3 * torch.randn_like(p)
                                                   if name.startswith("layer_norm_") else 0))
            getattr(lstm, f"{name}_l0").copy_(p)
    lead = (3,) if batched else ()
    x = torch.randn(*lead, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(*lead, 7, dtype=torch.float64, requires_grad=True)
    c = torch.randn(*lead, 7, dtype=torch.float64, requires_grad=True)
    params = list(cell.parameters())
    torch.manual_seed(5)
    hy, cy = cell(x, (h, c))
    grads = torch.autograd.grad((hy * hy).sum() + cy.sum(), [x, h, c, *params])
    torch.manual_seed(5)
    _, (h_n, c_n) = lstm(x.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))  # T = 1, one layer
    want_h, want_c = h_n[0], c_n[0]
    lstm_params = [getattr(lstm, f"{n}_l0") for n, _ in cell.named_parameters()]
    want_grads = torch.autograd.grad((want_h * want_h).sum() + want_c.sum(),
                                     [x, h, c, *lstm_params])
    _assert_same((hy, cy), (want_h, want_c), ("h", "c"))
    _assert_same(grads, want_grads, ["grad x", "grad h", "grad c"]
                 + [n for n, _ in cell.named_parameters()])
    if training and options.get("zoneout"):  # the masks are drawn: another seed differs
        torch.manual_seed(6)
        assert not torch.equal(cell(x, (h, c))[1], cy)


def test_cell_extras_bad_options_raise():
    with pytest.raises(ValueError, match="zoneout"):
        fastattn.LSTMCell(5, 7, zoneout=(0.5, 1.0))
    with pytest.raises(ValueError, match="recurrent_dropout"):
        fastattn.LSTMCell(5, 7, recurrent_dropout=1.0)


def test_zoneout_and_recurrent_dropout_are_random_in_training_only():
    m = fastattn.LSTM(5, 7, zoneout=(0.3, 0.3), recurrent_dropout=0.3)
    x = torch.randn(4, 2, 5)
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x)[0])
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0], rtol=0, atol=0)


def test_backward_in_eval_mode():
    theirs, ours = _pair(dict(num_layers=2, dropout=0.3))
    theirs.eval()
    ours.eval()
    x = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    hx = [t.requires_grad_() for t in _state(dict(num_layers=2), 2)]
    outs_t, grads_t = _run(theirs, x, hx, list(theirs.parameters()))
    outs_o, grads_o = _run(ours, x, hx, list(ours.parameters()))
    _assert_same(grads_o, grads_t, [f"grad {i}" for i in range(len(grads_t))])


def test_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fastattn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return self.head(out).sum() + h.sum()

    model = Model()
    x = torch.randn(2, 4, 5)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    loss = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_compile_fullgraph_inference():
    # Without gradients the cpu backend serves LSTM and LSTMCell with fastattn::lstm_layer_infer;
    # aot_eager traces it through its fake.
    lstm = fastattn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3).eval()
    cell = fastattn.LSTMCell(5, 8)
    x = torch.randn(4, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(lstm, fullgraph=True, backend="aot_eager")(x),
                                   lstm(x))
        torch.testing.assert_close(torch.compile(cell, fullgraph=True, backend="aot_eager")(x[0]),
                                   cell(x[0]))


# ---- bad inputs --------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    m = fastattn.LSTM(5, 7, num_layers=2)
    with pytest.raises(ValueError, match="5 features"):
        m(torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="3-D .* or 2-D"):
        m(torch.randn(3))
    with pytest.raises(RuntimeError, match=r"h_0 of shape \[2, 2, 7\]"):
        m(torch.randn(3, 2, 5), (torch.randn(2, 3, 7), torch.randn(2, 2, 7)))
    with pytest.raises(RuntimeError, match=r"c_0 of shape \[2, 2, 7\]"):
        m(torch.randn(3, 2, 5), (torch.randn(2, 2, 7), torch.randn(1, 2, 7)))
    with pytest.raises(RuntimeError, match="dtype"):
        m(torch.randn(3, 2, 5), (torch.randn(2, 2, 7).double(), torch.randn(2, 2, 7)))
    with pytest.raises(TypeError, match="input must be float32"):
        m(torch.ones(3, 2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="proj_size has to be smaller"):
        fastattn.LSTM(5, 7, proj_size=7)
    with pytest.raises(ValueError, match="zoneout"):
        fastattn.LSTM(5, 7, zoneout=(1.0, 0.0))
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(ValueError, match=r"w_ih must have shape \[4H, 3\]"):
        fastattn.lstm_cell(x, h, c, torch.randn(16, 5), w_hh)
    with pytest.raises(ValueError, match=r"w_hh must have shape \[16, 4\]"):
        fastattn.lstm_cell(x, h, c, w_ih, torch.randn(16, 5))
    with pytest.raises(ValueError, match=r"hx must have shape \[2, 4\]"):
        fastattn.lstm_cell(x, torch.randn(3, 4), c, w_ih, w_hh)
    with pytest.raises(TypeError, match="cx must have dtype torch.float32"):
        fastattn.lstm_cell(x, h, c.double(), w_ih, w_hh)
    with pytest.raises(ValueError, match=r"b_ih must have shape \[16\]"):
        fastattn.lstm_cell(x, h, c, w_ih, w_hh, torch.randn(15))
    with pytest.raises(ValueError, match="input must be"):
        fastattn.LSTMCell(3, 4)(torch.randn(2, 2, 3))
