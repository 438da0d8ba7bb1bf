"""One loader measurement in a fresh process: tiles/s of one pipeline over the benchmark tiles.

Run by ``benchmarks/run.py`` (one process per pipeline, so GDAL settings and page-cache
warm-up do not leak from one pipeline into another); prints ``{"tiles_per_s": [...]}``.

Pipelines: ``files``, ``packed``, ``stream`` and ``stream_uncached`` (this project's
datamodule and DataLoader, from the real Hydra config; the stream ones read the pack from
the S3 server ``run.py`` started, with and without the chunk cache, which ``stream`` starts
empty: its first pass streams, the later ones read the cache), ``torchgeo`` (TorchGeo 0.8.1's EuroSAT dataset), ``rasterio`` (a bare
open-and-read loop), ``memcpy`` (a plain copy of the packed bytes) and ``s3get`` (raw
GETs of the pack's chunk objects from the S3 server).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

BATCH = 64


def _timed(passes: Callable[[], Iterable[int]], reps: int) -> list[float]:
    """Tiles/s of ``reps`` full passes, after a short untimed warm-up (workers started)."""
    warm = 0
    for tiles in passes():
        warm += tiles
        if warm >= 5 * BATCH:
            break
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        tiles = sum(passes())
        rates.append(tiles / (time.perf_counter() - start))
    return rates


def deforest_loader(tif_root: Path, cache: Path, packed: Path | str | None,
                    *extra: str) -> Callable[[], Iterable[int]]:
    """The project's training DataLoader (1 worker) over every tile but a 1% validation share."""
    from hydra import compose, initialize_config_module

    from deforest.runs.build import build_datamodule

    overrides = [
        f"data.root={tif_root}", f"paths.cache_dir={cache}", f"data.batch_size={BATCH}", "data.num_workers=1",
        "data.persistent_workers=true", "data.val_fraction=0.01", "data.test_fraction=0.0",
    ]
    if packed is not None:
        overrides.append(f"data.packed={packed}")
    overrides += extra
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    return lambda: (len(batch["image"]) for batch in loader)


def d4(sample: dict) -> dict:
    """TorchGeo gets the same random flips/rotations, as a cheap per-sample torch op."""
    import torch

    image = torch.rot90(sample["image"], random.randrange(4), dims=(1, 2))
    sample["image"] = image.flip(2) if random.random() < 0.5 else image
    return sample


def torchgeo_loader(eurosat_root: Path) -> Callable[[], Iterable[int]]:
    from torch.utils.data import DataLoader
    from torchgeo.datasets import EuroSAT

    dataset = EuroSAT(eurosat_root, split="train", transforms=d4)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=1, persistent_workers=True, drop_last=True)
    return lambda: (len(batch["image"]) for batch in loader)


def rasterio_loop(tif_root: Path) -> Callable[[], Iterable[int]]:
    import rasterio

    paths = sorted(str(p) for p in tif_root.rglob("*.tif"))

    def one_pass() -> Iterable[int]:
        random.shuffle(paths)
        for path in paths:
            with rasterio.open(path) as src:
                src.read()
            yield 1

    return one_pass


def memcpy(pack: Path) -> Callable[[], Iterable[int]]:
    import numpy as np

    tiles = np.load(pack / "tiles.npy", mmap_mode="r")
    buffer = np.empty((BATCH, *tiles.shape[1:]), tiles.dtype)

    def one_pass() -> Iterable[int]:
        for start in range(0, len(tiles) - BATCH + 1, BATCH):
            buffer[:] = tiles[start : start + BATCH]
            yield BATCH

    return one_pass


def s3_get(pack: Path) -> Callable[[], Iterable[int]]:
    """Raw GETs of every chunk object of the pack on the S3 server, in tiles: the ceiling of
    any loader that streams from it."""
    import fsspec
    import numpy as np

    tiles = np.load(pack / "tiles.npy", mmap_mode="r")
    tile_bytes = tiles[0].nbytes
    fs = fsspec.filesystem("s3")
    chunks = sorted(p for p in fs.find("bench/eurosat/tiles.zarr") if "/c/" in p)

    def one_pass() -> Iterable[int]:
        for chunk in chunks:
            yield len(fs.cat_file(chunk)) // tile_bytes

    return one_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pipeline", choices=["files", "packed", "stream", "stream_uncached", "s3get", "torchgeo", "rasterio", "memcpy"])
    parser.add_argument("--work", type=Path, required=True, help="benchmark folder made by run.py")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gdal", choices=["default", "empty_dir"], default="default",
                        help="GDAL_DISABLE_READDIR_ON_OPEN for the rasterio and torchgeo pipelines")
    args = parser.parse_args()
    if args.gdal == "empty_dir":
        os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"
    else:
        os.environ.pop("GDAL_DISABLE_READDIR_ON_OPEN", None)
    random.seed(0)
    eurosat = args.work / "eurosat"
    tif_root = eurosat / "ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
    make = {
        "files": lambda: deforest_loader(tif_root, args.work / "cache", None),
        "packed": lambda: deforest_loader(tif_root, args.work / "cache", args.work / "pack"),
        "stream": lambda: deforest_loader(tif_root, args.work / "cache", "s3://bench/eurosat"),
        "stream_uncached": lambda: deforest_loader(tif_root, args.work / "cache", "s3://bench/eurosat",
                                                   "data.cache_chunks=false"),
        "torchgeo": lambda: torchgeo_loader(eurosat),
        "rasterio": lambda: rasterio_loop(tif_root),
        "memcpy": lambda: memcpy(args.work / "pack"),
        "s3get": lambda: s3_get(args.work / "pack"),
    }[args.pipeline]
    rates = _timed(make(), args.reps)
    json.dump({"tiles_per_s": rates}, sys.stdout)


if __name__ == "__main__":
    main()
