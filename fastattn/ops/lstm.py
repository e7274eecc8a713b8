"""LSTM functional API: one fused cell step, one fused layer-direction over a sequence.

Op semantics and layouts: fastattn/ops/_registry.py. This module checks inputs, chooses the
backend (fastattn/ops/backends.py), and registers fake kernels and autograd for the ops.

Backends: ``cpu`` and ``cuda`` run fastattn::lstm_layer_fwd/_bwd, one op call per layer and
direction whose time loop runs in C++ (fastattn::lstm_layer_infer when no gradient is needed;
on CPU it also serves lstm_cell then; on CUDA a layer without projection runs the persistent
sequence kernels instead, forward and backward, where they fit, see
csrc/lstm/lstm_cuda.cpp; the choice is made inside the composite ops fastattn::lstm_layer and
fastattn::lstm_cell, which torch.jit.trace records); ``cpu`` and
``cuda`` also run fastattn::lstm_ln_layer_fwd/_bwd for the layer_norm option (one GEMM plus one
fused row pass per step; weight gradients as whole-sequence GEMMs); ``triton`` runs lstm_cell
on the *_triton pointwise ops and lstm_layer on the persistent fastattn::lstm_layer_fwd_triton /
_bwd_triton kernels (layer_norm: fastattn::lstm_ln_layer_fwd_triton / _bwd_triton, the same
kernels), for any H and P. Per size, auto prefers the cuda backend's C++ loop (first in
backends.choose's order) wherever the extension has it: at H >= 512 it beats streaming the
weights on paper (fastattn/triton_kernels/lstm_layer.py has the figures); ``reference`` is plain
PyTorch (fastattn/ops/reference.py).
"""

from __future__ import annotations

import functools
import importlib

import torch

from fastattn import _extension
from fastattn.ops import (
    _registry,  # noqa: F401  (defines the schemas)
    backends,
    linear,
    reference,
)
from fastattn.ops._autograd import differentiable, first_order_only, register_autograd
from fastattn.ops.errors import FastattnTypeError, FastattnValueError

_OPS = torch.ops.fastattn
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# What falling back to the reference backend costs (ReferenceFallbackWarning's text).
_REFERENCE_COST = ("runs the LSTM as unfused PyTorch ops (a kernel launch and a temporary per "
                   "operation, and a Python loop over the time steps of a layer)")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

# The CPU kernels put their vector lanes along the units for a batch B < this (at the ISA this
# process runs, csrc/lstm/lstm_cpu.isa.cpp), else along the batch. That decides the layout of
# x_proj they read fastest, row-major or step-major; the training ops then keep gates_all in
# x_proj's layout (_step_major), and grad_x_proj too except where _GEMM_LAYOUTS says otherwise.
_UNIT_LANES_BELOW = (
    _extension.C.cpu_lstm_unit_lanes_below() if _extension.C is not None else 0)


# bfloat16 layers without a projection run their recurrent products on oneDNN's brgemm (AMX)
# with the lanes along the units at every batch, where this is true.
_BF16_ROWS_ON_BRGEMM = (
    _extension.C.cpu_lstm_bf16_rows_on_brgemm() if _extension.C is not None else False)


def _cpu_unit_lanes(batch: int, dtype: torch.dtype, projection: bool) -> bool:
    return batch < _UNIT_LANES_BELOW or (
        dtype == torch.bfloat16 and not projection and _BF16_ROWS_ON_BRGEMM)


# Whether this CPU is one where fastattn's float32 GEMM beats torch.mm (csrc/include/fastattn/
# cpu_gemm.h): the CPU lstm_layer_bwd then returns grad_x_proj feature-major after a row-major
# forward too, for that GEMM's weight-gradient products.
_GEMM_LAYOUTS = (
    _extension.C.cpu_gemm_wins_on_this_cpu() if _extension.C is not None else False)


def _step_major(t: torch.Tensor) -> bool:
    """Whether a [T, B, 4H] tensor is step-major ([T, 4H, B] in memory): its batch stride is 1.
    The CPU training ops lay gates_all out as x_proj, and grad_x_proj as gates_all, by this rule
    (csrc/lstm/lstm_cpu.cpp), which reads strides only: no guard on a symbolic batch."""
    return t.stride(1) == 1


# Cached: the extension registers its kernels once, when it loads, and the query cost 3 us, a
# tenth of a small cell step's Python time (every lstm_cell / lstm_layer call asks it).
@functools.cache
def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", key)


@functools.cache
def _triton_cell_ops() -> tuple | None:
    """(fwd, bwd) Triton pointwise ops, or None when their module or triton is absent."""
    try:
        importlib.import_module("fastattn.triton_kernels.lstm_cell")
    except ImportError:
        return None
    if not hasattr(_OPS, "lstm_cell_pointwise_fwd_triton"):
        return None
    _register_cell_autograd("fastattn::lstm_cell_pointwise_fwd_triton",
                            _OPS.lstm_cell_pointwise_bwd_triton)
    return _OPS.lstm_cell_pointwise_fwd_triton, _OPS.lstm_cell_pointwise_bwd_triton


@functools.cache
def _triton_layer_fwd():
    """The Triton layer forward op (autograd registered), or None when triton is absent."""
    try:
        importlib.import_module("fastattn.triton_kernels.lstm_layer")
    except ImportError:
        return None
    _register_layer_autograd("fastattn::lstm_layer_fwd_triton", _OPS.lstm_layer_bwd_triton)
    _register_ln_layer_autograd("fastattn::lstm_ln_layer_fwd_triton",
                                _OPS.lstm_ln_layer_bwd_triton)
    return _OPS.lstm_layer_fwd_triton


# ---- fake kernels and autograd -----------------------------------------------------------------


# The cell kernels (CPU and CUDA) return contiguous tensors whatever the inputs' strides.
@torch.library.register_fake("fastattn::lstm_cell_pointwise_fwd")
def _cell_fwd_fake(gates, cx):
    return cx.new_empty(cx.shape), cx.new_empty(cx.shape)


@torch.library.register_fake("fastattn::lstm_cell_pointwise_bwd")
def _cell_bwd_fake(grad_hy, grad_cy, gates, cx, cy):
    return gates.new_empty(gates.shape), cx.new_empty(cx.shape)


def _register_cell_autograd(fwd, bwd) -> None:
    def setup_context(ctx, inputs, output):
        gates, cx = inputs
        ctx.save_for_backward(gates, cx, output[1])

    @first_order_only(fwd)
    def backward(ctx, grad_hy, grad_cy):
        gates, cx, cy = ctx.saved_tensors
        grad_hy = torch.zeros_like(cy) if grad_hy is None else grad_hy
        grad_cy = torch.zeros_like(cy) if grad_cy is None else grad_cy
        return bwd(grad_hy, grad_cy, gates, cx, cy)

    register_autograd(fwd, backward, setup_context=setup_context)


_register_cell_autograd("fastattn::lstm_cell_pointwise_fwd", _OPS.lstm_cell_pointwise_bwd.default)


def _state_widths(x_proj, h0, w_hr):
    T, B, G = x_proj.shape
    P = w_hr.shape[0] if w_hr is not None else G // 4
    return T, B, G // 4, P


@torch.library.register_fake("fastattn::lstm_layer_fwd")
def _layer_fwd_fake(x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h):
    T, B, H, P = _state_widths(x_proj, h0, w_hr)
    hpre = x_proj.new_empty(T, B, H) if w_hr is not None else x_proj.new_empty(0)
    return x_proj.new_empty(T, B, P), x_proj.new_empty(T, B, H), _gates_all_fake(x_proj), hpre


def _gates_all_fake(x_proj):
    # gates_all is in the math dtype on every device; on CPU it is step-major ([T, 4H, B] in
    # memory, csrc/lstm/lstm_cpu.cpp) where x_proj is, else contiguous (as on CUDA,
    # csrc/lstm/lstm_cuda.cpp).
    T, B, G = x_proj.shape
    if x_proj.device.type == "cpu" and _step_major(x_proj):
        return x_proj.new_empty(T, G, B, dtype=_opmath(x_proj.dtype)).permute(0, 2, 1)
    return x_proj.new_empty(T, B, G, dtype=_opmath(x_proj.dtype))


@torch.library.register_fake("fastattn::lstm_layer_infer")
def _layer_infer_fake(input, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                      zoneout_h):
    T, B, _ = input.shape
    return input.new_empty(T, B, h0.shape[1]), input.new_empty(T, B, c0.shape[1])


@torch.library.register_fake("fastattn::lstm_sequence_fwd")
def _sequence_fwd_fake(x_proj, h0, c0, w_hh):
    T, B, G = x_proj.shape
    return x_proj.new_empty(T, B, G // 4), x_proj.new_empty(T, B, G // 4), _gates_all_fake(x_proj)


@torch.library.register_fake("fastattn::lstm_layer_bwd")
def _layer_bwd_fake(grad_h_all, grad_c_all, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                    zoneout_h, h_all, c_all, gates_all, hpre_all):
    # grad_x_proj (in the data dtype) is feature-major ([4H, T, B] in memory) on CPU after a
    # step-major forward, and after a row-major one where fastattn's GEMM takes the weight
    # gradients (csrc/lstm/lstm_cpu.cpp says why), else contiguous; the others are contiguous.
    T, B, G = gates_all.shape
    feature_major = h0.device.type == "cpu" and (_step_major(gates_all) or _GEMM_LAYOUTS)
    grad_x_proj = (h0.new_empty(G, T, B).permute(1, 2, 0) if feature_major
                   else h0.new_empty(T, B, G))
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else h0.new_empty(0)
    return (grad_x_proj, h0.new_empty(h0.shape),
            c0.new_empty(c0.shape), w_hh.new_empty(w_hh.shape), grad_w_hr)


def _layer_setup_context(ctx, inputs, output):
    x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h = inputs
    h_all, c_all, gates_all, hpre_all = output
    ctx.options = (batch_sizes, reverse)
    # No zero-filled gradients for the saved-for-backward outputs (gates_all is [T, B, 4H]).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h0, c0, w_hh, w_hr, zoneout_c, zoneout_h, h_all, c_all, gates_all,
                          hpre_all)


def _register_layer_autograd(fwd: str, bwd) -> None:
    """Autograd of a forward op with lstm_layer_fwd's schema, by ``bwd`` (lstm_layer_bwd's)."""

    @first_order_only(fwd)
    def backward(ctx, grad_h_all, grad_c_all, _grad_gates_all, _grad_hpre_all):
        (h0, c0, w_hh, w_hr, zoneout_c, zoneout_h, h_all, c_all, gates_all,
         hpre_all) = ctx.saved_tensors
        batch_sizes, reverse = ctx.options
        grad_h_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all
        grad_c_all = torch.zeros_like(c_all) if grad_c_all is None else grad_c_all
        grad_x_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr = bwd(
            grad_h_all, grad_c_all, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
            zoneout_h, h_all, c_all, gates_all, hpre_all)
        return (grad_x_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr if w_hr is not None else None,
                None, None, None, None)

    register_autograd(fwd, backward, setup_context=_layer_setup_context)


# Every device with a lstm_layer_fwd or lstm_sequence_fwd kernel registers lstm_layer_bwd in the
# same TORCH_LIBRARY_IMPL block (csrc/lstm/lstm_cpu.cpp, lstm_cuda.cpp); meta and fake tensors
# take the fakes above. So a backward of either forward always has the op.
_register_layer_autograd("fastattn::lstm_layer_fwd", _OPS.lstm_layer_bwd)


@torch.library.register_fake("fastattn::lstm_weight_mm")
def _weight_mm_fake(weight, x, bias):
    return weight.new_empty(x.shape[0], weight.shape[0], x.shape[2])


def _weight_mm_setup_context(ctx, inputs, output):
    weight, x, bias = inputs
    ctx.save_for_backward(weight, x)


@first_order_only("fastattn::lstm_weight_mm")
def _weight_mm_backward(ctx, grad):
    weight, x = ctx.saved_tensors
    need_weight, need_x, need_bias = ctx.needs_input_grad
    # The S products as one, over columns (s, n): grad's [M, S * N] is a view when it is
    # feature-major, as lstm_layer_bwd's grad_x_proj is. Both gradients on this op's own product
    # (oneDNN's brgemm for float32; torch.mm's MKL runs its AVX2 code on AMD): the weight's,
    # grad @ x_cols^T (T32 B16 H256 on the Zen 5, 395 GFLOP/s against 211), and the input's,
    # w^T @ grad, with a copy of w^T as A (T32 B64 H512, 419 against 203), which comes out in
    # x's own [S, K, N].
    S, K, N = x.shape
    x_cols = x.permute(1, 0, 2).reshape(K, S * N)
    grad_cols = grad.permute(1, 0, 2).reshape(weight.shape[0], S * N)
    return (_OPS.lstm_weight_mm(grad_cols, x_cols.t().unsqueeze(0), None)[0]
            if need_weight else None,
            _OPS.lstm_weight_mm(weight.t(), grad, None) if need_x else None,
            grad_cols.sum(1) if need_bias else None)


register_autograd("fastattn::lstm_weight_mm", _weight_mm_backward,
                  setup_context=_weight_mm_setup_context)


@torch.library.register_fake("fastattn::lstm_step_gates")
def _step_gates_fake(input, hx, w_ih, w_hh, bias):
    return input.new_empty(input.shape[0], w_ih.shape[0])


def _step_gates_setup_context(ctx, inputs, output):
    input, hx, w_ih, w_hh, _bias = inputs
    ctx.save_for_backward(input, hx, w_ih, w_hh)


@first_order_only("fastattn::lstm_step_gates")
def _step_gates_backward(ctx, grad):
    input, hx, w_ih, w_hh = ctx.saved_tensors
    need_input, need_hx, need_w_ih, need_w_hh, need_bias = ctx.needs_input_grad
    return (grad @ w_ih if need_input else None,
            grad @ w_hh if need_hx else None,
            grad.t() @ input if need_w_ih else None,
            grad.t() @ hx if need_w_hh else None,
            grad.sum(0) if need_bias else None)


register_autograd("fastattn::lstm_step_gates", _step_gates_backward,
                  setup_context=_step_gates_setup_context)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastattn::lstm_ln_layer_fwd")
def _ln_layer_fwd_fake(x_proj, h0, c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias, eps, w_hr,
                       batch_sizes, reverse, zoneout_c, zoneout_h):
    T, B, H, P = _state_widths(x_proj, h0, w_hr)
    opmath = _opmath(x_proj.dtype)
    hpre = x_proj.new_empty(T, B, H) if w_hr is not None else x_proj.new_empty(0)
    return (x_proj.new_empty(T, B, P), x_proj.new_empty(T, B, H),
            x_proj.new_empty(T, B, 4 * H, dtype=opmath), hpre,
            x_proj.new_empty(T, B, 4 * H, dtype=opmath), x_proj.new_empty(T, B, H, dtype=opmath),
            x_proj.new_empty(T, B, 2, dtype=opmath))


@torch.library.register_fake("fastattn::lstm_ln_layer_bwd")
def _ln_layer_bwd_fake(grad_h_all, grad_c_all, h0, c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias,
                       w_hr, batch_sizes, reverse, zoneout_c, zoneout_h, h_all, c_all, gates_all,
                       hpre_all, hh_norm_all, c_norm_all, rstd_all):
    grad_w_hr = torch.empty_like(w_hr) if w_hr is not None else h0.new_empty(0)
    return (hh_norm_all.new_empty(hh_norm_all.shape, dtype=h0.dtype), torch.empty_like(h0),
            torch.empty_like(c0), torch.empty_like(w_hh), torch.empty_like(ln_hh_weight),
            torch.empty_like(ln_c_weight), torch.empty_like(ln_c_bias), grad_w_hr)


def _ln_layer_setup_context(ctx, inputs, output):
    (x_proj, h0, c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias, eps, w_hr, batch_sizes, reverse,
     zoneout_c, zoneout_h) = inputs
    ctx.options = (batch_sizes, reverse)
    ctx.save_for_backward(h0, c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias, w_hr, zoneout_c,
                          zoneout_h, *output)


def _register_ln_layer_autograd(fwd: str, bwd) -> None:
    """Autograd of a forward op with lstm_ln_layer_fwd's schema, by ``bwd`` (lstm_ln_layer_bwd's
    schema)."""

    @first_order_only(fwd)
    def backward(ctx, grad_h_all, grad_c_all, *_grad_saved):
        (h0, c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias, w_hr, zoneout_c, zoneout_h, h_all,
         c_all, *saved) = ctx.saved_tensors
        batch_sizes, reverse = ctx.options
        grad_h_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all
        grad_c_all = torch.zeros_like(c_all) if grad_c_all is None else grad_c_all
        # A backward run under autocast would cast the GEMMs inside the kernel, whose operands
        # mix the data dtype and opmath on purpose.
        with torch.autocast(h0.device.type, enabled=False):
            (grad_x_proj, grad_h0, grad_c0, grad_w_hh, grad_ln_hh_weight, grad_ln_c_weight,
             grad_ln_c_bias, grad_w_hr) = bwd(
                grad_h_all, grad_c_all, h0, c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias, w_hr,
                batch_sizes, reverse, zoneout_c, zoneout_h, h_all, c_all, *saved)
        return (grad_x_proj, grad_h0, grad_c0, grad_w_hh, grad_ln_hh_weight, grad_ln_c_weight,
                grad_ln_c_bias, None, grad_w_hr if w_hr is not None else None, None, None, None,
                None)

    register_autograd(fwd, backward, setup_context=_ln_layer_setup_context)


_register_ln_layer_autograd("fastattn::lstm_ln_layer_fwd", _OPS.lstm_ln_layer_bwd)


def _sequence_setup_context(ctx, inputs, output):
    x_proj, h0, c0, w_hh = inputs
    h_all, c_all, gates_all = output
    ctx.save_for_backward(h0, c0, w_hh, h_all, c_all, gates_all)


@first_order_only("fastattn::lstm_sequence_fwd")
def _sequence_backward(ctx, grad_h_all, grad_c_all, _grad_gates_all):
    h0, c0, w_hh, h_all, c_all, gates_all = ctx.saved_tensors
    grad_h_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all
    grad_c_all = torch.zeros_like(c_all) if grad_c_all is None else grad_c_all
    grad_x_proj, grad_h0, grad_c0, grad_w_hh, _ = _OPS.lstm_layer_bwd(
        grad_h_all, grad_c_all, h0, c0, w_hh, None, None, False, None, None, h_all, c_all,
        gates_all, h_all.new_empty(0))
    return grad_x_proj, grad_h0, grad_c0, grad_w_hh


register_autograd(
    "fastattn::lstm_sequence_fwd", _sequence_backward, setup_context=_sequence_setup_context)


# ---- input checks ------------------------------------------------------------------------------


def _check_tensor(fn: str, name: str, t, shape: tuple, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise FastattnTypeError(f"fastattn.{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if t.shape != shape:  # torch.Size is a tuple: no conversion (a cell step checks six)
        want = "[" + ", ".join(str(s) for s in shape) + "]"
        raise FastattnValueError(
            f"fastattn.{fn}: {name} must have shape {want}, got {list(t.shape)}"
        )
    if t.dtype != like.dtype:
        raise FastattnTypeError(
            f"fastattn.{fn}: {name} must have dtype {like.dtype} (as input), "
            f"got {t.dtype}"
        )
    if t.device != like.device:
        raise RuntimeError(f"fastattn.{fn}: {name} must be on device {like.device} (as input), "
                           f"got {t.device}")


def _shape_of(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_input(fn: str, input, dims: tuple[int, ...], layout: str) -> None:
    if not isinstance(input, torch.Tensor):
        raise FastattnTypeError(
            f"fastattn.{fn}: input must be a Tensor, got {type(input).__name__}"
        )
    if input.dim() not in dims:
        raise FastattnValueError(
            f"fastattn.{fn}: input must be {layout}, got shape {list(input.shape)}"
        )
    if input.dtype not in _DTYPES:
        raise FastattnTypeError(
            f"fastattn.{fn}: input must be float32, float64, float16 or bfloat16, "
            f"got {input.dtype}"
        )


def _cell_missing(device: torch.device, dtype: torch.dtype):
    def missing(backend: str) -> str | None:
        if backend == "cuda" and not _has_kernel("lstm_layer_fwd", "CUDA"):
            return "the CUDA LSTM kernels (fastattn._C has none registered)"
        if backend == "triton":
            if _triton_cell_ops() is None:
                return "the Triton LSTM cell kernels (fastattn.triton_kernels.lstm_cell)"
            if dtype == torch.float64:
                return "dtype float64 (triton serves float32, float16, bfloat16)"
        if backend == "cpu" and not _has_kernel("lstm_layer_fwd", "CPU"):
            return "the CPU LSTM kernels (fastattn._C has none registered)"
        return None

    return missing


# Evaluated once per (op, device, dtype, flag) while torch.compile traces, so that a compiled
# model bakes in the backend choice instead of graph-breaking on the backend registry.
@torch.compiler.assume_constant_result
def _choose_backend(fn: str, device: torch.device, dtype: torch.dtype, layer_norm: bool) -> str:
    cell_missing = _cell_missing(device, dtype)

    def missing(backend: str) -> str | None:
        if layer_norm and backend == "cuda" and not _has_kernel("lstm_ln_layer_fwd", "CUDA"):
            return "the CUDA LayerNorm-LSTM kernels (fastattn._C has none registered)"
        if backend == "triton" and fn == "lstm_layer":
            return _triton_layer_missing(dtype)
        if layer_norm and backend == "cpu" and not _has_kernel("lstm_ln_layer_fwd", "CPU"):
            return "the CPU LayerNorm-LSTM kernels (fastattn._C has none registered)"
        return cell_missing(backend)

    return backends.choose(fn, device, missing, reference_cost=_REFERENCE_COST)


def _triton_layer_missing(dtype: torch.dtype) -> str | None:
    if _triton_layer_fwd() is None:
        return "the Triton LSTM layer kernels (fastattn.triton_kernels.lstm_layer)"
    if dtype == torch.float64:
        return "dtype float64 (triton serves float32, float16, bfloat16)"
    return None


def _cell_pointwise(backend: str):
    """The pointwise cell op of ``backend``: (gates [B, 4H], cx [B, H]) -> (hy, cy)."""
    if backend == "triton":
        return differentiable(_triton_cell_ops()[0])
    if backend in ("cpu", "cuda"):
        return differentiable(_OPS.lstm_cell_pointwise_fwd)
    return reference.lstm_cell_pointwise_fwd_reference


# ---- public functions --------------------------------------------------------------------------


# lstm_cell of a plain eager CPU step (plain CPU tensors of one float dtype in the shapes checked
# below; nothing intercepting the call) runs from C++ without this module's ~15 us of checks and
# reshaping: a step that needs no gradient makes _cell's op call, a training step that _cell
# gives to lstm_step_gates records that op and the pointwise one on a C++ autograd node (saving
# their Python autograd's ~60 us); csrc/lstm/lstm_eager_entry.cpp lists the conditions. None for
# any other call.
_CELL_EAGER_ENTRY = _extension.C.lstm_cell_eager_entry if _extension.C else None


def lstm_cell(
    input: torch.Tensor,
    hx: torch.Tensor,
    cx: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step, as ``torch.nn.LSTMCell`` computes it, with the pointwise part fused.

    input [B, I] (or [I]), hx / cx [B, H] (or [H]), w_ih [4H, I], w_hh [4H, H], b_ih / b_hh [4H]
    or None; gate order i, f, g, o. Returns (hy, cy), each [B, H] (or [H]); all tensors share
    one dtype (float32/float64/float16/bfloat16) and device. Differentiable in every tensor.
    """
    if _CELL_EAGER_ENTRY is not None and not torch.compiler.is_compiling():
        out = _CELL_EAGER_ENTRY(input, hx, cx, w_ih, w_hh, b_ih, b_hh,
                                backends.forced_by_use_backend())
        if out is not None:
            return out
    fn = "lstm_cell"
    _check_input(fn, input, (1, 2), "[B, I] or [I]")
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    B, in_features = x.shape
    if not isinstance(w_ih, torch.Tensor) or w_ih.dim() != 2 or w_ih.shape[0] % 4 or (
            w_ih.shape[1] != in_features):
        raise FastattnValueError(
            f"fastattn.{fn}: w_ih must have shape [4H, {in_features}] (input's "
            f"feature size), got {_shape_of(w_ih)}"
        )
    _check_tensor(fn, "w_ih", w_ih, w_ih.shape, input)
    H = w_ih.shape[0] // 4
    state_shape = (H,) if unbatched else (B, H)
    _check_tensor(fn, "hx", hx, state_shape, input)
    _check_tensor(fn, "cx", cx, state_shape, input)
    _check_tensor(fn, "w_hh", w_hh, (4 * H, H), input)
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(fn, name, b, (4 * H,), input)
    if unbatched:
        hx, cx = hx.unsqueeze(0), cx.unsqueeze(0)
    bias = _sum_biases(b_ih, b_hh)
    backend = _choose_backend(fn, input.device, input.dtype, False)
    if backend == "cpu":
        # torch.jit.trace records the op, one node whichever kernel runs (_registry.py); eager
        # calls its composite directly, saving a dispatch.
        cell = _OPS.lstm_cell if torch.jit.is_tracing() else _cell
        hy, cy = cell(x, hx, cx, w_ih, w_hh, bias)
    else:
        hy, cy = _cell_step(x, hx, cx, w_ih, w_hh, bias, _cell_pointwise(backend))
    return (hy.squeeze(0), cy.squeeze(0)) if unbatched else (hy, cy)


def _cell_step(x, hx, cx, w_ih, w_hh, bias, pointwise) -> tuple[torch.Tensor, torch.Tensor]:
    """One differentiable step: the two GEMMs (fastattn.ops.linear: on fastattn's own GEMM where
    it beats torch.mm's), then ``pointwise`` (a cell pointwise op)."""
    gates = linear.linear(x, w_ih, bias) + linear.linear(hx, w_hh)
    # Autocast runs the GEMMs in its lower precision; torch's lstm_cell then computes the
    # pointwise part in the state's dtype, and so do we (a no-op without autocast).
    return pointwise(gates.to(cx.dtype), cx)


def _cell(x, hx, cx, w_ih, w_hh, bias):
    """fastattn::lstm_cell (the cpu backend's lstm_cell on [B, I] input): where no gradient is
    needed, one step of the fused layer kernel (the recurrent GEMM and the gate math in one
    pass); else, as its backward is built for sequences, the gates' products and the fused
    pointwise op, which train one step faster. The products are one op, lstm_step_gates (its
    GEMV-style kernel for a few float32 rows, else two GEMMs), except where fastattn.ops.linear
    would run them on fastattn's own GEMM (float32, enough rows, a CPU where it wins): then two
    linear calls. Under autocast, the GEMMs in its precision."""
    if not _needs_grad(x, hx, cx, w_ih, w_hh, bias):
        h_all, c_all = _OPS.lstm_layer_infer(
            x.unsqueeze(0), w_ih, bias, hx, cx, w_hh, None, None, False, None, None)
        return h_all[0], c_all[0]
    pointwise = differentiable(_OPS.lstm_cell_pointwise_fwd)
    # A symbolic batch (compile, export) takes the GEMMs, which serve every batch, without a guard.
    if (isinstance(x.shape[0], int) and not torch.is_autocast_enabled("cpu")
            and not linear.takes_op(x, w_ih, bias)):
        return pointwise(differentiable(_OPS.lstm_step_gates)(x, hx, w_ih, w_hh, bias), cx)
    return _cell_step(x, hx, cx, w_ih, w_hh, bias, pointwise)


_registry.LIBRARY.impl("lstm_cell", _cell, "CompositeImplicitAutograd")


def _sum_biases(b_ih: torch.Tensor | None, b_hh: torch.Tensor | None) -> torch.Tensor | None:
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def lstm_layer(
    input: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
    w_hr: torch.Tensor | None = None,
    *,
    batch_sizes: torch.Tensor | None = None,
    reverse: bool = False,
    zoneout_c: torch.Tensor | None = None,
    zoneout_h: torch.Tensor | None = None,
    layer_norm: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM layer in one direction over a padded sequence.

    input [T, B, I]; h0 [B, P], c0 [B, H]; w_ih [4H, I], w_hh [4H, P], b_ih / b_hh [4H] or None,
    w_hr [P, H] or None (P = H without projection). The input projection for the whole sequence
    is one GEMM (on the ``cpu`` backend without gradients, one GEMM per few steps, feeding the
    recurrence from cache). batch_sizes (int64 CPU [T], non-increasing) steps only the first
    batch_sizes[t] rows at time t, the others carrying their state; reverse runs t = T-1 .. 0;
    zoneout_c [T, B, H] / zoneout_h [T, B, P] weight the previous state (see _registry.py).
    layer_norm = (ln_ih_weight [4H], ln_hh_weight [4H], ln_c_weight [H], ln_c_bias [H], eps)
    makes it a LayerNorm-LSTM: gates = LN(x @ w_ih^T) * ln_ih_weight + LN(h @ w_hh^T) *
    ln_hh_weight + b_ih + b_hh (LN over the 4H gates), c = LN(f * c_prev + i * g) * ln_c_weight
    + ln_c_bias, h = o * tanh(c); the ``cpu`` and ``cuda`` backends run it on the fused
    fastattn::lstm_ln_layer_fwd op, the ``triton`` backend on
    fastattn::lstm_ln_layer_fwd_triton.
    Returns (h_all [T, B, P], c_all [T, B, H]): the state after each time step; the final state
    is h_all[-1] (h_all[0] when reverse). Differentiable in input, h0, c0 and the weights.
    """
    fn = "lstm_layer"
    _check_input(fn, input, (3,), "[T, B, I]")
    T, B, in_features = input.shape
    if not isinstance(w_ih, torch.Tensor) or w_ih.dim() != 2 or w_ih.shape[0] % 4 or (
            w_ih.shape[1] != in_features):
        raise FastattnValueError(
            f"fastattn.{fn}: w_ih must have shape [4H, {in_features}], got {_shape_of(w_ih)}")
    H = w_ih.shape[0] // 4
    _check_tensor(fn, "w_ih", w_ih, (4 * H, in_features), input)
    P = H
    if w_hr is not None:
        if w_hr.dim() != 2 or w_hr.shape[1] != H:
            raise FastattnValueError(
                f"fastattn.{fn}: w_hr must have shape [P, {H}], got {list(w_hr.shape)}")
        P = w_hr.shape[0]
        _check_tensor(fn, "w_hr", w_hr, (P, H), input)
    _check_tensor(fn, "h0", h0, (B, P), input)
    _check_tensor(fn, "c0", c0, (B, H), input)
    _check_tensor(fn, "w_hh", w_hh, (4 * H, P), input)
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(fn, name, b, (4 * H,), input)
    if zoneout_c is not None:
        _check_tensor(fn, "zoneout_c", zoneout_c, (T, B, H), input)
    if zoneout_h is not None:
        _check_tensor(fn, "zoneout_h", zoneout_h, (T, B, P), input)
    if batch_sizes is not None and (
            batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu"
            or tuple(batch_sizes.shape) != (T,)):
        raise FastattnValueError(
            f"fastattn.{fn}: batch_sizes must be an int64 CPU tensor of shape [{T}], got "
            f"{batch_sizes.dtype} {list(batch_sizes.shape)} on {batch_sizes.device}")

    if layer_norm is not None:
        for name, t, n in zip(("ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias"),
                              layer_norm[:4], (4 * H, 4 * H, H, H), strict=True):
            _check_tensor(fn, f"layer_norm {name}", t, (n,), input)

    backend = _choose_backend(fn, input.device, input.dtype, layer_norm is not None)
    bias = _sum_biases(b_ih, b_hh)
    if backend in ("cpu", "cuda") and layer_norm is None:
        # torch.jit.trace records the op, one node whichever kernel runs (_registry.py); eager
        # calls its composite directly, saving a dispatch (4 us a call, 1-thread CPU time).
        layer = _OPS.lstm_layer if torch.jit.is_tracing() else _layer
        return layer(input, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c,
                     zoneout_h)
    if layer_norm is not None:
        # in the input's dtype, as _input_projection returns it (autocast may run the GEMM lower)
        x_proj = torch.nn.functional.layer_norm(input.reshape(T * B, in_features) @ w_ih.t(),
                                                (4 * H,), layer_norm[0], bias,
                                                layer_norm[4]).view(T, B, 4 * H).to(input.dtype)
    else:
        x_proj = _input_projection(input, w_ih, bias, layout="torch")

    if backend in ("cpu", "cuda", "triton") and layer_norm is not None:
        # the triton op is chosen only once _triton_layer_fwd() has registered it
        ln_layer_fwd = _OPS.lstm_ln_layer_fwd_triton if backend == "triton" else (
            _OPS.lstm_ln_layer_fwd)
        h_all, c_all, *_ = differentiable(ln_layer_fwd)(
            x_proj, h0, c0, w_hh, *layer_norm[1:4], layer_norm[4], w_hr, batch_sizes, reverse,
            zoneout_c, zoneout_h)
        return h_all, c_all
    if backend == "triton":  # chosen only once _triton_layer_fwd() has registered the op
        h_all, c_all, _, _ = differentiable(_OPS.lstm_layer_fwd_triton)(
            x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h)
        return h_all, c_all
    h_all, c_all, _, _ = reference.lstm_layer_reference(  # the reference backend
        x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h,
        layer_norm=None if layer_norm is None else (*layer_norm[1:],))
    return h_all, c_all


def _input_projection(input: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor | None,
                      layout: str) -> torch.Tensor:
    """x_proj [T, B, 4H] = input @ w_ih^T + bias in input's dtype, differentiable. layout: where
    the cpu backend's lanes run along the batch, "step_major" (the lstm_weight_mm op); along the
    units, "rows" (row-major, the linear op); elsewhere "torch" (row-major, torch's GEMM)."""
    T, B, in_features = input.shape
    if layout == "step_major":
        # Step-major ([T, 4H, B] in memory, seen as [T, B, 4H]): the CPU kernel reads a step's
        # batch lanes of a gate as one vector, and a step's gates one after another.
        x_proj = differentiable(_OPS.lstm_weight_mm)(w_ih, input.transpose(1, 2), bias).permute(
            0, 2, 1)
    elif layout == "rows":
        x_proj = linear.linear(input.reshape(T * B, in_features), w_ih, bias).view(
            T, B, w_ih.shape[0])
    else:
        flat = input.reshape(T * B, in_features)
        x_proj = (flat @ w_ih.t() if bias is None else torch.addmm(bias, flat, w_ih.t())).view(
            T, B, w_ih.shape[0])
    # Autocast may have run the projection GEMM in its lower precision; the recurrence runs in
    # the input's dtype, as torch's lstm_cell runs its pointwise part (a no-op without autocast).
    return x_proj.to(input.dtype)


def _layer(input, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h):
    """fastattn::lstm_layer (the cpu and cuda backends' lstm_layer without layer_norm): the
    inference kernel where no gradient is needed, else the training op on x_proj."""
    if not _needs_grad(input, h0, c0, w_ih, w_hh, bias, w_hr):
        return _OPS.lstm_layer_infer(input, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse,
                                     zoneout_c, zoneout_h)
    # Row-major x_proj for the unit lanes; a symbolic batch (torch.compile, export) gets
    # step-major, which serves every batch, instead of a guard on the lane choice.
    batch = input.shape[1]
    layout = "torch" if input.device.type != "cpu" else (
        "rows" if isinstance(batch, int) and _cpu_unit_lanes(batch, input.dtype, w_hr is not None)
        else "step_major")
    x_proj = _input_projection(input, w_ih, bias, layout)
    h_all, c_all, _, _ = differentiable(_OPS.lstm_layer_fwd)(
        x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h)
    return h_all, c_all


_registry.LIBRARY.impl("lstm_layer", _layer, "CompositeImplicitAutograd")
