"""Batches of a pack in object storage, streamed chunk by chunk (the pack: :mod:`deforest.data.stores.remote`).

Training reads whole chunks in each rank's main process: :class:`StreamedSplit` deals the
chunks of an epoch out to the DDP ranks (disjoint), keeps :data:`PREFETCH` chunk requests
in flight, shuffles the tiles of every :data:`SHUFFLE_CHUNKS` chunks together with those
still waiting from the previous ones and copies batches into recycled buffers, as a local
pack does. Every rank yields the same number of batches (training drops the remainder,
evaluation repeats tiles, which the metrics de-duplicate), so no rank waits for another at
the epoch's end. Chunks are kept in a :class:`~deforest.data.stores.remote.ChunkCache` on
local disk as they arrive (as LitData keeps its chunks), so the epochs after the first read
at local-pack speed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import IterableDataset

from deforest.data.batch_buffers import TORCH_DTYPES, BatchBuffers
from deforest.data.stores.format import gather_planes

log = logging.getLogger(__name__)

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
        self.layout = dataset.layout  # a RemotePack (which imports this module)
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
        # gathered as stored: ``nodata`` says its pixels are not yet filled (deforest.data.batch_transforms)
        return batch if augment else {**batch, "nodata": self.layout.record["nodata"]}


def _runs(chunk: np.ndarray) -> list[tuple[int, int, int]]:
    """``(chunk id, start, stop)`` of each run of equal chunk ids in ``chunk``."""
    starts = np.flatnonzero(np.diff(chunk, prepend=-1)).tolist()
    return [(int(chunk[a]), a, b) for a, b in zip(starts, [*starts[1:], len(chunk)])]


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
