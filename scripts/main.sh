#!/usr/bin/env bash
# The main job: set everything up (scripts/setup.sh), run the quick benchmark grid against
# PyTorch, train the reference byte-level GPT once per backend (fastattn, torch) on the embedded
# default corpus (the Python standard library's sources), and write it all as one run of this
# machine: benchmarks/results/<machine>/<date>-<commit>/ (results.json, report.md, plots,
# command.txt, trainer/). Then sample from the trained model. It says at the end whether the
# noise guard found the run quiet (only a quiet run at a clean commit may feed the README;
# benchmarks/README.md says how to commit one).
#   OUT          scratch folder for the raw benchmark JSON and the trainer runs (default: runs/main)
#   TRAIN_FLAGS  extra flags for both trainer runs (default: none, the trainer's default run)
# About 20 minutes on a 2-core CPU once set up (2026-12-04, AVX2 EPYC: quick grid 14 min, trainer
# 2 x ~2); on a fresh machine setup.sh first builds the extension (~6 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
OUT="${OUT:-runs/main}"
mkdir -p "$OUT"

echo "== quick benchmark grid vs PyTorch"
python -m pytest benchmarks --benchmark-only -q --benchmark-json="$OUT/bench.json"

echo "== reference trainer: byte-level GPT on the standard library's sources, per backend"
# shellcheck disable=SC2086
python -m benchmarks.trainer_run "$OUT/trainer" -- ${TRAIN_FLAGS:-}

echo "== a sample from the fastattn model"
python -m fastattn.lm sample --checkpoint "$OUT/trainer/fastattn/ckpt.pt" --prompt "def " --tokens 300

echo "== this machine's run"
python -m benchmarks.report "$OUT/bench.json" --trainer "$OUT/trainer" > "$OUT/report.log"
RUN=$(sed -n 's|^wrote \(.*\)/report.md$|\1|p' "$OUT/report.log")
cat "$RUN/report.md"
cat "$OUT/report.log"
