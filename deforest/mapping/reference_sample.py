"""The labelled reference sample: read its points, sample the map under them, and estimate.

A reference point carries the class a user read from better imagery (``class_field``), as a
class name or a map value; the map's class under it and that label make one cell count of the
error matrix of :func:`deforest.mapping.area.estimate_area`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import rasterio
import rasterio.transform
import rasterio.warp
import shapely
from pyogrio.errors import DataLayerError, DataSourceError, FieldError
from rasterio.crs import CRS

from deforest.core.errors import TileError
from deforest.mapping.area import Z95, AreaError, AreaEstimate, estimate_area
from deforest.mapping.strata import MapStrata, map_class_areas, open_map

log = logging.getLogger(__name__)


def read_points(path: str | os.PathLike, field_name: str, crs: CRS | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, values)`` of the point features of ``path``, in ``crs`` (reprojected if needed)."""
    path = str(path)
    if not Path(path).exists():
        raise TileError(path, "does not exist")
    try:
        info = pyogrio.read_info(path)
        if field_name not in list(info["fields"]):
            have = ", ".join(map(str, info["fields"])) or "none"
            raise TileError(path, f"has no field {field_name!r} (class_field); its fields: {have}")
        meta, _, geometries, fields = pyogrio.raw.read(path, columns=[field_name])
    except (DataSourceError, DataLayerError, FieldError, OSError) as err:
        raise TileError(path, f"cannot be read as reference points ({str(err).splitlines()[0][:200]})") from None
    if len(geometries) == 0:
        raise TileError(path, "holds no features")
    if any(g is None for g in geometries):
        raise TileError(path, f"has {sum(g is None for g in geometries)} feature(s) without a geometry")
    geoms = shapely.from_wkb(geometries)
    kinds = set(shapely.get_type_id(geoms).tolist())
    if kinds != {int(shapely.GeometryType.POINT)}:
        raise TileError(path, f"needs point features (one sample unit each), found {meta.get('geometry_type')}")
    xs, ys = shapely.get_x(geoms), shapely.get_y(geoms)
    source = meta.get("crs")
    if source and crs is not None and CRS.from_user_input(source) != crs:
        log.info("%s: reprojecting points from %s to %s", path, source, crs)
        xs, ys = (np.asarray(v) for v in rasterio.warp.transform(CRS.from_user_input(source), crs, xs, ys))
    elif (source is None) != (crs is None):
        log.warning("%s or the map has no CRS: assuming both share one", path)
    return np.asarray(xs, float), np.asarray(ys, float), np.asarray(fields[0], dtype=object)


def _label(value: object) -> str | None:
    """A reference attribute as text (``2.0`` -> ``2``); ``None`` when empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def reference_classes(values: np.ndarray, strata: MapStrata, path: str, field_name: str) -> np.ndarray:
    """Reference labels as indexes into ``strata.names``: a class name or a map value."""
    lookup = {name: k for k, name in enumerate(strata.names)}
    for k, value in enumerate(strata.values):
        lookup.setdefault(str(value), k)
    labels = [_label(v) for v in values]
    empty = sum(label is None for label in labels)
    if empty:
        raise TileError(path, f"{empty} of {len(labels)} point(s) have no {field_name!r} value: label every sample point first")
    unknown = sorted({label for label in labels if label not in lookup})
    if unknown:
        raise TileError(
            path,
            f"{field_name!r} holds {unknown[:5]} that name no map class (map classes: {strata.names}; "
            "values or names, see classes=)",
        )
    return np.asarray([lookup[label] for label in labels], dtype=np.int64)


def sample_map(
    src: rasterio.io.DatasetReader, band: int, xs: np.ndarray, ys: np.ndarray, path: str, points_path: str
) -> np.ndarray:
    """The map's class value under each point; points outside the map or on nodata are errors."""
    rows, cols = rasterio.transform.rowcol(src.transform, xs, ys, op=math.floor)
    rows, cols = np.asarray(rows), np.asarray(cols)
    outside = (rows < 0) | (rows >= src.height) | (cols < 0) | (cols >= src.width)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        left, bottom, right, top = src.bounds
        raise TileError(
            points_path,
            f"{int(outside.sum())} of {len(xs)} point(s) lie outside the map {path} (first at x={xs[first]:.6g}, "
            f"y={ys[first]:.6g}; map bounds {left:.6g}, {bottom:.6g}, {right:.6g}, {top:.6g} in {src.crs}): "
            "points of another area, or a wrong CRS?",
        )
    sampled = np.ma.concatenate(list(src.sample(zip(xs, ys), indexes=band, masked=True)))
    mask = np.ma.getmaskarray(sampled)
    if sampled.dtype.kind == "f":
        mask |= ~np.isfinite(np.ma.getdata(sampled))
    if mask.any():
        first = int(np.flatnonzero(mask)[0])
        raise TileError(
            points_path,
            f"{int(mask.sum())} of {len(xs)} point(s) fall on nodata of the map {path} (first at x={xs[first]:.6g}, "
            f"y={ys[first]:.6g}): the sample must come from the mapped area",
        )
    return np.asarray(np.ma.getdata(sampled)).astype(np.int64)


def assess(
    map_path: str | os.PathLike,
    reference: str | os.PathLike,
    class_field: str,
    band: int = 1,
    classes: Mapping | None = None,
    z: float = Z95,
) -> AreaEstimate:
    """Measure the map's strata, sample the map under each reference point, and estimate."""
    map_path, reference = str(map_path), str(reference)
    strata = map_class_areas(map_path, band, classes)
    xs, ys, values = read_points(reference, class_field, strata.crs)
    with open_map(map_path) as src:
        mapped = sample_map(src, band, xs, ys, map_path, reference)
    row = np.asarray([strata.values.index(v) for v in mapped.tolist()], dtype=np.int64)
    col = reference_classes(values, strata, reference, class_field)
    k = len(strata.values)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (row, col), 1)
    try:
        result = estimate_area(counts, strata.area_ha, strata.names, z)
    except AreaError as err:
        raise TileError(reference, str(err)) from None
    result.info.update(
        map=map_path, reference=reference, class_field=class_field, band=band, pixel_area=strata.pixel_area_m2,
        map_values={name: value for name, value in zip(strata.names, strata.values)},
        mapped_pixels={name: int(c) for name, c in zip(strata.names, strata.pixels)},
    )
    return result


__all__ = ["assess", "read_points", "reference_classes", "sample_map"]
