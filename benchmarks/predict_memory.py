"""Peak memory of full-resolution prediction across a Sentinel-2 tile's width, stride 1 vs 16.

What is measured: ``deforest.mapping.predict.predict_scene(full_resolution=True)`` on a synthetic
13-band uint16 GeoTIFF **10,980 px wide** (a Sentinel-2 tile's width) and ``tile + 16`` rows
high, i.e. the first 17 rows of windows at stride 1 (2 at stride 16), with an untrained
``small_cnn`` (width 8, 10 classes, no TTA) on 16 px windows (``--tile``; Landsat-sized, so
that stride 1 over the whole width, 186,000 windows, runs in minutes on a CPU: 64 px windows
cost 16 times as much). Each stride runs in its own fresh process, which reports

* ``traced_mb``: the peak of memory allocated through Python and NumPy during the call
  (``tracemalloc``: the blending accumulators, the strip read, the window batches; not the
  network's torch activations);
* ``rss_mb``: the process's peak resident memory (``ru_maxrss``) minus its resident memory
  just before the call (torch activations, GDAL's cache and the allocator's slack included).

A taller scene does not change either figure: the map is written row by row of windows and
the blending keeps a ring of ``tile`` output rows whatever the stride and height, so the
first rows of windows already reach the steady state. The dense ``[windows, width]`` float64
weight matrix the blending used before is given for reference (computed, not run: 0.96 GB
at stride 1 over 10,980 px).

    python benchmarks/predict_memory.py            # ~10 min on 2 cores; results/predict_memory.json
    python benchmarks/predict_memory.py --width 2048 --out /tmp/pm.json   # a quicker check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

BANDS, CLASSES, EXTRA_ROWS = 13, 10, 16
RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _scene(path: Path, width: int, tile: int) -> None:
    import rasterio

    rng = np.random.default_rng(0)
    height = tile + EXTRA_ROWS
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=BANDS, dtype="uint16",
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(rng.integers(1, 5000, (BANDS, height, width), dtype=np.uint16))


def child(scene_path: Path, stride: int, out: Path, batch: int, tile: int) -> dict:
    """One prediction in this (fresh) process: its peak traced and resident memory."""
    import torch

    from deforest.core.contract import Normalization, untrained_spec
    from deforest.training.module import TileClassifier
    from deforest.mapping.predict import predict_scene
    from deforest.mapping.scene import Scene
    from deforest.mapping.sliding import window_starts

    torch.manual_seed(0)
    norm = Normalization([500.0] * BANDS, [100.0] * BANDS, transform="scale")
    spec = untrained_spec("multiclass", [f"c{i}" for i in range(CLASSES)], BANDS, tile, normalization=norm)
    model = TileClassifier.from_keys(spec, width=8, tta=False).eval()
    with torch.inference_mode():  # the network's first-call allocations are not the blending's
        model.predict_proba(torch.zeros(batch, BANDS, tile, tile))
    before = _rss_mb()
    start = time.perf_counter()
    with Scene(scene_path) as scene:
        width, height = scene.width, scene.height
        tracemalloc.start()
        summary = predict_scene(model, spec, scene, out, stride=stride, full_resolution=True, batch_size=batch)
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    xs = window_starts(width, tile, stride)
    return {"stride": stride, "windows": summary["windows"], "seconds": seconds, "traced_mb": traced,
            "rss_mb": peak - before, "rss_before_mb": before,
            "dense_weights_mb": len(xs) * width * 8 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=10_980)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tile", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "predict_memory.json")
    parser.add_argument("--child", nargs=3, metavar=("SCENE", "STRIDE", "MAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scene, stride, out = args.child
        print(json.dumps(child(Path(scene), int(stride), Path(out), args.batch, args.tile)))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as work:  # the scene and the maps stay out of the tree
        scene = Path(work) / "scene.tif"
        _scene(scene, args.width, args.tile)
        for stride in (16, 1):
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--tile", str(args.tile), "--child", str(scene), str(stride),
                   str(Path(work) / f"map{stride}.tif")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[stride] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = {key: rows[1][key] / rows[16][key] for key in ("traced_mb", "rss_mb")}
    result = {
        "rows": rows, "ratio_stride1_vs_16": ratio, "goal": "<= 1.2", "met": max(ratio.values()) <= 1.2,
        "_run": {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                 "scene": f"{args.width} x {args.tile + EXTRA_ROWS} px, {BANDS} bands uint16", "classes": CLASSES,
                 "tile": args.tile, "batch": args.batch},
    }
    print(f"| stride | windows | s | peak traced MB | peak RSS above start MB | dense weights before (MB, not run) |")
    print("|---|---|---|---|---|---|")
    for stride in (16, 1):
        r = rows[stride]
        print(f"| {stride} | {r['windows']} | {r['seconds']:.1f} | {r['traced_mb']:.1f} | {r['rss_mb']:.1f} "
              f"| {r['dense_weights_mb']:.0f} |")
    print(f"| 1 vs 16 | | | {ratio['traced_mb']:.2f}x | {ratio['rss_mb']:.2f}x | goal <= 1.2x: "
          f"{'met' if result['met'] else 'not met'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
