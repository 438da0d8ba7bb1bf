#!/usr/bin/env bash
# GPU check, at most 5 minutes on one GPU, the first thing to run on a session lent a device:
#  1. benchmarks/gpu.py: resnet18, bf16-mixed, channels_last, 13x64x64, trained end to end from a
#     pack of 10,260 EuroSAT tiles (uint16 batches, conversion and D4 on the GPU) vs the same model
#     on batches already on the GPU: tiles/s both ways, their ratio, host syncs per training step
#     (CUDA sync debug mode), peak GPU memory. Goals: >= 30,000 tiles/s, ratio >= 0.8, 0 syncs.
#  2. scripts/gpu_check.py: the eurosat_resnet18 experiment from the files, loss under
#     torch.cuda.set_sync_debug_mode("error").
# Writes $OUT/gpu.json and $OUT/gpu-check.json (OUT defaults to .).
#   scripts/gpu-check.sh [--cpu]   (--cpu: a dry run of both on a machine without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
out=${OUT:-.}
if [[ "${1:-}" == "--cpu" ]]; then
  timeout 300 "$PYTHON" benchmarks/gpu.py --smoke --out "$out/gpu.json"
  exec timeout 120 "$PYTHON" scripts/gpu_check.py --cpu --steps 3 --warmup 1 --out "$out/gpu-check.json" data.batch_size=8
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 200 "$PYTHON" benchmarks/gpu.py --steps 400 --out "$out/gpu.json"
exec timeout 90 "$PYTHON" scripts/gpu_check.py --steps 200 --out "$out/gpu-check.json"
