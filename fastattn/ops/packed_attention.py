"""Attention over packed variable-length sequences and over a KV cache, each one fused op.

``attention_varlen`` calls ``fastattn::attention_varlen_fwd`` (differentiable) and
``attention_with_kv_cache`` calls ``fastattn::attention_kv_cache_fwd`` (which appends the new
keys in place); layouts and semantics are documented with the schemas in _registry.py. The
kernels read the per-sequence offsets themselves: no padding, no per-sequence launch, no host
sync but the optional value check below, and one graph under torch.compile.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from fastattn import _extension
from fastattn.ops import backends, reference
from fastattn.ops._autograd import (
    differentiable,
    first_order_only,
    not_differentiable,
    register_autograd,
)
from fastattn.ops._registry import LIBRARY  # noqa: F401  (schemas must exist before registering)
from fastattn.ops.attention import (
    AttentionOptions,
    _grid_extent,
    _missing_feature,
    attention_options,
)
from fastattn.ops.errors import FastattnTypeError, FastattnValueError

# FASTATTN_SKIP_VALUE_CHECKS=1 turns off, process-wide, the checks below that read tensor values
# (one host sync per call); the check_values argument does so per call.
_SKIP_VALUE_CHECKS_ENV = "FASTATTN_SKIP_VALUE_CHECKS"
# attention_with_kv_cache of a plain eager CPU call (no ALiBi; plain CPU tensors; nothing
# intercepting the call), run in C++ without this module's ~25 us of checks, which reach the same
# op call (csrc/attention/attention_eager_entry.cpp lists the conditions); None for any other
# call, and for a call the op refuses (it writes nothing then), whose error the checks here raise.
_KV_CACHE_EAGER_ENTRY = _extension.C.attention_kv_cache_eager_entry if _extension.C else None
# What falling back to the reference backend costs (ReferenceFallbackWarning's text).
_REFERENCE_COST = (
    "reads the offsets to the host and loops over the sequences in Python, materializing each "
    "sequence's L x S score matrix (O(L * S) memory)"
)


# Constant-folded while torch.compile traces, as attention's _choose_backend.
@torch.compiler.assume_constant_result
def _choose_backend(
    op_name: str, device: torch.device, dtype: torch.dtype, E: int, Ev: int, batch: int,
    q_heads: int,
) -> str:
    return backends.choose(
        op_name, device, lambda name: _missing_feature(name, dtype, E, Ev, batch, q_heads),
        reference_cost=_REFERENCE_COST,
    )


@functools.cache
def _triton_ops() -> tuple[Callable, Callable]:
    """The Triton varlen forward (its autograd registered here, with the C++ op's, below) and
    the Triton KV-cache op."""
    # Imported on first use: triton is optional and slow to import.
    from fastattn.triton_kernels import attention_varlen as _  # noqa: F401  (defines the ops)

    register_autograd(
        "fastattn::attention_varlen_fwd_triton",
        _make_varlen_backward("attention_varlen_bwd_triton"),
        setup_context=_varlen_setup_context,
    )
    ops = torch.ops.fastattn
    return ops.attention_varlen_fwd_triton, ops.attention_kv_cache_fwd_triton


def _value_checks_wanted(check_values: bool) -> bool:
    """Whether to run the checks that read tensor values: asked for, not turned off by the
    environment, and not while torch.compile traces (a host read would break the graph)."""
    return (
        not torch.compiler.is_compiling()
        and check_values
        and os.environ.get(_SKIP_VALUE_CHECKS_ENV, "") != "1"
    )


def _raise_failed(fn: str, facts: list[tuple[torch.Tensor, Callable[[], str]]]) -> None:
    """Reads every fact (0-d bool tensors) in one host sync; raises the first failed one's
    message (messages may read more values: that is the error path)."""
    if not facts:
        return
    held = torch.stack([fact for fact, _ in facts]).tolist()
    for ok, (_, message) in zip(held, facts):
        if not ok:
            raise FastattnValueError(f"{fn}: {message()}")


def _kernel_value_errors(op: Callable) -> Callable:
    """``op``, its ValueErrors (the C++ CPU op's checks of the offsets' values, the only check of
    them on CPU tensors) re-raised as FastattnValueError, as the Python checks would raise. While
    torch.compile traces, ``op`` as it is: the compiled graph raises them as plain ValueError."""
    if torch.compiler.is_compiling():
        return op

    def call(*args: Any) -> Any:
        try:
            return op(*args)
        except FastattnValueError:
            raise
        except ValueError as error:
            raise FastattnValueError(str(error)) from error

    return call


def _check_index_tensor(fn: str, name: str, t: Any, dim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dim:
        raise FastattnValueError(
            f"{fn}: {name} must be a {dim}-D int32 tensor, got "
            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
        )
    if t.device != device:
        raise FastattnValueError(f"{fn}: {name} is on {t.device} but q is on {device}")


def _check_tokens(fn: str, q: Any, k: Any, v: Any, dims: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise FastattnTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise FastattnValueError(
                f"{fn}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point() or t.dtype != q.dtype:
            raise FastattnTypeError(
                f"{fn}: {name} must be a float tensor of q's dtype {q.dtype}, got {t.dtype}"
            )
        if t.device != q.device:
            raise FastattnValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    return_lse: bool = False,
    check_values: bool = True,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences: q [total_q, Hq, E], k [total_k, Hk, E], v [total_k, Hk, Ev].

    Sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:... of
    k/v (int32 [B + 1] on q's device, from 0, non-decreasing, ending at total_q / total_k;
    a sequence may be empty); no sequence is longer than max_seqlen_q / max_seqlen_k. Hq must
    be a multiple of Hk (GQA). ``options`` are fastattn.attention's but attn_mask: causal,
    causal_align (bottom_right aligns each sequence's last query with its last key), window,
    softcap, alibi_slopes (float32 [Hq] or [B, Hq]), dropout_p, scale. Returns out
    [total_q, Hq, Ev] in q's dtype and, with return_lse, lse float32 [Hq, total_q] (detached).
    Differentiable in q, k and v.

    Value checks: the offsets' values (start 0, non-decreasing, last == total, lengths within
    max_seqlen) are checked before any output is written, raising ValueError naming the
    offsets. On CPU tensors with the C++ kernels, the op checks them itself on every call,
    forward and backward (a pass over B + 1 ints, no extra cost; check_values does not turn it
    off). Elsewhere (GPU, reference backend) they are checked at the cost of one host sync per
    call; pass check_values=False, or set FASTATTN_SKIP_VALUE_CHECKS=1, to skip it (a GPU then
    never waits); it is also skipped while torch.compile traces, and on a GPU wrong offsets
    then give wrong results. Under torch.compile the CPU op's error is a plain ValueError.
    """
    fn = "attention_varlen"
    _check_tokens(fn, q, k, v, 3, "[tokens, heads, dim]")
    if options.get("attn_mask") is not None:
        raise FastattnValueError(f"{fn}: attn_mask is not supported; use causal/window/alibi")
    options.pop("attn_mask", None)
    total_q, Hq, E = q.shape
    total_k, Hk, Ev = v.shape
    if k.shape[0] != total_k or k.shape[1] != Hk or k.shape[2] != E:
        raise FastattnValueError(
            f"{fn}: k must be [{total_k}, {Hk}, {E}] (v's tokens and heads, q's head dim), got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, q {tuple(q.shape)}"
        )
    if Hq % Hk if Hk else Hq:
        raise FastattnValueError(f"{fn}: q heads ({Hq}) must be a multiple of k/v heads ({Hk})")
    _check_index_tensor(fn, "cu_seqlens_q", cu_seqlens_q, 1, q.device)
    _check_index_tensor(fn, "cu_seqlens_k", cu_seqlens_k, 1, q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0 or cu_seqlens_k.shape[0] != batch + 1:
        raise FastattnValueError(
            f"{fn}: cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 1 entries, got "
            f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise FastattnValueError(
            f"{fn}: max_seqlen_q / max_seqlen_k must be >= 0, got {max_seqlen_q} / {max_seqlen_k}"
        )
    opts, alibi = attention_options(fn, q, batch, **options)
    backend = _choose_backend(fn, q.device, q.dtype, E, Ev, *_grid_extent(batch, Hq))
    use_reference = backend == "reference" or 0 in (Hq, E, Ev)
    # The C++ CPU op checks the offsets' values itself (checked_cu_seqlens): checking them here
    # too would cost more than the rest of a small call.
    kernel_checks_values = backend == "cpu" and not use_reference
    if not kernel_checks_values and _value_checks_wanted(check_values):
        facts = []
        for name, cu, total, max_len, max_name in (
            ("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k"),
        ):
            lengths = cu.diff()
            facts += [
                (cu[0] == 0, lambda name=name, cu=cu: f"{name} must start at 0, got {cu.tolist()}"),
                ((lengths >= 0).all(),
                 lambda name=name, cu=cu: f"{name} must be non-decreasing, got {cu.tolist()}"),
                (cu[-1] == total,
                 lambda name=name, cu=cu, total=total: f"{name}[-1] = {int(cu[-1])} must equal "
                 f"the total token count {total}"),
                ((lengths <= max_len).all(),
                 lambda cu=cu, max_len=max_len, max_name=max_name: f"a sequence is longer than "
                 f"{max_name}={max_len} (longest: {int(cu.diff().max())})"),
            ]
        _raise_failed(fn, facts)

    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi, *opts.op_args())
    if use_reference:
        out, lse = reference.attention_varlen_reference(q, k, v, *args)
    else:
        fwd = _triton_ops()[0] if backend == "triton" else torch.ops.fastattn.attention_varlen_fwd
        fwd = _kernel_value_errors(differentiable(fwd))
        out, lse = fwd(*(_last_dim_contiguous(t) for t in (q, k, v)), *args)
    return (out, lse.detach()) if return_lse else out


def _scalar_options(opts: AttentionOptions) -> tuple:
    """The options after dropout_p and rng_seed (which the KV-cache op does not take), in
    schema order."""
    return opts.op_args()[2:]


def attention_with_kv_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    *,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    causal: bool = False,
    causal_align: str = "bottom_right",
    window: tuple[int, int] = (-1, -1),
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    check_values: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decoding attention: q [B, Hq, Lq, E] over each sequence's cached keys, in one op.

    cache_seqlens (int32 [B]) counts each sequence's valid cache positions. Caches:
    - contiguous: k_cache [B_cache, Hk, S_max, E], v_cache [B_cache, Hk, S_max, Ev]; sequence b
      uses row cache_batch_idx[b] (int32 [B]), or b when cache_batch_idx is None;
    - paged (block_table int32 [B, max_blocks]): k_cache [num_blocks, Hk, block_size, E], v_cache
      [num_blocks, Hk, block_size, Ev]; position p of sequence b is row p % block_size of block
      block_table[b, p // block_size]. FlashAttention's / vLLM's [num_blocks, block_size, Hk, E]
      caches work as ``.transpose(1, 2)`` views, read and written in place.
    Caches need a contiguous last dim; other strides are free.
    k_new / v_new [B, Hk, L_new, E / Ev] (both or neither) are written into the caches in place
    at positions cache_seqlens[b] .. cache_seqlens[b] + L_new - 1 (cache_seqlens itself is not
    changed; the caches' version counters move, as torch's in-place ops move them), then the
    queries attend over positions [0, cache_seqlens[b] + L_new). Every argument is checked
    before anything is written: on error the caches are unchanged.
    Options as fastattn.attention's (no dropout, no attn_mask); causal masks align
    bottom-right by default (the queries are each sequence's last positions). Returns out
    [B, Hq, Lq, Ev] in q's dtype and, with return_lse, lse float32 [B, Hq, Lq]. Not
    differentiable: a backward that reaches its outputs raises RuntimeError.

    Value checks: cache_seqlens + L_new within the capacity, cache_batch_idx and the used
    block_table entries within the cache are checked, raising ValueError. The CPU op checks
    them itself, always, at no extra cost. Elsewhere they cost one host sync per call;
    check_values=False or FASTATTN_SKIP_VALUE_CHECKS=1 skips that (it is also skipped while
    torch.compile traces). The CUDA and Triton kernels never read or write outside the caches:
    new rows past the capacity or in a block (cache row) whose block_table (cache_batch_idx)
    entry lies outside the cache are not written, and such a block's keys count as NaN, so
    every query that sees one of its positions gets a NaN out row and lse (the other queries
    are exact).
    """
    if _KV_CACHE_EAGER_ENTRY is not None and not torch.compiler.is_compiling():
        result = _KV_CACHE_EAGER_ENTRY(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                       block_table, cache_batch_idx, causal, causal_align, window,
                                       softcap, alibi_slopes, scale, return_lse,
                                       backends.forced_by_use_backend())
        if result is not None:
            return result
    fn = "attention_with_kv_cache"
    _check_tokens(fn, q, k_cache, v_cache, 4, "[B, H, N, D]")
    B, Hq, Lq, E = q.shape
    n_cache, Hk, rows, Ev = v_cache.shape
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != E:
        raise FastattnValueError(
            f"{fn}: k_cache must be [{n_cache}, {Hk}, {rows}, {E}] (v_cache's first dims, q's "
            f"head dim), got k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.shape[-1] > 1 and cache.stride(-1) != 1:
            raise FastattnValueError(
                f"{fn}: {name} must have a contiguous last dim (it is written in place), got "
                f"strides {cache.stride()}"
            )
    if Hq % Hk if Hk else Hq:
        raise FastattnValueError(f"{fn}: q heads ({Hq}) must be a multiple of cache heads ({Hk})")
    _check_index_tensor(fn, "cache_seqlens", cache_seqlens, 1, q.device)
    if cache_seqlens.shape[0] != B:
        raise FastattnValueError(
            f"{fn}: cache_seqlens must be int32 of shape [{B}], got {tuple(cache_seqlens.shape)}"
        )
    if (k_new is None) != (v_new is None):
        raise FastattnValueError(f"{fn}: pass both k_new and v_new, or neither")
    L_new = 0
    if k_new is not None:
        _check_tokens(fn, q, k_new, v_new, 4, "[B, Hk, L_new, D]")
        L_new = k_new.shape[2]
        for name, new, dim in (("k_new", k_new, E), ("v_new", v_new, Ev)):
            if new.shape != (B, Hk, L_new, dim):
                raise FastattnValueError(
                    f"{fn}: {name} must be [{B}, {Hk}, L_new, {dim}] with k_new's L_new = "
                    f"{L_new}, got {tuple(new.shape)}"
                )
    capacity = rows
    if block_table is not None:
        if cache_batch_idx is not None:
            raise FastattnValueError(f"{fn}: cache_batch_idx must be None with a block_table")
        _check_index_tensor(fn, "block_table", block_table, 2, q.device)
        if block_table.shape[0] != B or rows == 0:
            raise FastattnValueError(
                f"{fn}: block_table must be [{B}, max_blocks] and the block size (k_cache dim 2) "
                f"positive, got block_table {tuple(block_table.shape)}, block size {rows}"
            )
        capacity = block_table.shape[1] * rows
    elif cache_batch_idx is not None:
        _check_index_tensor(fn, "cache_batch_idx", cache_batch_idx, 1, q.device)
        if cache_batch_idx.shape[0] != B:
            raise FastattnValueError(
                f"{fn}: cache_batch_idx must be [{B}], got {tuple(cache_batch_idx.shape)}"
            )
    elif n_cache < B:
        raise FastattnValueError(
            f"{fn}: the cache has {n_cache} rows for a batch of {B} (pass cache_batch_idx)"
        )
    opts, alibi = attention_options(
        fn, q, B, causal=causal, causal_align=causal_align, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes, scale=scale,
    )
    backend = _choose_backend(fn, q.device, q.dtype, E, Ev, *_grid_extent(B, Hq))
    use_reference = backend == "reference" or 0 in (Hq, E, Ev)
    # The C++ CPU op checks these values itself, before it writes anything: checking them here
    # too cost more than the rest of a decode step (~80 us of H 8, S 512's ~190).
    kernel_checks_values = backend == "cpu" and not use_reference
    if not kernel_checks_values and _value_checks_wanted(check_values) and B > 0:
        end = cache_seqlens + L_new
        facts = [((cache_seqlens >= 0).all() & (end <= capacity).all(),
                  lambda: f"cache_seqlens + L_new must lie in [0, {capacity}] (the capacity per "
                  f"sequence), got {cache_seqlens.tolist()} + {L_new}")]
        if block_table is not None and block_table.shape[1] > 0:
            used = torch.arange(block_table.shape[1], device=q.device) * rows < end[:, None]
            bad = used & ((block_table < 0) | (block_table >= n_cache))
            facts.append((~bad.any(), lambda: f"block_table entries of used blocks must lie in "
                          f"[0, {n_cache}), got {block_table[bad].tolist()}"))
        if cache_batch_idx is not None:
            facts.append((((cache_batch_idx >= 0) & (cache_batch_idx < n_cache)).all(),
                          lambda: f"cache_batch_idx must lie in [0, {n_cache}), got "
                          f"{cache_batch_idx.tolist()}"))
        _raise_failed(fn, facts)

    args = (cache_seqlens, k_new, v_new, block_table, cache_batch_idx, alibi,
            *_scalar_options(opts))
    with torch.no_grad():
        if use_reference:
            out, lse = reference.attention_kv_cache_reference(q, k_cache, v_cache, *args)
        else:
            op = torch.ops.fastattn.attention_kv_cache_fwd
            op = _triton_ops()[1] if backend == "triton" else _kernel_value_errors(op)
            out, lse = op(_last_dim_contiguous(q), k_cache, v_cache, *args)
    out, lse = not_differentiable(fn, (out, lse), (q, k_cache, v_cache, k_new, v_new, alibi_slopes))
    return (out, lse) if return_lse else out


# ---- op registration: fake kernels and autograd (the C++ ops; the Triton varlen op's autograd
# is registered in _triton_ops, on first use, with the same backward) ----


@torch.library.register_fake("fastattn::attention_varlen_fwd")
def _attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               *options):
    total_q, Hq, _ = q.shape
    return q.new_empty(total_q, Hq, v.shape[-1]), q.new_empty(Hq, total_q, dtype=torch.float32)


@torch.library.register_fake("fastattn::attention_varlen_bwd")
def _attention_varlen_bwd_fake(grad_out, q, k, v, *rest):
    # Every backend returns fresh contiguous gradients, whatever the inputs' strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("fastattn::attention_kv_cache_fwd")
def _attention_kv_cache_fwd_fake(q, k_cache, v_cache, *rest):
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Hq, Lq, v_cache.shape[-1]), q.new_empty(B, Hq, Lq, dtype=torch.float32)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, alibi, dropout_p, rng_seed, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, rng_seed)
    ctx.max_seqlens = (max_q, max_k)
    ctx.options = (dropout_p, *options)


def _make_varlen_backward(bwd_op_name: str) -> Callable:
    @first_order_only(f"fastattn::{bwd_op_name.replace('_bwd', '_fwd')}")
    def backward(ctx, grad_out, grad_lse):
        # lse is an auxiliary output (returned detached by the public API).
        q, k, v, out, lse, cu_q, cu_k, alibi, rng_seed = ctx.saved_tensors
        dropout_p, *options = ctx.options
        dq, dk, dv = getattr(torch.ops.fastattn, bwd_op_name)(
            grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, alibi,
            dropout_p, rng_seed, *options,
        )
        return dq, dk, dv, *([None] * 12)

    return backward


register_autograd(
    "fastattn::attention_varlen_fwd",
    _make_varlen_backward("attention_varlen_bwd"),
    setup_context=_varlen_setup_context,
)
