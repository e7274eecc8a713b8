"""Plain-PyTorch implementations of every fastattn op: the oracle for tests and the backend of
last resort. Differentiable through autograd and float64-capable; clarity over speed (the
attention reference materializes the L x S score matrix).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a * b < 2**64 wraps in int64, but the 64 bits are still the exact product.
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox_uniform(seed: int, n: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 uniform in [0, 1) for counters ``n`` (int64) under ``seed``.

    Bit-identical to csrc/include/fastattn/philox.h and the Triton kernels; float32 result.
    """
    c0, c1 = n & _MASK32, (n >> 32) & _MASK32
    c2 = torch.zeros_like(n)
    c3 = torch.zeros_like(n)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return (c0 >> 8).to(torch.float32) * (1.0 / 16777216.0)


def dropout_keep_mask(
    seed: int, shape: tuple[int, int, int, int], dropout_p: float, device: torch.device
) -> torch.Tensor:
    """bool [B, H, L, S]: True where attention dropout keeps element (b, h, i, j)."""
    n = torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64, device=device)
    return (philox_uniform(seed, n) >= dropout_p).reshape(shape)


def key_offset(L: int, S: int, bottom_right: bool) -> int:
    """The diagonal's column shift: 0 for top-left (torch's is_causal), S - L for bottom-right."""
    return S - L if bottom_right else 0


def visible_keys(
    L: int, S: int, window_left: int, window_right: int, bottom_right: bool, device: torch.device
) -> torch.Tensor:
    """bool [L, S]: key j is visible to query i iff -left <= j - i - offset <= right
    (a negative bound is unbounded)."""
    rel = (
        torch.arange(S, device=device)[None, :]
        - torch.arange(L, device=device)[:, None]
        - key_offset(L, S, bottom_right)
    )
    visible = torch.ones(L, S, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= rel >= -window_left
    if window_right >= 0:
        visible &= rel <= window_right
    return visible


def alibi_bias(
    alibi_slopes: torch.Tensor, B: int, H: int, L: int, S: int, bottom_right: bool
) -> torch.Tensor:
    """float32 [B or 1, H, L, S]: slope * (j - i - offset) from slopes [H] or [B, H]."""
    rel = (
        torch.arange(S, device=alibi_slopes.device)[None, :]
        - torch.arange(L, device=alibi_slopes.device)[:, None]
        - key_offset(L, S, bottom_right)
    ).to(torch.float32)
    slopes = alibi_slopes.to(torch.float32).reshape(-1, H, 1, 1)
    return slopes * rel


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    rng_seed: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in the normalized layout of fastattn::attention_fwd (see _registry.py).

    q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]; returns out [B, Hq, L, Ev] in q's dtype
    and lse [B, Hq, L] float32. Computes in float64 for float64 inputs, else float32.
    """
    B, Hq, L, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = Hq // Hk
    qc = q.to(compute)
    kc = k.to(compute).repeat_interleave(group, dim=1)
    vc = v.to(compute).repeat_interleave(group, dim=1)

    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, Hq, L, S]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, B, Hq, L, S, bottom_right).to(compute)
    visible = visible_keys(L, S, window_left, window_right, bottom_right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(compute)
    scores = scores.masked_fill(~visible, float("-inf"))

    # A row with no visible key has max -inf: shift it by 0 instead so exp() gives exact zeros
    # (and zero gradients) rather than NaN. Every other row sums to >= 1 after the shift.
    row_max = scores.amax(dim=-1, keepdim=True) if S > 0 else scores.new_zeros(B, Hq, L, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    unnormalized = torch.exp(scores - row_max)
    row_sum = unnormalized.sum(dim=-1, keepdim=True)
    probs = unnormalized / row_sum.clamp_min(1.0)
    lse = torch.where(row_sum > 0, row_max + torch.log(row_sum), float("-inf")).squeeze(-1)

    if dropout_p > 0:
        if rng_seed is None:
            raise ValueError("attention_reference: dropout_p > 0 needs rng_seed")
        keep = dropout_keep_mask(int(rng_seed), (B, Hq, L, S), dropout_p, q.device)
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.matmul(probs, vc)
    return out.to(q.dtype), lse.to(torch.float32)
