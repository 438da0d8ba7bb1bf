"""Forest loss between two dates: pair samples, pair scenes and change maps.

A two-date sample is two co-registered tiles of one place read as one image whose bands are
stacked in date order (early fusion): band ``B04`` of the first date is ``B04@t0``, of the
second ``B04@t1``. Those names travel in the checkpoint's input contract
(:class:`~deforest.contract.InputSpec` ``band_names``), so evaluation and prediction take each
date's bands by name and refuse a pair given in the wrong order or with other bands.

Everything a layout does (reading, nodata, band count, header) is answered per pair by
:class:`PairLayout`, so both heads, batch weighting, splits and packs see an ordinary
``2N``-band dataset. :func:`predict_change` turns two scenes into the usual class/probability
map plus a change map: confidence classes from probability thresholds (as GLAD/RADD alerts
have), patches under a minimum mapping unit removed, and the loss in hectares from pixel areas
of the map's CRS. The post-processing functions are pure (numpy in, numpy out).
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
from rasterio.errors import RasterioError

from deforest.config_checks import ConfigError
from deforest.datasets import MULTICLASS, SPLITS, DatasetError, ManifestLayout
from deforest.geodesy import row_pixel_areas
from deforest.io import TileError, open_raster, read_header, read_tile
from deforest.outputs import atomic_output, read_back_raster
from deforest.scene import Scene

log = logging.getLogger(__name__)

#: joins a pair's two tile paths into one sample source (refused inside a path)
PAIR_SEP = "|"
#: joins a band name and its date: ``B04@t0``
DATE_SEP = "@"
#: the dates of a pair, in stacking order (before, after)
DATES = ("t0", "t1")
PAIR_COLUMNS = ("before", "after", "labels")

#: change-map values: no change, low-confidence change, high-confidence change, nodata
NO_CHANGE, LOW, HIGH, CHANGE_NODATA = 0, 1, 2, 255
#: probabilities stored x254 in uint8 (255 stays free for nodata), as deforest.predict does
UINT8_SCALE = 254
#: WGS 84 semi-major axis (m) and flattening: the ellipsoid of per-row areas in degrees


def dated_band_names(names: Sequence[str | None] | None, dates: Sequence[str] = DATES) -> list[str] | None:
    """``[B02@t0, B03@t0, ..., B02@t1, B03@t1, ...]``; ``None`` unless every band has a name."""
    if not names or not all(names):
        return None
    return [f"{name}{DATE_SEP}{date}" for date in dates for name in names]


def is_dated(names: Sequence[str] | None) -> bool:
    """Whether band names carry a date (a checkpoint trained on pairs)."""
    return bool(names) and all(DATE_SEP in name for name in names)


def date_band_positions(names: Sequence[str] | None) -> list[list[int]]:
    """Per date (``t0``, ``t1``), the positions of its bands among ``names``, in their order:
    how a siamese network (``model.fusion=siamese``) takes the dates apart. Its one backbone
    sees each date in turn, so both dates must hold the same bands in the same order; a
    :class:`ValueError` says what is missing."""
    if not names:
        raise ValueError("model.fusion=siamese needs two-date samples (data=pairs): the data's bands have no names, "
                         f"so no dates (a pair's bands are named B04{DATE_SEP}t0, B04{DATE_SEP}t1)")
    if not is_dated(names):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"model.fusion=siamese needs two-date samples (data=pairs): the bands [{shown}] carry no "
                         f"date (a pair's bands are named B04{DATE_SEP}t0, B04{DATE_SEP}t1)")
    split = [name.rsplit(DATE_SEP, 1) for name in names]
    positions = [[i for i, (_, d) in enumerate(split) if d == date] for date in DATES]
    bands = [[split[i][0] for i in chosen] for chosen in positions]
    if bands[0] != bands[1] or not bands[0] or len(names) != sum(map(len, positions)):
        first, second = (", ".join(b) for b in bands)
        raise ValueError(f"model.fusion=siamese needs the same bands of each date in the same order: {DATES[0]} has "
                         f"[{first}], {DATES[1]} [{second}] (data.bands and model.network_exclude_bands select them)")
    return positions


# ---- two-date samples ------------------------------------------------------------------------
class PairLayout(ManifestLayout):
    """``pairs.csv`` with ``before`` and ``after`` tile paths (relative to ``root``), space-separated
    ``labels`` and an optional ``split``; other columns (``deforest-tile``'s bounds and crs) are
    kept as per-sample metadata, so spatial splits work as for single tiles.

    A sample is both tiles stacked (``before`` bands first). Both must be on one grid (size,
    band count, CRS, transform): checked per pair from the headers when indexing. ``band_names``
    are the names of one date's bands (``null``: the files' band descriptions); the layout's
    own :attr:`band_names` carry the date (``B04@t0``), so ``data.bands`` selects by dated name.
    """

    def __init__(
        self,
        root: str | Path,
        manifest: str = "pairs.csv",
        task: str | None = None,
        class_names: Sequence[str] | None = None,
        band_names: Sequence[str] | None = None,
        allow_outside_root: bool = False,
        label_separator: str | None = None,
    ) -> None:
        super().__init__(root, manifest, task, class_names, None, allow_outside_root, label_separator)
        self.date_band_names = list(band_names) if band_names else None

    def build_index(self):
        index = super().build_index()
        names = self.date_band_names
        if names is None and len(index):
            try:  # the files' own descriptions, when every band has one
                names = list(read_header(self.header_source(index.sources[0])).descriptions)
            except TileError:
                names = None  # an unreadable first tile is named where the datamodule reads it
        self.band_names = dated_band_names(names)
        return index

    def pair_files(self, source: str) -> tuple[str, str]:
        """The ``before`` and ``after`` files of a sample source."""
        before, after = source.split(PAIR_SEP, 1)
        return before, str(self.root / after)

    def read(self, source: str, bands: Sequence[int] | None) -> np.ndarray:
        return self.read_with_nodata(source, bands)[0]

    def read_with_nodata(
        self, source: str, bands: Sequence[int] | None, native: bool = False
    ) -> tuple[np.ndarray, list[float | None]]:
        """Both dates stacked, each band with the nodata value its own file declares."""
        before, after = self.pair_files(source)
        first, first_nodata = read_tile(before, None, native=native)
        second, second_nodata = read_tile(after, None, native=native)
        if second.shape != first.shape:
            raise TileError(
                after,
                f"is {second.shape[0]} bands of {second.shape[1]}x{second.shape[2]}, its before tile {before} "
                f"{first.shape[0]} bands of {first.shape[1]}x{first.shape[2]}: the two dates must match",
            )
        image, nodata = np.concatenate([first, second]), first_nodata + second_nodata
        if bands is None:
            return image, nodata
        chosen = [b - 1 for b in bands]
        return image[chosen], [nodata[i] for i in chosen]

    def header_source(self, source: str) -> str:
        return self.pair_files(source)[0]

    def band_count(self, header_count: int) -> int:
        return len(DATES) * header_count

    def stamp_files(self, source: str) -> list[str]:
        return list(self.pair_files(source))  # a new after tile must renew the cached statistics

    def source_files(self, source: str) -> list[str]:
        return list(self.pair_files(source))  # a pack re-checks both dates

    def _rows(self) -> list[dict[str, str]]:
        """The manifest's rows as :class:`ManifestLayout` reads them: ``path`` is the pair
        (``before|after``), every file checked to exist and each pair to share one grid."""
        if not self.manifest.is_file():
            raise DatasetError(f"{self.manifest}: manifest not found")
        try:
            text = self.manifest.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DatasetError(f"{self.manifest}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        reader = csv.DictReader(text.splitlines())
        columns = set(reader.fieldnames or [])
        missing = set(PAIR_COLUMNS) - columns
        if missing:
            also = " (a pair manifest names the two dates' tiles, not one 'path')" if "path" in columns else ""
            raise DatasetError(f"{self.manifest}: missing column(s) {sorted(missing)}{also}")
        rows = list(reader)
        if not rows:
            raise DatasetError(f"{self.manifest}: no rows")
        seen: dict[tuple[str, str], int] = {}
        out = []
        for row_no, row in enumerate(rows, start=2):
            where = f"{self.manifest}, line {row_no}"
            if None in row:  # csv puts values beyond the header's columns under the key None
                raise DatasetError(f"{where}: {len(row[None])} more value(s) than the header's columns {reader.fieldnames}")
            absent = [c for c in PAIR_COLUMNS if row.get(c) is None]
            if absent:
                raise DatasetError(f"{where}: no {' and no '.join(map(repr, absent))} value (fewer columns than the header)")
            files = []
            for column in ("before", "after"):
                path = row[column]
                if not path.strip():
                    raise DatasetError(f"{where}: empty {column!r}")
                if PAIR_SEP in path:
                    raise DatasetError(f"{where}: {column} path {path!r} contains {PAIR_SEP!r}, which joins a pair's two paths")
                self.check_inside_root(where, path)
                file = self.root / path
                if not file.is_file():
                    state = f"is a dangling symlink (to {os.readlink(file)})" if file.is_symlink() else "does not exist"
                    raise DatasetError(f"{where}: {column} file {file} {state}")
                files.append(file)
            key = tuple(os.path.normcase(os.path.realpath(f)) for f in files)
            if key[0] == key[1]:
                raise DatasetError(f"{where}: before and after are the same file ({key[0]}): a pair needs two dates")
            if key in seen:
                raise DatasetError(f"{where}: the same pair as line {seen[key]}")
            seen[key] = row_no
            split = row.get("split") or None
            if split is not None and split not in SPLITS:
                raise DatasetError(f"{where}: split {split!r} not in {SPLITS}")
            _check_same_grid(where, *files)
            pair = {"path": f"{row['before']}{PAIR_SEP}{row['after']}"}
            out.append(pair | {k: v for k, v in row.items() if k not in ("before", "after")})
        return out


def _check_same_grid(where: str, before: Path, after: Path) -> None:
    """Early fusion compares pixels: the two dates must be co-registered (same grid)."""
    try:
        with open_raster(before) as first, open_raster(after) as second:
            a = (first.width, first.height, first.count, first.crs, first.transform)
            b = (second.width, second.height, second.count, second.crs, second.transform)
    except (RasterioError, OSError):
        return  # an unreadable file is named, with its problem, where it is read
    if a != b:
        raise DatasetError(
            f"{where}: after {after} is not on the grid of before {before} ({b[0]}x{b[1]}, {b[2]} bands, {b[3]}, "
            f"{tuple(b[4])[:6]} vs {a[0]}x{a[1]}, {a[2]} bands, {a[3]}, {tuple(a[4])[:6]}): co-register the dates first"
        )


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
    """Area in m^2 of one pixel of each of ``height`` rows: :func:`deforest.geodesy.row_pixel_areas`
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
    :func:`~deforest.predict.predict_scene`, write ``out`` (band 1 ``confidence``: 0 none, 1 low,
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
            written_by="deforest-predict", change_class=class_name, low=str(low), high=str(high), min_area_ha=str(min_area_ha),
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
    """Two scenes -> ``out`` (the class/probability map of :func:`~deforest.mapping.predict_scene`
    with the model's ``classify`` function) and the change map (see :func:`write_change_map`)."""
    from deforest.mapping import predict_scene  # the map writer, only when a map is made

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
    scene's grid, which is both's); ``options`` go to :func:`~deforest.tiling.tile_scene`. A
    window skipped for nodata on either date is left out of both."""
    from deforest.tiling import MANIFEST_COLUMNS, tile_scene

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
