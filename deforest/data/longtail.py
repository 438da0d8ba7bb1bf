"""A long-tailed multi-label benchmark of real pixels, built from the shipped EuroSAT sample.

Each mosaic is a square of four quadrants, each quadrant a crop of a real EuroSAT tile at a
seeded random offset; its labels are the classes its quadrants come from. The quadrant
classes are drawn from a geometric profile (class ``k`` of a seeded class order with
probability proportional to ``decay**k``), so label frequencies decay geometrically and the
rarest label lands in a few percent of the mosaics. Train and val mosaics are cut from the
sample's ``train/`` tiles (every fifth tile of a class feeds only val), test mosaics from its
``test/`` tiles: no source tile, hence no pixel, is shared between train, val and test.

The mosaics are GeoTIFFs georeferenced from the source tile of their top-left quadrant,
listed in ``labels.csv`` (``path``, space-separated ``labels``, ``split``) as
``data=manifest`` reads them, beside ``benchmark.json`` (the settings and label counts) and
``sources.csv`` (the source tile and offset of every quadrant).
``experiment=imbalance_multilabel`` reads it through :class:`LongtailLayout`, which builds
the folder on first use; ``python -m deforest.data.longtail OUT`` builds it by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from deforest.core.errors import DatasetError
from deforest.data.layouts import ManifestLayout

MANIFEST = "labels.csv"
RECORD = "benchmark.json"
#: which crop of which source tile each quadrant is (quadrants 0-3: top-left, top-right,
#: bottom-left, bottom-right), so the split's disjointness can be checked
SOURCES = "sources.csv"
#: quadrant classes: P(class k) ~ DECAY**k. With 10 classes and four quadrants, 0.65 puts the
#: commonest label in about 80% of the mosaics and the rarest in about 3% (the issue's 2-5%),
#: with every step between them a constant factor (a long tail, not one rare class)
DECAY = 0.65
#: 1500 training mosaics of 32 px: one run of the experiment (small CNN of width 16, 15
#: epochs) takes about 55 s of CPU time with one thread, about a minute on a 2-core CPU
#: (reading the tiles is about half of it), and
#: the rarest label still has about 45 training positives, 9 in val and 18 in test; the test
#: split is the largest so that the rare labels' F1 is measured on more than a handful of tiles
SIZES = {"train": 1500, "val": 300, "test": 600}
#: every VAL_EVERY-th source tile of each train/ class (sorted by name) feeds only the val
#: mosaics: val must hold pixels the network never trained on, or the thresholds and the
#: probability correction fitted there do not transfer to test (measured: val ECE 0.077 where
#: test's was 0.044 when val shared train's source tiles)
VAL_EVERY = 5
#: 2: val mosaics from source tiles of their own (1: val shared train's source tiles)
LAYOUT_VERSION = 2
#: mosaic side in pixels; quadrants are crops of SIZE/2 px of the 64 px source tiles
SIZE = 32


def quadrant_probabilities(num_classes: int, decay: float = DECAY) -> np.ndarray:
    """P(a quadrant comes from the k-th class of the tail order): geometric, summing to 1."""
    weights = decay ** np.arange(num_classes, dtype=np.float64)
    return weights / weights.sum()


def _source_tiles(folder: Path) -> dict[str, list[Path]]:
    """``{class name: sorted tile paths}`` of one EuroSAT split folder (one sub-folder per class)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder (the long-tail benchmark is cut from the EuroSAT sample's "
                           f"train/ and test/ folders)")
    tiles = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
             for d in sorted(folder.iterdir()) if d.is_dir()}
    empty = [name for name, paths in tiles.items() if not paths]
    if not tiles or empty:
        raise DatasetError(f"{folder}: every class folder needs at least one .tif (empty: {empty or 'no class folder'})")
    return tiles


def build_longtail(
    source: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    size: int = SIZE,
    decay: float = DECAY,
) -> dict:
    """Write the benchmark into ``out`` (a new folder) and return its record (``benchmark.json``).

    ``source`` holds ``train/`` and ``test/`` with one sub-folder of GeoTIFFs per class.
    Deterministic for a given ``seed``, sizes and source files.
    """
    source, out = Path(source), Path(out)
    sizes = {**SIZES, **(sizes or {})}
    if size % 2 or size < 2:
        raise ValueError(f"size={size}: an even number of pixels (four quadrants of size/2)")
    fit_tiles, test_tiles = _source_tiles(source / "train"), _source_tiles(source / "test")
    if sorted(fit_tiles) != sorted(test_tiles):
        raise DatasetError(f"{source}: train/ and test/ hold different class folders")
    pools = {
        "train": {c: [p for i, p in enumerate(tiles) if i % VAL_EVERY != VAL_EVERY - 1] for c, tiles in fit_tiles.items()},
        "val": {c: tiles[VAL_EVERY - 1::VAL_EVERY] for c, tiles in fit_tiles.items()},
        "test": test_tiles,
    }
    for c, tiles in pools["val"].items():
        if not tiles:
            raise DatasetError(f"{source / 'train' / c}: fewer than {VAL_EVERY} tiles, none left for val")
    rng = np.random.default_rng(seed)
    # which class is rare is drawn too, so that no one EuroSAT class stands for "the rare label"
    order = [str(c) for c in rng.permutation(sorted(pools["train"]))]
    probs = quadrant_probabilities(len(order), decay)
    half = size // 2
    rows: list[tuple[str, str, str]] = []
    provenance: list[tuple[str, int, str, int, int]] = []  # mosaic, quadrant, source tile, column, row
    counts = {split: dict.fromkeys(order, 0) for split in sizes}
    out.mkdir(parents=True)
    for split, n in sizes.items():
        pool = pools[split]
        (out / split).mkdir()
        for m in range(n):
            classes = rng.choice(len(order), size=4, p=probs)
            image = None
            for q, k in enumerate(classes):
                paths = pool[order[k]]
                path = paths[rng.integers(len(paths))]
                with rasterio.open(path) as src:
                    if src.height < half or src.width < half:
                        raise DatasetError(f"{path}: {src.width}x{src.height} px, smaller than a {half} px quadrant")
                    window = Window(int(rng.integers(src.width - half + 1)), int(rng.integers(src.height - half + 1)),
                                    half, half)
                    crop = src.read(window=window)
                    if image is None:  # the mosaic takes the top-left quadrant's grid and CRS
                        image = np.zeros((src.count, size, size), dtype=crop.dtype)
                        profile = {"driver": "GTiff", "dtype": crop.dtype.name, "count": src.count, "width": size,
                                   "height": size, "crs": src.crs,
                                   "transform": src.transform @ Affine.translation(window.col_off, window.row_off)}
                    if crop.shape[0] != image.shape[0]:
                        raise DatasetError(f"{path}: {crop.shape[0]} bands, the other tiles {image.shape[0]}")
                provenance.append((f"{split}/{split}_{m:05d}.tif", q, os.path.relpath(path, source),
                                   int(window.col_off), int(window.row_off)))
                r, c = divmod(q, 2)
                image[:, r * half:(r + 1) * half, c * half:(c + 1) * half] = crop
            labels = sorted({order[k] for k in classes})
            for label in labels:
                counts[split][label] += 1
            name = f"{split}/{split}_{m:05d}.tif"
            with rasterio.open(out / name, "w", **profile) as dst:
                dst.write(image)
            rows.append((name, " ".join(labels), split))
    with open(out / MANIFEST, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    with open(out / SOURCES, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "quadrant", "source", "col_off", "row_off"])
        writer.writerows(provenance)
    record = {
        "source": str(source.resolve()),
        "version": LAYOUT_VERSION,
        "seed": seed,
        "sizes": sizes,
        "size": size,
        "decay": decay,
        "tail_order": order,
        "label_counts": counts,
        "label_frequency": {c: sum(counts[s][c] for s in sizes) / sum(sizes.values()) for c in order},
    }
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def ensure_longtail(source: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
                    sizes: dict[str, int] | None = None, size: int = SIZE, decay: float = DECAY) -> dict:
    """The benchmark in ``out``: built when missing (in a temporary sibling, then renamed, so
    parallel jobs of a sweep never read a half-written folder), reused when its record holds
    the same settings, refused in one line when it holds other ones."""
    out = Path(out)
    wanted = {"version": LAYOUT_VERSION, "seed": seed, "sizes": {**SIZES, **(sizes or {})}, "size": size, "decay": decay}
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            build_longtail(source, staging / "b", **{k: v for k, v in wanted.items() if k != "version"})
            os.rename(staging / "b", out)
        except OSError:
            if not (out / RECORD).is_file():  # not a parallel job that finished first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    record_path = out / RECORD
    if not record_path.is_file():
        raise DatasetError(f"{out}: not a long-tail benchmark folder (no {RECORD}); choose another folder")
    record = json.loads(record_path.read_text())
    found = {key: record.get(key) for key in wanted}
    if found != wanted:
        raise DatasetError(f"{record_path}: built with {found}, not {wanted}; choose another folder or delete it")
    return record


class LongtailLayout(ManifestLayout):
    """The manifest layout of a long-tail benchmark folder, built there on first use."""

    def __init__(self, root: str | Path, source: str | Path, seed: int = 0, sizes: dict[str, int] | None = None,
                 size: int = SIZE, decay: float = DECAY, **manifest: object) -> None:
        ensure_longtail(source, root, int(seed), {k: int(v) for k, v in (sizes or {}).items()}, int(size), float(decay))
        super().__init__(root, **manifest)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deforest.data.longtail", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="new folder to write (outside the checkout)")
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "data" / "eurosat-ms"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=SIZE)
    for split, n in SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=n, help=f"{split} mosaics")
    args = parser.parse_args(argv)
    try:
        record = ensure_longtail(args.source, args.out, args.seed,
                                 {s: getattr(args, s) for s in SIZES}, args.size)
    except (DatasetError, ValueError) as err:
        sys.exit(f"error: {err}")
    freq = record["label_frequency"]
    print(f"{args.out}: " + ", ".join(f"{c} {freq[c]:.3f}" for c in record["tail_order"]))


if __name__ == "__main__":
    main()
