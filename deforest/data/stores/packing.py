"""Packing: a dataset converted once into a pack (the format: :mod:`deforest.data.stores.format`).

Packing is split into shards of ``shard_tiles`` rows written by ``num_workers`` processes
straight into the memory-mapped files (memory stays bounded by the shard size); each
finished shard leaves a marker, so a killed ``deforest-pack`` resumes where it stopped and
ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deforest.core.errors import DatasetError, TileError
from deforest.core.nodata import valid_pixels
from deforest.data.checks import band_order, check_header, dataset_band_names, reference_header
from deforest.data.index import TileIndex
from deforest.data.io import RasterHeader, read_header
from deforest.data.layouts import TileLayout
from deforest.data.stores.base import REFERENCE_SAMPLE
from deforest.data.stores.format import (
    INDEX,
    LOCK,
    NATIVE_DTYPES,
    PACK_VERSION,
    PROGRESS,
    STATS,
    TARGETS,
    TILES,
    fingerprint,
    is_pack,
    layout_settings,
    layout_source_files,
    range_marker,
    read_record,
    source_stamps,
    tile_sums,
)
from deforest.data.stores.pack import PackedLayout

log = logging.getLogger(__name__)


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
    todo = [s for s in shards if not (work / range_marker(*s)).is_file()]
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
        marker = out / PROGRESS / range_marker(*shard)
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


def _first_difference(now: list[str], packed: list[str]) -> str:
    added, removed = sorted(set(now) - set(packed)), sorted(set(packed) - set(now))
    if added:
        return f"{len(added)} new, e.g. {added[0]}"
    if removed:
        return f"{len(removed)} gone, e.g. {removed[0]}"
    return "a file was modified or a layout setting changed"
