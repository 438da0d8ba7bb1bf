"""Packed tile store: a dataset converted once into one memory-mappable array.

Opening one GeoTIFF per tile costs far more than the pixels it holds; a pack keeps every
tile of a dataset in a single ``tiles.npy`` (``[N, C, H, W]``, the sources' integer dtype
where that is lossless, else float32) beside ``index.json`` (task, classes, sources,
targets, given splits, band names and a fingerprint of the source files).
:class:`PackedLayout` serves it through the :class:`~deforest.datasets.TileLayout`
interface, so the datamodule splits, augments and normalises exactly as with the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deforest.datasets import DatasetError, TileIndex, TileLayout
from deforest.io import TileError, file_fingerprint, read_header

log = logging.getLogger(__name__)

PACK_VERSION = 1
TILES, INDEX = "tiles.npy", "index.json"
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
    existing = _read_index(out) if (out / INDEX).is_file() and (out / TILES).is_file() else None
    if existing is not None and existing.get("fingerprint") == key:
        shape = tuple(existing["shape"])
        return PackResult(out, shape[0], shape, existing["dtype"], written=False)

    first = read_header(layout.header_source(index.sources[0]))
    sample = layout.read(index.sources[0], None)
    dtype = first.dtype if first.dtype in NATIVE_DTYPES else "float32"
    shape = (len(index), *sample.shape)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / (TILES + ".partial")
    try:
        _write_tiles(layout, index.sources, partial, dtype, shape, sample, progress)
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
    }
    tmp = out / (INDEX + ".partial")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, out / INDEX)
    return PackResult(out, len(index), shape, dtype, written=True)


def _write_tiles(
    layout: TileLayout,
    sources: list[str],
    path: Path,
    dtype: str,
    shape: tuple[int, ...],
    first: np.ndarray,
    progress: Callable[[int, int], None] | None,
) -> None:
    tiles = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    for i, source in enumerate(sources):
        image = first if i == 0 else layout.read(source, None)
        _check_tile(source, image, shape[1:])
        tiles[i] = image
        if not np.array_equal(tiles[i], image):
            raise TileError(source, f"values do not fit the pack's {dtype} (the first tile's dtype)")
        if progress is not None:
            progress(i + 1, len(sources))
    tiles.flush()


def _check_tile(source: str, image: np.ndarray, shape: tuple[int, ...]) -> None:
    if image.shape != shape:
        raise TileError(source, f"has shape {list(image.shape)}, the dataset's tiles are {list(shape)} (bands, rows, cols)")
    if not np.isfinite(image).all():
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
            self._tiles = np.load(self.path / TILES, mmap_mode="r")
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
