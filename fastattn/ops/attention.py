"""Scaled-dot-product attention: input checks, layout normalization, backend choice, autograd.

``scaled_dot_product_attention`` is a drop-in for ``torch.nn.functional``'s; ``attention`` adds
FlashAttention's options (windows, bottom-right causal, softcap, ALiBi, LSE). Both reduce a
call to the normalized op ``fastattn::attention_fwd`` (layout documented in _registry.py),
served by the backend that ``backends.choose`` picks.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.nn.attention.bias import CausalBias, CausalVariant

from fastattn import _extension
from fastattn.ops import backends, reference
from fastattn.ops._autograd import differentiable, first_order_only, register_autograd
from fastattn.ops._registry import LIBRARY  # noqa: F401  (schemas must exist before registering)
from fastattn.ops.errors import (
    FastattnIndexError,
    FastattnNotImplementedError,
    FastattnTypeError,
    FastattnValueError,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT32_MAX = torch.finfo(torch.float32).max
# The head dims the CUDA kernels are compiled for, from the one list in
# csrc/include/fastattn/attention_head_dims.h (empty without the extension: no cuda backend).
CUDA_HEAD_DIMS = tuple(_extension.C.attention_cuda_head_dims()) if _extension.C else ()
TRITON_MAX_HEAD_DIM = 256
# A CUDA grid's y and z dimensions hold at most this many blocks. The CUDA kernels put the query
# heads on y and the batch on z; the Triton kernels put batch * heads on y. Checked here, with
# the rest of what a backend cannot serve, so that auto falls back instead of the glue raising.
GRID_YZ_MAX = 65535
# What falling back to the reference backend costs (ReferenceFallbackWarning's text).
_REFERENCE_COST = "materializes the full L x S score matrix (O(L * S) memory)"


class AttentionOptions(NamedTuple):
    """The arguments of attention_fwd/bwd after attn_mask and alibi_slopes, in schema order
    (_ATTENTION_OPTIONS in _registry.py): every call, fake and backward passes them on as
    ``*options.op_args()`` and reads them back as ``AttentionOptions(*args)``. A NamedTuple:
    a frozen dataclass cost ~1.5 us per call to build and unpack, a quarter of the Python of a
    short sequence's call."""

    dropout_p: float = 0.0
    # int64 CPU scalar tensor seeding dropout's Philox stream; None when dropout_p == 0.
    rng_seed: torch.Tensor | None = None
    scale: float = 1.0
    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    softcap: float = 0.0

    def op_args(self) -> tuple:
        return tuple(self)


_OPTION_NAMES = AttentionOptions._fields
_NO_OPTION_GRADS = (None,) * len(_OPTION_NAMES)
# Where rng_seed sits in the options as the ops take them (setup_context saves it as a tensor).
_SEED_INDEX = _OPTION_NAMES.index("rng_seed")
# The C++ op as its OpOverload: calling it skips the packet's overload resolution.
_ATTENTION_FWD = torch.ops.fastattn.attention_fwd.default
# scaled_dot_product_attention and attention of a plain eager CPU call (no ALiBi or dropout;
# 4-D tensors the op takes as they are, a mask that broadcasts to them without conversion;
# nothing intercepting the call), run in C++ without this module's ~11 us of checks and
# normalization (and its autograd.Function's ~55 us), which reach the same op calls
# (csrc/attention/attention_eager_entry.cpp lists the conditions); None for any other call.
_EAGER_ENTRY = _extension.C.attention_eager_entry if _extension.C else None
_OPTIONS_EAGER_ENTRY = _extension.C.attention_options_eager_entry if _extension.C else None


def _dropout_seed(dropout_p: float) -> torch.Tensor | None:
    """The seed of a call's dropout, drawn from torch's default generator so that
    torch.manual_seed makes dropout repeatable."""
    return torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else None


def _missing_feature(
    backend: str, dtype: torch.dtype, E: int, Ev: int, batch: int, q_heads: int
) -> str | None:
    """What of a call with these inputs ``backend`` cannot serve (None when it can)."""
    if backend == "cuda":
        if dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {dtype} (the cuda kernels take float16 and bfloat16)"
        if E != Ev or E not in CUDA_HEAD_DIMS:
            return f"head dims E={E}, Ev={Ev} (the cuda kernels take E == Ev in {CUDA_HEAD_DIMS})"
        if batch > GRID_YZ_MAX or q_heads > GRID_YZ_MAX:
            return (f"batch {batch} x query heads {q_heads} (the cuda kernels take at most "
                    f"{GRID_YZ_MAX} of each)")
    if backend == "triton":
        if dtype == torch.float64:
            return "dtype float64 (triton takes float16, bfloat16 and float32)"
        if max(E, Ev) > TRITON_MAX_HEAD_DIM:
            return f"head dim {max(E, Ev)} (triton takes up to {TRITON_MAX_HEAD_DIM})"
        if batch * q_heads > GRID_YZ_MAX:
            return (f"batch {batch} x query heads {q_heads} (the triton kernels take "
                    f"batch * heads <= {GRID_YZ_MAX})")
    return None


# Evaluated while torch.compile traces, so a compiled graph bakes in the backend choice instead
# of graph-breaking on the backend registry (a ContextVar and the environment).
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
def _triton_fwd_op() -> Callable:
    # Imported on first use: triton is optional and slow to import.
    from fastattn.triton_kernels import attention as _  # noqa: F401  (defines the triton_ops)

    register_autograd(
        "fastattn::attention_fwd_triton",
        _make_backward("attention_bwd_triton"),
        setup_context=_setup_context,
    )
    return torch.ops.fastattn.attention_fwd_triton


def _grid_extent(batch, q_heads) -> tuple[int, int]:
    """(batch, q_heads) as _choose_backend takes them: 1, 1 when within every backend's grid
    limits, so that a batch size that changes between calls neither hands torch.compile's
    constant-folded choice a symbolic int nor recompiles it; the real values (specialized)
    only past a limit."""
    if batch * q_heads <= GRID_YZ_MAX:
        return 1, 1
    return int(batch), int(q_heads)


def _attention_fwd_eager(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_fwd run below the Autograd dispatch key, as the op's registered autograd kernel
    runs it when no graph is recorded, without that kernel's Python: torch.library's
    autograd_impl scans the arguments, builds a dataclass and looks the schema up again on every
    call (~6 us, a quarter of an L = 16 forward)."""
    with torch._C._AutoDispatchBelowAutograd():
        return _ATTENTION_FWD(*args)


def _fwd_op(backend: str, needs_grad: bool) -> Callable:
    if backend == "triton":
        return differentiable(_triton_fwd_op())
    # Traced calls (torch.compile, torch.jit.trace: a trace records the op, which saves and
    # trains, and the same op with and without grad mode) and calls under torch.func transforms
    # go through the op's registered autograd.
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active()):
        return differentiable(torch.ops.fastattn.attention_fwd)
    return _attention_with_grad if needs_grad else _attention_fwd_eager


def _attention_normalized(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    opts: AttentionOptions,
    op_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs attention on normalized [B, H, L, E] tensors with the chosen backend."""
    # The head dims as plain ints: under torch.compile(dynamic=True) operator.index specializes
    # them (a guard on their values; int() would keep them symbolic, which the constant-folded
    # choice cannot take). Head dims are a model's constants, the lengths stay dynamic.
    E, Ev = operator.index(q.shape[-1]), operator.index(v.shape[-1])
    backend = _choose_backend(op_name, q.device, q.dtype, E, Ev,
                              *_grid_extent(q.shape[0], q.shape[1]))
    if backend == "reference" or _has_empty_dim(q, k, v):
        return reference.attention_reference(q, k, v, attn_mask, alibi_slopes, *opts.op_args())
    # Kernels need unit stride on the last dim; everything else is read through strides.
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, attn_mask)
    )
    return _fwd_op(backend, needs_grad)(q, k, v, attn_mask, alibi_slopes, *opts.op_args())


def _has_empty_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a dim of the call is 0: the plain-PyTorch reference serves those (kernel grids
    and head-dim dispatch need positive sizes). A size only known at run time (an unbacked
    batch under torch.export) counts as nonempty rather than guarding on it."""
    n, s, ev = q.numel(), k.shape[-2], v.shape[-1]
    if type(n) is int and type(s) is int and type(ev) is int:  # plain sizes (eager): no guards
        return not (n and s and ev)
    if torch.jit.is_tracing():  # sizes are 0-D tensors; the trace keeps the answer as a constant
        return not (int(n) and int(s) and int(ev))
    return any(guard_or_false(n == 0) for n in (*q.shape, k.shape[-2], v.shape[-1]))


def _check_tensors(fn: str, q, k, v, empty_may_be_any_dtype: bool = False) -> None:
    """Tensors of at least 2 dims, of one float dtype and on one device: what torch's SDPA
    checks before anything else (validate_sdpa_input), and the dtype. With
    empty_may_be_any_dtype, a call with no query or an empty value may have any dtype (torch
    returns its zeros before it looks at the dtype)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise FastattnTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise FastattnValueError(
                f"{fn}: {name} must have shape (..., seq, dim), got {tuple(t.shape)}"
            )
    device = q.device
    for name, t in (("key", k), ("value", v)):
        if t.dtype != q.dtype:
            raise FastattnTypeError(
                f"{fn}: {name} dtype {t.dtype} does not match query dtype {q.dtype}"
            )
        if t.device != device:
            raise FastattnValueError(f"{fn}: {name} is on {t.device} but query is on {device}")
    dtype = q.dtype
    if dtype not in _FLOAT_DTYPES and not (
        empty_may_be_any_dtype and _no_query_or_value(q.shape, v)
    ):
        # torch has no kernel for complex or float8 (NotImplementedError), and rejects integer
        # and bool inputs with RuntimeError: both are caught as they are from torch.
        error = (FastattnNotImplementedError if dtype.is_complex or dtype.is_floating_point
                 else FastattnTypeError)
        raise error(f"{fn}: query, key and value must be float16, bfloat16, float32 or float64, "
                    f"got {dtype}")


def _check_shapes(fn: str, qs: torch.Size, ks: torch.Size, vs: torch.Size,
                  heads_dim_allowed_to_differ: bool) -> None:
    """The shapes qs, ks, vs of query, key, value as the kernels take them (key and value with
    the same heads)."""
    if ks[-1] != qs[-1]:
        raise FastattnValueError(
            f"{fn}: key head dim {ks[-1]} must equal query head dim {qs[-1]} "
            f"(query {tuple(qs)}, key {tuple(ks)})"
        )
    if vs[-2] != ks[-2]:
        raise FastattnValueError(
            f"{fn}: value length {vs[-2]} must equal key length {ks[-2]} "
            f"(key {tuple(ks)}, value {tuple(vs)})"
        )
    if ks[:-2] != vs[:-2]:
        raise FastattnValueError(
            f"{fn}: key and value batch dims differ: {tuple(ks[:-2])} vs {tuple(vs[:-2])}"
        )
    if len(qs) != len(ks):
        raise FastattnValueError(f"{fn}: query has {len(qs)} dims but key has {len(ks)}")
    batch_dims = len(qs) - 2
    if heads_dim_allowed_to_differ and batch_dims >= 1:
        hq, hk = qs[-3], ks[-3]
        if hq % hk if hk else hq:  # no heads at all (hq = hk = 0) is an empty call
            raise FastattnValueError(
                f"{fn}: with enable_gqa, query heads ({hq}) must be a multiple of key/value "
                f"heads ({hk})"
            )
        batch_dims -= 1
    if qs[:batch_dims] != ks[:batch_dims]:
        raise FastattnValueError(
            f"{fn}: query batch dims {tuple(qs[:-2])} do not match key/value batch dims "
            f"{tuple(ks[:-2])}"
            + ("" if heads_dim_allowed_to_differ else " (set enable_gqa=True for grouped heads)")
        )


def _check_qkv(fn: str, q, k, v, heads_dim_allowed_to_differ: bool) -> None:
    _check_tensors(fn, q, k, v)
    # The shapes fetched once: each .shape builds a torch.Size (this runs on every call).
    _check_shapes(fn, q.shape, k.shape, v.shape, heads_dim_allowed_to_differ)


def _broadcast_batch_dims(q, k, v, enable_gqa: bool) -> tuple | None:
    """q, k, v expanded (stride-0 views) to their common batch dims, as torch's SDPA broadcasts
    them (e.g. one key/value shared by a batch, or by every head: k [B, 1, S, E]). With
    enable_gqa the head dims (-3) stay as they are and only the dims before them broadcast.
    None when that changes nothing or they do not broadcast."""
    kept = 3 if enable_gqa and min(q.dim(), k.dim(), v.dim()) >= 3 else 2
    lead = [t.shape[:-kept] for t in (q, k, v)]
    if lead[0] == lead[1] == lead[2]:
        return None
    try:
        batch = torch.broadcast_shapes(*lead)
    except RuntimeError:
        return None
    return tuple(t.expand(*batch, *t.shape[-kept:]) for t in (q, k, v))


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., H, N, D) -> [B, H, N, D] without copying when the strides allow."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    # flatten, not reshape(-1, ...): -1 is ambiguous when another dim is 0.
    return t.flatten(0, t.dim() - 4)


def _causal_bias_is_bottom_right(fn: str, bias: CausalBias, L: int, S: int) -> bool:
    """torch's CausalBias attn_mask (causal_upper_left / causal_lower_right) as the op's causal
    alignment, as torch's own dispatch reads it: upper-left, or any square bias, is top-left
    causal (its sizes unchecked, as in torch); lower-right must match (L, S)."""
    if bias.variant == CausalVariant.UPPER_LEFT or bias.seq_len_q == bias.seq_len_kv:
        return False
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise FastattnValueError(
            f"{fn}: causal_lower_right({bias.seq_len_q}, {bias.seq_len_kv}) attn_mask does not "
            f"match the query/key lengths (L, S) = ({L}, {S})"
        )
    return True


def _check_mask_type(fn: str, attn_mask) -> None:
    """attention's attn_mask: None, or a bool or floating-point tensor (_mask_4d converts any
    but float32 to q's dtype; scaled_dot_product_attention takes float32 or q's, as torch)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise FastattnTypeError(
            f"{fn}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise FastattnTypeError(
            f"{fn}: attn_mask must be bool or floating point, got {attn_mask.dtype}"
        )


def _mask_4d(fn: str, attn_mask, q: torch.Tensor, S: int) -> torch.Tensor | None:
    """The mask (a tensor of a checked dtype, or None) as a [B, Hq, L, S] broadcast view of
    bool, float32 or q's dtype: torch's SDPA takes a float32 mask with any q and adds it at
    float32 precision, so it is not rounded to a float16 / bfloat16 q's dtype (every backend
    reads a float32 mask at float32 precision)."""
    if attn_mask is None:
        return None
    if attn_mask.device != q.device:
        raise FastattnValueError(
            f"{fn}: attn_mask is on {attn_mask.device} but query is on {q.device}"
        )
    target = torch.Size((*q.shape[:-1], S))
    try:
        # torch.broadcast_shapes is Python (~11 us, half of a masked L = 8 call's Python): plain
        # sizes go to the C++ it stands for. Traced sizes keep it, which does not specialize them
        # (torch.compile) or takes the 0-D tensors torch.jit.trace gives for sizes.
        broadcast = (torch.broadcast_shapes
                     if torch.compiler.is_compiling() or torch.jit.is_tracing()
                     else torch._C._infer_size)
        if broadcast(attn_mask.shape, target) != target:
            raise RuntimeError
    except RuntimeError:
        raise FastattnValueError(
            f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
            f"(..., L, S) = {tuple(target)}"
        ) from None
    keep = (torch.bool, torch.float32, q.dtype)
    mask = attn_mask if attn_mask.dtype in keep else attn_mask.to(q.dtype)
    return _as_4d(mask.expand(target)) if len(target) > 2 else mask.expand(1, 1, *target)


def _torch_flash_gate(q, k, v, mask, dropout_p, enable_gqa: bool, whole: bool) -> bool:
    """Whether torch's CPU SDPA picks its flash kernel for these (well-formed) inputs
    (use_flash_attention_cpp in sdp_utils_cpp.cpp), or with ``whole`` false, whether its checks
    reach the attn_mask's shape (check_attn_mask_shape). Some of torch's answers hang on that
    choice, and fastattn gives them too: a 0-D or 1-D mask makes that check raise IndexError;
    the flash kernel takes is_causal with a mask, which the math one refuses, and refuses a
    negative or NaN dropout_p, which the math one ignores."""
    if not (q.device.type == "cpu" and torch.backends.cuda.flash_sdp_enabled()
            and not dropout_p > 0 and q.dim() == k.dim() == v.dim() == 4):
        return False
    (B, Hq, L, E), (Bk, Hk, S, Ek), (Bv, Hv, _, Ev) = q.shape, k.shape, v.shape
    if not B == Bk == Bv or Hk != Hv or (Hq % Hk if enable_gqa else Hq != Hk):
        return False
    if mask is not None and mask.requires_grad:
        return False
    if not whole:
        return True
    m = (L, S) if mask is None else mask.shape
    if not (len(m) == 2 or len(m) == 4 and m[0] in (1, B) and m[1] in (1, Hq)):
        return False
    if not (m[-2] in (1, L) and m[-1] in (1, S)):
        return False
    return (E == Ek == Ev and L > 0 and S > 0
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def _empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's SDPA of a call with no query (L = 0) or an empty value, whatever the other
    shapes: zeros of shape (..., L, Ev) made to depend on every input, so that each gets a zero
    gradient of its shape (and NaN or inf anywhere in the inputs makes every output NaN). The
    same expression as torch's, for the same dtypes and gradients."""
    return q.new_zeros((*q.shape[:-1], v.shape[-1])) + (q.sum() + k.sum() + v.sum()) * 0


def _no_query_or_value(qs: torch.Size, value: torch.Tensor) -> bool:
    """Whether L = 0 or value is empty, calls torch answers with _empty_attention. A size only
    known at run time (torch.compile, export) counts as nonzero rather than guarding on it."""
    L, n = qs[-2], value.numel()
    if type(L) is int and type(n) is int:  # plain sizes (eager): no guards (runs on every call)
        return not (L and n)
    if torch.jit.is_tracing():  # sizes are 0-D tensors; the trace keeps the answer as a constant
        return not (int(L) and int(n))
    return guard_or_false(L == 0) or guard_or_false(n == 0)


def _float_arg(fn: str, name: str, x) -> float:
    """x, not a float, as a float, taken as torch's argument parser takes a float: any real
    number (int, bool, NumPy scalar, SymFloat) or a 0-D tensor that does not require grad;
    TypeError for anything else."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 and not x.requires_grad:
            return float(x)
    elif isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)):
        return float(x)
    raise FastattnTypeError(f"{fn}: {name} must be a float, got {type(x).__name__}")


def _common_kv_heads(q, k, v) -> tuple | None:
    """k and v with their heads (dim -3) repeated to a common count, when enable_gqa gives them
    different ones that each divide q's (torch repeats each to q's heads): lcm(Hk, Hv) heads,
    which q's head h reads as h // (Hq / lcm), as torch's k head h // (Hq / Hk). None when
    that does not apply."""
    if min(q.dim(), k.dim(), v.dim()) < 3:
        return None
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if hk == hv or not hk or not hv or hq % hk or hq % hv:
        return None
    heads = math.lcm(hk, hv)
    return (k.repeat_interleave(heads // hk, dim=-3), v.repeat_interleave(heads // hv, dim=-3))


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, fused.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev) in query's dtype; the
    batch dims (...) broadcast against each other, as in torch.
    attn_mask: bool (True = may attend) or float (added to the scores; float32 or query's dtype,
    as torch), broadcastable to (..., L, S). is_causal: top-left aligned causal mask (as torch).
    scale: default 1/sqrt(E). enable_gqa: dim -3 of query may be a multiple of key's and of
    value's (grouped-query attention).
    dropout_p applies to the attention probabilities (pass 0 in eval, as with torch); at 1 the
    output is zeros, as torch's.
    A query row with no visible key yields zeros and zero gradients, as torch's does (its
    _safe_softmax, torch >= 2.5). is_causal with a scale <= 0 gives the attention (torch's CPU
    flash kernel yields NaN everywhere there; its math kernel, the attention).
    Takes and rejects what torch's does on the CPU, with its results: zeros when L = 0 or value
    is empty, whatever the other shapes; is_causal with a mask where torch's flash kernel
    serves the call; a 0-D or 1-D mask raises IndexError there.
    """
    if _EAGER_ENTRY is not None and not torch.compiler.is_compiling():
        out = _EAGER_ENTRY(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                           backends.forced_by_use_backend())
        if out is not None:
            return out
    fn = "scaled_dot_product_attention"
    if is_causal is not False and is_causal is not True:
        raise FastattnTypeError(f"{fn}: is_causal must be a bool, got {type(is_causal).__name__}")
    if enable_gqa is not False and enable_gqa is not True:
        raise FastattnTypeError(f"{fn}: enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if scale is not None and type(scale) is not float:
        scale = _float_arg(fn, "scale", scale)
    if type(dropout_p) is not float:
        dropout_p = _float_arg(fn, "dropout_p", dropout_p)
    if scale is not None and not abs(scale) <= _FLOAT32_MAX:
        # A scale that is NaN or infinite in float32 makes NaN or zeros, as torch's kernel (flash
        # or math) happens to treat NaN and infinite scores; fastattn's kernels refuse it, and
        # torch's own result is the drop-in's answer.
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
            enable_gqa=enable_gqa)
    _check_tensors(fn, query, key, value, empty_may_be_any_dtype=True)
    qs, ks, vs = query.shape, key.shape, value.shape
    bottom_right = False
    if attn_mask is not None:
        if isinstance(attn_mask, CausalBias):
            if is_causal:
                raise FastattnValueError(
                    f"{fn}: attn_mask must be None when is_causal=True (as in torch)"
                )
            bottom_right = _causal_bias_is_bottom_right(fn, attn_mask, qs[-2], ks[-2])
            attn_mask, is_causal = None, True
        elif not isinstance(attn_mask, torch.Tensor):
            raise FastattnTypeError(
                f"{fn}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
            )
        elif attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise FastattnTypeError(
                f"{fn}: attn_mask must be bool, float32 or query's dtype {query.dtype} "
                f"(as torch), got {attn_mask.dtype}"
            )
    # torch returns zeros here, before it looks at the other shapes.
    if _no_query_or_value(qs, value):
        return _empty_attention(query, key, value)
    if (attn_mask is not None and attn_mask.dim() < 2
            and _torch_flash_gate(query, key, value, attn_mask, dropout_p, enable_gqa, False)):
        raise FastattnIndexError(
            f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} has no (L, S) dims: torch's "
            f"CPU flash path raises IndexError for it (broadcast it to 2-D)"
        )
    if enable_gqa and min(query.dim(), key.dim(), value.dim()) < 3:
        raise FastattnIndexError(f"{fn}: enable_gqa needs a heads dim (-3) in query, key and "
                                 f"value (torch raises IndexError), got {query.dim()}-D, "
                                 f"{key.dim()}-D and {value.dim()}-D")
    # The call as torch takes it; the kernels' conditions only looked at when unmet (free on
    # every well-formed call).
    original = query, key, value
    try:
        _check_shapes(fn, qs, ks, vs, enable_gqa)
    except FastattnValueError:
        # key and value heads that differ under enable_gqa, batch dims that broadcast (e.g. one
        # key/value shared by a batch): if neither applies, the error stands.
        kv = _common_kv_heads(query, key, value) if enable_gqa else None
        if kv is not None:
            key, value = kv
        expanded = _broadcast_batch_dims(query, key, value, enable_gqa)
        if expanded is not None:
            query, key, value = expanded
        elif kv is None:
            raise
        _check_shapes(fn, query.shape, key.shape, value.shape, enable_gqa)
    if dropout_p > 1.0:
        raise FastattnValueError(f"{fn}: dropout_p must be in [0, 1], got {dropout_p}")
    if (is_causal and attn_mask is not None
            and not _torch_flash_gate(*original, attn_mask, dropout_p, enable_gqa, True)):
        raise FastattnValueError(f"{fn}: attn_mask must be None when is_causal=True (as in torch)")
    # torch drops nothing when dropout_p is not > 0 (negative, NaN); at 1 it drops everything:
    # its dropout gives zeros there (not 0 / (1 - p)), so the output and the gradients are
    # zeros, NaN where the attention is NaN, as in torch.
    drop_all = dropout_p == 1.0
    if not dropout_p > 0:
        if dropout_p != 0 and _torch_flash_gate(*original, attn_mask, dropout_p, enable_gqa, True):
            raise FastattnValueError(f"{fn}: dropout_p must be in [0, 1], got {dropout_p} (torch's "
                                     f"CPU flash path raises for it)")
        dropout_p = 0.0
    elif drop_all:
        dropout_p = 0.0
    E = query.shape[-1]
    mask = _mask_4d(fn, attn_mask, query, key.shape[-2])
    opts = AttentionOptions(
        dropout_p=float(dropout_p),
        rng_seed=_dropout_seed(dropout_p),
        scale=scale if scale is not None else 1.0 / math.sqrt(E) if E else 1.0,
        window_right=0 if is_causal else -1,
        bottom_right=bottom_right,
    )
    out, _ = _attention_normalized(_as_4d(query), _as_4d(key), _as_4d(value), mask, None, opts, fn)
    out = out if query.dim() == 4 else out.reshape(*query.shape[:-1], value.shape[-1])
    return out * 0.0 if drop_all else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    causal_align: str = "top_left",
    window: tuple[int, int] = (-1, -1),
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's options on q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev].

    causal: key j visible to query i only if j <= i + offset, offset = 0 for
    causal_align="top_left" (torch) or S - L for "bottom_right" (FlashAttention).
    window=(left, right): key j visible iff i + offset - left <= j <= i + offset + right
    (-1 = unbounded); with causal, right is capped at 0.
    softcap: scores become softcap * tanh(scores / softcap). alibi_slopes: float32 [Hq] or
    [B, Hq], adds slope * (j - i - offset). attn_mask as in scaled_dot_product_attention.
    return_lse: also return the log-sum-exp of the scores, float32 [B, Hq, L] (detached),
    for merging partial attention results.
    """
    if _OPTIONS_EAGER_ENTRY is not None and not torch.compiler.is_compiling():
        result = _OPTIONS_EAGER_ENTRY(q, k, v, causal, causal_align, window, softcap, alibi_slopes,
                                      attn_mask, dropout_p, scale, return_lse,
                                      backends.forced_by_use_backend())
        if result is not None:
            return result
    fn = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 4:
            raise FastattnValueError(
                f"{fn}: {name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}"
            )
    _check_qkv(fn, q, k, v, heads_dim_allowed_to_differ=True)
    if isinstance(attn_mask, CausalBias):
        if causal:
            raise FastattnValueError(f"{fn}: pass causal=True or a CausalBias attn_mask, not both")
        bottom_right = _causal_bias_is_bottom_right(fn, attn_mask, q.shape[-2], k.shape[-2])
        attn_mask, causal = None, True
        causal_align = "bottom_right" if bottom_right else "top_left"
    _check_mask_type(fn, attn_mask)
    mask = _mask_4d(fn, attn_mask, q, k.shape[-2])
    opts, alibi_slopes = attention_options(
        fn, q, q.shape[0], causal=causal, causal_align=causal_align, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, scale=scale,
    )
    out, lse = _attention_normalized(q, k, v, mask, alibi_slopes, opts, fn)
    return (out, lse.detach()) if return_lse else out


def attention_options(
    fn: str,
    q: torch.Tensor,
    batch: int,
    *,
    causal: bool = False,
    causal_align: str = "top_left",
    window: tuple[int, int] = (-1, -1),
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[AttentionOptions, torch.Tensor | None]:
    """Checks ``attention``'s keyword options (documented there) for a call named ``fn`` and
    returns them as the ops' AttentionOptions, with the ALiBi slopes float32 contiguous.

    Shared by attention, attention_varlen and attention_with_kv_cache: ``q``'s last dim is the
    head dim E (default scale 1/sqrt(E)) and ``batch`` the number of sequences, so that
    alibi_slopes may be [Hq] or [batch, Hq], Hq = q.shape[1] (true of q [B, Hq, L, E] and of
    varlen's q [total_q, Hq, E]).
    """
    if causal_align not in ("top_left", "bottom_right"):
        raise FastattnValueError(
            f"{fn}: causal_align must be 'top_left' or 'bottom_right', got {causal_align!r}"
        )
    if not (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) and w >= -1 for w in window)
    ):
        raise FastattnValueError(
            f"{fn}: window must be (left, right) ints >= -1 (-1 = unbounded), got {window!r}"
        )
    if softcap is not None and not softcap > 0:
        raise FastattnValueError(f"{fn}: softcap must be positive or None, got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise FastattnValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    B, Hq, E = batch, q.shape[1], q.shape[-1]
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.shape not in (
            torch.Size([Hq]),
            torch.Size([B, Hq]),
        ):
            raise FastattnValueError(
                f"{fn}: alibi_slopes must be a tensor of shape [{Hq}] or [{B}, {Hq}], got "
                f"{getattr(alibi_slopes, 'shape', type(alibi_slopes).__name__)}"
            )
        if alibi_slopes.device != q.device:
            raise FastattnValueError(
                f"{fn}: alibi_slopes is on {alibi_slopes.device} but q is on {q.device}"
            )
        alibi_slopes = alibi_slopes.to(torch.float32).contiguous()
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    opts = AttentionOptions(
        dropout_p=float(dropout_p),
        rng_seed=_dropout_seed(dropout_p),
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(E) if E else 1.0,
        window_left=left,
        window_right=right,
        bottom_right=causal_align == "bottom_right",
        softcap=float(softcap or 0.0),
    )
    return opts, alibi_slopes


# ---- op registration: fake kernels and autograd for the C++ and Triton attention ops ----


@torch.library.register_fake("fastattn::attention_fwd")
def _attention_fwd_fake(q, k, v, attn_mask, alibi_slopes, *options):
    B, H, L, _ = q.shape
    lse = q.new_empty(B, H, L, dtype=torch.float32)
    if q.device.type != "cpu":
        return q.new_empty(B, H, L, v.shape[-1]), lse
    # The CPU op lays out out as torch's CPU flash kernel does (csrc/attention/attention_cpu.cpp,
    # empty_out_like_query): B, H and L ordered by q's strides as torch's empty_like orders a
    # tensor that is not dense; contiguous where v's head dim differs from q's or q's last dim is
    # strided (the op reads a contiguous copy of q then).
    inner_first = [2, 1, 0]
    if v.shape[-1] == q.shape[-1] and not (q.shape[-1] > 1 and q.stride(-1) != 1):
        def compare(a, b):  # > 0: dim a goes outside dim b; 0: no order between them
            sa, sb = q.stride(a), q.stride(b)
            if sa == 0 or sb == 0:
                return 0
            if sa != sb:
                return 1 if sa > sb else -1
            return 1 if q.shape[a] > q.shape[b] else 0

        for i in (1, 2):
            moving = i
            for j in range(i - 1, -1, -1):
                c = compare(inner_first[j], inner_first[moving])
                if c < 0:
                    break
                if c > 0:
                    inner_first[j], inner_first[moving] = inner_first[moving], inner_first[j]
                    moving = j
    order = inner_first[::-1]
    out = q.new_empty(*(q.shape[d] for d in order), v.shape[-1])
    return out.permute(*(order.index(d) for d in range(3)), 3), lse


@torch.library.register_fake("fastattn::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, *options_mask_grad):
    B, H, L, _ = q.shape
    mask_grad = options_mask_grad[-1]
    # In the accumulation dtype: float64 for float64 inputs, else float32.
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dmask = q.new_empty(B, H, L, k.shape[-2], dtype=acc) if mask_grad else q.new_empty(0, dtype=acc)
    # Every backend returns fresh contiguous gradients, whatever the inputs' strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, *options = inputs
    out, lse = output
    # The seed is a tensor: saved as one, not kept on ctx. The options stay the op's arguments
    # (an AttentionOptions rebuilt here and in backward costs microseconds per call).
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, options[_SEED_INDEX])
    ctx.options_before_seed = tuple(options[:_SEED_INDEX])
    ctx.options_after_seed = tuple(options[_SEED_INDEX + 1:])
    ctx.mask_grad = attn_mask is not None and attn_mask.requires_grad


def _make_backward(bwd_op_name: str) -> Callable:
    bwd_op = getattr(torch.ops.fastattn, bwd_op_name).default

    @first_order_only(f"fastattn::{bwd_op_name.replace('_bwd', '_fwd')}")
    def backward(ctx, grad_out, grad_lse):
        # lse is an auxiliary output (returned detached by the public API).
        q, k, v, out, lse, attn_mask, alibi_slopes, rng_seed = ctx.saved_tensors
        # Every backend reads grad_out through its strides but for its last dim.
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv, dmask = bwd_op(
            grad_out, q, k, v, out, lse, attn_mask, alibi_slopes,
            *ctx.options_before_seed, rng_seed, *ctx.options_after_seed, ctx.mask_grad,
        )
        dmask = dmask.to(attn_mask.dtype) if ctx.mask_grad else None
        # No gradient for alibi_slopes nor for the options.
        return dq, dk, dv, dmask, None, *_NO_OPTION_GRADS

    return backward


_attention_backward = _make_backward("attention_bwd")
register_autograd("fastattn::attention_fwd", _attention_backward, setup_context=_setup_context)


class _AttentionFunction(torch.autograd.Function):
    """attention_fwd with its registered setup_context and backward, for eager calls that need
    gradients: torch.library's autograd wrapper of the op costs ~45 us more per forward (its
    fill_defaults rebuilds the schema's argument list once per argument), a twentieth of an fp32
    L = 128 forward+backward on 2 cores. (forward takes ctx, with no setup_context staticmethod:
    Function.apply would bind the arguments through inspect.signature on every call. The options
    come as one tuple: apply costs ~0.4 us per argument.) Traced calls (torch.compile), calls
    under torch.func transforms (which refuse a Function without setup_context) and direct op
    calls keep the op's registered autograd."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, alibi_slopes, options):
        args = (q, k, v, attn_mask, alibi_slopes, *options)
        output = _attention_fwd_eager(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # The registered backward's gradients of q, k, v, attn_mask and alibi_slopes (its Nones
        # for the options collapse into the one for the options tuple).
        return (*_attention_backward(ctx, grad_out, grad_lse)[:5], None)


def _attention_with_grad(q, k, v, attn_mask, alibi_slopes, *options):
    return _AttentionFunction.apply(q, k, v, attn_mask, alibi_slopes, options)
