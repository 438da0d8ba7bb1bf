#!/usr/bin/env bash
# GPU check (at most 5 minutes on one GPU): trains experiment=eurosat_resnet18 with trainer=gpu for
# a fixed number of steps, prints training tiles/s and peak GPU memory, and runs the loss under
# torch.cuda.set_sync_debug_mode("error"). Writes gpu-check.json (or $OUT/gpu-check.json).
#   scripts/gpu-check.sh [--steps 300] [--cpu] [hydra overrides, e.g. data.batch_size=256]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
out=${OUT:-.}/gpu-check.json
exec timeout 300 "$PYTHON" scripts/gpu_check.py --out "$out" "$@"
