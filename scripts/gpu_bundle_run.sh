#!/usr/bin/env bash
# run.sh of the GPU bundle (`make gpu-bundle` copies this file into gpu-bundle/; scripts/gpu_bundle.py says what
# else is there). From inside the folder, on a node with PyTorch, numpy and timm and no internet:
#
#   ./run.sh [--smoke] [--budget-s 540] [--only tests|check]
#
# 1. a venv beside the node's PyTorch: `python3 -m venv --system-site-packages`, with the node's own site-packages
#    added after the venv's (when the node's python3 is itself a venv, --system-site-packages alone would reach the
#    interpreter it was made from, not the PyTorch beside it);
# 2. an offline install from wheels/ (pip from wheels/ too): hydra-core, omegaconf and pytest where the node lacks
#    them, then the project's wheel without its declared dependencies (W&B and submitit are left out on purpose);
# 3. `pytest -m cuda` on tests/ (the CUDA tier), given at most a third of the budget;
# 4. the GPU check (`python -m sam_repro.acceptance.run`) on the CIFAR-10 export, with what is left of the budget.
#
# Everything is written under $OUT (default ./out): run.log, pytest_cuda.log, pytest_cuda.xml, gpu_check.json and
# gpu_check.md. --smoke runs the same steps on a CPU at toy sizes (the test suite does, on a simulated node).
# Exit status: 0 if every step passed, 1 if a step failed, 2 for a wrong argument or an install that failed.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SMOKE=0
BUDGET_S=540
ONLY=""
usage() { echo "usage: run.sh [--smoke] [--budget-s SECONDS] [--only tests|check]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --budget-s) [ $# -ge 2 ] || usage; BUDGET_S="$2"; shift ;;
        --only) [ $# -ge 2 ] || usage; ONLY="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) usage ;;
    esac
    shift
done
case "$ONLY" in ""|tests|check) ;; *) usage ;; esac
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] || usage

OUT="${OUT:-$HERE/out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "run.sh: $*"; }

NODE_PYTHON="${NODE_PYTHON:-python3}"
VENV="${SAM_BUNDLE_VENV:-${TMPDIR:-/tmp}/sam-gpu-bundle-venv}"
say "node: $(command -v "$NODE_PYTHON") ($("$NODE_PYTHON" -c 'import sys; print(sys.version.split()[0])')); venv: $VENV"

# ---- 1. the venv beside the node's PyTorch
rm -rf "$VENV"
"$NODE_PYTHON" -m venv --without-pip --system-site-packages "$VENV" || { say "error: could not create $VENV"; exit 2; }
PY="$VENV/bin/python"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# site.addsitedir also reads the node's own .pth files (a PyTorch exposed through one, say).
"$NODE_PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' | while read -r dir; do
    [ -d "$dir" ] && echo "import site; site.addsitedir('$dir')"
done > "$SITE/zz-node-site-packages.pth"
"$PY" -c 'import torch, numpy' || { say "error: the node's python3 has no torch or numpy"; exit 2; }

# ---- 2. the offline install
PIP_WHEEL=("$HERE"/wheels/pip-*.whl)
PROJECT_WHEEL=("$HERE"/wheels/sam_repro-*.whl)
pip_install() {
    PIP_CONFIG_FILE=/dev/null "$PY" "${PIP_WHEEL[0]}/pip" install --quiet --no-index --no-cache-dir \
        --disable-pip-version-check --find-links "$HERE/wheels" "$@"
}
pip_install hydra-core omegaconf pytest || { say "error: installing hydra-core, omegaconf and pytest failed"; exit 2; }
pip_install --no-deps "${PROJECT_WHEEL[0]}" || { say "error: installing the project's wheel failed"; exit 2; }
"$PY" - <<'EOF' || { say "error: the venv does not import the project beside the node's PyTorch"; exit 2; }
import sys, sysconfig
import hydra, numpy, omegaconf, torch
import sam_repro
assert sam_repro.__file__.startswith(sys.prefix), sam_repro.__file__
print(f"run.sh: torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}) "
      f"from {torch.__file__}; hydra-core {hydra.__version__}, omegaconf {omegaconf.__version__}, numpy "
      f"{numpy.__version__}; sam_repro from {sam_repro.__file__}")
EOF
say "installed in $(elapsed) s"

STATUS=0
# ---- 3. the CUDA tier
if [ "$ONLY" != check ]; then
    TESTS_S=$(( BUDGET_S / 3 ))
    say "pytest -m cuda (at most $TESTS_S s)"
    (cd "$HERE" && timeout --kill-after=10 "$TESTS_S" "$PY" -m pytest -m cuda tests -q -p no:cacheprovider \
        --junitxml "$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.log")
    rc=$?
    [ $rc -eq 0 ] || { say "pytest -m cuda: exit status $rc"; STATUS=1; }
fi

# ---- 4. the GPU check
if [ "$ONLY" != tests ]; then
    LEFT=$(( BUDGET_S - $(elapsed) ))
    DATA=("$HERE"/cifar10-subset*.npz)
    ARGS=(--out "$OUT/gpu_check.json" --budget-s "$LEFT" --data "${DATA[0]}")
    [ $SMOKE -eq 1 ] && ARGS+=(--smoke --budget-s 1e9)
    say "gpu check (budget $LEFT s)"
    (cd "${TMPDIR:-/tmp}" && "$PY" -u -m sam_repro.acceptance.run "${ARGS[@]}")
    rc=$?
    [ $rc -eq 0 ] || { say "gpu check: exit status $rc"; STATUS=1; }
fi

say "done in $(elapsed) s, exit status $STATUS; results in $OUT"
exit $STATUS
