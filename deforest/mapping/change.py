"""Forest loss between two dates: pair scenes, change maps and pair tiles.

A model trained on two-date samples (:mod:`deforest.data.pairs`: two co-registered tiles stacked
in date order, bands named ``B04@t0``, ``B04@t1``) classifies a :class:`PairScene`, a before and
an after scene of one grid read as one ``2N``-band scene whose bands are matched by those names.
:func:`predict_change` turns two scenes into the usual class/probability map plus a change map:
confidence classes from probability thresholds (as GLAD/RADD alerts have), patches under a
minimum mapping unit removed, and the loss in hectares from pixel areas of the map's CRS. The
post-processing functions are pure (numpy in, numpy out). :func:`tile_pair` cuts two scenes into
the pair tiles ``data=pairs`` trains on.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from deforest.core.errors import ConfigError, TileError
from deforest.core.outputs import atomic_output, read_back_raster
from deforest.core.vocabulary import MULTICLASS
from deforest.data.pairs import DATES, dated_band_names, is_dated
from deforest.mapping.geodesy import row_pixel_areas
from deforest.mapping.scene import Scene
from deforest.mapping.sliding import predict_scene
from deforest.mapping.writer import UINT8_SCALE, WRITTEN_BY

log = logging.getLogger(__name__)

#: change-map values: no change, low-confidence change, high-confidence change, nodata
NO_CHANGE, LOW, HIGH, CHANGE_NODATA = 0, 1, 2, 255


# ---- two-date scenes -------------------------------------------------------------------------
class PairScene(Scene):
    """A before and an after scene of one grid read as one scene: every band of the first date,
    then every band of the second, described ``<band>@t0``, ``<band>@t1`` when the files
    describe their bands (so a checkpoint trained on pairs matches them by name)."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        paths = [Path(p) for p in paths]
        if len(paths) != len(DATES):
            raise ConfigError(f"a change map needs {len(DATES)} scenes (before, after), not {len(paths)}: {paths}")
        super().__init__(paths)
        first, second = self._sources
        if second.count != first.count:
            self.close()
            raise TileError(paths[1], f"has {second.count} bands, the before scene {paths[0]} {first.count}: the dates need the same bands")
        if not _same_nodata(first.nodata, second.nodata):
            self.close()
            raise TileError(
                paths[1], f"declares nodata {second.nodata}, the before scene {paths[0]} {first.nodata}: give both dates one nodata value"
            )
        names = list(first.descriptions)
        if all(names) and list(second.descriptions) == names:
            self.descriptions = dated_band_names(names)
        else:  # unnamed (or differently named) bands: the band count and order are what is checked
            self.descriptions = [None] * self.count

    @property
    def name(self) -> str:
        return f"{self.paths[0]} + {self.paths[1]}"


def _same_nodata(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---- change-map post-processing (pure) -------------------------------------------------------
def pixel_areas(transform: Affine, crs: CRS | str | None, height: int) -> np.ndarray:
    """Area in m^2 of one pixel of each of ``height`` rows: :func:`deforest.mapping.geodesy.row_pixel_areas`
    (per row on the CRS's ellipsoid for a geographic grid), for a CRS given in any form."""
    return row_pixel_areas(transform, None if crs is None else CRS.from_user_input(crs), height)


def confidence_classes(prob: np.ndarray, low: float, high: float, valid: np.ndarray | None = None) -> np.ndarray:
    """``uint8`` per pixel: :data:`HIGH` where ``prob >= high``, :data:`LOW` where ``low <= prob
    < high``, :data:`NO_CHANGE` below, :data:`CHANGE_NODATA` where not ``valid`` or not finite."""
    if not 0 <= low <= high <= 1:
        raise ValueError(f"confidence thresholds need 0 <= low <= high <= 1, not low={low}, high={high}")
    finite = np.isfinite(prob)
    p = np.where(finite, prob, 0)
    out = np.where(p >= high, HIGH, np.where(p >= low, LOW, NO_CHANGE)).astype(np.uint8)
    out[~finite if valid is None else ~(finite & valid)] = CHANGE_NODATA
    return out


def _row_areas(row_areas: np.ndarray | float, height: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(row_areas, np.float64), (height,))


def _patch_areas(labels: np.ndarray, count: int, row_areas: np.ndarray) -> np.ndarray:
    """Area of each label (0 included), in row blocks: a whole-map weight grid would take 8
    bytes per pixel (1 GB for a 10,980 px Sentinel-2 tile)."""
    out = np.zeros(count + 1)
    step = max(1, 2**20 // max(labels.shape[1], 1))
    for r in range(0, labels.shape[0], step):
        block = labels[r : r + step]
        out += np.bincount(block.ravel(), weights=np.repeat(row_areas[r : r + step], block.shape[1]), minlength=count + 1)
    return out


def remove_small_patches(mask: np.ndarray, row_areas: np.ndarray | float, min_area_ha: float) -> np.ndarray:
    """``mask`` without its connected patches (8-connectivity: pixels touching at a corner are
    one patch) whose area is under ``min_area_ha``; ``row_areas``: m^2 of a pixel of each row
    (:func:`pixel_areas`), or one value for every row."""
    mask = np.asarray(mask, bool)
    if min_area_ha <= 0 or not mask.any():
        return mask.copy()
    try:  # only here: deforest-predict on an ONNX model runs without scipy (the serve extra)
        from scipy import ndimage
    except ImportError:
        raise ConfigError("change.min_area_ha > 0 needs the scipy package: pip install scipy, or change.min_area_ha=0") from None

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    # a patch of exactly the unit stays, whatever rounding its sum of pixel areas picked up
    keep = _patch_areas(labels, count, _row_areas(row_areas, mask.shape[0])) >= min_area_ha * 1e4 * (1 - 1e-9)
    keep[0] = False
    return keep[labels]


def change_map(
    prob: np.ndarray, low: float, high: float, min_area_ha: float, row_areas: np.ndarray | float,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Confidence classes of the change probability, with every change patch (low and high
    together) smaller than the minimum mapping unit set to :data:`NO_CHANGE`."""
    classes = confidence_classes(prob, low, high, valid)
    change = (classes == LOW) | (classes == HIGH)
    classes[change & ~remove_small_patches(change, row_areas, min_area_ha)] = NO_CHANGE
    return classes


def loss_hectares(classes: np.ndarray, row_areas: np.ndarray | float) -> dict[str, float]:
    """Mapped change in hectares: ``high``, ``low`` and ``total`` confidence."""
    areas = _row_areas(row_areas, classes.shape[0])
    high = float((classes == HIGH).sum(axis=1) @ areas) / 1e4
    low = float((classes == LOW).sum(axis=1) @ areas) / 1e4
    return {"high": high, "low": low, "total": high + low}


# ---- from two scenes to a change map ---------------------------------------------------------
def change_class_index(spec, class_name: str) -> int:
    """Position of the change class among the checkpoint's classes."""
    if class_name not in spec.class_names:
        raise ConfigError(f"change.class_name={class_name} is not among the checkpoint's classes {spec.class_names}")
    return spec.class_names.index(class_name)


def write_change_map(
    map_path: str | os.PathLike, out: str | os.PathLike, spec, class_name: str, low: float, high: float,
    min_area_ha: float,
) -> dict[str, object]:
    """Read the change class's probability from a map written by
    :func:`~deforest.mapping.predict.predict_scene`, write ``out`` (band 1 ``confidence``: 0 none, 1 low,
    2 high, 255 nodata; band 2 the probability x254) on the map's grid; returns the areas."""
    index = change_class_index(spec, class_name)
    decisions = 1 if spec.task == MULTICLASS else spec.num_classes
    with rasterio.open(map_path) as src:
        stored = src.read(decisions + index + 1)
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "crs": src.crs,
                   "transform": src.transform}
    if stored.dtype == np.uint8:
        valid = stored != 255
        prob = stored.astype(np.float32) / UINT8_SCALE
    else:
        valid = np.isfinite(stored)
        prob = stored.astype(np.float32)
    if profile["crs"] is None:
        if min_area_ha > 0:
            raise TileError(map_path, "has no CRS: change.min_area_ha needs pixel areas (give a georeferenced scene, or change.min_area_ha=0)")
        row_areas = np.ones(profile["height"])  # areas unknown: patches are not measured
    else:
        row_areas = pixel_areas(profile["transform"], profile["crs"], profile["height"])
    classes = change_map(prob, low, high, min_area_ha, row_areas, valid)
    before = confidence_classes(prob, low, high, valid)
    removed = int(((before == LOW) | (before == HIGH)).sum() - ((classes == LOW) | (classes == HIGH)).sum())
    hectares = loss_hectares(classes, row_areas) if profile["crs"] is not None else None
    scaled = np.where(valid, np.rint(np.clip(prob, 0, 1) * UINT8_SCALE), 255).astype(np.uint8)
    out = Path(out)
    with atomic_output(out, ".tif", verify=read_back_raster) as target, rasterio.open(
        target, "w", **profile, count=2, dtype="uint8", nodata=CHANGE_NODATA, compress="deflate"
    ) as dst:
        dst.write(np.stack([classes, scaled]))
        dst.descriptions = ("confidence", f"p_{class_name}")
        dst.update_tags(
            written_by=WRITTEN_BY, change_class=class_name, low=str(low), high=str(high), min_area_ha=str(min_area_ha),
            classes=json.dumps({"0": "no change", "1": "low confidence", "2": "high confidence", "255": "nodata"}),
            loss_ha=json.dumps(hectares), probability_scale=str(1 / UINT8_SCALE),
        )
    return {"change_out": str(out), "loss_ha": hectares, "pixels_removed_by_mmu": removed}


def default_change_out(out: str | os.PathLike) -> Path:
    """``map.tif`` -> ``map_change.tif``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_change{out.suffix or '.tif'}")


def predict_change(classify, spec, paths: Sequence[str | os.PathLike], out: str | os.PathLike, change_cfg,
                   **predict_options) -> dict[str, object]:
    """Two scenes -> ``out`` (the class/probability map of :func:`~deforest.mapping.sliding.predict_scene`
    with the model's ``classify`` function) and the change map (see :func:`write_change_map`)."""
    low, high = float(change_cfg.low), float(change_cfg.high)
    if not 0 <= low <= high <= 1:
        raise ConfigError(f"change.low={low} and change.high={high} need 0 <= low <= high <= 1")
    if float(change_cfg.min_area_ha) < 0:
        raise ConfigError(f"change.min_area_ha={change_cfg.min_area_ha} must be >= 0")
    change_class_index(spec, change_cfg.class_name)  # before the scene is classified
    if spec.band_names and not is_dated(spec.band_names):
        log.warning("the checkpoint's bands %s carry no date: was it trained on pairs (data=pairs)?", spec.band_names)
    with PairScene(paths) as scene:
        summary = predict_scene(classify, spec, scene, out, **predict_options)
    change_out = change_cfg.get("out") or default_change_out(out)
    summary.update(write_change_map(out, change_out, spec, change_cfg.class_name, low, high, float(change_cfg.min_area_ha)))
    return summary


def pair_paths(cfg) -> list[str] | None:
    """``before=``/``after=`` of the predict config as ``[before, after]`` (``None``: not given)."""
    before, after = cfg.get("before"), cfg.get("after")
    if before is None and after is None:
        return None
    if before is None or after is None:
        raise ConfigError(f"give both before=PATH and after=PATH for a change map ({'before' if before is None else 'after'} is missing)")
    if cfg.get("scene") is not None or cfg.get("tiles") is not None:
        raise ConfigError("give before=/after= (a change map) or scene=/tiles=, not both")
    return [str(before), str(after)]


# ---- two scenes -> pair tiles ----------------------------------------------------------------
def tile_pair(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, labeller_for, **options) -> dict[str, object]:
    """Cut a before and an after scene of one grid into the same windows: ``out/t0/tiles``,
    ``out/t1/tiles`` and ``out/pairs.csv`` (before, after, labels, split, bounds, crs), the
    layout ``data=pairs`` reads. ``labeller_for(scene)`` labels the windows (on the before
    scene's grid, which is both's); ``options`` go to :func:`~deforest.mapping.tiling.tile_scene`. A
    window skipped for nodata on either date is left out of both."""
    # only here: tiling reads vector labels (pyogrio, shapely), which deforest-predict on an ONNX
    # model runs without (the serve extra)
    from deforest.mapping.tiling import MANIFEST_COLUMNS, tile_scene

    out_dir = Path(out_dir)
    with PairScene(paths):  # refuses two grids, band counts or nodata values before any tile is written
        pass
    manifests = []
    for date, path in zip(DATES, paths):
        with Scene(path) as scene:
            labeller = labeller_for(scene)
            try:
                report = tile_scene(scene, out_dir / date, labeller=labeller, **options)
            finally:
                if hasattr(labeller, "close"):
                    labeller.close()
        with report.manifest.open(newline="", encoding="utf-8") as handle:
            manifests.append({tuple(row[k] for k in ("minx", "miny", "maxx", "maxy")): row for row in csv.DictReader(handle)})
        report.manifest.unlink()  # the pairs are the dataset, not either date alone
    first, second = manifests
    rows, counts = [], {}
    for key, row in first.items():
        if key not in second:
            continue
        extra = {k: row[k] for k in MANIFEST_COLUMNS if k not in ("path", "labels")}
        rows.append({"before": f"{DATES[0]}/{row['path']}", "after": f"{DATES[1]}/{second[key]['path']}",
                     "labels": row["labels"], **extra})
        for tag in row["labels"].split():
            counts[tag] = counts.get(tag, 0) + 1
    for date, manifest in zip(DATES, manifests):  # a window one date skipped: its other tile goes too
        for key, row in manifest.items():
            if key not in first or key not in second:
                (out_dir / date / row["path"]).unlink()
    manifest = out_dir / "pairs.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["before", "after", "labels", *[c for c in MANIFEST_COLUMNS if c not in ("path", "labels")]])
        writer.writeheader()
        writer.writerows(rows)
    return {"manifest": str(manifest), "pairs": len(rows), "class_counts": counts,
            "skipped": len(first) + len(second) - 2 * len(rows)}
