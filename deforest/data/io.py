"""Raster reading with rasterio: one place that turns files into float32 arrays.

Every failure is re-raised as :class:`TileError` naming the file, so users never see
a bare GDAL message or a traceback from inside a DataLoader worker.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Interleaving, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader

from deforest.core.bands import canonical_band
from deforest.core.errors import TileError
from deforest.core.vocabulary import TIFF_SUFFIXES

# GDAL would list the whole directory on every open to look for sidecar files; on a folder
# of thousands of tiles that dominates the read time. EMPTY_DIR also hides every sidecar, so
# a tile with a ``.aux.xml`` (GDAL's PAM file, which can declare nodata) is opened with
# GDAL's stat-based sidecar lookup instead: see :func:`open_raster`.
os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
SIDECAR = ".aux.xml"
#: GDAL_GEOREF_SOURCES in :func:`pixel_reads`: no georeferencing looked for
PIXELS_ONLY = "NONE"

SUPPORTED_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"}
)
# Classic TIFF and BigTIFF, little and big endian.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# rasterio raises these for bad files (fuzzed in tests); anything else is a bug worth a traceback.
READ_ERRORS = (RasterioError, OSError)


@dataclass(frozen=True)
class RasterHeader:
    """What a header says about a raster, read without touching pixels.

    ``pixel_size`` is in metres (the larger of the two axes), ``None`` when the file has no
    projected CRS to tell it (no georeference, or degrees); ``nodatavals`` has one value per band.
    """

    count: int
    height: int
    width: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str | None, ...]
    pixel_size: float | None = None
    nodatavals: tuple[float | None, ...] = ()
    #: ``[x, y]`` pixel sides in ``units`` (``m``: a projected CRS, ``deg``: a geographic one);
    #: ``None`` without a georeference (what the input contract records and compares)
    res: tuple[float, float] | None = None
    units: str | None = None


def has_sidecar(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a GDAL ``.aux.xml`` sidecar beside it."""
    return os.path.exists(f"{path}{SIDECAR}")


def open_raster(path: str | os.PathLike) -> rasterio.DatasetReader:
    """``rasterio.open(path)``, reading its ``.aux.xml`` sidecar when it has one.

    With ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` GDAL ignores sidecars; a nodata value
    declared there would be silently lost and nodata pixels read as reflectance. One ``stat``
    per open finds the sidecar, and such a file is opened with ``TRUE`` (GDAL then looks its
    sidecars up by name, without listing the directory).
    """
    if has_sidecar(path):
        options = {"GDAL_DISABLE_READDIR_ON_OPEN": "TRUE"}
        if rasterio.env.hasenv() and rasterio.env.getenv().get("GDAL_GEOREF_SOURCES") == PIXELS_ONLY:
            options["GDAL_GEOREF_SOURCES"] = "PAM"  # in pixel_reads: NONE would skip the sidecar too
        with rasterio.Env(**options):
            return rasterio.open(path)
    if rasterio.env.hasenv() and "://" not in os.fspath(path):  # in the caller's GDAL environment
        # (a batch of reads): rasterio.open would set up one more for each file
        return DatasetReader(os.fspath(path))
    return rasterio.open(path)


@contextmanager
def pixel_reads() -> Iterator[None]:
    """One GDAL environment for reading the pixels of many files, without their georeferencing.

    rasterio builds a file's CRS as it opens it (PROJ lookups: more than half of opening and
    reading a EuroSAT tile, benchmarks/README.md), which reading pixels never uses. Inside,
    GDAL looks for no georeferencing (``GDAL_GEOREF_SOURCES=NONE``): same pixels, same nodata
    (a tile with an ``.aux.xml`` sidecar is opened with that as its one source, see
    :func:`open_raster`), no CRS or transform, so headers are read outside it
    (:func:`read_header`). rasterio's environment is per thread; the warning filter is not,
    and only hides the "no geotransform" warning of these opens.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.Env(GDAL_GEOREF_SOURCES=PIXELS_ONLY):
            yield


def pixel_size_m(src: rasterio.DatasetReader) -> float | None:
    """The larger pixel side in metres; ``None`` without a projected CRS."""
    crs = src.crs
    if crs is None or not crs.is_projected or src.transform.is_identity:
        return None
    try:
        factor = crs.linear_units_factor[1]
    except Exception:  # a CRS without linear units
        return None
    return float(max(abs(src.res[0]), abs(src.res[1])) * factor)


def pixel_resolution(transform, crs) -> tuple[list[float] | None, str | None]:
    """``([x, y], units)``: a grid's pixel sides in metres (``m``, a projected CRS, whatever its
    linear unit) or degrees (``deg``, a geographic CRS); ``(None, None)`` without a georeference."""
    if crs is None or transform.is_identity:
        return None, None
    x, y = math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)
    if crs.is_geographic:
        return [x, y], "deg"
    try:
        factor = crs.linear_units_factor[1]
    except Exception:  # a CRS without linear units
        return None, None
    return [x * factor, y * factor], "m"


def read_header(path: str | os.PathLike) -> RasterHeader:
    """Open ``path`` and return its header, or raise :class:`TileError`.

    Also catches, without reading pixels, what would otherwise only fail mid-training:
    empty files, non-TIFF files named ``.tif`` and TIFFs whose data ends past the file's end.
    """
    _check_file(path)
    try:
        with open_raster(path) as src:
            res, units = pixel_resolution(src.transform, src.crs)
            header = RasterHeader(
                src.count, src.height, src.width, src.dtypes[0], src.nodata, src.descriptions,
                pixel_size_m(src), tuple(src.nodatavals), None if res is None else tuple(res), units,
            )
            if src.driver == "GTiff":
                _check_not_truncated(path, src)
            return header
    except READ_ERRORS as err:
        raise TileError(path, f"cannot be opened as a raster ({_short(err)})") from None


def read_raster(
    path: str | os.PathLike,
    bands: Sequence[int] | None = None,
    out_shape: tuple[int, int] | None = None,
    resampling: Resampling = Resampling.bilinear,
) -> np.ndarray:
    """Read ``bands`` (1-based, rasterio order) of ``path`` as float32 ``[C, H, W]``.

    ``out_shape`` resamples on read (BigEarthNet's 20 m and 60 m bands onto the 10 m grid).
    """
    return read_tile(path, bands, out_shape, resampling)[0]


def read_tile(
    path: str | os.PathLike,
    bands: Sequence[int] | None = None,
    out_shape: tuple[int, int] | None = None,
    resampling: Resampling = Resampling.bilinear,
    native: bool = False,
) -> tuple[np.ndarray, list[float | None]]:
    """:func:`read_raster` and each read band's own nodata value (``None``: it declares none),
    from one open of the file (its ``.aux.xml`` sidecar included); ``native``: in the file's
    dtype (a training batch travels as uint16 and becomes float32 on the device)."""
    try:
        with open_raster(path) as src:
            if src.driver != "GTiff" and Path(path).suffix.lower() in TIFF_SUFFIXES:
                _check_file(path)  # a .tif that is no TIFF is named as such
            if src.dtypes[0] not in SUPPORTED_DTYPES:
                raise TileError(path, f"unsupported dtype {src.dtypes[0]}")
            indexes = list(bands) if bands is not None else list(range(1, src.count + 1))
            if max(indexes) > src.count or min(indexes) < 1:
                raise TileError(
                    path, f"has {src.count} bands, band indexes {indexes} were requested"
                )
            shape = None if out_shape is None else (len(indexes), *out_shape)
            data = src.read(indexes, out_shape=shape, resampling=resampling)
            nodata = [src.nodatavals[i - 1] for i in indexes]
    except READ_ERRORS as err:
        _check_file(path)  # a missing, empty or non-TIFF file is named as such (checked only on failure)
        raise TileError(path, f"cannot be read as a raster ({_short(err)})") from None
    return (data if native else data.astype(np.float32, copy=False)), nodata


def resolve_bands(
    bands: Sequence[int | str] | None, band_names: Sequence[str] | None, count: int
) -> list[int]:
    """Turn a band selection (names or 1-based indexes) into 1-based indexes.

    ``None`` selects every band. Names need ``band_names`` (from the data config) and are
    matched by :func:`canonical_band` (``b4`` selects ``B04``).
    """
    if bands is None:
        return list(range(1, count + 1))
    positions = {canonical_band(name): i for i, name in reversed(list(enumerate(band_names or [])))}
    indexes: list[int] = []
    for band in bands:
        if isinstance(band, str) and not band.isdigit():
            if canonical_band(band) not in positions:
                raise ValueError(
                    f"band {band!r} is not among the dataset's band names {list(band_names or [])}"
                )
            indexes.append(positions[canonical_band(band)] + 1)
        else:
            index = int(band)
            if not 1 <= index <= count:
                raise ValueError(f"band index {index} is outside 1..{count} (indexes are 1-based)")
            indexes.append(index)
    return indexes


def file_fingerprint(paths: Sequence[str | os.PathLike]) -> list[tuple]:
    """Name, size and mtime of each file (and of its ``.aux.xml`` sidecar, which can change its
    nodata): enough to notice a changed dataset."""
    out = []
    for path in paths:
        try:
            stat = Path(path).stat()
        except FileNotFoundError:  # gone, or a dangling symlink: reading it names the problem
            out.append((str(path), None, None))
            continue
        entry: tuple = (str(path), stat.st_size, stat.st_mtime_ns)
        try:
            sidecar = os.stat(f"{path}{SIDECAR}")
            entry += (sidecar.st_size, sidecar.st_mtime_ns)
        except OSError:
            pass
        out.append(entry)
    return out


def _check_file(path: str | os.PathLike) -> None:
    """Missing, empty and (for ``.tif`` names) non-TIFF files, named as such."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        if path.is_symlink():
            raise TileError(path, f"is a dangling symlink (to {os.readlink(path)}, which does not exist)") from None
        raise TileError(path, "does not exist") from None
    except OSError as err:
        raise TileError(path, f"cannot be read ({err.strerror})") from None
    if size == 0:
        raise TileError(path, "is empty (0 bytes)")
    if path.suffix.lower() in TIFF_SUFFIXES and magic not in TIFF_MAGIC:
        raise TileError(path, f"is named .tif but is not a TIFF file (it starts with {magic!r})")


def _check_not_truncated(path: str | os.PathLike, src: rasterio.DatasetReader) -> None:
    """The last data block of every band must end inside the file (a cut-off copy fails here)."""
    size = Path(path).stat().st_size
    rows, cols = src.block_shapes[0]
    last = f"{(src.width - 1) // cols}_{(src.height - 1) // rows}"  # GDAL names blocks x_y
    bands = range(1, src.count + 1) if src.interleaving == Interleaving.band else [1]
    for band in bands:
        offset = src.get_tag_item(f"BLOCK_OFFSET_{last}", "TIFF", bidx=band)
        length = src.get_tag_item(f"BLOCK_SIZE_{last}", "TIFF", bidx=band)
        if offset and length and int(offset) + int(length) > size:
            raise TileError(
                path, f"is truncated: its pixel data needs {int(offset) + int(length)} bytes, the file has {size}"
            )


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:200]
