"""fastattn::attention_varlen_fwd/bwd_triton and attention_kv_cache_fwd_triton against the float64
reference run sequence by sequence (fastattn/ops/reference.py).

CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 before Python starts: one 16 x 16
tile config, so lengths 0, 1, 7, 17 and 20 cross tile edges), CUDA tensors compiled on a GPU.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastattn.ops import packed_attention, reference
from fastattn.ops.errors import FastattnValueError
from tests.conftest import HAS_GPU, HAS_TRITON, TRITON_INTERPRETED
from tests.helpers import assert_close_to_reference, nan_heap

if HAS_TRITON and (HAS_GPU or TRITON_INTERPRETED):
    from fastattn.triton_kernels import attention as triton_attention
    from fastattn.triton_kernels import attention_varlen

pytestmark = pytest.mark.triton

DEVICES = [
    pytest.param(
        "cpu", id="cpu-interpreted",
        marks=pytest.mark.skipif(
            not TRITON_INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1 (set before Python)"
        ),
    ),
    pytest.param(
        "cuda", id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(
            TRITON_INTERPRETED, reason="CUDA tensors are tested compiled, not interpreted")],
    ),
]
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
SEED = 0x0BAD_5EED_1234


def _cu(lengths: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def _packed(total: int, H: int, D: int, dtype: torch.dtype, device: str, noncontiguous: bool):
    """Random [total, H, D]; non-contiguous: a head-major buffer with padded rows, viewed."""
    if not noncontiguous:
        return torch.randn(total, H, D, dtype=dtype, device=device)
    return torch.randn(H, total, D + 3, dtype=dtype, device=device)[..., :D].transpose(0, 1)


@dataclasses.dataclass(frozen=True)
class VarlenCase:
    lengths_q: tuple[int, ...] = (0, 1, 7, 20)
    lengths_k: tuple[int, ...] = (5, 0, 7, 17)
    Hq: int = 2
    Hk: int = 2
    E: int = 16
    Ev: int = 16
    dtype: torch.dtype = FP32
    window: tuple[int, int] = (-1, -1)
    bottom_right: bool = False
    softcap: float = 0.0
    alibi: bool = False  # [B, Hq] slopes
    dropout_p: float = 0.0
    noncontiguous: bool = False


def _varlen_inputs(case: VarlenCase, device: str) -> dict:
    B = len(case.lengths_q)
    return {
        "q": _packed(sum(case.lengths_q), case.Hq, case.E, case.dtype, device, case.noncontiguous),
        "k": _packed(sum(case.lengths_k), case.Hk, case.E, case.dtype, device, case.noncontiguous),
        "v": _packed(sum(case.lengths_k), case.Hk, case.Ev, case.dtype, device,
                     case.noncontiguous),
        "cu_seqlens_q": _cu(list(case.lengths_q), device),
        "cu_seqlens_k": _cu(list(case.lengths_k), device),
        "max_seqlen_q": max(case.lengths_q), "max_seqlen_k": max(case.lengths_k),
        "alibi_slopes": torch.rand(B, case.Hq, device=device) if case.alibi else None,
        "dropout_p": case.dropout_p,
        "rng_seed": torch.tensor(SEED) if case.dropout_p else None,
        "scale": 1.0 / math.sqrt(case.E), "window_left": case.window[0],
        "window_right": case.window[1], "bottom_right": case.bottom_right,
        "softcap": case.softcap,
    }


def _sequence_reference64(q, k, v, args: dict, b: int, keep: torch.Tensor | None):
    """float64 out [1, Hq, L, Ev], lse of sequence b; with dropout, the given keep bits
    [Hq, L, S] (VARLEN_SPEC's counter) applied to the reference's probabilities."""
    slopes = args["alibi_slopes"]
    options = (slopes[b] if slopes is not None else None, 0.0, None, args["scale"],
               args["window_left"], args["window_right"], args["bottom_right"], args["softcap"])
    if keep is None:
        return reference.attention_reference(q, k, v, None, *options)
    # Dropout scales P after the softmax: P = reference probabilities, recovered from v = I.
    S = k.shape[2]
    eye = torch.eye(S, dtype=q.dtype, device=q.device).expand(1, k.shape[1], S, S)
    probs, lse = reference.attention_reference(q, k, eye, None, *options)
    probs = probs * keep / (1.0 - args["dropout_p"])
    group = q.shape[1] // k.shape[1]
    return probs @ v.repeat_interleave(group, dim=1), lse


def _varlen_reference64(args: dict, grad_out: torch.Tensor):
    """Packed float64 out, lse [Hq, total_q] and dq, dk, dv, sequence by sequence."""
    q, k, v = (args[n].detach().double().requires_grad_() for n in ("q", "k", "v"))
    cu_q, cu_k = args["cu_seqlens_q"].tolist(), args["cu_seqlens_k"].tolist()
    keep_all = None
    if args["dropout_p"]:
        shape = (1, q.shape[1], q.shape[0], args["max_seqlen_k"])
        keep_all = reference.dropout_keep_mask(SEED, shape, args["dropout_p"], q.device)[0]
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = (t[rows].transpose(0, 1).unsqueeze(0)
                      for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
        keep = None if keep_all is None else keep_all[:, rows_q, : kb.shape[2]]
        out, lse = _sequence_reference64(qb, kb, vb, args, b, keep)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.double(), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (q, k, v))]
    return out, torch.cat(lses, dim=-1), grads


def _check_varlen(case: VarlenCase, device: str) -> None:
    args = _varlen_inputs(case, device)
    nan_heap((sum(case.lengths_q), case.Hq, case.Ev), dtype=case.dtype)
    out, lse = torch.ops.fastattn.attention_varlen_fwd_triton(**args)
    grad_out = _packed(*out.shape, case.dtype, device, case.noncontiguous)
    nan_heap(args["q"].shape, args["k"].shape, args["v"].shape, dtype=case.dtype)
    dq, dk, dv = torch.ops.fastattn.attention_varlen_bwd_triton(
        grad_out, args["q"], args["k"], args["v"], out, lse,
        **{n: a for n, a in args.items() if n not in ("q", "k", "v")},
    )
    assert out.shape == (args["q"].shape[0], case.Hq, case.Ev) and out.is_contiguous()
    assert lse.shape == (case.Hq, args["q"].shape[0]) and lse.dtype == torch.float32
    for grad, t in ((dq, args["q"]), (dk, args["k"]), (dv, args["v"])):
        assert grad.shape == t.shape and grad.dtype == case.dtype and grad.is_contiguous()

    out64, lse64, grads64 = _varlen_reference64(args, grad_out)
    assert_close_to_reference(out, out64, dtype=case.dtype, name="out")
    assert torch.equal(lse.isneginf(), lse64.isneginf()), "rows with no visible key differ"
    assert_close_to_reference(lse, lse64, dtype=torch.float32, name="lse")
    for name, actual, expected in zip(("dq", "dk", "dv"), (dq, dk, dv), grads64):
        assert_close_to_reference(actual, expected, dtype=case.dtype, name=name)
    empty_rows = lse64.isneginf().transpose(0, 1)  # [total_q, Hq]
    assert (out[empty_rows] == 0).all() and (dq[empty_rows] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    # Lengths 0, 1, 7 and > one 16-row tile (17, 20), GQA, strided inputs, Lq != Sk.
    pytest.param(VarlenCase(Hq=4, Hk=2, noncontiguous=True, window=(-1, 0), bottom_right=True),
                 id="gqa-causal-bottom-right-noncontiguous"),
    pytest.param(VarlenCase(lengths_q=(7, 20, 1), lengths_k=(18, 7, 1), window=(-1, 0),
                            dtype=FP16, E=40, Ev=8), id="causal-top-left-fp16-E40-Ev8"),
    pytest.param(VarlenCase(lengths_q=(17, 0, 5), lengths_k=(20, 3, 0), window=(4, 1),
                            bottom_right=True, softcap=2.0, alibi=True, Hq=2, Hk=1),
                 id="window-softcap-alibi-batch"),
    pytest.param(VarlenCase(lengths_q=(7, 20), lengths_k=(9, 18), dropout_p=0.3, Hq=2, Hk=1,
                            window=(-1, 0)), id="dropout-gqa-causal"),
    pytest.param(VarlenCase(lengths_q=(1, 7), lengths_k=(20, 5), dtype=BF16), id="bf16"),
])
def test_varlen_matches_reference(case: VarlenCase, device: str) -> None:
    _check_varlen(case, device)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_dropout_bits_are_the_spec_counter(device: str) -> None:
    """v = identity per sequence: out[t, h, j] != 0 exactly where dropout keeps (b, h, i, j), the
    bit of counter ((h * total_q) + cu_seqlens_q[b] + i) * max_seqlen_k + j."""
    lengths_q, lengths_k, H, p = [5, 0, 9], [7, 3, 12], 2, 0.4
    max_k = max(lengths_k)
    q = 0.1 * torch.randn(sum(lengths_q), H, 16, device=device)  # small scores: no P underflows
    k = 0.1 * torch.randn(sum(lengths_k), H, 16, device=device)
    eyes = [torch.eye(n, max_k, device=device) for n in lengths_k]  # v = I per sequence
    v = torch.cat(eyes)[:, None].expand(-1, H, -1)
    cu_q, cu_k = _cu(lengths_q, device), _cu(lengths_k, device)
    out, _ = torch.ops.fastattn.attention_varlen_fwd_triton(
        q, k, v, cu_q, cu_k, max(lengths_q), max_k, None, p, torch.tensor(SEED), 0.25, -1, -1,
        False, 0.0,
    )
    keep = reference.dropout_keep_mask(SEED, (1, H, q.shape[0], max_k), p, torch.device(device))
    keep = keep[0].transpose(0, 1).clone()  # [total_q, H, max_k]
    for b, (start, n) in enumerate(zip(cu_q.tolist(), lengths_q)):
        keep[start:start + n, :, lengths_k[b]:] = False  # keys past the sequence's end
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(out != 0, keep)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_no_queries_or_no_keys(device: str) -> None:
    """Every sequence empty on one side: zeros, -inf lse, zero gradients, no kernel on 0 rows."""
    args = _varlen_inputs(VarlenCase(lengths_q=(3, 4), lengths_k=(0, 0)), device)
    out, lse = torch.ops.fastattn.attention_varlen_fwd_triton(**args)
    assert (out == 0).all() and lse.isneginf().all()
    args = _varlen_inputs(VarlenCase(lengths_q=(0, 0), lengths_k=(3, 4)), device)
    out, lse = torch.ops.fastattn.attention_varlen_fwd_triton(**args)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    dq, dk, dv = torch.ops.fastattn.attention_varlen_bwd_triton(
        out, args["q"], args["k"], args["v"], out, lse,
        **{n: a for n, a in args.items() if n not in ("q", "k", "v")},
    )
    assert dq.shape == (0, 2, 16) and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_autograd(device: str) -> None:
    """The autograd that fastattn.ops.packed_attention registers (with the C++ op's, when it
    first reaches the Triton ops) runs the bwd op: torch.autograd gives the op's gradients."""
    args = _varlen_inputs(VarlenCase(lengths_q=(3, 9), lengths_k=(5, 9), window=(-1, 0)), device)
    for n in ("q", "k", "v"):
        args[n].requires_grad_()
    varlen_fwd_triton = packed_attention._triton_ops()[0]
    out, lse = varlen_fwd_triton(**args)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (args["q"], args["k"], args["v"]), grad_out)
    _, _, grads64 = _varlen_reference64(args, grad_out)
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close_to_reference(actual, expected, dtype=FP32, name=name)


# ---- KV cache ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheCase:
    cache_seqlens: tuple[int, ...] = (0, 7, 30)
    L_new: int = 3
    Lq: int = 3
    Hq: int = 4
    Hk: int = 2
    E: int = 16
    Ev: int = 16
    S_max: int = 40
    dtype: torch.dtype = FP32
    layout: str = "contiguous"  # "contiguous", "batch-idx", "paged", "paged-vllm"
    block_size: int = 5
    window: tuple[int, int] = (-1, 0)
    bottom_right: bool = True
    softcap: float = 0.0
    alibi: bool = False
    strided_new: bool = False  # k_new / v_new with a last-dim stride of 2, as the CPU op takes


def _cache_inputs(case: CacheCase, device: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The op's arguments, and the logical caches [B, Hk, S_max, E / Ev] the kernels should see
    after the append (positions past cache_seqlens + L_new are NaN in the real cache)."""
    B, Hk = len(case.cache_seqlens), case.Hk
    lens = torch.tensor(case.cache_seqlens)
    logical = [torch.randn(B, Hk, case.S_max, d, dtype=case.dtype, device=device)
               for d in (case.E, case.Ev)]
    step = 2 if case.strided_new else 1
    new = [torch.randn(B, Hk, case.L_new, step * d, dtype=case.dtype, device=device)[..., ::step]
           for d in (case.E, case.Ev)]
    for cache in logical:  # never-written positions hold NaN: reading one fails the test
        for b in range(B):
            cache[b, :, lens[b]:] = float("nan")
    after = [c.clone() for c in logical]
    for c, n in zip(after, new):
        for b in range(B):
            c[b, :, lens[b]:lens[b] + case.L_new] = n[b]
    block_table = cache_batch_idx = None
    if case.layout == "contiguous":
        caches = [c.clone() for c in logical]
    elif case.layout == "batch-idx":
        rows = torch.randperm(B + 2)[:B]
        cache_batch_idx = rows.to(torch.int32).to(device)
        caches = [torch.randn(B + 2, Hk, case.S_max, c.shape[3], dtype=case.dtype, device=device)
                  for c in logical]
        for cache, c in zip(caches, logical):
            cache[rows] = c
    else:
        bs = case.block_size
        max_blocks = -(-case.S_max // bs)
        num_blocks = B * max_blocks + 3
        order = torch.randperm(num_blocks)[: B * max_blocks].view(B, max_blocks)
        block_table = order.to(torch.int32).to(device)
        caches = []
        for c in logical:
            d = c.shape[3]
            padded = torch.full((B, Hk, max_blocks * bs, d), float("nan"), dtype=case.dtype,
                                device=device)
            padded[:, :, : case.S_max] = c
            blocks = padded.view(B, Hk, max_blocks, bs, d).permute(0, 2, 1, 3, 4)
            if case.layout == "paged-vllm":  # [num_blocks, block_size, Hk, D], passed transposed
                store = torch.full((num_blocks, bs, Hk, d), float("nan"), dtype=case.dtype,
                                   device=device)
                store[order.flatten()] = blocks.reshape(-1, Hk, bs, d).transpose(1, 2)
                caches.append(store.transpose(1, 2))
            else:
                store = torch.full((num_blocks, Hk, bs, d), float("nan"), dtype=case.dtype,
                                   device=device)
                store[order.flatten()] = blocks.reshape(-1, Hk, bs, d)
                caches.append(store)
        # The logical caches' capacity is the table's: pad them for the comparison.
        after = [torch.cat([c, torch.full((*c.shape[:2], max_blocks * bs - case.S_max,
                                           c.shape[3]), float("nan"), dtype=case.dtype,
                                          device=device)], dim=2) for c in after]
    args = {
        "q": torch.randn(B, case.Hq, case.Lq, case.E, dtype=case.dtype, device=device),
        "k_cache": caches[0], "v_cache": caches[1],
        "cache_seqlens": lens.to(torch.int32).to(device),
        "k_new": new[0] if case.L_new else None, "v_new": new[1] if case.L_new else None,
        "block_table": block_table, "cache_batch_idx": cache_batch_idx,
        "alibi_slopes": torch.rand(B, case.Hq, device=device) if case.alibi else None,
        "scale": 1.0 / math.sqrt(case.E), "window_left": case.window[0],
        "window_right": case.window[1], "bottom_right": case.bottom_right,
        "softcap": case.softcap,
    }
    return args, after[0], after[1]


def _logical_cache(args: dict, case: CacheCase, which: str) -> torch.Tensor:
    """The op's cache after the call, as [B, Hk, capacity, D] in sequence order."""
    cache = args[which]
    if args["block_table"] is not None:
        table = args["block_table"].long()
        B, max_blocks = table.shape
        blocks = cache[table.flatten()]  # [B * max_blocks, Hk, bs, D]
        return (blocks.view(B, max_blocks, *blocks.shape[1:]).permute(0, 2, 1, 3, 4)
                .reshape(B, case.Hk, -1, cache.shape[3]))
    if args["cache_batch_idx"] is not None:
        return cache[args["cache_batch_idx"].long()]
    return cache


def _check_cache(case: CacheCase, device: str) -> None:
    args, k_after, v_after = _cache_inputs(case, device)
    nan_heap((len(case.cache_seqlens), case.Hq, case.Lq, case.Ev), dtype=case.dtype)
    out, lse = torch.ops.fastattn.attention_kv_cache_fwd_triton(**args)
    B = len(case.cache_seqlens)
    assert out.shape == (B, case.Hq, case.Lq, case.Ev) and out.is_contiguous()
    assert lse.shape == (B, case.Hq, case.Lq) and lse.dtype == torch.float32
    for which, expected in (("k_cache", k_after), ("v_cache", v_after)):
        torch.testing.assert_close(_logical_cache(args, case, which), expected, rtol=0, atol=0,
                                   equal_nan=True, msg=f"{which} after the append")
    outs, lses = [], []
    for b, n in enumerate(case.cache_seqlens):
        end = n + case.L_new
        slopes = args["alibi_slopes"][b] if case.alibi else None
        o, lse64 = reference.attention_reference(
            args["q"][b:b + 1].double(), k_after[b:b + 1, :, :end].double(),
            v_after[b:b + 1, :, :end].double(), None, slopes, 0.0, None, args["scale"],
            *case.window, case.bottom_right, case.softcap,
        )
        outs.append(o)
        lses.append(lse64)
    out64, lse64 = torch.cat(outs), torch.cat(lses)
    assert_close_to_reference(out, out64, dtype=case.dtype, name="out")
    assert torch.equal(lse.isneginf(), lse64.isneginf())
    assert_close_to_reference(lse, lse64, dtype=torch.float32, name="lse")


CACHE_CASES = [
    pytest.param(CacheCase(), id="contiguous-gqa-causal"),
    pytest.param(CacheCase(layout="batch-idx", dtype=FP16, window=(4, 0), softcap=3.0,
                           alibi=True), id="batch-idx-window-softcap-alibi-fp16"),
    pytest.param(CacheCase(layout="paged", cache_seqlens=(12, 0, 33), L_new=2, Lq=5),
                 id="paged-bs5-Lq5-Lnew2"),
    pytest.param(CacheCase(layout="paged-vllm", cache_seqlens=(9, 31), L_new=1, Lq=1, Hq=2,
                           Hk=1, block_size=4, dtype=BF16, window=(-1, -1)),
                 id="paged-vllm-transposed-decode-bf16"),
    pytest.param(CacheCase(cache_seqlens=(5, 0), L_new=0, Lq=4, bottom_right=False),
                 id="no-append-top-left"),
    pytest.param(CacheCase(layout="paged", cache_seqlens=(4, 11), L_new=2, Lq=1,
                           strided_new=True), id="paged-strided-new-rows"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CACHE_CASES)
def test_kv_cache_matches_reference(case: CacheCase, device: str) -> None:
    _check_cache(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "paged-vllm"])
def test_kv_cache_split_decode(layout: str, device: str) -> None:
    """One sequence, long context, Lq = 1: the op splits the keys (checked, so that the test
    cannot pass on the unsplit path) and the merged result matches the reference."""
    case = CacheCase(cache_seqlens=(57,), L_new=1, Lq=1, Hq=2, Hk=1, S_max=64, layout=layout,
                     block_size=16, window=(-1, -1))
    assert attention_varlen._num_splits(case.Hq, case.Lq, case.S_max, torch.device(device)) > 1
    _check_cache(case, device)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_appends_with_no_queries(device: str) -> None:
    case = CacheCase(cache_seqlens=(2, 6), L_new=2, Lq=0)
    args, k_after, v_after = _cache_inputs(case, device)
    out, lse = torch.ops.fastattn.attention_kv_cache_fwd_triton(**args)
    assert out.shape == (2, 4, 0, 16) and lse.shape == (2, 4, 0)
    torch.testing.assert_close(args["k_cache"], k_after, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(args["v_cache"], v_after, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(v_new=a["v_new"][:, :, :1]), "v_new must be"),
    (lambda a: a.update(v_new=None), "both k_new and v_new"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), "cache_seqlens must be int32"),
    (lambda a: a.update(cache_batch_idx=a["cache_seqlens"]), "cache_batch_idx must be None"),
    (lambda a: a.update(block_table=a["block_table"][:1]), "block_table must be int32"),
    (lambda a: a.update(alibi_slopes=torch.rand(3)), "alibi_slopes must be"),
], ids=["v_new-shape", "k_new-alone", "seqlens-dtype", "table-and-batch-idx", "table-rows",
        "alibi-shape"])
def test_kv_cache_bad_input_writes_nothing(change, message: str, device: str) -> None:
    args, _, _ = _cache_inputs(CacheCase(layout="paged", cache_seqlens=(3, 8)), device)
    change(args)
    before = [args["k_cache"].clone(), args["v_cache"].clone()]
    with pytest.raises(FastattnValueError, match=message):
        torch.ops.fastattn.attention_kv_cache_fwd_triton(**args)
    for cache, saved in zip((args["k_cache"], args["v_cache"]), before):
        torch.testing.assert_close(cache, saved, rtol=0, atol=0, equal_nan=True)


# The interpreter's numpy max over a NaN row warns; the kernel's semantics are what is tested.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["paged", "batch-idx"])
def test_kv_cache_block_ids_outside_the_cache_are_never_touched(layout: str, device: str):
    """Wrong block_table / cache_batch_idx values (unchecked: check_values=False) neither read
    nor write outside the caches: the append skips such a block, a query that sees one of its
    positions gets a NaN row and lse, the other queries match the reference. The caches are
    views into a wider buffer, so an out-of-range id would hit finite values, not a fault."""
    torch.manual_seed(11)
    B, Hq, Hk, Lq, E = 2, 2, 1, 4, 16
    if layout == "paged":  # 9 blocks of 4 rows; ids 9 and -1 are the buffer's guard blocks
        buffers = [torch.randn(11, Hk, 4, E, device=device) for _ in range(2)]
        caches = [buf[1:10] for buf in buffers]
        table = torch.tensor([[0, 9, 2, 3], [4, 5, -1, 6]], dtype=torch.int32, device=device)
        fixed = torch.tensor([[0, 7, 2, 3], [4, 5, 8, 6]], dtype=torch.int32, device=device)
        seqlens, window = [9, 8], 1
        # Sequence 0 sees [5 + i, 6 + i] of 10 keys, block 9 holds 4..7; sequence 1 appends
        # into block -1 (positions 8..11) and sees [4 + i, 5 + i] of 9 keys.
        nan_rows = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
        untouched = slice(7, 9)  # the stand-ins of the wrong ids in the reference run
    else:  # 3 cache rows of 16 positions; id 3 is the buffer's guard row
        buffers = [torch.randn(5, Hk, 16, E, device=device) for _ in range(2)]
        caches = [buf[1:4] for buf in buffers]
        table = torch.tensor([1, 3], dtype=torch.int32, device=device)
        fixed = torch.tensor([1, 2], dtype=torch.int32, device=device)
        seqlens, window = [9, 8], -1
        nan_rows = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
        untouched = slice(2, 3)
    q = torch.randn(B, Hq, Lq, E, device=device)
    k_new, v_new = (torch.randn(B, Hk, 1, E, device=device) for _ in range(2))
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    before = [buf.clone() for buf in buffers]

    def call(op, k_cache, v_cache, index):
        paged = layout == "paged"
        return op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, index if paged else None,
                  None if paged else index, None, E**-0.5, window, 0, True, 0.0)

    expected_caches = [c.clone() for c in caches]
    expected = call(reference.attention_kv_cache_reference, *expected_caches, fixed)
    out, lse = call(torch.ops.fastattn.attention_kv_cache_fwd_triton, *caches, table)
    for buf, old, cache, want in zip(buffers, before, caches, expected_caches):
        assert torch.equal(buf[0], old[0]) and torch.equal(buf[-1], old[-1])  # the guards
        assert torch.equal(cache[untouched], old[1:-1][untouched])
        keep = torch.ones(cache.shape[0], dtype=torch.bool)
        keep[untouched] = False
        assert torch.equal(cache[keep], want[keep])
    nan_rows = nan_rows[:, None, :].expand(B, Hq, Lq).to(device)
    assert out[nan_rows].isnan().all() and lse[nan_rows].isnan().all()
    torch.testing.assert_close(out[~nan_rows], expected[0][~nan_rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[~nan_rows], expected[1][~nan_rows], rtol=1e-5, atol=1e-5)


def test_autotune_key_is_length_buckets() -> None:
    """New lengths in a bucket reuse its autotuned config (issue 16): the key has no length."""
    for kernel in (triton_attention._attention_fwd_kernel,
                   triton_attention._attention_bwd_dkdv_kernel,
                   triton_attention._attention_bwd_dq_kernel):
        assert not {"L", "S"} & set(kernel.keys)
        assert {"tune_len_q", "tune_len_k"} <= set(kernel.keys)
    assert [triton_attention.length_bucket(n) for n in (0, 1, 2, 33, 64, 65)] == [
        1, 1, 2, 64, 64, 128]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    """torch.library.opcheck of the three triton_ops (the schema check under the interpreter;
    see tests/test_attention_triton.py's test_opcheck for why the rest needs a GPU). The KV
    cache op's check also verifies that it mutates exactly k_cache and v_cache."""
    tests = ["test_schema"]
    if device == "cuda":
        tests += ["test_faketensor", "test_aot_dispatch_dynamic"]
    args = _varlen_inputs(VarlenCase(lengths_q=(3, 0, 9), lengths_k=(4, 2, 9)), device)
    fwd_args = tuple(args.values())
    torch.library.opcheck(torch.ops.fastattn.attention_varlen_fwd_triton, fwd_args,
                          test_utils=tests)
    out, lse = torch.ops.fastattn.attention_varlen_fwd_triton(*fwd_args)
    bwd_args = (torch.randn_like(out), *fwd_args[:3], out, lse, *fwd_args[3:])
    torch.library.opcheck(torch.ops.fastattn.attention_varlen_bwd_triton, bwd_args,
                          test_utils=tests)
    cache_args, _, _ = _cache_inputs(CacheCase(layout="paged", cache_seqlens=(3, 8)), device)
    for name in ("k_cache", "v_cache"):  # opcheck compares mutated values: no NaN there
        cache_args[name] = torch.nan_to_num(cache_args[name])
    torch.library.opcheck(torch.ops.fastattn.attention_kv_cache_fwd_triton,
                          tuple(cache_args.values()), test_utils=tests)


def test_bad_varlen_offsets_are_rejected() -> None:
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(FastattnValueError, match="cu_seqlens_k must have 2 entries"):
        torch.ops.fastattn.attention_varlen_fwd_triton(
            q, q, q, cu, torch.tensor([0, 2, 5], dtype=torch.int32), 5, 5, None, 0.0, None, 1.0,
            -1, -1, False, 0.0,
        )
    with pytest.raises(FastattnValueError, match="cu_seqlens_q must be a 1-D int32"):
        torch.ops.fastattn.attention_varlen_fwd_triton(
            q, q, q, cu.long(), cu, 5, 5, None, 0.0, None, 1.0, -1, -1, False, 0.0,
        )


# The interpreter's numpy max over a NaN row warns; the kernel's semantics are what is tested.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_sequence(device: str) -> None:
    """A NaN query gives NaN output and lse rows, as in torch, and nothing else: not the other
    rows of a packed batch, nor the other sequence of a split-KV decode (merged splits)."""
    args = _varlen_inputs(VarlenCase(lengths_q=(3, 5), lengths_k=(4, 20)), device)
    args["q"][4, 1, 0] = float("nan")  # sequence 1, row 1, head 1
    out, lse = torch.ops.fastattn.attention_varlen_fwd_triton(**args)
    nan_rows = torch.zeros(8, 2, dtype=torch.bool)
    nan_rows[4, 1] = True
    assert torch.equal(out.isnan().all(-1), nan_rows) and not out[~nan_rows].isnan().any()
    assert torch.equal(lse.isnan(), nan_rows.T)

    case = CacheCase(cache_seqlens=(40, 50), L_new=1, Lq=1, Hq=2, Hk=1, S_max=64,
                     window=(-1, -1))
    assert attention_varlen._num_splits(2 * case.Hq, 1, case.S_max, torch.device(device)) > 1
    args, _, _ = _cache_inputs(case, device)
    args["q"][1, 0, 0, 3] = float("nan")
    out, lse = torch.ops.fastattn.attention_kv_cache_fwd_triton(**args)
    assert out[1, 0].isnan().all() and lse[1, 0].isnan().all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1]).all()
    assert torch.isfinite(lse[0]).all() and torch.isfinite(lse[1, 1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_runs_the_triton_ops(device: str) -> None:
    """fastattn.attention_varlen / attention_with_kv_cache under the triton backend reach these
    ops (the wiring in fastattn/ops/packed_attention.py) and agree with the reference backend,
    gradients included."""
    import fastattn

    torch.manual_seed(3)
    lengths = [4, 0, 9]
    q, k, v = (torch.randn(sum(lengths), 2, 16, device=device, requires_grad=True)
               for _ in range(3))
    cu = _cu(lengths, device)
    results = {}
    for backend in ("triton", "reference"):
        with fastattn.use_backend(backend):
            out = fastattn.attention_varlen(q, k, v, cu, cu, 9, 9, causal=True)
        results[backend] = (out, *torch.autograd.grad(out.sum(), (q, k, v)))
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), *results.values()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)

    cache = torch.randn(2, 1, 12, 16, device=device)
    q1, new = (torch.randn(2, 2, 1, 16, device=device) for _ in range(2))
    seqlens = torch.tensor([3, 10], dtype=torch.int32, device=device)
    outs = {}
    for backend in ("triton", "reference"):
        k_cache, v_cache = cache.clone(), cache.clone()
        with fastattn.use_backend(backend):
            outs[backend] = fastattn.attention_with_kv_cache(
                q1, k_cache, v_cache, seqlens, new[:, :1], new[:, :1], causal=True)
        assert torch.equal(k_cache[0, :, 3:4], new[0, :1])
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-5)
