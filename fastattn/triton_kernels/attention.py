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
"""

from __future__ import annotations

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
# Autotune per problem shape and per feature set (the flags change the kernel's cost).
_TUNE_KEY = ["L", "S", "BLOCK_E", "BLOCK_EV", "HAS_MASK", "HAS_DROPOUT", "GROUP"]
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
def _dropout_scale(seed, dropout_p, b, h, Hq, L, S, offs_m, offs_n):
    """[BLOCK_M, BLOCK_N] float32: 1 / (1 - p) where the element is kept, 0 where dropped."""
    row = (b.to(tl.int64) * Hq + h) * L + offs_m  # [BLOCK_M] int64
    counter = row[:, None] * S + offs_n[None, :]  # [BLOCK_M, BLOCK_N] int64
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
def _load_k_transposed(k_base, offs_n, offs_e, stride_kn, stride_ke, S, E):
    """k^T tile [BLOCK_E, BLOCK_N], zero-padded: the right operand of every q . k^T product.

    The forward and both backward kernels multiply the same [BLOCK_M, BLOCK_E] q tile by this
    same tile, so the backward recomputes the forward's scores bit for bit, and P = exp(s - lse)
    depends on that: with |s| ~ 1e4 one float32 ulp of s is 1e-3. The backward used to form
    q @ trans(k) instead, which the interpreter's BLAS sums in another order (a transposed
    operand): P, and so dv, came out 4e-3 off although the forward was exact (issue 18).
    """
    ptrs = k_base + offs_n[None, :] * stride_kn + offs_e[:, None] * stride_ke
    return tl.load(ptrs, mask=(offs_n[None, :] < S) & (offs_e[:, None] < E), other=0.0)


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


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Mask, Slopes, Seed, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb,
    stride_ob, stride_oh, stride_om,
    Hq, L, S, E, Ev,
    scale, softcap, dropout_p, window_left, window_right, offset,
    GROUP,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    b64 = b.to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < L

    q_ptrs = (Q + b64 * stride_qb + h * stride_qh
              + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    # q: [BLOCK_M, BLOCK_E]
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh
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

    lo, hi = _key_range(start_m, L, S, offset, window_left, window_right, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < S
        k_t = _load_k_transposed(k_base, offs_n, offs_e, stride_kn, stride_ke, S, E)
        qk = _dot(q, k_t, BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
        s, _ = _score_tile(
            qk, offs_m, offs_n, L, S, offset, window_left, window_right, scale, softcap, slope,
            mask_base, stride_mm, stride_mn, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = p * _dropout_scale(seed, dropout_p, b, h, Hq, L, S, offs_m, offs_n)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_ev[None, :] * stride_ve
        # v: [BLOCK_N, BLOCK_EV]
        v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, BF16_DOT_IN_FP32)
        m_i = m_new

    # l_i is 0 only on rows without a visible key (acc is 0 there too); a NaN score (from q, k
    # or v) makes l_i NaN, and the row and its lse NaN, as in torch.
    no_keys = l_i == 0.0
    out = acc / tl.where(no_keys, 1.0, l_i)[:, None]
    lse = tl.where(no_keys, float("-inf"), m_i + tl.log(tl.where(no_keys, 1.0, l_i)))
    o_ptrs = Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_ev[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_ev[None, :] < Ev))
    tl.store(Lse + pid_bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    Out, dOut, Delta,
    stride_ob, stride_oh, stride_om, stride_oe,
    stride_dob, stride_doh, stride_dom, stride_doe,
    Hq, L, Ev,
    BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_e dO * O (float32), the row term of dS = P * (dP - delta)."""
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
    Q, K, V, dOut, Lse, Delta, Mask, Slopes, Seed, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_dob, stride_doh, stride_dom, stride_doe,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb,
    Hq, Hk, L, S, E, Ev,
    scale, softcap, dropout_p, window_left, window_right, offset,
    GROUP,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one kv head, summed over the GROUP query heads that read it."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // Hk
    kvh = pid_bh % Hk
    b64 = b.to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    col_ok = offs_n < S
    k_ok = col_ok[:, None] & (offs_e[None, :] < E)
    v_ok = col_ok[:, None] & (offs_ev[None, :] < Ev)
    k_t = _load_k_transposed(K + b64 * stride_kb + kvh * stride_kh, offs_n, offs_e,
                             stride_kn, stride_ke, S, E)  # [BLOCK_E, BLOCK_N]
    v = tl.load(V + b64 * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn
                + offs_ev[None, :] * stride_ve, mask=v_ok, other=0.0)  # [BLOCK_N, BLOCK_EV]
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    dk = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], tl.float32)
    lo, hi = _query_range(start_n, L, S, offset, window_left, window_right, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + b64 * stride_sb + h)
        row_base = (b64 * Hq + h) * L  # of lse and delta, [B, Hq, L] contiguous
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < L
            q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                        + offs_e[None, :] * stride_qe,
                        mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)  # [M, E]
            do = tl.load(dOut + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                         + offs_ev[None, :] * stride_doe,
                         mask=row_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [M, Ev]
            qk = _dot(q, k_t, BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
            s, tanh_s = _score_tile(
                qk, offs_m, offs_n, L, S, offset, window_left, window_right, scale, softcap, slope,
                Mask + b64 * stride_mb + h * stride_mh, stride_mm, stride_mn,
                HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP,
            )
            p = _probabilities(s, Lse + row_base + offs_m, row_ok)  # [BLOCK_M, BLOCK_N]
            dp = _dot(do, tl.trans(v), BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
            p_dropped = p
            if HAS_DROPOUT:
                keep_scale = _dropout_scale(seed, dropout_p, b, h, Hq, L, S, offs_m, offs_n)
                p_dropped = p * keep_scale
                dp = dp * keep_scale
            dv += _dot(tl.trans(p_dropped.to(do.dtype)), do, BF16_DOT_IN_FP32)
            delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)  # [BLOCK_M]
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - tanh_s * tanh_s)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, BF16_DOT_IN_FP32)

    dk_ptrs = dK + pid_bh.to(tl.int64) * S * E + offs_n[:, None] * E + offs_e[None, :]
    tl.store(dk_ptrs, (dk * scale).to(dK.dtype.element_ty), mask=k_ok)
    dv_ptrs = dV + pid_bh.to(tl.int64) * S * Ev + offs_n[:, None] * Ev + offs_ev[None, :]
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=v_ok)


@triton.autotune(
    configs=_BWD_CONFIGS, key=_TUNE_KEY + ["MASK_GRAD"], prune_configs_by=_PRUNE
)
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, Mask, Slopes, Seed, dQ, dMask,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_dob, stride_doh, stride_dom, stride_doe,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb,
    Hq, L, S, E, Ev,
    scale, softcap, dropout_p, window_left, window_right, offset,
    GROUP,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASK_GRAD: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one query head; dmask (= dS) of its visible key tiles."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    b64 = b.to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < L
    q_ok = row_ok[:, None] & (offs_e[None, :] < E)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_e[None, :] * stride_qe, mask=q_ok, other=0.0)  # [BLOCK_M, BLOCK_E]
    do = tl.load(dOut + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_ev[None, :] * stride_doe,
                 mask=row_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [BLOCK_M, BLOCK_EV]
    row_base = pid_bh.to(tl.int64) * L
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)  # [BLOCK_M]
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh
    mask_base = Mask + b64 * stride_mb + h * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + b64 * stride_sb + h)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    dq = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    lo, hi = _key_range(start_m, L, S, offset, window_left, window_right, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < S
        k_t = _load_k_transposed(k_base, offs_n, offs_e, stride_kn, stride_ke, S, E)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
                    mask=col_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [N, Ev]
        qk = _dot(q, k_t, BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
        s, tanh_s = _score_tile(
            qk, offs_m, offs_n, L, S, offset, window_left, window_right, scale, softcap, slope,
            mask_base, stride_mm, stride_mn, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP,
        )
        p = _probabilities(s, Lse + row_base + offs_m, row_ok)  # [BLOCK_M, BLOCK_N]
        dp = _dot(do, tl.trans(v), BF16_DOT_IN_FP32)  # [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:
            dp = dp * _dropout_scale(seed, dropout_p, b, h, Hq, L, S, offs_m, offs_n)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:
            dmask_ptrs = dMask + (row_base + offs_m[:, None]) * S + offs_n[None, :]
            tl.store(dmask_ptrs, ds, mask=row_ok[:, None] & col_ok[None, :])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), BF16_DOT_IN_FP32)

    dq_ptrs = dQ + (row_base + offs_m[:, None]) * E + offs_e[None, :]
    tl.store(dq_ptrs, (dq * scale).to(dQ.dtype.element_ty), mask=q_ok)


def _common_args(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    rng_seed: torch.Tensor | None,
    window_left: int,
    window_right: int,
    bottom_right: bool,
) -> tuple[dict, dict, list]:
    """Kernel arguments shared by the forward and both backward kernels.

    Returns (pointers: Mask, Slopes, Seed), (scalars and flags), and the mask's four strides
    plus the slopes' batch stride. Absent tensors are replaced by q (never read: the flag is off).
    """
    L, S = q.shape[2], k.shape[2]
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
        "offset": S - L if bottom_right else 0,
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
    ptrs, options, extra_strides = _common_args(
        q, k, attn_mask, alibi_slopes, dropout_p, rng_seed, window_left, window_right, bottom_right
    )

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(L, meta["BLOCK_M"]), B * Hq)

    torch.library.wrap_triton(_attention_fwd_kernel)[grid](
        q, k, v, ptrs["Mask"], ptrs["Slopes"], ptrs["Seed"], out, lse,
        *q.stride(), *k.stride(), *v.stride(), *extra_strides,
        out.stride(0), out.stride(1), out.stride(2),
        Hq, L, S, E, Ev,
        float(scale), float(softcap), options["dropout_p"],
        options["window_left"], options["window_right"], options["offset"],
        Hq // Hk,
        HAS_MASK=options["HAS_MASK"], MASK_IS_BOOL=options["MASK_IS_BOOL"],
        HAS_ALIBI=options["HAS_ALIBI"], HAS_DROPOUT=options["HAS_DROPOUT"],
        HAS_SOFTCAP=softcap > 0.0, BLOCK_E=_head_block(E), BLOCK_EV=_head_block(Ev),
        BF16_DOT_IN_FP32=_bf16_dot_in_fp32(q),
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
    lse = lse.contiguous()
    delta = torch.empty((B, Hq, L), device=q.device, dtype=torch.float32)
    ptrs, options, extra_strides = _common_args(
        q, k, attn_mask, alibi_slopes, dropout_p, rng_seed, window_left, window_right, bottom_right
    )
    block_e, block_ev = _head_block(E), _head_block(Ev)
    if B * Hq * L > 0:
        delta_grid = (triton.cdiv(L, _DELTA_BLOCK_M), B * Hq)
        torch.library.wrap_triton(_attention_bwd_delta_kernel)[delta_grid](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, L, Ev,
            BLOCK_EV=block_ev, BLOCK_M=_DELTA_BLOCK_M,
        )
    scalars = (
        float(scale), float(softcap), options["dropout_p"],
        options["window_left"], options["window_right"], options["offset"], Hq // Hk,
    )
    flags = {
        "HAS_MASK": options["HAS_MASK"], "MASK_IS_BOOL": options["MASK_IS_BOOL"],
        "HAS_ALIBI": options["HAS_ALIBI"], "HAS_DROPOUT": options["HAS_DROPOUT"],
        "HAS_SOFTCAP": softcap > 0.0, "BLOCK_E": block_e, "BLOCK_EV": block_ev,
        "BF16_DOT_IN_FP32": _bf16_dot_in_fp32(q),
    }
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *extra_strides)

    def dkdv_grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(S, meta["BLOCK_N"]), B * Hk)

    if B * Hk * S > 0:
        torch.library.wrap_triton(_attention_bwd_dkdv_kernel)[dkdv_grid](
            q, k, v, grad_out, lse, delta, ptrs["Mask"], ptrs["Slopes"], ptrs["Seed"], dk, dv,
            *strides, Hq, Hk, L, S, E, Ev, *scalars, **flags,
        )

    def dq_grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(L, meta["BLOCK_M"]), B * Hq)

    if B * Hq * L > 0:
        torch.library.wrap_triton(_attention_bwd_dq_kernel)[dq_grid](
            q, k, v, grad_out, lse, delta, ptrs["Mask"], ptrs["Slopes"], ptrs["Seed"], dq,
            dmask if mask_grad else dq,
            *strides, Hq, L, S, E, Ev, *scalars, MASK_GRAD=mask_grad, **flags,
        )
    return dq, dk, dv, dmask
