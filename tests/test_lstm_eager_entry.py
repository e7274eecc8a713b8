"""The eager CPU entry of fastattn.ops.lstm_cell (csrc/lstm/lstm_eager_entry.cpp).

A plain eager CPU step (plain CPU tensors of one float dtype in the shapes lstm_cell checks;
nothing intercepting the call) runs from C++ without the Python wrapper: a step that needs no
gradient makes the Python path's op call, a training step that the Python path gives to
lstm_step_gates (every one but float32 steps whose products fastattn::linear runs on its own GEMM)
records its two ops on a C++ autograd node. The entry must serve the steps it claims with
the Python path's results and gradients, bit for bit, its errors on double backward included,
and decline (return None) every other call, so that the Python path's checks, errors and
interceptors (modes, tracing, transforms, forced backends) still see it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FunctionCallCounter, OpRecorder

import fastattn
from fastattn import _extension
from fastattn.ops import linear as linear_ops
from fastattn.ops import lstm as lstm_ops

pytestmark = pytest.mark.skipif(
    _extension.C is None, reason=f"fastattn._C is not built: {_extension.LOAD_ERROR}"
)


def on_fastattn_linear(dtype, batch):
    """Whether the Python path runs a training step's products on fastattn::linear (a float32
    batch of enough rows where its GEMM wins: AMD CPUs with AVX-512), which the entry declines."""
    return linear_ops._GEMM_WINS and dtype == torch.float32 and batch >= linear_ops._MIN_ROWS


def entry(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, forced=None):
    return _extension.C.lstm_cell_eager_entry(x, h, c, w_ih, w_hh, b_ih, b_hh, forced)


def python_path(monkeypatch, *args):
    """fastattn.ops.lstm.lstm_cell with the entry switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(lstm_ops, "_CELL_EAGER_ENTRY", None)
        return lstm_ops.lstm_cell(*args)


def step(B, n_in, H, dtype, unbatched=False):
    """Fresh random (x, h, c, w_ih, w_hh, b_ih, b_hh) of one cell step."""
    lead = () if unbatched else (B,)
    return (torch.randn(*lead, n_in, dtype=dtype), torch.randn(*lead, H, dtype=dtype),
            torch.randn(*lead, H, dtype=dtype), torch.randn(4 * H, n_in, dtype=dtype) / n_in**0.5,
            torch.randn(4 * H, H, dtype=dtype) / H**0.5, torch.randn(4 * H, dtype=dtype),
            torch.randn(4 * H, dtype=dtype))


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (B, I, H, unbatched): a single row, odd sizes off the vector width, a batch past the unit lanes.
SHAPES = {"one": (1, 8, 8, False), "odd": (3, 7, 33, False), "unbatched": (1, 5, 9, True),
          "batch40": (40, 16, 24, False)}
BIASES = {"both": (True, True), "ih_only": (True, False), "hh_only": (False, True),
          "none": (False, False)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("biases", BIASES.values(), ids=BIASES.keys())
def test_serves_plain_steps_as_the_python_path(monkeypatch, dtype, shape, biases):
    torch.manual_seed(0)
    B, n_in, H, unbatched = shape
    x, h, c, w_ih, w_hh, b_ih, b_hh = step(B, n_in, H, dtype, unbatched)
    b_ih, b_hh = (b if keep else None for b, keep in zip((b_ih, b_hh), biases))
    out = entry(x, h, c, w_ih, w_hh, b_ih, b_hh)
    assert out is not None
    expected = python_path(monkeypatch, x, h, c, w_ih, w_hh, b_ih, b_hh)
    for got, want in zip(out, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want)
    # And through the public function, which takes the entry.
    for got, want in zip(lstm_ops.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh), expected):
        assert torch.equal(got, want)


def test_serves_strided_views_and_parameters(monkeypatch):
    torch.manual_seed(1)
    x, h, c, w_ih, w_hh, b_ih, b_hh = step(3, 16, 24, torch.float32)
    x, h = torch.randn(16, 3).t(), torch.randn(3, 48)[:, ::2]  # transposed, every other column
    w_ih, w_hh = torch.nn.Parameter(w_ih), torch.nn.Parameter(w_hh)
    with torch.no_grad():  # parameters that require grad, in a step that records none
        out = entry(x, h, c, w_ih, w_hh, b_ih, b_hh)
        expected = python_path(monkeypatch, x, h, c, w_ih, w_hh, b_ih, b_hh)
    assert out is not None and not out[0].requires_grad and out[0].grad_fn is None
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_serves_inference_tensors(monkeypatch):
    torch.manual_seed(2)
    args = step(2, 8, 16, torch.float32)
    expected = python_path(monkeypatch, *args)
    with torch.inference_mode():
        out = entry(*(t.clone() for t in args))
    assert out is not None and out[0].is_inference()
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_module_step_matches_torch_under_no_grad():
    """fastattn.LSTMCell (which reaches the entry through lstm_cell) against nn.LSTMCell with the
    same weights, in the fp32 tolerance."""
    torch.manual_seed(3)
    ours, theirs = fastattn.LSTMCell(16, 32), torch.nn.LSTMCell(16, 32)
    ours.load_state_dict(theirs.state_dict())
    x, h, c = torch.randn(5, 16), torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad():
        weights = (ours.weight_ih, ours.weight_hh, ours.bias_ih, ours.bias_hh)
        assert entry(x, h, c, *weights) is not None
        for got, want in zip(ours(x, (h, c)), theirs(x, (h, c))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Subclass(torch.Tensor):
    pass


def _declined_calls():
    """(id, call): calls the entry must leave to the Python path."""
    x, h, c, w_ih, w_hh, b_ih, b_hh = step(2, 8, 16, torch.float32)
    args = (x, h, c, w_ih, w_hh, b_ih, b_hh)

    def with_(i, value):
        return lambda: entry(*args[:i], value, *args[i + 1:])

    def dual():
        with torch.autograd.forward_ad.dual_level():
            return entry(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)), *args[1:])

    declined = {
        "forward_ad": dual,
        "3d_input": with_(0, x.unsqueeze(0)),
        "scalar_input": with_(0, x[0, 0]),
        "integer_dtype": lambda: entry(*(t.int() for t in args)),
        "mismatched_dtype": with_(1, h.double()),
        "w_ih_rows_not_4h": with_(3, w_ih[:-1]),
        "w_ih_of_other_input_size": with_(3, w_ih[:, :-1]),
        "w_hh_wrong_shape": with_(4, w_hh[:, :-1]),
        "hx_wrong_batch": with_(1, h[:1]),
        "cx_unbatched_for_batched_input": with_(2, c[0]),
        "bias_wrong_size": with_(5, b_ih[:-1]),
        "hx_not_a_tensor": with_(1, h.tolist()),
        "hx_subclass": with_(1, h.as_subclass(_Subclass)),
        "negative_view": with_(0, x._neg_view()),
        "meta_weight": with_(4, w_hh.to("meta")),
        "forced_reference": lambda: entry(*args, forced="reference"),
        "forced_unknown": lambda: entry(*args, forced="cudnn"),
        "forced_not_a_string": lambda: entry(*args, forced=1),
    }
    if on_fastattn_linear(torch.float32, 64):
        leaf = torch.randn(64, 8, requires_grad=True)
        declined["float32_training_on_fastattn_linear"] = lambda: entry(
            leaf, torch.randn(64, 16), torch.randn(64, 16), *args[3:])
    return declined


@pytest.mark.parametrize("name", list(_declined_calls()))
def test_declines_calls_that_need_the_python_path(name):
    torch.manual_seed(4)
    assert _declined_calls()[name]() is None


def _grads(fn, args, grad_out, requires):
    """(hy, cy) and the gradients of fn(*args) for the arguments flagged in ``requires``."""
    args = [a.detach().clone().requires_grad_(r) if a is not None else None
            for a, r in zip(args, requires)]
    hy, cy = fn(*args)
    leaves = [a for a, r in zip(args, requires) if r]
    outs = [o for o, g in zip((hy, cy), grad_out) if g is not None]
    return (hy, cy), torch.autograd.grad(outs, leaves, [g for g in grad_out if g is not None])


# Which of (x, h, c, w_ih, w_hh, b_ih, b_hh) require grad.
REQUIRES = {"all": (True,) * 7, "weights_only": (False,) * 3 + (True,) * 4,
            "input_only": (True,) + (False,) * 6, "state_only": (False, True, True) + (False,) * 4}


def _assert_training_step_as_the_python_path(monkeypatch, args, requires, outputs):
    """The entry serves a training step of args (x, h, c, w_ih, w_hh, b_ih, b_hh; None for an
    absent bias) unless its products run on fastattn::linear, and lstm_cell's outputs and
    gradients of the ``requires`` arguments equal the Python path's bit for bit."""
    requires = tuple(r and a is not None for r, a in zip(requires, args))
    grad_out = (torch.randn_like(args[1]), torch.randn_like(args[2]) if outputs == "both" else None)
    served = entry(*(a.detach().clone().requires_grad_(r) if a is not None else None
                     for a, r in zip(args, requires)))
    x = args[0]
    if on_fastattn_linear(x.dtype, x.shape[0] if x.dim() == 2 else 1):
        assert served is None
    else:
        assert served is not None and served[0].grad_fn is not None
    ours = _grads(lstm_ops.lstm_cell, args, grad_out, requires)
    theirs = _grads(lambda *a: python_path(monkeypatch, *a), args, grad_out, requires)
    for got, want in zip((*ours[0], *ours[1]), (*theirs[0], *theirs[1])):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("shape", [(1, 8, 8, False), (3, 7, 33, False), (1, 5, 9, True)],
                         ids=["one", "odd", "unbatched"])
@pytest.mark.parametrize("biases", BIASES.values(), ids=BIASES.keys())
@pytest.mark.parametrize("requires", REQUIRES.values(), ids=REQUIRES.keys())
@pytest.mark.parametrize("outputs", ["both", "hy_only"])
def test_training_steps_as_the_python_path(monkeypatch, shape, biases, requires, outputs):
    torch.manual_seed(8)
    B, n_in, H, unbatched = shape
    args = list(step(B, n_in, H, torch.float32, unbatched))
    for i, keep in zip((5, 6), biases):
        if not keep:
            args[i] = None
    _assert_training_step_as_the_python_path(monkeypatch, args, requires, outputs)


# Every dtype, and batches past lstm_step_gates' GEMV-style kernel (its two GEMMs: 40 rows, and
# 70, which fastattn::linear takes in float32 where its GEMM wins).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3, 40, 70])
def test_training_steps_of_every_dtype_as_the_python_path(monkeypatch, dtype, B):
    torch.manual_seed(12)
    args = list(step(B, 7, 33, dtype))
    _assert_training_step_as_the_python_path(monkeypatch, args, REQUIRES["all"], "both")


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_training_double_backward_raises_as_the_python_path(monkeypatch, unbatched):
    torch.manual_seed(9)
    args = step(2, 8, 16, torch.float32, unbatched)
    messages = []
    for path in (lstm_ops.lstm_cell, lambda *a: python_path(monkeypatch, *a)):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        hy, cy = path(*leaves)
        grads = torch.autograd.grad((hy * cy).sum(), leaves, create_graph=True)
        for g in (grads[0], grads[2], grads[3], grads[5]):  # x, c, w_ih, b_ih
            with pytest.raises(RuntimeError, match="double backward") as error:
                g.sum().backward(retain_graph=True)
            messages.append(str(error.value))
    half = len(messages) // 2
    assert messages[:half] == messages[half:]
    assert "lstm_step_gates" in messages[0] and "lstm_cell_pointwise_fwd" in messages[1]


def test_training_module_step_matches_torch():
    """fastattn.LSTMCell's training step against nn.LSTMCell with the same weights."""
    torch.manual_seed(10)
    ours, theirs = fastattn.LSTMCell(16, 32), torch.nn.LSTMCell(16, 32)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 16)
    h, c = torch.randn(3, 32), torch.randn(3, 32)
    grad_h, grad_c = torch.randn(3, 32), torch.randn(3, 32)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out = module(xi, (h, c))
        params = (xi, *module.parameters())
        results.append((*out, *torch.autograd.grad(out, params, (grad_h, grad_c))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_steps_still_raise_the_python_paths_errors():
    """Declined calls reach lstm_cell's checks: its error types and messages are unchanged."""
    torch.manual_seed(5)
    x, h, c, w_ih, w_hh, b_ih, b_hh = step(2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="w_hh must have shape"):
        lstm_ops.lstm_cell(x, h, c, w_ih, w_hh[:, :-1], b_ih, b_hh)
    with pytest.raises(TypeError, match="hx must have dtype"):
        lstm_ops.lstm_cell(x, h.double(), c, w_ih, w_hh, b_ih, b_hh)


def test_use_backend_and_the_environment(monkeypatch):
    torch.manual_seed(6)
    args = step(1, 8, 8, torch.float32)
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert entry(*args) is None
    assert entry(*args, forced="cpu") is not None
    assert entry(*args, forced="auto") is not None
    monkeypatch.setenv("FASTATTN_BACKEND", "cpu")
    assert entry(*args) is not None


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_interceptors_see_the_call(monkeypatch, training):
    torch.manual_seed(7)
    args = step(2, 8, 16, torch.float32)
    if training:
        args = (args[0].requires_grad_(),) + args[1:]
    expected = python_path(monkeypatch, *args)
    with OpRecorder() as mode:
        assert entry(*args) is None
        out = lstm_ops.lstm_cell(*args)
    assert ("fastattn.lstm_cell_pointwise_fwd.default" if training
            else "fastattn.lstm_layer_infer.default") in mode.seen
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    with FunctionCallCounter() as function_mode:
        assert entry(*args) is None
        lstm_ops.lstm_cell(*args)
    assert function_mode.calls > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert entry(*args) is None
    x, h, c, *weights = args
    declined_under_vmap = torch.vmap(
        lambda xi: torch.tensor(entry(xi, h[0], c[0], *weights) is None))(x)
    assert declined_under_vmap.all()
    declined_while_tracing = []

    def traced(xi):
        declined_while_tracing.append(entry(xi, *args[1:]) is None)
        return xi + 1

    torch.jit.trace(traced, (x,), check_trace=False)
    assert declined_while_tracing == [True]


def test_training_steps_under_checkpointing_and_saved_tensor_hooks(monkeypatch):
    """Non-reentrant checkpointing and saved-tensor hooks see the C++ node's saved tensors as
    they see the Python path's: the same gradients and the same number of packed tensors."""
    torch.manual_seed(11)
    cell = fastattn.LSTMCell(8, 16)
    x, h, c = torch.randn(2, 8), torch.randn(2, 16), torch.randn(2, 16)

    def run():
        xi = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(lambda a: cell(a, (h, c))[0] * 2, xi,
                                                use_reentrant=False)
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t,
                                                      lambda t: t):
            out2 = cell(xi, (h, c))[0]
        grads = torch.autograd.grad(out.sum() + out2.sum(), [xi, *cell.parameters()])
        return grads, len(packed)

    assert entry(x.clone().requires_grad_(), h, c, *cell.parameters()) is not None
    ours = run()
    with monkeypatch.context() as patch:
        patch.setattr(lstm_ops, "_CELL_EAGER_ENTRY", None)
        theirs = run()
    assert ours[1] == theirs[1] > 0
    assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0]))
