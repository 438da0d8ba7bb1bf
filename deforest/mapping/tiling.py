"""Cut a scene into GeoTIFF tiles and write ``labels.csv`` in the manifest layout.

Each tile keeps its own window transform, the scene's CRS, dtype and nodata, and the
manifest records its bounds and CRS so spatial splits need no extra reads.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio
from rasterio.windows import Window

from deforest.core.errors import TileError
from deforest.mapping.labelling import VectorLabels
from deforest.mapping.scene import Scene

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "labels", "split", "minx", "miny", "maxx", "maxy", "crs")


class Labeller(Protocol):
    def labels(self, window: Window) -> list[str]: ...


@dataclass
class TilingReport:
    """What a tiling run wrote and why it left tiles out."""

    manifest: Path
    written: int = 0
    skipped_nodata: int = 0
    unlabelled: int = 0
    outside: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)


def grid_windows(height: int, width: int, tile_size: int, stride: int) -> Iterator[Window]:
    """Full ``tile_size`` windows every ``stride`` pixels; a remainder strip is left out."""
    for row in range(0, height - tile_size + 1, stride):
        for col in range(0, width - tile_size + 1, stride):
            yield Window(col, row, tile_size, tile_size)


def centred_window(scene: Scene, x: float, y: float, tile_size: int) -> Window | None:
    """The window centred on ``(x, y)``, moved inside the scene at its edges; None outside."""
    row, col = rasterio.transform.rowcol(scene.transform, x, y, op=math.floor)
    if not (0 <= row < scene.height and 0 <= col < scene.width):
        return None
    half = tile_size // 2
    row0 = min(max(row - half, 0), max(scene.height - tile_size, 0))
    col0 = min(max(col - half, 0), max(scene.width - tile_size, 0))
    return Window(col0, row0, tile_size, tile_size)


def tile_scene(
    scene: Scene,
    out_dir: str | Path,
    tile_size: int = 64,
    stride: int | None = None,
    max_nodata: float = 0.1,
    labeller: Labeller | None = None,
    center_on_points: bool = False,
) -> TilingReport:
    """Write ``out_dir/tiles/*.tif`` and ``out_dir/labels.csv``; return the counts.

    Without a labeller every tile is written with empty labels (tiles for prediction);
    with one, tiles it gives no tag are left out. ``center_on_points`` cuts one tile per
    point of a point labeller, labelled with that point's class.
    """
    if tile_size < 1 or (stride is not None and stride < 1):
        raise ValueError(f"tile_size ({tile_size}) and stride ({stride}) must be positive")
    if not 0 <= max_nodata <= 1:
        raise ValueError(f"max_nodata must be within 0..1, not {max_nodata}")
    if tile_size > min(scene.height, scene.width):
        raise TileError(scene.name, f"the scene ({scene.height}x{scene.width}) is smaller than tile_size={tile_size}")
    out_dir = Path(out_dir)
    (out_dir / "tiles").mkdir(parents=True, exist_ok=True)
    report = TilingReport(manifest=out_dir / "labels.csv")
    stem = scene.paths[0].stem
    rows: list[dict[str, str]] = []
    for name, window, tags in _candidates(scene, tile_size, stride or tile_size, labeller, center_on_points, report, stem):
        data = scene.read(window)
        if scene.nodata_mask(data).mean() > max_nodata:
            report.skipped_nodata += 1
            continue
        path = out_dir / "tiles" / f"{name}.tif"
        _write_tile(path, data, scene, window)
        bounds = dict(zip(("minx", "miny", "maxx", "maxy"), (str(float(v)) for v in scene.window_bounds(window))))
        crs = scene.crs.to_string() if scene.crs else ""
        rows.append({"path": f"tiles/{path.name}", "labels": " ".join(tags), "split": "", **bounds, "crs": crs})
        for tag in tags:
            report.class_counts[tag] = report.class_counts.get(tag, 0) + 1
    report.written = len(rows)
    with report.manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return report


def _candidates(
    scene: Scene,
    tile_size: int,
    stride: int,
    labeller: Labeller | None,
    center_on_points: bool,
    report: TilingReport,
    stem: str,
) -> Iterator[tuple[str, Window, list[str]]]:
    """``(tile name, window, tags)`` for every tile worth reading."""
    if center_on_points:
        if not isinstance(labeller, VectorLabels) or labeller.kind != "points":
            raise ValueError("center_on_points=true needs point labels (labels=PATH with point features)")
        for i, (x, y, tag) in enumerate(labeller.points()):
            window = centred_window(scene, x, y, tile_size)
            if window is None:
                report.outside += 1
                continue
            yield f"{stem}_p{i:05d}_r{window.row_off:05d}_c{window.col_off:05d}", window, [tag]
        return
    for window in grid_windows(scene.height, scene.width, tile_size, stride):
        tags = labeller.labels(window) if labeller is not None else []
        if labeller is not None and not tags:
            report.unlabelled += 1
            continue
        yield f"{stem}_r{window.row_off:05d}_c{window.col_off:05d}", window, tags


def _write_tile(path: Path, data: np.ndarray, scene: Scene, window: Window) -> None:
    profile = {
        "driver": "GTiff",
        "width": int(window.width),
        "height": int(window.height),
        "count": data.shape[0],
        "dtype": scene.dtype,
        "crs": scene.crs,
        "transform": rasterio.windows.transform(window, scene.transform),
        "nodata": scene.nodata,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if any(scene.descriptions):
            dst.descriptions = tuple(scene.descriptions)
