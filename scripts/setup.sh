#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and fastattn's dependencies, and builds fastattn
# in place. Idempotent: rerunning it rebuilds the extension only when its sources, the build
# settings or torch changed.
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
python -c "import setuptools, wheel, ninja" 2>/dev/null \
  || pip install --quiet setuptools wheel ninja
# The Triton the interpreter tests were validated with (GPU machines bring their own).
python -c "import triton" 2>/dev/null || pip install --quiet "${FASTATTN_TRITON:-triton==3.9.0}"

# `pip install -e` compiles every kernel file from scratch (it builds in a fresh temporary
# directory), so it runs only when something it depends on changed since the last build
# in this venv: a file under csrc/, setup.py, pyproject.toml, the torch or Python version (a
# CPU or CUDA torch build differs in its version's local part), the compiler, or the CUDA
# settings.
build_key() {
  {
    find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum setup.py pyproject.toml
    python -c "import sys, importlib.metadata as m; print(sys.version, m.version('torch'))"
    { "${CXX:-c++}" --version 2>/dev/null || true; } | head -n 1
    echo "${FASTATTN_CUDA-} ${FASTATTN_CUDA_ARCHS-} ${TORCH_CUDA_ARCH_LIST-} ${CUDA_HOME-}"
    command -v nvcc || true
    pwd
  } | sha256sum | cut -d' ' -f1
}
stamp=.venv/fastattn-build.key
key="$(build_key)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && compgen -G "fastattn/_C*.so" >/dev/null
then
  echo "fastattn: the extension is up to date with csrc/, setup.py and torch; not rebuilding"
else
  rm -f "$stamp"
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    pip install --quiet --no-build-isolation -e ".[test,train,triton]"
  echo "$key" >"$stamp"
fi
python -m fastattn.info
