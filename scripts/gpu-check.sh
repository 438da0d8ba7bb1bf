#!/usr/bin/env bash
# GPU check, at most 5 minutes on one GPU, the first thing to run on a session lent a device:
#  1. benchmarks/gpu.py: resnet18, bf16-mixed, channels_last, 13x64x64, trained end to end from a
#     pack of 10,260 EuroSAT tiles (uint16 batches, conversion and D4 on the GPU) vs the same model
#     on batches already on the GPU: tiles/s both ways, their ratio, host syncs per training step
#     (CUDA sync debug mode), peak GPU memory. Goals: >= 30,000 tiles/s, ratio >= 0.8, 0 syncs.
#  2. scripts/gpu_check.py: one multi-label step (train + validation) in bf16-mixed on
#     data/bigearthnet-s2 (CUDA autocast refuses losses CPU autocast allows; validation must keep
#     float32 probabilities), then the eurosat_resnet18 experiment from the files, loss under
#     torch.cuda.set_sync_debug_mode("error").
# Writes $OUT/gpu.json, $OUT/gpu-check.json and their summary with the versions, $OUT/gpu-summary.json
# (OUT defaults to .).
#   scripts/gpu-check.sh [--cpu]   (--cpu: a dry run of both on a machine without a GPU)
# Runs on a bare, air-gapped GPU machine as it is (docs/orchestrate.md, "On a bare, air-gapped GPU machine"): the project is
# not installed, it runs from this checkout on PYTHONPATH, and the wheels of the packages the
# machine lacks travel in .whl/ (scripts/gpu-wheels.sh fetches them, scripts/gpu_payload.py lists
# them) and are installed into a folder of its own. Nothing it runs imports albumentations,
# pyogrio, shapely, zarr or s3fs (scripts/gpu_payload.py, BARE_MISSING).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=${OUT:-.}
mkdir -p "$out"
site=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/deforest-gpu-check-site}
# the modules of scripts/gpu_payload.py's CARRIED_WHEELS (that script imports nothing outside the standard library)
carried=$("$PYTHON" scripts/gpu_payload.py --modules)
if ! "$PYTHON" -c "import $carried" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu-check: $PYTHON cannot import $carried and .whl/ holds no wheels: run scripts/gpu-wheels.sh where PyPI is reachable and carry .whl" >&2
    exit 2
  fi
  rm -rf "$site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# deforest.conf is conf/ through pyproject.toml's package-dir mapping, which only an install
# applies; uninstalled, a link gives the package the same layout (removed again on exit). A
# link rather than a folder of links on PYTHONPATH: `python -m deforest.cli.pack` run from the
# checkout finds ./deforest before anything on PYTHONPATH.
link=""
if ! "$PYTHON" -c "import deforest.conf" 2>/dev/null; then
  ln -s ../conf deforest/conf
  link=deforest/conf
fi
trap 'if [[ -n "$link" ]]; then rm -f "$link"; fi' EXIT
summary() {
  "$PYTHON" - "$out" <<'PY'
import json, platform, sys
from pathlib import Path
import deforest, hydra, lightning, numpy, rasterio, torch, torchmetrics
out = Path(sys.argv[1])
bench = json.loads((out / "gpu.json").read_text())
check = json.loads((out / "gpu-check.json").read_text())
summary = {
    "device": check.get("device"),
    "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "lightning": lightning.__version__, "torchmetrics": torchmetrics.__version__,
                 "numpy": numpy.__version__, "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__,
                 "hydra": hydra.__version__, "deforest_from": str(Path(deforest.__file__).parent)},
    **{k: bench[k] for k in ("end_to_end_tiles_per_s", "on_device_tiles_per_s", "ratio", "host_syncs_per_step",
                             "peak_gpu_memory_mb", "goals", "settings")},
    "multilabel_bf16": check.pop("multilabel_bf16"),
    "train": check,
}
(out / "gpu-summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
}
if [[ "${1:-}" == "--cpu" ]]; then
  timeout 300 "$PYTHON" benchmarks/gpu.py --smoke --out "$out/gpu.json"
  timeout 300 "$PYTHON" scripts/gpu_check.py --cpu --steps 3 --warmup 1 --out "$out/gpu-check.json" data.batch_size=8
  summary
  exit
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 200 "$PYTHON" benchmarks/gpu.py --steps 400 --out "$out/gpu.json"
timeout 100 "$PYTHON" scripts/gpu_check.py --steps 200 --out "$out/gpu-check.json"
summary
