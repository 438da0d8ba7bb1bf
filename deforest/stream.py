"""Packs in object storage (``s3://bucket/prefix``): a Zarr v3 array read through fsspec/s3fs.

At the prefix lie the local pack's small files as they are (``index.json``, ``targets.npy``,
``stats.npy``), ``tiles.zarr``, the ``[N, C, H, W]`` array in chunks of ``chunk_tiles``
rows, uncompressed (Sentinel-2 uint16 reflectance gains little from a fast codec and each
chunk is then one GET of raw bytes), and ``order.npy``, where in ``tiles.zarr`` each pack
row is stored. The rows are stored in a seeded random order (within each given split), so
every chunk is a random sample of the dataset, not one class or one place as a pack's index
order is (LitData, WebDataset and MosaicML streaming shuffle at write time for the same
reason). Endpoint and credentials are the standard AWS ones
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, profiles), read by botocore under s3fs. Why Zarr: docs/packing.md.

Training reads whole chunks in each rank's main process: :class:`StreamedSplit` deals the
chunks of an epoch out to the DDP ranks (disjoint), keeps :data:`PREFETCH` chunk requests
in flight, shuffles the tiles of every :data:`SHUFFLE_CHUNKS` chunks together with those
still waiting from the previous ones and copies batches into recycled buffers, as a local
pack does. Every rank yields the same number of batches (training drops the remainder,
evaluation repeats tiles, which the metrics de-duplicate), so no rank waits for another at
the epoch's end. Chunks are kept in a :class:`ChunkCache` on local disk as they arrive (as
LitData keeps its chunks), so the epochs after the first read at local-pack speed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset
from zarr.storage import FsspecStore

from deforest.batch_buffers import TORCH_DTYPES, BatchBuffers
from deforest.datasets import SPLITS, DatasetError
from deforest.pack import INDEX, STATS, TARGETS, TILES, PackedLayout, gather_planes, read_record
from deforest.safety import remove_stale_temps, temp_prefix

log = logging.getLogger(__name__)

ZARR = "tiles.zarr"
#: int64 ``[N]``: the row of ``tiles.zarr`` that holds each pack row (absent: stored in index order)
ORDER = "order.npy"
#: chunk requests in flight per rank (s3fs runs them concurrently on its event loop)
PREFETCH = 4
#: training: chunks whose tiles are shuffled together before batches are cut (a shuffle buffer
#: over the chunks a prefetch brings in)
SHUFFLE_CHUNKS = PREFETCH
#: share of a training split's label variance lying between chunks above which its chunks are
#: reported as sorted (a shuffled pack gives about one over the split's tiles per chunk)
SORTED_SHARE = 0.5
#: packs whose sorted chunks this process has warned about (once each)
_reported: set[str] = set()
#: free disk the chunk cache leaves untouched beyond the pack's size
CACHE_MARGIN_BYTES = 1 << 30


def stored_order(splits: Sequence[str | None], seed: int = 0) -> np.ndarray:
    """The pack rows in the order ``tiles.zarr`` stores them: grouped by given split (so a
    split's chunks hold its own tiles), in a random order seeded by ``seed`` within each."""
    group = np.asarray([SPLITS.index(s) if s in SPLITS else len(SPLITS) for s in splits], np.int64)
    return np.lexsort((np.random.default_rng(seed).permutation(len(group)), group))


def upload_pack(local: str | os.PathLike, url: str, chunk_tiles: int = 256, seed: int = 0) -> None:
    """Copy the local pack at ``local`` to ``url``, its rows in :func:`stored_order`.

    ``index.json`` is removed first and goes last, so a reader never sees a half-copied pack
    nor a mix of two uploads.
    """
    local = Path(local)
    fs, root = fsspec.url_to_fs(url)
    if fs.exists(f"{root}/{INDEX}"):
        fs.rm_file(f"{root}/{INDEX}")
    tiles = np.load(local / TILES, mmap_mode="r")
    stored = stored_order(read_record(local)["splits"], seed)
    order = np.empty_like(stored)
    order[stored] = np.arange(len(stored))
    store = FsspecStore.from_url(f"{url.rstrip('/')}/{ZARR}", read_only=False)
    array = zarr.create_array(store=store, shape=tiles.shape, chunks=(chunk_tiles, *tiles.shape[1:]),
                              dtype=tiles.dtype, compressors=None, overwrite=True)
    for start in range(0, len(tiles), chunk_tiles):
        array[start : start + chunk_tiles] = tiles[stored[start : start + chunk_tiles]]
    buffer = io.BytesIO()
    np.save(buffer, order)
    fs.pipe_file(f"{root}/{ORDER}", buffer.getvalue())
    for name in (TARGETS, STATS, INDEX):
        fs.put_file(str(local / name), f"{root}/{name}")


def _fetch(fs: fsspec.AbstractFileSystem, remote: str, path: Path) -> None:
    """``remote`` into ``path`` through a unique temporary file beside it and ``os.replace``:
    the ranks of one machine fetch the same pack into the same folder at each start, and
    none may read a file another is halfway through writing."""
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        fs.get_file(remote, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ChunkCache:
    """A remote pack's pixels on local disk, filled chunk by chunk as they stream.

    ``tiles.npy`` has the pack's shape and dtype and starts sparse; a chunk's marker file is
    written after its bytes, so a chunk is read from here only once it is whole, by any
    later epoch, run or rank on this machine. Chunks are written with ``pwrite``, not
    through the memory map, so a full disk is a logged error that stops caching, not a
    SIGBUS.
    """

    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.folder = folder
        self.enabled = True
        path = folder / TILES
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{TILES}.{os.getpid()}.partial"
            np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)  # sparse
            try:
                os.link(partial, path)  # never replaces a cache another process is filling
            except FileExistsError:
                pass
            partial.unlink()
        self.path = path
        self.tiles = np.load(path, mmap_mode="r")
        self._row_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize

    @classmethod
    def beside(cls, base: Path, record: dict, order: np.ndarray | None = None) -> ChunkCache | None:
        """The cache of the pack ``record`` describes, stored in ``order`` (see :data:`ORDER`),
        in ``base`` (old packs' caches there are removed); None when the disk has no room for
        the whole pack."""
        shape, dtype = tuple(record["shape"]), np.dtype(record["dtype"])
        # the same pack uploaded in another row order is another cache
        stored = "" if order is None else hashlib.sha256(order.tobytes()).hexdigest()
        key = hashlib.sha256(f"{record['fingerprint']}{shape}{dtype}{stored}".encode()).hexdigest()[:16]
        folder = base / f"chunks-{key}"
        for old in base.glob("chunks-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        if not (folder / TILES).is_file():
            need = math.prod(shape) * dtype.itemsize + CACHE_MARGIN_BYTES
            free = shutil.disk_usage(base).free
            if free < need:
                log.warning("%s: no chunk cache (%.1f GB free, the pack needs %.1f GB); every epoch streams",
                            base, free / 1e9, need / 1e9)
                return None
        try:
            return cls(folder, shape, dtype)
        except OSError as err:  # a read-only or vanished cache folder
            log.warning("%s: no chunk cache (%s); every epoch streams", folder, err)
            return None

    def _marker(self, start: int, stop: int) -> Path:
        return self.folder / f"{start:010d}-{stop:010d}.done"

    def get(self, start: int, stop: int) -> np.ndarray | None:
        """Rows ``start:stop`` mapped from disk, or None when that chunk is not cached."""
        return self.tiles[start:stop] if self._marker(start, stop).is_file() else None

    def put(self, start: int, rows: np.ndarray) -> None:
        """Write a fetched chunk, then its marker; a failed write turns the cache off."""
        if not self.enabled:
            return
        view = memoryview(np.ascontiguousarray(rows)).cast("B")
        offset = self.tiles.offset + start * self._row_bytes
        try:
            with open(self.path, "r+b", buffering=0) as file:  # one open per chunk: no descriptor outlives a write
                while len(view):
                    written = os.pwrite(file.fileno(), view, offset)
                    view, offset = view[written:], offset + written
            self._marker(start, start + len(rows)).touch()
        except OSError as err:
            self.enabled = False
            log.warning("%s: chunk cache turned off (%s); the rest streams from the object store", self.folder, err)


class RemotePack(PackedLayout):
    """A pack at an fsspec URL: the small files are fetched into ``cache_dir`` at each start
    (a few MB for EuroSAT, tens for BigEarthNet), the pixels stream by chunk (kept in a
    :class:`ChunkCache` there unless ``cache_chunks`` is False).

    ``rows_of`` gives pack rows, as for a local pack (``stats.npy`` and ``targets.npy`` are in
    that order); :meth:`stored_rows` where ``tiles.zarr`` holds them.
    """

    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None, cache_chunks: bool = True) -> None:
        self.url = url.rstrip("/")
        base = Path(cache_dir or Path.home() / ".cache" / "deforest").expanduser()
        local = base / "packs" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        local.mkdir(parents=True, exist_ok=True)
        fs, root = fsspec.url_to_fs(self.url)
        try:
            for name in (INDEX, TARGETS, STATS):
                _fetch(fs, f"{root}/{name}", local / name)
        except FileNotFoundError:
            raise DatasetError(f"data.packed={self.url}: no pack there (deforest-pack out={self.url} first)") from None
        try:
            _fetch(fs, f"{root}/{ORDER}", local / ORDER)
            self.order: np.ndarray | None = np.load(local / ORDER, allow_pickle=False)
        except FileNotFoundError:  # uploaded in index order (before rows were stored shuffled)
            (local / ORDER).unlink(missing_ok=True)
            self.order = None
        except (ValueError, EOFError) as err:  # not an .npy array, an object array, a truncated file
            raise DatasetError(f"{self.url}/{ORDER}: unreadable ({str(err).splitlines()[0][:200]}); re-upload "
                               f"the pack (deforest-pack out={self.url})") from None
        super().__init__(local, check=False)
        n = self.record["shape"][0]
        if self.order is not None and (self.order.shape != (n,) or self.order.dtype.kind not in "iu"
                                       or not np.array_equal(np.sort(self.order), np.arange(n))):
            raise DatasetError(f"{self.url}/{ORDER}: not an order of the pack's {n} rows; re-upload the pack "
                               f"(deforest-pack out={self.url})")
        self.cache = ChunkCache.beside(local, self.record, self.order) if cache_chunks else None

    def _present(self) -> bool:
        return all((self.path / name).is_file() for name in (INDEX, TARGETS, STATS))

    @property
    def tiles(self) -> zarr.Array:
        """The remote Zarr array, opened once per process."""
        if self._tiles is None:
            self._tiles = zarr.open_array(FsspecStore.from_url(f"{self.url}/{ZARR}", read_only=True), mode="r")
        return self._tiles

    @property
    def chunk_tiles(self) -> int:
        return int(self.tiles.chunks[0])

    def chunk(self, c: int) -> np.ndarray:
        """All rows of chunk ``c`` in the stored dtype: from the cache, else one GET (then cached)."""
        start, stop = c * self.chunk_tiles, min((c + 1) * self.chunk_tiles, self.tiles.shape[0])
        cached = self.cache.get(start, stop) if self.cache is not None else None
        if cached is not None:
            return cached
        rows = self.tiles[start:stop]
        if self.cache is not None:
            self.cache.put(start, rows)
        return rows

    def stream(self, dataset, batch_size: int, train: bool, seed: int) -> StreamedSplit:
        """The batches of ``dataset`` (a split) for a DataLoader with ``batch_size=None``."""
        return StreamedSplit(dataset, batch_size, train, seed)

    def stored_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows of ``tiles.zarr`` that hold pack rows ``rows``."""
        return rows if self.order is None else self.order[rows]

    def row(self, row: int) -> np.ndarray:
        """Pack row ``row``, through its chunk (so a single read also fills the cache)."""
        stored = int(self.stored_rows(np.asarray([row]))[0])
        return self.chunk(stored // self.chunk_tiles)[stored % self.chunk_tiles]


class StreamedSplit(IterableDataset):
    """Batches of one split of a :class:`RemotePack`, chunk by chunk (see the module docs).

    ``train``: chunks shuffled each epoch (seeded by ``seed`` and the epoch count) and the
    tiles of every :data:`SHUFFLE_CHUNKS` of them shuffled together; each rank yields the
    fewest full batches any rank has, so in an epoch every tile of a rank's chunks is seen
    once except those beyond that count (one process: fewer than a batch), and no tile twice
    across ranks. Else in order, every rank padded with repeated tiles to the most tiles any
    rank has. A training split with a worker-side albumentations pipeline gets it per tile
    (float32 batches, nodata filled first).
    """

    def __init__(self, dataset, batch_size: int, train: bool, seed: int) -> None:
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed
        self.layout: RemotePack = dataset.layout
        #: per dataset index, the row of the stored array that holds it
        self.rows = self.layout.stored_rows(self.layout.rows_of(dataset.sources))
        self.chunk_tiles = self.layout.chunk_tiles
        chunk = self.rows // self.chunk_tiles
        #: per chunk id, the split's dataset indexes stored in it, in row order
        self.by_chunk = {int(c): np.flatnonzero(chunk == c) for c in np.unique(chunk)}
        self.channels = np.asarray(dataset.bands) - 1
        self.buffers = BatchBuffers()
        self.epoch = 0
        if train:
            self._report_sorted_chunks()

    def chunk_label_share(self) -> float:
        """The share of the split's label variance that lies between its chunks: about one
        over the tiles per chunk when every chunk is a random sample, 1 when each chunk holds
        one class (multi-label: summed over the labels)."""
        targets = np.asarray(self.dataset.targets)
        chunk = np.unique(self.rows // self.chunk_tiles, return_inverse=True)[1]
        counts = np.bincount(chunk).astype(np.float64)
        if targets.ndim == 1:  # multi-class: label counts per chunk without a one-hot copy
            classes = int(targets.max()) + 1 if len(targets) else 1
            sums = np.bincount(chunk * classes + targets, minlength=len(counts) * classes)
            sums = sums.reshape(len(counts), classes).astype(np.float64)
        else:
            sums = np.zeros((len(counts), targets.shape[1]))
            for k in range(targets.shape[1]):
                sums[:, k] = np.bincount(chunk, weights=targets[:, k], minlength=len(counts))
        p = sums.sum(axis=0) / max(len(targets), 1)
        total = float((p * (1 - p)).sum())
        between = float((counts[:, None] * (sums / counts[:, None] - p) ** 2).sum()) / max(len(targets), 1)
        return between / total if total > 0 else 0.0

    def _report_sorted_chunks(self) -> None:
        """Warn once per pack when the training split's chunks are sorted by label: its batches
        then hold few classes (or one place), which nothing else shows."""
        if self.layout.url in _reported or len(self.by_chunk) < 2:
            return
        share = self.chunk_label_share()
        if share <= SORTED_SHARE:
            return
        _reported.add(self.layout.url)
        fix = (f"re-upload it (deforest-pack out={self.layout.url}), which stores its rows shuffled"
               if self.layout.order is None else "upload it with a larger chunk_tiles")
        log.warning("%s: the training tiles are sorted by label in the pack's chunks (%.0f%% of the label variance "
                    "lies between chunks); batches will hold few classes: %s", self.layout.url, 100 * share, fix)

    def _share(self, rank: int, world: int, epoch: int) -> list[int]:
        chunks = sorted(self.by_chunk)
        if self.train:
            chunks = np.random.default_rng([self.seed, epoch]).permutation(chunks).tolist()
        return chunks[rank::world]

    def _target(self, world: int, epoch: int) -> int:
        """Training: batches of every rank; evaluation: tiles of every rank."""
        tiles = [sum(len(self.by_chunk[c]) for c in self._share(r, world, epoch)) for r in range(world)]
        return min(tiles) // self.batch_size if self.train else max(tiles)

    def __len__(self) -> int:
        target = self._target(_rank_world()[1], self.epoch)
        return target if self.train else -(-target // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        rank, world = _rank_world()
        epoch, self.epoch = self.epoch, self.epoch + 1
        yield from self.batches(rank, world, epoch)

    def batches(self, rank: int, world: int, epoch: int) -> Iterator[dict]:
        """The batches rank ``rank`` of ``world`` yields in epoch ``epoch``."""
        chunks = self._share(rank, world, epoch)
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, rank])
            yield from self._cut([(c, self.by_chunk[c]) for c in chunks], rng, self._target(world, epoch))
        else:
            yield from self._cut(self._eval_runs(chunks, self._target(world, epoch)), None, None)

    def _eval_runs(self, chunks: list[int], total: int) -> list[tuple[int, np.ndarray]]:
        """Every tile of the share in order, then repeats of its first tiles up to ``total``,
        as runs of tiles of one chunk."""
        mine = np.concatenate([self.by_chunk[c] for c in chunks]) if chunks else np.empty(0, np.int64)
        if total > len(mine):  # repeats (the metrics de-duplicate them by index)
            pool = mine if len(mine) else np.concatenate(list(self.by_chunk.values()))
            mine = np.concatenate([mine, np.resize(pool, total - len(mine))])
        return [(c, mine[a:b]) for c, a, b in _runs(self.rows[mine] // self.chunk_tiles)]

    def _cut(self, runs: list[tuple[int, np.ndarray]], rng: np.random.Generator | None,
             limit: int | None) -> Iterator[dict]:
        """Batches of the runs' tiles: each run's chunk read once, its tiles added to those
        still waiting; with ``rng``, the tiles of every :data:`SHUFFLE_CHUNKS` chunks are
        shuffled together with those waiting before batches are cut; at most ``limit`` full
        batches, else every tile, the last batch short."""
        pending, held, made = np.empty(0, np.int64), {}, 0
        block = SHUFFLE_CHUNKS if rng is not None else 1
        for n, ((c, indexes), rows) in enumerate(zip(runs, self._chunks([c for c, _ in runs])), 1):
            if made == limit:
                return
            held[c] = rows
            pending = np.concatenate([pending, indexes])
            if n % block and n < len(runs):
                continue  # the next chunks of the block are on their way (PREFETCH)
            if rng is not None:
                pending = rng.permutation(pending)
            while len(pending) >= self.batch_size and made != limit:
                yield self._batch(pending[: self.batch_size], held)
                pending, made = pending[self.batch_size :], made + 1
            waiting = set((self.rows[pending] // self.chunk_tiles).tolist())
            held = {k: v for k, v in held.items() if k in waiting}  # chunks no tile waits for are let go
        if limit is None and len(pending):
            yield self._batch(pending, held)

    def _chunks(self, chunks: list[int]) -> Iterator[np.ndarray]:
        """The rows of each chunk in turn, :data:`PREFETCH` requests ahead."""
        pool = ThreadPoolExecutor(PREFETCH, thread_name_prefix="deforest-chunks")
        ahead: deque[Future] = deque()
        todo = iter(chunks)
        try:
            for c in todo:
                ahead.append(pool.submit(self.layout.chunk, c))
                if len(ahead) == PREFETCH:
                    break
            while ahead:
                rows = ahead.popleft().result()
                c = next(todo, None)
                if c is not None:
                    ahead.append(pool.submit(self.layout.chunk, c))
                yield rows
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _batch(self, indexes: np.ndarray, held: dict[int, np.ndarray]) -> dict:
        """One batch copied from the held chunks into a recycled buffer: one gather over the
        chunk cache's file when every chunk it draws from was read from there, else one gather
        per chunk, its tiles side by side (the order within a batch is free); or tile by tile
        through a worker-side augmentation."""
        augment = self.train and self.dataset.augment is not None
        if not augment:
            indexes = indexes[np.argsort(self.rows[indexes] // self.chunk_tiles, kind="stable")]
        rows = self.rows[indexes]
        first = next(iter(held.values()))
        dtype = torch.float32 if augment else TORCH_DTYPES[first.dtype.name]
        image = self.buffers.take((len(rows), len(self.channels), *first.shape[2:]), dtype)
        if augment:
            out, nodata = image.numpy(), self.layout.record["nodata"]
            for j, (index, row) in enumerate(zip(indexes.tolist(), rows.tolist())):
                tile = held[row // self.chunk_tiles][row % self.chunk_tiles]
                out[j] = self.dataset.prepared(index, tile[self.channels].astype(np.float32), nodata)
        else:
            runs = _runs(rows // self.chunk_tiles)
            cache = self.layout.cache
            if cache is not None and all(isinstance(held[c], np.memmap) for c, _, _ in runs):
                # every chunk drawn from is a view of the cache file: one gather over it, as a local pack's
                gather_planes(image, cache.tiles.view(np.ndarray), rows, self.channels)
            else:
                for c, a, b in runs:
                    gather_planes(image[a:b], held[c], rows[a:b] % self.chunk_tiles, self.channels)
        target = torch.from_numpy(np.asarray(self.dataset.targets[indexes]))
        batch = {"image": image, "target": target, "index": torch.from_numpy(indexes.astype(np.int64)), "bad": []}
        # gathered as stored: ``nodata`` says its pixels are not yet filled (deforest.batch_transforms)
        return batch if augment else {**batch, "nodata": self.layout.record["nodata"]}


def _runs(chunk: np.ndarray) -> list[tuple[int, int, int]]:
    """``(chunk id, start, stop)`` of each run of equal chunk ids in ``chunk``."""
    starts = np.flatnonzero(np.diff(chunk, prepend=-1)).tolist()
    return [(int(chunk[a]), a, b) for a, b in zip(starts, [*starts[1:], len(chunk)])]


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
