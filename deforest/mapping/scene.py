"""Scenes: one multi-band GeoTIFF, or single-band files of one grid stacked in order.

Reads are windowed (a scene never has to fit in memory) and every failure names the
file, as :class:`~deforest.data.io.TileError` does for tiles.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window

from deforest.core.errors import TileError
from deforest.data.io import SUPPORTED_DTYPES, open_raster

PathList = str | os.PathLike | Sequence[str | os.PathLike]


class Scene:
    """An open scene: its grid (size, transform, CRS), dtype, nodata and windowed reads.

    ``paths`` is one raster, or several rasters on one grid whose bands are stacked in
    the order given (Landsat ships one file per band). Use as a context manager.
    """

    def __init__(self, paths: PathList) -> None:
        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("scene: no file given")
        self._stack = ExitStack()
        self._sources = [self._open(p) for p in self.paths]
        first = self._sources[0]
        for path, src in zip(self.paths[1:], self._sources[1:]):
            if (src.width, src.height, src.transform, src.crs) != (first.width, first.height, first.transform, first.crs):
                self.close()
                raise TileError(
                    path,
                    f"is not on the grid of {self.paths[0]} ({src.width}x{src.height}, {src.crs}, "
                    f"{tuple(src.transform)[:6]} vs {first.width}x{first.height}, {first.crs}, "
                    f"{tuple(first.transform)[:6]}); per-band files must share one grid",
                )
        self.width, self.height = first.width, first.height
        self.transform: Affine = first.transform
        self.crs: CRS | None = first.crs
        self.dtype: str = first.dtypes[0]
        self.nodata: float | None = first.nodata
        self._bands = [(src, b) for src in self._sources for b in range(1, src.count + 1)]
        self.descriptions = [src.descriptions[b - 1] for src, b in self._bands]

    def _open(self, path: Path) -> rasterio.DatasetReader:
        try:
            src = self._stack.enter_context(open_raster(path))  # its .aux.xml nodata too
        except (RasterioError, OSError) as err:
            self.close()
            raise TileError(path, f"cannot be opened as a raster ({str(err).splitlines()[0][:200]})") from None
        if src.dtypes[0] not in SUPPORTED_DTYPES:
            self.close()
            raise TileError(path, f"unsupported dtype {src.dtypes[0]}")
        return src

    @property
    def name(self) -> str:
        """The scene's file, or the first of its per-band files, for messages."""
        return str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} band files)"

    @property
    def count(self) -> int:
        return len(self._bands)

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)

    def read(self, window: Window, bands: Sequence[int] | None = None) -> np.ndarray:
        """Bands (1-based, stacked order) of ``window`` (inside the scene) in the scene's dtype, ``[C, h, w]``."""
        chosen = [self._bands[b - 1] for b in bands] if bands is not None else self._bands
        try:
            return np.stack([src.read(b, window=window) for src, b in chosen])
        except (RasterioError, OSError) as err:
            raise TileError(self.name, f"cannot be read at {window} ({str(err).splitlines()[0][:200]})") from None

    def nodata_mask(self, data: np.ndarray) -> np.ndarray:
        """``[h, w]`` True where every band is nodata (or not finite): GDAL's dataset-mask rule."""
        invalid = ~np.isfinite(data) if data.dtype.kind == "f" else np.zeros(data.shape, bool)
        if self.nodata is not None:
            invalid |= np.isnan(data) if np.isnan(self.nodata) else data == self.nodata
        return invalid.all(axis=0)

    def window_bounds(self, window: Window) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` of ``window`` in the scene's CRS."""
        return rasterio.windows.bounds(window, self.transform)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

