"""Packed tile store: a dataset converted once into one memory-mappable array that stands alone.

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

Packing is split into shards of ``shard_tiles`` rows written by ``num_workers`` processes
straight into the memory-mapped files (memory stays bounded by the shard size); each
finished shard leaves a marker, so a killed ``deforest-pack`` resumes where it stopped and
ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deforest.batch_buffers import TORCH_DTYPES, BatchBuffers, batch_tensor
from deforest.datasets import DatasetError, TileIndex, TileLayout
from deforest.io import RasterHeader, TileError, file_fingerprint, read_header
from deforest.validation import is_nodata

log = logging.getLogger(__name__)

#: 3: tiles are stored in the dataset's band order by name (a version-2 pack of tiles whose
#: descriptions declare another order holds them positionally), and pairs record their files
PACK_VERSION = 3
TILES, INDEX, TARGETS, STATS, LOCK = "tiles.npy", "index.json", "targets.npy", "stats.npy", ".pack.lock"
#: where an unfinished pack keeps its plan and one marker per finished shard
PROGRESS = ".progress"
#: headers read to decide the dataset's dtype and pixel size, as the datamodule does
REFERENCE_SAMPLE = 32
#: source dtypes stored as they are; float32 holds these exactly, so reading back is lossless
NATIVE_DTYPES = frozenset({"uint8", "int8", "uint16", "int16"})
#: rows of ``stats.npy``
N_VALID, SUM, SUM_SQ, LOG_SUM, LOG_SUM_SQ = range(5)
#: a pack whose sources hold at most this many files is checked against them at each start when
#: they exist (about 1 s of stats; BigEarthNet has 12 files per patch)
AUTO_CHECK_FILES = 50_000


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


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack_dataset` did: ``written`` is False when the pack was up to date;
    ``resumed`` counts the shards an interrupted run had already finished."""

    path: Path
    tiles: int
    shape: tuple[int, ...]
    dtype: str
    written: bool
    resumed: int = 0


def pack_dataset(
    layout: TileLayout,
    out: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
    num_workers: int = 1,
    shard_tiles: int = 1024,
) -> PackResult:
    """Convert every sample of ``layout`` into a pack at ``out`` (a directory).

    An existing pack with the same fingerprint is kept. Otherwise shards of ``shard_tiles``
    rows are written by ``num_workers`` processes (``0``/``1``: this process); a previous
    run of the same plan that was killed is resumed. ``progress(done, total)`` counts tiles.
    """
    out = Path(out).expanduser()
    index = layout.build_index()
    if len(index) == 0:
        raise DatasetError(f"{layout.root}: no tiles found")
    key = fingerprint(layout, index)
    out.mkdir(parents=True, exist_ok=True)
    with _pack_lock(out):  # a second packer of the same folder waits, then finds the pack up to date
        return _pack_locked(layout, index, key, out, progress, num_workers, shard_tiles)


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
        except OSError:  # no flock on this file system
            pass
        yield
    finally:
        os.close(fd)


def _pack_locked(
    layout: TileLayout,
    index: TileIndex,
    key: str,
    out: Path,
    progress: Callable[[int, int], None] | None,
    num_workers: int,
    shard_tiles: int,
) -> PackResult:
    if is_pack(out):
        existing = read_record(out)
        if existing.get("fingerprint") == key:
            shape = tuple(existing["shape"])
            return PackResult(out, shape[0], shape, existing["dtype"], written=False)

    from deforest.validation import reference_header  # validation reads packs too

    # the dataset's dtype and pixel size, decided as the datamodule decides them
    header = reference_header([read_header(layout.header_source(s)) for s in index.sources[:REFERENCE_SAMPLE]])
    sample = layout.read(index.sources[0], None)
    dtype = header.dtype if header.dtype in NATIVE_DTYPES else "float32"
    shape = (len(index), *sample.shape)
    shards = [(start, min(start + shard_tiles, len(index))) for start in range(0, len(index), shard_tiles)]
    files_of = layout_source_files(layout, index.sources)
    plan = {"fingerprint": key, "dtype": dtype, "shape": list(shape), "shards": shards, "nodata": header.nodata}
    work = out / PROGRESS
    done = _resume_or_start(out, work, plan)
    todo = [s for s in shards if not (work / _marker(s)).is_file()]
    from deforest.validation import dataset_band_names

    # tiles that name their bands are stored in the dataset's order, as the datamodule reads them
    whole = layout.band_count(header.count) == header.count  # not BigEarthNet's one file per band
    names = dataset_band_names(header, layout.band_names, header.count) if whole else None
    job = _ShardJob(layout, str(out), index.sources, dtype, shape, header.nodata, header, names)
    try:
        _run_shards(job, todo, num_workers, len(index), len(index) - sum(b - a for a, b in todo), progress)
    except TileError:
        shutil.rmtree(work, ignore_errors=True)  # the data must change: nothing to resume
        for name in (TILES, STATS):
            (out / (name + ".partial")).unlink(missing_ok=True)
        raise
    record = {
        "version": PACK_VERSION,
        "fingerprint": key,
        "layout": layout_settings(layout),
        "root": str(Path(layout.root).resolve()),
        "band_names": layout.band_names,
        "band_count": layout.band_count(header.count),
        # the size as stored (BigEarthNet: resampled to the layout's grid), the rest as read
        "header": {"count": header.count, "height": shape[2], "width": shape[3], "dtype": header.dtype,
                   "nodata": header.nodata, "descriptions": list(header.descriptions)},
        "nodata": header.nodata,
        "dtype": dtype,
        "shape": list(shape),
        "task": index.task,
        "class_names": index.class_names,
        "sources": [os.path.abspath(s) for s in index.sources],
        "source_files": files_of,
        "stamps": source_stamps(index.sources, files_of),
        "splits": index.splits,
        "meta": index.meta,
    }
    (out / INDEX).unlink(missing_ok=True)  # a pack without its index is never read
    np.save(out / TARGETS, index.targets)
    for name in (TILES, STATS):
        os.replace(out / (name + ".partial"), out / name)
    tmp = out / (INDEX + ".partial")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, out / INDEX)
    shutil.rmtree(work)
    return PackResult(out, len(index), shape, dtype, written=True, resumed=done)


def _marker(shard: Sequence[int]) -> str:
    return f"{shard[0]:010d}-{shard[1]:010d}.done"


def _resume_or_start(out: Path, work: Path, plan: dict) -> int:
    """Keep an interrupted run of the same plan (returns its finished shards), else start afresh."""
    plan_file = work / "plan.json"
    partials = [out / (TILES + ".partial"), out / (STATS + ".partial")]
    if plan_file.is_file() and all(p.is_file() for p in partials):
        try:
            if json.loads(plan_file.read_text()) == json.loads(json.dumps(plan)):
                finished = len(list(work.glob("*.done")))
                log.info("resuming %s: %d of %d shards already packed", out, finished, len(plan["shards"]))
                return finished
        except (OSError, json.JSONDecodeError):
            pass
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    np.lib.format.open_memmap(partials[0], mode="w+", dtype=plan["dtype"], shape=tuple(plan["shape"]))
    stats_shape = (plan["shape"][0], 5, plan["shape"][1])
    np.lib.format.open_memmap(partials[1], mode="w+", dtype="float64", shape=stats_shape)
    (work / "plan.json").write_text(json.dumps(plan))
    return 0


@dataclass(frozen=True)
class _ShardJob:
    """What a packing process needs to write any shard (pickled once per process)."""

    layout: TileLayout
    out: str
    sources: list[str]
    dtype: str
    shape: tuple[int, ...]
    nodata: float | None
    #: the dataset's header: each tile is checked against it as the datamodule does
    reference: RasterHeader
    #: the dataset's band names, in its order (``None``: tiles are stored by band position)
    band_names: list[str] | None = None

    def __call__(self, shard: tuple[int, int]) -> tuple[int, tuple[str, str] | None]:
        """Write rows ``shard[0]:shard[1]``; returns the row count and a bad tile's (path, problem)."""
        out = Path(self.out)
        tiles = np.load(out / (TILES + ".partial"), mmap_mode="r+")
        stats = np.load(out / (STATS + ".partial"), mmap_mode="r+")
        start, stop = shard
        for row in range(start, stop):
            source = self.sources[row]
            try:
                from deforest.validation import band_order, check_header, valid_pixels  # validation reads packs too

                header_file = self.layout.header_source(source)
                header = read_header(header_file)
                check_header(header_file, header, self.reference)
                image, nodata = self.layout.read_with_nodata(source, band_order(header_file, header, self.band_names))
                _same_nodata(source, nodata, self.nodata)
                _check_tile(source, image, self.shape[1:], valid_pixels(image, nodata))
            except TileError as err:  # TileError does not pickle: send its parts
                return 0, (err.path, err.problem)
            tiles[row] = image
            # NaN nodata pixels are stored as NaN: equal, though NaN != NaN
            if not np.array_equal(tiles[row], image, equal_nan=image.dtype.kind == "f"):
                return 0, (source, f"values do not fit the pack's {self.dtype} (the first tile's dtype)")
            stats[row] = tile_sums(image, self.nodata)
        tiles.flush()
        stats.flush()
        del tiles, stats
        marker = out / PROGRESS / _marker(shard)
        marker.with_suffix(".tmp").write_text("")
        os.replace(marker.with_suffix(".tmp"), marker)
        return stop - start, None


def _run_shards(
    job: _ShardJob,
    todo: list[tuple[int, int]],
    num_workers: int,
    total: int,
    done: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    def finished(rows: int, bad: tuple[str, str] | None) -> None:
        nonlocal done
        if bad is not None:
            raise TileError(*bad)
        done += rows
        if progress is not None:
            progress(done, total)

    if num_workers <= 1:
        for shard in todo:
            finished(*job(shard))
        return
    # spawn: GDAL and the caller's threads do not survive a fork reliably
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(job, shard) for shard in todo]
        try:
            for future in futures:
                finished(*future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures, return_when=FIRST_EXCEPTION)
            raise


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


def _same_nodata(source: str, declared: Sequence[float | None], dataset: float | None) -> None:
    """A pack stores one nodata value for all its tiles: a tile that declares another is refused."""
    def same(value: float | None) -> bool:
        if value is None or dataset is None:
            return value is None and dataset is None
        return value == dataset or (math.isnan(value) and math.isnan(dataset))

    if not all(same(v) for v in declared):
        raise TileError(source, f"declares nodata {list(declared)}, the dataset's first tile {dataset}: a pack holds "
                                "one nodata value; pack tiles with another nodata separately")


def _check_tile(source: str, image: np.ndarray, shape: tuple[int, ...], valid: np.ndarray | None) -> None:
    if image.shape != shape:
        raise TileError(source, f"has shape {list(image.shape)}, the dataset's tiles are {list(shape)} (bands, rows, cols)")
    finite = np.isfinite(image) if valid is None else np.isfinite(image) | ~valid
    if not finite.all():
        raise TileError(source, "contains NaN or infinite pixel values")


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


def check_pack(layout: TileLayout, path: str | os.PathLike) -> None:
    """Raise :class:`DatasetError` when the pack at ``path`` no longer matches ``layout``'s
    sources (new, removed or modified files, other labels or settings): ``check=true``."""
    path = Path(path).expanduser()
    packed = PackedLayout(path, check=False)
    current = layout.build_index()
    if fingerprint(layout, current) != packed.record["fingerprint"]:
        changed = _first_difference([os.path.abspath(s) for s in current.sources], packed.record["sources"])
        raise DatasetError(
            f"data.packed={path} is stale: the files under {layout.root} or the layout settings "
            f"changed since packing ({changed}); rerun deforest-pack"
        )


def open_pack(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              cache_chunks: bool = True) -> PackedLayout:
    """The pack at a local folder, or at an object-store URL (``s3://...``, the ``stream`` extra;
    ``cache_chunks``: see :class:`deforest.stream.ChunkCache`)."""
    if "://" in str(path):
        from deforest.stream import RemotePack  # zarr and s3fs only when used

        return RemotePack(str(path), cache_dir, cache_chunks)
    return PackedLayout(path)


def gather_planes(out: torch.Tensor, tiles: np.ndarray, rows: np.ndarray, channels: np.ndarray) -> None:
    """``tiles[rows][:, channels]`` into the contiguous ``out`` by one ``torch.index_select`` over
    ``tiles`` seen as ``[N * C, H, W]`` band planes: at the speed of copying the bytes, where a
    Python loop of row copies ran at half of it (docs/packing.md)."""
    with warnings.catch_warnings():  # a read-only memory map: torch only reads it here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        planes = torch.from_numpy(tiles).flatten(0, 1)
    index = torch.from_numpy((rows[:, None] * tiles.shape[1] + channels[None, :]).ravel())
    torch.index_select(planes, 0, index, out=out.view(-1, *tiles.shape[2:]))


class PackedLayout(TileLayout):
    """Serves a pack through the :class:`~deforest.datasets.TileLayout` interface, from the
    pack alone: index, labels, header and band statistics come from its files.

    ``check``: ``True`` stats the recorded sources when they exist and hold at most
    :data:`AUTO_CHECK_FILES` files, and refuses a pack whose sources changed since packing
    (a full check, new files included, is ``deforest-pack ... check=true``).
    """

    def __init__(self, path: str | os.PathLike, check: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not self._present():
            raise DatasetError(f"data.packed={self.path}: no pack there (run deforest-pack first)")
        self.record = read_record(self.path)
        self.root = Path(self.record["root"])
        self.band_names = self.record["band_names"]
        self._tiles: np.ndarray | None = None
        if list(self.tiles.shape) != self.record["shape"]:
            raise DatasetError(f"{self.path / TILES}: shape {list(self.tiles.shape)} does not match its index")
        self.rows = {source: row for row, source in enumerate(self.record["sources"])}
        if check:
            self._check_stamps()

    def _present(self) -> bool:
        return is_pack(self.path)

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
            self._tiles = tiles.view(np.ndarray)  # np.memmap's Python-level indexing costs µs per tile
        return self._tiles

    @property
    def header(self) -> RasterHeader:
        """The packed sources' header (band count, size, dtype, nodata)."""
        h = self.record["header"]
        return RasterHeader(h["count"], h["height"], h["width"], h["dtype"], h["nodata"], tuple(h["descriptions"]))

    def __getstate__(self) -> dict:
        # spawned DataLoader workers map the file themselves instead of unpickling a copy
        return {**self.__dict__, "_tiles": None}

    def _check_stamps(self) -> None:
        sources, files_of = self.record["sources"], self.record.get("source_files")
        files = sum(stamp[0] for stamp in self.record["stamps"])
        if not self.root.is_dir() or files > AUTO_CHECK_FILES:
            log.info("%s: sources not checked (%s); deforest-pack ... check=true checks them", self.path,
                     "not present" if not self.root.is_dir() else f"{files} files")
            return
        for k, (source, stamp) in enumerate(zip(sources, self.record["stamps"])):
            try:
                now = source_stamps([source], None if files_of is None else [files_of[k]])[0]
            except (FileNotFoundError, ValueError):
                now = None
            if now != stamp:
                what = "gone" if now is None else "modified"
                raise DatasetError(
                    f"data.packed={self.path} is stale: {source} is {what} since packing; rerun deforest-pack"
                )

    def build_index(self) -> TileIndex:
        r = self.record
        targets = np.load(self.path / TARGETS)
        return TileIndex(r["task"], r["class_names"], list(r["sources"]), targets, list(r["splits"]), dict(r["meta"]))

    def rows_of(self, sources: Sequence[str]) -> np.ndarray:
        """Pack rows of ``sources`` (as the index lists them)."""
        return np.asarray([self.rows[s] for s in sources], dtype=np.int64)

    def band_sums(self, sources: Sequence[str], bands: Sequence[int], log_scale: bool) -> np.ndarray:
        """``[len(sources), 3, len(bands)]``: valid count, sum and sum of squares per tile and band."""
        stats = np.load(self.path / STATS, mmap_mode="r")
        columns = [N_VALID, LOG_SUM, LOG_SUM_SQ] if log_scale else [N_VALID, SUM, SUM_SQ]
        rows = stats[self.rows_of(sources)]
        return rows[:, columns][:, :, np.asarray(bands) - 1]

    def gather(self, sources: Sequence[str], indices: Sequence[int], bands: Sequence[int], targets: np.ndarray,
               buffers: BatchBuffers | None = None) -> dict:
        """The batch of ``sources[indices]`` in the stored dtype, copied from the memory map into a
        recycled buffer of ``buffers`` (see :func:`batch_tensor`) in one call, band selection
        included (:func:`gather_planes`)."""
        rows = self.rows_of([sources[i] for i in indices])
        tiles = self.tiles
        channels = np.asarray(bands) - 1
        shape, dtype = (len(rows), len(channels), *tiles.shape[2:]), TORCH_DTYPES[tiles.dtype.name]
        image = batch_tensor(shape, dtype, buffers)
        gather_planes(image, tiles, rows, channels)
        indices = torch.as_tensor(list(indices), dtype=torch.long)
        # ``nodata``: the pixels are as stored, not yet filled (deforest.batch_transforms)
        return {"image": image, "target": torch.from_numpy(targets[indices.numpy()]), "index": indices, "bad": [],
                "nodata": self.record["nodata"]}

    def row(self, row: int) -> np.ndarray:
        """One stored ``[C, H, W]`` tile, in the stored dtype."""
        return self.tiles[row]

    def read(self, source: str, bands: Sequence[int] | None) -> np.ndarray:
        tile = self.row(self.rows[source])
        if bands is not None and list(bands) != list(range(1, tile.shape[0] + 1)):
            tile = tile[np.asarray(bands) - 1]
        return tile.astype(np.float32)

    def read_with_nodata(
        self, source: str, bands: Sequence[int] | None, native: bool = False
    ) -> tuple[np.ndarray, list[float | None]]:
        """The packed tile, float32 (batches leave a pack in its stored dtype through
        :meth:`gather`), and its nodata: one value for the whole pack (packing refuses a tile
        that declares another)."""
        tile = self.read(source, bands)
        return tile, [self.record["nodata"]] * tile.shape[0]

    def header_source(self, source: str) -> str:
        return source

    def band_count(self, header_count: int) -> int:
        return int(self.record["band_count"])


def _first_difference(now: list[str], packed: list[str]) -> str:
    added, removed = sorted(set(now) - set(packed)), sorted(set(packed) - set(now))
    if added:
        return f"{len(added)} new, e.g. {added[0]}"
    if removed:
        return f"{len(removed)} gone, e.g. {removed[0]}"
    return "a file was modified or a layout setting changed"
