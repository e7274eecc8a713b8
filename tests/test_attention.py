"""fastattn.scaled_dot_product_attention / fastattn.attention against torch and float64, on
every backend: reference and cpu here, triton under TRITON_INTERPRET=1, cuda on a GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ATTENTION_BACKENDS,
    assert_close_to_reference,
    attention_grad_scales,
    device_for,
    max_rel_error,
    require,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn
from fastattn.ops.attention import _missing_feature

BACKENDS = ATTENTION_BACKENDS
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def run_three_ways(backend, q, k, v, grad_out, **kwargs):
    """[ours, torch's at the same dtype, float64 reference] (output, input gradients), then the
    gradients' scale floors (attention_grad_scales)."""
    results = []
    for kind in ("ours", "torch", "ref64"):
        inputs = []
        for t in (q, k, v, kwargs.get("attn_mask")):
            if t is None:
                inputs.append(None)
                continue
            t = t.detach()
            if kind == "ref64" and t.is_floating_point():
                t = t.to(torch.float64)
            inputs.append(t.requires_grad_(t.is_floating_point()))
        call_kwargs = {**kwargs, "attn_mask": inputs[3]}
        if kind == "torch":
            out = F.scaled_dot_product_attention(*inputs[:3], **call_kwargs)
        else:
            with fastattn.use_backend(backend if kind == "ours" else "reference"):
                out = fastattn.scaled_dot_product_attention(*inputs[:3], **call_kwargs)
        out.backward(grad_out.to(out.dtype))
        grads = [t.grad if t is not None else None for t in inputs]
        results.append((out, grads))
    results.append(attention_grad_scales(q, k, v, grad_out, kwargs.get("scale")))
    return results


def check_three_ways(results, dtype, compare_torch=True):
    (ours, g_ours), (theirs, g_theirs), (ref, g_ref), floors = results
    assert_close_to_reference(ours, ref, theirs if compare_torch else None, dtype=dtype, name="out")
    for name, a, t, r in zip(("dq", "dk", "dv", "dmask"), g_ours, g_theirs, g_ref):
        if r is None:
            continue
        assert a is not None, f"{name} missing"
        assert_close_to_reference(a, r, t if compare_torch else None, dtype=dtype, name=name,
                                  scale_floor=floors.get(name, 0.0))


SHAPES = [
    pytest.param((1, 1, 1, 1, 8, 8), id="L1-S1-E8"),
    pytest.param((2, 3, 7, 33, 40, 40), id="L7-S33-E40"),
    pytest.param((1, 2, 33, 7, 64, 64), id="L33-S7-E64"),
    pytest.param((2, 2, 33, 33, 80, 32), id="L33-S33-E80-Ev32"),
    pytest.param((1, 2, 100, 100, 128, 128), id="L100-S100-E128"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_matches_torch_and_float64(backend, dtype, shape, is_causal):
    B, H, L, S, E, Ev = shape
    require(backend, dtype, E, Ev)
    if backend == "triton" and device_for(backend) == "cpu" and L * S > 33 * 33:
        pytest.skip("the Triton interpreter is too slow for L*S > 33*33 here")
    device = device_for(backend)
    q = torch.randn(B, H, L, E, dtype=dtype, device=device)
    k = torch.randn(B, H, S, E, dtype=dtype, device=device)
    v = torch.randn(B, H, S, Ev, dtype=dtype, device=device)
    g = torch.randn(B, H, L, Ev, dtype=dtype, device=device)
    check_three_ways(run_three_ways(backend, q, k, v, g, is_causal=is_causal), dtype)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 8, 8), (2, 3, 7, 33, 40, 40)], ids=["L1-S1", "L7-S33"]
)
@pytest.mark.parametrize("grad", ["dq", "dk"])
def test_the_gradient_floor_still_catches_a_real_error(shape, grad):
    """The scale floor only absorbs rounding noise: an error of 1e-4 of the floor where the
    exact gradient is zero (one key), or of 1e-4 of the gradient elsewhere, fails."""
    B, H, L, S, E, Ev = shape
    q, k, g = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, L, Ev)
    v = torch.randn(B, H, S, Ev)
    results = run_three_ways("reference", q, k, v, g)
    check_three_ways(results, torch.float32)
    index = ("dq", "dk").index(grad)
    wrong = results[0][1][index]
    size = max(float(results[2][1][index].abs().max()), results[3][grad])
    wrong.view(-1)[0] += 1e-4 * size
    with pytest.raises(AssertionError, match=f"{grad}: relative error"):
        check_three_ways(results, torch.float32)


MASKS = ["bool-LS", "bool-B1LS", "float-LS-grad", "float-BHLS-grad", "bool-L1"]


def make_mask(kind: str, B, H, L, S, dtype, device):
    if kind == "bool-LS":
        m = torch.rand(L, S, device=device) > 0.3
        m[:, 0] = True  # no fully masked row: torch would return NaN there
        return m
    if kind == "bool-B1LS":
        m = torch.rand(B, 1, L, S, device=device) > 0.5
        m[..., -1] = True
        return m
    if kind == "bool-L1":  # broadcast over keys: a 0-stride last dim
        return torch.ones(L, 1, dtype=torch.bool, device=device)
    shape = (L, S) if kind == "float-LS-grad" else (B, H, L, S)
    return torch.randn(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_masks_broadcast_and_get_gradients(backend, dtype, mask_kind):
    B, H, L, S, E = 2, 3, 7, 33, 64
    require(backend, dtype, E)
    device = device_for(backend)
    q, k, v = (torch.randn(B, H, n, E, dtype=dtype, device=device) for n in (L, S, S))
    mask = make_mask(mask_kind, B, H, L, S, dtype, device)
    g = torch.randn(B, H, L, E, dtype=dtype, device=device)
    check_three_ways(run_three_ways(backend, q, k, v, g, attn_mask=mask), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_query_attention(backend, dtype):
    require(backend, dtype, 64)
    device = device_for(backend)
    q = torch.randn(2, 6, 7, 64, dtype=dtype, device=device)
    k = torch.randn(2, 2, 33, 64, dtype=dtype, device=device)
    v = torch.randn(2, 2, 33, 64, dtype=dtype, device=device)
    g = torch.randn_like(q)
    check_three_ways(run_three_ways(backend, q, k, v, g, enable_gqa=True, is_causal=True), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [3, 5], ids=["3d", "5d"])
def test_any_number_of_batch_dims_and_noncontiguous_views(backend, dims):
    require(backend, torch.float32, 32)
    device = device_for(backend)
    lead = (3,) if dims == 3 else (2, 2, 3)
    # [..., L, H, E] storage viewed as [..., H, L, E]: a non-contiguous, transposed view.
    q = torch.randn(*lead[:-1], 7, lead[-1], 32, device=device).transpose(-2, -3)
    k = torch.randn(*lead[:-1], 9, lead[-1], 32, device=device).transpose(-2, -3)
    v = torch.randn(*lead, 32, 9, device=device).transpose(-1, -2)  # last dim strided
    assert not q.is_contiguous() and v.stride(-1) != 1
    g = torch.randn(*lead, 7, 32, device=device)
    check_three_ways(run_three_ways(backend, q, k, v, g), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_output_and_gradients(backend):
    require(backend, torch.float32, 32)
    device = device_for(backend)
    q, k, v = (torch.randn(1, 2, n, 32, device=device, requires_grad=True) for n in (5, 6, 6))
    mask = torch.rand(1, 2, 5, 6, device=device) > 0.5
    mask[:, :, 2] = False
    mask[:, 1, 4] = False
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert out[:, :, 2].abs().max() == 0 and out[:, 1, 4].abs().max() == 0
    assert q.grad[:, :, 2].abs().max() == 0
    visible_rows = mask.any(-1)
    ref = fastattn.ops.reference.attention_reference(
        q.double(),
        k.double(),
        v.double(),
        mask,
        None,
        0.0,
        None,
        1 / math.sqrt(32),
        -1,
        -1,
        False,
        0.0,
    )[0]
    assert max_rel_error(out[visible_rows], ref[visible_rows]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_stay_finite_and_accurate(backend):
    require(backend, torch.float32, 64)
    device = device_for(backend)
    q = torch.randn(1, 2, 33, 64, device=device) * 30
    k = torch.randn(1, 2, 33, 64, device=device) * 30  # |q.k| ~ 1e4 before scaling
    v = torch.randn(1, 2, 33, 64, device=device)
    g = torch.randn_like(q)
    results = run_three_ways(backend, q, k, v, g, scale=1.0)
    assert torch.isfinite(results[0][0]).all()
    check_three_ways(results, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_seeded_rescaled_and_matches_the_reference(backend):
    require(backend, torch.float32, 32)
    device = device_for(backend)
    q, k = (torch.randn(2, 2, 17, 32, device=device) for _ in range(2))
    v = torch.randn(2, 2, 17, 32, device=device, requires_grad=True)

    def run(which):
        torch.manual_seed(123)
        with fastattn.use_backend(which):
            return fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3)

    a, b = run(backend), run(backend)
    assert torch.equal(a, b), "the same torch.manual_seed must give the same dropout"
    torch.manual_seed(124)
    with fastattn.use_backend(backend):
        c = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert not torch.equal(a, c)
    ref = run("reference")
    assert max_rel_error(a, ref) < 1e-5, "dropout mask differs from the shared Philox stream"
    (ga,) = torch.autograd.grad(a.sum(), v)
    (gr,) = torch.autograd.grad(ref.sum(), v)
    assert max_rel_error(ga, gr) < 1e-5
    # Kept mass is rescaled by 1/(1-p): with v = 1 each output is sum(kept p)/(1-p), mean 1.
    ones = torch.ones(2, 2, 64, 32, device=device)
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(
            torch.randn(2, 2, 64, 32, device=device),
            torch.randn(2, 2, 64, 32, device=device),
            ones,
            dropout_p=0.5,
        )
    assert abs(out.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_keys(backend):
    require(backend, torch.float32, 16)
    device = device_for(backend)
    q = torch.randn(0, 2, 5, 16, device=device, requires_grad=True)
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(q, q, q)
    assert out.shape == (0, 2, 5, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


FEATURES = [
    pytest.param(dict(causal=True, causal_align="bottom_right"), id="causal-bottom-right"),
    pytest.param(dict(window=(3, 2)), id="window-3-2"),
    pytest.param(dict(window=(4, -1), causal=True), id="window-4-causal"),
    pytest.param(dict(softcap=5.0), id="softcap"),
    pytest.param(dict(alibi=True, causal=True), id="alibi-causal"),
    pytest.param(
        dict(alibi=True, softcap=2.0, window=(5, 5), causal_align="bottom_right"),
        id="alibi-softcap-window-br",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("L,S", [(7, 33), (33, 7)], ids=["L7-S33", "L33-S7"])
def test_flash_features_against_float64(backend, dtype, features, L, S):
    require(backend, dtype, 64)
    device = device_for(backend)
    features = dict(features)
    B, Hq, Hk, E = 2, 4, 2, 64
    if features.pop("alibi", False):
        features["alibi_slopes"] = torch.rand(B, Hq, device=device)
    q = torch.randn(B, Hq, L, E, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, Hk, S, E, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, Hk, S, E, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(B, Hq, L, E, dtype=dtype, device=device)
    with fastattn.use_backend(backend):
        out, lse = fastattn.attention(q, k, v, return_lse=True, **features)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with fastattn.use_backend("reference"):
        ref, ref_lse = fastattn.attention(q64, k64, v64, return_lse=True, **features)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    assert_close_to_reference(out, ref, dtype=dtype, name="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close_to_reference(
        lse[finite], ref_lse[finite].double(), dtype=torch.float32, name="lse"
    )
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(a, r, dtype=dtype, name=name)


def test_reference_features_agree_with_torch_explicit_masks():
    """The reference's windows/alibi/bottom-right equal torch SDPA with an explicit mask."""
    B, H, L, S, E = 1, 2, 7, 12, 16
    q, k, v = (torch.randn(B, H, n, E, dtype=torch.float64) for n in (L, S, S))
    slopes = torch.rand(H).double()  # float32 values: the API takes slopes as float32
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    rel = j - i - (S - L)
    mask = ((rel >= -3) & (rel <= 0)).double().log() + slopes[:, None, None] * rel
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with fastattn.use_backend("reference"):
        out, lse = fastattn.attention(
            q,
            k,
            v,
            causal=True,
            causal_align="bottom_right",
            window=(3, -1),
            alibi_slopes=slopes,
            return_lse=True,
        )
    assert max_rel_error(out, expected) < 1e-12
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(E) + mask
    assert max_rel_error(lse, torch.logsumexp(scores, -1)) < 1e-6


# Hypothesis examples per backend: the interpreted Triton kernels are slow, so they get fewer
# and smaller problems; derandomized, so CI draws the same examples every run.
FUZZ = {"reference": (12, 200), "cpu": (30, 200), "triton": (3, 33)}


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in FUZZ])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fuzz_across_tiles_against_float64(backend, dtype):
    """Random problems across tile edges (L, S up to 200, odd head dims) with masks, GQA,
    windows, softcap and both causal alignments: output and gradients within the dtype's budget
    of float64, LSE (always float32) within float32's."""
    require(backend, dtype, 8)
    examples, max_len = FUZZ[backend]
    device = device_for(backend)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None)
    @given(
        B=st.integers(1, 2),
        Hk=st.integers(1, 2),
        group=st.integers(1, 3),
        L=st.integers(1, max_len),
        S=st.integers(1, max_len),
        E=st.sampled_from([1, 7, 8, 33, 40, 64]),
        Ev=st.sampled_from([3, 8, 17, 64]),
        causal=st.booleans(),
        mask=st.sampled_from(["none", "bool", "float"]),
        window_left=st.integers(-1, 70),
        softcap=st.sampled_from([None, 3.0]),
        align=st.sampled_from(["top_left", "bottom_right"]),
    )
    def check(B, Hk, group, L, S, E, Ev, causal, mask, window_left, softcap, align):
        if _missing_feature(backend, dtype, E, Ev, batch=B, q_heads=Hk * group):
            return
        Hq = Hk * group
        gen = torch.Generator().manual_seed(L * 1000 + S)

        def draw(*shape):
            return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype).to(device)

        q, k, v, g = draw(B, Hq, L, E), draw(B, Hk, S, E), draw(B, Hk, S, Ev), draw(B, Hq, L, Ev)
        attn_mask = None
        if mask == "bool":
            attn_mask = (torch.rand(B, 1, L, S, generator=gen) > 0.3).to(device)
        elif mask == "float":
            attn_mask = draw(1, Hq, L, S)
        kwargs = dict(causal=causal, causal_align=align, window=(window_left, -1),
                      softcap=softcap, return_lse=True)
        results = []
        for which, cast in ((backend, lambda t: t), ("reference", torch.Tensor.double)):
            inputs = [cast(t).detach().requires_grad_() for t in (q, k, v)]
            m = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else cast(attn_mask)
            with fastattn.use_backend(which):
                out, lse = fastattn.attention(*inputs, attn_mask=m, **kwargs)
            grads = torch.autograd.grad(out, inputs, cast(g))
            results.append((out, lse, grads))
        (out, lse, grads), (ref, ref_lse, ref_grads) = results
        assert_close_to_reference(out, ref, dtype=dtype, name="out")
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert_close_to_reference(lse[finite], ref_lse[finite], dtype=torch.float32, name="lse")
        floors = attention_grad_scales(q, k, v, g)
        for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
            assert_close_to_reference(a, r, dtype=dtype, name=name,
                                      scale_floor=floors.get(name, 0.0))

    check()


def test_eager_autograd_function_equals_the_ops_registered_autograd():
    """Eager calls that need gradients go through an autograd.Function (cheaper per call than
    torch.library's wrapper); the op's registered autograd serves direct op calls and
    torch.compile. Both must give the same outputs and gradients, bit for bit, with an additive
    mask that requires grad and dropout (the seed must reach the backward)."""
    require("cpu", torch.float32, 16)
    q, k, v = (torch.randn(1, 2, 7, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 2, 7, 7, requires_grad=True)
    grad_out = torch.randn(1, 2, 7, 16)
    inputs = (q, k, v, mask)
    with fastattn.use_backend("cpu"):
        torch.manual_seed(3)
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.25)
    grads = torch.autograd.grad(out, inputs, grad_out)
    torch.manual_seed(3)  # the same dropout seed as the call above draws
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    op_out, _ = torch.ops.fastattn.attention_fwd(
        q, k, v, mask, None, 0.25, seed, 1 / math.sqrt(16), -1, -1, False, 0.0
    )
    op_grads = torch.autograd.grad(op_out, inputs, grad_out)
    assert torch.equal(out, op_out)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), grads, op_grads, strict=True):
        assert torch.equal(a, b), name


def test_compiles_fullgraph_on_cpu():
    require("cpu", torch.float32, 32)
    torch._dynamo.reset()

    def f(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 9, 32, requires_grad=True) for _ in range(3))
    out = compiled(q, k, v)
    out.sum().backward()
    with fastattn.use_backend("reference"):
        ref = f(q.detach(), k.detach(), v.detach())
    assert max_rel_error(out, ref) < 1e-5 and q.grad is not None


def test_compiles_with_a_batch_size_that_changes_between_calls():
    """The second batch size makes torch.compile trace the batch as a symbolic int: the
    backend choice (grid limits included) must not take it as an argument."""
    require("cpu", torch.float32, 16)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q: fastattn.scaled_dot_product_attention(q, q, q), fullgraph=True,
        backend="aot_eager",
    )
    for B in (2, 3, 5):
        q = torch.randn(B, 2, 7, 16)
        expected = F.scaled_dot_product_attention(q, q, q)
        assert max_rel_error(compiled(q), expected) < 1e-5


BAD_INPUTS = [
    pytest.param(lambda q, k, v: dict(key=k[..., :16]), ValueError, "key head dim", id="head-dim"),
    pytest.param(
        lambda q, k, v: dict(value=v[..., :5, :]), ValueError, "value length", id="kv-len"
    ),
    pytest.param(lambda q, k, v: dict(key=k.double()), TypeError, "key dtype", id="dtype"),
    pytest.param(lambda q, k, v: dict(query=q.int(), key=k.int(), value=v.int()), TypeError,
                 "value must be float16", id="int"),
    pytest.param(
        lambda q, k, v: dict(attn_mask=torch.ones(3, 7, dtype=torch.bool)),
        ValueError,
        "attn_mask of shape",
        id="mask-shape",
    ),
    pytest.param(
        lambda q, k, v: dict(attn_mask=torch.ones(6, 9, dtype=torch.int32)),
        TypeError,
        "attn_mask must be bool",
        id="mask-dtype",
    ),
    # (1.0 is valid, as in torch: every probability dropped, test_dropin.py)
    pytest.param(lambda q, k, v: dict(dropout_p=1.5), ValueError, "dropout_p", id="dropout-1.5"),
    pytest.param(lambda q, k, v: dict(dropout_p=-0.1), ValueError, "dropout_p", id="dropout-neg"),
    pytest.param(
        lambda q, k, v: dict(key=k[:, :2], value=v[:, :2], enable_gqa=True),
        ValueError,
        "multiple of key/value heads",
        id="gqa-heads",
    ),
    pytest.param(
        # 2 key heads for 3 query heads: not grouped (one key head would broadcast, as in torch)
        lambda q, k, v: dict(key=k[:, :2], value=v[:, :2]),
        ValueError,
        "enable_gqa",
        id="heads-without-gqa",
    ),
    pytest.param(
        # a 3-D mask: torch's math path serves it, which refuses is_causal with a mask (its CPU
        # flash path takes a 2-D or 4-D one: test_dropin.py)
        lambda q, k, v: dict(is_causal=True, attn_mask=torch.ones(3, 6, 9, dtype=torch.bool)),
        ValueError,
        "is_causal",
        id="causal-and-mask",
    ),
    pytest.param(
        lambda q, k, v: dict(key="k"), TypeError, "key must be a torch.Tensor", id="not-tensor"
    ),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS)
def test_bad_input_raises_clear_error_before_any_kernel(change, error, message, monkeypatch):
    q = torch.randn(2, 3, 6, 32)
    k = torch.randn(2, 3, 9, 32)
    v = torch.randn(2, 3, 9, 32)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(fastattn.ops.attention, "_attention_normalized", no_kernel)
    kwargs = dict(query=q, key=k, value=v)
    kwargs.update(change(q, k, v))
    with pytest.raises(error, match=message):
        fastattn.scaled_dot_product_attention(**kwargs)


def test_bad_attention_options():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="window"):
        fastattn.attention(q, q, q, window=(-2, 0))
    with pytest.raises(ValueError, match="causal_align"):
        fastattn.attention(q, q, q, causal=True, causal_align="center")
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.attention(q, q, q, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="softcap"):
        fastattn.attention(q, q, q, softcap=-1.0)
    with pytest.raises(ValueError, match="4-D"):
        fastattn.attention(q[0], q[0], q[0])
