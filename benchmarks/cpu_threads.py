"""CPU runs that share cores, and small tiles with and without oneDNN: epoch times of real
``deforest-train`` processes; prints a table and writes ``benchmarks/results/cpu_threads.json``.

* ``concurrency``: the default experiment's epoch time alone (every core), then with one
  concurrent copy on the same cores, each copy with the default threads (every core each:
  oversubscribed), first at libgomp's own spin count (before) and then at deforest's 1000
  spins (``deforest.cli``), and each with ``trainer.num_threads`` = cores / 2 (goal: <= 2.2x alone);
* ``small_tiles``: a manifest of 16 px Landsat tiles cut by ``deforest-tile`` from
  ``data/scenes/rondonia-landsat8`` (full grid, stride 8, labels from NDVI quartiles written as
  a label raster) with ``trainer.onednn`` true and false (goal: < 5 s per epoch on 2 idle cores);
* ``eurosat``: the default EuroSAT run with ``trainer.onednn`` true and false.

Epoch times are the ``epoch N/M done in T s`` lines of deforest-train (training and
validation); the first epoch (warm-up, oneDNN primitive creation) is left out of the median.
``--quick`` runs 2 short epochs of a narrow model: it proves the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

from deforest.cli import OPENMP_WAIT_VARIABLES
from deforest.core.cpu import THREAD_VARIABLES
from deforest.core.outputs import write_text_output

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO / "data" / "scenes" / "rondonia-landsat8" / "LC08_232066_20190727.tif"
EPOCH_LINE = re.compile(r"epoch \d+(?:/\d+)? done in ([0-9.]+) s")
#: libgomp's own spin count (what a process gets without deforest.cli's default of 1000)
LIBGOMP_SPIN = {"GOMP_SPINCOUNT": "300000"}


def train_command(work: Path, name: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "deforest.cli.train", "trainer.enable_progress_bar=true", "test=false",
            "report.enabled=false", "callbacks=none", "logger=csv", f"hydra.run.dir={work / 'runs' / name}",
            f"paths.cache_dir={work / 'cache'}", *overrides]


def start(command: list[str], extra_env: dict[str, str]) -> subprocess.Popen:
    # threads and OpenMP waiting come from the overrides and ``extra_env``
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES + OPENMP_WAIT_VARIABLES} | extra_env
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def epoch_seconds(process: subprocess.Popen) -> list[float]:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"deforest-train failed:\n{output[-3000:]}")
    seconds = [float(s) for s in EPOCH_LINE.findall(output)]
    if not seconds:
        raise RuntimeError(f"no epoch lines in the output:\n{output[-3000:]}")
    return seconds


def median_epoch(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] or seconds)


def runs(work: Path, name: str, overrides: list[str], copies: int = 1, extra_env: dict[str, str] | None = None) -> dict:
    """``copies`` identical runs started together; the median epoch of each."""
    extra_env = extra_env or {}
    processes = [start(train_command(work, f"{name}-{i}", overrides), extra_env) for i in range(copies)]
    per_copy = [epoch_seconds(p) for p in processes]
    return {"overrides": overrides, "env": extra_env, "copies": copies, "epoch_seconds": per_copy,
            "median_epoch_s": statistics.median(median_epoch(s) for s in per_copy)}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def concurrency(work: Path, base: list[str]) -> dict:
    half = max(1, cores() // 2)
    alone = runs(work, "alone", base)
    alone_spin = runs(work, "alone-libgomp-spin", base, extra_env=LIBGOMP_SPIN)
    shared_spin = runs(work, "two-libgomp-spin", base, copies=2, extra_env=LIBGOMP_SPIN)
    shared_default = runs(work, "two-default-threads", base, copies=2)
    shared_split = runs(work, "two-split-threads", [*base, f"trainer.num_threads={half}"], copies=2)
    return {
        "alone": alone, "alone_libgomp_spin": alone_spin, "two_copies_libgomp_spin": shared_spin,
        "two_copies_default_threads": shared_default, "two_copies_split_threads": shared_split,
        "ratio_alone_libgomp_spin": alone_spin["median_epoch_s"] / alone["median_epoch_s"],
        "ratio_libgomp_spin": shared_spin["median_epoch_s"] / alone_spin["median_epoch_s"],
        "ratio_default_threads": shared_default["median_epoch_s"] / alone["median_epoch_s"],
        "ratio_split_threads": shared_split["median_epoch_s"] / alone["median_epoch_s"], "goal": "<= 2.2",
    }


def ndvi_labels(work: Path) -> Path:
    """A label raster on the scene's grid: NDVI quartiles 0-3 (Landsat 8 stack B2-B7: red 3, NIR 4)."""
    with rasterio.open(SCENE) as src:
        red, nir = src.read(3).astype(np.float32), src.read(4).astype(np.float32)
        profile = src.profile | {"count": 1, "dtype": "uint8", "nodata": 255}
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    classes = np.digitize(ndvi, np.quantile(ndvi, [0.25, 0.5, 0.75])).astype(np.uint8)
    path = work / "ndvi_classes.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)
    return path


def landsat_tiles(work: Path, tile_size: int, stride: int) -> tuple[Path, int]:
    out = work / f"landsat-{tile_size}px"
    cmd = [sys.executable, "-m", "deforest.cli.tile", f"scene={SCENE}", f"label_raster={ndvi_labels(work)}",
           f"tile_size={tile_size}", f"stride={stride}", f"out={out}", f"hydra.run.dir={work / 'runs' / 'tile'}",
           "class_names={0: sparse, 1: low, 2: medium, 3: dense}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"deforest-tile failed:\n{done.stderr[-3000:]}")
    return out, sum(1 for _ in (out / "labels.csv").open()) - 1


def onednn_pair(work: Path, name: str, overrides: list[str]) -> dict:
    on = runs(work, f"{name}-onednn", [*overrides, "trainer.onednn=true"])
    off = runs(work, f"{name}-native", [*overrides, "trainer.onednn=false"])
    return {"onednn": on, "native": off, "native_vs_onednn": off["median_epoch_s"] / on["median_epoch_s"]}


def table(results: dict) -> str:
    rows = ["| measure | median epoch (s) | ratio |", "|---|---|---|"]
    c = results["concurrency"]
    rows.append(f"| default experiment alone | {c['alone']['median_epoch_s']:.2f} | 1 |")
    rows.append(f"| alone, libgomp's own spin (GOMP_SPINCOUNT=300000) | {c['alone_libgomp_spin']['median_epoch_s']:.2f} | "
                f"{c['ratio_alone_libgomp_spin']:.2f} |")
    rows.append(f"| + one copy, default threads, libgomp's own spin (before) | "
                f"{c['two_copies_libgomp_spin']['median_epoch_s']:.2f} | {c['ratio_libgomp_spin']:.2f} (goal {c['goal']}) |")
    rows.append(f"| + one copy, default threads each (after: 1000 spins) | {c['two_copies_default_threads']['median_epoch_s']:.2f} | "
                f"{c['ratio_default_threads']:.2f} (goal {c['goal']}) |")
    rows.append(f"| + one copy, trainer.num_threads={max(1, cores() // 2)} each | "
                f"{c['two_copies_split_threads']['median_epoch_s']:.2f} | {c['ratio_split_threads']:.2f} (goal {c['goal']}) |")
    for key, label in (("small_tiles", f"{results['small_tiles']['tiles']} Landsat tiles of 16 px"), ("eurosat", "default EuroSAT run")):
        pair = results[key]
        rows.append(f"| {label}, oneDNN on | {pair['onednn']['median_epoch_s']:.2f} | 1 |")
        rows.append(f"| {label}, oneDNN off (native kernels) | {pair['native']['median_epoch_s']:.2f} | "
                    f"{pair['native_vs_onednn']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 short epochs of a narrow model (checks the script)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_threads.json")
    parser.add_argument("--work", type=Path, help="keep the tiles and runs here (default: a temporary folder)")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    base = [f"trainer.max_epochs={epochs}"]
    if args.quick:
        base += ["model.width=8", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        started = time.time()
        tiles, count = landsat_tiles(work, 16, 8)
        manifest = ["data=manifest", f"data.root={tiles}", "model.input_pool=1"]
        results = {
            "concurrency": concurrency(work, base),
            "small_tiles": {"tiles": count, **onednn_pair(work, "landsat16", [*base, *manifest])},
            "eurosat": onednn_pair(work, "eurosat", base),
        }
    results["_run"] = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                       "cores": cores(), "machine": platform.processor() or platform.machine(),
                       "python": platform.python_version(), "seconds": round(time.time() - started, 1)}
    write_text_output(args.out, json.dumps(results, indent=2))
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
