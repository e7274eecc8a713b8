"""Plain-PyTorch implementations of every fastattn op: the oracle for tests and the backend of
last resort. Differentiable through autograd and float64-capable; clarity over speed (the
attention reference materializes the L x S score matrix).
"""

from __future__ import annotations

import torch

from fastattn.ops.errors import FastattnValueError

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
    alibi_slopes: torch.Tensor,
    B: int,
    H: int,
    L: int,
    S: int,
    bottom_right: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[B or 1, H, L, S] in ``dtype``: slope * (j - i - offset) from slopes [H] or [B, H]."""
    rel = (
        torch.arange(S, device=alibi_slopes.device)[None, :]
        - torch.arange(L, device=alibi_slopes.device)[:, None]
        - key_offset(L, S, bottom_right)
    ).to(dtype)
    slopes = alibi_slopes.to(dtype).reshape(-1, H, 1, 1)
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
    dropout_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in the normalized layout of fastattn::attention_fwd (see _registry.py).

    q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]; returns out [B, Hq, L, Ev] in q's dtype
    and lse [B, Hq, L] float32. Computes in float64 for float64 inputs, else float32.
    dropout_keep: the bool keep mask [B, Hq, L, S] to use instead of the one rng_seed draws
    (the varlen reference passes its slice of the packed call's mask).
    """
    B, Hq, L, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = Hq // Hk if Hk else 1  # Hq = Hk = 0: no heads at all
    qc = q.to(compute)
    kc = k.to(compute).repeat_interleave(group, dim=1)
    vc = v.to(compute).repeat_interleave(group, dim=1)

    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, Hq, L, S]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, B, Hq, L, S, bottom_right, compute)
    visible = visible_keys(L, S, window_left, window_right, bottom_right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(compute)
    scores = scores.masked_fill(~visible, float("-inf"))

    # A row with no visible key has max -inf: shift it by 0 instead so exp() gives exact zeros
    # (and zero gradients) rather than NaN. Every other row sums to >= 1 after the shift, or to
    # NaN when a score is NaN (from q, k or v: amax, clamp_min and the division keep it NaN).
    row_max = scores.amax(dim=-1, keepdim=True) if S > 0 else scores.new_zeros(B, Hq, L, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    unnormalized = torch.exp(scores - row_max)
    row_sum = unnormalized.sum(dim=-1, keepdim=True)
    probs = unnormalized / row_sum.clamp_min(1.0)
    lse = torch.where(row_sum == 0, float("-inf"), row_max + torch.log(row_sum)).squeeze(-1)

    if dropout_p > 0:
        keep = dropout_keep
        if keep is None:
            if rng_seed is None:
                raise FastattnValueError("attention_reference: dropout_p > 0 needs rng_seed")
            keep = dropout_keep_mask(int(rng_seed), (B, Hq, L, S), dropout_p, q.device)
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.matmul(probs, vc)
    return out.to(q.dtype), lse.to(torch.float32)


def _slopes_of(alibi_slopes: torch.Tensor | None, b: int) -> torch.Tensor | None:
    return alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes


def attention_varlen_reference(
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
    """fastattn::attention_varlen_fwd (layout and dropout counter: _registry.py), one
    attention_reference per sequence. Returns out [total_q, Hq, Ev], lse float32 [Hq, total_q]."""
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    total_q, Hq = q.shape[0], q.shape[1]
    keep_all = None
    if dropout_p > 0:
        if rng_seed is None:
            raise FastattnValueError("attention_varlen_reference: dropout_p > 0 needs rng_seed")
        keep_all = dropout_keep_mask(int(rng_seed), (1, Hq, total_q, max_seqlen_k), dropout_p,
                                     q.device)
    outs, lses = [q.new_empty(0, Hq, v.shape[-1])], [q.new_empty(Hq, 0, dtype=torch.float32)]
    for b in range(len(offsets_q) - 1):
        (q0, q1), (k0, k1) = offsets_q[b : b + 2], offsets_k[b : b + 2]
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        keep = None if keep_all is None else keep_all[:, :, q0:q1, : k1 - k0]
        out, lse = attention_reference(
            qb, kb, vb, None, _slopes_of(alibi_slopes, b), dropout_p, rng_seed, scale,
            window_left, window_right, bottom_right, softcap, dropout_keep=keep,
        )
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def kv_cache_positions(
    k_cache: torch.Tensor, b: int, length: int, block_table: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache index, row) int64 [length] of positions 0 .. length - 1 of sequence b: the batch
    row (or, paged, the block) of k_cache [*, Hk, rows, E] and the row within it."""
    pos = torch.arange(length, device=k_cache.device)
    if block_table is not None:
        block_size = k_cache.shape[2]
        return block_table[b].long()[pos // block_size], pos % block_size
    row = b if cache_batch_idx is None else int(cache_batch_idx[b])
    return torch.full_like(pos, row), pos


def attention_kv_cache_reference(
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
    """fastattn::attention_kv_cache_fwd (layouts: _registry.py): appends k_new / v_new into the
    caches in place, then one attention_reference per sequence over its gathered keys.
    The caller validates the arguments. Returns out [B, Hq, Lq, Ev], lse float32 [B, Hq, Lq]."""
    L_new = 0 if k_new is None else k_new.shape[2]
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        index, row = kv_cache_positions(k_cache, b, length + L_new, block_table, cache_batch_idx)
        if L_new:
            with torch.no_grad():
                k_cache[index[length:], :, row[length:]] = k_new[b].transpose(0, 1)
                v_cache[index[length:], :, row[length:]] = v_new[b].transpose(0, 1)
        keys, values = (c[index, :, row].transpose(0, 1)[None] for c in (k_cache, v_cache))
        out, lse = attention_reference(
            q[b : b + 1], keys, values, None, _slopes_of(alibi_slopes, b), 0.0, None, scale,
            window_left, window_right, bottom_right, softcap,
        )
        outs.append(out)
        lses.append(lse)
    if not outs:
        B, Hq, Lq = q.shape[:3]
        out = q.new_empty(B, Hq, Lq, v_cache.shape[-1])
        return out, q.new_empty(B, Hq, Lq, dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses)


# ---- LSTM (schemas and semantics: fastattn/ops/_registry.py) ----------------------------------


def _lstm_opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lstm_gate_activations(gates: torch.Tensor) -> torch.Tensor:
    """[..., 4H] pre-activation -> activated (i, f, o sigmoid; g tanh), in the opmath dtype."""
    i, f, g, o = gates.to(_lstm_opmath(gates.dtype)).chunk(4, dim=-1)
    return torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=-1)


def lstm_cell_pointwise_fwd_reference(
    gates: torch.Tensor, cx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """gates [B, 4H] pre-activation, cx [B, H] -> (hy, cy) [B, H] in gates' dtype."""
    i, f, g, o = lstm_gate_activations(gates).chunk(4, dim=-1)
    cy = f * cx.to(i.dtype) + i * g
    hy = o * cy.tanh()
    return hy.to(gates.dtype), cy.to(gates.dtype)


def _lstm_step_bwd(
    grad_h: torch.Tensor,
    grad_c: torch.Tensor,
    act: torch.Tensor,
    c_prev: torch.Tensor,
    c_new: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's pointwise backward in opmath: (grad of pre-activation gates, grad of c_prev)."""
    i, f, g, o = act.chunk(4, dim=-1)
    tc = c_new.tanh()
    dc = grad_c + grad_h * o * (1 - tc * tc)
    grad_gates = torch.cat(
        [dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
         grad_h * tc * o * (1 - o)], dim=-1)
    return grad_gates, dc * f


def lstm_cell_pointwise_bwd_reference(
    grad_hy: torch.Tensor,
    grad_cy: torch.Tensor,
    gates: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of lstm_cell_pointwise_fwd: (grad_gates [B, 4H], grad_cx [B, H])."""
    dt = _lstm_opmath(gates.dtype)
    grad_gates, grad_cx = _lstm_step_bwd(
        grad_hy.to(dt), grad_cy.to(dt), lstm_gate_activations(gates), cx.to(dt), cy.to(dt))
    return grad_gates.to(gates.dtype), grad_cx.to(gates.dtype)


def _lstm_cell_reference_act(
    gates: torch.Tensor, c_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    act = lstm_gate_activations(gates)
    i, f, g, o = act.chunk(4, dim=-1)
    c_new = f * c_prev.to(act.dtype) + i * g
    h_new = o * c_new.tanh()
    return h_new.to(gates.dtype), c_new.to(gates.dtype), act.to(gates.dtype)


def _layer_norm_cell(ln_hh_weight, ln_c_weight, ln_c_bias, eps):
    def cell(gates: torch.Tensor, c_prev: torch.Tensor):
        act = lstm_gate_activations(gates)
        i, f, g, o = act.chunk(4, dim=-1)
        c_raw = f * c_prev.to(act.dtype) + i * g
        c_new = torch.nn.functional.layer_norm(
            c_raw, (c_raw.shape[-1],), ln_c_weight.to(act.dtype), ln_c_bias.to(act.dtype), eps)
        h_new = o * c_new.tanh()
        return h_new.to(gates.dtype), c_new.to(gates.dtype), act.to(gates.dtype)

    return cell


def lstm_layer_reference(
    x_proj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor | None,
    reverse: bool,
    zoneout_c: torch.Tensor | None,
    zoneout_h: torch.Tensor | None,
    cell=None,
    layer_norm: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastattn::lstm_layer_fwd in plain, differentiable PyTorch.

    ``cell(gates, c_prev) -> (h_new, c_new, activated gates or None)`` serves the pointwise part
    (default: plain PyTorch); gates_all is returned only when ``cell`` gives activated gates
    (else an empty tensor). Returns (h_all [T, B, P], c_all [T, B, H], gates_all [T, B, 4H],
    hpre_all [T, B, H] or empty).

    ``layer_norm = (ln_hh_weight [4H], ln_c_weight [H], ln_c_bias [H], eps)`` makes it a
    LayerNorm-LSTM step: gates = x_proj + LN(h_prev @ w_hh^T) * ln_hh_weight (x_proj already
    normalized by the caller), c_new = LN(f * c_prev + i * g) * ln_c_weight + ln_c_bias,
    h_new = o * tanh(c_new).
    """
    cell = cell or _lstm_cell_reference_act
    if layer_norm is not None:
        cell = _layer_norm_cell(*layer_norm)
    T, B = x_proj.shape[0], x_proj.shape[1]
    sizes = [B] * T if batch_sizes is None else [int(n) for n in batch_sizes.tolist()]
    h, c = h0, c0
    h_all, c_all, gates_all, hpre_all = [None] * T, [None] * T, [None] * T, [None] * T
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = sizes[t]
        if layer_norm is None:
            gates = torch.addmm(x_proj[t, :n], h[:n], w_hh.t())
        else:
            gates = x_proj[t, :n] + torch.nn.functional.layer_norm(
                h[:n] @ w_hh.t(), (w_hh.shape[0],), layer_norm[0], None, layer_norm[3])
        h_new, c_new, act = cell(gates, c[:n])
        hpre = h_new
        if w_hr is not None:
            h_new = hpre @ w_hr.t()
        if zoneout_c is not None:
            c_new = torch.lerp(c_new, c[:n], zoneout_c[t, :n])
        if zoneout_h is not None:
            h_new = torch.lerp(h_new, h[:n], zoneout_h[t, :n])
        h, c = torch.cat([h_new, h[n:]]), torch.cat([c_new, c[n:]])
        h_all[t], c_all[t] = h, c
        if act is not None:
            gates_all[t] = torch.cat([act, act.new_zeros(B - n, act.shape[1])])
        hpre_all[t] = torch.cat([hpre, hpre.new_zeros(B - n, hpre.shape[1])])
    empty = x_proj.new_empty(0)
    if T == 0:
        return (x_proj.new_empty(0, B, h0.shape[1]), x_proj.new_empty(0, B, c0.shape[1]),
                x_proj.new_empty(0, B, x_proj.shape[2]), empty)
    return (
        torch.stack(h_all),
        torch.stack(c_all),
        torch.stack(gates_all) if gates_all[0] is not None else empty,
        torch.stack(hpre_all) if w_hr is not None else empty,
    )


def lstm_sequence_fwd_reference(
    x_proj: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastattn::lstm_sequence_fwd: lstm_layer_reference without options."""
    h_all, c_all, gates_all, _ = lstm_layer_reference(
        x_proj, h0, c0, w_hh, None, None, False, None, None)
    return h_all, c_all, gates_all


def lstm_layer_bwd_reference(
    grad_h_all: torch.Tensor,
    grad_c_all: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor | None,
    reverse: bool,
    zoneout_c: torch.Tensor | None,
    zoneout_h: torch.Tensor | None,
    h_all: torch.Tensor,
    c_all: torch.Tensor,
    gates_all: torch.Tensor,
    hpre_all: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastattn::lstm_layer_bwd from the saved forward tensors, step by step in plain PyTorch.

    Returns (grad_x_proj [T, B, 4H], grad_h0 [B, P], grad_c0 [B, H], grad_w_hh [4H, P],
    grad_w_hr [P, H] or empty).
    """
    T, B, G = gates_all.shape
    dtype = c_all.dtype  # gates_all is saved in the math dtype (every kernel does)
    dt = _lstm_opmath(dtype)
    sizes = [B] * T if batch_sizes is None else [int(n) for n in batch_sizes.tolist()]
    dh = torch.zeros_like(h0, dtype=dt)
    dc = torch.zeros_like(c0, dtype=dt)
    grad_x_proj = torch.zeros(T, B, G, dtype=dt, device=gates_all.device)
    grad_w_hh = torch.zeros(w_hh.shape, dtype=dt, device=w_hh.device)
    grad_w_hr = torch.zeros(w_hr.shape, dtype=dt, device=w_hr.device) if w_hr is not None else None
    for s in reversed(range(T)):
        t = T - 1 - s if reverse else s
        prev = t + 1 if reverse else t - 1
        h_prev = (h0 if s == 0 else h_all[prev]).to(dt)
        c_prev = (c0 if s == 0 else c_all[prev]).to(dt)
        n = sizes[t]
        dh_total = dh + grad_h_all[t].to(dt)
        dc_total = dc + grad_c_all[t].to(dt)
        dh_prev, dc_prev = dh_total.clone(), dc_total.clone()  # carried rows keep these
        dh_new, dc_new = dh_total[:n], dc_total[:n]
        if zoneout_h is not None:
            dh_new = dh_new * (1 - zoneout_h[t, :n].to(dt))
        if w_hr is not None:
            grad_w_hr += dh_new.t() @ hpre_all[t, :n].to(dt)
            dh_new = dh_new @ w_hr.to(dt)
        if zoneout_c is not None:
            dc_new = dc_new * (1 - zoneout_c[t, :n].to(dt))
        act = gates_all[t, :n].to(dt)
        i, f, g, _ = act.chunk(4, dim=-1)
        c_new = f * c_prev[:n] + i * g
        grad_gates, dc_cell = _lstm_step_bwd(dh_new, dc_new, act, c_prev[:n], c_new)
        grad_x_proj[t, :n] = grad_gates
        grad_w_hh += grad_gates.t() @ h_prev[:n]
        dh_prev[:n] = grad_gates @ w_hh.to(dt) + (
            dh_total[:n] * zoneout_h[t, :n].to(dt) if zoneout_h is not None else 0)
        dc_prev[:n] = dc_cell + (
            dc_total[:n] * zoneout_c[t, :n].to(dt) if zoneout_c is not None else 0)
        dh, dc = dh_prev, dc_prev
    return (
        grad_x_proj.to(dtype),
        dh.to(dtype),
        dc.to(dtype),
        grad_w_hh.to(dtype),
        grad_w_hr.to(dtype) if grad_w_hr is not None else c_all.new_empty(0),
    )
