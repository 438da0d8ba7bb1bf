"""Label tiles from vector features (points, polygons) or a class raster on the scene's grid.

Every labeller measures, for one tile window, the share of each class in it and turns
those shares into tags with one rule (``mode``):

- ``majority``: the class with the largest share (one tag: multi-class);
- ``any``: every class present (multi-label);
- ``fraction``: every class whose share is at least ``min_fraction`` (multi-label).

Shares are of the tile's area (polygons), of its pixels (label raster) or of the points
that fall in it (points).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import rasterio.warp
import shapely
from pyogrio.errors import DataLayerError, DataSourceError, FieldError
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window

from deforest.core.errors import TileError
from deforest.core.vocabulary import LABEL_MODES as MODES
from deforest.mapping.scene import Scene

log = logging.getLogger(__name__)


def class_name(value: object, mapping: Mapping[str, str] | None) -> str:
    """An attribute or raster value as a manifest tag (``2.0`` -> ``2``; mapped if given)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    key = str(value)
    if mapping is not None:
        if key not in mapping:
            raise ValueError(f"class value {key!r} is missing from class_names {dict(mapping)}")
        key = mapping[key]
    return "_".join(str(key).split())  # manifest tags are space-separated


def normalise_mapping(class_names: Mapping | None) -> dict[str, str] | None:
    """A config ``class_names`` mapping keyed by the value as :func:`class_name` spells it."""
    if not class_names:
        return None
    return {class_name(k, None): str(v) for k, v in class_names.items()}


def tags_from_shares(shares: Mapping[str, float], mode: str, min_fraction: float) -> list[str]:
    """Apply ``mode`` to ``{class: share}``; an empty list means the tile stays unlabelled."""
    present = {name: share for name, share in shares.items() if share > 0}
    if not present:
        return []
    if mode == "majority":
        return [max(sorted(present), key=present.__getitem__)]
    if mode == "any":
        return sorted(present)
    return sorted(name for name, share in present.items() if share >= min_fraction)


class _ShareLabeller:
    """What every labeller shares: its file, the ``mode`` rule and the class-name mapping."""

    def __init__(self, path: str | os.PathLike, mode: str, min_fraction: float, class_names: Mapping | None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.path = Path(path)
        self.mode, self.min_fraction = mode, min_fraction
        self.mapping = normalise_mapping(class_names)

    def class_name(self, value: object) -> str:
        """``value`` as a tag; a value the mapping lacks is an error naming the file."""
        try:
            return class_name(value, self.mapping)
        except ValueError as err:
            raise TileError(self.path, str(err)) from None

    def tags(self, shares: Mapping[str, float]) -> list[str]:
        return tags_from_shares(shares, self.mode, self.min_fraction)


class VectorLabels(_ShareLabeller):
    """Points or polygons with a class attribute, in the scene's CRS.

    Features are reprojected when their CRS differs from the scene's; features with an
    empty attribute are dropped (and counted in the log).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        field: str,
        scene: Scene,
        mode: str = "majority",
        min_fraction: float = 0.5,
        class_names: Mapping | None = None,
    ) -> None:
        super().__init__(path, mode, min_fraction, class_names)
        self.transform = scene.transform
        meta, geometries, values = self._read(field)
        keep = np.asarray([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in values], bool)
        keep &= geometries != None  # noqa: E711 (elementwise on an object array)
        if not keep.all():
            log.warning("%s: %d feature(s) without geometry or %s value skipped", self.path, (~keep).sum(), field)
        geoms = shapely.from_wkb(geometries[keep])
        self.classes = np.asarray([self.class_name(v) for v in values[keep]], dtype=object)
        self.geoms = self._to_scene_crs(geoms, meta.get("crs"), scene)
        kinds = set(shapely.get_type_id(self.geoms).tolist())
        if kinds <= {shapely.GeometryType.POINT, shapely.GeometryType.MULTIPOINT}:
            self.kind = "points"
        elif kinds <= {shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON}:
            self.kind = "polygons"
        else:
            raise TileError(self.path, f"needs only points or only polygons, found {meta.get('geometry_type')}")
        self.tree = shapely.STRtree(self.geoms)
        scene_box = shapely.box(*rasterio.windows.bounds(Window(0, 0, scene.width, scene.height), scene.transform))
        if self.tree.query(scene_box, predicate="intersects").size == 0:
            raise TileError(
                self.path,
                f"has no feature inside the scene {scene.name} (bounds {tuple(round(b) for b in scene_box.bounds)} "
                f"in {scene.crs}): labels of another area, or a wrong CRS in the labels or the scene?",
            )

    def _read(self, field: str) -> tuple[dict, np.ndarray, np.ndarray]:
        try:
            meta, _, geometries, fields = pyogrio.raw.read(self.path, columns=[field])
        except (DataSourceError, DataLayerError, FieldError, OSError) as err:
            raise TileError(self.path, f"cannot be read as vector labels ({str(err).splitlines()[0][:200]})") from None
        if list(meta["fields"]) != [field]:
            raise TileError(self.path, f"has no field {field!r} (label_field)")
        if len(geometries) == 0:
            raise TileError(self.path, "holds no features")
        return meta, geometries, np.asarray(fields[0], dtype=object)

    def _to_scene_crs(self, geoms: np.ndarray, crs: str | None, scene: Scene) -> np.ndarray:
        if crs is None or scene.crs is None:
            if crs is not None or scene.crs is not None:
                log.warning("%s or %s has no CRS: assuming both share one", self.path, scene.name)
            return geoms
        source = CRS.from_user_input(crs)
        if source == scene.crs:
            return geoms

        def reproject(xy: np.ndarray) -> np.ndarray:
            xs, ys = rasterio.warp.transform(source, scene.crs, xy[:, 0], xy[:, 1])
            return np.column_stack([xs, ys])

        log.info("%s: reprojecting labels from %s to %s", self.path, source, scene.crs)
        return shapely.transform(geoms, reproject)

    def points(self) -> list[tuple[float, float, str]]:
        """``(x, y, class)`` of every point (multi-points give one entry per member)."""
        parts, index = shapely.get_parts(self.geoms, return_index=True)
        return [(p.x, p.y, self.classes[i]) for p, i in zip(parts, index)]

    def labels(self, window: Window) -> list[str]:
        """Tags of the tile covering ``window`` of the scene."""
        box = shapely.box(*rasterio.windows.bounds(window, self.transform))
        hits = self.tree.query(box, predicate="intersects")
        if len(hits) == 0:
            return []
        if self.kind == "points":
            names, counts = np.unique(self.classes[hits].astype(str), return_counts=True)
            shares = dict(zip(names.tolist(), (counts / counts.sum()).tolist()))
        else:
            pieces = shapely.intersection(self.geoms[hits], box)
            shares = {
                name: shapely.union_all(pieces[self.classes[hits] == name]).area / box.area
                for name in set(self.classes[hits].tolist())
            }
        return self.tags(shares)


class RasterLabels(_ShareLabeller):
    """A class raster on the scene's grid (e.g. a forest-loss mask); its nodata is ignored."""

    def __init__(
        self,
        path: str | os.PathLike,
        scene: Scene,
        mode: str = "majority",
        min_fraction: float = 0.5,
        class_names: Mapping | None = None,
    ) -> None:
        super().__init__(path, mode, min_fraction, class_names)
        try:
            self.src = rasterio.open(self.path)
        except (RasterioError, OSError) as err:
            raise TileError(self.path, f"cannot be opened as a label raster ({str(err).splitlines()[0][:200]})") from None
        grid = (self.src.width, self.src.height, self.src.transform, self.src.crs)
        if grid != (scene.width, scene.height, scene.transform, scene.crs):
            self.src.close()
            raise TileError(
                self.path,
                f"is not on the scene's grid ({grid[0]}x{grid[1]}, {grid[3]}, {tuple(grid[2])[:6]} vs "
                f"{scene.width}x{scene.height}, {scene.crs}, {tuple(scene.transform)[:6]}); "
                "resample it onto the scene first (gdalwarp -te/-tr)",
            )

    def labels(self, window: Window) -> list[str]:
        """Tags of the tile covering ``window``."""
        data = self.src.read(1, window=window)
        valid = data != self.src.nodata if self.src.nodata is not None else np.ones(data.shape, bool)
        values, counts = np.unique(data[valid], return_counts=True)
        shares: dict[str, float] = {}
        for value, count in zip(values.tolist(), counts.tolist()):
            name = self.class_name(value)
            shares[name] = shares.get(name, 0.0) + count / data.size
        return self.tags(shares)

    def close(self) -> None:
        self.src.close()
