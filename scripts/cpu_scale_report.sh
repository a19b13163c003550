#!/usr/bin/env bash
# Regenerate results/cpu_scale/ from the finished CPU-scale runs (scripts/run_cpu_scale.py): the table
# (sam-tables), learning curves (sam-report), and, from the seed-0 checkpoints in runs/cpu_scale/ ($SAM_RUNS_DIR
# when it is set), the Hessian's top eigenvalues, m-sharpness and loss landscapes of SGD vs SAM (sam-analyze); then
# the ablation table (m = 32 vs m = 128, rho) in results/cpu_scale_ablation/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=results/cpu_scale
ABL=results/cpu_scale_ablation
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

$BIN/sam-tables $OUT --out $OUT  # the exact command tests/test_tables.py replays
$BIN/sam-report $OUT/runs --out $OUT/report
$BIN/sam-tables $OUT/runs $ABL/runs --group-by trainer.m,optimizer.rho --out $ABL

for noise in 0.4 0.0; do
    # the seed-0 run directories, named as sam-train names them (under $SAM_RUNS_DIR when it is set)
    sgd=$($BIN/python -m sam_repro.engine.rundir experiment=cpu_scale "dataset.label_noise=$noise" optimizer=sgd seed=0)
    sam=$($BIN/python -m sam_repro.engine.rundir experiment=cpu_scale "dataset.label_noise=$noise" optimizer=sam seed=0)
    if [ ! -f "$sgd/checkpoints/last.pt" ] || [ ! -f "$sam/summary.json" ] || ! grep -q '"finished"' "$sam/summary.json"; then
        echo "skipping label noise $noise: SGD and SAM seed-0 runs are not both finished"; continue
    fi
    name=noise${noise}
    $BIN/sam-analyze hessian "$sgd" "$sam" --subset 1000 --k 5 --out $OUT/analysis/hessian_$name --no-progress
    $BIN/sam-analyze landscape "$sgd" "$sam" --mode 1d --subset 1000 --out $OUT/analysis/landscape_$name --no-progress
    $BIN/sam-analyze msharpness "$sgd" "$sam" --subset 1024 --m 8 32 128 --rho 0.05 0.1 \
        --out $OUT/analysis/msharpness_$name --no-progress
    if [ "$noise" = 0.4 ]; then  # the 2D pair of the condition where SAM's effect is largest
        $BIN/sam-analyze landscape "$sgd" "$sam" --mode 2d --points 15 --subset 500 \
            --out $OUT/analysis/landscape2d_$name --no-progress
    fi
done
echo "wrote $OUT and $ABL"
