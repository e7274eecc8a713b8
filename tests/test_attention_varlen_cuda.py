"""torch.ops.fastattn.attention_varlen_fwd / attention_varlen_bwd / attention_kv_cache_fwd on
CUDA tensors (the CUDA kernels of csrc/attention/ with cu_seqlens, cache_seqlens and block
tables read on the device) against float64 references built per sequence here: varlen with
empty, length-1, odd and multi-tile sequences, GQA, causal top-left / bottom-right with
Lq != Sk, windows, softcap, ALiBi and dropout with VARLEN_SPEC's counter; the KV cache with
the append, contiguous rows through cache_batch_idx, paged blocks (shuffled tables, block
sizes that do not divide the lengths, vLLM's [num_blocks, block_size, Hk, E] passed as a
transpose) and the split-KV decode path.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close_to_reference
from test_attention_cuda import poison_cuda_cache

import fastattn  # noqa: F401  (registers the ops and loads fastattn._C)
from fastattn.ops.reference import (
    alibi_bias,
    attention_reference,
    dropout_keep_mask,
    visible_keys,
)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _ops_defined():
    for name in ("attention_varlen_fwd", "attention_varlen_bwd", "attention_kv_cache_fwd"):
        if not hasattr(torch.ops.fastattn, name):
            pytest.skip(f"fastattn::{name} is not defined (fastattn/ops/_registry.py, issue 16)")


def packed(total, H, E, dtype):
    """[total, H, E] random view whose rows are (H + 1) * E apart (not contiguous)."""
    return torch.randn(total, H + 1, E, device="cuda").to(dtype)[:, :H]


def offsets(lengths):
    return torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
    )


def varlen_reference(q, k, v, grad_out, lens_q, lens_k, max_k, opts):
    """float64 out [total_q, Hq, E], lse [Hq, total_q] and (dq, dk, dv), one sequence at a
    time; dropout keeps (b, h, i, j) by the counter ((h * total_q) + cu_q[b] + i) * max_k + j."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    total_q, Hq, _ = q.shape
    group = Hq // k.shape[1]
    keep = None
    if opts["dropout_p"] > 0:
        keep = dropout_keep_mask(opts["seed"], (1, Hq, total_q, max_k), opts["dropout_p"], q.device)
    outs, lses = [], []
    q0 = k0 = 0
    for b, (Lq, Sk) in enumerate(zip(lens_q, lens_k, strict=True)):
        qb = q64[q0 : q0 + Lq].transpose(0, 1)  # [Hq, Lq, E]
        kb = k64[k0 : k0 + Sk].transpose(0, 1).repeat_interleave(group, 0)
        vb = v64[k0 : k0 + Sk].transpose(0, 1).repeat_interleave(group, 0)
        scores = qb @ kb.transpose(-1, -2) * opts["scale"]
        if opts["softcap"] > 0:
            scores = opts["softcap"] * torch.tanh(scores / opts["softcap"])
        if opts["alibi"] is not None:
            slopes = opts["alibi"][b] if opts["alibi"].dim() == 2 else opts["alibi"]
            scores = (
                scores + alibi_bias(slopes, 1, Hq, Lq, Sk, opts["bottom_right"], torch.float64)[0]
            )
        wl, wr = opts["window"]
        visible = visible_keys(Lq, Sk, wl, wr, opts["bottom_right"], q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_max = scores.amax(-1, keepdim=True) if Sk else scores.new_zeros(Hq, Lq, 1)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0).detach()
        unnormalized = torch.exp(scores - row_max)
        row_sum = unnormalized.sum(-1, keepdim=True)
        probs = unnormalized / row_sum.clamp_min(1.0)
        lses.append(torch.where(row_sum == 0, float("-inf"), row_max + row_sum.log()).squeeze(-1))
        if keep is not None:
            probs = probs * keep[0, :, q0 : q0 + Lq, :Sk] / (1.0 - opts["dropout_p"])
        outs.append((probs @ vb).transpose(0, 1))
        q0, k0 = q0 + Lq, k0 + Sk
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double(), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q64, k64, v64)))
    return out, lse, grads


VARLEN = {
    # name: (lens_q, lens_k, Hq, Hk, options)
    "empty-1-7-long-causal": ([0, 1, 7, 300], [5, 1, 7, 290], 4, 2, dict(window=(-1, 0))),
    "bottom-right-Lq-ne-Sk": (
        [5, 1, 0, 130],
        [9, 0, 4, 200],
        2,
        2,
        dict(window=(-1, 0), bottom_right=True),
    ),
    "window-softcap-alibi": (
        [33, 2, 64],
        [20, 66, 64],
        6,
        2,
        dict(window=(8, 2), softcap=10.0, alibi="batch"),
    ),
    "dropout": ([3, 17, 0, 40], [20, 5, 33, 40], 2, 1, dict(dropout_p=0.2, seed=(1 << 33) + 5)),
    "decode-sized": ([1, 4, 16], [100, 1000, 7], 8, 1, dict(window=(-1, 0), bottom_right=True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", [64, 128], ids=lambda e: f"E{e}")
@pytest.mark.parametrize("case", list(VARLEN))
def test_varlen_fwd_bwd_against_float64(dtype, E, case):
    lens_q, lens_k, Hq, Hk, extra = VARLEN[case]
    total_q, total_k = sum(lens_q), sum(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    q, k, v = (
        packed(total_q, Hq, E, dtype),
        packed(total_k, Hk, E, dtype),
        packed(total_k, Hk, E, dtype),
    )
    grad_out = torch.randn(total_q, Hq, E, device="cuda").to(dtype)
    alibi = torch.rand(len(lens_q), Hq, device="cuda") if extra.get("alibi") == "batch" else None
    opts = dict(
        alibi=alibi,
        dropout_p=extra.get("dropout_p", 0.0),
        seed=extra.get("seed", 0),
        scale=1.0 / math.sqrt(E),
        window=extra.get("window", (-1, -1)),
        bottom_right=extra.get("bottom_right", False),
        softcap=extra.get("softcap", 0.0),
    )
    rng_seed = torch.tensor(opts["seed"], dtype=torch.int64)
    args = (
        offsets(lens_q),
        offsets(lens_k),
        max_q,
        max_k,
        alibi,
        opts["dropout_p"],
        rng_seed,
        opts["scale"],
        *opts["window"],
        opts["bottom_right"],
        opts["softcap"],
    )
    poison_cuda_cache()
    out, lse = torch.ops.fastattn.attention_varlen_fwd(q, k, v, *args)
    poison_cuda_cache()
    grads = torch.ops.fastattn.attention_varlen_bwd(grad_out, q, k, v, out, lse, *args)
    ref_out, ref_lse, ref_grads = varlen_reference(q, k, v, grad_out, lens_q, lens_k, max_k, opts)

    assert out.shape == (total_q, Hq, E) and out.is_contiguous() and lse.shape == (Hq, total_q)
    assert_close_to_reference(out, ref_out, dtype=dtype, name="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and torch.isneginf(lse[~finite]).all()
    assert_close_to_reference(lse[finite], ref_lse[finite], dtype=torch.float32, name="lse")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert got.is_contiguous()
        assert_close_to_reference(got, ref, dtype=dtype, name=name)


def test_varlen_dropout_bits_follow_the_varlen_counter():
    """With one-hot values out[i, h, j] / (P / (1 - p)) is the keep bit of key j; it must be
    fastattn.ops.reference.dropout_keep_mask at ((h * total_q) + cu_q[b] + i) * max_k + j."""
    lens_q, lens_k, H, E, p, seed = [3, 0, 9], [20, 5, 33], 3, 64, 0.3, 12345
    max_k, total_q = max(lens_k), sum(lens_q)
    q = (0.05 * torch.randn(total_q, H, E, device="cuda")).half()
    k = torch.randn(sum(lens_k), H, E, device="cuda").half()
    v = torch.zeros(sum(lens_k), H, E, device="cuda").half()
    start = 0
    for n in lens_k:
        v[start + torch.arange(n), :, torch.arange(n)] = 1.0
        start += n
    out, _ = torch.ops.fastattn.attention_varlen_fwd(
        q,
        k,
        v,
        offsets(lens_q),
        offsets(lens_k),
        max(lens_q),
        max_k,
        None,
        p,
        torch.tensor(seed, dtype=torch.int64),
        1.0 / math.sqrt(E),
        -1,
        -1,
        False,
        0.0,
    )
    expected = dropout_keep_mask(seed, (1, H, total_q, max_k), p, torch.device("cuda"))[0]
    row = 0
    for Lq, Sk in zip(lens_q, lens_k, strict=True):
        got = out[row : row + Lq, :, :Sk].transpose(0, 1) != 0  # [H, Lq, Sk]
        assert torch.equal(got, expected[:, row : row + Lq, :Sk])
        row += Lq


KV_CACHE = {
    # name: (cache_seqlens, L_new, Lq, Hq, Hk, layout, block_size, capacity, options)
    "contiguous-batch-idx": ([7, 150, 0], 2, 2, 4, 2, "contiguous", 0, 160, dict(window=(-1, 0))),
    "paged-bs16-shuffled-split": ([2000, 1500, 33], 1, 1, 8, 2, "paged", 16, 2048, dict()),
    "paged-bs5-causal": ([0, 37, 130], 3, 3, 2, 1, "paged", 5, 135, dict(window=(-1, 0))),
    "vllm-transposed-softcap-alibi": (
        [45, 700],
        4,
        4,
        4,
        4,
        "vllm",
        16,
        720,
        dict(window=(-1, 0), softcap=20.0, alibi=True),
    ),
    "no-append-window": ([300, 17], 0, 16, 2, 2, "paged", 32, 320, dict(window=(64, 0))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(KV_CACHE))
def test_kv_cache_fwd_against_float64(dtype, case):
    seqlens, L_new, Lq, Hq, Hk, layout, bs, capacity, extra = KV_CACHE[case]
    B, E = len(seqlens), 64
    if layout == "contiguous":
        rows_of = torch.arange(
            B, 0, -1, dtype=torch.int32, device="cuda"
        )  # cache row of sequence b
        k_cache = torch.randn(B + 1, Hk, capacity, E, device="cuda").to(dtype)
        block_table, cache_batch_idx = None, rows_of
    else:
        max_blocks = capacity // bs
        blocks = B * max_blocks + 3
        block_table = (
            (torch.randperm(blocks - 3, device="cuda") + 3).to(torch.int32).view(B, max_blocks)
        )
        cache_batch_idx = None
        if layout == "vllm":  # [num_blocks, block_size, Hk, E], read in place through strides
            k_cache = torch.randn(blocks, bs, Hk, E, device="cuda").to(dtype).transpose(1, 2)
        else:
            k_cache = torch.randn(blocks, Hk, bs, E, device="cuda").to(dtype)
    v_cache = (
        torch.randn_like(k_cache.transpose(1, 2)).transpose(1, 2)
        if layout == "vllm"
        else torch.randn_like(k_cache)
    )
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = torch.randn(B, Hq, Lq, E, device="cuda").to(dtype)
    k_new = torch.randn(B, Hk, L_new, E, device="cuda").to(dtype) if L_new else None
    v_new = torch.randn(B, Hk, L_new, E, device="cuda").to(dtype) if L_new else None
    alibi = torch.rand(Hq, device="cuda") if extra.get("alibi") else None
    scale, window, softcap = (
        1.0 / math.sqrt(E),
        extra.get("window", (-1, -1)),
        extra.get("softcap", 0.0),
    )
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    data_ptrs = (k_cache.data_ptr(), v_cache.data_ptr())

    poison_cuda_cache()
    out, lse = torch.ops.fastattn.attention_kv_cache_fwd(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new,
        v_new,
        block_table,
        cache_batch_idx,
        alibi,
        scale,
        *window,
        True,
        softcap,
    )
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == data_ptrs
    assert torch.equal(cache_seqlens.cpu(), torch.tensor(seqlens, dtype=torch.int32))

    def where(b, pos):  # (cache index, row) of position pos of sequence b
        if block_table is None:
            return int(cache_batch_idx[b]), pos
        return int(block_table[b, pos // bs]), pos % bs

    k_expected, v_expected = k_before.clone(), v_before.clone()
    for b in range(B):
        for t in range(L_new):
            i, r = where(b, seqlens[b] + t)
            k_expected[i, :, r], v_expected[i, :, r] = k_new[b, :, t], v_new[b, :, t]
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)

    for b in range(B):
        S = seqlens[b] + L_new
        idx = [where(b, pos) for pos in range(S)]
        kb = (
            torch.stack([k_expected[i, :, r] for i, r in idx], dim=1)
            if S
            else k_cache.new_zeros(Hk, 0, E)
        )
        vb = (
            torch.stack([v_expected[i, :, r] for i, r in idx], dim=1)
            if S
            else v_cache.new_zeros(Hk, 0, E)
        )
        ref_out, ref_lse = attention_reference(
            q[b : b + 1].double(),
            kb[None].double(),
            vb[None].double(),
            None,
            alibi,
            0.0,
            None,
            scale,
            *window,
            True,
            softcap,
        )
        assert_close_to_reference(out[b : b + 1], ref_out, dtype=dtype, name=f"out[{b}]")
        assert_close_to_reference(
            lse[b : b + 1], ref_lse.double(), dtype=torch.float32, name=f"lse[{b}]"
        )


def test_kv_cache_rejects_before_writing():
    q = torch.randn(2, 2, 1, 64, device="cuda").half()
    k_cache = torch.randn(2, 2, 32, 64, device="cuda").half()
    v_cache = torch.randn_like(k_cache)
    k_new = torch.randn(2, 2, 1, 64, device="cuda").half()
    before = k_cache.clone()
    seqlens = torch.tensor([3, 4], dtype=torch.int32, device="cuda")
    bad_alibi = torch.rand(3, device="cuda")
    with pytest.raises(RuntimeError, match="alibi_slopes"):
        torch.ops.fastattn.attention_kv_cache_fwd(
            q,
            k_cache,
            v_cache,
            seqlens,
            k_new,
            k_new.clone(),
            None,
            None,
            bad_alibi,
            0.125,
            -1,
            -1,
            True,
            0.0,
        )
    with pytest.raises(RuntimeError, match="cache_seqlens must be int32"):
        torch.ops.fastattn.attention_kv_cache_fwd(
            q,
            k_cache,
            v_cache,
            seqlens.long(),
            k_new,
            k_new.clone(),
            None,
            None,
            None,
            0.125,
            -1,
            -1,
            True,
            0.0,
        )
    assert torch.equal(k_cache, before)
