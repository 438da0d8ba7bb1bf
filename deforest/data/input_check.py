"""Whether an input is on the value scale and the grid a model was trained on.

The contract (:class:`~deforest.core.contract.InputSpec`) records the training tiles' dtype, the 2nd
and 98th percentiles of each band's values and their pixel size. A model given values on
another scale (reflectance 0..1 to a model trained on integers x10000) or pixels of another
size still answers, confidently and wrongly; so before any inference ``deforest-eval`` and
``deforest-predict`` (a checkpoint and an ONNX model alike) describe their input the same way
from a cheap sample (the first tiles, or a grid of windows of a scene) and compare. A mismatch
is refused with one line naming both sides; under ``allow_dtype``, ``allow_scale`` or
``allow_resolution`` the same line is a warning and the command goes on.

Imports neither torch nor Lightning: the ONNX path runs on numpy and rasterio alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window

from deforest.core.contract import InputSpec
from deforest.core.errors import DatasetError, TileError
from deforest.core.nodata import valid_pixels
from deforest.data.io import open_raster, pixel_resolution, read_tile

log = logging.getLogger(__name__)

#: the robust value range the contract records per band: these percentiles of the valid pixels
PERCENTILES = (2.0, 98.0)
#: values whose typical magnitude (median over bands) differs from training by more than this
#: factor are on another scale (x10000 integers vs 0..1 reflectance differ by 10000; a brighter
#: or darker scene of the same product stays well within it)
SCALE_FACTOR = 5.0
#: pixel sizes (the side of a square of the pixel's area) further apart than this share differ
RESOLUTION_TOLERANCE = 0.1
#: pixel values kept per band in all (a strided sample of each tile's valid pixels)
SAMPLE_VALUES = 200_000
#: deforest-eval and ``tiles=`` prediction sample the first this many tiles
SAMPLE_TILES = 16
#: a scene is sampled on a grid of this many x this many windows of at most ``SCENE_WINDOW`` px
SCENE_GRID = 4
SCENE_WINDOW = 128
#: metres in one degree of longitude at the equator (of latitude: within 1% of it); a degree of
#: longitude is this times cos(latitude)
METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class Allow:
    """Which mismatches warn instead of refusing (``allow_dtype``, ``allow_scale``, ``allow_resolution``)."""

    dtype: bool = False
    scale: bool = False
    resolution: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> Allow:
        return cls(*(bool(cfg.get(f"allow_{name}", False)) for name in ("dtype", "scale", "resolution")))


class PixelSample:
    """A bounded sample of each band's valid pixel values, fed tile by tile (or window by window)."""

    def __init__(self, bands: int, tiles: int = 1) -> None:
        self.per_tile = max(16, SAMPLE_VALUES // max(tiles, 1))
        self.values: list[list[np.ndarray]] = [[] for _ in range(bands)]

    def add(self, image: np.ndarray, valid: np.ndarray | None = None) -> None:
        """``image`` ``[C, H, W]`` raw values; ``valid`` its valid-pixel mask (``None``: all valid)."""
        # every step-th pixel first, then its valid ones: the cost follows the sample, not the tile
        count = image.shape[0]
        step = max(1, image[0].size // self.per_tile)
        values = image.reshape(count, -1)[:, ::step]
        keep = np.isfinite(values) if values.dtype.kind == "f" else np.ones(values.shape, bool)
        if valid is not None:
            keep &= valid.reshape(count, -1)[:, ::step]
        for band in range(count):
            self.values[band].append(values[band][keep[band]].astype(np.float64))

    def percentiles(self) -> tuple[list[float], list[float]] | None:
        """Per band, the :data:`PERCENTILES` of the sampled values; ``None`` when a band has none."""
        bands = [np.concatenate(v) if v else np.empty(0) for v in self.values]
        if not bands or any(b.size == 0 for b in bands):
            return None
        low, high = zip(*(np.percentile(b, PERCENTILES).tolist() for b in bands))
        return [float(v) for v in low], [float(v) for v in high]


@dataclass(frozen=True)
class InputDescription:
    """An input as the contract describes its training tiles: ``source`` names it in messages;
    ``low``/``high`` per band (the contract's band order), ``None`` when nothing was sampled;
    ``pixel_size`` ``[x, y]`` in ``units`` (``m`` or ``deg``), ``None`` without a georeference;
    ``latitude`` of its centre (compares degrees with metres), ``None`` when unknown."""

    source: str
    dtype: str
    low: list[float] | None
    high: list[float] | None
    pixel_size: list[float] | None
    units: str | None
    latitude: float | None = None


def centre_latitude(transform: Affine, crs: CRS | None, width: int, height: int) -> float | None:
    """Latitude of the grid's centre in degrees; ``None`` without a CRS (or one PROJ cannot convert)."""
    if crs is None:
        return None
    x, y = transform @ (width / 2, height / 2)
    if crs.is_geographic:
        return float(y)
    try:
        from rasterio.warp import transform as warp

        _, (lat,) = warp(crs, "EPSG:4326", [x], [y])
    except Exception:  # a CRS PROJ cannot take to WGS 84: no latitude, no metre comparison
        return None
    return float(lat) if math.isfinite(lat) else None


def describe_scene(scene: Any, bands: Sequence[int], nodata: float | None) -> InputDescription:
    """A scene (:class:`~deforest.mapping.scene.Scene`) from a grid of windows spread over it (a few hundred
    thousand pixels, whatever its size): ``bands`` as the model reads them, ``nodata`` its own."""
    h, w = min(SCENE_WINDOW, scene.height), min(SCENE_WINDOW, scene.width)
    rows = sorted({int(r) for r in np.linspace(0, scene.height - h, SCENE_GRID)})
    cols = sorted({int(c) for c in np.linspace(0, scene.width - w, SCENE_GRID)})
    sample = PixelSample(len(bands), len(rows) * len(cols))
    for row in rows:
        for col in cols:
            image = scene.read(Window(col, row, w, h), list(bands)).astype(np.float32)
            sample.add(image, valid_pixels(image, nodata))
    found = sample.percentiles()
    size, units = pixel_resolution(scene.transform, scene.crs)
    return InputDescription(
        scene.name, scene.dtype, *(found or (None, None)), size, units,
        centre_latitude(scene.transform, scene.crs, scene.width, scene.height),
    )


def describe_tiles(paths: Sequence[Any], bands: Sequence[int], source: str) -> InputDescription:
    """Tile files (``tiles=`` prediction) from the first :data:`SAMPLE_TILES`; the grid is the first's."""
    paths = list(paths)[:SAMPLE_TILES]
    sample = PixelSample(len(bands), len(paths))
    for path in paths:
        try:
            image, nodata = read_tile(path, bands)
        except TileError:  # read (and named) again by the prediction itself
            continue
        sample.add(image, valid_pixels(image, nodata))
    with open_raster(paths[0]) as src:
        dtype, transform, crs, width, height = src.dtypes[0], src.transform, src.crs, src.width, src.height
    found = sample.percentiles()
    size, units = pixel_resolution(transform, crs)
    return InputDescription(source, dtype, *(found or (None, None)), size, units,
                            centre_latitude(transform, crs, width, height))


def describe_dataset(dataset: Any, header: Any, header_path: str | None, source: str) -> InputDescription:
    """A split's tiles (``deforest-eval``) from its first :data:`SAMPLE_TILES`, read as training
    reads them (``dataset.read_valid``: the model's bands, each tile's nodata); ``header`` is the
    tiles' reference header (dtype, pixel size), ``header_path`` a file whose centre gives the
    latitude (``None``: none)."""
    sample = PixelSample(len(dataset.bands), min(len(dataset), SAMPLE_TILES))
    for i in range(min(len(dataset), SAMPLE_TILES)):
        try:
            sample.add(*dataset.read_valid(i))
        except TileError:  # the evaluation meets (and counts or names) it again
            continue
    latitude = None
    if header.res is not None and header_path is not None:
        try:
            with open_raster(header_path) as src:
                latitude = centre_latitude(src.transform, src.crs, src.width, src.height)
        except (RasterioError, OSError):
            latitude = None
    found = sample.percentiles()
    return InputDescription(source, header.dtype, *(found or (None, None)),
                            None if header.res is None else list(header.res), header.units, latitude)


def check_input(spec: InputSpec, found: InputDescription, allow: Allow, action: str) -> list[str]:
    """Compare ``found`` with what ``spec`` records; refuse (:class:`DatasetError`) a mismatch that
    ``allow`` does not allow. Returns the allowed mismatches, each logged as a warning. A field the
    contract lacks (a checkpoint written before it recorded it) is not checked."""
    problems = [p for p in (_scale_problem(spec, found, allow, action), _resolution_problem(spec, found, allow, action))
                if p is not None]
    for line, allowed in problems:
        if not allowed:
            raise DatasetError(line)
    for line, _ in problems:
        log.warning("%s", line)
    return [line for line, _ in problems]


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _factor(value: float) -> str:
    rounded = float(f"{value:.2g}")
    return f"{rounded:.0f}" if rounded >= 10 else f"{rounded:g}"


def _is_integer(dtype: str) -> bool:
    return np.dtype(dtype).kind in "iu"


def _scale_problem(spec: InputSpec, found: InputDescription, allow: Allow, action: str) -> tuple[str, bool] | None:
    """Values whose magnitude differs from training's by more than :data:`SCALE_FACTOR` (the median
    over bands of the ratio of ``max(|p2|, |p98|)``): a line, and whether ``allow`` lets it pass."""
    trained_on = spec.source
    if trained_on.value_low is None or trained_on.value_high is None or found.low is None or found.high is None:
        return None
    ratios = []
    for band, (tl, th, fl, fh) in enumerate(zip(trained_on.value_low, trained_on.value_high, found.low, found.high)):
        trained, have = max(abs(tl), abs(th)), max(abs(fl), abs(fh))
        if trained > 0 and have > 0:  # a band that is all zeros says nothing of the scale
            ratios.append((have / trained, band))
    if not ratios:
        return None
    ratio, band = sorted(ratios)[(len(ratios) - 1) // 2]
    if 1 / SCALE_FACTOR <= ratio <= SCALE_FACTOR:
        return None
    name = spec.band_names[band] if spec.band_names else str(spec.bands[band])
    direction = f"about {_factor(1 / ratio)}x larger" if ratio < 1 else f"about {_factor(ratio)}x smaller"
    kinds_differ = _is_integer(found.dtype) != _is_integer(trained_on.dtype)
    switches = "allow_dtype=true or allow_scale=true" if kinds_differ else "allow_scale=true"
    line = (
        f"{found.source}: dtype {found.dtype} with values {_number(found.low[band])}-{_number(found.high[band])}, "
        f"the model was trained on {trained_on.dtype} values {_number(trained_on.value_low[band])}-"
        f"{_number(trained_on.value_high[band])} (band {name}: 2nd-98th percentiles, {direction}) "
        f"({switches} to {action} anyway)"
    )
    return line, allow.scale or (kinds_differ and allow.dtype)


def _side(size: Sequence[float]) -> float:
    """The side of a square of the pixel's area (in the size's units)."""
    return math.sqrt(abs(size[0] * size[1]))


def _in_metres(size: Sequence[float], units: str, latitude: float | None) -> float | None:
    if units == "m":
        return _side(size)
    if latitude is None:
        return None
    return _side(size) * METRES_PER_DEGREE * math.sqrt(max(math.cos(math.radians(latitude)), 0.0))


def _size_text(size: Sequence[float], units: str) -> str:
    x, y = size
    if units == "m":
        return f"{_number(_side(size))} m"
    text = f"{x:.3g}" if abs(x - y) <= 0.01 * max(x, y) else f"{x:.3g}x{y:.3g}"
    return f"{text} deg"


def _resolution_problem(spec: InputSpec, found: InputDescription, allow: Allow, action: str) -> tuple[str, bool] | None:
    """Pixels whose size (the side of a square of their area) differs from training's by more than
    :data:`RESOLUTION_TOLERANCE`; degrees and metres are compared in metres at the input's latitude."""
    trained_on = spec.source
    if not trained_on.pixel_size or not trained_on.pixel_units or not found.pixel_size or not found.units:
        return None
    if trained_on.pixel_units == found.units:
        trained, have = _side(trained_on.pixel_size), _side(found.pixel_size)
        note = ""
    else:
        trained = _in_metres(trained_on.pixel_size, trained_on.pixel_units, found.latitude)
        have = _in_metres(found.pixel_size, found.units, found.latitude)
        if trained is None or have is None:
            log.info("%s: pixel size in %s, the model's in %s, and no latitude to compare them: not checked",
                     found.source, found.units, trained_on.pixel_units)
            return None
        note = f" (about {_number(have)} m at latitude {found.latitude:.1f})" if found.units == "deg" else ""
    if abs(have - trained) <= RESOLUTION_TOLERANCE * trained:
        return None
    trained_text = _size_text(trained_on.pixel_size, trained_on.pixel_units)
    if trained_on.pixel_units != found.units and trained_on.pixel_units == "deg":
        trained_text += f" (about {_number(trained)} m at latitude {found.latitude:.1f})"
    line = (
        f"{found.source}: pixel size {_size_text(found.pixel_size, found.units)}{note}, the model was trained on "
        f"{trained_text} tiles (allow_resolution=true to {action} anyway)"
    )
    return line, allow.resolution
