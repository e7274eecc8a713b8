#!/usr/bin/env bash
# Builds fastattn's C++ CPU code with AddressSanitizer and UBSan (setup.py's FASTATTN_ASAN=1) in a
# copy of the tree, build/asan/ (FASTATTN_ASAN_DIR), so the normal in-place build is untouched, and
# runs the CPU op tests against it under every x86 kernel variant this CPU has.
#
#   bash scripts/asan_check.sh                 # the default test selection
#   bash scripts/asan_check.sh -k opcheck      # extra pytest arguments
#
# Environment: PYTHON (default: python, e.g. .venv/bin/python), FASTATTN_ASAN_ISAS (default
# "default avx2 avx512": the ATEN_CPU_CAPABILITY values to run under; a value above what the CPU
# has runs its widest variant), FASTATTN_ASAN_TESTS (the test files), MAX_JOBS (compile jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
PYTHON=$(command -v "$PYTHON")
DEST=${FASTATTN_ASAN_DIR:-$PWD/build/asan}
ISAS=${FASTATTN_ASAN_ISAS:-default avx2 avx512}
TESTS=${FASTATTN_ASAN_TESTS:-tests/test_attention_cpu_op.py tests/test_lstm_ops.py \
tests/test_lstm_layer_norm.py tests/test_op_compile.py}

# The copy: tracked and untracked-but-not-ignored files. tar keeps their modification times, so
# a second run recompiles only what changed. The C++ sources are copied afresh: setup.py builds
# every file under csrc/, and a renamed source's old copy, left in place, was compiled and linked
# beside the new one (duplicate symbols).
mkdir -p "$DEST"
rm -rf "$DEST/csrc"
git ls-files -z --cached --others --exclude-standard \
  | tar --null --files-from=- -cf - | tar -xf - -C "$DEST"

cd "$DEST"
FASTATTN_ASAN=1 FASTATTN_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" setup.py build_ext --inplace \
  > asan_build.log 2>&1 || { tail -n 40 asan_build.log; exit 1; }

# The ASan runtime must be the first library in the process (python itself is not instrumented).
# libstdc++ is preloaded right after it: python does not link it, so without it ASan's
# __cxa_throw interceptor finds no real __cxa_throw when it starts and the first C++ exception
# (every TORCH_CHECK an error test expects) aborts with "CHECK failed: ... real___cxa_throw".
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
LIBASAN=$(${CXX:-c++} -print-file-name=libasan.so)
LIBSTDCXX=$(${CXX:-c++} -print-file-name=libstdc++.so)
for lib in "$LIBASAN" "$LIBSTDCXX"; do
  [ -f "$lib" ] || { echo "asan_check: $lib not found (${CXX:-c++} -print-file-name)" >&2; exit 1; }
done
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_init_order=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The tests import this copy's fastattn (the sanitized _C), never an installed one.
export PYTHONPATH=$DEST
for isa in $ISAS; do
  echo "== ASan/UBSan: ATEN_CPU_CAPABILITY=$isa"
  # --capture=sys: a sanitizer report is written to fd 2 and the process aborts; fd capture
  # would swallow it.
  # shellcheck disable=SC2086
  ATEN_CPU_CAPABILITY=$isa LD_PRELOAD="$LIBASAN $LIBSTDCXX" "$PYTHON" -m pytest -q \
    -p no:cacheprovider --capture=sys $TESTS "$@"
done
