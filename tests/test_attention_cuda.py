"""torch.ops.fastattn.attention_fwd / attention_bwd on CUDA tensors (the CUDA C++ kernels of
csrc/attention/) against the float64 reference, for every compiled head dim and dtype and
every feature: windows (causal top-left / bottom-right, sliding), bool and additive masks
through broadcast strides (with the mask gradient), alibi, softcap, GQA, dropout, fully masked
rows, the split-KV decode path, determinism of the backward.

Outputs come from the CUDA caching allocator, which is first filled with NaN bytes
(best effort: freed poisoned blocks are what the op's allocations reuse), so a row the
kernels forget to write shows up as NaN and fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference

import fastattn  # noqa: F401  (registers the ops and loads fastattn._C)
from fastattn.ops.attention import CUDA_HEAD_DIMS
from fastattn.ops.reference import attention_reference

pytestmark = pytest.mark.gpu

# The head dims the CUDA kernels are built for: csrc/include/fastattn/attention_head_dims.h,
# the one list (issue 18), through the extension.
HEAD_DIMS = list(CUDA_HEAD_DIMS)
DTYPES = [torch.float16, torch.bfloat16]


def poison_cuda_cache() -> None:
    """Fill freed blocks of the caching allocator's small and large pools with 0xFF bytes
    (NaN in fp16, bf16 and fp32)."""
    torch.cuda.synchronize()
    for nbytes in (1 << 20, 256 << 20):
        torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)
    torch.cuda.synchronize()


def strided(B, H, N, E, dtype, *, seed_shift=0.0):
    """[B, H, N, E] random view with non-contiguous head / row strides (laid out [B, N, H, E])."""
    return (
        (torch.randn(B, N, H, E, device="cuda", dtype=torch.float32) + seed_shift)
        .to(dtype)
        .transpose(1, 2)
    )


def run_ours(
    q,
    k,
    v,
    grad_out,
    *,
    mask=None,
    alibi=None,
    dropout_p=0.0,
    seed=None,
    scale=None,
    window=(-1, -1),
    bottom_right=False,
    softcap=0.0,
    mask_grad=False,
):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rng_seed = torch.tensor(seed, dtype=torch.int64) if seed is not None else None
    options = (mask, alibi, dropout_p, rng_seed, scale, window[0], window[1], bottom_right, softcap)
    poison_cuda_cache()
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *options)
    poison_cuda_cache()
    dq, dk, dv, dmask = torch.ops.fastattn.attention_bwd(
        grad_out, q, k, v, out, lse, *options, mask_grad
    )
    return out, lse, (dq, dk, dv, dmask if mask_grad else None)


def run_reference(
    q,
    k,
    v,
    grad_out,
    *,
    mask=None,
    alibi=None,
    dropout_p=0.0,
    seed=None,
    scale=None,
    window=(-1, -1),
    bottom_right=False,
    softcap=0.0,
    mask_grad=False,
):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask64 = None
    if mask is not None:
        mask64 = (
            mask
            if mask.dtype == torch.bool
            else mask.detach().double().contiguous().requires_grad_(mask_grad)
        )
    rng_seed = torch.tensor(seed, dtype=torch.int64) if seed is not None else None
    out, lse = attention_reference(
        q64,
        k64,
        v64,
        mask64,
        alibi,
        dropout_p,
        rng_seed,
        scale,
        window[0],
        window[1],
        bottom_right,
        softcap,
    )
    inputs = (q64, k64, v64) + ((mask64,) if mask_grad else ())
    grads = torch.autograd.grad(out, inputs, grad_out.double())
    return out, lse, tuple(grads) + ((None,) if not mask_grad else ())


def check(ours, ref, dtype, torch_out=None):
    out, lse, grads = ours
    ref_out, ref_lse, ref_grads = ref
    assert_close_to_reference(out, ref_out, torch_out, dtype=dtype, name="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf pattern differs from the reference"
    assert torch.equal(lse[~finite], ref_lse[~finite]), (
        "lse: rows without a visible key must be -inf"
    )
    assert_close_to_reference(
        lse[finite], ref_lse[finite].double(), dtype=torch.float32, name="lse"
    )
    for name, a, r in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, strict=True):
        if r is None:
            continue
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert_close_to_reference(a, r, dtype=dtype, name=name)


def make_inputs(B, Hq, Hk, L, S, E, dtype):
    q = strided(B, Hq, L, E, dtype)
    k = strided(B, Hk, S, E, dtype)
    v = strided(B, Hk, S, E, dtype)
    grad_out = torch.randn(B, Hq, L, E, device="cuda", dtype=dtype)
    return q, k, v, grad_out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", HEAD_DIMS, ids=lambda e: f"E{e}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "L,S", [(77, 77), (1, 130), (130, 33)], ids=["L77-S77", "L1-S130", "L130-S33"]
)
def test_every_head_dim_and_dtype(dtype, E, causal, L, S):
    q, k, v, g = make_inputs(2, 3, 3, L, S, E, dtype)
    window = (-1, 0) if causal else (-1, -1)
    ours = run_ours(q, k, v, g, window=window)
    ref = run_reference(q, k, v, g, window=window)
    torch_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # torch's top-left causal gives NaN rows where L > S has no visible key; compare elsewhere.
    check(ours, ref, dtype, torch_out if not torch_out.isnan().any() else None)


def broadcast_bool_mask(B, H, L, S):
    m = torch.rand(1, 1, L, S, device="cuda") > 0.4
    m[..., 3, :] = False  # one fully masked row
    return m.expand(B, H, L, S)


def broadcast_additive_mask(B, H, L, S, dtype):
    m = torch.randn(B, 1, L, S, device="cuda").to(dtype)
    m.masked_fill_(torch.rand(B, 1, L, S, device="cuda") > 0.7, float("-inf"))
    m[:, :, 5, :] = float("-inf")  # one fully masked row
    return m.expand(B, H, L, S)


FEATURES = {
    "causal-bottom-right": dict(window=(-1, 0), bottom_right=True),
    "sliding-5-3": dict(window=(5, 3)),
    "causal-window-16": dict(window=(16, 0)),
    "bool-mask": dict(mask="bool"),
    "additive-mask-grad": dict(mask="additive", mask_grad=True),
    "alibi-heads": dict(alibi="heads", window=(-1, 0)),
    "alibi-batch-heads": dict(alibi="batch", window=(-1, 0), bottom_right=True),
    "softcap": dict(softcap=5.0),
    "dropout": dict(dropout_p=0.2, seed=1234),
    "everything": dict(
        mask="additive",
        mask_grad=True,
        alibi="batch",
        softcap=3.0,
        window=(40, 7),
        bottom_right=True,
        dropout_p=0.1,
        seed=(1 << 40) + 7,
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", [64, 128], ids=lambda e: f"E{e}")
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize(
    "L,S", [(33, 150), (150, 33), (200, 200)], ids=["L33-S150", "L150-S33", "L200-S200"]
)
@pytest.mark.parametrize("Hq,Hk", [(4, 4), (6, 2)], ids=["mha", "gqa3"])
def test_features(dtype, E, feature, L, S, Hq, Hk):
    B = 2
    opts = dict(FEATURES[feature])
    q, k, v, g = make_inputs(B, Hq, Hk, L, S, E, dtype)
    if opts.get("mask") == "bool":
        opts["mask"] = broadcast_bool_mask(B, Hq, L, S)
    elif opts.get("mask") == "additive":
        opts["mask"] = broadcast_additive_mask(B, Hq, L, S, dtype)
    if opts.get("alibi") == "heads":
        opts["alibi"] = torch.rand(Hq, device="cuda")
    elif opts.get("alibi") == "batch":
        opts["alibi"] = torch.rand(B, Hq, device="cuda")
    check(run_ours(q, k, v, g, **opts), run_reference(q, k, v, g, **opts), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", [64, 128, 256], ids=lambda e: f"E{e}")
@pytest.mark.parametrize("L", [1, 5, 16])
@pytest.mark.parametrize("S", [1, 100, 5000])
def test_decode_split_kv(dtype, E, L, S):
    q, k, v, g = make_inputs(2, 8, 2, L, S, E, dtype)
    opts = dict(window=(-1, 0), bottom_right=True)
    check(run_ours(q, k, v, g, **opts), run_reference(q, k, v, g, **opts), dtype)


@pytest.mark.parametrize("E", [64, 128])
def test_many_tiles_causal(E):
    q, k, v, g = make_inputs(1, 2, 1, 1000, 1100, E, torch.bfloat16)
    opts = dict(window=(-1, 0), bottom_right=True)
    check(run_ours(q, k, v, g, **opts), run_reference(q, k, v, g, **opts), torch.bfloat16)


@pytest.mark.parametrize("E", [64, 128], ids=lambda e: f"E{e}")
def test_float32_mask_with_bf16_q_matches_torch(E):
    """A float32 additive mask with a bfloat16 q is added at float32 precision, as torch's SDPA
    adds it: rounded to bfloat16 first (what the cuda backend did), a 30-sized bias (ALiBi /
    relative positions) moves the scores by up to 0.125, ~8% output error where torch has 0.4%.
    Out and the mask gradient within 2x torch's own error against float64."""
    B, Hq, Hk, L, S = 2, 4, 2, 33, 70
    q, k, v, g = make_inputs(B, Hq, Hk, L, S, E, torch.bfloat16)
    mask = torch.randn(B, 1, L, S, device="cuda") * 30
    mask[:, :, 5, :] = float("-inf")  # one fully masked row
    mask = mask.expand(B, Hq, L, S)
    ours = run_ours(q, k, v, g, mask=mask, mask_grad=True)
    ref = run_reference(q, k, v, g, mask=mask, mask_grad=True)
    qt, kt, vt = (t.detach().requires_grad_() for t in (q, k, v))
    mask_t = mask.detach().clone().requires_grad_()
    group = Hq // Hk
    torch_out = F.scaled_dot_product_attention(
        qt, kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1), attn_mask=mask_t
    )
    (torch_dmask,) = torch.autograd.grad(torch_out, mask_t, g)
    assert ours[2][3].dtype == torch.float32
    # torch gives NaN for the fully masked row (ours: zeros); compare out elsewhere.
    rows = torch.ones(L, dtype=torch.bool, device="cuda")
    rows[5] = False
    assert_close_to_reference(ours[0][:, :, rows], ref[0][:, :, rows], torch_out[:, :, rows],
                              dtype=torch.bfloat16, name="out")
    assert_close_to_reference(ours[2][3][:, :, rows], ref[2][3][:, :, rows],
                              torch_dmask[:, :, rows], dtype=torch.bfloat16, name="dmask")
    check(ours, ref, torch.bfloat16)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    B, H, L, S, E = 1, 2, 20, 40, 64
    q, k, v, g = make_inputs(B, H, H, L, S, E, torch.float16)
    mask = torch.ones(B, H, L, S, dtype=torch.bool, device="cuda")
    mask[:, :, 2:9] = False
    out, lse, (dq, dk, dv, _) = run_ours(q, k, v, g, mask=mask)
    assert torch.equal(out[:, :, 2:9], torch.zeros_like(out[:, :, 2:9]))
    assert torch.isneginf(lse[:, :, 2:9]).all()
    assert torch.equal(dq[:, :, 2:9], torch.zeros_like(dq[:, :, 2:9]))
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))


def test_backward_is_deterministic():
    q, k, v, g = make_inputs(2, 4, 2, 300, 300, 128, torch.bfloat16)
    opts = dict(window=(-1, 0), dropout_p=0.1, seed=5)
    first = run_ours(q, k, v, g, **opts)
    second = run_ours(q, k, v, g, **opts)
    for a, b in zip(first[2][:3], second[2][:3], strict=True):
        assert torch.equal(a, b)


def test_rejects_what_it_cannot_serve():
    q, k, v, _ = make_inputs(1, 2, 2, 8, 8, 64, torch.float16)
    scale = 0.125
    args = (None, None, 0.0, None, scale, -1, -1, False, 0.0)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.fastattn.attention_fwd(q.float(), k.float(), v.float(), *args)
    q40 = torch.randn(1, 2, 8, 40, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dim 40"):
        torch.ops.fastattn.attention_fwd(q40, q40, q40, *args)
    with pytest.raises(RuntimeError, match="same dtype|share a dtype"):
        torch.ops.fastattn.attention_fwd(q, k.bfloat16(), v, *args)
    for mask_dtype in (torch.float64, torch.bfloat16, torch.int32):  # bool, float32 or q's only
        mask = torch.zeros(1, 2, 8, 8, device="cuda", dtype=mask_dtype)
        with pytest.raises(RuntimeError, match="attn_mask must be bool, float32 or q's dtype"):
            torch.ops.fastattn.attention_fwd(q, k, v, mask, *args[1:])
