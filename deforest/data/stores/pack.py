"""A local pack as a :class:`~deforest.data.stores.base.TileStore`: the pack alone serves the
index, labels, header and band statistics (from its per-tile sums), and batches are gathered
whole from its memory map in the stored dtype (the format: :mod:`deforest.data.stores.format`;
writing one: :mod:`deforest.data.stores.packing`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from deforest.core.errors import DatasetError, TileError
from deforest.data.batch_buffers import TORCH_DTYPES, BatchBuffers, batch_tensor
from deforest.data.checks import BadTiles
from deforest.data.dataset import TileDataset
from deforest.data.index import TileIndex
from deforest.data.input_check import SAMPLE_TILES, PixelSample
from deforest.data.io import RasterHeader
from deforest.data.layouts import TileLayout
from deforest.data.statistics import moments
from deforest.data.stores.base import BandSummary, HeaderCheck, ScanRequest, TileStore
from deforest.data.stores.format import (
    LOG_SUM,
    LOG_SUM_SQ,
    N_VALID,
    STATS,
    SUM,
    SUM_SQ,
    TARGETS,
    TILES,
    gather_planes,
    is_pack,
    read_record,
    source_stamps,
)

log = logging.getLogger(__name__)

#: a pack whose sources hold at most this many files is checked against them at each start when
#: they exist (about 1 s of stats; BigEarthNet has 12 files per patch)
AUTO_CHECK_FILES = 50_000


class PackedLayout(TileLayout):
    """Serves a pack through the :class:`~deforest.data.layouts.TileLayout` interface, from the
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
        # ``nodata``: the pixels are as stored, not yet filled (deforest.data.batch_transforms)
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


class PackedTileDataset(TileDataset):
    """A split of a pack: a batch is one gather of its rows in the stored dtype
    (:meth:`PackedLayout.gather`), tile by tile only through a worker-side augmentation."""

    layout: PackedLayout

    def __getitems__(self, indices: list[int]) -> dict | list[dict]:
        if self.augment is None:
            return self.layout.gather(self.sources, indices, self.bands, self.targets, self.buffers)
        return [self[i] for i in indices]


class PackStore(TileStore):
    """The pack ``pack`` reads (packing checked every tile's header and pixels, so only the
    tiles without a valid pixel in the loaded bands are left to find, from the pack's counts)."""

    def __init__(self, pack: PackedLayout) -> None:
        self.layout = pack

    @property
    def layout_name(self) -> str:
        return self.layout.record["layout"]["class"].rsplit(".", 1)[-1]  # the layout the pack was made from

    def reference_header(self, index: TileIndex, wanted: int, bad_tiles: BadTiles) -> RasterHeader:
        return self.layout.header

    def reads_by_name(self, reference: RasterHeader) -> bool:
        return False  # packed in the dataset's band order

    def check_headers(self, request: ScanRequest, reference: RasterHeader, validate: str,
                      bad_tiles: BadTiles) -> HeaderCheck:
        return HeaderCheck((reference.height, reference.width), {})

    def statistics(self, request: ScanRequest, orders: Mapping[str, Sequence[int]],
                   bad_tiles: BadTiles) -> BandSummary:
        """Sums over the pack's per-tile rows of ``stats.npy``; the value range from a few tiles."""
        pack, sources = self.layout, request.index.sources
        if pack.header.nodata is not None:  # a tile without a valid pixel in the loaded bands is bad
            counts = pack.band_sums(sources, request.bands, request.log_scale)[:, 0].sum(axis=1)
            for row in np.flatnonzero(counts == 0):
                bad_tiles.add(TileError(sources[row], "every pixel is nodata"), sources[row])
        rows = request.stats_rows
        sums = pack.band_sums([sources[i] for i in rows], request.bands, request.log_scale).sum(axis=0)
        mean, std = moments(*sums)
        low, high = self._sampled_range([sources[i] for i in rows[:SAMPLE_TILES]], request.bands)
        return BandSummary(mean, std, low, high)

    def _sampled_range(self, sources: list[str], bands: list[int]) -> tuple[list[float] | None, list[float] | None]:
        """The value range of a few tiles' pixels (a pack's sums hold no percentiles)."""
        sample = PixelSample(len(bands), len(sources))
        reader = TileDataset(self.layout, sources, np.zeros(len(sources), np.int64), bands)
        for i in range(len(reader)):
            try:
                sample.add(*reader.read_valid(i))
            except TileError:  # a bad tile is counted where the pack's tiles are checked
                continue
        return sample.percentiles() or (None, None)

    def dataset(self, sources: Sequence[str], targets: np.ndarray, bands: Sequence[int], augment=None,
                spec=None, orders: Mapping[str, Sequence[int]] | None = None) -> PackedTileDataset:
        return PackedTileDataset(self.layout, sources, targets, bands, augment, spec=spec, orders=orders)

    def gathers_in_process(self, augmented: bool) -> bool:
        # a batch is one copy from the page cache in this process; a worker would add a second one
        # through shared memory (benchmarks/README.md, packed_vs_memcpy)
        return not augmented
