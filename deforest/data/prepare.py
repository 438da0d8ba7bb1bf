"""Everything the data must be before a DataLoader is made: indexed, split, checked, measured.

:func:`prepare` takes a :class:`~deforest.data.stores.base.TileStore` and the
:class:`~deforest.data.settings.PrepareSettings` and returns :class:`PreparedData`: the index
and its split, the bands, the tile size, the bad tiles and the
:class:`~deforest.core.contract.InputSpec` a model is built from (in evaluation: the
checkpoint's, with these tiles' split). Everything that can fail on bad input fails here, in
the main process and before the first training step, with the file named. No Lightning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import numpy as np

from deforest.core.contract import InputSpec, Normalization, SourceRecord, SplitRecord
from deforest.core.errors import DatasetError, TileError
from deforest.core.vocabulary import MULTICLASS, SPLITS
from deforest.data.checks import BadTiles, constant_tile, dataset_band_names
from deforest.data.dataset import TileDataset
from deforest.data.index import TileIndex, align_classes, describe_split_counts
from deforest.data.io import RasterHeader, pixel_reads, resolve_bands
from deforest.data.settings import PrepareSettings
from deforest.data.split_lists import apply_split_lists
from deforest.data.splits import assign_splits, edge_tiles, imbalance_mask, restore_split, spatial_blocks, subset
from deforest.data.statistics import sample_rows
from deforest.data.stores.base import REFERENCE_SAMPLE, ScanRequest, TileStore
from deforest.data.stores.files import warn_constant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """The data as prepared: what the datasets are made of and what the model is built on."""

    index: TileIndex
    #: the split of each row of ``index``
    assignment: list[str]
    #: the loaded bands, 1-based in the dataset's band order
    bands: list[int]
    tile_size: tuple[int, int]
    input_spec: InputSpec
    #: the reference tile's header: what the dataset's tiles are
    reference_header: RasterHeader
    source_band_count: int
    #: names of the files' bands in the dataset's order (``None``: the bands have no names)
    source_band_names: list[str] | None
    #: the loaded bands of each tile that stores them in another order (source -> 1-based bands of its file)
    band_orders: dict[str, list[int]]
    #: the bad tiles found (``data.on_bad_tile=skip`` leaves them out; loading may add more)
    bad_tiles: BadTiles
    #: tiles left out at spatial block edges
    dropped_at_edges: int = 0

    @property
    def nodata(self) -> float | None:
        """The reference tile's nodata (every file tile is read with its own)."""
        return self.reference_header.nodata

    @property
    def loaded_band_names(self) -> list[str] | None:
        """Names of the loaded bands, in order (``None``: the bands have no names)."""
        names = self.source_band_names
        return None if names is None else [names[b - 1] for b in self.bands]

    def rows(self, split: str) -> list[int]:
        """Rows of ``index`` in ``split``."""
        return [i for i, a in enumerate(self.assignment) if a == split]

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Per split, tiles carrying each class."""
        return describe_split_counts(self.index, self.assignment)


def prepare(store: TileStore, settings: PrepareSettings, evaluation_only: bool = False,
            bad_tiles: BadTiles | None = None) -> PreparedData:
    """Index, split, check and measure the tiles of ``store``; raises :class:`DatasetError` or
    :class:`TileError` naming the file.

    ``evaluation_only``: a checkpoint brings the statistics, so the data need no training or
    validation tiles (a test-only folder can be evaluated). ``bad_tiles`` collects the bad
    tiles (default: a new one with ``settings.checks.on_bad_tile``).
    """
    bad_tiles = bad_tiles if bad_tiles is not None else BadTiles(settings.checks.on_bad_tile)
    return _Preparation(store, settings, evaluation_only, bad_tiles).run()


class _Preparation:
    """The steps of :func:`prepare`, in order, over the state they share."""

    def __init__(self, store: TileStore, settings: PrepareSettings, evaluation_only: bool, bad_tiles: BadTiles) -> None:
        self.store, self.settings, self.bad_tiles = store, settings, bad_tiles
        self.evaluation_only = evaluation_only
        self.reference = settings.input_spec
        self.root = store.root
        self.dropped_at_edges = 0

    def run(self) -> PreparedData:
        checks, reference = self.settings.checks, self.reference
        index = self.store.build_index()
        if self.settings.split.files and len(index):
            index = apply_split_lists(index, self.settings.split.files)
        if len(index) == 0:
            raise DatasetError(f"{self.root}: no tiles found")
        if reference is not None and index.task != reference.task:
            raise DatasetError(f"{self.root}: the data is {index.task}, the checkpoint {reference.task}")
        wanted = 1 if checks.validate == "off" else REFERENCE_SAMPLE
        first = self.first = self.store.reference_header(index, wanted, self.bad_tiles)
        self.source_band_count = self.store.layout.band_count(first.count)
        self.source_band_names = dataset_band_names(first, self.store.layout.band_names, self.source_band_count)
        self.bands = self._resolve_bands()
        index, assignment = self._split(index)
        header_check = self.store.check_headers(self._request(index, assignment), first, checks.validate,
                                                self.bad_tiles)
        orders = header_check.orders
        if checks.validate == "full":
            self._validate_pixels(index, orders)
        index, assignment = self._drop_bad_tiles(index, assignment)
        if reference is not None:
            normalization, value_range = reference.normalization, (None, None)
        else:
            stats = self.store.statistics(self._request(index, assignment), orders, self.bad_tiles)
            transform = "log1p" if self.settings.log_scale else "scale"
            normalization, value_range = Normalization(stats.mean, stats.std, transform=transform), (stats.low, stats.high)
        index, assignment = self._drop_bad_tiles(index, assignment)  # tiles that failed while measuring the statistics
        if reference is not None:
            index = align_classes(index, reference, self.root)
        spec = self._contract(index, assignment, normalization, header_check.tile_size, value_range)
        return PreparedData(index, assignment, self.bands, header_check.tile_size, spec, first, self.source_band_count,
                            self.source_band_names, orders, self.bad_tiles, self.dropped_at_edges)

    def _resolve_bands(self) -> list[int]:
        """The configured bands, or the checkpoint's (which must fit these files)."""
        if self.reference is not None:
            if self.reference.source.band_count != self.source_band_count:
                raise DatasetError(
                    f"{self.root}: the tiles have {self.source_band_count} bands, the checkpoint was "
                    f"trained on {self.reference.source.band_count}-band tiles"
                )
            return list(self.reference.bands)
        selection = None if self.settings.bands is None else list(self.settings.bands)
        try:  # by the names of the dataset's order: the reference tile's own, when it names its bands
            names = self.source_band_names or self.store.layout.band_names
            return resolve_bands(selection, names, self.source_band_count)
        except ValueError as err:
            raise DatasetError(f"{self.root}: the tiles have {self.source_band_count} bands; data.bands: {err}") from None

    def _match_names(self) -> list[str] | None:
        """The band names each tile's described bands are matched to: the dataset's (every source
        band, in the reference tile's order), or in evaluation the checkpoint's loaded bands.
        ``None``: bands are read by position (no names, a pack, or a header file that does not
        hold the whole sample: BigEarthNet's one file per band, a pair's two dates)."""
        if not self.store.reads_by_name(self.first):
            return None
        return self.reference.band_names if self.reference is not None else self.source_band_names

    def _request(self, index: TileIndex, assignment: list[str]) -> ScanRequest:
        settings = self.settings
        train = [i for i, a in enumerate(assignment) if a == "train"]
        return ScanRequest(index, train, sample_rows(train, settings.stats_max_samples, settings.seed), self.bands,
                           self._match_names(), self.reference is not None, settings.log_scale,
                           settings.stats_max_samples, settings.seed)

    def _split(self, index: TileIndex) -> tuple[TileIndex, list[str]]:
        """The checkpoint's split lists (evaluation), or a split made from the config."""
        split, seed = self.settings.split, self.settings.seed
        record = self.reference.split if self.reference is not None else None
        if record is not None and not self.settings.resplit:
            index, assignment = restore_split(index, record, self.root)
            self.dropped_at_edges = record.dropped_at_edges
            return index, assignment
        if record is not None:
            log.warning(
                "resplit=true: evaluating on a split made from this config (data.split=%s, seed %d), "
                "not the checkpoint's (%s split %s): tiles the model trained on may be scored",
                split.kind, seed, record.kind, record.digest,
            )
        groups = spatial_blocks(index, split.block_size) if split.kind == "spatial" else None
        assignment = assign_splits(index, split.val_fraction, split.test_fraction, seed, groups)
        if split.kind == "spatial":
            edge = edge_tiles(index, assignment, split.block_size, split.block_buffer)
            self.dropped_at_edges = int(edge.sum())
            if edge.any():
                log.info(
                    "%d tile(s) left out: they reach into a block of another split (data.block_size=%s, "
                    "data.block_buffer=%s)", self.dropped_at_edges, split.block_size, split.block_buffer,
                )
                index = subset(index, ~edge)
                assignment = [a for a, e in zip(assignment, edge) if not e]
        if split.imbalance:
            keep = imbalance_mask(index, assignment, dict(split.imbalance), seed)
            index = subset(index, keep)
            assignment = [a for a, k in zip(assignment, keep) if k]
        return index, assignment

    def _validate_pixels(self, index: TileIndex, orders: dict[str, list[int]]) -> None:
        """Read every pixel once (``validate=full``): unreadable, NaN/inf or all-nodata tiles are
        bad, and so are tiles of one value per band that declare no nodata (:func:`constant_tile`)."""
        probe = TileDataset(self.store.layout, index.sources, index.targets, self.bands, orders=orders)
        constant = []
        with pixel_reads():
            for i, source in enumerate(probe.sources):
                if source not in self.bad_tiles.problems:
                    try:
                        problem = constant_tile(*probe.read_valid(i))
                    except TileError as err:
                        self.bad_tiles.add(err, source)
                        continue
                    if problem is not None:
                        constant.append((source, problem))
        warn_constant([source for source, _ in constant], "of all tiles", refused=True)
        for source, problem in constant:
            self.bad_tiles.add(TileError(source, problem), source, more=len(constant) - 1)

    def _drop_bad_tiles(self, index: TileIndex, assignment: list[str]) -> tuple[TileIndex, list[str]]:
        """Leave skipped tiles out of the index and the splits, then re-check the splits."""
        keep = np.asarray([s not in self.bad_tiles.problems for s in index.sources])
        if not keep.all():
            index = subset(index, keep)
            assignment = [a for a, k in zip(assignment, keep) if k]
            log.warning("%d bad tile(s) skipped (data.on_bad_tile=skip)", len(self.bad_tiles))
        self._check_splits(index, assignment)
        return index, assignment

    def _check_splits(self, index: TileIndex, assignment: list[str]) -> None:
        if self.evaluation_only:
            return
        splits = np.asarray(assignment)
        for split in ("train", "val"):
            if not (splits == split).any():
                raise DatasetError(f"{self.root}: the {split} split is empty")
        if index.task == MULTICLASS:
            present = set(index.targets[splits == "train"].tolist())
            absent = [n for i, n in enumerate(index.class_names) if i not in present]
            if absent:
                raise DatasetError(f"{self.root}: class(es) {absent} have no tile in the training split")

    def _contract(self, index: TileIndex, assignment: list[str], normalization: Normalization,
                  tile_size: tuple[int, int], value_range: tuple) -> InputSpec:
        """What a model built on this data expects of its input (see :mod:`deforest.core.contract`)."""
        root = self.root
        lists = {split: [os.path.relpath(s, root) for s, a in zip(index.sources, assignment) if a == split]
                 for split in SPLITS}
        counts = describe_split_counts(index, assignment)
        if self.reference is not None:  # evaluation: the checkpoint's contract, with these tiles' split
            kept = self.reference.split if self.reference.split is not None and not self.settings.resplit else None
            record = (replace(kept, root=str(root), lists=lists, class_counts=counts) if kept is not None
                      else self._split_record(lists, counts))
            return replace(self.reference, split=record)
        header = self.first
        names = self.source_band_names
        return InputSpec(
            task=index.task,
            class_names=list(index.class_names),
            bands=list(self.bands),
            source=SourceRecord(
                band_count=self.source_band_count,
                dtype=header.dtype,
                value_low=value_range[0],
                value_high=value_range[1],
                pixel_size=None if header.res is None else list(header.res),
                pixel_units=header.units,
            ),
            nodata=header.nodata,
            normalization=normalization,
            tile_size=list(tile_size),
            band_names=None if names is None else [names[b - 1] for b in self.bands],
            split=self._split_record(lists, counts),
        )

    def _split_record(self, lists: dict[str, list[str]], counts: dict) -> SplitRecord:
        """How this config split the tiles, and the resulting lists."""
        split = self.settings.split
        return SplitRecord(
            layout=self.store.layout_name,
            root=str(self.root),
            kind=split.kind,
            seed=self.settings.seed,
            val_fraction=split.val_fraction,
            test_fraction=split.test_fraction,
            lists=lists,
            block_size=split.block_size,
            buffer=split.block_buffer,
            dropped_at_edges=self.dropped_at_edges,
            class_counts=counts,
        )
