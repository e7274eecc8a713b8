#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite, then the benchmark
# suite once in smoke mode. Without a GPU the Triton kernels run in Triton's interpreter on
# CPU tensors. Extra arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export TRITON_INTERPRET=1
fi
python -m pytest tests "$@"
if [ -d benchmarks ] && compgen -G "benchmarks/bench_*.py" >/dev/null; then
  python -m pytest benchmarks --benchmark-disable -q
fi
