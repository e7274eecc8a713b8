"""Op-level tests of the C++ CPU kernels behind fastattn::attention_fwd / attention_bwd.

Every case calls the ops directly in the normalized layout and compares outputs, LSE and every
gradient with the float64 reference (fastattn.ops.reference, differentiated by autograd) and,
where torch can express the case, with F.scaled_dot_product_attention at the same dtype (the
error may be at most 2x torch's own). The ops allocate their results themselves, so
test_outputs_fully_written poisons freed blocks of the results' sizes right before each call
(the allocator hands them back) to make an element the kernels skip show up as NaN.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPE_RTOL, assert_close_to_reference, nan_heap, poison_
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn  # noqa: F401  (loads fastattn._C, which registers the CPU kernels)
from fastattn import _extension
from fastattn.ops.reference import attention_reference

pytestmark = pytest.mark.skipif(
    _extension.C is None, reason=f"fastattn._C is not built: {_extension.LOAD_ERROR}"
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16",
             torch.float16: "f16"}


def make_opts(**overrides):
    opts = dict(attn_mask=None, alibi_slopes=None, dropout_p=0.0, rng_seed=None, scale=None,
                window_left=-1, window_right=-1, bottom_right=False, softcap=0.0)
    opts.update(overrides)
    return opts


def op_args(opts, E):
    scale = opts["scale"] if opts["scale"] is not None else 1.0 / math.sqrt(E)
    return (opts["attn_mask"], opts["alibi_slopes"], opts["dropout_p"], opts["rng_seed"], scale,
            opts["window_left"], opts["window_right"], opts["bottom_right"], opts["softcap"])


def inputs(B, Hq, Hk, L, S, E, Ev, dtype, magnitude=1.0):
    q = torch.randn(B, Hq, L, E, dtype=dtype) * magnitude
    k = torch.randn(B, Hk, S, E, dtype=dtype) * magnitude
    v = torch.randn(B, Hk, S, Ev, dtype=dtype)
    return q, k, v


def reference64(q, k, v, opts, grad_out, mask_grad=False):
    """float64 reference output, lse and gradients (dq, dk, dv[, dmask]) by autograd."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = opts["attn_mask"]
    leaves = [q64, k64, v64]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.detach().double().requires_grad_(mask_grad)
        if mask_grad:
            leaves.append(mask)
    args = op_args({**opts, "attn_mask": mask}, q.shape[-1])
    out, lse = attention_reference(q64, k64, v64, *args)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return out.detach(), lse, grads


def torch_sdpa(q, k, v, opts, grad_out):
    """torch's output and (dq, dk, dv) at the inputs' dtype; the mask, if any, is bool or
    additive, causal means top-left."""
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    causal = opts["window_right"] == 0 and opts["window_left"] < 0

    def sdpa():
        return F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=opts["attn_mask"], is_causal=causal, scale=opts["scale"],
            enable_gqa=q.shape[1] != k.shape[1])

    try:
        out = sdpa()
    except RuntimeError as error:
        # torch 2.13's bf16 flash kernel packs its operands for AMX when the CPU has AMX, but
        # dispatches the packing by ATEN_CPU_CAPABILITY, which raises below avx512
        # (test_cpu_isa's reruns on an AMX CPU): torch's own op is then its math backend.
        if "pack_vnni2" not in str(error):
            raise
        with sdpa_kernel(SDPBackend.MATH):
            out = sdpa()
    grads = torch.autograd.grad(out, (qt, kt, vt), grad_out)
    return out.detach(), grads


def check(q, k, v, opts, *, against_torch=False, mask_grad=False):
    """Runs both ops and checks output, LSE and every gradient against the float64 reference
    (and torch's own error when against_torch)."""
    E = q.shape[-1]
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *op_args(opts, E))
    grad_out = torch.randn_like(out)
    dq, dk, dv, dmask = torch.ops.fastattn.attention_bwd(
        grad_out, q, k, v, out, lse, *op_args(opts, E), mask_grad)
    ref_out, ref_lse, ref_grads = reference64(q, k, v, opts, grad_out, mask_grad)
    torch_out, torch_grads = (None, (None, None, None))
    if against_torch:
        torch_out, torch_grads = torch_sdpa(q, k, v, opts, grad_out)

    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert_close_to_reference(out, ref_out, torch_out, name="out")
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf rows differ"
    assert not lse.isnan().any()
    assert_close_to_reference(lse, ref_lse.to(torch.float64), dtype=torch.float32, name="lse")
    for name, got, want, theirs in zip(
        ("dq", "dk", "dv"), (dq, dk, dv), ref_grads[:3], torch_grads, strict=True
    ):
        assert got.shape == want.shape and got.dtype == q.dtype, name
        if want.abs().max() < 1e-9:
            # e.g. dq, dk with a single visible key: exactly 0, so the error is absolute.
            assert got.abs().max() <= 10 * DTYPE_RTOL[q.dtype], name
        else:
            assert_close_to_reference(got, want, theirs, dtype=q.dtype, name=name)
    if mask_grad:
        assert dmask.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        assert_close_to_reference(dmask, ref_grads[3], dtype=torch.float32, name="dmask")
    else:
        assert dmask.numel() == 0
    return out, lse


SHAPES = [  # B, Hq, Hk, L, S, E, Ev
    pytest.param((1, 2, 2, 1, 7, 8, 8), id="L1-S7-E8"),
    # A single row reads keys and values in place, in groups of one vector of keys and blocks of
    # up to 8 vectors of the output: partial vectors, a 9th output vector, Ev != E.
    pytest.param((1, 3, 1, 1, 33, 40, 24), id="L1-S33-E40-Ev24-gqa3"),
    pytest.param((1, 2, 2, 1, 130, 136, 130), id="L1-S130-E136-Ev130"),
    # A few query rows (up to 4; 2 for bf16 on AVX512-BF16) read the keys and values in place
    # too, row by row (Problem::rows_in_place).
    pytest.param((1, 2, 2, 2, 130, 64, 64), id="L2-S130"),
    pytest.param((2, 3, 1, 3, 70, 40, 24), id="L3-S70-E40-Ev24-gqa3"),
    pytest.param((1, 2, 2, 4, 300, 136, 130), id="L4-S300-E136-Ev130"),
    pytest.param((2, 2, 2, 7, 33, 40, 40), id="L7-S33-E40"),
    pytest.param((1, 4, 2, 33, 100, 64, 64), id="L33-S100-E64-gqa"),
    pytest.param((1, 2, 2, 100, 33, 80, 48), id="L100-S33-E80-Ev48"),
    pytest.param((1, 1, 1, 100, 100, 128, 128), id="L100-S100-E128"),
    pytest.param((2, 3, 1, 33, 1, 64, 40), id="L33-S1-gqa3"),
    pytest.param((2, 4, 4, 70, 130, 40, 24), id="many-kv-heads"),  # backward: threads own heads
    # ... over several query tiles and key tiles (bf16 on brgemm: 128 query rows per tile, whose
    # first key tile writes dQ and the others add).
    pytest.param((2, 4, 4, 200, 300, 64, 64), id="many-kv-heads-tiles"),
    # Key tiles and a 1-key tail: two of the avx512 forward's 128 keys, four of 64 elsewhere.
    pytest.param((1, 4, 2, 130, 257, 64, 64), id="L130-S257-gqa"),
    # Half and bf16 rows convert two fp32 vectors at a time (pack_rows, store_row): widths with
    # one element in the second vector of their last pair (E 49 on AVX-512, Ev 25 on AVX2).
    pytest.param((1, 2, 2, 9, 21, 49, 25), id="L9-S21-E49-Ev25"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_torch(shape, causal, dtype):
    B, Hq, Hk, L, S, E, Ev = shape
    q, k, v = inputs(B, Hq, Hk, L, S, E, Ev, dtype)
    opts = make_opts(window_right=0 if causal else -1)
    expressible = dtype != torch.float64
    check(q, k, v, opts, against_torch=expressible)


def test_key_cache_above_the_per_thread_cap_is_per_call_and_correct():
    """A forward whose packed key/value tiles exceed the kernel's per-thread cache cap (16 MiB:
    S = 33000 keys of E = Ev = 64 in float32 take about 17 MiB) allocates them for the call
    alone instead of growing a buffer that every pool thread would keep."""
    q, k, v = inputs(1, 1, 1, 3, 33000, 64, 64, torch.float32)
    check(q, k, v, make_opts(), against_torch=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_broadcast_masks(kind, dtype):
    B, Hq, L, S = 2, 4, 33, 100
    q, k, v = inputs(B, Hq, 2, L, S, 40, 40, dtype)
    if kind == "bool":
        mask = (torch.rand(B, 1, L, S) > 0.3).expand(B, Hq, L, S)  # head dim broadcast
    else:
        mask = torch.randn(1, Hq, 1, S, dtype=dtype).expand(B, Hq, L, S)  # batch, row broadcast
    assert 0 in mask.stride()
    check(q, k, v, make_opts(attn_mask=mask), against_torch=True)


def test_additive_mask_gradient_and_minus_inf():
    B, Hq, L, S = 1, 2, 33, 70
    q, k, v = inputs(B, Hq, Hq, L, S, 16, 24, torch.float32)
    mask = torch.randn(B, Hq, L, S)
    mask[..., :5] = float("-inf")
    check(q, k, v, make_opts(attn_mask=mask), mask_grad=True)


def test_transposed_mask_view():
    B, Hq, L, S = 1, 2, 33, 70
    q, k, v = inputs(B, Hq, Hq, L, S, 16, 16, torch.float32)
    mask = torch.randn(B, Hq, S, L).transpose(-1, -2)  # keys not contiguous
    check(q, k, v, make_opts(attn_mask=mask), against_torch=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "window",
    [
        pytest.param((-1, 0, True), id="causal-bottom-right"),
        pytest.param((8, 0, False), id="sliding-8-top-left"),
        pytest.param((5, 3, True), id="window-5-3-bottom-right"),
        pytest.param((0, -1, False), id="anticausal"),
        pytest.param((70, 70, False), id="window-wider-than-tile"),
    ],
)
@pytest.mark.parametrize("LS", [(3, 100), (33, 100), (100, 33), (130, 200)],
                         ids=lambda x: f"L{x[0]}-S{x[1]}")
def test_windows(window, LS, dtype):
    L, S = LS
    left, right, bottom_right = window
    q, k, v = inputs(1, 2, 1, L, S, 40, 40, dtype)
    check(q, k, v, make_opts(window_left=left, window_right=right, bottom_right=bottom_right))


@pytest.mark.parametrize("L", [3, 33], ids=["in-place-rows", "packed-rows"])
def test_softcap_and_alibi(L):
    B, Hq, S = 2, 4, 100
    q, k, v = inputs(B, Hq, 2, L, S, 64, 64, torch.float32, magnitude=2.0)
    check(q, k, v, make_opts(softcap=3.0))
    check(q, k, v, make_opts(alibi_slopes=torch.rand(Hq)))
    check(q, k, v, make_opts(alibi_slopes=torch.rand(B, Hq), softcap=5.0, window_right=0,
                             bottom_right=True))


# bf16: its backward reads P o Z for dV and P for dS in one pass (pack_grad_pairs).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=DTYPE_IDS.get)
@pytest.mark.parametrize("L", [2, 33], ids=["in-place-rows", "packed-rows"])
def test_dropout_matches_reference_mask(L, dtype):
    q, k, v = inputs(2, 2, 1, L, 100, 40, 40, dtype)
    seed = torch.tensor(1234567890123, dtype=torch.int64)
    opts = make_opts(dropout_p=0.3, rng_seed=seed)
    out, _ = check(q, k, v, opts)
    again, _ = torch.ops.fastattn.attention_fwd(q, k, v, *op_args(opts, 40))
    assert torch.equal(out, again)
    other, _ = torch.ops.fastattn.attention_fwd(
        q, k, v, *op_args({**opts, "rng_seed": torch.tensor(7)}, 40))
    assert not torch.equal(out, other)


def test_fully_masked_rows_give_zeros():
    B, Hq, L, S = 1, 2, 33, 70
    q, k, v = inputs(B, Hq, Hq, L, S, 16, 16, torch.float32)
    mask = torch.rand(B, Hq, L, S) > 0.5
    mask[:, :, [0, 5, 32]] = False
    out, lse = check(q, k, v, make_opts(attn_mask=mask))
    assert torch.isneginf(lse[:, :, [0, 5, 32]]).all()
    assert (out[:, :, [0, 5, 32]] == 0).all()
    # by the window: bottom-right causal with L > S leaves the first L - S rows empty
    q2, k2, v2 = inputs(1, 2, 2, 100, 33, 16, 16, torch.float32)
    out2, lse2 = check(q2, k2, v2, make_opts(window_right=0, bottom_right=True))
    assert torch.isneginf(lse2[:, :, :67]).all() and (out2[:, :, :67] == 0).all()


@pytest.mark.parametrize("L, S", [(4000, 7), (7, 4000)], ids=["L4000-S7", "L7-S4000"])
def test_long_reductions_as_accurate_as_torchs(L, S):
    # dK and dV sum over all L query rows, O and dQ over all S keys, a tile's products at a
    # time: each tile's sum must start from zero and be added once (as BLAS adds into C). Chained
    # through the accumulator, the whole reduction was one run of roundings: dK and dV at
    # L = 4000, O at S = 4000 had about 3x torch's error. Judged by the root-mean-square error,
    # which is steady from seed to seed (the largest one is not, and check's floor of 1e-6
    # would hide errors of a few 1e-7): within 1.2x torch's over 12 seeds, chained 2.8-3.8x.
    q, k, v = inputs(1, 2, 2, L, S, 16, 16, torch.float32)
    opts = make_opts()
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *op_args(opts, 16))
    grad_out = torch.randn_like(out)
    grads = torch.ops.fastattn.attention_bwd(grad_out, q, k, v, out, lse, *op_args(opts, 16),
                                             False)[:3]
    ref_out, _, ref_grads = reference64(q, k, v, opts, grad_out)
    torch_out, torch_grads = torch_sdpa(q, k, v, opts, grad_out)
    def rms_error(x, want):
        return ((x.double() - want).norm() / want.norm()).item()

    for name, ours, want, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                        (ref_out, *ref_grads), (torch_out, *torch_grads)):
        assert rms_error(ours, want) <= 1.5 * rms_error(theirs, want), name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("L", [1, 2, 3, 65, 129])
def test_in_place_rows_backward_scores_as_the_forward(L, dtype):
    # A few query rows (L = 2, 3: up to 4, 2 for bf16 on AVX512-BF16) and a tile of one row
    # (L = 1, the last of L = 65 or 129 at 64 or 128 rows a tile) are scored on the key rows in
    # place, in another order than a tile's products: the backward must score them the same way,
    # or P = exp(s - lse) is off by the rounding of s, which a large logit makes large. With one
    # key, lse = s, so P is exactly 1 only if the backward's s is the forward's bit for bit: dV
    # is then the last row's grad_out exactly (the other rows' are 0).
    q, k, v = inputs(2, 3, 3, L, 1, 96, 40, dtype, magnitude=2.0)
    opts = make_opts(scale=1.7)
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *op_args(opts, 96))
    grad_out = torch.zeros_like(out)
    grad_out[:, :, -1] = torch.randn(2, 3, 40, dtype=dtype)
    _, _, dv, _ = torch.ops.fastattn.attention_bwd(
        grad_out, q, k, v, out, lse, *op_args(opts, 96), False)
    assert torch.equal(dv[:, :, 0], grad_out[:, :, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_large_logits(dtype):
    # |q . k| ~ 1e4 with scale 1: softmax must not overflow and must stay as accurate as torch's.
    q, k, v = inputs(1, 2, 2, 33, 100, 64, 64, dtype, magnitude=12.0)
    opts = make_opts(scale=1.0)
    ref = torch.matmul(q.double(), k.double().transpose(-1, -2))
    assert ref.abs().max() > 3e3
    out, lse = check(q, k, v, opts, against_torch=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_non_contiguous_views():
    # [B, L, H, E] storage seen as [B, H, L, E]; v additionally sliced along its last dim.
    B, H, L, S, E = 2, 4, 33, 70, 40
    q = torch.randn(B, L, H, E).transpose(1, 2)
    k = torch.randn(B, S, H, E).transpose(1, 2)
    v = torch.randn(B, S, H, 2 * E).transpose(1, 2)[..., ::2]  # last dim stride 2
    assert not q.is_contiguous() and v.stride(-1) == 2
    check(q, k, v, make_opts(window_right=0), against_torch=True)


DECODE_CASES = [  # Hq, Hk, L, the mask kind, options
    pytest.param(3, 1, 1, None, {}, id="L1-gqa"),
    pytest.param(1, 1, 1, "bool", {}, id="L1-bool-mask"),
    pytest.param(1, 1, 3, "additive", dict(window_right=0, bottom_right=True),
                 id="L3-additive-mask-causal-bottom-right"),
    pytest.param(2, 2, 1, None, {}, id="L1-one-head-per-thread"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("Hq, Hk, L, mask_kind, options", DECODE_CASES)
def test_decode_splits_keys(Hq, Hk, L, mask_kind, options, dtype):
    # Fewer query tiles than twice the threads, and S = 3001 keys (an odd tail tile), on two
    # threads: a count of tiles that two threads do not divide (1, 3) has the keys of each tile
    # split in two and the parts merged by LSE; 2 tiles run whole, one per thread.
    S, threads = 3001, torch.get_num_threads()
    q, k, v = inputs(1, Hq, Hk, L, S, 64, 64, dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, Hq, L, S) > 0.2
    elif mask_kind == "additive":
        mask = torch.randn(1, 1, L, S, dtype=dtype)
    torch.set_num_threads(2)
    try:
        check(q, k, v, make_opts(attn_mask=mask, **options),
              against_torch=not options.get("bottom_right", False))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_results_do_not_depend_on_the_thread_count(causal, dtype):
    # The forward's query tiles and the backward's kv heads (16 of them: each thread owns whole
    # heads at up to 4 threads) go to threads in contiguous runs, and a thread whose run is done
    # takes units from the back of another's. More threads than cores make that happen (the
    # threads take turns on the cores): each unit runs once, on whichever thread, with the same
    # arithmetic, so every output matches the one-thread call bit for bit, and none is left as
    # the NaN the freed blocks of its size hold.
    q, k, v = inputs(2, 8, 8, 200, 150, 40, 24, dtype)
    opts = make_opts(window_right=0 if causal else -1)
    grad_out = torch.randn(2, 8, 200, 24, dtype=dtype)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            nan_heap((2, 8, 200, 24), dtype=dtype)
            nan_heap((2, 8, 200), dtype=torch.float32)
            out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *op_args(opts, 40))
            nan_heap((2, 8, 200, 40), (2, 8, 150, 40), (2, 8, 150, 24), dtype=dtype)
            grads = torch.ops.fastattn.attention_bwd(
                grad_out, q, k, v, out, lse, *op_args(opts, 40), False)[:3]
            results[n] = (out, lse, *grads)
    finally:
        torch.set_num_threads(threads)
    for t in results[1]:
        assert not t.isnan().any()
    for n in (2, 3, 4):
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results[n], results[1],
                                   strict=True):
            assert torch.equal(got, want), f"{name} at {n} threads"


def test_empty_inputs():
    q, k, v = inputs(0, 2, 2, 7, 9, 8, 8, torch.float32)
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *op_args(make_opts(), 8))
    assert out.shape == (0, 2, 7, 8) and lse.shape == (0, 2, 7)
    q, k, v = inputs(1, 2, 2, 7, 0, 8, 8, torch.float32)  # no keys: zero rows, lse -inf
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *op_args(make_opts(), 8))
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv, _ = torch.ops.fastattn.attention_bwd(
        torch.randn_like(out), q, k, v, out, lse, *op_args(make_opts(), 8), False)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_outputs_fully_written(dtype):
    # Most key tiles are skipped (no row sees a key past 72): all but the first of the avx512
    # forward's 128-key tiles, all but the first two of the 64-key tiles elsewhere.
    q, k, v = inputs(1, 3, 1, 70, 300, 40, 24, dtype)
    opts = make_opts(window_left=3, window_right=2)
    grad_out = torch.randn(1, 3, 70, 24, dtype=dtype)
    poison_(torch.empty(1, 3, 70, 24, dtype=dtype))
    poison_(torch.empty(1, 3, 70))
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *op_args(opts, 40))
    for t in (q, k, v):
        poison_(torch.empty_like(t))
    dq, dk, dv, _ = torch.ops.fastattn.attention_bwd(
        grad_out, q, k, v, out, lse, *op_args(opts, 40), False)
    for t in (out, lse, dq, dk, dv):
        assert not t.isnan().any()


def vm_flags_at(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    holds = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: lo-hi ...
                lo, hi = (int(x, 16) for x in head.split("-"))
                holds = lo <= address < hi
            elif holds and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="needs Linux transparent huge pages (madvise is a no-op elsewhere)")
def test_large_results_are_advised_huge_pages():
    """Results of >= 4 MiB (out of the forward, dq / dk / dv of the backward) are advised
    MADV_HUGEPAGE (VmFlags 'hg') on their whole 2 MiB pages before the kernels write them: their
    fresh pages then fault in 2 MiB at a time. 4096 sequences of one token keep it cheap."""
    T, H, E, huge = 4096, 8, 64, 2 << 20  # 8 MiB per float32 [T, H, E] result
    q, k, v, grad_out = (torch.randn(T, H, E) for _ in range(4))
    cu = torch.arange(T + 1, dtype=torch.int32)
    args = (cu, cu, 1, 1, None, 0.0, None, E**-0.5, -1, -1, False, 0.0)
    out, lse = torch.ops.fastattn.attention_varlen_fwd(q, k, v, *args)
    grads = torch.ops.fastattn.attention_varlen_bwd(grad_out, q, k, v, out, lse, *args)
    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        whole_pages_begin = -(-t.data_ptr() // huge) * huge
        whole_pages_end = (t.data_ptr() + t.nbytes) // huge * huge
        for address in (whole_pages_begin, whole_pages_end - 1):
            assert "hg" in vm_flags_at(address), f"{name} at {address:#x} was not advised"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def expected_bf16_engine() -> str:
    """The engine this process's bf16 forward must use: oneDNN's brgemm where the CPU has
    AMX-BF16 (unless FASTATTN_CPU_TILE_ENGINE=native) or the variable is brgemm
    (tests/test_cpu_tile_engine.py), else vdpbf16ps where the kernels run avx512 and the CPU has
    AVX512-BF16, else fp32 FMA."""
    flags = cpu_flags()
    if _extension.C.cpu_isa() != "avx512" or "avx512_bf16" not in flags:
        return "at::vec fp32 FMA"
    asked = os.environ.get("FASTATTN_CPU_TILE_ENGINE", "").lower()
    if "amx_bf16" in flags and asked != "native":
        return "oneDNN brgemm bf16 (AMX)"
    if asked == "brgemm":
        return "oneDNN brgemm bf16 (forced, no AMX)"
    return "avx512-bf16 vdpbf16ps"


def test_tile_engine_of_each_dtype():
    engine = _extension.C.cpu_attention_tile_engine
    assert engine("float32") == engine("float16") == "at::vec fp32 FMA"
    assert engine("float64") == "at::vec fp64 FMA"
    assert engine("bfloat16") == expected_bf16_engine()
    with pytest.raises(ValueError, match="dtype must be"):
        engine("int8")


needs_bf16_dot_products = pytest.mark.skipif(
    _extension.C.cpu_isa() != "avx512" or "avx512_bf16" not in cpu_flags(),
    reason="bf16 tile products use vdpbf16ps only where the kernels run avx512 and the CPU has "
    f"AVX512-BF16; here they run {_extension.C.cpu_isa()} and the CPU "
    f"{'has' if 'avx512_bf16' in cpu_flags() else 'lacks'} AVX512-BF16",
)


@needs_bf16_dot_products
def test_bf16_backward_products_use_avx512_bf16():
    """The bf16 dot products round P before dV += P^T dO and dS before dK += dS^T Q (as torch
    does); fp32 products do not. Two query rows that differ in one element by one bf16 step
    give P and |dS| rows that differ by ~1e-5 relative: rounded to bf16 they are almost all
    equal. With dO rows g and -g, dV = (P0 - P1)^T g and, off that element, dK = scale (dS0 +
    dS1)^T q then cancel exactly on the dot path, and are tiny but nonzero in fp32 (and in
    float64)."""
    torch.manual_seed(0)
    S, E = 64, 64
    q = torch.randn(1, 1, 1, E).bfloat16().repeat(1, 1, 2, 1)
    q[..., 0] = 2.0**-4
    q[0, 0, 1, 0] = 2.0**-4 + 2.0**-11  # one bf16 step up
    k, v = torch.randn(1, 1, S, E).bfloat16(), torch.randn(1, 1, S, E).bfloat16()
    g = torch.randn(E).bfloat16()
    grad_out = torch.stack([g, -g]).view(1, 1, 2, E)
    args = op_args(make_opts(), E)
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *args)
    _, dk, dv, _ = torch.ops.fastattn.attention_bwd(grad_out, q, k, v, out, lse, *args, False)
    _, _, (_, dk64, dv64) = reference64(q, k, v, make_opts(), grad_out)
    for name, got, want in (("dv", dv, dv64), ("dk", dk[..., 1:], dk64[..., 1:])):
        assert (want != 0).float().mean() > 0.99, f"{name}: the float64 gradient cancels"
        zeros = (got == 0).float().mean().item()
        assert zeros > 0.8, f"{name}: {zeros:.0%} exact zeros: not rounded like bf16 products"


# Odd lengths for the bf16 backward on dot products: a single row or key, tails of the
# 64-row/64-key tiles, odd counts that leave half a pair on either side of a product (the
# backward also reduces over queries); an odd head dim on a few of them. Hq = 2, Hk = 1 (GQA).
BF16_BACKWARD_SHAPES = [
    pytest.param(L, S, E, id=f"L{L}-S{S}-E{E}")
    for L in (1, 7, 33, 130) for S in (1, 7, 33, 130) for E in (64, 33)
    if E == 64 or (L, S) in ((1, 7), (7, 33), (33, 130), (130, 1))
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L, S, E", BF16_BACKWARD_SHAPES)
def test_bf16_backward_odd_sizes(L, S, E, causal):
    q, k, v = inputs(1, 2, 1, L, S, E, E, torch.bfloat16)
    check(q, k, v, make_opts(window_right=0 if causal else -1),
          against_torch=not (causal and L > S))


def test_bf16_backward_non_contiguous_gqa():
    B, Hq, Hk, L, S, E = 2, 4, 2, 33, 130, 64  # [B, L, H, E] storage seen as [B, H, L, E]
    q = torch.randn(B, L, Hq, E, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, S, Hk, E, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(B, S, Hk, E, dtype=torch.bfloat16).transpose(1, 2)
    assert not q.is_contiguous()
    check(q, k, v, make_opts(window_right=0), against_torch=True)


def test_bf16_odd_head_dim_in_rows_of_even_stride():
    # [B, S, H, E] storage with E = 33, H = 2: rows 66 elements apart, so the K^T and V^T pair
    # packing transposes 16 whole pairs per row as 32-bit words and adds the half pair apart.
    B, Hq, Hk, L, S, E = 1, 2, 2, 70, 130, 33
    q, k, v = (torch.randn(B, n, H, E, dtype=torch.bfloat16).transpose(1, 2)
               for n, H in ((L, Hq), (S, Hk), (S, Hk)))
    assert k.stride(2) == 66
    for causal in (False, True):
        check(q, k, v, make_opts(window_right=0 if causal else -1), against_torch=True)


# The avx512 bf16 backward keeps a kv head's packed query tiles (48 KiB each at E = 64) while
# they fit in 1 MiB, else packs them for every key tile: GQA group 2 x 4 query tiles (kept),
# group 4 x 7 tiles (1.3 MiB: packed anew), both with several key tiles and tails.
@pytest.mark.parametrize("Hq, L", [(4, 200), (8, 417)], ids=["kept", "repacked"])
def test_bf16_backward_query_tiles_of_a_kv_head(Hq, L):
    q, k, v = inputs(1, Hq, 2, L, L + 30, 64, 64, torch.bfloat16)
    check(q, k, v, make_opts(window_right=0), against_torch=True)


# Odd lengths (a single row, tails of the 64-row query tiles and of the 64- and 128-key tiles
# (the avx512 forward's), odd key counts that leave half a key pair for the bf16 dot products)
# and head dims off the 32-lane padding (8, 72).
ODD_BF16_SHAPES = [
    pytest.param(L, E, id=f"L{L}-S{2 * L + 1}-E{E}") for L in (1, 7, 33, 65) for E in (8, 72)
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L, E", ODD_BF16_SHAPES)
def test_bf16_odd_sizes(L, E, causal):
    q, k, v = inputs(2, 2, 1, L, 2 * L + 1, E, E, torch.bfloat16)
    check(q, k, v, make_opts(window_right=0 if causal else -1), against_torch=True)


BAD_INPUTS = [
    pytest.param(lambda q, k, v: (q, k[..., :4], v), {}, "head dim", id="head-dim"),
    pytest.param(lambda q, k, v: (q, k, v[:, :, :5]), {}, "v must be", id="kv-length"),
    pytest.param(lambda q, k, v: (q, k.double(), v), {}, "dtype", id="dtype"),
    pytest.param(lambda q, k, v: (q[:, :3], k[:, :2], v[:, :2]), {}, "multiple", id="gqa"),
    pytest.param(lambda q, k, v: (q, k, v), {"dropout_p": 1.0}, "dropout_p", id="dropout-1"),
    pytest.param(lambda q, k, v: (q, k, v), {"dropout_p": 0.5}, "rng_seed", id="no-seed"),
    pytest.param(lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(2, 4, 7, 8)},
                 "attn_mask", id="mask-shape"),
    pytest.param(lambda q, k, v: (q, k, v), {"alibi_slopes": torch.ones(3)}, "alibi_slopes",
                 id="alibi-shape"),
    pytest.param(lambda q, k, v: (q[0], k[0], v[0]), {}, "4-D", id="rank"),
]


@pytest.mark.parametrize("transform, overrides, message", BAD_INPUTS)
def test_bad_inputs_raise(transform, overrides, message):
    q, k, v = transform(*inputs(2, 4, 2, 7, 9, 8, 8, torch.float32))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastattn.attention_fwd(q, k, v, *op_args(make_opts(**overrides), 8))


def test_opcheck():
    q, k, v = inputs(1, 2, 1, 7, 9, 8, 8, torch.float32)
    mask = torch.randn(1, 2, 7, 9)
    args = op_args(make_opts(attn_mask=mask, window_right=0, bottom_right=True), 8)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, *args)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, *args, True),
                          test_utils=("test_schema", "test_faketensor"))


# Memory orders of q's [B, H, L, E] dims, outermost first: contiguous, a projection's heads
# ([B, L, H * E], batch_first), nn.MultiheadAttention's default [L, B, H * E], head-major; an E
# that is not innermost and a q expanded along B (torch and the op give a contiguous out there).
Q_LAYOUTS = ["BHLE", "BLHE", "LBHE", "HBLE", "BLEH", "BLHE-expanded"]


@pytest.mark.parametrize("layout", Q_LAYOUTS)
def test_out_is_laid_out_as_torchs(layout):
    """The forward's out has torch SDPA's strides for each layout of q (its dims in q's order,
    dense), with the same values and gradients; opcheck checks the fake's strides against it."""
    B, H, L, E = 2, 3, 7, 8
    order = layout.split("-")[0]
    sizes = dict(B=B, H=H, L=L, E=E)

    def laid_out():
        return torch.randn(*(sizes[d] for d in order)).permute(*(order.index(d) for d in "BHLE"))

    q, k, v = laid_out(), laid_out(), laid_out()
    if layout.endswith("expanded"):
        q = q[:1].expand(B, -1, -1, -1)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    args = op_args(make_opts(window_right=0), E)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default,
                          (q.detach(), k.detach(), v.detach(), *args),
                          test_utils=("test_schema", "test_faketensor"))
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.stride() == want.stride(), (got.stride(), want.stride())
    grad = torch.randn(B, L, H, E).transpose(1, 2)  # as a merge of the heads passes it back
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)
    if layout == "BLHE":  # merging the heads back is a view of out
        assert got.transpose(1, 2).reshape(B, L, H * E).data_ptr() == got.data_ptr()



def test_varlen_op_raises_value_error_on_bad_offsets():
    """The op's checks of cu_seqlens' values (the only ones on CPU tensors) raise ValueError
    naming the offsets, forward and backward."""
    q = torch.randn(8, 2, 16)
    good = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    bad = torch.tensor([0, 6, 5, 8], dtype=torch.int32)
    options = (None, 0.0, None, 0.25, -1, -1, False, 0.0)
    out, lse = torch.ops.fastattn.attention_varlen_fwd(q, q, q, good, good, 5, 5, *options)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        torch.ops.fastattn.attention_varlen_fwd(q, q, q, good, bad, 5, 5, *options)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        torch.ops.fastattn.attention_varlen_bwd(out, q, q, q, out, lse, bad, good, 5, 5,
                                                *options)
