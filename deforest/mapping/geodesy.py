"""Pixel areas of a raster grid in square metres: one value per row, because a geographic grid's
cells shrink with latitude (a 1-degree cell is about 12,300 km^2 at the equator, half that at 60
degrees) and no constant can stand for them. Used by area estimation (:mod:`deforest.mapping.strata`) and
change maps (:mod:`deforest.mapping.change`); imports neither, so the mapping path needs no vector
libraries."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from deforest.core.errors import TileError

log = logging.getLogger(__name__)

#: (semi-major axis in m, inverse flattening) of WGS 84, for a CRS that names no ellipsoid
WGS84 = (6378137.0, 298.257223563)


def ellipsoid(crs: CRS) -> tuple[float, float]:
    """``(semi-major axis in m, inverse flattening)`` named in the CRS's WKT (0: a sphere)."""
    found = re.search(r'(?:SPHEROID|ELLIPSOID)\["[^"]*",\s*([-\d.eE+]+),\s*([-\d.eE+]+)', crs.to_wkt())
    if not found:
        log.warning("%s names no ellipsoid: pixel areas on WGS 84", crs)
        return WGS84
    return float(found.group(1)), float(found.group(2))


def _zone_area(lat_deg: np.ndarray, a: float, inv_f: float) -> np.ndarray:
    """Area from the equator to latitude ``lat`` per radian of longitude on the ellipsoid (m^2)."""
    s = np.sin(np.radians(lat_deg))
    if inv_f == 0:
        return a * a * s
    f = 1 / inv_f
    e2 = f * (2 - f)
    e = math.sqrt(e2)
    b2 = (a * (1 - f)) ** 2
    # integral of M N cos(phi) dphi: b^2/2 [sin/(1 - e^2 sin^2) + artanh(e sin)/e]
    return b2 / 2 * (s / (1 - e2 * s * s) + np.arctanh(e * s) / e)


def row_pixel_areas(transform: Affine, crs: CRS | None, height: int, path: str = "map") -> np.ndarray:
    """Area in m^2 of one pixel in each of ``height`` rows.

    Projected CRS: ``|a*e - b*d|`` of the transform in the CRS's linear unit, converted to
    metres; the same in every row. Geographic CRS: the ellipsoidal area of each row's cell,
    which shrinks with the cosine of latitude (a 1-degree cell is about 12,300 km^2 at the
    equator and half that at 60 degrees), so no constant can stand for it.
    """
    if crs is None:
        raise TileError(path, "has no CRS: its pixel areas are unknown (assign one with gdal_edit.py -a_srs)")
    if crs.is_geographic:
        if transform.b != 0 or transform.d != 0:
            raise TileError(path, "has a rotated grid in a geographic CRS: warp it to a north-up grid first")
        a, inv_f = ellipsoid(crs)
        edges = transform.f + transform.e * np.arange(height + 1)
        edges = np.clip(edges, -90.0, 90.0)
        zones = _zone_area(edges, a, inv_f)
        return np.abs(np.diff(zones)) * math.radians(abs(transform.a))
    try:
        _, metres = crs.linear_units_factor
    except Exception:  # a CRS without a linear unit GDAL can name
        raise TileError(path, f"has a projected CRS without a linear unit ({crs}): its pixel areas are unknown") from None
    return np.full(height, abs(transform.a * transform.e - transform.b * transform.d) * metres**2)
