"""Byte-level corpora (vocab 256) and the batch sampler of the reference trainer.

The default corpus is the running interpreter's own standard library ``.py`` sources, so a
first run needs no download. Train and validation are split by file (a hash of each file's
relative path), so the same file never lands on both sides and the split never changes.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
# Files that are (or look like) binary are recognised the way git does: a NUL byte early on.
_BINARY_SNIFF_BYTES = 8192


@dataclass
class Corpus:
    """A byte corpus split into training and validation bytes (uint8 CPU tensors)."""

    train: torch.Tensor  # [N_train] uint8
    val: torch.Tensor  # [N_val] uint8
    source: str  # human-readable description, for logs

    def __repr__(self) -> str:
        return f"Corpus({self.source}: {len(self.train):,} train / {len(self.val):,} val bytes)"


def _is_binary(blob: bytes) -> bool:
    return b"\0" in blob[:_BINARY_SNIFF_BYTES]


def _val_bucket(relative_path: str) -> float:
    """A stable number in [0, 1) per relative path (Python's hash() is salted per process)."""
    digest = hashlib.sha256(relative_path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Third-party packages installed into the base interpreter are not the standard library.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _text_files_under(folder: Path) -> tuple[list[Path], int]:
    """Every non-hidden text file under ``folder`` (sorted), and how many binary ones it skipped."""
    files, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name.startswith(".") or not path.is_file():
                continue
            with open(path, "rb") as f:
                if _is_binary(f.read(_BINARY_SNIFF_BYTES)):
                    skipped += 1
                    continue
            files.append(path)
    return files, skipped


def _split_by_file(files: list[Path], root: Path, val_fraction: float) -> tuple[bytes, bytes]:
    """Concatenates files (each followed by a newline) into train and validation bytes.

    A file goes to validation when its path hash falls below ``val_fraction``; with two or more
    files each side gets at least one, so small folders still have a validation set.
    """
    buckets = {f: _val_bucket(f.relative_to(root).as_posix()) for f in files}
    val = {f for f in files if buckets[f] < val_fraction}
    if len(files) >= 2 and not val:
        val = {min(files, key=buckets.__getitem__)}
    if len(files) >= 2 and len(val) == len(files):
        val.remove(max(files, key=buckets.__getitem__))
    train_parts, val_parts = [], []
    for f in files:
        blob = f.read_bytes()
        if _is_binary(blob):
            continue
        (val_parts if f in val else train_parts).append(blob + b"\n")
    return b"".join(train_parts), b"".join(val_parts)


def _split_tail(blob: bytes, val_fraction: float) -> tuple[bytes, bytes]:
    cut = len(blob) - max(1, int(len(blob) * val_fraction))
    return blob[:cut], blob[cut:]


def load_corpus(path: str | os.PathLike | None = None, val_fraction: float = 0.05) -> Corpus:
    """Loads a byte corpus and splits it into train/validation deterministically.

    ``path`` None: the standard library ``.py`` files of this interpreter, split by file.
    A folder: every non-hidden text file under it (binary ones skipped), split by file.
    A single text file (or a folder holding one): its last ``val_fraction`` bytes are validation.
    Raises FileNotFoundError for a missing path and ValueError for an empty or binary one.
    """
    if path is None:
        root = stdlib_root()
        files = _stdlib_files()
        if not files:
            raise FileNotFoundError(f"no .py files found under the standard library at {root}")
        train, val = _split_by_file(files, root, val_fraction)
        source = f"stdlib .py sources under {root} ({len(files)} files)"
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--data {str(path)!r}: no such file or folder")
        if p.is_dir():
            files, skipped = _text_files_under(p)
            if not files:
                why = f" ({skipped} binary files skipped)" if skipped else ""
                raise ValueError(f"--data {str(path)!r}: the folder holds no text files{why}")
            root = p
        else:
            files, root = [p], p.parent
            with open(p, "rb") as f:
                if _is_binary(f.read(_BINARY_SNIFF_BYTES)):
                    raise ValueError(
                        f"--data {str(path)!r} looks binary (it has a NUL byte); "
                        "give a text file or a folder of text files"
                    )
        if len(files) == 1:
            train, val = _split_tail(files[0].read_bytes(), val_fraction)
        else:
            train, val = _split_by_file(files, root, val_fraction)
        source = f"{p} ({len(files)} files)"
    if not train or not val:
        raise ValueError(f"corpus {source} is empty (train {len(train)} / val {len(val)} bytes)")
    return Corpus(_as_tensor(train), _as_tensor(val), source)


def _as_tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def check_length(data: torch.Tensor, block_size: int, what: str) -> None:
    if len(data) < block_size + 1:
        raise ValueError(
            f"the {what} split has {len(data)} bytes, fewer than --block-size + 1 = "
            f"{block_size + 1}; give more data or a smaller --block-size"
        )


def shard(data: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous 1/world_size of ``data``: each process reads its own bytes."""
    size = len(data) // world_size
    return data[rank * size : (rank + 1) * size]


class BatchSampler:
    """Random (input, target) windows from a byte tensor, resumable exactly.

    Windows start at uniformly random offsets drawn from a private generator, so the data
    position is fully described by the generator state, saved in checkpoints.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int):
        check_length(data, block_size, "training shard")
        self.data = data
        self.batch_size = batch_size
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns x, y: int64 [batch_size, block_size], y being x shifted left by one byte."""
        starts = torch.randint(
            len(self.data) - self.block_size, (self.batch_size,), generator=self.generator
        )
        windows = self.data[starts[:, None] + torch.arange(self.block_size + 1)].long()
        self.batches_drawn += 1
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = state["batches_drawn"]


def eval_batches(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    num_batches: int,
    rank: int,
    world_size: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced validation windows (the same every eval), split across ranks.

    Rank r gets batches r, r + world_size, ...; the union over ranks is the whole set.
    """
    check_length(data, block_size, "validation")
    count = batch_size * num_batches
    starts = torch.linspace(0, len(data) - block_size - 1, count).long()
    batches = []
    for b in range(rank, num_batches, world_size):
        s = starts[b * batch_size : (b + 1) * batch_size]
        windows = data[s[:, None] + torch.arange(block_size + 1)].long()
        batches.append((windows[:, :-1], windows[:, 1:]))
    return batches
