"""Triton attention over packed variable-length sequences and over a (paged) KV cache.

Registered as ``fastattn::attention_varlen_fwd_triton``, ``fastattn::attention_varlen_bwd_triton``
and ``fastattn::attention_kv_cache_fwd_triton`` (torch.library.triton_op), with the arguments and
semantics of issue 16's ``fastattn::attention_varlen_fwd`` / ``_bwd`` /
``attention_kv_cache_fwd`` (their schemas: fastattn/ops/_registry.py). They run the kernels of
attention.py, whose VARLEN / KEY_LENS / PAGED paths read cu_seqlens, cache_seqlens and
block_table in the kernel: one launch for every sequence, no host sync, no padding.

- Packed: q [total_q, Hq, E], k [total_k, Hk, E], v [total_k, Hk, Ev] (unit last stride), int32
  cu_seqlens_q / cu_seqlens_k [B + 1]; out [total_q, Hq, Ev], lse float32 [Hq, total_q].
  Dropout's counter of (b, h, i, j) is ((h * total_q) + cu_seqlens_q[b] + i) * max_seqlen_k + j.
- KV cache: q [B, Hq, Lq, E]; k_cache / v_cache [B_cache, Hk, S_max, E / Ev], or paged
  [num_blocks, Hk, block_size, E / Ev] with int32 block_table [B, max_blocks]; any strides with a
  unit last dim (vLLM's [num_blocks, block_size, Hk, E] passed as .transpose(1, 2) is read and
  written in place). k_new / v_new [B, Hk, L_new, *] are appended at cache_seqlens[b] first.
  A contiguous cache with cache_batch_idx runs the paged path with one S_max-row block per
  sequence (block_table = cache_batch_idx[:, None]).
- Split-KV decode: with few queries per sequence (Lq <= 64) and a long cache, each (sequence,
  head) is split over several programs along the keys and the partial results merged by
  _attention_split_combine_kernel (log-sum-exp weights).

The autograd of the varlen forward (its backward is the bwd op) is registered with the C++ op's
in fastattn/ops/packed_attention.py, which reaches these ops through its _triton_ops().
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn.ops.errors import FastattnTypeError, FastattnValueError
from fastattn.triton_kernels.attention import (
    _INTERPRETED,
    Sequences,
    Strides,
    _head_block,
    attention_bwd_launch,
    attention_fwd_launch,
    attention_split_combine,
)

# Split-KV decode: at most this many queries per sequence (the grid has too few query blocks to
# fill the GPU), at least this many keys per split (fewer would cost more in the merge than the
# parallelism gains), at most this many splits. The interpreter splits small caches so that the
# tests exercise the path; it has no SMs to count (_INTERPRETER_SMS stands in).
_SPLIT_MAX_QUERIES = 64
_MIN_KEYS_PER_SPLIT = 16 if _INTERPRETED else 256
_MAX_SPLITS = 16
_INTERPRETER_SMS = 4
_APPEND_BLOCK_L = 16


@triton.jit
def _kv_cache_append_kernel(
    KNew, VNew, KCache, VCache, CacheSeqlens, BlockTable,
    stride_nkb, stride_nkh, stride_nkl, stride_nke,
    stride_nvb, stride_nvh, stride_nvl, stride_nve,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_table_b, block_size, capacity, num_blocks,
    Hk, L_new, E, Ev,
    PAGED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """Writes k_new / v_new rows [t0, t0 + BLOCK_L) of one sequence and kv head into its cache
    at positions cache_seqlens[b] + t, through the same row mapping the attention kernel reads
    (_kv_rows). Positions at or past the capacity, or in a block outside [0, num_blocks), are
    not written (never out of bounds)."""
    offs_t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // Hk).to(tl.int64)
    kvh = pid_bh % Hk
    pos = tl.load(CacheSeqlens + b64) + offs_t  # [BLOCK_L]
    ok = (offs_t < L_new) & (pos < capacity) & (pos >= 0)
    pos = tl.where(ok, pos, 0)
    k_rows = pos.to(tl.int64) * stride_kn
    v_rows = pos.to(tl.int64) * stride_vn
    k_base = KCache + kvh * stride_kh
    v_base = VCache + kvh * stride_vh
    if PAGED:
        block = tl.load(BlockTable + b64 * stride_table_b + pos // block_size, mask=ok,
                        other=0).to(tl.int64)
        ok = ok & (block >= 0) & (block < num_blocks)
        row = (pos % block_size).to(tl.int64)
        k_rows = block * stride_kb + row * stride_kn
        v_rows = block * stride_vb + row * stride_vn
    else:
        k_base += b64 * stride_kb
        v_base += b64 * stride_vb
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    k_ok = ok[:, None] & (offs_e[None, :] < E)
    k = tl.load(KNew + b64 * stride_nkb + kvh * stride_nkh + offs_t[:, None] * stride_nkl
                + offs_e[None, :] * stride_nke, mask=k_ok)  # [BLOCK_L, BLOCK_E]
    tl.store(k_base + k_rows[:, None] + offs_e[None, :] * stride_ke, k, mask=k_ok)
    v_ok = ok[:, None] & (offs_ev[None, :] < Ev)
    v = tl.load(VNew + b64 * stride_nvb + kvh * stride_nvh + offs_t[:, None] * stride_nvl
                + offs_ev[None, :] * stride_nve, mask=v_ok)  # [BLOCK_L, BLOCK_EV]
    tl.store(v_base + v_rows[:, None] + offs_ev[None, :] * stride_ve, v, mask=v_ok)


def _check_cu_seqlens(name: str, cu: torch.Tensor, device: torch.device, batch: int | None):
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
        raise FastattnValueError(
            f"attention_varlen: {name} must be a 1-D int32 tensor [B + 1], got {cu.dtype} "
            f"{tuple(cu.shape)}"
        )
    if batch is not None and cu.shape[0] != batch + 1:
        raise FastattnValueError(
            f"attention_varlen: {name} must have {batch + 1} entries (as cu_seqlens_q), got "
            f"{cu.shape[0]}"
        )
    if cu.device != device:
        raise FastattnValueError(f"attention_varlen: {name} is on {cu.device}, q on {device}")


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes) -> None:
    """Shape, dtype and device checks (no values: they would need a host sync)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise FastattnValueError(
                f"attention_varlen: {name} must be [tokens, heads, dim], got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise FastattnTypeError(
                f"attention_varlen: {name} is {t.dtype} on {t.device}, q is {q.dtype} on "
                f"{q.device}"
            )
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or k.shape[2] != q.shape[2]:
        raise FastattnValueError(
            f"attention_varlen: k {tuple(k.shape)} / v {tuple(v.shape)} must be [total_k, Hk, "
            f"{q.shape[2]}] / [total_k, Hk, Ev]"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise FastattnValueError(
            f"attention_varlen: q heads {q.shape[1]} must be a multiple of k heads {k.shape[1]}"
        )
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, None)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, cu_seqlens_q.shape[0] - 1)
    _check_slopes("attention_varlen", alibi_slopes, cu_seqlens_q.shape[0] - 1, q)


def _check_slopes(fn: str, alibi_slopes, batch: int, q: torch.Tensor) -> None:
    Hq = q.shape[1]  # q [total_q, Hq, E] packed, [B, Hq, Lq, E] for the KV cache
    if alibi_slopes is None:
        return
    if alibi_slopes.dtype != torch.float32 or alibi_slopes.shape not in (
        torch.Size([Hq]), torch.Size([batch, Hq])
    ) or alibi_slopes.device != q.device or alibi_slopes.stride(-1) != 1:
        raise FastattnValueError(
            f"{fn}: alibi_slopes must be float32 [{Hq}] or [{batch}, {Hq}] on {q.device} with "
            f"a unit last stride, got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}"
        )


@torch.library.triton_op("fastattn::attention_varlen_fwd_triton", mutates_args=())
def attention_varlen_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    rng_seed: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [total_q, Hq, Ev] (q's dtype, contiguous), lse float32 [Hq, total_q] (contiguous).

    Per sequence b: attention_fwd's math with L = Lq_b, S = Sk_b (bottom-right offset
    Sk_b - Lq_b). The offsets' values are trusted (max_seqlen_* >= every length, cu_seqlens
    non-decreasing from 0 to total): checking them needs a host sync, the ops layer's choice.
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    total_q, Hq, E = q.shape
    Hk, Ev = k.shape[1], v.shape[2]
    out = torch.empty((total_q, Hq, Ev), device=q.device, dtype=q.dtype)
    lse = torch.empty((Hq, total_q), device=q.device, dtype=torch.float32)
    batch = cu_seqlens_q.shape[0] - 1
    if batch * Hq * max_seqlen_q == 0 or total_q == 0:
        return out, lse
    strides = Strides(q=Strides.packed(q), k=Strides.packed(k), v=Strides.packed(v),
                      out=(*Strides.packed(out)[:3], 0), lse=(0, total_q, 0))
    attention_fwd_launch(
        q, k, v, out, lse, strides, B=batch, Hq=Hq, Hk=Hk, L=max_seqlen_q, S=max_seqlen_k, E=E,
        Ev=Ev, attn_mask=None, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        rng_seed=rng_seed, scale=scale, window_left=window_left, window_right=window_right,
        bottom_right=bottom_right, softcap=softcap, dropout_cols=max_seqlen_k,
        sequences=Sequences(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k),
    )
    return out, lse


@torch.library.triton_op("fastattn::attention_varlen_bwd_triton", mutates_args=())
def attention_varlen_bwd_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    rng_seed: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv: contiguous, shapes and dtypes of q, k, v (dk/dv summed over GQA groups);
    lse is the forward's float32 [Hq, total_q]. Keys no query sees get zero gradients."""
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    total_q, Hq, E = q.shape
    total_k, Hk, Ev = k.shape[0], k.shape[1], v.shape[2]
    dq = torch.empty((total_q, Hq, E), device=q.device, dtype=q.dtype)
    dk = torch.empty((total_k, Hk, E), device=q.device, dtype=k.dtype)
    dv = torch.empty((total_k, Hk, Ev), device=q.device, dtype=v.dtype)
    batch = cu_seqlens_q.shape[0] - 1
    if batch * max(max_seqlen_q, max_seqlen_k) == 0 or total_q + total_k == 0:
        return dq, dk, dv
    packed = Strides.packed
    strides = {
        "q": packed(q), "k": packed(k), "v": packed(v), "grad_out": packed(grad_out),
        "out": packed(out), "dq": packed(dq)[:3], "dk": packed(dk)[:3], "dv": packed(dv)[:3],
        "lse": (0, total_q),
    }
    attention_bwd_launch(
        grad_out, q, k, v, out, lse.contiguous(), dq, dk, dv, None, strides=strides, B=batch,
        Hq=Hq, Hk=Hk, L=max_seqlen_q, S=max_seqlen_k, E=E, Ev=Ev, rows_q=Hq * total_q,
        attn_mask=None, alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_seed=rng_seed,
        scale=scale, window_left=window_left, window_right=window_right,
        bottom_right=bottom_right, softcap=softcap, dropout_cols=max_seqlen_k,
        sequences=Sequences(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k),
    )
    return dq, dk, dv


def _check_kv_cache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table,
                    cache_batch_idx, alibi_slopes) -> None:
    """Every check that needs no value from memory, before anything is written."""
    fn = "attention_kv_cache"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
                    ("v_new", v_new)):
        if t is None:
            continue
        if t.dim() != 4:
            raise FastattnValueError(f"{fn}: {name} must be 4-D, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise FastattnTypeError(
                f"{fn}: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}"
            )
        # The append kernel reads k_new / v_new through all four strides; q and the caches
        # are read (and written) in rows.
        if t.stride(-1) != 1 and t.shape[-1] > 1 and name not in ("k_new", "v_new"):
            raise FastattnValueError(f"{fn}: {name} must have a unit last stride")
    B, Hq, _, E = q.shape
    Hk = k_cache.shape[1]
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != E:
        raise FastattnValueError(
            f"{fn}: k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must be "
            f"[N, Hk, S, {E}] / [N, Hk, S, Ev]"
        )
    if Hk == 0 or Hq % Hk:
        raise FastattnValueError(f"{fn}: q heads {Hq} must be a multiple of cache heads {Hk}")
    for name, t, shape in (("cache_seqlens", cache_seqlens, (B,)),
                           ("cache_batch_idx", cache_batch_idx, (B,))):
        if t is not None and (t.dtype != torch.int32 or tuple(t.shape) != shape
                              or t.device != q.device):
            raise FastattnValueError(
                f"{fn}: {name} must be int32 {list(shape)} on {q.device}, got {t.dtype} "
                f"{tuple(t.shape)} on {t.device}"
            )
    if block_table is not None:
        if cache_batch_idx is not None:
            raise FastattnValueError(f"{fn}: cache_batch_idx must be None with block_table")
        if (block_table.dtype != torch.int32 or block_table.dim() != 2
                or block_table.shape[0] != B or block_table.device != q.device
                or (block_table.stride(1) != 1 and block_table.shape[1] > 1)):
            raise FastattnValueError(
                f"{fn}: block_table must be int32 [{B}, max_blocks] on {q.device} with a unit "
                f"last stride, got {block_table.dtype} {tuple(block_table.shape)}"
            )
    elif cache_batch_idx is None and k_cache.shape[0] < B:
        raise FastattnValueError(
            f"{fn}: the cache holds {k_cache.shape[0]} sequences, q has {B} (cache_batch_idx "
            "None: sequence b uses cache row b)"
        )
    if (k_new is None) != (v_new is None):
        raise FastattnValueError(f"{fn}: pass both k_new and v_new, or neither")
    if k_new is not None:
        L_new = k_new.shape[2]
        for name, new, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            if new.shape != (B, Hk, L_new, cache.shape[3]):
                raise FastattnValueError(
                    f"{fn}: {name} must be [{B}, {Hk}, L_new={L_new}, {cache.shape[3]}], got "
                    f"{tuple(new.shape)}"
                )
    _check_slopes(fn, alibi_slopes, B, q)


def _num_splits(programs: int, Lq: int, capacity: int, device: torch.device) -> int:
    """Key splits per (sequence, head) for split-KV decode: enough programs for two waves of
    the GPU's SMs, each split at least _MIN_KEYS_PER_SPLIT keys of the capacity."""
    if Lq > _SPLIT_MAX_QUERIES:
        return 1
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else _INTERPRETER_SMS)
    wanted = -(-2 * sms // programs)
    return max(1, min(wanted, capacity // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


@torch.library.triton_op(
    "fastattn::attention_kv_cache_fwd_triton", mutates_args=("k_cache", "v_cache")
)
def attention_kv_cache_fwd_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    block_table: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Appends k_new / v_new at cache_seqlens (in place), then attention of q [B, Hq, Lq, E]
    over positions [0, cache_seqlens[b] + L_new) of each sequence's cache.

    Returns out [B, Hq, Lq, Ev] (q's dtype, contiguous) and lse float32 [B, Hq, Lq]. Every
    shape, dtype and device is checked before the append. Values are not (that needs a host
    sync), but nothing outside the caches is read or written: positions at or past the
    capacity (S_max, or max_blocks * block_size) are skipped, and so are the blocks (cache rows)
    whose block_table (cache_batch_idx) entry lies outside the cache; such a block's keys
    count as NaN, so a query that sees one of them gets a NaN out row and lse.
    """
    _check_kv_cache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table,
                    cache_batch_idx, alibi_slopes)
    B, Hq, Lq, E = q.shape
    Hk, Ev = k_cache.shape[1], v_cache.shape[3]
    L_new = 0 if k_new is None else k_new.shape[2]
    # A contiguous cache indexed by cache_batch_idx is a paged one with one S_max-row block per
    # sequence: the kernels have one indirection path for both.
    table = block_table if block_table is not None else (
        cache_batch_idx[:, None] if cache_batch_idx is not None else None)
    block_size = k_cache.shape[2]
    capacity = block_size * (table.shape[1] if table is not None else 1)
    if B * Hk * L_new > 0:
        append_grid = (triton.cdiv(L_new, _APPEND_BLOCK_L), B * Hk)
        torch.library.wrap_triton(_kv_cache_append_kernel)[append_grid](
            k_new, v_new, k_cache, v_cache, cache_seqlens, table if table is not None else q,
            *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
            table.stride(0) if table is not None else 0, block_size, capacity, k_cache.shape[0],
            Hk, L_new, E, Ev, PAGED=table is not None, BLOCK_L=_APPEND_BLOCK_L,
            BLOCK_E=_head_block(E), BLOCK_EV=_head_block(Ev),
        )
    out = torch.empty((B, Hq, Lq, Ev), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    if B * Hq * Lq == 0:
        return out, lse
    seqlens_k = (cache_seqlens + L_new).clamp(0, capacity).to(torch.int32)
    num_splits = _num_splits(B * Hq, Lq, capacity, q.device)
    if num_splits > 1:
        part_out = torch.empty((num_splits, B, Hq, Lq, Ev), device=q.device,
                               dtype=torch.float32)
        part_lse = torch.empty((num_splits, B, Hq, Lq), device=q.device, dtype=torch.float32)
        dest_out, dest_lse = part_out, part_lse
        out_strides = (*part_out.stride()[1:4], part_out.stride(0))
        lse_strides = (Hq * Lq, Lq, part_lse.stride(0))
    else:
        dest_out, dest_lse = out, lse
        out_strides = (*out.stride()[:3], 0)
        lse_strides = (Hq * Lq, Lq, 0)
    strides = Strides(q=q.stride(), k=k_cache.stride(), v=v_cache.stride(), out=out_strides,
                      lse=lse_strides)
    attention_fwd_launch(
        q, k_cache, v_cache, dest_out, dest_lse, strides, B=B, Hq=Hq, Hk=Hk, L=Lq, S=capacity,
        E=E, Ev=Ev, attn_mask=None, alibi_slopes=alibi_slopes, dropout_p=0.0, rng_seed=None,
        scale=scale, window_left=window_left, window_right=window_right,
        bottom_right=bottom_right, softcap=softcap, dropout_cols=capacity,
        sequences=Sequences(seqlens_k=seqlens_k, block_table=table, block_size=block_size,
                            num_blocks=k_cache.shape[0]),
        num_splits=num_splits,
    )
    if num_splits > 1:
        attention_split_combine(part_out.view(num_splits, B * Hq * Lq, Ev),
                                part_lse.view(num_splits, B * Hq * Lq), out, lse)
    return out, lse

