#!/usr/bin/env bash
# scripts/ptxas_report.sh: refreshes the committed ptxas register / spill report
# (benchmarks/results/ptxas/ptxas_report.txt) by running the CUDA compile test with
# FASTATTN_PTXAS_REPORT pointing at it. The test suite itself writes the report to a temporary
# directory only, so running the tests never rewrites a tracked file. Needs nvcc; extra
# arguments go to pytest. PYTHON defaults to python3.
set -euo pipefail
cd "$(dirname "$0")/.."
FASTATTN_PTXAS_REPORT="$PWD/benchmarks/results/ptxas/ptxas_report.txt" \
    "${PYTHON:-python3}" -m pytest tests/test_cuda_compile.py -q "$@"
