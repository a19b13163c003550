#!/usr/bin/env bash
# Submit the whole of Table 1 (SGD vs SAM on CIFAR-10/100, docs/paper_reference.md 1.1) as one SLURM job array of
# scripts/slurm/train.sbatch: 5 rows x 3 augmentations x 2 datasets x {sgd, sam} x seeds, one run per array task.
#
#   scripts/slurm/submit_table1.sh --dry-run                    # one line of overrides per array task, then the count
#   scripts/slurm/submit_table1.sh                              # submit, 5 seeds per cell as in the paper
#   scripts/slurm/submit_table1.sh --sgd-2x --max-parallel 16 -- --partition=gpu --time=72:00:00
#
# Options:
#   --seeds N         seeds 0..N-1 for every cell (default 5: the paper reports mean and 95% CI over 5 runs)
#   --sgd-2x          also run SGD at twice the epochs: the paper reports, for SGD, the best of 1x and 2x epochs
#   --rows A,B        only these Table 1 rows (default: all five)
#   --max-parallel P  at most P array tasks at once (sbatch --array=0-N%P)
#   --dry-run         print the tasks and their count; write and submit nothing
#   -- ARGS           passed to sbatch as they are (partition, account, time, ...)
#
# How each task finds its run: the task list goes to $SAM_RUNS_DIR/slurm/table1-<date>/tasks.txt, one line of Hydra
# overrides per task, and a generated array script (train.sbatch's #SBATCH lines plus three lines of body) runs
# `bash scripts/slurm/train.sbatch <line SLURM_ARRAY_TASK_ID+1>` inside the task's allocation. train.sbatch stays a
# plain one-run script, and a resubmitted task resumes because its run directory derives from its overrides and seed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ALL_ROWS=(wrn28_10_200ep wrn28_10_1800ep shake_shake_26_2x96d pyramidnet272 pyramidnet272_shakedrop)
# Each row's epochs (its preset's trainer.epochs), needed only by --sgd-2x; tests/test_presets.py checks them.
declare -A ROW_EPOCHS=([wrn28_10_200ep]=200 [wrn28_10_1800ep]=1800 [shake_shake_26_2x96d]=1800
                       [pyramidnet272]=1800 [pyramidnet272_shakedrop]=1800)
DATASETS=(cifar10 cifar100)
AUGMENTS=(basic cutout autoaugment)
OPTIMIZERS=(sgd sam)

die() { echo "submit_table1: error: $*" >&2; exit 2; }

seeds=5 sgd_2x=false dry_run=false max_parallel="" rows=("${ALL_ROWS[@]}") sbatch_args=()
while (($#)); do
    case $1 in
        --seeds) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--seeds needs a positive integer"; seeds=$2; shift 2 ;;
        --sgd-2x) sgd_2x=true; shift ;;
        --rows) [[ -n ${2:-} ]] || die "--rows needs a comma-separated list"; IFS=, read -ra rows <<<"$2"; shift 2 ;;
        --max-parallel) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--max-parallel needs a positive integer"
                        max_parallel=$2; shift 2 ;;
        --dry-run) dry_run=true; shift ;;
        --) shift; sbatch_args=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
for row in "${rows[@]}"; do
    [[ -n ${ROW_EPOCHS[$row]:-} ]] || die "unknown Table 1 row '$row' (rows: ${ALL_ROWS[*]})"
done

# The grid, seed innermost so that the runs of one cell sit next to each other in the list.
tasks=()
for row in "${rows[@]}"; do
    for dataset in "${DATASETS[@]}"; do
        for augment in "${AUGMENTS[@]}"; do
            for opt in "${OPTIMIZERS[@]}"; do
                for ((seed = 0; seed < seeds; seed++)); do
                    tasks+=("experiment=table1/$row dataset=$dataset augment=$augment optimizer=$opt seed=$seed")
                done
            done
            if $sgd_2x; then
                for ((seed = 0; seed < seeds; seed++)); do
                    tasks+=("experiment=table1/$row dataset=$dataset augment=$augment optimizer=sgd seed=$seed"\
" trainer.epochs=$((2 * ROW_EPOCHS[$row]))")
                done
            fi
        done
    done
done
n=${#tasks[@]}
summary="$n array tasks = ${#rows[@]} rows x ${#AUGMENTS[@]} augmentations x ${#DATASETS[@]} datasets"
summary+=" x ${#OPTIMIZERS[@]} optimizers x $seeds seeds"
$sgd_2x && summary+=" + SGD at 2x epochs"

if $dry_run; then
    printf '%s\n' "${tasks[@]}"
    echo "# $summary"
    exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found: submit from a SLURM login node (or start a local test" \
    "cluster: bash scripts/slurm/local_cluster.sh up)"
TRAIN_SBATCH=$REPO/scripts/slurm/train.sbatch
[[ -f $TRAIN_SBATCH ]] || die "$TRAIN_SBATCH not found"

# The runs root as sam-train reads it (engine/rundir.py: $SAM_RUNS_DIR, else runs), from the repository root the
# tasks run in: a relative SAM_RUNS_DIR is below the repository, wherever this script is called from.
runs_root=${SAM_RUNS_DIR:-runs}
[[ $runs_root == /* ]] || runs_root=$REPO/$runs_root
list_dir=$runs_root/slurm/table1-$(date +%Y%m%d-%H%M%S)
mkdir -p "$list_dir"
list_dir=$(cd "$list_dir" && pwd)
printf '%s\n' "${tasks[@]}" >"$list_dir/tasks.txt"

# sbatch reads #SBATCH directives only up to the first command, so copy train.sbatch's leading block verbatim.
{
    echo "#!/usr/bin/env bash"
    awk 'NR > 1 && !/^#/ && !/^[[:space:]]*$/ { exit } /^#SBATCH/' "$TRAIN_SBATCH"
    echo "set -euo pipefail"
    echo "cd $(printf %q "$REPO")"
    echo "read -ra overrides <<<\"\$(sed -n \"\$((SLURM_ARRAY_TASK_ID + 1))p\" $(printf %q "$list_dir/tasks.txt"))\""
    echo "exec bash $(printf %q "$TRAIN_SBATCH") \"\${overrides[@]}\""
} >"$list_dir/array.sbatch"

array="0-$((n - 1))${max_parallel:+%$max_parallel}"
cd "$REPO"
job=$(sbatch --parsable --job-name=sam-table1 --array="$array" "${sbatch_args[@]}" "$list_dir/array.sbatch")
echo "submitted job array $job ($summary)"
echo "tasks: $list_dir/tasks.txt"
