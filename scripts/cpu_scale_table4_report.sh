#!/usr/bin/env bash
# Regenerate results/cpu_scale_table4/ (the paper's Table 4 in miniature) and results/cpu_scale_table4_search/ from
# their committed runs (scripts/run_cpu_scale.py --experiment cpu_scale_table4 ... copies each finished run there):
# the tables with the memorized share and the best epoch beside the final test error (sam-tables), and test error
# with the memorized share per epoch for every noise level (sam-report).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=results/cpu_scale_table4
SEARCH=results/cpu_scale_table4_search

# The exact commands tests/test_tables.py replays (from each folder's provenance.json).
$BIN/sam-tables $OUT/runs --group-by schedule.warmup_epochs,optimizer.rho --show memorized val_error best_test_error --out $OUT
$BIN/sam-report $OUT/runs --group-by schedule.warmup_epochs,optimizer.rho --show memorized val_error best_test_error --out $OUT/report
$BIN/sam-tables $SEARCH/runs --group-by schedule.warmup_epochs,optimizer.rho --show memorized val_error best_test_error --out $SEARCH
echo "wrote $OUT and $SEARCH"
