"""The strata of an area estimate: the classes of a map raster, their pixel counts and areas.

Pixel areas come from the raster's CRS (ellipsoidal by row in a geographic CRS,
:mod:`deforest.mapping.geodesy`); nodata is left out. The map is read in blocks of rows so a
country-sized map needs a few tens of MB.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window

from deforest.core.errors import ConfigError, TileError
from deforest.mapping.geodesy import row_pixel_areas

M2_PER_HA = 10_000.0
#: pixels read at once when a map is scanned (a few tens of MB for any dtype)
BLOCK_PIXELS = 1 << 22


@dataclass
class MapStrata:
    """The map classes measured on a raster: values, names, pixel counts and areas."""

    path: str
    values: list[int]
    names: list[str]
    pixels: np.ndarray
    area_ha: np.ndarray
    crs: CRS | None
    transform: Affine
    pixel_area_m2: str = ""

    def name_of(self, value: int) -> str:
        return self.names[self.values.index(value)]


def category_names(src: rasterio.io.DatasetReader, band: int) -> dict[int, str]:
    """Class names the raster carries: deforest-predict's ``class_names`` tag (a JSON list by
    class index), else GDAL category names of the band in its ``.aux.xml``."""
    tag = src.tags().get("class_names")
    if tag:
        try:
            names = json.loads(tag)
            if isinstance(names, list):
                return {i: str(n) for i, n in enumerate(names)}
        except json.JSONDecodeError:
            pass
    aux = Path(f"{src.name}.aux.xml")
    if aux.is_file():
        try:
            root = ElementTree.parse(aux).getroot()
        except ElementTree.ParseError:
            return {}
        for node in root.iter("PAMRasterBand"):
            if node.get("band", "1") == str(band):
                cats = node.find("CategoryNames")
                if cats is not None:
                    return {i: c.text for i, c in enumerate(cats.findall("Category")) if c.text}
    return {}


def open_map(path: str | os.PathLike) -> rasterio.io.DatasetReader:
    """The map raster, opened; a missing or unreadable file is a :class:`TileError` naming it."""
    if not Path(path).exists():
        raise TileError(path, "does not exist")
    try:
        return rasterio.open(path)
    except RasterioError as err:
        raise TileError(path, f"cannot be opened as a raster ({str(err).splitlines()[0][:200]})") from None


def map_blocks(src: rasterio.io.DatasetReader):
    """``(top row, window)`` of full-width blocks of about :data:`BLOCK_PIXELS` pixels, top to bottom."""
    rows = max(1, BLOCK_PIXELS // max(1, src.width))
    for top in range(0, src.height, rows):
        yield top, Window(0, top, src.width, min(rows, src.height - top))


def read_classes(src: rasterio.io.DatasetReader, band: int, window: Window, path: str) -> np.ma.MaskedArray:
    """Class values of a window, nodata masked; a float map (deforest-predict dtype=float32)
    must hold whole numbers."""
    try:
        data = src.read(band, window=window, masked=True)
    except RasterioError as err:
        raise TileError(path, f"cannot be read as a raster ({str(err).splitlines()[0][:200]})") from None
    if data.dtype.kind == "f":
        values = np.ma.getdata(data)
        mask = np.ma.getmaskarray(data) | ~np.isfinite(values)
        valid = values[~mask]
        if valid.size and not np.array_equal(valid, np.round(valid)):
            raise TileError(path, f"band {band} holds fractional values: it is not a class map (pick band=)")
        data = np.ma.masked_array(np.where(mask, 0, values).astype(np.int64), mask=mask)
    elif data.dtype.kind not in "iu":
        raise TileError(path, f"band {band} has dtype {data.dtype}: a class map holds integers")
    return data


def map_class_areas(
    path: str | os.PathLike, band: int = 1, classes: Mapping | None = None
) -> MapStrata:
    """Pixel count and area (ha) of every class value on the map, nodata left out.

    Names come from ``classes`` (value -> name; its classes count even with no pixel), else
    from the raster's own class names (:func:`category_names`), else the values themselves.
    """
    path = str(path)
    with open_map(path) as src:
        if not 1 <= band <= src.count:
            raise TileError(path, f"has {src.count} band(s), band={band} does not exist")
        rows_m2 = row_pixel_areas(src.transform, src.crs, src.height, path)
        own = category_names(src, band)
        pixels: dict[int, int] = {}
        area_m2: dict[int, float] = {}
        for top, window in map_blocks(src):
            data = read_classes(src, band, window, path)
            row = np.broadcast_to(np.arange(data.shape[0])[:, None], data.shape)
            keep = ~np.ma.getmaskarray(data)
            values, inverse = np.unique(np.asarray(data)[keep], return_inverse=True)
            if values.size == 0:
                continue
            counts = np.bincount(inverse, minlength=values.size)
            areas = np.bincount(inverse, weights=rows_m2[top + row[keep]], minlength=values.size)
            for v, c, a in zip(values.tolist(), counts.tolist(), areas.tolist()):
                pixels[v] = pixels.get(v, 0) + c
                area_m2[v] = area_m2.get(v, 0.0) + a
        transform, crs = src.transform, src.crs
    if not pixels:
        raise TileError(path, "every pixel is nodata: there is no mapped area")
    mapping = {_as_int(k, path): str(v) for k, v in (classes or {}).items()}
    values = sorted(set(pixels) | set(mapping))
    names = [mapping.get(v, own.get(v, str(v))) for v in values]
    if len(set(names)) != len(names):
        raise ConfigError(f"class names must differ, got {names} for values {values} (set classes=)")
    unit = (
        f"{rows_m2[0]:,.1f} m^2 (projected CRS)" if crs.is_projected
        else f"{rows_m2.min():,.1f}-{rows_m2.max():,.1f} m^2 by row (geographic CRS, ellipsoidal)"
    )
    return MapStrata(
        path=path, values=values, names=names,
        pixels=np.asarray([pixels.get(v, 0) for v in values], dtype=np.int64),
        area_ha=np.asarray([area_m2.get(v, 0.0) for v in values]) / M2_PER_HA,
        crs=crs, transform=transform, pixel_area_m2=unit,
    )


def _as_int(key: object, path: str) -> int:
    try:
        value = float(key)
    except (TypeError, ValueError):
        raise ConfigError(f"classes keys are the map's class values (integers), got {key!r}") from None
    if value != int(value):
        raise ConfigError(f"classes keys are the map's class values (integers), got {key!r}")
    return int(value)


__all__ = ["MapStrata", "category_names", "map_blocks", "map_class_areas", "open_map", "read_classes"]
