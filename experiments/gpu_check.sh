#!/usr/bin/env bash
# GPU check (issue 9): a few ORPO steps on a Llama-3.2-3B-shaped student with random
# weights (nothing downloaded), bf16 base + LoRA r=256 and 4-bit NF4 base + LoRA,
# through MINT's own loader and packed ORPO forward; prints tokens/s and peak GPU
# memory per mode and writes them to outputs/gpu_check.json.
#   experiments/gpu_check.sh                    # on a CUDA machine, from anywhere
#   experiments/gpu_check.sh --steps 20 --batch-size 4 --no-gradient-checkpointing
# Needs a GPU with room for the 3B base (6.4 GB in bf16) plus activations of
# batch 8 x ~960-token packed pairs (gradient checkpointing on; not measured yet),
# and ~7 GB of temporary disk for the saved random model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch, transformers, peft, bitsandbytes; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}')"
mkdir -p outputs
exec "$PY" experiments/gpu_check.py --json outputs/gpu_check.json "$@"
