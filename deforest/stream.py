"""Packs in object storage (``s3://bucket/prefix``): a Zarr v3 array read through fsspec/s3fs.

At the prefix lie the local pack's small files as they are (``index.json``, ``targets.npy``,
``stats.npy``) and ``tiles.zarr``, the ``[N, C, H, W]`` array in chunks of ``chunk_tiles``
rows, uncompressed (Sentinel-2 uint16 reflectance gains little from a fast codec and each
chunk is then one ranged GET of raw bytes). Endpoint and credentials are the standard AWS
ones (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, profiles), read by botocore under s3fs. Why Zarr: docs/packing.md.

Training reads whole chunks: :class:`StreamedSplit` deals the chunks of an epoch out to the
DDP ranks and the DataLoader workers (disjoint), reads each chunk once, shuffles its tiles
with those of the previous chunk and cuts batches; every rank yields the same number of
batches (training drops the remainder, evaluation repeats tiles, which the metrics
de-duplicate), so no rank waits for another at the epoch's end.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info
from zarr.storage import FsspecStore

from deforest.datasets import DatasetError
from deforest.pack import INDEX, STATS, TARGETS, TILES, PackedLayout

log = logging.getLogger(__name__)

ZARR = "tiles.zarr"


def is_remote(path: str | os.PathLike) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ...) rather than a local folder."""
    return "://" in str(path)


def upload_pack(local: str | os.PathLike, url: str, chunk_tiles: int = 256) -> None:
    """Copy the local pack at ``local`` to ``url``; ``index.json`` goes last, so a reader
    never sees a half-copied pack."""
    local = Path(local)
    fs, root = fsspec.url_to_fs(url)
    tiles = np.load(local / TILES, mmap_mode="r")
    store = FsspecStore.from_url(f"{url.rstrip('/')}/{ZARR}", read_only=False)
    array = zarr.create_array(store=store, shape=tiles.shape, chunks=(chunk_tiles, *tiles.shape[1:]),
                              dtype=tiles.dtype, compressors=None, overwrite=True)
    for start in range(0, len(tiles), chunk_tiles):
        array[start : start + chunk_tiles] = tiles[start : start + chunk_tiles]
    for name in (TARGETS, STATS, INDEX):
        fs.put_file(str(local / name), f"{root}/{name}")


class RemotePack(PackedLayout):
    """A pack at an fsspec URL: the small files are fetched into ``cache_dir`` at each start
    (a few MB for EuroSAT, tens for BigEarthNet), the pixels stay remote."""

    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None) -> None:
        self.url = url.rstrip("/")
        base = Path(cache_dir or Path.home() / ".cache" / "deforest").expanduser()
        local = base / "packs" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        local.mkdir(parents=True, exist_ok=True)
        fs, root = fsspec.url_to_fs(self.url)
        try:
            for name in (INDEX, TARGETS, STATS):
                fs.get_file(f"{root}/{name}", str(local / name))
        except FileNotFoundError:
            raise DatasetError(f"data.packed={self.url}: no pack there (deforest-pack out={self.url} first)") from None
        super().__init__(local, check=False)

    def _present(self) -> bool:
        return all((self.path / name).is_file() for name in (INDEX, TARGETS, STATS))

    @property
    def tiles(self) -> zarr.Array:
        """The remote Zarr array, opened once per process (workers open their own)."""
        if self._tiles is None:
            self._tiles = zarr.open_array(FsspecStore.from_url(f"{self.url}/{ZARR}", read_only=True), mode="r")
        return self._tiles

    @property
    def chunk_tiles(self) -> int:
        return int(self.tiles.chunks[0])

    def read_rows(self, rows: np.ndarray, bands: Sequence[int]) -> np.ndarray:
        """Tiles at sorted ``rows`` (stored dtype), selected bands; zarr fetches each chunk once."""
        channels = np.asarray(bands) - 1
        if len(channels) == self.tiles.shape[1] and (channels == np.arange(len(channels))).all():
            return self.tiles.oindex[rows]
        return self.tiles.oindex[rows, channels]

    def gather(self, sources, indices, bands, targets) -> dict:
        rows = self.rows_of([sources[i] for i in indices])
        order = np.argsort(rows)
        image = np.empty((len(rows), len(bands), *self.tiles.shape[2:]), self.tiles.dtype)
        image[order] = self.read_rows(rows[order], bands)
        indices = torch.as_tensor(list(indices), dtype=torch.long)
        return {"image": torch.from_numpy(image), "target": torch.from_numpy(targets[indices.numpy()]),
                "index": indices, "bad": []}

    def stream(self, dataset, batch_size: int, train: bool, seed: int, num_workers: int) -> StreamedSplit:
        """The batches of ``dataset`` (a split) for a DataLoader with ``batch_size=None``."""
        return StreamedSplit(dataset, batch_size, train, seed, num_workers)

    def read(self, source: str, bands: Sequence[int] | None) -> np.ndarray:
        tile = self.read_rows(np.asarray([self.rows[source]]), bands or range(1, self.tiles.shape[1] + 1))[0]
        return tile.astype(np.float32)


class StreamedSplit(IterableDataset):
    """Batches of one split of a :class:`RemotePack`, chunk by chunk (see the module docs).

    ``train``: chunks and tiles shuffled each epoch (seeded by ``seed`` and the epoch
    count), every rank cut to the fewest batches any rank has in that worker slot; else in
    order, every rank padded with repeated tiles to the most tiles any rank has.
    """

    #: no worker-side augmentation (D4 runs on the device)
    augment = None

    def __init__(self, dataset, batch_size: int, train: bool, seed: int, num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed
        self.workers = max(num_workers, 1)
        self.layout: RemotePack = dataset.layout
        self.rows = self.layout.rows_of(dataset.sources)
        chunk = self.rows // self.layout.chunk_tiles
        #: per chunk id, the split's dataset indexes stored in it, in row order
        self.by_chunk = {int(c): np.flatnonzero(chunk == c) for c in np.unique(chunk)}
        self.epoch = 0

    def _share(self, rank: int, world: int, worker: int, epoch: int) -> list[int]:
        chunks = sorted(self.by_chunk)
        if self.train:
            chunks = np.random.default_rng([self.seed, epoch]).permutation(chunks).tolist()
        return chunks[rank::world][worker :: self.workers]

    def _target(self, world: int, worker: int, epoch: int) -> int:
        """Training: batches of this worker slot on every rank; evaluation: its tiles."""
        tiles = [sum(len(self.by_chunk[c]) for c in self._share(r, world, worker, epoch)) for r in range(world)]
        return min(tiles) // self.batch_size if self.train else max(tiles)

    def __len__(self) -> int:
        _, world = _rank_world()
        targets = [self._target(world, w, self.epoch) for w in range(self.workers)]
        return sum(targets) if self.train else sum(-(-t // self.batch_size) for t in targets)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        rank, world = _rank_world()
        epoch, self.epoch = self.epoch, self.epoch + 1  # persistent workers: each counts its epochs
        chunks = self._share(rank, world, worker, epoch)
        target = self._target(world, worker, epoch)
        rng = np.random.default_rng([self.seed, epoch, rank, worker])
        yield from self._train_batches(chunks, target, rng) if self.train else self._eval_batches(chunks, target)

    def _train_batches(self, chunks: list[int], wanted: int, rng: np.random.Generator) -> Iterator[dict]:
        """Each chunk read once; its tiles wait in memory (about two chunks) until batched."""
        pending, tiles, made = np.empty(0, np.int64), {}, 0
        for c in chunks:
            if made == wanted:
                return
            tiles.update(zip(self.by_chunk[c].tolist(), self._read(self.by_chunk[c])))
            pending = rng.permutation(np.concatenate([pending, self.by_chunk[c]]))
            while len(pending) >= self.batch_size and made < wanted:
                batch, pending = pending[: self.batch_size], pending[self.batch_size :]
                yield self._batch(batch, [tiles.pop(i) for i in batch.tolist()])
                made += 1

    def _eval_batches(self, chunks: list[int], total: int) -> Iterator[dict]:
        """Every tile of the share in order, then repeats of its first tiles up to ``total``."""
        mine = np.concatenate([self.by_chunk[c] for c in chunks]) if chunks else np.empty(0, np.int64)
        if total > len(mine):  # repeats (the metrics de-duplicate them by index)
            pool = mine if len(mine) else np.concatenate(list(self.by_chunk.values()))
            mine = np.concatenate([mine, np.resize(pool, total - len(mine))])
        for start in range(0, len(mine), self.batch_size):
            batch = mine[start : start + self.batch_size]
            yield self._batch(batch, list(self._read(batch)))

    def _read(self, indexes: np.ndarray) -> np.ndarray:
        """Tiles of dataset ``indexes`` in their order, in one request per chunk."""
        rows = self.rows[indexes]
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), len(self.dataset.bands), *self.layout.tiles.shape[2:]), self.layout.tiles.dtype)
        out[order] = self.layout.read_rows(rows[order], self.dataset.bands)
        return out

    def _batch(self, indexes: np.ndarray, tiles: list[np.ndarray]) -> dict:
        target = torch.from_numpy(np.asarray(self.dataset.targets[indexes]))
        return {"image": torch.from_numpy(np.stack(tiles)), "target": target,
                "index": torch.from_numpy(indexes.astype(np.int64)), "bad": []}


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
