"""Drop-in fidelity with torch at the edges: zero-size dims, torch's CausalBias masks, LSTM with
T = 0, mixed-dtype MHA biases, TorchScript, torch.export with a data-dependent batch, and the
exception types of bad input (issue 18)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference, nan_heap
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastattn


def _grads(out: torch.Tensor, grad_out: torch.Tensor, *inputs: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def _assert_matches_torch(out, ref, inputs, ref_inputs=None, equal_nan=False):
    """out equals torch's ref, and so do the gradients of inputs (of ref_inputs for ref, when
    torch's side has its own leaves) for one random grad_out. A gradient that does not exist
    (None: the output does not depend on the input) counts as zeros on either side. With
    equal_nan, NaN matches NaN (and nothing else)."""
    torch.testing.assert_close(out, ref, equal_nan=equal_nan)
    ref_inputs = inputs if ref_inputs is None else ref_inputs
    grad_out = torch.randn_like(ref)
    grads = zip(inputs, _grads(out, grad_out, *inputs), _grads(ref, grad_out, *ref_inputs),
                strict=True)
    for i, (t, g, g_ref) in enumerate(grads):
        torch.testing.assert_close(torch.zeros_like(t) if g is None else g,
                                   torch.zeros_like(t) if g_ref is None else g_ref,
                                   equal_nan=equal_nan,
                                   msg=lambda m, i=i: f"gradient of input {i}: {m}")


def _leaves(*shapes, dtype=torch.float64):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def _assert_sdpa_like_torch(q, k, v, grads=True, **kwargs):
    """fastattn's SDPA does with these arguments what torch's does: raises an instance of the
    exception type torch raises, or returns torch's output (and, with ``grads``, the gradients
    of q, k, v and of a mask that requires them)."""
    try:
        theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    except Exception as torch_error:  # whatever torch raises is the spec
        with pytest.raises(type(torch_error)):
            fastattn.scaled_dot_product_attention(q, k, v, **kwargs)
        return
    ours = fastattn.scaled_dot_product_attention(q, k, v, **kwargs)
    if not grads:
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        # half precision: fastattn's kernels and torch's round differently, within an ulp of 1
        ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(ours.dtype)
        tolerance = {} if ulp is None else dict(atol=ulp, rtol=ulp)
        torch.testing.assert_close(ours, theirs, equal_nan=True, **tolerance)
        return
    mask = kwargs.get("attn_mask")
    mask_leaf = [mask] if isinstance(mask, torch.Tensor) and mask.requires_grad else []
    _assert_matches_torch(ours, theirs, [q, k, v, *mask_leaf], equal_nan=True)


# ---- zero-size dims --------------------------------------------------------------------------

ZERO_CASES = [
    pytest.param((0, 3, 5, 8), (0, 3, 7, 8), (0, 3, 7, 6), id="B0"),
    pytest.param((2, 0, 5, 8), (2, 0, 7, 8), (2, 0, 7, 6), id="H0"),
    pytest.param((2, 3, 0, 8), (2, 3, 7, 8), (2, 3, 7, 6), id="L0"),
    pytest.param((2, 3, 5, 8), (2, 3, 0, 8), (2, 3, 0, 6), id="S0"),
    pytest.param((2, 3, 5, 0), (2, 3, 7, 0), (2, 3, 7, 6), id="E0"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 0), id="Ev0"),
    pytest.param((3, 5, 8), (3, 0, 8), (3, 0, 6), id="3d-S0"),
    pytest.param((4, 0, 2, 5, 8), (4, 0, 2, 7, 8), (4, 0, 2, 7, 6), id="5d-0"),
    # torch returns zeros when L = 0 or value is empty, before looking at the other shapes
    pytest.param((2, 6, 5, 8), (2, 0, 7, 8), (2, 0, 7, 6), id="Hk0"),
    pytest.param((2, 6, 5, 8), (2, 4, 7, 8), (2, 4, 7, 0), id="Ev0-heads-not-dividing"),
    pytest.param((2, 6, 5, 8), (0, 6, 7, 8), (0, 6, 7, 6), id="kv-B0-q-B2"),
    pytest.param((2, 6, 0, 8), (3, 6, 7, 3), (3, 6, 9, 4), id="L0-shapes-disagree"),
    pytest.param((5, 8), (7, 8), (0, 6), id="2d-value-S0-key-S7"),
]

ZERO_SIZE_OPTIONS = [
    pytest.param({}, id="full"),
    pytest.param({"is_causal": True}, id="causal"),
    pytest.param({"enable_gqa": True}, id="gqa"),
    pytest.param({"attn_mask": torch.ones(3, 3)}, id="mask-of-another-shape"),
    pytest.param({"attn_mask": torch.ones(3, dtype=torch.bool), "dropout_p": 2.0}, id="1d-mask-p2"),
    pytest.param({"nan_query": True}, id="nan-query"),
]


@pytest.mark.parametrize("options", ZERO_SIZE_OPTIONS)
@pytest.mark.parametrize(("q_shape", "k_shape", "v_shape"), ZERO_CASES)
def test_sdpa_zero_size_matches_torch(q_shape, k_shape, v_shape, options):
    """Zero-size dims as torch: with L = 0 or an empty value, zeros of shape (..., L, Ev) whatever
    the other shapes and options (GQA with no key heads, a mask of another shape), zero
    gradients, and NaN everywhere when an input holds NaN; otherwise torch's result or error."""
    q, k, v = _leaves(q_shape, k_shape, v_shape)
    options = dict(options)
    if options.pop("nan_query", False) and q.numel():
        q = q.detach().clone()
        q.view(-1)[0] = float("nan")
        q.requires_grad_()
    _assert_sdpa_like_torch(q, k, v, **options)


@pytest.mark.parametrize("L", [0, 3], ids=["L0", "L3"])
def test_cpu_backward_op_with_no_query_zeroes_dk_dv(L):
    # No query (L = 0) means no gradient reaches k and v: the op must write zeros there, not
    # leave its fresh buffers unwritten (they start as NaN here).
    q, k, v = torch.randn(2, 3, L, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 6)
    opts = (None, None, 0.0, None, 0.3, -1, -1, False, 0.0)
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *opts)
    grad_out = torch.randn_like(out)
    nan_heap(k.shape, v.shape, dtype=k.dtype)
    _, dk, dv, _ = torch.ops.fastattn.attention_bwd(grad_out, q, k, v, out, lse, *opts, False)
    k_ref, v_ref = k.clone().requires_grad_(), v.clone().requires_grad_()
    ref = F.scaled_dot_product_attention(q, k_ref, v_ref, scale=0.3)
    dk_ref, dv_ref = _grads(ref, grad_out, k_ref, v_ref)
    torch.testing.assert_close(dk, dk_ref)
    torch.testing.assert_close(dv, dv_ref)


@pytest.mark.parametrize(("q_shape", "k_shape", "v_shape"), ZERO_CASES[:6])
def test_attention_zero_size_matches_torch(q_shape, k_shape, v_shape):
    q, k, v = _leaves(q_shape, k_shape, v_shape)
    out, lse = fastattn.attention(q, k, v, causal=True, causal_align="bottom_right",
                                  return_lse=True)
    L, S = q_shape[2], k_shape[2]
    mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, theirs)  # rows that see no key (L > S): zeros in both
    assert lse.shape == q_shape[:3]
    (g,) = _grads(out, torch.randn_like(out), v)
    assert g is None or g.shape == v.shape


def test_packed_attention_zero_size():
    q, k, v = _leaves((0, 2, 8), (0, 2, 8), (0, 2, 8))
    cu = torch.tensor([0, 0], dtype=torch.int32)
    out = fastattn.attention_varlen(q, k, v, cu, cu, 0, 0)
    assert out.shape == (0, 2, 8)
    q = torch.randn(0, 2, 1, 8)
    cache = torch.randn(0, 2, 5, 8)
    out = fastattn.attention_with_kv_cache(q, cache, cache.clone(),
                                           torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 2, 1, 8)
    # Batch 1 with an empty cache: S = 0 gives zeros, as torch's S = 0.
    out = fastattn.attention_with_kv_cache(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8),
                                           torch.randn(1, 2, 5, 8),
                                           torch.zeros(1, dtype=torch.int32))
    torch.testing.assert_close(out, torch.zeros(1, 2, 1, 8))


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize(("B", "L", "S"), [(0, 5, 7), (2, 0, 7), (2, 5, 0)],
                         ids=["B0", "L0", "S0"])
def test_mha_zero_size_matches_torch(B, L, S, need_weights):
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours = fastattn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x, y = _leaves((B, L, 8), (B, S, 8))
    out, w = ours(x, y, y, need_weights=need_weights)
    out_ref, w_ref = ref(x, y, y, need_weights=need_weights)
    assert (w is None) == (w_ref is None)
    if w is not None:
        torch.testing.assert_close(w, w_ref)
    _assert_matches_torch(out, out_ref, [x, y, ours.in_proj_weight, ours.out_proj.bias],
                          [x, y, ref.in_proj_weight, ref.out_proj.bias])


@pytest.mark.parametrize("options", [{}, {"layer_norm": True}, {"zoneout": (0.25, 0.5)}],
                         ids=["plain", "layer_norm", "zoneout"])
def test_lstm_cell_zero_hidden_size_matches_torch(options):
    """nn.LSTMCell takes hidden_size 0 (nn.LSTM refuses it): zero-size states, and a zero
    gradient for the input, through each of fastattn's cell paths (the extras run the layer ops)."""
    x = torch.randn(3, 4, requires_grad=True)
    want = torch.nn.LSTMCell(4, 0)(x)
    got = fastattn.LSTMCell(4, 0, **options)(x)
    assert [g.shape for g in got] == [w.shape for w in want] == [(3, 0), (3, 0)]
    (grad,) = torch.autograd.grad(sum(g.sum() for g in got), x)
    assert torch.equal(grad, torch.zeros_like(x))


# ---- torch's CausalBias masks ----------------------------------------------------------------

CAUSAL_BIAS_CASES = [
    pytest.param(causal_upper_left, 5, 9, id="upper_left-L5-S9"),
    pytest.param(causal_lower_right, 5, 9, id="lower_right-L5-S9"),
    pytest.param(causal_lower_right, 7, 7, id="lower_right-L7-S7"),
    pytest.param(causal_upper_left, 9, 5, id="upper_left-L9-S5"),
]


def _causal_bias_case(make, L, S):
    q, k, v = _leaves((2, 3, L, 8), (2, 3, S, 8), (2, 3, S, 8))
    return q, k, v, make(L, S)


@pytest.mark.parametrize(("make", "L", "S"), CAUSAL_BIAS_CASES)
def test_causal_bias_matches_torch(make, L, S):
    q, k, v, bias = _causal_bias_case(make, L, S)
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    _assert_matches_torch(out, ref, [q, k, v])
    # fastattn.attention takes it too, as the same causal alignment.
    torch.testing.assert_close(fastattn.attention(q, k, v, attn_mask=bias), ref)


def test_causal_bias_under_compile():
    # The bias comes in as an argument: dynamo cannot build a CausalBias inside the graph
    # (torch's own F.scaled_dot_product_attention neither).
    torch._dynamo.reset()
    q, k, v, bias = _causal_bias_case(causal_lower_right, 5, 9)
    compiled = torch.compile(fastattn.scaled_dot_product_attention, fullgraph=True)
    out = compiled(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    _assert_matches_torch(out, ref, [q, k, v])


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("make", [causal_upper_left, causal_lower_right])
def test_mha_causal_bias_as_torch(make, need_weights):
    # torch's MHA takes a CausalBias only as the is_causal hint's mask on the fused path,
    # where the hint replaces it by top-left causal (whatever the variant); elsewhere it
    # rejects its shape with a RuntimeError.
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours = fastattn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x, y = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    bias = make(5, 7)
    if need_weights:
        for module in (ref, ours):
            with pytest.raises(RuntimeError):
                module(x, y, y, attn_mask=bias, is_causal=True, need_weights=True)
        return
    out = ours(x, y, y, attn_mask=bias, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(out, ref(x, y, y, attn_mask=bias, is_causal=True,
                                        need_weights=False)[0])


def test_causal_bias_errors_as_torch():
    q, k, v, bias = _causal_bias_case(causal_lower_right, 5, 9)
    with pytest.raises(ValueError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    with pytest.raises(ValueError, match="is_causal"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    with pytest.raises(RuntimeError, match=r"causal_lower_right\(5, 9\).*\(6, 9\)"):
        fastattn.scaled_dot_product_attention(q[:, :, :1].expand(2, 3, 6, 8), k, v,
                                              attn_mask=bias)


# ---- LSTM with T = 0, MHA bias dtype ---------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("shape", [(0, 2, 4), (0, 4)], ids=["batched", "unbatched"])
def test_lstm_empty_sequence_raises_like_torch(shape, batch_first):
    x = torch.randn(shape)
    if len(shape) == 3 and batch_first:
        x = x.transpose(0, 1)
    with pytest.raises(RuntimeError, match="sequence length"):
        torch.nn.LSTM(4, 5, batch_first=batch_first)(x)
    with pytest.raises(RuntimeError, match="sequence length to be larger than 0") as info:
        fastattn.LSTM(4, 5, batch_first=batch_first)(x)
    assert isinstance(info.value, ValueError)


def test_lstm_empty_batch_matches_torch():
    ref = torch.nn.LSTM(4, 5, num_layers=2)
    ours = fastattn.LSTM(4, 5, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 0, 4)
    out, (h, c) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x)
    assert out.shape == out_ref.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    h, c = fastattn.LSTMCell(4, 5)(torch.randn(0, 4))
    assert h.shape == c.shape == (0, 5)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_mha_in_proj_bias_of_another_dtype_matches_torch(need_weights):
    # torch's upstream test_multihead_attn_fast_path_query_and_bias_have_different_dtypes.
    ref = torch.nn.MultiheadAttention(4, 4, batch_first=True, dtype=torch.float64).eval()
    ref.in_proj_bias = torch.nn.Parameter(torch.randn(12).to(torch.float16))
    ours = fastattn.MultiheadAttention(4, 4, batch_first=True, dtype=torch.float64).eval()
    ours.load_state_dict(ref.state_dict(), assign=True)
    assert ours.in_proj_bias.dtype == torch.float16
    query = torch.randn(4, 4, 4, dtype=torch.float64)
    out, _ = ours(query, query, query, need_weights=need_weights)
    out_ref, _ = ref(query, query, query, need_weights=need_weights)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, out_ref)
    (g,) = torch.autograd.grad(out.sum(), ours.in_proj_bias)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), ref.in_proj_bias)
    assert g.dtype == torch.float16
    torch.testing.assert_close(g, g_ref)


# ---- batch dims that broadcast ---------------------------------------------------------------

BROADCAST_CASES = [
    pytest.param((2, 3, 5, 8), (1, 3, 7, 8), (2, 1, 7, 6), {}, id="kv-batch-1"),
    pytest.param((2, 6, 5, 8), (2, 1, 7, 8), (2, 1, 7, 6), {"is_causal": True}, id="one-kv-head"),
    pytest.param((1, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), {}, id="q-batch-1"),
    pytest.param((2, 3, 5, 8), (3, 7, 8), (7, 6), {}, id="fewer-kv-dims"),
    pytest.param((2, 2, 3, 5, 8), (2, 1, 3, 7, 8), (1, 2, 3, 7, 6), {}, id="5d"),
    pytest.param((2, 6, 5, 8), (1, 2, 7, 8), (1, 2, 7, 6), {"enable_gqa": True}, id="gqa"),
    # enable_gqa with key heads != value heads: torch repeats each to the query heads
    pytest.param((2, 6, 5, 8), (2, 2, 7, 8), (2, 3, 7, 6), {"enable_gqa": True}, id="gqa-kv-2-3"),
    pytest.param((6, 5, 8), (3, 7, 8), (1, 7, 6), {"enable_gqa": True, "is_causal": True},
                 id="gqa-3d-kv-3-1-causal"),
    pytest.param((2, 6, 5, 8), (1, 6, 7, 8), (2, 2, 7, 6), {"enable_gqa": True},
                 id="gqa-kv-6-2-broadcast"),
    pytest.param((0, 3, 5, 8), (1, 3, 7, 8), (1, 3, 7, 6), {}, id="B0"),
]


def test_sdpa_and_mha_with_dropout_one_give_torch_zeros():
    """dropout_p = 1 drops every probability: torch returns zeros (with zero gradients) where
    fastattn raised; MultiheadAttention(dropout=1.0) training without weights reaches it too."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, requires_grad=True) for _ in range(3))
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    ref = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert out.shape == ref.shape and torch.equal(out, ref)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.randn_like(ref))
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, g_ref) and torch.equal(g, torch.zeros_like(g))
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.scaled_dot_product_attention(q, k, v, dropout_p=1.5)

    ref_mha = torch.nn.MultiheadAttention(16, 2, dropout=1.0)
    mha = fastattn.MultiheadAttention(16, 2, dropout=1.0)
    mha.load_state_dict(ref_mha.state_dict())
    x = torch.randn(5, 3, 16)
    out, _ = mha(x, x, x, need_weights=False)
    ref, _ = ref_mha(x, x, x, need_weights=False)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    # only the output projection's bias is left of the attention's zeros
    assert torch.allclose(out, ref_mha.out_proj.bias.detach().expand_as(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("q_shape", "k_shape", "v_shape", "options"), BROADCAST_CASES)
def test_sdpa_broadcasts_batch_dims_like_torch(q_shape, k_shape, v_shape, options):
    """torch's SDPA broadcasts the batch dims of q, k and v (a key/value shared by the batch or
    by every head), and with enable_gqa repeats key and value heads to the query heads, each
    its own way; fastattn rejected them. Gradients reduce over the broadcast dims."""
    q, k, v = _leaves(q_shape, k_shape, v_shape)
    mask = torch.randn(q_shape[-2], k_shape[-2], dtype=torch.float64, requires_grad=True)
    kwargs = dict(options) if options.get("is_causal") else dict(options, attn_mask=mask)
    ours = fastattn.scaled_dot_product_attention(q, k, v, **kwargs)
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    _assert_matches_torch(ours, theirs, [q, k, v] + ([] if options.get("is_causal") else [mask]))


# ---- attn_mask dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_mask_with_half_query_keeps_float32_precision_like_torch(dtype):
    """torch adds a float32 attn_mask to half-precision scores at float32 precision; rounding it
    to bfloat16 first moved the scores of a 30-sized bias by up to 0.125 (issue: 8% output error
    where torch has 0.4%)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 64) for _ in range(3))
    mask = torch.randn(33, 33) * 30  # an ALiBi / relative-position sized float32 bias
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                           attn_mask=mask.double())
    half = [t.to(dtype) for t in (q, k, v)]
    leaf = mask.clone().requires_grad_()
    leaf_ref = mask.clone().requires_grad_()
    ours = fastattn.scaled_dot_product_attention(*half, attn_mask=leaf)
    theirs = F.scaled_dot_product_attention(*half, attn_mask=leaf_ref)
    assert ours.dtype == theirs.dtype == dtype

    def error(out):
        return ((out.double() - exact).abs().max() / exact.abs().max()).item()

    assert error(ours) <= 2 * error(theirs), (error(ours), error(theirs))
    grad_out = torch.randn(ours.shape, dtype=dtype)
    (g,) = torch.autograd.grad(ours, leaf, grad_out)
    (g_ref,) = torch.autograd.grad(theirs, leaf_ref, grad_out)
    assert g.dtype == g_ref.dtype == torch.float32
    torch.testing.assert_close(g, g_ref, rtol=0.05, atol=0.05 * g_ref.abs().max().item())


@pytest.mark.parametrize("mask_shape", [(5, 7), (5, 1), (2, 1, 5, 7)], ids=str)
def test_float64_mask_gradient_keeps_float64_precision(mask_shape):
    """The CPU kernel wrote dS, the mask's gradient, through a float32 buffer: 1e-8 relative
    error in float64 (and a nonzero gradient for a per-row bias, whose true gradient is 0)."""
    torch.manual_seed(0)
    q, k, v = _leaves((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6))
    mask = torch.randn(mask_shape, dtype=torch.float64, requires_grad=True)
    mask_ref = mask.detach().clone().requires_grad_()
    with fastattn.use_backend("cpu"):
        ours = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_ref)
    grad_out = torch.randn(ours.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(ours, mask, grad_out)
    (g_ref,) = torch.autograd.grad(theirs, mask_ref, grad_out)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


_MASK_DTYPES = [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                torch.int64]


def _mask_of(dtype, shape, requires_grad=False):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.3
    if not dtype.is_floating_point:
        return torch.randint(0, 2, shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("mask_shape", [(), (7,), (5, 7), (2, 3, 5, 7)], ids=str)
@pytest.mark.parametrize("mask_dtype", _MASK_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_sdpa_mask_dtype_and_rank_as_torch(dtype, mask_dtype, mask_shape):
    """torch takes a bool, float32 or query-dtype mask only (RuntimeError for the others, which
    fastattn converted), and its CPU flash path raises IndexError for a 0-D or 1-D mask, which
    fastattn broadcast."""
    torch.manual_seed(0)
    q, k, v = _leaves((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dtype=dtype)
    mask = _mask_of(mask_dtype, mask_shape, requires_grad=dtype == torch.float64)
    _assert_sdpa_like_torch(q, k, v, grads=dtype == torch.float64, attn_mask=mask)


# (q, k, v shapes, options): calls whose outcome hangs on torch's choice between its CPU flash
# and math kernels (a 0-D / 1-D mask, is_causal with a mask, a negative or NaN dropout_p), or on
# the argument types torch's parser takes.
SDPA_EDGE_CASES = [
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(attn_mask="1d"), id="1d-mask"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(attn_mask="1d-grad"),
                 id="1d-mask-requiring-grad"),
    pytest.param((3, 5, 8), (3, 7, 8), (3, 7, 8), dict(attn_mask="1d"), id="1d-mask-3d"),
    pytest.param((2, 3, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8), dict(attn_mask="1d"),
                 id="1d-mask-kv-head-broadcast"),
    pytest.param((2, 6, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(attn_mask="1d", enable_gqa=True),
                 id="1d-mask-gqa"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), dict(attn_mask="0d"),
                 id="0d-mask-Ev"),
    pytest.param((5, 8), (7, 8), (7, 8), dict(enable_gqa=True), id="gqa-2d"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(attn_mask="2d", is_causal=True),
                 id="causal-2d-mask"),
    pytest.param((2, 3, 9, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(attn_mask="bool", is_causal=True),
                 id="causal-bool-mask-L9-S7"),
    pytest.param((2, 6, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8),
                 dict(attn_mask="4d", is_causal=True, enable_gqa=True), id="causal-4d-mask-gqa"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(attn_mask="3d", is_causal=True),
                 id="causal-3d-mask"),
    pytest.param((3, 5, 8), (3, 7, 8), (3, 7, 8), dict(attn_mask="2d", is_causal=True),
                 id="causal-mask-3d"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), dict(attn_mask="2d", is_causal=True),
                 id="causal-mask-Ev"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8),
                 dict(attn_mask="2d-grad", is_causal=True), id="causal-mask-requiring-grad"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8),
                 dict(attn_mask="2d", is_causal=True, dropout_p=1.0), id="causal-mask-p1"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(dropout_p=-0.5), id="p-negative"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), dict(dropout_p=-0.5),
                 id="p-negative-Ev"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), dict(dropout_p=float("nan")),
                 id="p-nan-Ev"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(dropout_p=float("inf")),
                 id="p-inf"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(is_causal=1), id="causal-int"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(enable_gqa=None), id="gqa-none"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(scale=torch.tensor(0.5)),
                 id="scale-0d-tensor"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8),
                 dict(scale=torch.tensor(0.5, requires_grad=True)), id="scale-tensor-with-grad"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(scale=torch.tensor([0.5])),
                 id="scale-1d-tensor"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8),
                 dict(dropout_p=torch.tensor(0.0, requires_grad=True)), id="p-tensor-with-grad"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(scale=2), id="scale-int"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(scale=float("nan")),
                 id="scale-nan"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8),
                 dict(scale=float("inf"), is_causal=True), id="scale-inf-causal"),
    pytest.param((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), dict(scale=-1e39),
                 id="scale-f32-overflow-Ev"),
]


def _edge_mask(kind, q_shape, S):
    L = q_shape[-2]
    shape = {"0d": (), "1d": (S,), "2d": (L, S), "bool": (L, S), "3d": (q_shape[-3], L, S),
             "4d": (*q_shape[:-1], S)}[kind.removesuffix("-grad")]
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        mask[0] = False  # a row that sees no key
        return mask
    return torch.randn(shape, dtype=torch.float64, requires_grad=kind.endswith("-grad"))


@pytest.mark.parametrize(("q_shape", "k_shape", "v_shape", "options"), SDPA_EDGE_CASES)
def test_sdpa_edge_arguments_as_torch(q_shape, k_shape, v_shape, options):
    torch.manual_seed(0)
    q, k, v = _leaves(q_shape, k_shape, v_shape)
    options = dict(options)
    if isinstance(options.get("attn_mask"), str):
        options["attn_mask"] = _edge_mask(options["attn_mask"], q_shape, k_shape[-2])
    _assert_sdpa_like_torch(q, k, v, **options)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64], ids=str)
def test_sdpa_input_dtype_error_as_torch(dtype):
    """torch rejects complex inputs with NotImplementedError (integer ones with RuntimeError)."""
    q = torch.ones(2, 3, 5, 8, dtype=dtype)
    _assert_sdpa_like_torch(q, q, q)
    with pytest.raises(TypeError):  # fastattn's convention, as well
        fastattn.scaled_dot_product_attention(q, q, q)


# ---- exception types -------------------------------------------------------------------------


def _sdpa_args(**changes):
    args = dict(query=torch.randn(2, 3, 5, 8), key=torch.randn(2, 3, 7, 8),
                value=torch.randn(2, 3, 7, 8))
    args.update(changes)
    return args


BAD_INPUTS = [
    pytest.param("sdpa", _sdpa_args(key=torch.randn(2, 3, 7, 8, dtype=torch.float64)),
                 TypeError, id="sdpa-key-dtype"),
    pytest.param("sdpa", _sdpa_args(key=torch.randn(2, 3, 7, 6)), ValueError,
                 id="sdpa-key-head-dim"),
    pytest.param("sdpa", _sdpa_args(key=torch.randn(2, 2, 7, 8), value=torch.randn(2, 2, 7, 8)),
                 ValueError, id="sdpa-heads-without-gqa"),
    pytest.param("sdpa", _sdpa_args(attn_mask=torch.ones(4, 7, dtype=torch.bool)), ValueError,
                 id="sdpa-mask-shape"),
    pytest.param("sdpa", _sdpa_args(attn_mask=torch.ones(5, 7, dtype=torch.int32)), TypeError,
                 id="sdpa-mask-dtype"),
    pytest.param("lstm", torch.randn(3, 2, 6), ValueError, id="lstm-input-size"),
    pytest.param("lstm_cell", torch.randn(2, 6), ValueError, id="lstm-cell-input-size"),
]


def _call(kind: str, args, impl):
    if kind == "sdpa":
        fn = F.scaled_dot_product_attention if impl == "torch" else (
            fastattn.scaled_dot_product_attention)
        return fn(**args)
    if kind == "lstm":
        return (torch.nn.LSTM if impl == "torch" else fastattn.LSTM)(4, 5)(args)
    return (torch.nn.LSTMCell if impl == "torch" else fastattn.LSTMCell)(4, 5)(args)


@pytest.mark.parametrize(("kind", "args", "python_kind"), BAD_INPUTS)
def test_bad_input_is_runtime_error_like_torch(kind, args, python_kind):
    with pytest.raises(RuntimeError) as torch_error:
        _call(kind, args, "torch")
    assert type(torch_error.value) is RuntimeError  # the premise: torch raises RuntimeError
    with pytest.raises(RuntimeError) as ours:
        _call(kind, args, "fastattn")
    assert isinstance(ours.value, python_kind), type(ours.value)
    expected = fastattn.FastattnTypeError if python_kind is TypeError else (
        fastattn.FastattnValueError)
    assert type(ours.value) is expected
    with pytest.raises(python_kind):  # the Python spelling of the handler catches it too
        _call(kind, args, "fastattn")


# ---- LSTM constructor, attributes, input dtype, hx and autocast as nn.LSTM / nn.LSTMCell ------


LSTM_BAD_ARGS = [dict(hidden_size=2.0), dict(num_layers=1.5), dict(input_size=0),
                 dict(input_size=-1), dict(bias="yes"), dict(bias=1), dict(batch_first=1)]


@pytest.mark.parametrize("changes", LSTM_BAD_ARGS, ids=lambda c: "-".join(map(str, *c.items())))
def test_lstm_constructor_errors_as_torch(changes):
    args = {"input_size": 5, "hidden_size": 7, **changes}
    with pytest.raises(Exception) as theirs:
        torch.nn.LSTM(**args)
    with pytest.raises(type(theirs.value)):
        fastattn.LSTM(**args)


@pytest.mark.parametrize("flags", [{}, dict(num_layers=2, bias=False, batch_first=True,
                                            dropout=0.5, bidirectional=True, proj_size=3)],
                         ids=["default", "all"])
def test_lstm_repr_and_flat_weights_as_torch(flags):
    theirs, ours = torch.nn.LSTM(5, 7, **flags), fastattn.LSTM(5, 7, **flags)
    assert repr(ours) == repr(theirs)
    assert [p.shape for p in ours._flat_weights] == [p.shape for p in theirs._flat_weights]
    named = dict(ours.named_parameters())
    assert all(p is named[n] for n, p in zip(ours._flat_weights_names, ours._flat_weights,
                                             strict=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64],
                         ids=["f64", "bf16", "int64"])
@pytest.mark.parametrize("packed", [False, True], ids=["tensor", "packed"])
def test_lstm_input_dtype_not_the_weights_raises_like_torch(dtype, packed):
    x = torch.ones(3, 2, 5, dtype=dtype)
    if packed:  # torch's packed path fails later, in its kernel (RuntimeError)
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [3, 2])
    with pytest.raises(RuntimeError if packed else ValueError) as theirs:
        torch.nn.LSTM(5, 7)(x)
    with pytest.raises(type(theirs.value), match="input must be float32") as ours:
        fastattn.LSTM(5, 7)(x)
    assert isinstance(ours.value, TypeError)  # fastattn's convention for a dtype, too


@pytest.mark.parametrize("hx", [torch.zeros(2, 7), (torch.zeros(2, 7),) * 3],
                         ids=["tensor", "triple"])
def test_lstm_cell_hx_not_a_pair_raises_like_torch(hx):
    x = torch.randn(2, 5)
    with pytest.raises(Exception) as theirs:
        torch.nn.LSTMCell(5, 7)(x, hx)
    with pytest.raises(type(theirs.value), match="hx must be a tuple"):
        fastattn.LSTMCell(5, 7)(x, hx)
    # Unbatched, nn.LSTMCell takes hx[0] and hx[1] of whatever it is given: so do we.
    hx = torch.randn(2, 7) if isinstance(hx, torch.Tensor) else tuple(torch.randn(3, 7))
    theirs, ours = torch.nn.LSTMCell(5, 7), fastattn.LSTMCell(5, 7)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x[0], hx), theirs(x[0], hx))


# Input and state dtypes under bf16 autocast (None: no hx): autocast's output next to float32
# weights, and a state of either dtype.
AUTOCAST_INPUT_AND_STATE_DTYPES = pytest.mark.parametrize(
    ("x_dtype", "hx_dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32),
     (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "bf16-in-fp32-hx", "fp32-in-bf16-hx"])


def _assert_float32_finite_weight_grads(ours, theirs):
    """Autocast leaves the weights and their gradients float32, as torch's."""
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("flags", [{}, dict(num_layers=2, bidirectional=True)],
                         ids=["L1", "L2-bi"])
@pytest.mark.parametrize(("x_dtype", "with_hx"), [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-in", "bf16-in-fp32-hx"])
def test_lstm_under_cpu_autocast_as_torch(flags, x_dtype, with_hx):
    """nn.LSTM under CPU bf16 autocast runs in bf16 (input, state and weights cast), whatever
    the input's dtype; before, fastattn.LSTM ignored autocast and refused a bf16 input."""
    theirs = torch.nn.LSTM(5, 33, **flags)
    ours = fastattn.LSTM(5, 33, **flags)
    ours.load_state_dict(theirs.state_dict())
    ref = torch.nn.LSTM(5, 33, dtype=torch.float64, **flags)
    ref.load_state_dict({k: v.bfloat16() for k, v in theirs.state_dict().items()})
    L = 2 * flags.get("num_layers", 1) if flags.get("bidirectional") else 1
    x = torch.randn(7, 3, 5).to(x_dtype)
    hx = (torch.randn(L, 3, 33), torch.randn(L, 3, 33)) if with_hx else None
    with torch.no_grad():
        out_ref = ref(x.bfloat16().double(),
                      None if hx is None else [t.bfloat16().double() for t in hx])
    results = []
    for module in (theirs, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h_n, c_n) = module(x, hx)
        (out.float().sum() + c_n.float().sum()).backward()
        results.append((out, h_n, c_n))
    for name, a, t, r in zip(("output", "h_n", "c_n"), results[1], results[0],
                             (out_ref[0], *out_ref[1]), strict=True):
        assert a.dtype == t.dtype == torch.bfloat16, name
        assert_close_to_reference(a, r, t, name=name)
    _assert_float32_finite_weight_grads(ours, theirs)


@AUTOCAST_INPUT_AND_STATE_DTYPES
@pytest.mark.parametrize("proj_size", [0, 4], ids=["H", "proj"])
@pytest.mark.parametrize("layout", ["packed", "padded", "batch_first", "unbatched"])
def test_lstm_under_cpu_autocast_dtypes_as_torch(x_dtype, hx_dtype, proj_size, layout):
    """nn.LSTM's packed path, and on the CPU its projection path, under autocast: GEMMs in bf16,
    the rest in the state's dtype (the input's without hx), output and h_n of a projection in
    bf16 (the projection's GEMM); the padded path without projection all in bf16. Ours refused
    a bf16 input next to float32 weights, and returned c_n of a projection in bf16."""
    flags = dict(num_layers=2, bidirectional=True, proj_size=proj_size,
                 batch_first=layout == "batch_first")
    theirs, ours = torch.nn.LSTM(5, 33, **flags), fastattn.LSTM(5, 33, **flags)
    ours.load_state_dict(theirs.state_dict())
    shape = {"packed": (6, 3, 5), "padded": (6, 4, 5), "batch_first": (4, 6, 5),
             "unbatched": (6, 5)}[layout]
    x = torch.randn(shape).to(x_dtype)
    batch = {"packed": (3,), "unbatched": ()}.get(layout, (4,))
    if layout == "packed":
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [2, 6, 5], enforce_sorted=False)
    P = proj_size or 33
    hx = None if hx_dtype is None else (
        (torch.randn(4, *batch, P) * 0.5).to(hx_dtype),
        (torch.randn(4, *batch, 33) * 0.5).to(hx_dtype))
    results = []
    for module in (theirs, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h_n, c_n) = module(x, hx)
        out = out.data if layout == "packed" else out
        (out.float().sum() + c_n.float().sum()).backward()
        results.append((out, h_n, c_n))
    for name, a, t in zip(("output", "h_n", "c_n"), results[1], results[0], strict=True):
        assert a.dtype == t.dtype, name
        torch.testing.assert_close(a, t, rtol=3e-2, atol=3e-2)
    _assert_float32_finite_weight_grads(ours, theirs)


@AUTOCAST_INPUT_AND_STATE_DTYPES
@pytest.mark.parametrize("options", [{}, {"zoneout": (0.5, 0.25)}], ids=["plain", "zoneout"])
def test_lstm_cell_under_cpu_autocast_as_torch(x_dtype, hx_dtype, options):
    """nn.LSTMCell under CPU autocast: GEMMs in bf16, the result in the state's dtype (the
    input's without hx), whatever the input's dtype; ours refused a bf16 input (a Linear's
    output under autocast) next to float32 weights."""
    theirs, ours = torch.nn.LSTMCell(5, 33), fastattn.LSTMCell(5, 33, **options).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 5).to(x_dtype)
    hx = None if hx_dtype is None else tuple(torch.randn(2, 7, 33).to(hx_dtype) * 0.5)
    if options:  # eval-mode zoneout mixes in the previous state: torch's side, by hand
        p_c, p_h = options["zoneout"]
        h0, c0 = hx if hx is not None else (torch.zeros(7, 33).to(x_dtype),) * 2
    results = []
    for module in (theirs, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, c = module(x, hx)
        if options and module is theirs:
            h, c = p_h * h0 + (1 - p_h) * h, p_c * c0 + (1 - p_c) * c
        (h.float().sum() + c.float().sum()).backward()
        results.append((h, c))
    for name, a, t in zip(("h", "c"), results[1], results[0], strict=True):
        assert a.dtype == t.dtype, name
        torch.testing.assert_close(a, t, rtol=2e-2, atol=2e-2)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("options", [{}, {"layer_norm": True}], ids=["plain", "layer_norm"])
def test_lstm_cell_and_layer_norm_lstm_under_cpu_autocast(options):
    """nn.LSTMCell under CPU autocast returns the state's dtype (its GEMMs autocast, the
    pointwise part not); ours crashed on the bf16 gates. The LayerNorm-LSTM (no torch twin)
    crashed too, in its forward and in a backward run under autocast."""
    x, hx = torch.randn(3, 5), (torch.randn(3, 7), torch.randn(3, 7))
    cell = fastattn.LSTMCell(5, 7, **options)
    theirs = torch.nn.LSTMCell(5, 7)
    theirs.load_state_dict(cell.state_dict(), strict=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = cell(x, hx)
        h_t, c_t = theirs(x, hx)
        (h.sum() + c.sum()).backward()
    assert h.dtype == h_t.dtype and c.dtype == c_t.dtype
    h32, c32 = cell(x, hx)
    torch.testing.assert_close(h, h32, rtol=0.02, atol=0.02)  # bf16 GEMMs
    torch.testing.assert_close(c, c32, rtol=0.02, atol=0.02)
    lstm = fastattn.LSTM(5, 7, **options)
    xs = torch.randn(4, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = lstm(xs)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), lstm(xs)[0], rtol=0.03, atol=0.03)
    assert all(torch.isfinite(p.grad).all() for p in lstm.parameters())


# ---- torch.export with a data-dependent or dynamic batch -------------------------------------


class _FirstRows(torch.nn.Module):
    """Runs ``fn`` on the first n batch rows, n read from a tensor: an unbacked batch size that
    may be 0 at run time (the export must not guard on it)."""

    def __init__(self, fn, batch_dim: int = 0) -> None:
        super().__init__()
        self.fn = fn
        self.batch_dim = batch_dim

    def forward(self, n: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
        b = n.item()
        torch._check(b >= 0)
        torch._check(b <= xs[0].shape[self.batch_dim])
        return self.fn(*(x.narrow(self.batch_dim, 0, b) for x in xs))


def _export_cases():
    mha = fastattn.MultiheadAttention(8, 2, batch_first=True).eval()
    lstm = fastattn.LSTM(8, 6).eval()
    q, k, v = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 7, 8), torch.randn(4, 2, 7, 8)
    x = torch.randn(4, 5, 8)
    return [
        ("sdpa", fastattn.scaled_dot_product_attention, (q, k, v), 0),
        ("attention", lambda q, k, v: fastattn.attention(q, k, v, causal=True), (q, k, v), 0),
        ("mha", lambda x: mha(x, x, x, need_weights=False)[0], (x,), 0),
        ("lstm", lambda x: lstm(x)[0], (torch.randn(6, 4, 8),), 1),
    ]


@pytest.mark.parametrize("case", range(4), ids=["sdpa", "attention", "mha", "lstm"])
def test_export_with_unbacked_batch(case):
    _, fn, xs, batch_dim = _export_cases()[case]
    program = torch.export.export(_FirstRows(fn, batch_dim), (torch.tensor(3), *xs))
    for n in (2, 0):
        got = program.module()(torch.tensor(n), *xs)
        want = fn(*(x.narrow(batch_dim, 0, n) for x in xs))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", range(3), ids=["sdpa", "mha", "lstm"])
def test_export_with_dynamic_batch(case):
    _, fn, xs, batch_dim = [_export_cases()[i] for i in (0, 2, 3)][case]

    class Wrapped(torch.nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    batch = torch.export.Dim("batch", max=64)
    per_input = tuple({batch_dim: batch} for _ in xs)
    program = torch.export.export(Wrapped(), xs, dynamic_shapes=(per_input,))  # one *xs
    smaller = tuple(x.narrow(batch_dim, 0, 3) for x in xs)
    torch.testing.assert_close(program.module()(*smaller), fn(*smaller))


# ---- torch.jit.trace -------------------------------------------------------------------------

LSTM_TRACE_CASES = [
    pytest.param({}, id="L1"),
    pytest.param(dict(num_layers=2, bidirectional=True, proj_size=3), id="L2-bi-proj"),
    pytest.param(dict(batch_first=True, bias=False), id="batch-first-nobias"),
]


def _assert_traced_matches_torch(ours, ref, x, hx, tmp_path):
    """torch.jit.trace of ours passes torch's trace check (check_trace=True re-traces under
    no_grad), and the traced model, and the one saved and loaded, compute ref's outputs with
    and without grad mode (without, on the inference kernel as eager) and its gradients."""
    traced = torch.jit.trace(ours, (x, hx))
    torch.jit.save(traced, tmp_path / "traced.pt")
    for module in (traced, torch.jit.load(tmp_path / "traced.pt")):
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode):
                torch.testing.assert_close(module(x, hx), ref(x, hx))
        with torch.no_grad(), torch.profiler.profile() as prof:
            module(x, hx)
        assert "fastattn::lstm_layer_infer" in {e.name for e in prof.events()}
        leaves = [t.clone().requires_grad_() for t in (x, *hx)]
        ref_leaves = [t.clone().requires_grad_() for t in (x, *hx)]
        outs = torch.utils._pytree.tree_leaves(module(leaves[0], tuple(leaves[1:])))
        ref_outs = torch.utils._pytree.tree_leaves(ref(ref_leaves[0], tuple(ref_leaves[1:])))
        module.zero_grad()
        ref.zero_grad()
        grads = [torch.randn_like(t) for t in outs]
        torch.autograd.backward(outs, grads)
        torch.autograd.backward(ref_outs, grads)
        for a, b in zip(leaves, ref_leaves, strict=True):
            torch.testing.assert_close(a.grad, b.grad)
        for (name, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("config", LSTM_TRACE_CASES)
def test_traced_lstm_matches_torch(config, tmp_path):
    """torch.jit.trace of fastattn.LSTM failed torch's trace check: under no_grad ours ran
    another op, so the re-traced graph differed."""
    ref = torch.nn.LSTM(5, 7, **config)
    ours = fastattn.LSTM(5, 7, **config)
    ours.load_state_dict(ref.state_dict())
    L = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    x = torch.randn((3, 4, 5) if config.get("batch_first") else (4, 3, 5))
    hx = (torch.randn(L, 3, config.get("proj_size") or 7), torch.randn(L, 3, 7))
    _assert_traced_matches_torch(ours, ref, x, hx, tmp_path)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_traced_lstm_cell_matches_torch(bias, tmp_path):
    """As test_traced_lstm_matches_torch for fastattn.LSTMCell (the same failure)."""
    ref, ours = torch.nn.LSTMCell(5, 7, bias=bias), fastattn.LSTMCell(5, 7, bias=bias)
    ours.load_state_dict(ref.state_dict())
    _assert_traced_matches_torch(ours, ref, torch.randn(3, 5),
                                 (torch.randn(3, 7), torch.randn(3, 7)), tmp_path)


def _traced_and_loaded(fn, inputs, tmp_path):
    """torch.jit.trace of fn (with torch's trace check) and that trace saved and loaded."""
    traced = torch.jit.trace(fn, inputs)
    torch.jit.save(traced, tmp_path / "traced.pt")
    return traced, torch.jit.load(tmp_path / "traced.pt")


class _Sdpa(torch.nn.Module):
    """An SDPA call with its keyword arguments, as a module to trace."""

    def __init__(self, sdpa, **kwargs):
        super().__init__()
        self.sdpa, self.kwargs = sdpa, kwargs

    def forward(self, q, k, v, *mask):  # a trace's inputs are tensors: no mask, no argument
        return self.sdpa(q, k, v, *mask, **self.kwargs)


SDPA_TRACE_CASES = {
    "causal": (dict(is_causal=True), False, 2),
    "bool-mask": ({}, True, 2),
    "gqa-scale": (dict(enable_gqa=True, scale=0.5), False, 1),
}


@pytest.mark.parametrize("case", SDPA_TRACE_CASES.values(), ids=SDPA_TRACE_CASES.keys())
def test_traced_sdpa_matches_torch(case, tmp_path):
    """torch.jit.trace of fastattn.scaled_dot_product_attention raised AssertionError (its
    emptiness checks took the trace's 0-D tensor sizes for symbolic ones). The trace records
    fastattn::attention_fwd, and it, saved and loaded, computes torch's results and gradients on
    other batch sizes and lengths, with and without grad mode."""
    kwargs, masked, kv_heads = case
    ours = _Sdpa(fastattn.scaled_dot_product_attention, **kwargs)
    ref = _Sdpa(F.scaled_dot_product_attention, **kwargs)

    def inputs(B, L, S):
        mask = (torch.rand(L, S) > 0.3,) if masked else ()
        return (torch.randn(B, 2, L, 8), torch.randn(B, kv_heads, S, 8),
                torch.randn(B, kv_heads, S, 8), *mask)

    torch.manual_seed(0)
    example = inputs(1, 3, 5)
    for module in _traced_and_loaded(ours, example, tmp_path):
        assert "fastattn::attention_fwd" in str(module.inlined_graph)
        other = inputs(2, 6, 9)
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode):
                torch.testing.assert_close(module(*other), ref(*other))
        leaves = [t.clone().requires_grad_() for t in other[:3]]
        ref_leaves = [t.clone().requires_grad_() for t in other[:3]]
        grad = torch.randn(2, 2, 6, 8)
        module(*leaves, *other[3:]).backward(grad)
        ref(*ref_leaves, *other[3:]).backward(grad)
        for a, b in zip(leaves, ref_leaves, strict=True):
            torch.testing.assert_close(a.grad, b.grad)


class _SelfAttention(torch.nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x, key_padding_mask):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def test_traced_mha_matches_torch(tmp_path):
    """torch.jit.trace of fastattn.MultiheadAttention (the same failure, in its SDPA call)."""
    torch.manual_seed(1)
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    ours = fastattn.MultiheadAttention(16, 2, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    ours, ref = _SelfAttention(ours), _SelfAttention(ref)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, -2:] = True
    for module in _traced_and_loaded(ours, (torch.randn(2, 5, 16), mask), tmp_path):
        assert "fastattn::attention_fwd" in str(module.inlined_graph)
        x = torch.randn(2, 5, 16)
        out, ref_out = module(x, mask), ref(x, mask)
        torch.testing.assert_close(out, ref_out)
        module.zero_grad()
        ref.zero_grad()
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_out.backward(grad)
        for (name, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=name: f"{n}: {m}")


# ---- torch.jit.script ------------------------------------------------------------------------

MHA_SCRIPT_CASES = [
    pytest.param({}, id="packed"),
    pytest.param({"kdim": 6, "vdim": 5}, id="kdim-vdim"),
    pytest.param({"bias": False, "add_zero_attn": True}, id="nobias-zero-attn"),
    pytest.param({"add_bias_kv": True, "batch_first": True}, id="bias-kv-batch-first"),
]


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("config", MHA_SCRIPT_CASES)
def test_scripted_mha_matches_torch(config, need_weights, tmp_path):
    ref = torch.nn.MultiheadAttention(8, 2, **config)
    ours = fastattn.MultiheadAttention(8, 2, **config)
    ours.load_state_dict(ref.state_dict())
    scripted = torch.jit.script(ours)
    torch.jit.save(scripted, tmp_path / "mha.pt")
    loaded = torch.jit.load(tmp_path / "mha.pt")
    batch_first = config.get("batch_first", False)
    L, S, B = 5, 7, 3
    q = torch.randn((B, L, 8) if batch_first else (L, B, 8))
    kv_shape = (B, S) if batch_first else (S, B)
    k = torch.randn(*kv_shape, config.get("kdim", 8))
    v = torch.randn(*kv_shape, config.get("vdim", 8))
    padding = torch.rand(B, S) < 0.3
    padding[:, 0] = False  # every query keeps a key (torch gives NaN rows otherwise)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    for module in (scripted, loaded):
        out, w = module(q, k, v, key_padding_mask=padding, attn_mask=causal,
                        need_weights=need_weights)
        out_ref, w_ref = ref(q, k, v, key_padding_mask=padding, attn_mask=causal,
                             need_weights=need_weights)
        torch.testing.assert_close(out, out_ref)
        if need_weights:
            torch.testing.assert_close(w, w_ref)
        else:
            assert w is None
    # Scripted training: gradients flow through the op's registered autograd.
    x = torch.randn(L, B, 8, requires_grad=True) if not batch_first else torch.randn(
        B, L, 8, requires_grad=True)
    if config.get("kdim") is None:
        scripted(x, x, x, need_weights=need_weights)[0].sum().backward()
        ref_x = x.detach().clone().requires_grad_()
        ref(ref_x, ref_x, ref_x, need_weights=need_weights)[0].sum().backward()
        torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_scripted_transformer_layer_after_convert_matches_torch(layer):
    if layer == "encoder":
        ref = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0,
                                               batch_first=True).eval()
    else:
        ref = torch.nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.0,
                                               batch_first=True).eval()
    model = fastattn.convert(__import__("copy").deepcopy(ref))
    assert isinstance(model.self_attn, fastattn.MultiheadAttention)
    scripted = torch.jit.script(model)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        if layer == "encoder":
            out, out_ref = scripted(x, src_mask=mask), ref(x, src_mask=mask)
        else:
            out = scripted(x, memory, tgt_mask=mask, tgt_is_causal=True)
            out_ref = ref(x, memory, tgt_mask=mask, tgt_is_causal=True)
    torch.testing.assert_close(out, out_ref)
