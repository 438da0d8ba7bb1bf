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

Training streams the chunks (:mod:`deforest.data.stores.streaming`); they are kept in a
:class:`ChunkCache` on local disk as they arrive (as LitData keeps its chunks), so the epochs
after the first read at local-pack speed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import fsspec
import numpy as np
import zarr
from zarr.storage import FsspecStore

from deforest.core.errors import DatasetError
from deforest.core.safety import remove_stale_temps, temp_prefix
from deforest.core.vocabulary import SPLITS
from deforest.data.stores.format import INDEX, ORDER, STATS, TARGETS, TILES, ZARR, range_marker, read_record
from deforest.data.stores.pack import PackedLayout, PackStore
from deforest.data.stores.streaming import StreamedSplit

log = logging.getLogger(__name__)

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
        return self.folder / range_marker(start, stop)

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

    def stored_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows of ``tiles.zarr`` that hold pack rows ``rows``."""
        return rows if self.order is None else self.order[rows]

    def row(self, row: int) -> np.ndarray:
        """Pack row ``row``, through its chunk (so a single read also fills the cache)."""
        stored = int(self.stored_rows(np.asarray([row]))[0])
        return self.chunk(stored // self.chunk_tiles)[stored % self.chunk_tiles]


class RemotePackStore(PackStore):
    """A pack in object storage: served as a local pack, but its batches stream whole chunks in
    each rank's main process (:class:`~deforest.data.stores.streaming.StreamedSplit`)."""

    layout: RemotePack
    streams = True

    def stream(self, dataset, batch_size: int, train: bool, seed: int) -> StreamedSplit:
        return StreamedSplit(dataset, batch_size, train, seed)

    def gathers_in_process(self, augmented: bool) -> bool:
        return True  # the chunk requests run on s3fs's event loop; the gathers follow them here
