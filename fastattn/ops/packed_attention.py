"""Attention over packed variable-length sequences and over a KV cache.

Both run the fused attention op once per sequence on strided views of the packed or cached
tensors: no padding is materialized or computed, and no key beyond a sequence's valid prefix
is read.
"""

from __future__ import annotations

from typing import Any

import torch

from fastattn.ops.attention import attention
from fastattn.ops.errors import FastattnValueError


def _check_cu_seqlens(name: str, cu: Any, total: int, batch: int | None) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
        raise FastattnValueError(
            f"attention_varlen: {name} must be a 1-D int32 tensor of cumulative lengths, got "
            f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}"
        )
    if cu.numel() < 2 or (batch is not None and cu.numel() != batch + 1):
        raise FastattnValueError(
            f"attention_varlen: {name} must have batch + 1 entries"
            f"{f' ({batch + 1})' if batch is not None else ''}, got {cu.numel()}"
        )
    offsets = cu.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise FastattnValueError(
            f"attention_varlen: {name} must start at 0 and be non-decreasing, got {offsets}"
        )
    if offsets[-1] != total:
        raise FastattnValueError(
            f"attention_varlen: {name}[-1] = {offsets[-1]} must equal the total token count {total}"
        )
    return offsets


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences: q [total_q, Hq, E], k [total_k, Hk, E], v [total_k, Hk, Ev].

    Sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:... of
    k/v (int32, batch + 1 entries, starting at 0). ``options`` are fastattn.attention's
    (causal, causal_align, window, softcap, alibi_slopes [Hq] or [batch, Hq], dropout_p,
    scale, return_lse) except attn_mask. Returns out [total_q, Hq, Ev] and, with
    return_lse, lse float32 [Hq, total_q].
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise FastattnValueError(
                f"attention_varlen: {name} must be a 3-D [tokens, heads, dim] tensor"
            )
    if options.get("attn_mask") is not None:
        raise FastattnValueError(
            "attention_varlen: attn_mask is not supported; use causal/window/alibi"
        )
    offsets_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None)
    batch = len(offsets_q) - 1
    offsets_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], batch)
    lengths_q = [b - a for a, b in zip(offsets_q, offsets_q[1:])]
    lengths_k = [b - a for a, b in zip(offsets_k, offsets_k[1:])]
    if max(lengths_q) > max_seqlen_q or max(lengths_k) > max_seqlen_k:
        raise FastattnValueError(
            f"attention_varlen: a sequence is longer than max_seqlen_q={max_seqlen_q} / "
            f"max_seqlen_k={max_seqlen_k} (longest: {max(lengths_q)} / {max(lengths_k)})"
        )
    alibi = options.pop("alibi_slopes", None)
    return_lse = options.pop("return_lse", False)
    outs, lses = [], []
    for i in range(batch):
        qi, ki, vi = (
            t[offsets[i] : offsets[i + 1]].transpose(0, 1).unsqueeze(0)  # [1, H, len, D] view
            for t, offsets in ((q, offsets_q), (k, offsets_k), (v, offsets_k))
        )
        slopes = alibi[i] if alibi is not None and alibi.dim() == 2 else alibi
        out, lse = attention(qi, ki, vi, alibi_slopes=slopes, return_lse=True, **options)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=-1)) if return_lse else out


def attention_with_kv_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    *,
    causal_align: str = "bottom_right",
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decoding attention: q [B, Hq, Lq, E] over each sequence's valid cache prefix.

    k_cache [B, Hk, S_max, E] and v_cache [B, Hk, S_max, Ev] hold cache_seqlens[b] (int32 [B])
    valid positions; k_new/v_new [B, Hk, L_new, *] are first written in place at positions
    cache_seqlens[b]:cache_seqlens[b] + L_new (cache_seqlens itself is not changed). Queries
    are the last positions of each sequence, so causal masks align bottom-right by default.
    ``options`` are fastattn.attention's. The cache update is not differentiable.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise FastattnValueError(
                f"attention_with_kv_cache: {name} must be a 4-D [B, H, N, D] tensor"
            )
    B, S_max = k_cache.shape[0], k_cache.shape[2]
    if (
        not isinstance(cache_seqlens, torch.Tensor)
        or cache_seqlens.dtype != torch.int32
        or cache_seqlens.shape != (B,)
    ):
        raise FastattnValueError(
            f"attention_with_kv_cache: cache_seqlens must be int32 of shape [{B}]"
        )
    if (k_new is None) != (v_new is None):
        raise FastattnValueError("attention_with_kv_cache: pass both k_new and v_new, or neither")
    L_new = 0 if k_new is None else k_new.shape[2]
    if k_new is not None:
        for name, new, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            if new.dim() != 4 or new.shape[:2] != cache.shape[:2] or new.shape[3] != cache.shape[3]:
                raise FastattnValueError(
                    f"attention_with_kv_cache: {name} must be [{B}, {cache.shape[1]}, L_new, "
                    f"{cache.shape[3]}], got {tuple(new.shape)}"
                )
    lengths = cache_seqlens.tolist()
    if any(n < 0 or n + L_new > S_max for n in lengths):
        raise FastattnValueError(
            f"attention_with_kv_cache: cache_seqlens + L_new must lie in [0, {S_max}], got "
            f"{lengths} + {L_new}"
        )
    alibi = options.pop("alibi_slopes", None)
    return_lse = options.pop("return_lse", False)
    mask = options.pop("attn_mask", None)
    if mask is not None:
        full = (B, q.shape[1], q.shape[2], S_max)
        try:
            mask = mask.expand(full)
        except (RuntimeError, AttributeError):
            raise FastattnValueError(
                f"attention_with_kv_cache: attn_mask must broadcast to [B, Hq, Lq, S_max] = "
                f"{list(full)}, got {tuple(getattr(mask, 'shape', ()))}"
            ) from None
    if B == 0:  # an empty batch, as torch returns for a zero-size batch
        out = q.new_empty(0, *q.shape[1:3], v_cache.shape[3])
        return (out, out.new_empty(out.shape[:3], dtype=torch.float32)) if return_lse else out
    outs, lses = [], []
    for b, length in enumerate(lengths):
        if k_new is not None:
            with torch.no_grad():
                k_cache[b, :, length : length + L_new] = k_new[b]
                v_cache[b, :, length : length + L_new] = v_new[b]
        end = length + L_new
        slopes = alibi[b] if alibi is not None and alibi.dim() == 2 else alibi
        out, lse = attention(
            q[b : b + 1],
            k_cache[b : b + 1, :, :end],
            v_cache[b : b + 1, :, :end],
            causal_align=causal_align,
            alibi_slopes=slopes,
            return_lse=True,
            attn_mask=None if mask is None else mask[b : b + 1, :, :, :end],
            **options,
        )
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=0)) if return_lse else out
