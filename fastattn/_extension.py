"""Loads the compiled extension fastattn._C once; the package works without it."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

C: ModuleType | None
LOAD_ERROR: str | None

try:
    C = importlib.import_module("fastattn._C")  # registers the C++ ops under torch.ops.fastattn

    LOAD_ERROR = None
except ImportError as error:  # a source checkout, or an ABI mismatch with the installed torch
    C = None
    LOAD_ERROR = f"{type(error).__name__}: {error}"
    warnings.warn(
        "fastattn: the compiled extension fastattn._C could not be loaded "
        f"({LOAD_ERROR}); the cpu and cuda backends are unavailable and the reference "
        "backend serves instead. Build it with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )
