"""The eager CPU entries of fastattn.scaled_dot_product_attention, fastattn.attention and
fastattn.attention_with_kv_cache (csrc/attention/attention_eager_entry.cpp).

A plain eager CPU call (no dropout; 4-D tensors the op takes as they are, a mask that
broadcasts to them; nothing intercepting the call) runs from C++ without the Python wrapper, and
where it needs gradients, records a C++ autograd node. The entry must serve the calls it claims
with the Python path's results and gradients, bit for bit, its errors on double backward
included, and decline (return None) every other call, so that the Python path's conversions,
checks, errors and interceptors (modes, tracing, transforms, forced backends) still see it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FunctionCallCounter, OpRecorder, assert_close_to_reference, randn

import fastattn
from fastattn import _extension
from fastattn.ops import attention as attention_ops
from fastattn.ops import packed_attention as packed_ops
from fastattn.ops.errors import FastattnValueError

pytestmark = pytest.mark.skipif(
    _extension.C is None, reason=f"fastattn._C is not built: {_extension.LOAD_ERROR}"
)


def entry(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
          forced=None):
    return _extension.C.attention_eager_entry(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                              enable_gqa, forced)


def python_path(monkeypatch, *args, **kwargs):
    """fastattn.scaled_dot_product_attention with the entry switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(attention_ops, "_EAGER_ENTRY", None)
        return fastattn.scaled_dot_product_attention(*args, **kwargs)


def qkv(B, Hq, Hk, L, S, E, Ev, dtype, layout="contiguous"):
    """Fresh random q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev] in ``layout``:
    contiguous; "blhe" (views of [B, len, H, dim] tensors, as a model's projections give);
    "strided_last" (every other element of a wider last dim); "broadcast_heads" (k and v one
    head expanded to Hk with stride 0)."""
    if layout == "blhe":
        return (randn(B, L, Hq, E, dtype=dtype).transpose(1, 2),
                randn(B, S, Hk, E, dtype=dtype).transpose(1, 2),
                randn(B, S, Hk, Ev, dtype=dtype).transpose(1, 2))
    if layout == "strided_last":
        return (randn(B, Hq, L, 2 * E, dtype=dtype)[..., ::2],
                randn(B, Hk, S, 2 * E, dtype=dtype)[..., ::2],
                randn(B, Hk, S, 2 * Ev, dtype=dtype)[..., ::2])
    if layout == "broadcast_heads":
        return (randn(B, Hq, L, E, dtype=dtype),
                randn(B, 1, S, E, dtype=dtype).expand(B, Hk, S, E),
                randn(B, 1, S, Ev, dtype=dtype).expand(B, Hk, S, Ev))
    return (randn(B, Hq, L, E, dtype=dtype), randn(B, Hk, S, E, dtype=dtype),
            randn(B, Hk, S, Ev, dtype=dtype))


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (B, Hq, Hk, L, S, E, Ev, enable_gqa)
SHAPES = {
    "one": (1, 1, 1, 1, 1, 8, 8, False),
    "odd": (2, 3, 3, 7, 33, 16, 24, False),
    "gqa": (1, 4, 2, 5, 9, 32, 32, True),
    "decode": (1, 2, 2, 1, 512, 128, 128, False),
    "more_queries_than_keys": (3, 2, 2, 33, 7, 8, 8, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default_scale", "scale"])
def test_serves_plain_calls_as_the_python_path(monkeypatch, dtype, shape, is_causal, scale):
    B, Hq, Hk, L, S, E, Ev, gqa = shape
    torch.manual_seed(L * 131 + S)
    q, k, v = qkv(B, Hq, Hk, L, S, E, Ev, dtype)
    out = entry(q, k, v, None, 0.0, is_causal, scale, gqa)
    assert out is not None, "the entry declined a plain call"
    expected = python_path(monkeypatch, q, k, v, is_causal=is_causal, scale=scale,
                           enable_gqa=gqa)
    assert out.shape == (B, Hq, L, Ev) and out.dtype == dtype
    assert torch.equal(out, expected)
    # And the public function takes it.
    assert torch.equal(fastattn.scaled_dot_product_attention(
        q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa), expected)
    wide = [t.double() for t in (q, k, v)]
    assert_close_to_reference(
        out, F.scaled_dot_product_attention(*wide, is_causal=is_causal, scale=scale,
                                            enable_gqa=gqa),
        F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                       enable_gqa=gqa))


@pytest.mark.parametrize("layout", ["blhe", "strided_last", "broadcast_heads"])
def test_serves_strided_views(monkeypatch, layout):
    torch.manual_seed(3)
    q, k, v = qkv(2, 3, 3, 7, 33, 16, 16, torch.float32, layout)
    out = entry(q, k, v, is_causal=True)
    assert out is not None
    assert torch.equal(out, python_path(monkeypatch, q, k, v, is_causal=True))


def test_serves_inference_and_no_grad(monkeypatch):
    torch.manual_seed(4)
    q, k, v = qkv(1, 2, 2, 5, 9, 16, 16, torch.float32)
    expected = python_path(monkeypatch, q, k, v)
    with torch.inference_mode():
        qi, ki, vi = (t.clone() for t in (q, k, v))
        out = entry(qi, ki, vi)
        assert out is not None and out.is_inference()
        assert torch.equal(out, expected)
    leaf = q.clone().requires_grad_()
    with torch.no_grad():
        out = entry(leaf, k, v)
    assert out is not None and out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, expected)


def test_use_backend_overrides_the_environment(monkeypatch):
    torch.manual_seed(5)
    q, k, v = qkv(1, 2, 2, 3, 5, 8, 8, torch.float32)
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert entry(q, k, v) is None
    assert entry(q, k, v, forced="cpu") is not None
    assert entry(q, k, v, forced="auto") is not None
    monkeypatch.setenv("FASTATTN_BACKEND", "cpu")
    assert entry(q, k, v) is not None
    assert entry(q, k, v, forced="reference") is None


class _Subclass(torch.Tensor):
    pass


def _declined_calls():
    """(id, call): calls the entry must leave to the Python path."""
    q, k, v = qkv(2, 2, 2, 3, 5, 8, 8, torch.float32)
    mask = torch.ones(3, 5, dtype=torch.bool)
    return {
        "mask_with_is_causal": lambda: entry(q, k, v, attn_mask=mask, is_causal=True),
        "1d_mask": lambda: entry(q, k, v, attn_mask=mask[0]),
        "5d_mask": lambda: entry(q, k, v, attn_mask=mask.expand(1, 2, 2, 3, 5)),
        "mask_not_broadcasting": lambda: entry(q, k, v, attn_mask=mask[:, :4]),
        "mask_of_another_batch": lambda: entry(q, k, v, attn_mask=mask.expand(3, 1, 3, 5)),
        "mask_requiring_grad": lambda: entry(q, k, v, attn_mask=torch.zeros(3, 5,
                                                                            requires_grad=True)),
        "float16_mask_for_float32": lambda: entry(q, k, v, attn_mask=mask.half()),
        "int_mask": lambda: entry(q, k, v, attn_mask=mask.int()),
        "mask_subclass": lambda: entry(q, k, v, attn_mask=mask.as_subclass(_Subclass)),
        "mask_not_a_tensor": lambda: entry(q, k, v, attn_mask=mask.tolist()),
        "dropout": lambda: entry(q, k, v, dropout_p=0.1),
        "int_dropout": lambda: entry(q, k, v, dropout_p=0),
        "int_is_causal": lambda: entry(q, k, v, is_causal=1),
        "int_enable_gqa": lambda: entry(q, k, v, enable_gqa=0),
        "int_scale": lambda: entry(q, k, v, scale=2),
        "tensor_scale": lambda: entry(q, k, v, scale=torch.tensor(0.5)),
        "inf_scale": lambda: entry(q, k, v, scale=float("inf")),
        "nan_scale": lambda: entry(q, k, v, scale=float("nan")),
        "float32_overflowing_scale": lambda: entry(q, k, v, scale=1e39),
        "3d": lambda: entry(q[0], k[0], v[0]),
        "empty_query": lambda: entry(q[:, :, :0], k, v),
        "empty_keys": lambda: entry(q, k[:, :, :0], v[:, :, :0]),
        "broadcast_batch": lambda: entry(q, k[:1], v[:1]),
        "grouped_heads_without_enable_gqa": lambda: entry(q, k[:, :1], v[:, :1]),
        "mismatched_heads": lambda: entry(q[:, :1], k, v, enable_gqa=True),
        "mismatched_head_dim": lambda: entry(q[..., :4], k, v),
        "mismatched_lengths": lambda: entry(q, k, v[:, :, :4]),
        "mismatched_dtype": lambda: entry(q, k.double(), v),
        "integer_dtype": lambda: entry(*(t.to(torch.int32) for t in (q, k, v))),
        "forward_ad": lambda: _dual_call(q, k, v),
        "negative_view": lambda: entry(q._neg_view(), k, v),
        "subclass": lambda: entry(q.as_subclass(_Subclass), k, v),
        "not_a_tensor": lambda: entry(q.tolist(), k, v),
        "forced_reference": lambda: entry(q, k, v, forced="reference"),
        "forced_cuda": lambda: entry(q, k, v, forced="cuda"),
        "forced_unknown": lambda: entry(q, k, v, forced="cudnn"),
        "forced_not_a_string": lambda: entry(q, k, v, forced=1),
    }


def _dual_call(q, k, v):
    """The entry on a dual tensor (forward-mode AD), which the Python path's autograd.Function
    rejects."""
    leaf = q.clone().requires_grad_()
    with torch.autograd.forward_ad.dual_level():
        return entry(torch.autograd.forward_ad.make_dual(leaf, torch.ones_like(q)), k, v)


@pytest.mark.parametrize("name", list(_declined_calls()))
def test_declines_calls_that_need_the_python_path(name):
    torch.manual_seed(6)
    assert _declined_calls()[name]() is None


@pytest.mark.parametrize("env", ["reference", "cuda", "cudnn"])
def test_declines_where_the_environment_forces_another_backend(monkeypatch, env):
    torch.manual_seed(7)
    q, k, v = qkv(1, 2, 2, 3, 5, 8, 8, torch.float32)
    monkeypatch.setenv("FASTATTN_BACKEND", env)
    assert entry(q, k, v) is None


def test_interceptors_see_the_call(monkeypatch):
    """Where something intercepts torch's calls, the entry declines and the interceptor sees
    the op as it did before the entry existed."""
    torch.manual_seed(8)
    q, k, v = qkv(1, 2, 2, 3, 5, 8, 8, torch.float32)
    expected = python_path(monkeypatch, q, k, v)
    with OpRecorder() as mode:
        assert entry(q, k, v) is None
        out = fastattn.scaled_dot_product_attention(q, k, v)
    assert "fastattn.attention_fwd.default" in mode.seen and torch.equal(out, expected)
    with FunctionCallCounter() as function_mode:
        assert entry(q, k, v) is None
        fastattn.scaled_dot_product_attention(q, k, v)
    assert function_mode.calls > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert entry(q, k, v) is None
    assert torch.vmap(lambda x: torch.tensor(entry(x, k[0], v[0]) is None))(q.unsqueeze(1)).all()

    # (A trace would record the entry's output as a constant.)
    declined_while_tracing = []

    def traced(a, b, c):
        declined_while_tracing.append(entry(a, b, c) is None)
        return a + 1

    torch.jit.trace(traced, (q, k, v), check_trace=False)
    assert declined_while_tracing == [True]


def test_profiler_records_the_op():
    torch.manual_seed(9)
    q, k, v = qkv(1, 2, 2, 3, 5, 8, 8, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert entry(q, k, v) is not None
    assert "fastattn::attention_fwd" in {event.name for event in prof.events()}


def test_entry_gradients_pass_gradcheck():
    torch.manual_seed(10)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 3, 5, 8, 8, torch.float64))
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.grad_fn is not None
    torch.autograd.gradcheck(
        lambda a, b, c: fastattn.scaled_dot_product_attention(a, b, c, is_causal=True),
        (q, k, v))


def _gradients(out_fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = out_fn()
    out.backward(grad_out)
    return out, [None if t.grad is None else t.grad.clone() for t in inputs]


GRAD_CASES = {
    "odd": (2, 3, 3, 7, 33, 16, 24, False, "contiguous", (True, True, True)),
    "gqa_causal": (1, 4, 2, 5, 9, 32, 32, True, "contiguous", (True, True, True)),
    "blhe_value_only": (2, 2, 2, 9, 9, 8, 8, False, "blhe", (False, False, True)),
    "broadcast_heads": (1, 4, 4, 6, 11, 16, 16, False, "broadcast_heads", (True, True, True)),
    "query_only": (1, 2, 2, 1, 17, 8, 8, False, "contiguous", (True, False, False)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_equal_the_python_path(monkeypatch, dtype, case):
    B, Hq, Hk, L, S, E, Ev, gqa, layout, needs_grad = case
    torch.manual_seed(L * 17 + S)
    base = qkv(B, Hq, Hk, L, S, E, Ev, dtype, layout)
    # Leaves with the layout's strides (detach keeps them).
    inputs = [t.detach().requires_grad_(grad) for t, grad in zip(base, needs_grad)]
    grad_out = randn(B, Hq, L, Ev, dtype=dtype)
    is_causal = case is GRAD_CASES["gqa_causal"]

    def call():
        return fastattn.scaled_dot_product_attention(*inputs, is_causal=is_causal,
                                                     enable_gqa=gqa)

    out, grads = _gradients(call, inputs, grad_out)
    assert out.grad_fn is not None and "Attention" in out.grad_fn.name()
    assert entry(*inputs, is_causal=is_causal, enable_gqa=gqa) is not None
    with monkeypatch.context() as patch:
        patch.setattr(attention_ops, "_EAGER_ENTRY", None)
        expected_out, expected = _gradients(call, inputs, grad_out)
    assert torch.equal(out, expected_out)
    for name, grad, want, needed in zip("qkv", grads, expected, needs_grad):
        assert (grad is None) == (not needed), name
        if needed:
            assert torch.equal(grad, want), f"grad of {name}"


# (B, Hq, Hk, L, S, mask shape, enable_gqa)
MASK_CASES = {
    "2d": (2, 3, 3, 7, 33, (7, 33), False),
    "3d": (2, 2, 2, 6, 11, (2, 6, 11), False),
    "key_padding": (2, 4, 4, 5, 17, (2, 1, 1, 17), False),
    "decode_padding": (2, 4, 4, 1, 17, (2, 1, 1, 17), False),
    "per_head_gqa": (1, 4, 2, 5, 9, (1, 4, 5, 9), True),
    "full": (2, 2, 2, 6, 11, (2, 2, 6, 11), False),
}


def _mask(shape, kind, dtype):
    """A fresh random mask: bool (True = may attend), or additive (float32 or ``dtype``) with
    -inf entries; where it has query rows, its first one blocks every key."""
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        blocked = False
    else:
        mask = torch.randn(shape, dtype=torch.float32 if kind == "float32" else dtype)
        mask[torch.rand(shape) < 0.2] = float("-inf")
        blocked = float("-inf")
    if shape[-2] > 1:
        mask[..., 0, :] = blocked
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float32", "query_dtype"])
@pytest.mark.parametrize("case", MASK_CASES.values(), ids=MASK_CASES.keys())
def test_masked_calls_as_the_python_path(monkeypatch, dtype, kind, case):
    """Masks that broadcast to [B, Hq, L, S] (2-, 3- and 4-D; bool, float32 and the query's
    dtype; a query row that sees no key) give the Python path's output and gradients, bit for
    bit."""
    B, Hq, Hk, L, S, mask_shape, gqa = case
    torch.manual_seed(L * 29 + S)
    inputs = [t.requires_grad_() for t in qkv(B, Hq, Hk, L, S, 16, 8, dtype)]
    mask = _mask(mask_shape, kind, dtype)
    grad_out = randn(B, Hq, L, 8, dtype=dtype)
    with torch.no_grad():
        assert entry(*inputs, attn_mask=mask, enable_gqa=gqa) is not None

    def call():
        return fastattn.scaled_dot_product_attention(*inputs, attn_mask=mask, enable_gqa=gqa)

    out, grads = _gradients(call, inputs, grad_out)
    assert "Attention" in out.grad_fn.name()
    with monkeypatch.context() as patch:
        patch.setattr(attention_ops, "_EAGER_ENTRY", None)
        expected_out, expected = _gradients(call, inputs, grad_out)
    assert torch.equal(out, expected_out)
    if mask_shape[-2] > 1:
        assert not out[:, :, 0].any(), "the blocked row is not zero"
    for name, grad, want in zip("qkv", grads, expected):
        assert torch.equal(grad, want), f"grad of {name}"


def test_double_backward_raises_as_the_python_path(monkeypatch):
    torch.manual_seed(11)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 4, 6, 8, 8, torch.float64))
    messages = []
    for python in (False, True):
        with monkeypatch.context() as patch:
            if python:
                patch.setattr(attention_ops, "_EAGER_ENTRY", None)
            out = fastattn.scaled_dot_product_attention(q, k, v)
            # create_graph alone works: the first-order gradients are right.
            dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
            with pytest.raises(RuntimeError) as error:
                (dq.sum() + dk.sum() + dv.sum()).backward()
        messages.append(str(error.value).split("\n")[0])
    assert "double backward" in messages[0] and messages[0] == messages[1]


def test_saved_tensor_hooks_and_checkpointing(monkeypatch):
    """Activation checkpointing (torch.utils.checkpoint, non-reentrant) and saved-tensor hooks
    see the entry's saved tensors and give the Python path's gradients."""
    torch.manual_seed(12)
    inputs = [t.requires_grad_() for t in qkv(1, 2, 2, 5, 7, 8, 8, torch.float32)]
    grad_out = randn(1, 2, 5, 8)

    def block(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True).sin()

    packed = []

    def hooked():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t.clone(),
                                                      lambda t: t):
            return block(*inputs)

    def checkpointed():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)

    plain = _gradients(lambda: block(*inputs), inputs, grad_out)[1]
    with monkeypatch.context() as patch:
        patch.setattr(attention_ops, "_EAGER_ENTRY", None)
        expected = _gradients(lambda: block(*inputs), inputs, grad_out)[1]
    for fn in (hooked, checkpointed):
        grads = _gradients(fn, inputs, grad_out)[1]
        assert all(torch.equal(a, b) for a, b in zip(grads, expected)), fn.__name__
    assert all(torch.equal(a, b) for a, b in zip(plain, expected))
    assert packed, "the saved-tensor hooks saw nothing"


# ---- fastattn.attention's entry -----------------------------------------------------------------


def options_entry(q, k, v, causal=False, causal_align="top_left", window=(-1, -1), softcap=None,
                  alibi_slopes=None, attn_mask=None, dropout_p=0.0, scale=None, return_lse=False,
                  forced=None):
    return _extension.C.attention_options_eager_entry(
        q, k, v, causal, causal_align, window, softcap, alibi_slopes, attn_mask, dropout_p, scale,
        return_lse, forced)


OPTION_CASES = {
    "plain": {},
    "causal_bottom_right": dict(causal=True, causal_align="bottom_right"),
    "causal_window": dict(causal=True, window=(3, 2)),
    "window_list": dict(window=[-1, 2], causal_align="bottom_right"),
    "softcap_scale": dict(softcap=5.0, scale=0.3),
    "sliding_softcap": dict(window=(4, 4), softcap=2.5),
    "causal_padding_mask": dict(causal=True, attn_mask=(torch.arange(12) < 9).expand(2, 1, 7, 12)),
    "window_float32_mask": dict(window=(3, 3), attn_mask=torch.linspace(-2, 2, 84).view(7, 12)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_attention_options_as_the_python_path(monkeypatch, dtype, options):
    """fastattn.attention's plain calls (GQA, every window and softcap option, return_lse) give
    the Python path's output, LSE and gradients, bit for bit."""
    torch.manual_seed(13)
    inputs = [t.detach().requires_grad_() for t in qkv(2, 4, 2, 7, 12, 16, 8, dtype)]
    grad_out = randn(2, 4, 7, 8, dtype=dtype)
    assert options_entry(*(t.detach() for t in inputs), **options) is not None

    def call():
        out, lse = fastattn.attention(*inputs, return_lse=True, **options)
        assert not lse.requires_grad
        call.lse = lse
        return out

    out, grads = _gradients(call, inputs, grad_out)
    lse = call.lse
    assert "Attention" in out.grad_fn.name()
    with monkeypatch.context() as patch:
        patch.setattr(attention_ops, "_OPTIONS_EAGER_ENTRY", None)
        expected_out, expected = _gradients(call, inputs, grad_out)
    assert torch.equal(out, expected_out) and torch.equal(lse, call.lse)
    for name, grad, want in zip("qkv", grads, expected):
        assert torch.equal(grad, want), f"grad of {name}"
    with torch.no_grad():
        assert torch.equal(fastattn.attention(*inputs, **options), expected_out)


def _declined_option_calls():
    q, k, v = qkv(2, 2, 2, 3, 5, 8, 8, torch.float32)
    return {
        "alibi": lambda: options_entry(q, k, v, alibi_slopes=torch.rand(2)),
        "int_mask": lambda: options_entry(q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.int)),
        "float16_mask": lambda: options_entry(q, k, v, attn_mask=torch.zeros(3, 5).half()),
        "1d_mask": lambda: options_entry(q, k, v, attn_mask=torch.zeros(5)),
        "dropout": lambda: options_entry(q, k, v, dropout_p=0.1),
        "int_causal": lambda: options_entry(q, k, v, causal=1),
        "unknown_alignment": lambda: options_entry(q, k, v, causal_align="center"),
        "alignment_not_a_string": lambda: options_entry(q, k, v, causal_align=None),
        "window_of_three": lambda: options_entry(q, k, v, window=(1, 2, 3)),
        "window_below_minus_one": lambda: options_entry(q, k, v, window=(-2, 0)),
        "bool_window": lambda: options_entry(q, k, v, window=(True, 0)),
        "float_window": lambda: options_entry(q, k, v, window=(1.0, 0)),
        "huge_window": lambda: options_entry(q, k, v, window=(2**70, 0)),
        "window_not_a_sequence": lambda: options_entry(q, k, v, window=3),
        "int_softcap": lambda: options_entry(q, k, v, softcap=5),
        "zero_softcap": lambda: options_entry(q, k, v, softcap=0.0),
        "inf_softcap": lambda: options_entry(q, k, v, softcap=float("inf")),
        "nan_softcap": lambda: options_entry(q, k, v, softcap=float("nan")),
        "inf_scale": lambda: options_entry(q, k, v, scale=float("inf")),
        "int_scale": lambda: options_entry(q, k, v, scale=1),
        "int_return_lse": lambda: options_entry(q, k, v, return_lse=1),
        "3d": lambda: options_entry(q[0], k[0], v[0]),
        "heads_not_a_multiple": lambda: options_entry(q[:, :1], k, v),
        "forced_reference": lambda: options_entry(q, k, v, forced="reference"),
    }


@pytest.mark.parametrize("name", list(_declined_option_calls()))
def test_attention_entry_declines_calls_that_need_the_python_path(name):
    torch.manual_seed(14)
    assert _declined_option_calls()[name]() is None


# ---- fastattn.attention_with_kv_cache's entry ---------------------------------------------------


def kv_entry(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *, block_table=None,
             cache_batch_idx=None, causal=False, causal_align="bottom_right", window=(-1, -1),
             softcap=None, alibi_slopes=None, scale=None, return_lse=False, forced=None):
    return _extension.C.attention_kv_cache_eager_entry(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx, causal,
        causal_align, window, softcap, alibi_slopes, scale, return_lse, forced)


def kv_call(layout, dtype, L_new=2, Lq=2):
    """(args, kwargs) of a fresh random KV-cache call of 3 sequences (cached lengths 5, 0, 17),
    GQA heads, new rows token-major (k_new) and with a strided last dim (v_new), in a cache of
    ``layout``: "contiguous" [B, Hk, S_max, E]; "batch_idx" (rows picked by cache_batch_idx);
    "paged" [blocks, Hk, 8, E] through a shuffled block_table; "paged_vllm" (the same as
    transposed views of [blocks, 8, Hk, E])."""
    B, Hq, Hk, E, Ev, S_max, block = 3, 4, 2, 16, 8, 24, 8
    q = randn(B, Hq, Lq, E, dtype=dtype)
    k_new = randn(B, L_new, Hk, E, dtype=dtype).transpose(1, 2) if L_new else None
    v_new = randn(B, Hk, L_new, 2 * Ev, dtype=dtype)[..., ::2] if L_new else None
    seqlens = torch.tensor([5, 0, 17], dtype=torch.int32)
    kwargs = {}
    if layout in ("paged", "paged_vllm"):
        blocks = 10
        if layout == "paged":
            caches = (randn(blocks, Hk, block, E, dtype=dtype),
                      randn(blocks, Hk, block, Ev, dtype=dtype))
        else:
            caches = (randn(blocks, block, Hk, E, dtype=dtype).transpose(1, 2),
                      randn(blocks, block, Hk, Ev, dtype=dtype).transpose(1, 2))
        kwargs["block_table"] = torch.randperm(blocks)[:9].view(B, 3).to(torch.int32)
    else:
        rows = 5 if layout == "batch_idx" else B
        caches = randn(rows, Hk, S_max, E, dtype=dtype), randn(rows, Hk, S_max, Ev, dtype=dtype)
        if layout == "batch_idx":
            kwargs["cache_batch_idx"] = torch.tensor([4, 0, 2], dtype=torch.int32)
    return [q, *caches, seqlens, k_new, v_new], kwargs


def _cache_copies(args):
    """args with fresh copies of the caches (same strides)."""
    q, k_cache, v_cache, *rest = args
    copy = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)  # noqa: E731
    return [q, copy(k_cache), copy(v_cache), *rest]


KV_OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal_top_left_window": dict(causal=True, causal_align="top_left", window=(6, -1)),
    "softcap_scale": dict(softcap=3.0, scale=0.2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged", "paged_vllm"])
@pytest.mark.parametrize("options", KV_OPTIONS.values(), ids=KV_OPTIONS.keys())
def test_kv_cache_calls_as_the_python_path(monkeypatch, dtype, layout, options):
    """attention_with_kv_cache's plain calls give the Python path's output and LSE and leave the
    caches as it does (the new rows appended, version counters bumped), bit for bit."""
    torch.manual_seed(15)
    args, kwargs = kv_call(layout, dtype)
    kwargs.update(options, return_lse=True)
    assert kv_entry(*_cache_copies(args), **kwargs) is not None
    served = _cache_copies(args)
    versions = [t._version for t in served[1:3]]
    out, lse = fastattn.attention_with_kv_cache(*served, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(packed_ops, "_KV_CACHE_EAGER_ENTRY", None)
        python = _cache_copies(args)
        python_versions = [t._version for t in python[1:3]]
        expected_out, expected_lse = fastattn.attention_with_kv_cache(*python, **kwargs)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    for name, cache, want in zip(("k_cache", "v_cache"), served[1:3], python[1:3]):
        assert torch.equal(cache, want), name
        assert not torch.equal(cache, args[1 if name == "k_cache" else 2]), f"{name} unchanged"
    bumps = [t._version - v for t, v in zip(served[1:3], versions)]
    assert bumps == [t._version - v for t, v in zip(python[1:3], python_versions)]
    assert min(bumps) > 0, "the caches' version counters did not move"
    kwargs.pop("return_lse")
    with torch.inference_mode():
        assert torch.equal(fastattn.attention_with_kv_cache(*_cache_copies(args), **kwargs), out)


def test_kv_cache_without_new_rows(monkeypatch):
    torch.manual_seed(16)
    args, kwargs = kv_call("paged", torch.float32, L_new=0)
    assert kv_entry(*args, **kwargs) is not None
    out = fastattn.attention_with_kv_cache(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(packed_ops, "_KV_CACHE_EAGER_ENTRY", None)
        assert torch.equal(out, fastattn.attention_with_kv_cache(*args, **kwargs))


def _declined_kv_calls():
    args, kwargs = kv_call("paged", torch.float32)
    q, k_cache, v_cache, seqlens, k_new, v_new = args
    wide = seqlens.to(torch.int64)
    return {
        "alibi": lambda: kv_entry(*args, **kwargs, alibi_slopes=torch.rand(4)),
        "q_requires_grad": lambda: kv_entry(q.detach().requires_grad_(), *args[1:], **kwargs),
        "k_new_requires_grad": lambda: kv_entry(*args[:4], k_new.detach().requires_grad_(),
                                                v_new, **kwargs),
        "k_new_only": lambda: kv_entry(*args[:5], None, **kwargs),
        "int64_seqlens": lambda: kv_entry(q, k_cache, v_cache, wide, k_new, v_new, **kwargs),
        "2d_seqlens": lambda: kv_entry(q, k_cache, v_cache, seqlens[None], k_new, v_new,
                                       **kwargs),
        "int64_block_table": lambda: kv_entry(*args, block_table=kwargs["block_table"].long()),
        "3d_q": lambda: kv_entry(q[0], *args[1:], **kwargs),
        "new_rows_of_another_dtype": lambda: kv_entry(*args[:4], k_new.double(), v_new.double(),
                                                      **kwargs),
        "empty_new_rows": lambda: kv_entry(*args[:4], k_new[:, :, :0], v_new[:, :, :0],
                                           **kwargs),
        "int_causal": lambda: kv_entry(*args, **kwargs, causal=1),
        "zero_softcap": lambda: kv_entry(*args, **kwargs, softcap=0.0),
        "int_return_lse": lambda: kv_entry(*args, **kwargs, return_lse=1),
        "forced_reference": lambda: kv_entry(*args, **kwargs, forced="reference"),
    }


@pytest.mark.parametrize("name", list(_declined_kv_calls()))
def test_kv_cache_entry_declines_calls_that_need_the_python_path(name):
    torch.manual_seed(17)
    assert _declined_kv_calls()[name]() is None


def _refused_kv_calls():
    """Calls the op refuses, each with the error the Python path raises for it."""
    args, kwargs = kv_call("paged", torch.float32)
    q, k_cache, v_cache, seqlens, k_new, v_new = args
    table = kwargs["block_table"]
    outside = table.clone()
    outside[2, 2] = 10
    return {
        "past_the_capacity": ((q, k_cache, v_cache, seqlens + 7, k_new, v_new),
                              dict(block_table=table), "capacity"),
        "block_outside_the_cache": (args, dict(block_table=outside), "not a block"),
        "table_of_another_batch": (args, dict(block_table=table[:2]), "block_table must be"),
        "new_rows_of_another_shape": ((*args[:4], k_new[:2], v_new[:2]), kwargs,
                                      "k_new must be"),
        "more_query_heads_than_a_multiple": ((q[:, :3], *args[1:]), kwargs, "multiple"),
    }


@pytest.mark.parametrize("name", list(_refused_kv_calls()))
def test_kv_cache_calls_the_op_refuses_raise_the_python_paths_error(name):
    """The op checks everything before it writes: the entry leaves the caches untouched and the
    call to the Python path, which raises its ValueError."""
    torch.manual_seed(18)
    args, kwargs, message = _refused_kv_calls()[name]
    caches = [t.clone() for t in args[1:3]]
    assert kv_entry(*args, **kwargs) is None
    assert all(torch.equal(a, b) for a, b in zip(args[1:3], caches)), "the entry wrote"
    with pytest.raises(FastattnValueError, match=message):
        fastattn.attention_with_kv_cache(*args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(args[1:3], caches)), "the call wrote"
