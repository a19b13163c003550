#!/usr/bin/env bash
# Regenerate results/cpu_scale/ from the finished CPU-scale runs (scripts/run_cpu_scale.py):
# the table (sam-tables), learning curves (sam-report), and, from the seed-0 checkpoints in runs/cpu_scale/,
# the Hessian's top eigenvalues and the 1D loss landscapes of SGD vs SAM (sam-analyze).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=results/cpu_scale
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

$BIN/sam-tables $OUT --out $OUT  # the exact command tests/test_tables.py replays
$BIN/sam-report $OUT/runs --out $OUT/report

for noise in 0.4 0.0; do
    sgd=runs/cpu_scale/dataset.label_noise=${noise},optimizer=sgd/seed0
    sam=runs/cpu_scale/dataset.label_noise=${noise},optimizer=sam/seed0
    if [ ! -f "$sgd/checkpoints/last.pt" ] || [ ! -f "$sam/summary.json" ] || ! grep -q '"finished"' "$sam/summary.json"; then
        echo "skipping label noise $noise: SGD and SAM seed-0 runs are not both finished"; continue
    fi
    name=noise${noise}
    $BIN/sam-analyze hessian "$sgd" "$sam" --subset 1000 --k 5 --out $OUT/analysis/hessian_$name --no-progress
    $BIN/sam-analyze landscape "$sgd" "$sam" --mode 1d --subset 1000 --out $OUT/analysis/landscape_$name --no-progress
done
echo "wrote $OUT"
