"""The Lightning datamodule: index, split, validate, measure band statistics, load.

It produces the :class:`~deforest.contract.InputSpec` a model is built from, and for
evaluation takes a checkpoint's one back: the same bands, fill, normalisation and split.
Everything that can fail on bad input fails in :meth:`TileDataModule.setup`, in the main
process and before the first training step, with the file named.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.fabric.utilities.seed import pl_worker_init_function
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deforest.contract import InputSpec, Normalization, SplitRecord, align_classes
from deforest.datasets import (
    MULTICLASS,
    SPLITS,
    DatasetError,
    TileIndex,
    TileLayout,
    apply_split_lists,
    describe_split_counts,
)
from deforest.io import RasterHeader, TileError, file_fingerprint, pixel_reads, read_header, resolve_bands
from deforest.batch_buffers import TORCH_DTYPES, BatchBuffers, batch_tensor
from deforest.batch_transforms import PackedBatchTransform, collate_batches, is_device_d4
from deforest.pack import PackedLayout, open_pack
from deforest.splits import assign_splits, edge_tiles, imbalance_mask, restore_split, spatial_blocks, subset
from deforest.input_check import PERCENTILES, SAMPLE_TILES, PixelSample
from deforest.statistics import JsonCache, measure_band_statistics, moments, sample_rows
from deforest.transforms import build_augmentation, random_d4
from deforest.validation import (
    BadTiles,
    band_order,
    check_header,
    check_pixels,
    collate_tiles,
    constant_tile,
    dataset_band_names,
    fill_nodata,
    reference_header,
    valid_pixels,
)

if TYPE_CHECKING:
    # annotations only: deforest.transforms imports it where a pipeline is built (trainer=gpu has
    # none, and the bare GPU machines of scripts/gpu-check.sh have no albumentations)
    import albumentations as A

log = logging.getLogger(__name__)
# headers read to decide the dataset's band count and tile size (the commonest wins)
REFERENCE_SAMPLE = 32


class TileDataset(Dataset):
    """Samples of one split: reads a tile, augments it, returns raw band values.

    Items are dicts ``{"image": float32 [C, H, W], "target": ..., "index": int}``; the
    index points back into :attr:`sources` so errors and reports can name files.
    """

    def __init__(
        self,
        layout: TileLayout,
        sources: Sequence[str],
        targets: np.ndarray,
        bands: Sequence[int],
        augment: A.Compose | None = None,
        nodata: float | None = None,
        spec: InputSpec | None = None,
        orders: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.layout = layout
        self.sources = list(sources)
        self.targets = targets
        self.bands = list(bands)
        #: the bands to read of the tiles that store them in another order (by source; the
        #: others: ``bands``), found from their band descriptions when the headers were checked
        self.orders = dict(orders or {})
        self.augment = augment
        self.nodata = nodata
        #: the contract whose fill nodata pixels get (``None``: left as read, for statistics)
        self.spec = spec
        self.buffers = BatchBuffers()

    def __len__(self) -> int:
        return len(self.sources)

    def read_valid(self, i: int, native: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Float32 ``[C, H, W]`` (``native``: the file's dtype where float32 holds it exactly)
        and its valid-pixel mask; NaN/inf or all-nodata raise TileError.

        The mask follows the tile's own nodata (its header or ``.aux.xml``), unless this
        dataset was given one ``nodata`` value for every tile.
        """
        bands = self.orders.get(self.sources[i], self.bands) if self.orders else self.bands
        if self.nodata is None:
            image, nodata = self.layout.read_with_nodata(self.sources[i], bands, native=native)
        else:
            image, nodata = self.layout.read(self.sources[i], bands), self.nodata
        return self._checked(i, image, nodata)

    def _checked(self, i: int, image: np.ndarray, nodata) -> tuple[np.ndarray, np.ndarray | None]:
        if image.dtype.name not in TORCH_DTYPES:  # int32, float64, ...: as float32
            image = image.astype(np.float32)
        valid = valid_pixels(image, nodata)
        check_pixels(self.sources[i], image, valid)
        return image, valid

    def _filled(self, image: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        return image if self.spec is None else fill_nodata(image, valid, self.spec.fill)

    def read(self, i: int, native: bool = False) -> np.ndarray:
        """The tile's selected bands, nodata pixels given the fill of ``spec`` when given (a
        filled tile is float32, whatever ``native``)."""
        return self._filled(*self.read_valid(i, native))

    def prepared(self, i: int, image: np.ndarray, layout_nodata: float | None) -> np.ndarray:
        """Tile ``i``'s selected bands read elsewhere (a streamed chunk's row) made as
        ``self[i]`` makes them: checked, nodata filled, then augmented."""
        nodata = layout_nodata if self.nodata is None else self.nodata
        return self._augmented(self._filled(*self._checked(i, image, nodata)))

    def _augmented(self, image: np.ndarray) -> np.ndarray:
        """``[C, H, W]`` through the albumentations pipeline (on ``[H, W, C]``), possibly a strided view."""
        if self.augment is None:
            return image
        return self.augment(image=image.transpose(1, 2, 0))["image"].transpose(2, 0, 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        try:
            image = self._augmented(self.read(i))
        except TileError as err:  # raised or counted in the main process, not in a worker
            return {"bad": (self.sources[i], err.path, err.problem), "index": i}
        target = torch.as_tensor(self.targets[i])
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "target": target, "index": i}

    def __getitems__(self, indices: list[int]) -> dict | list[dict]:
        """A whole batch in the stored dtype (see :mod:`deforest.batch_transforms`): a pack
        without worker-side augmentation in one gather, files read into one batch tensor."""
        if not isinstance(self.layout, PackedLayout):
            return self.read_batch(indices)
        if self.augment is None:
            return self.layout.gather(self.sources, indices, self.bands, self.targets, self.buffers)
        return [self[i] for i in indices]

    def read_batch(self, indices: list[int]) -> dict:
        """Tiles read in their file dtype (float32 where nodata pixels were filled), augmented,
        and copied once, into the batch tensor (shared memory in a worker); bad tiles ride along
        as ``batch["bad"]``."""
        tiles, good, bad = [], [], []
        with pixel_reads():  # one GDAL environment for the batch, not one per open
            for i in indices:
                try:
                    tiles.append(self._augmented(self.read(i, native=True)))
                    good.append(i)
                except TileError as err:  # raised or counted in the main process, not in a worker
                    bad.append((self.sources[i], err.path, err.problem))
        if not tiles:
            return collate_tiles([{"bad": b} for b in bad])
        dtypes = {t.dtype for t in tiles}
        dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
        image = batch_tensor((len(tiles), *tiles[0].shape), TORCH_DTYPES[dtype.name], self.buffers)
        out = image.numpy()
        for j, tile in enumerate(tiles):
            out[j] = tile
        index = torch.as_tensor(good, dtype=torch.long)
        return {"image": image, "target": torch.as_tensor(self.targets[good]), "index": index, "bad": bad}


SAMPLERS = ("shuffle", "balanced")


def balanced_weights(targets: np.ndarray, task: str) -> np.ndarray:
    """Each training sample's draw weight for ``data.sampler=balanced`` (float64, sums to 1).

    Multi-class: the inverse count of its class, so every class is drawn equally often.
    Multi-label (``targets`` multi-hot ``[N, C]``): the inverse count of its *rarest* label. A
    sample is one draw however many labels it carries, so no per-label weights can make every
    label equally frequent; weighting by the rarest label repeats the samples that carry rare
    labels (they are the scarce ones) and draws the common labels mostly as their companions.
    A sample without a label counts as carrying the commonest one.
    """
    targets = np.asarray(targets)
    if task == MULTICLASS:
        counts = np.bincount(targets, minlength=int(targets.max()) + 1).astype(np.float64)
        weights = 1.0 / counts[targets]
    else:
        positive = targets > 0
        counts = positive.sum(axis=0).astype(np.float64)
        per_label = np.where(positive, counts[None, :], np.inf).min(axis=1)
        weights = 1.0 / np.where(np.isfinite(per_label), per_label, counts.max())
    return weights / weights.sum()


class BalancedSampler(DistributedSampler):
    """Draws ``len(weights)`` training indices per epoch with replacement, index ``i`` with
    probability ``weights[i]``.

    One global draw per (seed, epoch), the same on every rank (a generator of its own, not the
    global RNG); rank ``r`` of ``num_replicas`` takes the draws at positions ``r, r + R, ...``,
    so the ranks' shares are disjoint and together are the single-process draw (padded to a
    multiple of ``num_replicas``). A :class:`DistributedSampler` so that Lightning neither wraps
    it under DDP nor forgets its ``set_epoch``.
    """

    def __init__(self, weights: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler's own __init__ would ask torch.distributed for the world size
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.seed, self.num_replicas, self.rank, self.epoch = int(seed), int(num_replicas), int(rank), 0
        self.num_samples = -(-len(self.weights) // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(draw[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class TileDataModule(pl.LightningDataModule):
    """Splits a tile layout into train/val/test and serves DataLoaders.

    Args:
        layout: where and how tiles are stored (``folder``, ``manifest``, ``bigearthnet``).
        bands: band names or 1-based indexes to read; ``None`` reads all.
        batch_size, num_workers, pin_memory, persistent_workers: DataLoader settings.
        val_fraction, test_fraction: shares for samples without a given split.
        split, block_size: ``random``, or ``spatial``: whole squares of ``block_size`` (tile
            CRS units) go to one split, from the bounds columns ``deforest-tile`` writes;
            tiles reaching into a block of another split are dropped (counted in the log
            and the contract), so no pixel is in two splits.
        block_buffer: spatial: grow each tile's footprint by this (CRS units) before that
            check, keeping tiles of different splits at least twice as far apart.
        seed: seeds the split and the statistics sample.
        augment: albumentations transforms for training (instantiated by Hydra).
        log_scale: normalise ``log1p`` of the values (stored with the statistics).
        cache_dir: where band statistics are cached, keyed by the training file list.
        stats_max_samples: at most this many training tiles (seeded sample) for statistics.
        imbalance: ``{class name: kept fraction}`` (``"*"`` for the rest) to subsample the
            training split into an imbalanced one, for imbalance experiments.
        sampler: ``None``/``shuffle``: each training tile once per epoch in random order;
            ``balanced``: :class:`BalancedSampler` with :func:`balanced_weights`.
        validate: ``quick`` reads every header, ``full`` also every pixel, ``off`` trusts.
        on_bad_tile: ``error`` stops on a bad tile naming it; ``skip`` leaves it out, logged
            and counted in :attr:`bad_tiles` (see :mod:`deforest.validation`).
        packed: a pack written by ``deforest-pack``: index, labels, statistics and pixels come
            from it alone (``layout`` may be ``None``); batches are gathered whole in the stored
            dtype, converted and D4-augmented on the device (see :mod:`deforest.batch_transforms`).
        cache_chunks: a pack in object storage: keep its chunks in ``cache_dir`` as they stream
            (:class:`deforest.stream.ChunkCache`), so later epochs read them from local disk.
        device_flips: random flips/rotations of each training batch after it reached the
            device (GPU), instead of augmenting in the DataLoader workers (then ``augment=[]``).
        split_files: ``{train: path, val: path, test: path}``: lists of sample names that set
            the splits (TorchGeo's ``eurosat-train.txt`` ...); unlisted samples are left out
            (:func:`deforest.datasets.apply_split_lists`).
        input_spec: evaluation: a checkpoint's contract. Its bands, nodata fill,
            normalisation and class order are used, and its split unless ``resplit``.
        resplit: evaluation: split with this config's settings instead of the checkpoint's lists.
        test_split: the split :meth:`test_dataloader` serves (``deforest-eval split=val``).
    """

    def __init__(
        self,
        layout: TileLayout | None,
        bands: Sequence[int | str] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split: str = "random",
        block_size: float | None = None,
        block_buffer: float = 0.0,
        seed: int = 42,
        augment: Sequence[A.BasicTransform] | None = None,
        log_scale: bool = True,
        cache_dir: str | None = None,
        stats_max_samples: int = 5000,
        imbalance: Mapping[str, float] | None = None,
        sampler: str | None = None,
        validate: str = "quick",
        on_bad_tile: str = "error",
        packed: str | None = None,
        cache_chunks: bool = True,
        device_flips: bool = False,
        split_files: Mapping[str, str] | None = None,
        input_spec: InputSpec | None = None,
        resplit: bool = False,
        test_split: str = "test",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must leave a training share"
            )
        if validate not in ("quick", "full", "off"):
            raise ValueError(f"data.validate must be quick, full or off, not {validate!r}")
        self.bad_tiles = BadTiles(on_bad_tile)
        self.layout = open_pack(packed, cache_dir, cache_chunks) if packed else layout
        self.batch_transform: PackedBatchTransform | None = None
        self.band_selection = None if bands is None else list(bands)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        if split not in ("random", "spatial"):
            raise ValueError(f"data.split must be random or spatial, not {split!r}")
        self.split, self.block_size, self.block_buffer = split, block_size, block_buffer
        if test_split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {test_split!r}")
        self.test_split = test_split
        self.reference = input_spec
        self.resplit = resplit
        self.seed = seed
        self.augment_transforms = list(augment or [])
        self.log_scale = log_scale
        self.cache = JsonCache(cache_dir)
        self.stats_max_samples = stats_max_samples
        self.imbalance = dict(imbalance) if imbalance else None
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be null, shuffle or balanced, not {sampler!r}")
        self.sampler = sampler or "shuffle"
        if self.sampler == "balanced" and getattr(self.layout, "stream", None) is not None:
            raise DatasetError(f"{packed}: data.sampler=balanced draws tiles one by one and a pack in object storage "
                               f"streams whole chunks: copy the pack to a local folder, or set data.sampler=null")
        self.validate = validate
        self.device_flips = device_flips
        self.split_files = dict(split_files) if split_files else None
        self.index: TileIndex | None = None
        self.assignment: list[str] = []
        self.datasets: dict[str, TileDataset] = {}
        #: tiles dropped at spatial block edges
        self.dropped_at_edges = 0
        #: per band, the 2nd/98th percentiles of the training pixels (set with the statistics)
        self.value_range: tuple[list[float] | None, list[float] | None] = (None, None)
        #: the loaded bands of each tile that stores them in another order than the dataset
        #: (source -> 1-based bands of its file), from its band descriptions (:meth:`_validate_headers`)
        self.band_orders: dict[str, list[int]] = {}
        #: the contract the model is built from (after :meth:`setup`)
        self.input_spec: InputSpec | None = None
        self._gloo = None  # see _host_group
        self._flips: tuple[torch.device, torch.Generator] | None = None  # see _flip_generator
        #: set by ``setup("test"|"predict")``: a checkpoint brings the statistics, so the data
        #: need no training or validation tiles (a test-only folder can be evaluated)
        self.evaluation_only = False

    # ---- what the model needs to know -------------------------------------------------
    @property
    def task(self) -> str:
        return self._index().task

    @property
    def class_names(self) -> list[str]:
        return self._index().class_names

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    @property
    def source_band_names(self) -> list[str] | None:
        """Names of the files' bands: the reference tile's descriptions when every band has
        one, else the data config's band names when they fit the band count, else ``None``.
        Tiles that name their bands are read in this order (:meth:`_match_names`)."""
        return dataset_band_names(self.reference_header, self.layout.band_names, self.source_band_count)

    @property
    def loaded_band_names(self) -> list[str] | None:
        """Names of the loaded bands, in order (``None``: the bands have no names)."""
        names = self.source_band_names
        return None if names is None else [names[b - 1] for b in self.bands]

    def _index(self) -> TileIndex:
        if self.index is None:
            raise RuntimeError("call setup() first")
        return self.index

    # ---- setup ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        self.evaluation_only = stage in ("test", "predict")
        index = self.layout.build_index()
        if self.split_files and len(index):
            index = apply_split_lists(index, self.split_files)
        if len(index) == 0:
            raise DatasetError(f"{self.layout.root}: no tiles found")
        if self.reference is not None and index.task != self.reference.task:
            raise DatasetError(f"{self.layout.root}: the data is {index.task}, the checkpoint {self.reference.task}")
        first = self.reference_header = self._reference_header(index)
        self.nodata = first.nodata  # the reference tile's; every file tile is read with its own
        self.source_band_count = self.layout.band_count(first.count)
        self.bands = self._resolve_bands()
        index, assignment = self._split(index)
        self.index, self.assignment = index, assignment
        self.tile_size = self._validate_headers(first)
        if self.validate == "full":
            self._validate_pixels()
        self._drop_bad_tiles()
        normalization = self._normalization()
        self._drop_bad_tiles()  # tiles that failed while measuring the statistics
        index, assignment = self.index, self.assignment
        if self.reference is not None:
            index = self.index = align_classes(index, self.reference, self.layout.root)
        self.input_spec = self._contract(normalization)
        augment = build_augmentation(self.augment_transforms, self.num_bands, self.tile_size)
        if augment is not None:  # albumentations ignores the global seed; the loader reseeds per rank
            augment.set_random_seed(augmentation_seed(self.seed, 0))
        if self.device_flips and self.tile_size[0] != self.tile_size[1]:
            raise ValueError(f"data.device_flips needs square tiles, these are {self.tile_size[0]}x{self.tile_size[1]}")
        # batches arrive in the stored dtype; a pack's nodata is filled on the device too (file
        # tiles, each with its own nodata, are filled as they are read)
        self.batch_transform = PackedBatchTransform(self.input_spec)
        if augment is not None and is_device_d4(self.augment_transforms) and self.tile_size[0] == self.tile_size[1]:
            # D4 of whole batches on the device: albumentations' per-tile call costs about
            # 190 us, a fifth of reading a EuroSAT file (benchmarks/README.md)
            augment, self.device_flips = None, True
        for split in SPLITS:
            rows = [i for i, a in enumerate(assignment) if a == split]
            self.datasets[split] = TileDataset(
                self.layout,
                [index.sources[i] for i in rows],
                index.targets[rows],
                self.bands,
                augment if split == "train" else None,
                spec=self.input_spec,  # its fill; nodata: each tile's own
                orders=self.band_orders,
            )
        counts = {s: len(d) for s, d in self.datasets.items()}
        log.info("%d tiles, %d classes, bands %s, splits %s", len(index), index.num_classes, self.bands, counts)
        if self.gathers_in_process and self.num_workers > 0:
            log.info("data.packed: batches are gathered in the main process (one copy each); "
                     "data.num_workers=%d is not used for a pack", self.num_workers)

    def use_contract(self, spec: InputSpec) -> None:
        """Serve the model built on ``spec`` (:func:`deforest.build.build_model` gives it: a
        pretrained network's own normalisation, for one): from now on nodata pixels get its
        fill, in the datasets and on the device, so training scores the inputs that
        ``deforest-eval`` and prediction give the checkpoint."""
        if self.input_spec is None:
            raise RuntimeError("call setup() first")
        self.input_spec = spec
        self.batch_transform = PackedBatchTransform(spec)
        for dataset in self.datasets.values():
            dataset.spec = spec

    def _resolve_bands(self) -> list[int]:
        """The configured bands, or the checkpoint's (which must fit these files)."""
        if self.reference is not None:
            if self.reference.source_band_count != self.source_band_count:
                raise DatasetError(
                    f"{self.layout.root}: the tiles have {self.source_band_count} bands, the checkpoint was "
                    f"trained on {self.reference.source_band_count}-band tiles"
                )
            return list(self.reference.bands)
        try:  # by the names of the dataset's order: the reference tile's own, when it names its bands
            names = self.source_band_names or self.layout.band_names
            return resolve_bands(self.band_selection, names, self.source_band_count)
        except ValueError as err:
            raise DatasetError(
                f"{self.layout.root}: the tiles have {self.source_band_count} bands; data.bands: {err}"
            ) from None

    def _split(self, index: TileIndex) -> tuple[TileIndex, list[str]]:
        """The checkpoint's split lists (evaluation), or a split made from the config."""
        record = self.reference.split if self.reference is not None else None
        if record is not None and not self.resplit:
            index, assignment = restore_split(index, record, self.layout.root)
            self.dropped_at_edges = record.dropped_at_edges
            return index, assignment
        if record is not None:
            log.warning(
                "resplit=true: evaluating on a split made from this config (data.split=%s, seed %d), "
                "not the checkpoint's (%s split %s): tiles the model trained on may be scored",
                self.split, self.seed, record.kind, record.digest,
            )
        groups = spatial_blocks(index, self.block_size) if self.split == "spatial" else None
        assignment = assign_splits(index, self.val_fraction, self.test_fraction, self.seed, groups)
        if self.split == "spatial":
            edge = edge_tiles(index, assignment, self.block_size, self.block_buffer)
            self.dropped_at_edges = int(edge.sum())
            if edge.any():
                log.info(
                    "%d tile(s) left out: they reach into a block of another split (data.block_size=%s, "
                    "data.block_buffer=%s)", self.dropped_at_edges, self.block_size, self.block_buffer,
                )
                index = subset(index, ~edge)
                assignment = [a for a, e in zip(assignment, edge) if not e]
        if self.imbalance:
            keep = imbalance_mask(index, assignment, self.imbalance, self.seed)
            index = subset(index, keep)
            assignment = [a for a, k in zip(assignment, keep) if k]
        return index, assignment

    def _contract(self, normalization: Normalization) -> InputSpec:
        """What a model built on this data expects of its input (see :mod:`deforest.contract`)."""
        index = self._index()
        root = self.layout.root
        lists = {split: [os.path.relpath(s, root) for s, a in zip(index.sources, self.assignment) if a == split]
                 for split in SPLITS}
        counts = self.split_counts()
        if self.reference is not None:  # evaluation: the checkpoint's contract, with these tiles' split
            kept = self.reference.split if self.reference.split is not None and not self.resplit else None
            record = (replace(kept, root=str(root), lists=lists, class_counts=counts) if kept is not None
                      else self._split_record(root, lists, counts))
            return replace(self.reference, split=record)
        return InputSpec(
            task=index.task,
            class_names=list(index.class_names),
            bands=list(self.bands),
            source_band_count=self.source_band_count,
            source_dtype=self.reference_header.dtype,
            nodata=self.nodata,
            normalization=normalization,
            tile_size=list(self.tile_size),
            band_names=self.loaded_band_names,
            split=self._split_record(root, lists, counts),
            value_low=self.value_range[0],
            value_high=self.value_range[1],
            pixel_size=None if self.reference_header.res is None else list(self.reference_header.res),
            pixel_units=self.reference_header.units,
        )

    def _split_record(self, root: os.PathLike | str, lists: dict[str, list[str]], counts: dict) -> SplitRecord:
        """How this config split the tiles, and the resulting lists."""
        if isinstance(self.layout, PackedLayout):  # the layout the pack was made from, by name only
            layout = self.layout.record["layout"]["class"].rsplit(".", 1)[-1]
        else:
            layout = type(self.layout).__name__
        return SplitRecord(
            layout=layout,
            root=str(root),
            kind=self.split,
            seed=self.seed,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            lists=lists,
            block_size=self.block_size,
            buffer=self.block_buffer,
            dropped_at_edges=self.dropped_at_edges,
            class_counts=counts,
        )

    def _reference_header(self, index: TileIndex) -> RasterHeader:
        """What the dataset's tiles are: the commonest band count and size among the first headers."""
        if isinstance(self.layout, PackedLayout):
            return self.layout.header
        wanted = 1 if self.validate == "off" else REFERENCE_SAMPLE
        headers = []
        for source in index.sources:
            try:
                headers.append(read_header(self.layout.header_source(source)))
            except TileError as err:
                self.bad_tiles.add(err, source)
            if len(headers) == wanted:
                break
        if not headers:
            raise DatasetError(f"{self.layout.root}: no tile can be read")
        return reference_header(headers)

    def _drop_bad_tiles(self) -> None:
        """Leave skipped tiles out of the index and the splits, then re-check the splits."""
        index = self._index()
        keep = np.asarray([s not in self.bad_tiles.problems for s in index.sources])
        if not keep.all():
            self.index = subset(index, keep)
            self.assignment = [a for a, k in zip(self.assignment, keep) if k]
            log.warning("%d bad tile(s) skipped (data.on_bad_tile=skip)", len(self.bad_tiles))
        self._check_splits()

    def _check_splits(self) -> None:
        if self.evaluation_only:
            return
        index = self._index()
        assignment = np.asarray(self.assignment)
        for split in ("train", "val"):
            if not (assignment == split).any():
                raise DatasetError(f"{self.layout.root}: the {split} split is empty")
        if index.task == MULTICLASS:
            present = set(index.targets[assignment == "train"].tolist())
            absent = [n for i, n in enumerate(index.class_names) if i not in present]
            if absent:
                raise DatasetError(
                    f"{self.layout.root}: class(es) {absent} have no tile in the training split"
                )

    def _validate_headers(self, first) -> tuple[int, int]:
        """Every tile must have the dataset's band count and size and a supported dtype (``quick``)."""
        size = (first.height, first.width)
        if self.validate == "off" or isinstance(self.layout, PackedLayout):  # packing checked them
            return size
        key = self._cache_key("headers")
        cached = self.cache.load("headers", key, _valid_headers_cache)
        if cached is None:
            bad, orders = {}, {}
            names = self._match_names()
            for source in self._index().sources:
                path = self.layout.header_source(source)
                try:
                    header = read_header(path)
                    check_header(path, header, first)
                    loaded = self._tile_bands(path, header, names)
                except TileError as err:
                    bad[source] = [err.path, err.problem]
                    continue
                if loaded is not None:
                    orders[source] = loaded
            cached = {"tile_size": list(size), "bad": bad, "orders": orders}
            self.cache.store("headers", key, cached)
        self.band_orders = {source: list(bands) for source, bands in cached["orders"].items()}
        if self.band_orders:
            log.info("%d tile(s) store their bands in another order than %s (e.g. %s): read by name",
                     len(self.band_orders), self._match_names(), next(iter(self.band_orders)))
        for source, (path, problem) in cached["bad"].items():
            self.bad_tiles.add(TileError(path, problem), source, more=len(cached["bad"]) - 1)
        return tuple(cached["tile_size"])

    def _match_names(self) -> list[str] | None:
        """The band names each tile's described bands are matched to: the dataset's (every source
        band, in the reference tile's order), or in evaluation the checkpoint's loaded bands.
        ``None``: bands are read by position (no names, or a header file that does not hold the
        whole sample: BigEarthNet's one file per band, a pair's two dates)."""
        first = self.reference_header
        if isinstance(self.layout, PackedLayout) or self.layout.band_count(first.count) != first.count:
            return None
        return self.reference.band_names if self.reference is not None else self.source_band_names

    def _tile_bands(self, path: str, header: RasterHeader, names: list[str] | None) -> list[int] | None:
        """The file bands holding the loaded bands of the tile ``header`` describes, where they
        differ from :attr:`bands` (``None``: read :attr:`bands`); raises TileError for a tile
        that names its bands without one of ``names``."""
        order = band_order(path, header, names)
        if order is None:
            return None
        loaded = order if self.reference is not None else [order[b - 1] for b in self.bands]
        return None if loaded == self.bands else loaded

    def _validate_pixels(self) -> None:
        """Read every pixel once (``validate=full``): unreadable, NaN/inf or all-nodata tiles are
        bad, and so are tiles of one value per band that declare no nodata (:func:`constant_tile`)."""
        index = self._index()
        probe = TileDataset(self.layout, index.sources, index.targets, self.bands, orders=self.band_orders)
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
        _warn_constant([source for source, _ in constant], "of all tiles", refused=True)
        for source, problem in constant:
            self.bad_tiles.add(TileError(source, problem), source, more=len(constant) - 1)

    def _normalization(self) -> Normalization:
        """The checkpoint's normalisation, or per-band statistics of (a seeded sample of) the
        training split's valid pixels: from the pack's per-tile sums, else read once and
        cached as JSON."""
        if self.reference is not None:
            return self.reference.normalization
        transform = "log1p" if self.log_scale else "scale"
        index = self._index()
        rows = sample_rows([i for i, a in enumerate(self.assignment) if a == "train"], self.stats_max_samples, self.seed)
        if isinstance(self.layout, PackedLayout):
            self._packed_nodata_tiles()
            sums = self.layout.band_sums([index.sources[i] for i in rows], self.bands, self.log_scale).sum(axis=0)
            mean, std = moments(*sums)
            self.value_range = self._sampled_range([index.sources[i] for i in rows[:SAMPLE_TILES]])
            return Normalization(mean, std, transform=transform)
        key = self._cache_key("stats")
        cached = self.cache.load("stats", key, lambda value: _valid_stats_cache(value, self.num_bands))
        if cached is None:
            reader = TileDataset(self.layout, [index.sources[i] for i in rows], index.targets[rows], self.bands,
                                 orders=self.band_orders)
            constant = []

            def read_valid(i: int) -> tuple[np.ndarray, np.ndarray | None]:
                image, valid = reader.read_valid(i)
                if constant_tile(image, valid) is not None:
                    constant.append(reader.sources[i])
                return image, valid

            sample = PixelSample(self.num_bands, len(reader))  # the value range, in the same pass
            with pixel_reads():
                mean, std = measure_band_statistics(
                    read_valid, len(reader), self.num_bands, self.log_scale,
                    lambda err, i: self.bad_tiles.add(err, reader.sources[i]), sample.add,
                )
            cached = {"mean": mean, "std": std, "constant": constant}
            cached["low"], cached["high"] = sample.percentiles() or (None, None)
            self.cache.store("stats", key, cached)
        _warn_constant(cached.get("constant", []), "of the training tiles read for the band statistics",
                       refused=False)
        self.value_range = (cached.get("low"), cached.get("high"))
        return Normalization(cached["mean"], cached["std"], transform=transform)

    def _sampled_range(self, sources: list[str]) -> tuple[list[float] | None, list[float] | None]:
        """The value range of a few tiles' pixels (a pack's sums hold no percentiles)."""
        sample = PixelSample(self.num_bands, len(sources))
        reader = TileDataset(self.layout, sources, np.zeros(len(sources), np.int64), self.bands)
        for i in range(len(reader)):
            try:
                sample.add(*reader.read_valid(i))
            except TileError:  # a bad tile is counted where the pack's tiles are checked
                continue
        return sample.percentiles() or (None, None)

    def _packed_nodata_tiles(self) -> None:
        """Packed tiles with no valid pixel in the loaded bands are bad tiles (from the pack's counts)."""
        if self.nodata is None:
            return
        sources = self._index().sources
        counts = self.layout.band_sums(sources, self.bands, self.log_scale)[:, 0].sum(axis=1)
        for row in np.flatnonzero(counts == 0):
            self.bad_tiles.add(TileError(sources[row], "every pixel is nodata"), sources[row])

    def _cache_key(self, kind: str) -> str:
        """What a cached result depends on: the (training) files, bands and settings."""
        rows = [i for i, a in enumerate(self.assignment) if a == "train"] if kind == "stats" else range(len(self._index()))
        files = [f for i in rows for f in self.layout.stamp_files(self._index().sources[i])]
        payload = {
            "bands": self.bands,
            # the names tiles are matched to by their descriptions (each tile's band order)
            "band_names": self._match_names(),
            "log_scale": self.log_scale,
            "max_samples": self.stats_max_samples,
            "seed": self.seed,
            "files": file_fingerprint(files),
        }
        if kind == "stats":  # entries written before they held the value range are not reused
            payload["range"] = list(PERCENTILES)
        return JsonCache.key(kind, payload)

    # ---- loaders ------------------------------------------------------------------------
    def split_counts(self) -> dict[str, dict[str, int]]:
        """Per split, tiles carrying each class."""
        return describe_split_counts(self._index(), self.assignment)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Bad tiles met by the DataLoader workers are raised or counted here, in the main process.

        Under DDP the ranks first share this step's bad tiles (:meth:`BadTiles.shared`), so a
        tile that turns out bad on one rank stops every rank at once with the same error
        (``error``: no rank is left waiting in a collective) or is counted by every rank
        (``skip``: rank 0 writes ``bad_tiles.json``).
        """
        found = [tuple(bad) for bad in batch.pop("bad", [])]
        rank = self._rank()
        every = self.bad_tiles.shared(found, self._host_group()) if self._distributed() else found
        for source, path, problem in every:
            self.bad_tiles.add(TileError(path, problem), source, more=len(every) - 1, rank=rank,
                               quiet=(source, path, problem) not in found)
        return batch

    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized()

    def _rank(self) -> int:
        """This process's DDP rank (0 outside a trainer)."""
        return self.trainer.global_rank if self.trainer is not None else 0

    def _host_group(self):
        """A process group whose collectives run on the host: the default one under gloo, a gloo
        group beside NCCL, so sharing bad tiles never waits for the GPU (the step stays free of
        device-to-host syncs). Created at the first batch, which every rank reaches."""
        if torch.distributed.get_backend() == "gloo":
            return None
        if self._gloo is None:
            self._gloo = torch.distributed.new_group(backend="gloo")
        return self._gloo

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        rank = self._rank()
        if dataset.augment is not None:  # each rank its own draws, the same ones for the same seed
            dataset.augment.set_random_seed(augmentation_seed(self.seed, rank))
        stream = getattr(self.layout, "stream", None)  # a pack in object storage: whole chunks, disjoint per rank
        if stream is not None:
            # gathered in this process too; the chunk requests run on s3fs's event loop
            batches = stream(dataset, self.batch_size, shuffle, self.seed)
            return DataLoader(batches, batch_size=None, pin_memory=self.pin_memory, collate_fn=collate_batches)
        # a pack's batch is one copy from the page cache in this process; a worker would add a
        # second one through shared memory (benchmarks/README.md, packed_vs_memcpy)
        workers = 0 if self.gathers_in_process else self.num_workers
        sampler = None
        if shuffle and self.sampler == "balanced":
            world = self.trainer.world_size if self.trainer is not None else 1
            sampler = BalancedSampler(balanced_weights(dataset.targets, self.task), self.seed, world, rank)
            shuffle = False  # the sampler draws the order
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            # A last training batch of one sample breaks batch norm; drop the remainder.
            drop_last=(shuffle or sampler is not None) and len(dataset) > self.batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=collate_batches,
            worker_init_fn=functools.partial(_seed_worker, rank=rank),
        )

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        if self.device_flips and self.trainer is not None and self.trainer.training:
            batch = {**batch, "image": random_d4(batch["image"], self._flip_generator(batch["image"].device))}
        return batch

    def _flip_generator(self, device: torch.device) -> torch.Generator:
        """The device flips' own generator, seeded per rank: the global one is seeded alike on
        every rank (``seed_everything``), so every rank would flip its batches alike."""
        if self._flips is None or self._flips[0] != device:
            generator = torch.Generator(device=device).manual_seed(augmentation_seed(self.seed, self._rank()))
            self._flips = (device, generator)
        return self._flips[1]

    @property
    def gathers_in_process(self) -> bool:
        """Batches of a pack are gathered whole in the main process (``num_workers`` is for
        files); a local pack with worker-side augmentation is read per tile in the workers."""
        train = self.datasets.get("train")
        return isinstance(self.layout, PackedLayout) and (
            train is None or train.augment is None or getattr(self.layout, "stream", None) is not None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False)


def _valid_stats_cache(value: object, bands: int) -> str | None:
    """What is wrong with a cached statistics entry (None: nothing)."""
    if not isinstance(value, dict) or not {"mean", "std"} <= set(value):
        return "no mean/std entries"
    for key in ("mean", "std"):
        numbers = value[key]
        if not isinstance(numbers, list) or len(numbers) != bands:
            return f"{key} is not a list of {bands} numbers"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in numbers):
            return f"{key} holds a value that is not a finite number"
    if not all(v > 0 for v in value["std"]):
        return "std holds a value <= 0"
    for key in ("low", "high"):  # the value range: None when a band had no valid pixel
        numbers = value.get(key)
        if numbers is not None and not (
            isinstance(numbers, list) and len(numbers) == bands
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in numbers)
        ):
            return f"{key} is not a list of {bands} finite numbers"
    if not isinstance(value.get("constant", []), list) or not all(isinstance(v, str) for v in value.get("constant", [])):
        return "'constant' is not a list of tiles"
    return None


def _valid_headers_cache(value: object) -> str | None:
    """What is wrong with a cached header-check entry (None: nothing)."""
    if not isinstance(value, dict) or not isinstance(value.get("bad"), dict):
        return "no 'bad' table"
    size = value.get("tile_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return "tile_size is not two positive integers"
    if not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in value["bad"].values()):
        return "a 'bad' entry is not [path, problem]"
    orders = value.get("orders")
    if not isinstance(orders, dict) or not all(
        isinstance(v, list) and v and all(isinstance(x, int) and x > 0 for x in v) for v in orders.values()
    ):
        return "'orders' is not a table of band lists"
    return None


def _warn_constant(sources: Sequence[str], read: str, refused: bool) -> None:
    """One warning line for the tiles of one value per band that declare no nodata (every pixel
    0, or constant): they carry no signal, yet would train as real samples."""
    if not sources:
        return
    what = ("they are bad tiles (data.on_bad_tile)" if refused
            else "they train as they are; data.validate=full refuses them")
    log.warning("%d tile(s) %s hold one value in every band (all 0, or constant) and declare no nodata, the "
                "first %s: %s; declare their nodata or remove them", len(sources), read, sources[0], what)


def augmentation_seed(seed: int, rank: int, worker: int | None = None) -> int:
    """The seed of one DDP rank's augmentation draws (``worker``: of one of its DataLoader
    workers; ``None``: its main process).

    The one place augmentation seeds come from: every rank and worker draws its own sequence
    (a seed without the rank gives every rank the same flips of different tiles), and the same
    ``(seed, rank, worker)`` draws the same sequence again.
    """
    entropy = [seed % 2**64, rank, 0 if worker is None else worker + 1]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _seed_worker(worker_id: int, rank: int = 0) -> None:
    """Lightning's worker seeding, plus the worker's augmentation seed: from the worker's torch
    seed (new each epoch, derived from the run's seed), its rank and its id."""
    pl_worker_init_function(worker_id, rank)
    info = torch.utils.data.get_worker_info()
    if info.dataset.augment is not None:
        info.dataset.augment.set_random_seed(augmentation_seed(info.seed, rank, worker_id))
