#!/usr/bin/env bash
# Mutation check of the cudasim suite (issue 14): applies the hand-written kernel mutations
# of tests/cudasim/mutations.py one at a time (deleted barriers, dropped cp.async waits, wrong
# fragment indices, lost rescales, ...), rebuilds, runs the emulated tests under every
# schedule and reports how many mutants the suite kills (target >= 90%).
# Slow (one build per mutant): arguments select mutants by name substring, e.g.
#   scripts/mutation_check.sh fwd- seq-
# Needs g++ and the CUDA headers (CUDA_HOME), no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
exec "$PYTHON" tests/cudasim/mutations.py "$@"
