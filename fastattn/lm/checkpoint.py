"""Trainer checkpoints: written atomically, read with clear errors, never half-overwritten."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "fastattn-lm-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the requested run."""


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """Writes ``state`` to ``path`` through a temporary file in the same folder and os.replace.

    A crash or Ctrl-C mid-write leaves the previous checkpoint at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> dict:
    """Reads a checkpoint written by save_atomic (tensors and plain data only: weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable (corrupt, truncated or not a "
            f"fastattn-lm checkpoint): {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fastattn-lm checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {state.get('version')}, "
            f"this fastattn reads version {VERSION}"
        )
    return state


def check_model_config(saved: dict, requested: dict, path: str | os.PathLike) -> None:
    """Raises CheckpointError naming every model setting that differs from the checkpoint's."""
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, this run {requested.get(key)!r}"
        for key in sorted(set(saved) | set(requested))
        if saved.get(key) != requested.get(key)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written for another model config ("
            + "; ".join(diffs)
            + "); use the same model flags, or another --out-dir for a new run"
        )


def rng_state() -> dict:
    """The torch, CUDA, Python and NumPy RNG states, as tensors and plain data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
