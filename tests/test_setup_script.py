"""scripts/setup.sh builds the extension on a fresh checkout, skips the build when nothing it
depends on changed, and builds again when a kernel source changes.

It runs on a copy of the checkout whose .venv is a stand-in: its python is this interpreter
(torch and triton already there) and its pip only records how it was called."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    for name in ("csrc", "fastattn", "scripts"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "pip.log"
    _executable(bin_dir / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    # An editable install leaves the built library in the package, as the real one does.
    _executable(
        bin_dir / "pip",
        f'#!/bin/sh\necho "$*" >> "{log}"\n'
        'case "$*" in *" -e "*) touch fastattn/_C.stand-in.so ;; esac\n',
    )
    return repo, log


def _editable_installs(repo: Path, log: Path) -> int:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=env, check=True,
                   capture_output=True, text=True)
    return sum(" -e " in line for line in log.read_text().splitlines()) if log.exists() else 0


def test_setup_rebuilds_only_when_a_source_changed(tmp_path):
    repo, log = _fake_checkout(tmp_path)
    assert _editable_installs(repo, log) == 1  # fresh checkout: builds
    assert _editable_installs(repo, log) == 1  # nothing changed: no build
    source = repo / "csrc" / "cpu_isa.cpp"
    source.write_text(source.read_text() + "\n// changed\n")
    assert _editable_installs(repo, log) == 2  # a kernel source changed: builds again
