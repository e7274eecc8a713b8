"""Triton attention: fused forward and backward of the fastattn attention core ops.

Registered as ``fastattn::attention_fwd_triton`` and ``fastattn::attention_bwd_triton``
(torch.library.triton_op). Their arguments mirror ``fastattn::attention_fwd`` /
``fastattn::attention_bwd`` (fastattn/ops/_registry.py) name for name, with the same semantics:

- q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev], read through their strides; query head h
  reads kv head h // (Hq // Hk) (GQA without copying K/V).
- attn_mask: None, bool (True = may attend) or additive, a [B, Hq, L, S] view read tile by tile
  through its strides (0-stride broadcast dims are never materialized).
- alibi slopes [Hq] or [B, Hq]; sliding window with top-left or bottom-right alignment (causal is
  window_right = 0); key tiles outside the window are skipped by the loop bounds, not masked.
- softcap, dropout with the Philox4x32-10 stream of csrc/include/fastattn/philox.h (bit for bit).
- Softmax and every accumulation in float32; lse [B, Hq, L] float32, -inf for a row with no
  visible key, whose output row and gradients are 0.

The backward is three kernels: delta = rowsum(dO * O); dK/dV over key blocks (looping over the
query heads of a GQA group, so no atomics); dQ over query blocks, which also writes dmask.

The same kernels serve packed sequences and the KV cache (attention_varlen.py's ops) through
constexpr paths: VARLEN reads each sequence's rows from cu_seqlens, KEY_LENS its key count from
cache_seqlens, PAGED maps key positions through a block table; the forward can split the keys
of a (sequence, head) over programs (split-KV decode). Dense calls are batch row b = sequence b.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from fastattn.ops.errors import FastattnValueError

# Autotuning under the interpreter would run every config on the CPU: use one small config there.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# FASTATTN_TRITON_AUTOTUNE=0 keeps only the first config of each kernel: correctness runs on a
# GPU then compile each feature combination once instead of once per candidate config.
_AUTOTUNE = os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages), or the interpreter's single one."""
    if _INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in (shapes if _AUTOTUNE else shapes[:1])
    ]


def _prune_for_dtype(
    configs: list[triton.Config], named_args: dict, **kwargs
) -> list[triton.Config]:
    # fp32 dots run in full fp32 on FMA units: big tiles only cost registers and compile time.
    if named_args["Q"].dtype != torch.float32:
        return configs
    if max(kwargs["BLOCK_E"], kwargs["BLOCK_EV"]) > 128:
        # The FMA dots stage their operands in shared memory: at a 256 head block 64x64 tiles
        # need 279 KB for dK/dV (sm_90 has 227 KB, sm_80 163 KB), so no config would launch.
        m, n, warps, stages = _FP32_WIDE_HEAD_SHAPE
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)]
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return small or configs[:1]


# Ampere/Hopper candidates; the autotuner drops those that exceed shared memory for a head dim.
# (tests/triton_aot.py compiles every one of them for sm_80 and sm_90.)
_FWD_SHAPES = [
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3),
    (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 4), (128, 128, 8, 3),
]
_BWD_SHAPES = [
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2),
    (128, 128, 8, 2), (64, 64, 8, 4),
]
_FWD_CONFIGS = _configs(_FWD_SHAPES)
_BWD_CONFIGS = _configs(_BWD_SHAPES)
_DELTA_BLOCK_M = 16 if _INTERPRETED else 64
# The only fp32 config at head blocks above 128 (see _prune_for_dtype).
_FP32_WIDE_HEAD_SHAPE = (32, 32, 4, 1)
# Autotune per power-of-two bucket of the (longest) query and key lengths and per feature set
# (the flags change the kernel's cost): not per length, so that a new length, and every batch of
# packed sequences, reuses the config of its bucket instead of autotuning again (issue 16).
_TUNE_KEY = ["tune_len_q", "tune_len_k", "BLOCK_E", "BLOCK_EV", "HAS_MASK", "HAS_DROPOUT",
             "GROUP", "VARLEN"]
_PRUNE = {"early_config_prune": _prune_for_dtype}


@triton.jit
def _philox_uniform(seed, counter):
    """Philox4x32-10 uniforms in [0, 1) with 24 bits, as philox_uniform in philox.h.

    seed: int64 scalar; counter: int64 tile (the linear index of (b, h, i, j) in [B, Hq, L, S]).
    """
    c0 = counter.to(tl.uint32)  # low 32 bits (truncation)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    m0 = tl.full([], 0xD2511F53, tl.uint32)
    m1 = tl.full([], 0xCD9E8D57, tl.uint32)
    w0 = tl.full([], 0x9E3779B9, tl.uint32)
    w1 = tl.full([], 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _dropout_scale(seed, dropout_p, rows, dropout_cols, offs_n):
    """[BLOCK_M, BLOCK_N] float32: 1 / (1 - p) where the element is kept, 0 where dropped.

    rows: int64 [BLOCK_M] row indices of the lse layout; the Philox counter of (row, j) is
    row * dropout_cols + j: the linear index of (b, h, i, j) in [B, Hq, L, S] for dense calls
    (dropout_cols = S), and VARLEN_SPEC.md's ((h * total_q) + cu_seqlens_q[b] + i) *
    max_seqlen_k + j for packed ones (dropout_cols = max_seqlen_k).
    """
    counter = rows[:, None] * dropout_cols + offs_n[None, :]  # [BLOCK_M, BLOCK_N] int64
    keep = _philox_uniform(seed, counter) >= dropout_p
    return tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _dot(a, b, BF16_DOT_IN_FP32: tl.constexpr):
    """a @ b with a float32 accumulator.

    fp32 operands use input_precision="ieee" (no TF32), so fp32 accuracy holds; fp16/bf16
    operands use the default MMA path. No two ieee dots of one loop body share their left
    operand: that crashed LLVM for sm_90 in an LSTM kernel (tests/test_triton_compile.py).
    BF16_DOT_IN_FP32 is set only under the Triton interpreter, whose tl.dot multiplies the raw
    uint16 bits of bfloat16 operands (Triton 3.9); bf16 -> fp32 is exact, so this computes
    what the bf16 MMA computes (exact products, fp32 sums).
    """
    if BF16_DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_k_transposed(k_base, k_rows, key_ok, offs_e, stride_ke, E):
    """k^T tile [BLOCK_E, BLOCK_N], zero-padded: the right operand of every q . k^T product.

    k_rows: int64 [BLOCK_N] element offsets of the tile's keys from k_base (see _kv_rows);
    key_ok [BLOCK_N]: which of them to read (the others are 0).
    The forward and both backward kernels multiply the same [BLOCK_M, BLOCK_E] q tile by this
    same tile, so the backward recomputes the forward's scores bit for bit, and P = exp(s - lse)
    depends on that: with |s| ~ 1e4 one float32 ulp of s is 1e-3. The backward used to form
    q @ trans(k) instead, which the interpreter's BLAS sums in another order (a transposed
    operand): P, and so dv, came out 4e-3 off although the forward was exact (issue 18).
    """
    ptrs = k_base + k_rows[None, :] + offs_e[:, None] * stride_ke
    return tl.load(ptrs, mask=key_ok[None, :] & (offs_e[:, None] < E), other=0.0)


@triton.jit
def _kv_rows(
    offs_n, col_ok, table_row, block_size, num_blocks, stride_kb, stride_kn, stride_vb,
    stride_vn, PAGED: tl.constexpr,
):
    """(k_rows, v_rows, stored): int64 [BLOCK_N] element offsets of key positions offs_n in K
    and in V, and which of the positions (col_ok: those within the sequence) are in memory.

    Contiguous keys: position * row stride, from the sequence's first key. PAGED: position p
    lives in block table_row[p // block_size], row p % block_size, from K / V themselves (the
    block stride is the batch stride, so any layout with a unit last dim is read in place).
    A block id outside [0, num_blocks) (a wrong block table value: the host checks values only
    at the cost of a sync) is not stored: never read, its keys count as NaN (the forward).
    """
    k_rows = offs_n.to(tl.int64) * stride_kn
    v_rows = offs_n.to(tl.int64) * stride_vn
    stored = col_ok
    if PAGED:
        block = tl.load(table_row + offs_n // block_size, mask=col_ok, other=0).to(tl.int64)
        stored = col_ok & (block >= 0) & (block < num_blocks)
        row = (offs_n % block_size).to(tl.int64)
        k_rows = block * stride_kb + row * stride_kn
        v_rows = block * stride_vb + row * stride_vn
    return k_rows, v_rows, stored


@triton.jit
def _sequence_bounds(
    b, L, S, CuSeqlensQ, CuSeqlensK, SeqlensK, VARLEN: tl.constexpr, KEY_LENS: tl.constexpr,
):
    """(q_start, L_b, k_start, S_b) of sequence b: its first query and key row in the packed
    tensors and its lengths, read from the int32 offsets in memory (no host sync).

    Dense calls: 0, L, 0, S. VARLEN: from cu_seqlens_q / cu_seqlens_k [B + 1]. KEY_LENS (a KV
    cache): S_b = SeqlensK[b], the keys of sequence b starting at its own batch row or block.
    """
    q_start = 0
    k_start = 0
    seq_len_q = L
    seq_len_k = S
    if VARLEN:
        q_first = tl.load(CuSeqlensQ + b)
        seq_len_q = tl.load(CuSeqlensQ + b + 1) - q_first
        k_first = tl.load(CuSeqlensK + b)
        seq_len_k = tl.load(CuSeqlensK + b + 1) - k_first
        # int64 row offsets: total_tokens * row stride may pass 2**31.
        q_start = q_first.to(tl.int64)
        k_start = k_first.to(tl.int64)
    if KEY_LENS:
        seq_len_k = tl.load(SeqlensK + b)
    return q_start, seq_len_q, k_start, seq_len_k


@triton.jit
def _tanh(x):
    """tanh from exp (absolute error ~1e-7, which is what the scores need).

    libdevice.tanh is not portable here: the Triton interpreter has no implementation of it.
    """
    e = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]: no overflow for any x
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _score_tile(
    qk, offs_m, offs_n, L, S, offset, window_left, window_right, scale, softcap, slope,
    mask_base, stride_mm, stride_mn,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Scores of one [BLOCK_M, BLOCK_N] tile in the contract's order, -inf where not visible.

    qk: float32 q . k. Returns (s, tanh_s): tanh_s is tanh(s_scaled / softcap), needed by the
    backward for the softcap's derivative (a dummy when HAS_SOFTCAP is off).
    window_left/right are never negative here (the host turns "unbounded" into L + S).
    """
    rel = offs_n[None, :] - offs_m[:, None] - offset  # [BLOCK_M, BLOCK_N]
    in_bounds = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    visible = in_bounds & (rel >= -window_left) & (rel <= window_right)
    s = qk * scale
    tanh_s = s
    if HAS_SOFTCAP:
        tanh_s = _tanh(s / softcap)
        s = softcap * tanh_s
    if HAS_ALIBI:
        s += slope * rel.to(tl.float32)
    if HAS_MASK:
        mask_ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        if MASK_IS_BOOL:
            visible = visible & tl.load(mask_ptrs, mask=in_bounds, other=0).to(tl.int1)
        else:
            s += tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    s = tl.where(visible, s, float("-inf"))
    return s, tanh_s


@triton.jit
def _key_range(start_m, L, S, offset, window_left, window_right, BLOCK_M, BLOCK_N):
    """[lo, hi) of the key tiles holding a key visible to rows [start_m, start_m + BLOCK_M)."""
    last_m = tl.minimum(start_m + BLOCK_M, L) - 1
    lo = tl.maximum(start_m + offset - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(last_m + offset + window_right + 1, S)
    return lo, hi


@triton.jit
def _query_range(start_n, L, S, offset, window_left, window_right, BLOCK_M, BLOCK_N):
    """[lo, hi) of the query tiles with a row that sees a key in [start_n, start_n + BLOCK_N)."""
    last_n = tl.minimum(start_n + BLOCK_N, S) - 1
    lo = tl.maximum(start_n - offset - window_right, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(last_n - offset + window_left + 1, L)
    return lo, hi


@triton.autotune(
    configs=_FWD_CONFIGS, key=_TUNE_KEY + ["PAGED", "num_splits"], prune_configs_by=_PRUNE
)
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Mask, Slopes, Seed, Out, Lse, CuSeqlensQ, CuSeqlensK, SeqlensK, BlockTable,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb,
    stride_ob, stride_oh, stride_om, stride_o_split,
    stride_lse_b, stride_lse_h, stride_lse_split,
    stride_table_b, block_size, num_blocks,
    Hq, L, S, E, Ev, dropout_cols,
    scale, softcap, dropout_p, window_left, window_right, bottom_right,
    GROUP, num_splits, tune_len_q, tune_len_k,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, KEY_LENS: tl.constexpr, PAGED: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Out, Lse of one query block of one query head of one sequence (and one key split).

    Dense calls and KV caches (KEY_LENS, PAGED) index by batch row b; packed sequences (VARLEN)
    have a zero batch stride and start at their cu_seqlens row instead. With num_splits > 1
    (split-KV decode) program_id(2) takes its share of the key tiles and writes an unnormalized
    partial result (its own lse) at Out/Lse + split * stride_*_split, which
    _attention_split_combine_kernel merges. Programs past their sequence's end exit at once.
    """
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    b64 = b.to(tl.int64)
    q_start, seq_len_q, k_start, seq_len_k = _sequence_bounds(
        b, L, S, CuSeqlensQ, CuSeqlensK, SeqlensK, VARLEN, KEY_LENS
    )
    if start_m >= seq_len_q:
        return
    offset = (seq_len_k - seq_len_q) * bottom_right

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < seq_len_q
    rows = b64 * stride_lse_b + h * stride_lse_h + q_start + offs_m  # [BLOCK_M] lse rows

    q_ptrs = (Q + b64 * stride_qb + h * stride_qh + (q_start + offs_m)[:, None] * stride_qm
              + offs_e[None, :] * stride_qe)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    # q: [BLOCK_M, BLOCK_E]
    table_row = BlockTable + b64 * stride_table_b
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    if not PAGED:
        k_base += b64 * stride_kb + k_start * stride_kn
        v_base += b64 * stride_vb + k_start * stride_vn
    mask_base = Mask + b64 * stride_mb + h * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + b64 * stride_sb + h)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(s - m_i), un-dropped
    acc = tl.zeros([BLOCK_M, BLOCK_EV], tl.float32)

    lo, hi = _key_range(
        start_m, seq_len_q, seq_len_k, offset, window_left, window_right, BLOCK_M, BLOCK_N
    )
    # This split's share of the visible key tiles (all of them when num_splits == 1).
    split_tiles = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits)
    lo = lo + split * split_tiles * BLOCK_N
    hi = tl.minimum(hi, lo + split_tiles * BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < seq_len_k
        k_rows, v_rows, stored = _kv_rows(offs_n, col_ok, table_row, block_size, num_blocks,
                                          stride_kb, stride_kn, stride_vb, stride_vn, PAGED)
        k_t = _load_k_transposed(k_base, k_rows, stored, offs_e, stride_ke, E)
        qk = _dot(q, k_t, BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
        if PAGED:  # the key of a block outside the cache is NaN: a query that sees it is NaN
            qk = tl.where((col_ok & ~stored)[None, :], float("nan"), qk)
        s, _ = _score_tile(
            qk, offs_m, offs_n, seq_len_q, seq_len_k, offset, window_left, window_right, scale,
            softcap, slope, mask_base, stride_mm, stride_mn,
            HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = p * _dropout_scale(seed, dropout_p, rows, dropout_cols, offs_n)
        v_ptrs = v_base + v_rows[:, None] + offs_ev[None, :] * stride_ve
        # v: [BLOCK_N, BLOCK_EV]
        v = tl.load(v_ptrs, mask=stored[:, None] & (offs_ev[None, :] < Ev), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, BF16_DOT_IN_FP32)
        m_i = m_new

    # l_i is 0 only on rows without a visible key (acc is 0 there too); a NaN score (from q, k
    # or v) makes l_i NaN, and the row and its lse NaN, as in torch.
    no_keys = l_i == 0.0
    out = acc / tl.where(no_keys, 1.0, l_i)[:, None]
    lse = tl.where(no_keys, float("-inf"), m_i + tl.log(tl.where(no_keys, 1.0, l_i)))
    o_ptrs = (Out + split * stride_o_split + b64 * stride_ob + h * stride_oh
              + (q_start + offs_m)[:, None] * stride_om + offs_ev[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_ev[None, :] < Ev))
    tl.store(Lse + split * stride_lse_split + rows, lse, mask=row_ok)


@triton.jit
def _attention_split_combine_kernel(
    PartOut, PartLse, Out, Lse, rows_total, num_splits, Ev,
    BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merges split-KV partial results: Out [rows, Ev], Lse [rows] from PartOut float32
    [num_splits, rows, Ev] and PartLse [num_splits, rows] (rows = B * Hq * L, contiguous).

    lse = log sum_s exp(lse_s); out = sum_s exp(lse_s - lse) * out_s. A row no split saw a key
    of keeps lse = -inf and out = 0; a NaN lse_s makes the row NaN, as the unsplit kernel does.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < rows_total
    ok = row_ok[:, None] & (offs_ev[None, :] < Ev)
    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(PartLse + s * rows_total + offs_m, mask=row_ok, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse_s)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(PartLse + s * rows_total + offs_m, mask=row_ok, other=float("-inf"))
        weight = tl.exp(lse_s - lse_max)  # [BLOCK_M]: 0 for a split without keys, NaN stays
        out_s = tl.load(PartOut + (s * rows_total + offs_m[:, None]).to(tl.int64) * Ev
                        + offs_ev[None, :], mask=ok, other=0.0)  # [BLOCK_M, BLOCK_EV]
        total += weight
        acc += weight[:, None] * out_s
    no_keys = total == 0.0
    out = acc / tl.where(no_keys, 1.0, total)[:, None]
    lse = tl.where(no_keys, float("-inf"), lse_max + tl.log(tl.where(no_keys, 1.0, total)))
    tl.store(Out + offs_m[:, None].to(tl.int64) * Ev + offs_ev[None, :],
             out.to(Out.dtype.element_ty), mask=ok)
    tl.store(Lse + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    Out, dOut, Delta,
    stride_ob, stride_oh, stride_om, stride_oe,
    stride_dob, stride_doh, stride_dom, stride_doe,
    Hq, L, Ev,
    BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_e dO * O (float32), the row term of dS = P * (dP - delta).

    Packed sequences run it as one batch of L = total_q rows: delta then has lse's [Hq, total_q]
    layout, and no row needs to know its sequence.
    """
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    ok = (offs_m[:, None] < L) & (offs_ev[None, :] < Ev)
    o = tl.load(Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                + offs_ev[None, :] * stride_oe, mask=ok, other=0.0)  # [BLOCK_M, BLOCK_EV]
    do = tl.load(dOut + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_ev[None, :] * stride_doe, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _probabilities(
    s, lse_ptrs, row_ok,
):
    """P = exp(s - lse) for one tile; rows with lse = -inf (nothing visible) get P = 0."""
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))  # [BLOCK_M]
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return tl.exp(s - lse[:, None])


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, Mask, Slopes, Seed, dK, dV, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_dob, stride_doh, stride_dom, stride_doe,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lse_b, stride_lse_h,
    Hq, Hk, L, S, E, Ev, dropout_cols,
    scale, softcap, dropout_p, window_left, window_right, bottom_right,
    GROUP, tune_len_q, tune_len_k,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one kv head, summed over the GROUP query heads that read it."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // Hk
    kvh = pid_bh % Hk
    b64 = b.to(tl.int64)
    q_start, seq_len_q, k_start, seq_len_k = _sequence_bounds(
        b, L, S, CuSeqlensQ, CuSeqlensK, CuSeqlensK, VARLEN, False
    )
    if start_n >= seq_len_k:
        return
    offset = (seq_len_k - seq_len_q) * bottom_right

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    col_ok = offs_n < seq_len_k
    k_ok = col_ok[:, None] & (offs_e[None, :] < E)
    v_ok = col_ok[:, None] & (offs_ev[None, :] < Ev)
    k_rows, v_rows, _ = _kv_rows(offs_n, col_ok, K, 1, 0, stride_kb, stride_kn, stride_vb,
                                 stride_vn, False)
    k_t = _load_k_transposed(K + b64 * stride_kb + kvh * stride_kh + k_start * stride_kn, k_rows,
                             col_ok, offs_e, stride_ke, E)  # [BLOCK_E, BLOCK_N]
    v = tl.load(V + b64 * stride_vb + kvh * stride_vh + k_start * stride_vn + v_rows[:, None]
                + offs_ev[None, :] * stride_ve, mask=v_ok, other=0.0)  # [BLOCK_N, BLOCK_EV]
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    dk = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], tl.float32)
    lo, hi = _query_range(
        start_n, seq_len_q, seq_len_k, offset, window_left, window_right, BLOCK_M, BLOCK_N
    )
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + b64 * stride_sb + h)
        row_base = b64 * stride_lse_b + h * stride_lse_h + q_start  # of lse and delta
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qm
        do_base = dOut + b64 * stride_dob + h * stride_doh + q_start * stride_dom
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < seq_len_q
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                        mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)  # [M, E]
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                         mask=row_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [M, Ev]
            qk = _dot(q, k_t, BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
            s, tanh_s = _score_tile(
                qk, offs_m, offs_n, seq_len_q, seq_len_k, offset, window_left, window_right,
                scale, softcap, slope, Mask + b64 * stride_mb + h * stride_mh, stride_mm,
                stride_mn, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP,
            )
            p = _probabilities(s, Lse + row_base + offs_m, row_ok)  # [BLOCK_M, BLOCK_N]
            dp = _dot(do, tl.trans(v), BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
            p_dropped = p
            if HAS_DROPOUT:
                keep_scale = _dropout_scale(seed, dropout_p, row_base + offs_m, dropout_cols,
                                            offs_n)
                p_dropped = p * keep_scale
                dp = dp * keep_scale
            dv += _dot(tl.trans(p_dropped.to(do.dtype)), do, BF16_DOT_IN_FP32)
            delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)  # [BLOCK_M]
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - tanh_s * tanh_s)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, BF16_DOT_IN_FP32)

    rows = (k_start + offs_n).to(tl.int64)
    dk_ptrs = (dK + b64 * stride_dkb + kvh * stride_dkh + rows[:, None] * stride_dkn
               + offs_e[None, :])
    tl.store(dk_ptrs, (dk * scale).to(dK.dtype.element_ty), mask=k_ok)
    dv_ptrs = (dV + b64 * stride_dvb + kvh * stride_dvh + rows[:, None] * stride_dvn
               + offs_ev[None, :])
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=v_ok)


@triton.autotune(
    configs=_BWD_CONFIGS, key=_TUNE_KEY + ["MASK_GRAD"], prune_configs_by=_PRUNE
)
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, Mask, Slopes, Seed, dQ, dMask, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_dob, stride_doh, stride_dom, stride_doe,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lse_b, stride_lse_h,
    Hq, L, S, E, Ev, dropout_cols,
    scale, softcap, dropout_p, window_left, window_right, bottom_right,
    GROUP, tune_len_q, tune_len_k,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASK_GRAD: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one query head; dmask (= dS) of its visible key tiles
    (dense calls only: dmask is [B, Hq, L, S] contiguous, indexed by the lse row)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    b64 = b.to(tl.int64)
    q_start, seq_len_q, k_start, seq_len_k = _sequence_bounds(
        b, L, S, CuSeqlensQ, CuSeqlensK, CuSeqlensK, VARLEN, False
    )
    if start_m >= seq_len_q:
        return
    offset = (seq_len_k - seq_len_q) * bottom_right

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < seq_len_q
    q_ok = row_ok[:, None] & (offs_e[None, :] < E)
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + q_rows[:, None] * stride_qm
                + offs_e[None, :] * stride_qe, mask=q_ok, other=0.0)  # [BLOCK_M, BLOCK_E]
    do = tl.load(dOut + b64 * stride_dob + h * stride_doh + q_rows[:, None] * stride_dom
                 + offs_ev[None, :] * stride_doe,
                 mask=row_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [BLOCK_M, BLOCK_EV]
    rows = b64 * stride_lse_b + h * stride_lse_h + q_rows  # [BLOCK_M] lse rows
    delta = tl.load(Delta + rows, mask=row_ok, other=0.0)  # [BLOCK_M]
    k_base = K + b64 * stride_kb + kvh * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + kvh * stride_vh + k_start * stride_vn
    mask_base = Mask + b64 * stride_mb + h * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + b64 * stride_sb + h)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    dq = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    lo, hi = _key_range(
        start_m, seq_len_q, seq_len_k, offset, window_left, window_right, BLOCK_M, BLOCK_N
    )
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < seq_len_k
        k_rows, v_rows, _ = _kv_rows(offs_n, col_ok, K, 1, 0, stride_kb, stride_kn, stride_vb,
                                     stride_vn, False)
        k_t = _load_k_transposed(k_base, k_rows, col_ok, offs_e, stride_ke, E)
        v = tl.load(v_base + v_rows[:, None] + offs_ev[None, :] * stride_ve,
                    mask=col_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [N, Ev]
        qk = _dot(q, k_t, BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
        s, tanh_s = _score_tile(
            qk, offs_m, offs_n, seq_len_q, seq_len_k, offset, window_left, window_right, scale,
            softcap, slope, mask_base, stride_mm, stride_mn,
            HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP,
        )
        p = _probabilities(s, Lse + rows, row_ok)  # [BLOCK_M, BLOCK_N]
        dp = _dot(do, tl.trans(v), BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:
            dp = dp * _dropout_scale(seed, dropout_p, rows, dropout_cols, offs_n)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:
            dmask_ptrs = dMask + rows[:, None] * S + offs_n[None, :]
            tl.store(dmask_ptrs, ds, mask=row_ok[:, None] & col_ok[None, :])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), BF16_DOT_IN_FP32)

    dq_ptrs = (dQ + b64 * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqm
               + offs_e[None, :])
    tl.store(dq_ptrs, (dq * scale).to(dQ.dtype.element_ty), mask=q_ok)


def _common_args(
    q: torch.Tensor,
    L: int,
    S: int,
    attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    rng_seed: torch.Tensor | None,
    window_left: int,
    window_right: int,
    bottom_right: bool,
) -> tuple[dict, dict, list]:
    """Kernel arguments shared by the forward and both backward kernels.

    L, S: the (longest) query and key lengths. Returns (pointers: Mask, Slopes, Seed),
    (scalars and flags), and the mask's four strides plus the slopes' batch stride. Absent
    tensors are replaced by q (never read: the flag is off).
    """
    if dropout_p > 0.0 and rng_seed is None:
        raise FastattnValueError(
            "fastattn triton attention: dropout_p > 0 needs rng_seed (an int64 scalar tensor)"
        )
    has_mask = attn_mask is not None
    has_alibi = alibi_slopes is not None
    has_dropout = dropout_p > 0.0
    mask = attn_mask if has_mask else q
    slopes = alibi_slopes if has_alibi else q
    # The seed is read inside the kernel (no host sync); CUDA kernels need it on the device.
    seed = rng_seed.to(device=q.device, dtype=torch.int64).reshape(1) if has_dropout else q
    mask_strides = list(attn_mask.stride()) if has_mask else [0, 0, 0, 0]
    slopes_stride_b = alibi_slopes.stride(0) if has_alibi and alibi_slopes.dim() == 2 else 0
    # An unbounded side becomes L + S: wider than any j - i - offset, so no branch in the kernel.
    unbounded = L + S
    scalars = {
        "window_left": window_left if window_left >= 0 else unbounded,
        "window_right": window_right if window_right >= 0 else unbounded,
        "bottom_right": int(bottom_right),
        "dropout_p": float(dropout_p),
    }
    flags = {
        "HAS_MASK": has_mask,
        "MASK_IS_BOOL": has_mask and attn_mask.dtype == torch.bool,
        "HAS_ALIBI": has_alibi,
        "HAS_DROPOUT": has_dropout,
    }
    return {"Mask": mask, "Slopes": slopes, "Seed": seed}, {**scalars, **flags}, [
        *mask_strides, slopes_stride_b
    ]


def _bf16_dot_in_fp32(q: torch.Tensor) -> bool:
    # Works around the interpreter's bfloat16 tl.dot (see _dot); never on a GPU.
    return _INTERPRETED and q.dtype == torch.bfloat16


def _head_block(dim: int) -> int:
    # tl.dot needs every tile dimension >= 16; padding columns are masked on load and store.
    return max(16, triton.next_power_of_2(dim))


def length_bucket(n: int) -> int:
    """The autotune key of a (longest) length: the power of two at or above it (0 -> 1).

    A symbolic length (torch.compile with dynamic shapes) is passed as it is: rounding it here
    would specialize the graph on its value; the kernels' autotuner sees the runtime value."""
    if isinstance(n, torch.SymInt):
        return n
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass
class Sequences:
    """Where each sequence's rows are, for the kernels' VARLEN / KEY_LENS / PAGED paths.

    Dense calls leave the defaults: batch row b holds sequence b, L queries and S keys.
    cu_seqlens_q/k: int32 [B + 1] offsets of packed rows (VARLEN). seqlens_k: int32 [B] key
    counts of a KV cache (KEY_LENS). block_table: int32 [B, max_blocks] with block_size rows
    per block (PAGED: K/V's batch stride is then the block stride).
    """

    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    seqlens_k: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    block_size: int = 1
    num_blocks: int = 0  # the blocks in K / V: table entries outside [0, num_blocks) are unread

    def kernel_args(self, dummy: torch.Tensor) -> tuple[list, dict]:
        """(the four pointers, the table's row stride, block size and block count, the three
        flags)."""
        table = self.block_table
        pointers = [t if t is not None else dummy for t in (
            self.cu_seqlens_q, self.cu_seqlens_k, self.seqlens_k, table)]
        scalars = [table.stride(0) if table is not None else 0, self.block_size, self.num_blocks]
        flags = {"VARLEN": self.cu_seqlens_q is not None, "KEY_LENS": self.seqlens_k is not None,
                 "PAGED": table is not None}
        return pointers + scalars, flags


@dataclasses.dataclass
class Strides:
    """Element strides of the forward's operands as the kernels index them.

    q, k, v: (batch, head, row, dim); a packed tensor [total, H, D] has batch stride 0 and its
    rows start at cu_seqlens[b]. out: (batch, head, row, split); lse: (batch, head, split), its
    rows contiguous (the row index of (b, h, i) also numbers dropout's counters).
    """

    q: tuple[int, int, int, int]
    k: tuple[int, int, int, int]
    v: tuple[int, int, int, int]
    out: tuple[int, int, int, int]
    lse: tuple[int, int, int]

    @staticmethod
    def packed(t: torch.Tensor) -> tuple[int, int, int, int]:
        """(batch, head, row, dim) strides of a packed [total, H, D] tensor."""
        return 0, t.stride(1), t.stride(0), t.stride(2)


def attention_fwd_launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    strides: Strides, *, B: int, Hq: int, Hk: int, L: int, S: int, E: int, Ev: int,
    attn_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None, dropout_p: float,
    rng_seed: torch.Tensor | None, scale: float, window_left: int, window_right: int,
    bottom_right: bool, softcap: float, dropout_cols: int, sequences: Sequences,
    num_splits: int = 1,
) -> None:
    """Launches _attention_fwd_kernel over B sequences x Hq heads (x num_splits key splits).

    L, S: the longest query / key length (the grid is sized from L; shorter sequences' extra
    programs exit). Out / lse are written through ``strides`` (partial results when splitting).
    """
    ptrs, options, extra_strides = _common_args(
        q, L, S, attn_mask, alibi_slopes, dropout_p, rng_seed, window_left, window_right,
        bottom_right,
    )
    seq_args, seq_flags = sequences.kernel_args(q)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(L, meta["BLOCK_M"]), B * Hq, num_splits)

    torch.library.wrap_triton(_attention_fwd_kernel)[grid](
        q, k, v, ptrs["Mask"], ptrs["Slopes"], ptrs["Seed"], out, lse, *seq_args[:4],
        *strides.q, *strides.k, *strides.v, *extra_strides, *strides.out, *strides.lse,
        *seq_args[4:],
        Hq, L, S, E, Ev, dropout_cols,
        float(scale), float(softcap), options["dropout_p"],
        options["window_left"], options["window_right"], options["bottom_right"],
        Hq // Hk, num_splits, length_bucket(L), length_bucket(S),
        HAS_MASK=options["HAS_MASK"], MASK_IS_BOOL=options["MASK_IS_BOOL"],
        HAS_ALIBI=options["HAS_ALIBI"], HAS_DROPOUT=options["HAS_DROPOUT"],
        HAS_SOFTCAP=softcap > 0.0, **seq_flags, BLOCK_E=_head_block(E), BLOCK_EV=_head_block(Ev),
        BF16_DOT_IN_FP32=_bf16_dot_in_fp32(q),
    )


def attention_split_combine(
    part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """out / lse (contiguous, rows = out.numel() // Ev) from float32 split partials
    [num_splits, rows, Ev] / [num_splits, rows]."""
    num_splits, rows, Ev = part_out.shape
    grid = (triton.cdiv(rows, _DELTA_BLOCK_M),)
    torch.library.wrap_triton(_attention_split_combine_kernel)[grid](
        part_out, part_lse, out, lse, rows, num_splits, Ev,
        BLOCK_EV=_head_block(Ev), BLOCK_M=_DELTA_BLOCK_M,
    )


def attention_bwd_launch(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    dmask: torch.Tensor | None, *, strides: dict[str, tuple[int, ...]], B: int, Hq: int,
    Hk: int, L: int, S: int, E: int, Ev: int, rows_q: int,
    attn_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None, dropout_p: float,
    rng_seed: torch.Tensor | None, scale: float, window_left: int, window_right: int,
    bottom_right: bool, softcap: float, dropout_cols: int, sequences: Sequences,
) -> None:
    """The three backward kernels: delta, dK/dV, dQ (and dmask when ``dmask`` is given).

    strides: (batch, head, row, dim) of "q", "k", "v", "grad_out", "out" and (batch, head, row)
    of "dq", "dk", "dv"; "lse": (batch, head) of lse's contiguous rows. rows_q: Hq * L dense,
    Hq * total_q packed (delta has lse's layout). L, S: the longest query / key length.
    """
    delta = torch.empty_like(lse)
    ptrs, options, extra_strides = _common_args(
        q, L, S, attn_mask, alibi_slopes, dropout_p, rng_seed, window_left, window_right,
        bottom_right,
    )
    block_e, block_ev = _head_block(E), _head_block(Ev)
    seq_args, seq_flags = sequences.kernel_args(q)
    # Delta in lse's layout: a packed batch is one batch of total_q rows (rows_q // Hq).
    delta_rows = rows_q // Hq
    delta_batches = B if not seq_flags["VARLEN"] else 1
    if delta_rows > 0:
        delta_grid = (triton.cdiv(delta_rows, _DELTA_BLOCK_M), delta_batches * Hq)
        torch.library.wrap_triton(_attention_bwd_delta_kernel)[delta_grid](
            out, grad_out, delta, *strides["out"], *strides["grad_out"], Hq, delta_rows, Ev,
            BLOCK_EV=block_ev, BLOCK_M=_DELTA_BLOCK_M,
        )
    scalars = (
        Hq, L, S, E, Ev, dropout_cols, float(scale), float(softcap), options["dropout_p"],
        options["window_left"], options["window_right"], options["bottom_right"], Hq // Hk,
        length_bucket(L), length_bucket(S),
    )
    flags = {
        "HAS_MASK": options["HAS_MASK"], "MASK_IS_BOOL": options["MASK_IS_BOOL"],
        "HAS_ALIBI": options["HAS_ALIBI"], "HAS_DROPOUT": options["HAS_DROPOUT"],
        "HAS_SOFTCAP": softcap > 0.0, "VARLEN": seq_flags["VARLEN"], "BLOCK_E": block_e,
        "BLOCK_EV": block_ev, "BF16_DOT_IN_FP32": _bf16_dot_in_fp32(q),
    }
    inputs = (*strides["q"], *strides["k"], *strides["v"], *strides["grad_out"], *extra_strides)
    cu_seqlens = seq_args[:2]

    def dkdv_grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(S, meta["BLOCK_N"]), B * Hk)

    # No launch on an empty grid (keys no query reads get zeros from the dK/dV kernel).
    if B * Hk * S > 0:
        torch.library.wrap_triton(_attention_bwd_dkdv_kernel)[dkdv_grid](
            q, k, v, grad_out, lse, delta, ptrs["Mask"], ptrs["Slopes"], ptrs["Seed"], dk, dv,
            *cu_seqlens, *inputs, *strides["dk"], *strides["dv"], *strides["lse"],
            Hq, Hk, *scalars[1:], **flags,
        )

    def dq_grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(L, meta["BLOCK_M"]), B * Hq)

    if B * Hq * L > 0:
        torch.library.wrap_triton(_attention_bwd_dq_kernel)[dq_grid](
            q, k, v, grad_out, lse, delta, ptrs["Mask"], ptrs["Slopes"], ptrs["Seed"], dq,
            dmask if dmask is not None else dq, *cu_seqlens, *inputs, *strides["dq"],
            *strides["lse"], *scalars, MASK_GRAD=dmask is not None, **flags,
        )


@torch.library.triton_op("fastattn::attention_fwd_triton", mutates_args=())
def attention_fwd_triton(
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
    """Triton fastattn::attention_fwd: out [B, Hq, L, Ev] (q's dtype), lse [B, Hq, L] float32.

    Inputs in the normalized layout of fastattn/ops/_registry.py (the ops layer checks them).
    """
    B, Hq, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, Hq, L, Ev), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, L), device=q.device, dtype=torch.float32)
    if B * Hq * L == 0:
        return out, lse
    strides = Strides(q=q.stride(), k=k.stride(), v=v.stride(), out=(*out.stride()[:3], 0),
                      lse=(Hq * L, L, 0))
    attention_fwd_launch(
        q, k, v, out, lse, strides, B=B, Hq=Hq, Hk=Hk, L=L, S=S, E=E, Ev=Ev,
        attn_mask=attn_mask, alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_seed=rng_seed,
        scale=scale, window_left=window_left, window_right=window_right,
        bottom_right=bottom_right, softcap=softcap, dropout_cols=S, sequences=Sequences(),
    )
    return out, lse


@torch.library.triton_op("fastattn::attention_bwd_triton", mutates_args=())
def attention_bwd_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    rng_seed: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton fastattn::attention_bwd: dq, dk, dv (shapes and dtype of q, k, v; dk/dv summed over
    each GQA group) and dmask = dS, float32 [B, Hq, L, S] when mask_grad, else empty.

    lse must be the contiguous float32 [B, Hq, L] returned by the forward.
    """
    B, Hq, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty((B, Hq, L, E), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hk, S, E), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hk, S, Ev), device=q.device, dtype=v.dtype)
    # Tiles outside the window are skipped by the kernels: their dS is 0, so start from zeros.
    dmask = (torch.zeros((B, Hq, L, S), device=q.device, dtype=torch.float32) if mask_grad
             else torch.empty(0, device=q.device, dtype=torch.float32))
    if B * Hk * S == 0 and B * Hq * L == 0:
        return dq, dk, dv, dmask
    strides = {
        "q": q.stride(), "k": k.stride(), "v": v.stride(), "grad_out": grad_out.stride(),
        "out": out.stride(), "dq": dq.stride()[:3], "dk": dk.stride()[:3], "dv": dv.stride()[:3],
        "lse": (Hq * L, L),
    }
    attention_bwd_launch(
        grad_out, q, k, v, out, lse.contiguous(), dq, dk, dv, dmask if mask_grad else None,
        strides=strides, B=B, Hq=Hq, Hk=Hk, L=L, S=S, E=E, Ev=Ev, rows_q=Hq * L,
        attn_mask=attn_mask, alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_seed=rng_seed,
        scale=scale, window_left=window_left, window_right=window_right,
        bottom_right=bottom_right, softcap=softcap, dropout_cols=S, sequences=Sequences(),
    )
    return dq, dk, dv, dmask
