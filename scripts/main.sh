#!/usr/bin/env bash
# The main job: set everything up (scripts/setup.sh), run the quick benchmark grid against
# PyTorch and write its report, then train the reference byte-level GPT on the embedded
# default corpus (the Python standard library's sources) and sample from it.
#   OUT   where the benchmark JSON/report and the training run go (default: runs/main)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
OUT="${OUT:-runs/main}"
mkdir -p "$OUT"

echo "== quick benchmark grid vs PyTorch (about 10 minutes on 2 CPU cores)"
python -m pytest benchmarks --benchmark-only -q --benchmark-json="$OUT/bench.json"
python -m benchmarks.report "$OUT/bench.json" --out "$OUT/report"
cat "$OUT/report/report.md"

echo "== reference trainer: byte-level GPT on the standard library's sources"
python -m fastattn.lm train --out-dir "$OUT/gpt" --overwrite
python -m fastattn.lm sample --checkpoint "$OUT/gpt/ckpt.pt" --prompt "def " --tokens 300
