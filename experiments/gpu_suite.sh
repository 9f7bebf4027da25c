#!/usr/bin/env bash
# The GPU suite (issue 18): installs the carried wheels, then runs experiments/gpu_suite.py.
#
#   experiments/gpu_suite.sh --stash              # GPU machine: keep the carried .gpu_wheels/runK for the next call
#   experiments/gpu_suite.sh [--out DIR] [...]    # GPU machine: assemble + install the wheels, run every step
#   experiments/gpu_suite.sh --tiny --out DIR     # CPU: the same steps at tiny shapes, this venv, no install
#
# On the GPU machine the wheels travel in run folders of < 64 MiB (`make gpu-wheels`, see
# experiments/gpu_wheels.py and experiments/README.md "GPU suite"): the earlier calls carry
# .gpu_wheels/run1, run2 with --stash (copied to /tmp/mint-gpu-stash, which lasts while the machine
# stays warm), the last call carries the last run folder and runs the suite. Wheels whose pieces are
# all there are installed with pip --no-index --no-deps into /tmp/mint-site (PYTHONPATH), the
# project itself through PYTHONPATH (pyproject says Python <3.12; the machine has 3.12).
# Other arguments go to gpu_suite.py (--only, --serial, --budget-s, --jobs).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
STASH=/tmp/mint-gpu-stash
SITE=/tmp/mint-site
TINY=0
DO_STASH=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1; ARGS+=("$arg") ;;
    --stash) DO_STASH=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$TINY" = 1 ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PY" experiments/gpu_suite.py "${ARGS[@]}"
fi

PY="${PYTHON:-python3}"
if [ "$DO_STASH" = 1 ]; then
  mkdir -p "$STASH"
  for run in .gpu_wheels/run*; do
    [ -d "$run" ] && cp -v "$run"/* "$STASH"/
  done
  echo "stash $STASH now holds:"; ls -la "$STASH"; df -h /tmp | tail -1
  exit 0
fi

# Assemble every wheel whose pieces are all here (carried run folders + the stash), install those.
rm -rf /tmp/mint-gpu-wheels
ASSEMBLED=$("$PY" experiments/gpu_wheels.py assemble --from .gpu_wheels "$STASH" --into /tmp/mint-gpu-wheels)
echo "wheels: $ASSEMBLED"
export MINT_GPU_WHEELS="$ASSEMBLED"
if ls /tmp/mint-gpu-wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    /tmp/mint-gpu-wheels/*.whl || echo "pip install of the carried wheels failed (exit $?); steps needing them will be skipped"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PY" experiments/gpu_suite.py "${ARGS[@]}"
