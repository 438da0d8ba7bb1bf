"""Where a dataset's tiles come from: the one interface of tile files and packs.

A :class:`TileStore` answers what preparing the data and loading it ask of the tiles: their
index, the reference header, the header checks, the training split's band statistics, the
datasets and, for a pack in object storage, the stream of batches. Files are read and checked
one by one (:class:`~deforest.data.stores.files.FileStore`); a pack was checked when it was
written and carries its statistics as sums (:class:`~deforest.data.stores.pack.PackStore`,
:class:`~deforest.data.stores.remote.RemotePackStore`). :func:`deforest.data.stores.opening.open_store`
picks one from the ``data`` settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deforest.core.contract import InputSpec
from deforest.data.checks import BadTiles
from deforest.data.dataset import TileDataset
from deforest.data.index import TileIndex
from deforest.data.io import RasterHeader
from deforest.data.layouts import TileLayout

if TYPE_CHECKING:
    import albumentations as A
    from torch.utils.data import IterableDataset

#: headers read to decide the dataset's band count, tile size and dtype (the commonest wins):
#: by the datamodule of tile files and by the packer alike
REFERENCE_SAMPLE = 32


@dataclass(frozen=True)
class ScanRequest:
    """What the header checks and the band statistics of one preparation depend on."""

    index: TileIndex
    #: rows of ``index`` in the training split
    train_rows: list[int]
    #: rows of the training split the statistics read (a seeded sample)
    stats_rows: list[int]
    #: the loaded bands (1-based, in the dataset's band order)
    bands: list[int]
    #: the band names each tile's described bands are matched to (``None``: read by position)
    names: list[str] | None
    #: ``names`` are the loaded bands' own (evaluation: the checkpoint's), not every source band's
    names_loaded: bool
    log_scale: bool
    stats_max_samples: int
    seed: int


@dataclass(frozen=True)
class HeaderCheck:
    """What the header checks found: the tile size, and per tile that stores the loaded bands in
    another order, the file bands holding them (source -> 1-based bands)."""

    tile_size: tuple[int, int]
    orders: dict[str, list[int]]


@dataclass(frozen=True)
class BandSummary:
    """Per loaded band: the mean and standard deviation of the training pixels (as normalised:
    raw or ``log1p``), and the 2nd/98th percentiles of the raw values (``None``: unknown)."""

    mean: list[float]
    std: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


class TileStore(ABC):
    """The tiles of one dataset: tile files through their layout, or a pack.

    ``layout`` reads the samples (the :class:`~deforest.data.layouts.TileLayout` interface);
    ``streams`` is true for a pack in object storage, whose batches come whole chunk by chunk.
    """

    layout: TileLayout
    streams = False

    @property
    def root(self) -> Path:
        """The dataset's folder, for messages and the split lists of the contract."""
        return self.layout.root

    def build_index(self) -> TileIndex:
        return self.layout.build_index()

    @property
    @abstractmethod
    def layout_name(self) -> str:
        """The name of the layout the tiles are stored in (a pack: the one it was made from)."""

    @abstractmethod
    def reference_header(self, index: TileIndex, wanted: int, bad_tiles: BadTiles) -> RasterHeader:
        """What the dataset's tiles are, from the first ``wanted`` readable headers of ``index``
        (unreadable ones are bad tiles)."""

    @abstractmethod
    def reads_by_name(self, reference: RasterHeader) -> bool:
        """Whether tiles that name their bands are read in the dataset's order by name (else by
        position: no names, or a header file that does not hold the whole sample)."""

    @abstractmethod
    def check_headers(self, request: ScanRequest, reference: RasterHeader, validate: str,
                      bad_tiles: BadTiles) -> HeaderCheck:
        """Every tile against ``reference`` (``validate=quick|full``; ``off`` trusts them)."""

    @abstractmethod
    def statistics(self, request: ScanRequest, orders: Mapping[str, Sequence[int]],
                   bad_tiles: BadTiles) -> BandSummary:
        """Band statistics of the training split's sampled tiles; tiles that fail are bad tiles."""

    def dataset(self, sources: Sequence[str], targets: np.ndarray, bands: Sequence[int],
                augment: A.Compose | None = None, spec: InputSpec | None = None,
                orders: Mapping[str, Sequence[int]] | None = None) -> TileDataset:
        """The samples ``sources`` as a dataset that reads them from this store."""
        return TileDataset(self.layout, sources, targets, bands, augment, spec=spec, orders=orders)

    def stream(self, dataset: TileDataset, batch_size: int, train: bool, seed: int) -> IterableDataset | None:
        """Whole batches of ``dataset`` for a DataLoader with ``batch_size=None`` (``None``: the
        store serves tiles by index, to a sampler)."""
        return None

    def gathers_in_process(self, augmented: bool) -> bool:
        """Whether batches are gathered whole in the main process (``data.num_workers`` then
        unused); ``augmented``: the training split has a worker-side augmentation."""
        return False
