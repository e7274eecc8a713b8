#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and fastattn's dependencies, and builds fastattn
# in place. Idempotent: rerunning it rebuilds only what changed.
#   FASTATTN_TORCH   the torch requirement to install when torch is missing (default: the
#                    CPU build torch==2.13.0; use e.g. "torch" for a CUDA build from the index)
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
MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip install --quiet --no-build-isolation -e ".[test,train,triton]"
python -m fastattn.info
