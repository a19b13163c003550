#!/usr/bin/env bash
# Regenerate results/cpu_scale_variants/ (the price of SAM's gain) from its committed runs
# (scripts/run_cpu_scale.py --experiment cpu_scale_table4_tuned --results results/cpu_scale_variants ... copies each finished
# run there): the variants table against plain SGD and SAM, with passes, the benchmark's time ratios, the memorised
# share and the validation error (the split that chooses any hyperparameter a paper leaves open), and its figure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=results/cpu_scale_variants

# The exact command tests/test_tables.py replays (from provenance.json).
$BIN/sam-tables $OUT/runs --variants --costs benchmarks/results/sam_overhead.json --show memorized val_error \
    --out $OUT
echo "wrote $OUT"
