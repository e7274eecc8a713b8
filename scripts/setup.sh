#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and fastattn's dependencies, and builds fastattn
# in place. Idempotent: rerunning it rebuilds only what changed.
#   FASTATTN_TORCH   the torch requirement to install when torch is missing (default: the
#                    CPU build torch==2.13.0; use e.g. "torch" for a CUDA build from the index)
#   FASTATTN_TRITON  the triton requirement to install when triton is missing (default 3.9.0)
#   PYTHON           the interpreter that creates the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import torch" 2>/dev/null; then
  pip install --quiet "${FASTATTN_TORCH:-torch==2.13.0}"
fi
# setuptools/wheel/ninja are the build requirements: --no-build-isolation builds against the
# torch installed above instead of a fresh one.
pip install --quiet setuptools wheel ninja
# The Triton the interpreter tests were validated with (GPU machines bring their own).
python -c "import triton" 2>/dev/null || pip install --quiet "${FASTATTN_TRITON:-triton==3.9.0}"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip install --quiet --no-build-isolation -e ".[test,train,triton]"
python -m fastattn.info
