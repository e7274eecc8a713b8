"""Shared test utilities: seeded inputs, NaN poisoning, error-vs-float64 checks and an op
recorder."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn.ops.attention import _missing_feature

# The rounding step of each dtype: errors below a few of these are noise, not bugs.
DTYPE_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
# Relative error budgets from the developers' brief.
DTYPE_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}

HAS_GPU = torch.cuda.is_available()

# Every attention backend, as a test parameter (triton and cuda carry their markers).
ATTENTION_BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def device_for(backend: str) -> str:
    """The device whose tensors ``backend`` runs on here (triton interprets CPU tensors)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_GPU) else "cpu"


def require(backend: str, dtype: torch.dtype = torch.float32, E: int = 64, Ev: int | None = None):
    """Skips, saying why, unless ``backend`` is usable here and serves this dtype and head dims."""
    status = fastattn.backends()[backend]
    if not status.usable:
        pytest.skip(f"backend {backend} unavailable here: {status.reason}")
    why = _missing_feature(backend, dtype, E, Ev or E, batch=1, q_heads=1)
    if why:
        pytest.skip(f"backend {backend} does not serve {why}")


# The option combinations of one LSTM layer-direction call (tests of the fused layer ops).
LSTM_LAYER_CASES = [
    pytest.param(dict(proj=False, zoneout=False, lengths=None, reverse=False), id="plain"),
    pytest.param(dict(proj=False, zoneout=False, lengths=None, reverse=True), id="reverse"),
    pytest.param(dict(proj=True, zoneout=False, lengths=None, reverse=False), id="proj"),
    pytest.param(dict(proj=False, zoneout=True, lengths=None, reverse=False), id="zoneout"),
    pytest.param(dict(proj=False, zoneout=False, lengths=[5, 5, 3, 1], reverse=False), id="packed"),
    pytest.param(dict(proj=True, zoneout=True, lengths=[5, 4, 2, 2], reverse=True),
                 id="packed-proj-zoneout-reverse"),
]


def lstm_layer_inputs(T, B, H, P, dtype, *, proj, zoneout, lengths):
    """Fresh random inputs of one lstm_layer_fwd call: (x_proj, h0, c0, w_hh, w_hr, batch_sizes,
    zoneout_c, zoneout_h); ``lengths`` (sorted, one per row) gives batch_sizes."""
    x_proj = randn(T, B, 4 * H, dtype=dtype, scale=1.5)
    h0, c0 = randn(B, P, dtype=dtype), randn(B, H, dtype=dtype)
    w_hh = randn(4 * H, P, dtype=dtype, scale=0.5)
    w_hr = randn(P, H, dtype=dtype, scale=0.5) if proj else None
    batch_sizes = None
    if lengths is not None:
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
    zc = zh = None
    if zoneout:
        zc = torch.bernoulli(torch.full((T, B, H), 0.3)).to(dtype)
        zh = torch.full((T, B, P), 0.25, dtype=dtype)  # the eval-mode form: a probability
    return x_proj, h0, c0, w_hh, w_hr, batch_sizes, zc, zh


def ln_layer_inputs(T, B, H, P, dtype, *, proj, zoneout, lengths):
    """Fresh random inputs of one lstm_ln_layer_fwd call: (x_proj, h0, c0, w_hh, (ln_hh_weight,
    ln_c_weight, ln_c_bias), w_hr, batch_sizes, zoneout_c, zoneout_h); P applies with ``proj``
    only; ``lengths`` (sorted, one per row; the first B taken) gives batch_sizes."""
    P = P if proj else H
    x_proj = randn(T, B, 4 * H, dtype=dtype, scale=1.5)
    h0, c0 = randn(B, P, dtype=dtype), randn(B, H, dtype=dtype)
    w_hh = randn(4 * H, P, dtype=dtype, scale=0.5)
    # gains away from 1 and a bias away from 0, so a kernel that drops one of them fails
    ln = (randn(4 * H, dtype=dtype, scale=0.3, mean=1.0),
          randn(H, dtype=dtype, scale=0.3, mean=1.0), randn(H, dtype=dtype, scale=0.5))
    w_hr = randn(P, H, dtype=dtype, scale=0.5) if proj else None
    batch_sizes = None
    if lengths is not None:
        lengths = lengths[:B]
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
    zc = zh = None
    if zoneout:
        zc = torch.bernoulli(torch.full((T, B, H), 0.3)).to(dtype)
        zh = torch.full((T, B, P), 0.25, dtype=dtype)  # the eval-mode form: a probability
    return x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills ``t`` with NaN (or the integer max) so an element a kernel forgets to write fails."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.bool else True)


def nan_heap(*shapes: tuple[int, ...], dtype: torch.dtype) -> None:
    """Leaves freed NaN blocks of the output sizes in the heap, so an op's torch.empty outputs
    most likely start as NaN and an element the kernel forgets to write shows up (best effort:
    the CPU allocator does not promise to reuse the blocks)."""
    blocks = [torch.full(s, float("nan"), dtype=dtype) for s in shapes for _ in range(2)]
    del blocks


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0,
          mean: float = 0.0) -> torch.Tensor:
    """Normal samples drawn in float64 (the same values whatever the dtype), then cast."""
    return (torch.randn(*shape, dtype=torch.float64) * scale + mean).to(dtype)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor, scale_floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, scale_floor, tiny), computed in float64;
    NaN -> inf. ``scale_floor`` is the size of the terms whose sum gives ``expected``: where
    they cancel (an exact zero), rounding noise is judged against them, not against zero."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all() and not torch.equal(a.isnan(), e.isnan()):
        return float("inf")
    finite = torch.isfinite(e)
    diff = (a - e).abs()[finite]
    if diff.numel() == 0:
        return 0.0
    if not torch.isfinite(diff).all():
        return float("inf")
    scale = e[finite].abs().max().clamp_min(max(scale_floor, 1e-30))
    return float(diff.max() / scale)


def assert_close_to_reference(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    torch_result: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    name: str = "output",
    scale_floor: float = 0.0,
) -> None:
    """The flash-attention rule: error vs float64 <= 2x PyTorch's own error (same dtype),
    plus a floor for the dtype's rounding step; never above the dtype's budget; NaN fails.
    ``scale_floor``: see max_rel_error."""
    dtype = dtype or actual.dtype
    ours = max_rel_error(actual, reference64, scale_floor)
    budget = DTYPE_RTOL[dtype]
    theirs = None
    if torch_result is not None:
        theirs = max_rel_error(torch_result, reference64, scale_floor)
        bound = max(2 * theirs + DTYPE_FLOOR[dtype], DTYPE_FLOOR[dtype] * 4)
        bound = min(bound, max(budget, 2 * theirs))
    else:
        bound = budget
    assert ours <= bound, (
        f"{name}: relative error {ours:.3e} vs float64 exceeds {bound:.3e} "
        f"(dtype {dtype}, torch's own error {theirs if theirs is not None else 'n/a'})"
    )


def attention_grad_scales(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
    scale: float | None = None,
) -> dict[str, float]:
    """The size of one term of each attention input gradient, for max_rel_error's scale_floor.

    dS = P * (dP - rowsum(dP * P)) with dP = grad_out @ v^T cancels exactly when a row sees
    one key (dq = dk = dS = 0) and nearly so for saturated softmax rows; rounding noise there is
    a fraction of the cancelling terms: |dP| ~ sqrt(Ev) * rms(grad_out) * rms(v), times
    scale * rms(k) for dq (rms(q) for dk). A mask gradient is dS itself, whose terms carry
    P ~ 1/S. A quarter of that (root mean squares, not maxima) stays below the largest entry
    of every well-conditioned gradient in test_attention (at most a third of it), so only
    cancelling cases are judged against the floor.
    """
    def rms(t: torch.Tensor) -> float:
        return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0

    E, S, Ev = q.shape[-1], k.shape[-2], v.shape[-1]
    softmax_scale = scale if scale is not None else E ** -0.5
    dp = 0.25 * Ev ** 0.5 * rms(grad_out) * rms(v)
    return {
        "dq": softmax_scale * dp * rms(k),
        "dk": softmax_scale * dp * rms(q),
        "dmask": dp / max(S, 1),
    }


class OpRecorder(TorchDispatchMode):
    """Records the name of every op dispatched inside the block (``seen``)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class FunctionCallCounter(TorchFunctionMode):
    """Counts the torch function calls made inside the block (``calls``)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))
