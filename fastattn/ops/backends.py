"""Which kernel backend serves a call: status, forcing, and the automatic choice.

Backends: ``cpu`` (C++ kernels in fastattn._C), ``cuda`` (CUDA C++ kernels in fastattn._C),
``triton`` (fastattn.triton_kernels) and ``reference`` (plain PyTorch, always available).
``auto`` picks cuda > triton > reference for CUDA tensors and cpu > reference for CPU ones.
``FASTATTN_BACKEND=<name>`` or ``with fastattn.use_backend(name):`` forces one; a forced
backend that cannot serve a call raises instead of silently falling back. When ``auto`` falls
back to ``reference`` for CUDA tensors, it warns once per reason with a ReferenceFallbackWarning
that says what the reference costs for that op (attention: the L x S scores, O(L * S) memory;
LSTM: unfused PyTorch ops at every time step).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastattn import _extension
from fastattn.ops.errors import FastattnValueError

BACKENDS = ("cpu", "cuda", "triton", "reference")
_CHOICES = BACKENDS + ("auto",)
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastattn_backend", default=None
)


class ReferenceFallbackWarning(UserWarning):
    """auto served CUDA tensors with the reference backend (no fused kernel could)."""


_warned_fallbacks: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_reference_fallback(op: str, reasons: list[str], reference_cost: str) -> None:
    """Warns once per distinct reason and cost (whatever the warnings filters say)."""
    why = "; ".join(reasons)
    with _warned_lock:
        if (why, reference_cost) in _warned_fallbacks:
            return
        _warned_fallbacks.add((why, reference_cost))
    warnings.warn(
        f"fastattn.{op}: no fused backend serves this call on CUDA ({why}); falling back to the "
        f"reference backend, which {reference_cost}. This warning is shown once per reason.",
        ReferenceFallbackWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class BackendStatus:
    built: bool
    usable: bool
    reason: str  # why it is not built or not usable here; "" when usable

    def __repr__(self) -> str:
        state = "usable" if self.usable else ("built, not usable" if self.built else "not built")
        return f"BackendStatus({state}{': ' + self.reason if self.reason else ''})"


# Shared (frozen): _status runs on every call of every op, and building a dataclass there costs
# as much as the rest of the choice.
_USABLE = BackendStatus(True, True, "")


@functools.cache
def _triton_importable() -> str:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'fastattn[triton]')"
    if not hasattr(torch.library, "triton_op"):
        return f"torch {torch.__version__} lacks torch.library.triton_op"
    return ""


def _status(name: str) -> BackendStatus:
    C = _extension.C
    if name == "reference":
        return _USABLE
    if name == "cpu":
        if C is None:
            return BackendStatus(
                False, False, f"fastattn._C is not loaded ({_extension.LOAD_ERROR})"
            )
        return _USABLE
    if name == "cuda":
        if C is None:
            return BackendStatus(
                False, False, f"fastattn._C is not loaded ({_extension.LOAD_ERROR})"
            )
        if not C.built_with_cuda():
            return BackendStatus(False, False, "fastattn._C was built without CUDA kernels")
        if not torch.cuda.is_available():
            return BackendStatus(True, False, "no CUDA device is available")
        return _USABLE
    if name == "triton":
        why = _triton_importable()
        if why:
            return BackendStatus(False, False, why)
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return BackendStatus(
                True, False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
            )
        return _USABLE
    raise FastattnValueError(
        f"unknown fastattn backend {name!r}; valid names: {', '.join(_CHOICES)}"
    )


def backends() -> dict[str, BackendStatus]:
    """For each backend: whether it is built and usable here, and if not, why."""
    return {name: _status(name) for name in BACKENDS}


def _check_name(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise FastattnValueError(
            f"{source}: unknown fastattn backend {name!r}; valid names: {', '.join(_CHOICES)}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Forces ``name`` (or ``"auto"``) for the fastattn calls made inside the block."""
    token = _forced.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_by_use_backend() -> str | None:
    """The name use_backend() forces here (``"auto"`` included), or None outside any block."""
    return _forced.get()


def forced_backend() -> str | None:
    """The backend forced by use_backend() or FASTATTN_BACKEND, or None for auto."""
    name = _forced.get()
    if name is None:
        env = os.environ.get("FASTATTN_BACKEND", "")
        name = _check_name(env, "FASTATTN_BACKEND") if env else None
    return None if name == "auto" else name


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")


def _device_mismatch(name: str, device: torch.device) -> str | None:
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend serves CPU tensors only, got {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend serves CUDA tensors only, got {device.type} tensors"
    if (
        name == "triton"
        and device.type != "cuda"
        and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    ):
        return (
            "the triton backend serves CUDA tensors (CPU ones only with TRITON_INTERPRET=1), "
            f"got {device.type}"
        )
    return None


def choose(
    op: str, device: torch.device, missing: Callable[[str], str | None], *, reference_cost: str
) -> str:
    """The backend that serves one call of ``op`` on ``device``.

    ``missing(backend)`` names the feature of this call that the backend lacks, or returns None
    when it can serve it. A forced backend that cannot serve raises RuntimeError.
    ``reference_cost`` completes "the reference backend, which ..." in the fallback warning:
    what the reference costs for this op.
    """
    forced = forced_backend()
    if forced is not None:
        status = _status(forced)
        if not status.usable:
            raise RuntimeError(
                f"fastattn.{op}: forced backend {forced!r} is unavailable: {status.reason}"
            )
        why = _device_mismatch(forced, device) or missing(forced)
        if why:
            raise RuntimeError(
                f"fastattn.{op}: forced backend {forced!r} cannot serve this call: {why}"
            )
        return forced
    reasons = []  # why each fused backend passed, for the fallback warning
    for name in _auto_order(device):
        if name == "reference":
            break
        status = _status(name)
        why = status.reason if not status.usable else (
            _device_mismatch(name, device) or missing(name)
        )
        if not why:
            return name
        reasons.append(f"{name}: {why}")
    if device.type == "cuda":
        _warn_reference_fallback(op, reasons, reference_cost)
    return "reference"
