"""Packed tile store: a dataset converted once into one memory-mappable array.

Opening one GeoTIFF per tile costs far more than the pixels it holds; a pack keeps every
tile of a dataset in a single ``tiles.npy`` (``[N, C, H, W]``, the sources' integer dtype
where that is lossless, else float32) beside ``index.json`` (task, classes, sources,
targets, given splits, band names and a fingerprint of the source files).
:class:`PackedLayout` serves it through the :class:`~deforest.datasets.TileLayout`
interface, so the datamodule splits, augments and normalises exactly as with the files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deforest.datasets import DatasetError, TileIndex, TileLayout
from deforest.io import TileError, file_fingerprint, read_header
from deforest.safety import atomic_write_text, temp_prefix

log = logging.getLogger(__name__)

# 2: each tile's own nodata values in the index; dtype and pixel-size checks while packing
PACK_VERSION = 2
TILES, INDEX, LOCK = "tiles.npy", "index.json", ".pack.lock"
#: headers read to decide the dataset's dtype and pixel size, as the datamodule does
REFERENCE_SAMPLE = 32
#: source dtypes stored as they are; float32 holds these exactly, so reading back is lossless
NATIVE_DTYPES = frozenset({"uint8", "int8", "uint16", "int16"})


def source_files(source: str) -> list[str]:
    """The files one sample is read from: the tile, or every file of a patch folder."""
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file())
    return [source]


def layout_settings(layout: TileLayout) -> dict:
    """The layout's class and options (root, manifest, nomenclature, size, ...)."""
    settings = {k: _absolute(v) for k, v in vars(layout).items() if not k.startswith("_")}
    return {"class": f"{type(layout).__module__}.{type(layout).__qualname__}", **settings}


def fingerprint(layout: TileLayout, index: TileIndex) -> str:
    """Hash of the layout settings, the labels and splits, and every source file's name, size
    and mtime: a change to any of them changes what training would see."""
    files = [os.path.abspath(f) for source in index.sources for f in source_files(source)]
    payload = {
        "version": PACK_VERSION,
        "layout": layout_settings(layout),
        "classes": index.class_names,
        "targets": index.targets.tolist(),
        "splits": index.splits,
        "meta": index.meta,
        "files": file_fingerprint(files),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _absolute(value: object) -> object:
    return Path(value).resolve() if isinstance(value, Path) else value


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack_dataset` did: ``written`` is False when the pack was up to date."""

    path: Path
    tiles: int
    shape: tuple[int, ...]
    dtype: str
    written: bool


def pack_dataset(
    layout: TileLayout,
    out: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
) -> PackResult:
    """Convert every sample of ``layout`` into a pack at ``out`` (a directory).

    Tiles are read and written one at a time into a memory-mapped file, so the dataset
    need not fit in memory. An existing pack with the same fingerprint is kept; any other
    is replaced only once the new one is complete.
    """
    out = Path(out).expanduser()
    index = layout.build_index()
    if len(index) == 0:
        raise DatasetError(f"{layout.root}: no tiles found")
    key = fingerprint(layout, index)
    out.mkdir(parents=True, exist_ok=True)
    with _pack_lock(out):  # a second packer of the same folder waits, then finds the pack up to date
        return _pack_locked(layout, index, key, out, progress)


@contextmanager
def _pack_lock(out: Path) -> Iterator[None]:
    """One packer per pack folder at a time (parallel jobs packing one dataset)."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another deforest-pack is writing this pack; waiting for it", out)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system: the unique temporary names still keep writes apart
            pass
        yield
    finally:
        os.close(fd)


def _pack_locked(
    layout: TileLayout, index: TileIndex, key: str, out: Path, progress: Callable[[int, int], None] | None
) -> PackResult:
    existing = _read_index(out) if (out / INDEX).is_file() and (out / TILES).is_file() else None
    if existing is not None and existing.get("fingerprint") == key:
        shape = tuple(existing["shape"])
        return PackResult(out, shape[0], shape, existing["dtype"], written=False)

    from deforest.validation import reference_header

    headers = [read_header(layout.header_source(s)) for s in index.sources[:REFERENCE_SAMPLE]]
    reference = reference_header(headers)
    sample, nodata = layout.read_with_nodata(index.sources[0], None)
    dtype = reference.dtype if reference.dtype in NATIVE_DTYPES else "float32"
    shape = (len(index), *sample.shape)
    for stale in out.glob(f".{TILES}.*.partial"):  # left by a packer that was killed (we hold the lock)
        stale.unlink(missing_ok=True)
    partial = out / f"{temp_prefix(out / TILES)}partial"
    try:
        nodata_values = _write_tiles(layout, index.sources, partial, dtype, shape, (sample, nodata), reference, progress)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half-written pack left behind
        raise
    (out / INDEX).unlink(missing_ok=True)  # a pack without its index is never read
    os.replace(partial, out / TILES)
    record = {
        "version": PACK_VERSION,
        "fingerprint": key,
        "layout": layout_settings(layout),
        "root": str(layout.root),
        "band_names": layout.band_names,
        "dtype": dtype,
        "shape": list(shape),
        "task": index.task,
        "class_names": index.class_names,
        "sources": [os.path.abspath(s) for s in index.sources],
        "targets": index.targets.tolist(),
        "splits": index.splits,
        "meta": index.meta,
        # each tile's own nodata, per band (NaN written as the string "nan": JSON has no NaN)
        "nodata": nodata_values,
    }
    atomic_write_text(out / INDEX, json.dumps(record, default=str))
    return PackResult(out, len(index), shape, dtype, written=True)


def _json_nodata(values: Sequence[float | None]) -> list[float | str | None]:
    return [None if v is None else "nan" if math.isnan(v) else float(v) for v in values]


def _write_tiles(
    layout: TileLayout,
    sources: list[str],
    path: Path,
    dtype: str,
    shape: tuple[int, ...],
    first: tuple[np.ndarray, list[float | None]],
    reference,
    progress: Callable[[int, int], None] | None,
) -> list[list[float | str | None]]:
    """Write every tile into ``path``; returns each tile's nodata values (JSON-ready)."""
    from deforest.validation import check_header, valid_pixels

    tiles = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    nodata_values = []
    for i, source in enumerate(sources):
        header_file = layout.header_source(source)
        check_header(header_file, read_header(header_file), reference)  # the datamodule's checks
        image, nodata = first if i == 0 else layout.read_with_nodata(source, None)
        _check_tile(source, image, shape[1:], valid_pixels(image, nodata))
        tiles[i] = image
        if not np.array_equal(tiles[i], image, equal_nan=True):
            raise TileError(source, f"values do not fit the pack's {dtype} (the dataset's dtype)")
        nodata_values.append(_json_nodata(nodata))
        if progress is not None:
            progress(i + 1, len(sources))
    tiles.flush()
    return nodata_values


def _check_tile(source: str, image: np.ndarray, shape: tuple[int, ...], valid: np.ndarray | None) -> None:
    if image.shape != shape:
        raise TileError(source, f"has shape {list(image.shape)}, the dataset's tiles are {list(shape)} (bands, rows, cols)")
    finite = np.isfinite(image) if valid is None else np.isfinite(image) | ~valid
    if not finite.all():
        raise TileError(source, "contains NaN or infinite pixel values")


def _read_index(path: Path) -> dict:
    try:
        record = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path / INDEX}: unreadable pack index ({err})") from None
    if record.get("version") != PACK_VERSION:
        raise DatasetError(f"{path}: pack version {record.get('version')}, expected {PACK_VERSION}; rerun deforest-pack")
    return record


class PackedLayout(TileLayout):
    """Serves a pack in place of ``source`` (the layout it was packed from).

    :meth:`build_index` refuses a stale pack: when the source files or the layout settings
    differ from those packed, training on it would silently use old data.
    """

    def __init__(self, path: str | os.PathLike, source: TileLayout) -> None:
        self.path = Path(path).expanduser()
        if not (self.path / INDEX).is_file() or not (self.path / TILES).is_file():
            raise DatasetError(f"data.packed={self.path}: no pack there (run deforest-pack first)")
        self.source = source
        self.root = source.root
        self.band_names = source.band_names
        self.record = _read_index(self.path)
        self._tiles: np.ndarray | None = None
        if list(self.tiles.shape) != self.record["shape"]:
            raise DatasetError(f"{self.path / TILES}: shape {list(self.tiles.shape)} does not match its index")
        self.rows = {source: row for row, source in enumerate(self.record["sources"])}

    @property
    def tiles(self) -> np.ndarray:
        """The memory-mapped ``[N, C, H, W]`` array, opened once per process."""
        if self._tiles is None:
            try:  # allow_pickle stays False: an object array is refused, never unpickled
                tiles = np.load(self.path / TILES, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DatasetError(f"{self.path / TILES}: not a pack array ({str(err).splitlines()[0][:200]})") from None
            if tiles.dtype.kind not in "uif" or tiles.ndim != 4:
                raise DatasetError(f"{self.path / TILES}: not a pack array (dtype {tiles.dtype}, {tiles.ndim} dimensions)")
            self._tiles = tiles
        return self._tiles

    def __getstate__(self) -> dict:
        # spawned DataLoader workers map the file themselves instead of unpickling a copy
        return {**self.__dict__, "_tiles": None}

    def build_index(self) -> TileIndex:
        current = self.source.build_index()
        if fingerprint(self.source, current) != self.record["fingerprint"]:
            changed = _first_difference([os.path.abspath(s) for s in current.sources], self.record["sources"])
            raise DatasetError(
                f"data.packed={self.path} is stale: the files under {self.root} or the layout settings "
                f"changed since packing ({changed}); rerun deforest-pack"
            )
        return current

    def read(self, source: str, bands: Sequence[int] | None) -> np.ndarray:
        tile = self.tiles[self.rows[os.path.abspath(source)]]
        if bands is not None and list(bands) != list(range(1, tile.shape[0] + 1)):
            tile = tile[np.asarray(bands) - 1]
        return tile.astype(np.float32)

    def read_with_nodata(self, source: str, bands: Sequence[int] | None) -> tuple[np.ndarray, list[float | None]]:
        """The packed tile and the nodata values its source file declared when it was packed."""
        row = self.rows[os.path.abspath(source)]
        values = [None if v is None else float(v) for v in self.record["nodata"][row]]
        chosen = list(bands) if bands is not None else list(range(1, len(values) + 1))
        return self.read(source, bands), [values[b - 1] for b in chosen]

    def header_source(self, source: str) -> str:
        return self.source.header_source(source)

    def band_count(self, header_count: int) -> int:
        return self.source.band_count(header_count)


def _first_difference(now: list[str], packed: list[str]) -> str:
    added, removed = sorted(set(now) - set(packed)), sorted(set(packed) - set(now))
    if added:
        return f"{len(added)} new, e.g. {added[0]}"
    if removed:
        return f"{len(removed)} gone, e.g. {removed[0]}"
    return "a file was modified or a layout setting changed"
