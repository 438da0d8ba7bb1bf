"""The pack format: its file names, record, version, markers and the helpers that read it.

A pack is a dataset converted once into one memory-mappable array that stands alone.
Opening one GeoTIFF per tile costs far more than the pixels it holds; a pack keeps every
tile of a dataset in a single ``tiles.npy`` (``[N, C, H, W]``, the sources' integer dtype
where that is lossless, else float32) beside everything training needs, so the sources
can be deleted, or the pack copied to a cluster:

- ``index.json``: a plain JSON document: task, class names, band names, nodata, the
  header, splits, per-tile extra columns (bounds/CRS from ``deforest-tile``), the source
  path of each row (a name for reports), the layout settings and a fingerprint;
- ``targets.npy``: the labels, ``[N]`` int64 or ``[N, classes]`` uint8;
- ``stats.npy``: per tile and band, float64 ``[N, 5, C]``: valid-pixel count, sum and
  sum of squares of the raw values, and of ``log1p`` of them, so band statistics of any
  training split are sums over rows, not a pass over the pixels.

In object storage the pixels are ``tiles.zarr`` instead, with ``order.npy`` saying where each
pack row is stored (:mod:`deforest.data.stores.remote`). The writer is
:mod:`deforest.data.stores.packing`, the readers :mod:`deforest.data.stores.pack` and
:mod:`deforest.data.stores.remote`; all of them take the format from here alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deforest.core.errors import DatasetError
from deforest.core.nodata import is_nodata
from deforest.data.index import TileIndex
from deforest.data.io import file_fingerprint
from deforest.data.layouts import TileLayout

#: 3: tiles are stored in the dataset's band order by name (a version-2 pack of tiles whose
#: descriptions declare another order holds them positionally), and pairs record their files
PACK_VERSION = 3
TILES, INDEX, TARGETS, STATS, LOCK = "tiles.npy", "index.json", "targets.npy", "stats.npy", ".pack.lock"
#: where an unfinished pack keeps its plan and one marker per finished shard
PROGRESS = ".progress"
#: a pack in object storage: the ``[N, C, H, W]`` Zarr array of its pixels
ZARR = "tiles.zarr"
#: int64 ``[N]``: the row of ``tiles.zarr`` that holds each pack row (absent: stored in index order)
ORDER = "order.npy"
#: source dtypes stored as they are; float32 holds these exactly, so reading back is lossless
NATIVE_DTYPES = frozenset({"uint8", "int8", "uint16", "int16"})
#: rows of ``stats.npy``
N_VALID, SUM, SUM_SQ, LOG_SUM, LOG_SUM_SQ = range(5)


def range_marker(start: int, stop: int) -> str:
    """The name of the file that marks rows ``start:stop`` as written: a packed shard, or a
    remote pack's chunk in the local chunk cache."""
    return f"{start:010d}-{stop:010d}.done"


def source_files(source: str) -> list[str]:
    """The files one sample is read from: the tile, or every file of a patch folder
    (:meth:`TileLayout.source_files`); a pack of a layout that reads a sample from other
    files (a pair's two dates) records them (``source_files`` of its index)."""
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file())
    return [source]


def layout_source_files(layout: TileLayout, sources: Sequence[str]) -> list[list[str]] | None:
    """Per source, the absolute paths of the files it is read from, when ``layout`` reads a
    sample from other files than :func:`source_files` finds from the source alone (``None``
    otherwise: the index stays small for a folder of BigEarthNet patches)."""
    if type(layout).source_files is TileLayout.source_files:
        return None
    return [[os.path.abspath(f) for f in layout.source_files(s)] for s in sources]


def layout_settings(layout: TileLayout) -> dict:
    """The layout's class and options (root, manifest, nomenclature, size, ...)."""
    settings = {k: _absolute(v) for k, v in vars(layout).items() if not k.startswith("_")}
    return {"class": f"{type(layout).__module__}.{type(layout).__qualname__}", **settings}


def source_stamps(sources: Sequence[str], files_of: Sequence[Sequence[str]] | None = None) -> list[list[int]]:
    """Per source: file count, total size and newest mtime (ns) of its files (``files_of``,
    one list per source, or :func:`source_files`)."""
    stamps = []
    for k, source in enumerate(sources):
        files = file_fingerprint(files_of[k] if files_of is not None else source_files(source))
        gone = next((f[0] for f in files if f[1] is None), None)
        if gone is not None:  # one date of a pair, say: the sample cannot be read as packed
            raise FileNotFoundError(gone)
        stamps.append([len(files), sum(f[1] for f in files), max(f[2] for f in files)])
    return stamps


def fingerprint(layout: TileLayout, index: TileIndex) -> str:
    """Hash of the layout settings, the labels and splits, and every source file's name, size
    and mtime: a change to any of them changes what training would see."""
    files = [os.path.abspath(f) for source in index.sources for f in layout.source_files(source)]
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


def tile_sums(image: np.ndarray, nodata: float | None) -> np.ndarray:
    """One tile's ``[5, C]`` row of ``stats.npy`` (float64, nodata pixels left out)."""
    raw = image.astype(np.float64)
    logs = np.log1p(np.clip(raw, 0, None))
    if nodata is None:
        n = np.full(raw.shape[0], raw.shape[1] * raw.shape[2], np.float64)
    else:
        valid = ~is_nodata(image, nodata)  # the rule files and packed batches are filled by
        n = valid.sum(axis=(1, 2)).astype(np.float64)
        raw, logs = np.where(valid, raw, 0.0), np.where(valid, logs, 0.0)
    return np.stack([n, raw.sum(axis=(1, 2)), (raw**2).sum(axis=(1, 2)), logs.sum(axis=(1, 2)), (logs**2).sum(axis=(1, 2))])


def is_pack(path: Path) -> bool:
    """A complete pack is there (its index is written last)."""
    return all((path / name).is_file() for name in (INDEX, TILES, TARGETS, STATS))


def read_record(path: Path) -> dict:
    """``index.json`` of the pack at ``path``: one clear error if it is unreadable or too old."""
    try:
        record = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path / INDEX}: unreadable pack index ({err})") from None
    if not isinstance(record, dict) or record.get("version") != PACK_VERSION:
        version = record.get("version") if isinstance(record, dict) else None
        raise DatasetError(f"{path}: pack version {version}, expected {PACK_VERSION}; rerun deforest-pack")
    return record


def gather_planes(out: torch.Tensor, tiles: np.ndarray, rows: np.ndarray, channels: np.ndarray) -> None:
    """``tiles[rows][:, channels]`` into the contiguous ``out`` by one ``torch.index_select`` over
    ``tiles`` seen as ``[N * C, H, W]`` band planes: at the speed of copying the bytes, where a
    Python loop of row copies ran at half of it (docs/packing.md)."""
    with warnings.catch_warnings():  # a read-only memory map: torch only reads it here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        planes = torch.from_numpy(tiles).flatten(0, 1)
    index = torch.from_numpy((rows[:, None] * tiles.shape[1] + channels[None, :]).ravel())
    torch.index_select(planes, 0, index, out=out.view(-1, *tiles.shape[2:]))
