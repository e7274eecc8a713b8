"""fastattn::lstm_ln_layer_* (the LayerNorm-LSTM layer ops): the CPU kernels (and on a GPU the
CUDA ones) against the plain-PyTorch reference (lstm_layer_reference(..., layer_norm=...)),
opcheck, gradcheck, torch.compile, and fastattn.LSTM(layer_norm=True) on the cpu (and cuda) vs
the reference backend."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    DTYPE_RTOL,
    LSTM_LAYER_CASES,
    OpRecorder,
    assert_close_to_reference,
    ln_layer_inputs,
    max_rel_error,
    nan_heap,
    randn,
)
from lstm_math import ln_layer_oracles

import fastattn
from fastattn.ops import lstm as lstm_ops

OPS = torch.ops.fastattn
EPS = 1e-5
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
needs_cpu_kernels = pytest.mark.skipif(
    not fastattn.backends()["cpu"].usable, reason="fastattn._C (CPU kernels) is not built")

CASES = [
    *LSTM_LAYER_CASES,
    pytest.param(dict(proj=False, zoneout=True, lengths=[5, 3, 3, 0], reverse=True),
                 id="packed-zoneout-reverse-empty_row"),
]
# (T, B, H, P with projection); B = 1 runs the first `lengths` entry only.
SHAPES = [pytest.param((5, 4, 7, 3), id="T5B4H7"), pytest.param((5, 4, 33, 9), id="T5B4H33"),
          pytest.param((5, 1, 33, 9), id="T5B1H33")]


# The CUDA ops (csrc/lstm/lstm_cuda.cpp: the C++ time loop around the LN step kernels of
# csrc/lstm/lstm_cell.cuh) run the same checks on a GPU; without one they skip, and their
# kernels run under the CUDA emulator (tests/test_cudasim.py, the "ln step" cases).
DEVICES = [pytest.param("cpu", id="cpu", marks=needs_cpu_kernels),
           pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _require_kernels(device: str) -> None:
    """Skips the cuda cases of an extension built without CUDA (saying so); fails when a build
    with CUDA lacks the LN ops' CUDA kernels."""
    if device == "cuda":
        if not fastattn.backends()["cuda"].built:
            pytest.skip(f"no CUDA kernels: {fastattn.backends()['cuda'].reason}")
        for op in ("lstm_ln_layer_fwd", "lstm_ln_layer_bwd"):
            assert lstm_ops._has_kernel(op, "CUDA"), f"fastattn._C has no CUDA kernel for {op}"


def _on(device: str, *tensors):
    """The tensors on ``device`` (None stays None); batch_sizes is not among them (CPU always)."""
    return [None if t is None else t.to(device) for t in tensors]


def _poison(device: str, *shapes: tuple[int, ...], dtype: torch.dtype) -> None:
    if device == "cpu":
        nan_heap(*shapes, dtype=dtype)
    else:  # freed NaN blocks the CUDA caching allocator hands to the op's same-size outputs
        blocks = [torch.full(s, float("nan"), dtype=dtype, device=device) for s in shapes]
        del blocks


# Every shape on the CPU; on a GPU the odd one with B > 1 (the GPU test step's time is shared by
# every gpu test: the float64 reference runs on the host).
DEVICE_SHAPES = [
    *(pytest.param("cpu", *shape.values, id=f"cpu-{shape.id}", marks=needs_cpu_kernels)
      for shape in SHAPES),
    pytest.param("cuda", SHAPES[1].values[0], id=f"cuda-{SHAPES[1].id}", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device, shape", DEVICE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES)
def test_fwd_bwd_match_reference(dtype, shape, case, device):
    _require_kernels(device)
    T, B, H, P = shape
    x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = ln_layer_inputs(
        T, B, H, P, dtype, proj=case["proj"], zoneout=case["zoneout"], lengths=case["lengths"])
    P = h0.shape[1]
    reverse = case["reverse"]
    _poison(device, (T, B, P), (T, B, H), (T, B, 4 * H), dtype=dtype)
    out = OPS.lstm_ln_layer_fwd(*_on(device, x_proj, h0, c0, w_hh, *ln), EPS,
                                *_on(device, w_hr), batch_sizes, reverse, *_on(device, zc, zh))
    assert all(t.device.type == device for t in out)
    out = [t.cpu() for t in out]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    assert [t.dtype for t in out] == [dtype, dtype, opmath, dtype, opmath, opmath, opmath]

    grad_h_all, grad_c_all = randn(T, B, P, dtype=dtype), randn(T, B, H, dtype=dtype)
    ref64, ref_t, saved64, want, same_dtype = ln_layer_oracles(
        (x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh), reverse, EPS, grad_h_all,
        grad_c_all)
    names = ("h_all", "c_all", "gates_all", "hpre_all")
    for name, got, want_, same_dtype_ in zip(names, out[:4], ref64, ref_t, strict=True):
        assert_close_to_reference(got, want_, same_dtype_, dtype=dtype, name=name)
    for name, got, want_ in zip(("hh_norm_all", "c_norm_all", "rstd_all"), out[4:], saved64,
                                strict=True):
        # no same-dtype PyTorch run to compare with: the dtype's budget (bf16: 2e-2)
        assert_close_to_reference(got, want_, dtype=dtype, name=name)
    if w_hr is None:
        assert out[3].numel() == 0

    _poison(device, (T, B, 4 * H), (B, P), (B, H), (4 * H, P), dtype=dtype)
    got = OPS.lstm_ln_layer_bwd(*_on(device, grad_h_all, grad_c_all, h0, c0, w_hh, *ln, w_hr),
                                batch_sizes, reverse, *_on(device, zc, zh, *out))
    got = [t.cpu() for t in got]
    grad_names = ("grad_x_proj", "grad_h0", "grad_c0", "grad_w_hh", "grad_ln_hh_weight",
                  "grad_ln_c_weight", "grad_ln_c_bias", "grad_w_hr")
    for i, wanted in enumerate(want):
        assert_close_to_reference(got[i], wanted, same_dtype[i], name=grad_names[i])
    if w_hr is None:
        assert got[7].numel() == 0
    if batch_sizes is not None:  # rows that do not step get no gradient into x_proj
        for t, n in enumerate(batch_sizes.tolist()):
            assert torch.equal(got[0][t, n:], torch.zeros_like(got[0][t, n:]))


@needs_cpu_kernels
def test_single_step_against_hand_written_math():
    """One step of the op against LayerNorm written out by hand (not via the reference)."""
    B, H = 3, 5
    x_proj, h0, c0, w_hh, ln, *_ = ln_layer_inputs(1, B, H, H, torch.float64, proj=False,
                                                   zoneout=False, lengths=None)
    h_all, c_all, *_ = OPS.lstm_ln_layer_fwd(x_proj, h0, c0, w_hh, *ln, EPS, None, None, False,
                                             None, None)

    def layer_norm(v):
        mean = v.mean(-1, keepdim=True)
        return (v - mean) / ((v - mean).pow(2).mean(-1, keepdim=True) + EPS).sqrt()

    gates = x_proj[0] + layer_norm(h0 @ w_hh.t()) * ln[0]
    i, f, g, o = gates.chunk(4, -1)
    c = layer_norm(f.sigmoid() * c0 + i.sigmoid() * g.tanh()) * ln[1] + ln[2]
    torch.testing.assert_close(c_all[0], c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_all[0], o.sigmoid() * c.tanh(), rtol=1e-12, atol=1e-12)


@needs_cpu_kernels
def test_ops_reject_bad_arguments():
    x_proj, h0, c0, w_hh, ln, *_ = ln_layer_inputs(4, 3, 8, 8, torch.float32, proj=False,
                                                   zoneout=False, lengths=None)
    with pytest.raises(RuntimeError, match=r"ln_hh_weight must have shape \[32\]"):
        OPS.lstm_ln_layer_fwd(x_proj, h0, c0, w_hh, ln[0][:8], ln[1], ln[2], EPS, None, None,
                              False, None, None)
    with pytest.raises(RuntimeError, match="ln_c_bias must have dtype"):
        OPS.lstm_ln_layer_fwd(x_proj, h0, c0, w_hh, ln[0], ln[1], ln[2].double(), EPS, None, None,
                              False, None, None)
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        OPS.lstm_ln_layer_fwd(x_proj, h0, c0, w_hh, *ln, EPS, None, torch.tensor([1, 3, 3, 3]),
                              False, None, None)
    out = OPS.lstm_ln_layer_fwd(x_proj, h0, c0, w_hh, *ln, EPS, None, None, False, None, None)
    with pytest.raises(RuntimeError, match="rstd_all must be a CPU Float tensor"):
        OPS.lstm_ln_layer_bwd(torch.ones_like(out[0]), torch.ones_like(out[1]), h0, c0, w_hh, *ln,
                              None, None, False, None, None, *out[:6], out[6].double())


@pytest.mark.parametrize("device", DEVICES)
def test_zero_hidden_size(device):
    """H == 0: every state, gate and gradient is zero-size (the backward too), but rstd_all
    [T, B, 2] is not: it must be written (zeros, as for rows that do not step), not left as
    allocated. Deterministic mode makes every torch.empty start as NaN (the module: test_dropin)."""
    _require_kernels(device)
    T, B = 3, 2
    x_proj, h0, c0, w_hh, ln, *_ = ln_layer_inputs(T, B, 0, 0, torch.float32, proj=False,
                                                   zoneout=False, lengths=None)
    tensors = _on(device, x_proj, h0, c0, w_hh, *ln)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    assert torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    try:
        for batch_sizes in (None, torch.tensor([2, 1, 1])):
            args = (*tensors, EPS, None, batch_sizes, False, None, None)
            out = OPS.lstm_ln_layer_fwd(*args)
            assert [tuple(t.shape) for t in out] == [(T, B, 0)] * 3 + [(0,)] + [(T, B, 0)] * 2 + [
                (T, B, 2)]
            assert torch.equal(out[6].cpu(), torch.zeros(T, B, 2)), "rstd_all"
            grads = OPS.lstm_ln_layer_bwd(*_on(device, torch.ones(T, B, 0), torch.ones(T, B, 0)),
                                          *args[1:7], *args[8:], *out)
            assert [tuple(g.shape) for g in grads] == [
                (T, B, 0), (B, 0), (B, 0), (0, 0), (0,), (0,), (0,), (0,)]
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


# ---- opcheck and gradcheck ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[5]])  # no options / every option
def test_opcheck(case, device):
    _require_kernels(device)
    T, B, H, P = 3, 4, 5, 3
    x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = ln_layer_inputs(
        T, B, H, P, torch.float64, proj=case["proj"], zoneout=case["zoneout"],
        lengths=[3, 3, 2, 1] if case["lengths"] else None)
    x_proj, h0, c0, w_hh, *ln, w_hr, zc, zh = _on(device, x_proj, h0, c0, w_hh, *ln, w_hr, zc, zh)
    P = h0.shape[1]
    for t in (x_proj, h0, c0, w_hh, *ln, w_hr):
        if t is not None:
            t.requires_grad_()
    args = (x_proj, h0, c0, w_hh, *ln, EPS, w_hr, batch_sizes, case["reverse"], zc, zh)
    torch.library.opcheck(OPS.lstm_ln_layer_fwd.default, args)
    with torch.no_grad():
        out = OPS.lstm_ln_layer_fwd(*args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    bwd_args = (*_on(device, randn(T, B, P, dtype=torch.float64),
                     randn(T, B, H, dtype=torch.float64)), *detached[1:7], *detached[8:], *out)
    torch.library.opcheck(OPS.lstm_ln_layer_bwd.default, bwd_args)


@needs_cpu_kernels
@pytest.mark.parametrize("case", [CASES[0], CASES[5]])
def test_gradcheck_op(case):
    T, B, H, P = 3, 3, 4, 2
    x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = ln_layer_inputs(
        T, B, H, P, torch.float64, proj=case["proj"], zoneout=case["zoneout"],
        lengths=[3, 2, 1] if case["lengths"] else None)
    tensors = [t.requires_grad_() for t in (x_proj, h0, c0, w_hh, *ln)]
    if w_hr is not None:
        tensors.append(w_hr.requires_grad_())

    def f(x_proj, h0, c0, w_hh, ln_hh, ln_cw, ln_cb, w_hr=None):
        out = OPS.lstm_ln_layer_fwd(x_proj, h0, c0, w_hh, ln_hh, ln_cw, ln_cb, EPS, w_hr,
                                    batch_sizes, case["reverse"], zc, zh)
        return out[0], out[1]

    assert torch.autograd.gradcheck(f, tensors)


@needs_cpu_kernels
def test_gradcheck_lstm_layer_with_layer_norm():
    """Through fastattn.ops.lstm.lstm_layer: the input LN and biases in PyTorch, the rest fused."""
    T, B, in_features, H, P = 4, 3, 3, 4, 2
    x = randn(T, B, in_features, dtype=torch.float64)
    w_ih = randn(4 * H, in_features, dtype=torch.float64)
    b_ih, b_hh = randn(4 * H, dtype=torch.float64), randn(4 * H, dtype=torch.float64)
    _, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = ln_layer_inputs(
        T, B, H, P, torch.float64, proj=True, zoneout=True, lengths=[4, 3, 1])
    ln_ih = randn(4 * H, dtype=torch.float64, scale=0.3, mean=1.0)
    tensors = [t.requires_grad_() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih, *ln)]

    def f(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih, ln_hh, ln_cw, ln_cb):
        return lstm_ops.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   batch_sizes=batch_sizes, reverse=True, zoneout_c=zc,
                                   zoneout_h=zh, layer_norm=(ln_ih, ln_hh, ln_cw, ln_cb, EPS))

    with fastattn.use_backend("cpu"):
        assert torch.autograd.gradcheck(f, tensors)


# ---- backend choice, the module, torch.compile ---------------------------------------------------


@needs_cpu_kernels
def test_cpu_backend_serves_layer_norm():
    assert lstm_ops._choose_backend("lstm_layer", torch.device("cpu"), torch.float32, True) == "cpu"
    m = fastattn.LSTM(4, 8, layer_norm=True)
    x = torch.randn(3, 2, 4, requires_grad=True)
    with OpRecorder() as recorder:
        out, _ = m(x)
        out.sum().backward()
    assert "fastattn.lstm_ln_layer_fwd.default" in recorder.seen
    assert "fastattn.lstm_ln_layer_bwd.default" in recorder.seen


@pytest.mark.gpu
def test_cuda_backend_serves_layer_norm():
    _require_kernels("cuda")
    got = lstm_ops._choose_backend("lstm_layer", torch.device("cuda"), torch.float32, True)
    assert got == "cuda"
    m = fastattn.LSTM(4, 8, layer_norm=True, device="cuda")
    x = torch.randn(3, 2, 4, device="cuda", requires_grad=True)
    with OpRecorder() as recorder:
        out, _ = m(x)
        out.sum().backward()
    assert "fastattn.lstm_ln_layer_fwd.default" in recorder.seen
    assert "fastattn.lstm_ln_layer_bwd.default" in recorder.seen


@pytest.mark.triton
def test_triton_backend_serves_layer_norm():
    """fastattn.LSTM(layer_norm=True) on the triton backend runs the Triton LN layer ops (no
    Python time loop) and matches the reference backend: output, final states, every gradient.
    Bidirectional with a projection, zoneout and packed sequences, H 7 (weights on chip; the
    streamed kernels: tests/test_lstm_triton.py)."""
    lstm_ops._triton_layer_fwd()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
    m = fastattn.LSTM(5, 7, layer_norm=True, bidirectional=True, proj_size=3, zoneout=(0.2, 0.3),
                      device=device)
    m.eval()  # the zoneout probabilities as weights: no random masks to replay
    _randomize_layer_norm_gains(m)
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    hx = [torch.randn(2, 3, 3, device=device, requires_grad=True),
          torch.randn(2, 3, 7, device=device, requires_grad=True)]
    results = []
    for backend in ("triton", "reference"):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 3, 1]))
        with fastattn.use_backend(backend), OpRecorder() as recorder:
            out, (h_n, c_n) = m(packed, hx)
            loss = (out.data * out.data.detach().cos()).sum() + h_n.sum() + (c_n * c_n).sum()
            results.append((out.data, h_n, c_n, *torch.autograd.grad(loss, [x, *hx,
                                                                             *m.parameters()])))
        if backend == "triton":
            assert "fastattn.lstm_ln_layer_fwd_triton.default" in recorder.seen
            assert "fastattn.lstm_ln_layer_bwd_triton.default" in recorder.seen
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"]
    names += [n for n, _ in m.named_parameters()]
    for name, got, want in zip(names, *results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                   msg=lambda s, name=name: f"{name}: {s}")


def _randomize_layer_norm_gains(m: torch.nn.Module) -> None:
    with torch.no_grad():  # away from their init of ones / zeros
        for name, p in m.named_parameters():
            if name.startswith("layer_norm_"):
                p.add_(torch.randn_like(p) * 0.3)


MODULE_CASES = [
    pytest.param(dict(), True, torch.float64, id="fp64-train"),
    pytest.param(dict(num_layers=2, bidirectional=True, proj_size=3), False, torch.float64,
                 id="fp64-2layer-bi-proj-eval"),
    pytest.param(dict(zoneout=(0.2, 0.3), recurrent_dropout=0.2, num_layers=2), True,
                 torch.float64, id="fp64-2layer-zoneout-recurrent_dropout-train"),
    # eval: no random masks, so a float64 copy of the module is the oracle
    pytest.param(dict(bidirectional=True, zoneout=(0.2, 0.3), proj_size=4), False, torch.float32,
                 id="fp32-bi-proj-zoneout-eval"),
]


def _module_run(m, x, hx, backend, seed):
    torch.manual_seed(seed)
    with fastattn.use_backend(backend):
        out, (h_n, c_n) = m(x, hx)
        loss = (out * out.detach().cos()).sum() + h_n.sum() + (c_n * c_n).sum()
        grads = torch.autograd.grad(loss, [x, *hx, *m.parameters()])
    return (out, h_n, c_n, *grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options,training,dtype", MODULE_CASES)
def test_module_matches_reference_backend(options, training, dtype, device):
    """The fused backend of ``device`` (cpu / cuda) against the reference backend."""
    _require_kernels(device)
    H = 33
    m = fastattn.LSTM(5, H, layer_norm=True, dtype=dtype, device=device, **options)
    m.train(training)
    _randomize_layer_norm_gains(m)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or H
    x = torch.randn(6, 3, 5, dtype=dtype, device=device, requires_grad=True)
    hx = [torch.randn(m.num_layers * D, 3, P, dtype=dtype, device=device, requires_grad=True),
          torch.randn(m.num_layers * D, 3, H, dtype=dtype, device=device, requires_grad=True)]
    got = _module_run(m, x, hx, device, seed=5)
    same_dtype = _module_run(m, x, hx, "reference", seed=5)
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"]
    names += [n for n, _ in m.named_parameters()]
    if dtype == torch.float64:
        for name, a, b in zip(names, got, same_dtype, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10,
                                       msg=lambda s, name=name: f"{name}: {s}")
        return
    m64 = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_()
    hx64 = [t.detach().double().requires_grad_() for t in hx]
    want = _module_run(m64, x64, hx64, "reference", seed=5)
    for name, a, w, b in zip(names, got, want, same_dtype, strict=True):
        assert_close_to_reference(a, w, b, name=name)


@needs_cpu_kernels
def test_module_packed_sequence_matches_reference_backend():
    m = fastattn.LSTM(4, 7, layer_norm=True, bidirectional=True, dtype=torch.float64)
    _randomize_layer_norm_gains(m)
    seqs = [torch.randn(n, 4, dtype=torch.float64, requires_grad=True) for n in (3, 5, 1)]
    results = []
    for backend in ("cpu", "reference"):
        packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
        with fastattn.use_backend(backend):
            out, (h_n, c_n) = m(packed)
            loss = (out.data * out.data).sum() + h_n.sum() + c_n.sum()
            results.append((out.data, h_n, c_n, *torch.autograd.grad(loss, [*seqs,
                                                                             *m.parameters()])))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


@needs_cpu_kernels
def test_compile_fullgraph_runs_the_fused_op():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fastattn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True,
                                      layer_norm=True)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return self.head(out).sum() + h.sum() + c.sum()

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    model = Model()
    _randomize_layer_norm_gains(model)
    x = torch.randn(2, 4, 5)
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    loss = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert any("lstm_ln_layer_fwd" in code for code in graphs)
    # The graph runs the same fused ops as eager, so it must match eager exactly; the plain-torch
    # reference sums in another order, so it matches at fp32's rounding, relative to each tensor.
    for backend in ("cpu", "reference"):
        model.zero_grad()
        with fastattn.use_backend(backend):
            eager = model(x)
        eager.backward()
        for ours, theirs in zip([loss, *grads], [eager, *(p.grad for p in model.parameters())],
                                strict=True):
            if backend == "cpu":
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            else:
                assert max_rel_error(ours, theirs) <= DTYPE_RTOL[torch.float32]


@pytest.mark.gpu
def test_cuda_module_under_inductor():
    """fastattn.LSTM(layer_norm=True) on CUDA compiled by Inductor (fullgraph) gives eager's
    outputs and gradients: the LN ops' fakes match what the CUDA kernels return."""
    _require_kernels("cuda")
    lstm = fastattn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, layer_norm=True,
                         device="cuda")
    _randomize_layer_norm_gains(lstm)
    x = torch.randn(4, 3, 5, device="cuda")
    compiled = torch.compile(lstm, fullgraph=True)
    got, expected = compiled(x), lstm(x)
    torch.testing.assert_close(got, expected)
    params = list(lstm.parameters())
    compiled_grads = torch.autograd.grad(got[0].sum() + got[1][1].sum(), params)
    eager_grads = torch.autograd.grad(expected[0].sum() + expected[1][1].sum(), params)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
