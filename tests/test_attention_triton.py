"""fastattn::attention_fwd_triton / attention_bwd_triton against the float64 reference and torch.

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before Python starts;
one 16x16 tile config, so L, S in {1, 7, 33} cross tile edges) and on CUDA tensors when a GPU
is present (autotuned configs; extra cases with several 64/128 tiles).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fastattn.ops import reference
from tests.conftest import HAS_GPU, HAS_TRITON, TRITON_INTERPRETED
from tests.helpers import assert_close_to_reference, poison_

if HAS_TRITON and (HAS_GPU or TRITON_INTERPRETED):
    import triton
    import triton.language as tl

    from fastattn.triton_kernels.attention import _philox_uniform

pytestmark = pytest.mark.triton

DEVICES = [
    pytest.param(
        "cpu",
        id="cpu-interpreted",
        marks=pytest.mark.skipif(
            not TRITON_INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1 (set before Python)"
        ),
    ),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                TRITON_INTERPRETED, reason="CUDA tensors are tested compiled, not interpreted"
            ),
        ],
    ),
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call in the normalized layout, with the features to switch on."""

    B: int = 1
    Hq: int = 2
    Hk: int = 2
    L: int = 33
    S: int = 7
    E: int = 40
    Ev: int = 40
    dtype: torch.dtype = torch.float32
    mask: str | None = None  # None, "bool", "bool-bcast", "add", "add-bcast", "add-keys"
    empty_row: bool = False  # the mask hides every key of some query rows
    alibi: str | None = None  # None, "heads" ([Hq]) or "batch" ([B, Hq])
    dropout_p: float = 0.0
    window: tuple[int, int] = (-1, -1)
    bottom_right: bool = False
    softcap: float = 0.0
    scale: float | None = None
    noncontiguous: bool = False

    def expressible_in_sdpa(self) -> bool:
        """torch's SDPA computes this call itself (its error is the tolerance baseline)."""
        fully_masked = self.empty_row or (self.bottom_right and self.L > self.S)
        return not (self.alibi or self.dropout_p or self.softcap or self.bottom_right
                    or fully_masked or self.window[0] >= 0)


def _strided(shape: tuple[int, ...], dtype: torch.dtype, device: str, noncontiguous: bool):
    """Random normal tensor; non-contiguous (BSHD-transposed, padded rows) when asked."""
    B, H, N, D = shape
    if not noncontiguous:
        return torch.randn(shape, dtype=dtype, device=device)
    padded = torch.randn(B, N, H, D + 3, dtype=dtype, device=device)
    return padded[..., :D].transpose(1, 2)


def _make_mask(case: Case, device: str) -> torch.Tensor | None:
    """A [B, Hq, L, S] view of a mask whose broadcast dims have stride 0."""
    B, Hq, L, S = case.B, case.Hq, case.L, case.S
    if case.mask is None:
        return None
    if case.mask.startswith("bool"):
        shape = (1, 1, L, S) if case.mask == "bool-bcast" else (B, Hq, L, S)
        mask = torch.rand(shape, device=device) > 0.3
        if case.empty_row:
            mask[..., L // 2, :] = False
        if case.noncontiguous:  # a transposed mask: no unit stride on the key dim
            mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
        return mask.expand(B, Hq, L, S)
    shape = {"add": (B, Hq, L, S), "add-bcast": (B, 1, L, S), "add-keys": (B, 1, 1, S)}[case.mask]
    mask = torch.randn(shape, device=device).to(case.dtype)
    if case.empty_row:
        mask[..., -1, :] = float("-inf")
    return mask.expand(B, Hq, L, S)


def _make_inputs(case: Case, device: str) -> dict:
    q = _strided((case.B, case.Hq, case.L, case.E), case.dtype, device, case.noncontiguous)
    k = _strided((case.B, case.Hk, case.S, case.E), case.dtype, device, case.noncontiguous)
    v = _strided((case.B, case.Hk, case.S, case.Ev), case.dtype, device, case.noncontiguous)
    slopes = None
    if case.alibi == "heads":
        slopes = torch.rand(case.Hq, device=device)
    elif case.alibi == "batch":
        slopes = torch.rand(case.B, case.Hq, device=device)
    return {
        "q": q, "k": k, "v": v, "attn_mask": _make_mask(case, device), "alibi_slopes": slopes,
        "dropout_p": case.dropout_p,
        "rng_seed": torch.tensor(0x1234_5678_9ABC, dtype=torch.int64) if case.dropout_p else None,
        "scale": case.scale if case.scale is not None else 1.0 / math.sqrt(case.E),
        "window_left": case.window[0], "window_right": case.window[1],
        "bottom_right": case.bottom_right, "softcap": case.softcap,
    }


def _reference64(args: dict, grad_out: torch.Tensor, mask_grad: bool):
    """float64 reference forward and gradients (dmask w.r.t. the [B, Hq, L, S] view)."""
    q, k, v = (args[n].detach().double().requires_grad_() for n in ("q", "k", "v"))
    mask = args["attn_mask"]
    if mask_grad:
        mask = mask.detach().double().requires_grad_()
    out, lse = reference.attention_reference(
        q, k, v, mask, *(args[n] for n in list(args)[4:])
    )
    wrt = [q, k, v] + ([mask] if mask_grad else [])
    grads = torch.autograd.grad(out, wrt, grad_out.double())
    return out, lse, grads


def _torch_sdpa(args: dict, grad_out: torch.Tensor, mask_grad: bool):
    """torch's SDPA at the input dtype, with window/causal folded into the mask; and its grads."""
    q, k, v = (args[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
    L, S = q.shape[2], k.shape[2]
    visible = reference.visible_keys(L, S, args["window_left"], args["window_right"],
                                     args["bottom_right"], q.device)
    mask = args["attn_mask"]
    if mask is None:
        mask = visible
    elif mask.dtype == torch.bool:
        mask = mask & visible
    else:
        mask = mask.detach().clone().requires_grad_(mask_grad)
        mask = mask.masked_fill(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=args["scale"], enable_gqa=q.shape[1] != k.shape[1]
    )
    wrt = [q, k, v] + ([mask] if mask_grad else [])
    grads = torch.autograd.grad(out, wrt, grad_out)
    return out, grads


def _check(case: Case, device: str, mask_grad: bool = False) -> None:
    args = _make_inputs(case, device)
    out, lse = torch.ops.fastattn.attention_fwd_triton(**args)
    grad_out = _strided(tuple(out.shape), case.dtype, device, case.noncontiguous)
    dq, dk, dv, dmask = torch.ops.fastattn.attention_bwd_triton(
        grad_out, args["q"], args["k"], args["v"], out, lse, **{
            n: args[n] for n in list(args)[3:]}, mask_grad=mask_grad,
    )
    assert out.dtype == case.dtype and lse.dtype == torch.float32
    assert (dq.dtype, dk.dtype, dv.dtype) == (case.dtype,) * 3
    assert dq.shape == args["q"].shape and dk.shape == args["k"].shape
    assert dv.shape == args["v"].shape

    out64, lse64, grads64 = _reference64(args, grad_out, mask_grad)
    torch_out, torch_grads = None, [None] * 4
    if case.expressible_in_sdpa():
        torch_out, torch_grads = _torch_sdpa(args, grad_out, mask_grad)

    assert_close_to_reference(out, out64, torch_out, name="out")
    assert torch.equal(lse.isneginf(), lse64.isneginf()), "rows with no visible key differ"
    assert_close_to_reference(lse, lse64, dtype=torch.float32, name="lse")
    names = ["dq", "dk", "dv", "dmask"]
    ours = [dq, dk, dv] + ([dmask] if mask_grad else [])
    for name, actual, expected, theirs in zip(names, ours, grads64, torch_grads, strict=False):
        assert_close_to_reference(actual, expected, theirs, dtype=case.dtype, name=name)
    if not mask_grad:
        assert dmask.numel() == 0

    empty_rows = lse64.isneginf()
    if empty_rows.any():  # exactly 0, not merely close
        assert (out[empty_rows] == 0).all()
        assert (dq[empty_rows] == 0).all()
        if mask_grad:
            assert (dmask[empty_rows] == 0).all()


FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

CASES = [
    pytest.param(Case(), id="plain-L33-S7-E40"),
    pytest.param(Case(dtype=FP16, L=7, S=33, E=64, Ev=64), id="fp16-L7-S33-E64"),
    pytest.param(Case(dtype=BF16, L=33, S=33, E=8, Ev=8, Hq=1, Hk=1), id="bf16-L33-S33-E8"),
    pytest.param(Case(L=1, S=33, E=8, Ev=40, B=2), id="decode-L1-Ev40-E8"),
    pytest.param(Case(Hq=4, Hk=2, L=7, S=33, E=8, Ev=16), id="gqa-4q2kv"),
    pytest.param(Case(Hq=2, Hk=1, E=40, Ev=8, dtype=FP16), id="gqa-2q1kv-fp16-Ev8"),
    pytest.param(Case(window=(-1, 0), L=7, S=33), id="causal-top-left-L<S"),
    pytest.param(Case(window=(-1, 0), L=33, S=7), id="causal-top-left-L>S"),
    pytest.param(Case(window=(-1, 0), bottom_right=True, L=33, S=7), id="causal-bottom-right-L>S"),
    pytest.param(Case(window=(-1, 0), bottom_right=True, L=7, S=33, dtype=BF16),
                 id="causal-bottom-right-L<S-bf16"),
    pytest.param(Case(window=(3, 2), bottom_right=True, L=7, S=33), id="window-3-2-bottom-right"),
    pytest.param(Case(window=(5, -1), L=33, S=33, E=8, Ev=8), id="window-left-only"),
    # Window edges one key past a tile edge: catches off-by-one tile-skipping bounds.
    pytest.param(Case(window=(1, 1), L=33, S=33, E=8, Ev=8, Hq=1, Hk=1),
                 id="window-1-1-tile-edges"),
    pytest.param(Case(softcap=2.0, scale=0.5), id="softcap-2"),
    pytest.param(Case(softcap=5.0, dtype=FP16, L=7, S=33), id="softcap-5-fp16"),
    pytest.param(Case(alibi="heads", S=33, window=(-1, 0), bottom_right=True), id="alibi-heads"),
    pytest.param(Case(alibi="batch", B=2, L=7), id="alibi-batch"),
    pytest.param(Case(mask="bool-bcast"), id="mask-bool-broadcast"),
    pytest.param(Case(mask="bool", empty_row=True, Hq=2, Hk=1), id="mask-bool-empty-row-gqa"),
    pytest.param(Case(mask="add", window=(-1, 0), L=7, S=33), id="mask-add-causal"),
    pytest.param(Case(mask="add-bcast", dtype=FP16, empty_row=True), id="mask-add-empty-row-fp16"),
    pytest.param(Case(mask="add-keys", dtype=BF16, L=7, S=33), id="mask-add-keys-bf16"),
    pytest.param(Case(noncontiguous=True, mask="bool", Hq=2, Hk=1), id="noncontiguous"),
    pytest.param(Case(dropout_p=0.3, L=7, S=33), id="dropout-0.3"),
    pytest.param(Case(dropout_p=0.5, Hq=2, Hk=1, window=(-1, 0), dtype=FP16),
                 id="dropout-gqa-fp16"),
    pytest.param(Case(Hq=4, Hk=2, L=33, S=7, E=40, Ev=8, dtype=FP16, mask="add-bcast",
                      alibi="heads", window=(9, 1), bottom_right=True, softcap=3.0,
                      dropout_p=0.2, noncontiguous=True), id="everything-fp16"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: Case, device: str) -> None:
    _check(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    pytest.param(Case(mask="add"), id="add-full"),
    pytest.param(Case(mask="add-bcast", empty_row=True, softcap=4.0), id="add-bcast-softcap"),
    pytest.param(Case(mask="add-keys", dtype=FP16, window=(2, 2), L=7, S=33, Hq=2, Hk=1),
                 id="add-keys-window-fp16"),
])
def test_mask_gradient(case: Case, device: str) -> None:
    _check(case, device, mask_grad=True)


@pytest.mark.parametrize("device", DEVICES)
# 160 is a 256 head block: fp32 then runs its own 32 x 32 config (see _prune_for_dtype).
@pytest.mark.parametrize("E", [8, 40, 64, 80, 128, 160])
def test_head_dims(E: int, device: str) -> None:
    _check(Case(L=7, S=33, E=E, Ev=E, Hq=1, Hk=1, window=(-1, 0)), device)


# Several 64/128 tiles, only compiled: the interpreter's 16 x 16 tiles already cross edges.
@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("case", [
    pytest.param(Case(B=2, Hq=4, Hk=2, L=257, S=257, E=128, Ev=128, dtype=FP16,
                      window=(-1, 0)), id="causal-257-fp16-E128"),
    pytest.param(Case(B=2, Hq=4, Hk=1, L=100, S=257, E=80, Ev=80, dtype=BF16, mask="bool-bcast",
                      window=(64, 0), bottom_right=True), id="window-100x257-bf16-E80"),
    pytest.param(Case(L=257, S=100, E=64, Ev=64, alibi="heads", softcap=10.0, dropout_p=0.1,
                      mask="add-bcast", empty_row=True), id="features-257x100-fp32"),
    pytest.param(Case(Hq=1, Hk=1, L=257, S=257, E=64, Ev=64, dtype=FP16, window=(1, 1)),
                 id="window-1-1-tile-edges-257"),
])
def test_large_tiles(case: Case, device: str) -> None:
    _check(case, device, mask_grad=case.mask is not None and case.mask.startswith("add"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L, S, E, Hk", [(33, 33, 64, 2), (17, 45, 40, 1)])
def test_backward_recomputes_the_forward_scores_with_huge_logits(
    L: int, S: int, E: int, Hk: int, device: str
) -> None:
    """|q . k| ~ 1e4, where one float32 ulp of a score is 1e-3: the backward's P = exp(s - lse)
    is only as accurate as its scores equal the forward's bit for bit (issue 18: a q @ k^T
    formed differently in the backward put a 4e-3 error into dv, the forward being exact)."""
    q = torch.randn(1, 2, L, E, device=device) * 30
    k = torch.randn(1, Hk, S, E, device=device) * 30
    v = torch.randn(1, Hk, S, E, device=device)
    args = {"q": q, "k": k, "v": v, "attn_mask": None, "alibi_slopes": None, "dropout_p": 0.0,
            "rng_seed": None, "scale": 1.0, "window_left": -1, "window_right": -1,
            "bottom_right": False, "softcap": 0.0}
    out, lse = torch.ops.fastattn.attention_fwd_triton(**args)
    grad_out = torch.randn_like(out)
    dq, dk, dv, _ = torch.ops.fastattn.attention_bwd_triton(
        grad_out, q, k, v, out, lse, **{n: args[n] for n in list(args)[3:]}, mask_grad=False
    )
    out64, _, (_, _, dv64) = _reference64(args, grad_out, mask_grad=False)
    torch_out, (_, _, torch_dv) = _torch_sdpa(args, grad_out, mask_grad=False)
    assert_close_to_reference(out, out64, torch_out, name="out")
    assert_close_to_reference(dv, dv64, torch_dv, name="dv")
    # The softmax rows are nearly one-hot, so the exact dq, dk are ~0 and their relative error
    # is noise against noise: only finiteness is checked for them.
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 0x7FFF_FFFF_FFFF_FFFF, -5])
def test_dropout_mask_is_the_philox_stream(seed: int, device: str) -> None:
    """With v = identity, out = dropped P / (1 - p): out != 0 exactly where the reference keeps."""
    B, H, L, S, p = 1, 2, 7, 33, 0.4
    q = 0.1 * torch.randn(B, H, L, 16, device=device)  # small scores: no P underflows to 0
    k = 0.1 * torch.randn(B, H, S, 16, device=device)
    v = torch.eye(S, device=device).expand(B, H, S, S)
    out, _ = torch.ops.fastattn.attention_fwd_triton(
        q, k, v, None, None, p, torch.tensor(seed), 0.25, -1, -1, False, 0.0
    )
    keep = reference.dropout_keep_mask(seed, (B, H, L, S), p, torch.device(device))
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(out != 0, keep)


if HAS_TRITON and (HAS_GPU or TRITON_INTERPRETED):

    @triton.jit
    def _philox_probe_kernel(Seed, Counter, U, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        counter = tl.load(Counter + offs, mask=offs < N, other=0)
        u = _philox_uniform(tl.load(Seed), counter)
        tl.store(U + offs, u, mask=offs < N)


@pytest.mark.parametrize("device", DEVICES)
def test_philox_counters_above_32_bits(device: str) -> None:
    """The counter's high word (only reached by B*H*L*S > 2**32) is used as the contract says."""
    counters = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 7, 3 * 2**40 + 5, 2**62 + 12345],
                            dtype=torch.int64, device=device)
    seed = torch.tensor([0x0123_4567_89AB_CDEF], dtype=torch.int64, device=device)
    u = poison_(torch.empty(counters.shape, dtype=torch.float32, device=device))
    _philox_probe_kernel[(1,)](seed, counters, u, counters.numel(), BLOCK=16)
    assert torch.equal(u, reference.philox_uniform(int(seed), counters))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S", [0, 7])
def test_no_visible_key_anywhere(S: int, device: str) -> None:
    """Every key hidden (all-False mask) or no keys at all: zeros, -inf, zero gradients."""
    case = Case(L=7, S=S, Hq=2, Hk=1)
    args = _make_inputs(case, device)
    args["attn_mask"] = torch.zeros(1, 1, 1, S, dtype=torch.bool, device=device).expand(1, 2, 7, S)
    out, lse = torch.ops.fastattn.attention_fwd_triton(**args)
    assert (out == 0).all() and lse.isneginf().all()
    dq, dk, dv, dmask = torch.ops.fastattn.attention_bwd_triton(
        torch.randn_like(out), args["q"], args["k"], args["v"], out, lse,
        **{n: args[n] for n in list(args)[3:]}, mask_grad=True,
    )
    for g in (dq, dk, dv, dmask):
        assert (g == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, L", [(0, 7), (1, 0)])
def test_empty_batch_or_queries(B: int, L: int, device: str) -> None:
    """Nothing to compute: right shapes and dtypes, and no kernel launched on an empty grid."""
    case = Case(B=B, L=L, S=7, Hq=2, Hk=1, mask="add-bcast")
    args = _make_inputs(case, device)
    out, lse = torch.ops.fastattn.attention_fwd_triton(**args)
    assert out.shape == (B, 2, L, case.Ev) and lse.shape == (B, 2, L)
    dq, dk, dv, dmask = torch.ops.fastattn.attention_bwd_triton(
        torch.randn_like(out), args["q"], args["k"], args["v"], out, lse,
        **{n: args[n] for n in list(args)[3:]}, mask_grad=True,
    )
    assert dq.shape == args["q"].shape and dmask.shape == (B, 2, L, 7)
    assert dk.shape == args["k"].shape and dv.shape == args["v"].shape
    assert (dk == 0).all() and (dv == 0).all()  # no query reads any key


def _opcheck_args(device: str) -> tuple[tuple, tuple]:
    case = Case(L=7, S=7, E=16, Ev=16, Hq=2, Hk=1, mask="add-bcast", window=(-1, 0))
    args = _make_inputs(case, device)
    fwd_args = tuple(args.values())
    out, lse = torch.ops.fastattn.attention_fwd_triton(*fwd_args)
    bwd_args = (torch.randn_like(out), *fwd_args[:3], out, lse, *fwd_args[3:], True)
    return fwd_args, bwd_args


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    """torch.library.opcheck of both triton_ops.

    Under the interpreter only test_schema can run: torch's wrap_triton returns interpreted
    kernels unwrapped (torch/_library/triton.py: they lack the JIT metadata its traceable
    wrapper needs), so the fake impl that triton_op derives from the Python body would run the
    interpreter on FakeTensors (it reads their storage: "Attempted to set the storage of a
    tensor on device meta..."). The fake-tensor and AOT-dispatch checks run on CUDA tensors.
    Autograd is registered by the ops layer (fastattn/ops/attention.py) and tested there.
    """
    fwd_args, bwd_args = _opcheck_args(device)
    tests = ["test_schema"]
    if device == "cuda":
        tests += ["test_faketensor", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(torch.ops.fastattn.attention_fwd_triton, fwd_args, test_utils=tests)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd_triton, bwd_args, test_utils=tests)


def test_triton_ops_take_the_registry_schemas() -> None:
    """triton_op infers its schema from the Python signature (torch 2.13 ignores a schema=
    argument), so the triton ops spell the arguments out: they must stay those of
    fastattn::attention_fwd / attention_bwd, since the ops layer calls either with the same
    positional arguments."""
    import fastattn.triton_kernels.attention  # noqa: F401  (registers the triton_ops)

    for name in ("attention_fwd", "attention_bwd"):
        ours = getattr(torch.ops.fastattn, name).default._schema
        mirror = getattr(torch.ops.fastattn, f"{name}_triton").default._schema
        assert [(a.name, str(a.type)) for a in mirror.arguments] == [
            (a.name, str(a.type)) for a in ours.arguments
        ]
        assert [str(r.type) for r in mirror.returns] == [str(r.type) for r in ours.returns]
