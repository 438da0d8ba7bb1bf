"""The Lightning datamodule: index, split, validate, measure band statistics, load.

Everything that can fail on bad input fails in :meth:`TileDataModule.setup`, in the main
process and before the first training step, with the file named.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import albumentations as A
import lightning.pytorch as pl
from lightning.fabric.utilities.seed import pl_worker_init_function
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deforest.datasets import MULTICLASS, SPLITS, DatasetError, TileIndex, TileLayout, describe_split_counts
from deforest.io import RasterHeader, TileError, file_fingerprint, read_header, resolve_bands
from deforest.pack import PackedLayout
from deforest.safety import atomic_write_text
from deforest.splits import assign_splits, spatial_blocks
from deforest.transforms import build_augmentation, random_d4
from deforest.validation import (
    BadTiles,
    check_header,
    check_pixels,
    collate_tiles,
    fill_nodata,
    nodata_fill,
    reference_header,
    valid_pixels,
)

log = logging.getLogger(__name__)

# 3: per-tile nodata, dtype and pixel-size header checks
STATS_VERSION = 3
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
        fill: Sequence[float] | None = None,
    ) -> None:
        self.layout = layout
        self.sources = list(sources)
        self.targets = targets
        self.bands = list(bands)
        self.augment = augment
        self.nodata = nodata
        self.fill = fill

    def __len__(self) -> int:
        return len(self.sources)

    def read_valid(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Float32 ``[C, H, W]`` and its valid-pixel mask; NaN/inf or all-nodata raise TileError.

        The mask follows the tile's own nodata (its header or ``.aux.xml``), unless this
        dataset was given one ``nodata`` value for every tile.
        """
        if self.nodata is None:
            image, nodata = self.layout.read_with_nodata(self.sources[i], self.bands)
        else:
            image, nodata = self.layout.read(self.sources[i], self.bands), self.nodata
        valid = valid_pixels(image, nodata)
        check_pixels(self.sources[i], image, valid)
        return image, valid

    def read(self, i: int) -> np.ndarray:
        """The tile's selected bands, nodata pixels filled with ``fill`` when given."""
        image, valid = self.read_valid(i)
        return image if self.fill is None else fill_nodata(image, valid, self.fill)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        try:
            image = self.read(i)
        except TileError as err:  # raised or counted in the main process, not in a worker
            return {"bad": (self.sources[i], err.path, err.problem), "index": i}
        if self.augment is not None:
            image = self.augment(image=image.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
        target = torch.as_tensor(self.targets[i])
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "target": target, "index": i}


class TileDataModule(pl.LightningDataModule):
    """Splits a tile layout into train/val/test and serves DataLoaders.

    Args:
        layout: where and how tiles are stored (``folder``, ``manifest``, ``bigearthnet``).
        bands: band names or 1-based indexes to read; ``None`` reads all.
        batch_size, num_workers, pin_memory, persistent_workers: DataLoader settings.
        val_fraction, test_fraction: shares for samples without a given split.
        split, block_size: ``random``, or ``spatial``: whole squares of ``block_size`` (tile
            CRS units) go to one split, from the bounds columns ``deforest-tile`` writes.
        seed: seeds the split and the statistics sample.
        augment: albumentations transforms for training (instantiated by Hydra).
        log_scale: normalise ``log1p`` of the values (stored with the statistics).
        cache_dir: where band statistics are cached, keyed by the training file list.
        stats_max_samples: at most this many training tiles (seeded sample) for statistics.
        imbalance: ``{class name: kept fraction}`` (``"*"`` for the rest) to subsample the
            training split into an imbalanced one, for imbalance experiments.
        validate: ``quick`` reads every header, ``full`` also every pixel, ``off`` trusts.
        on_bad_tile: ``error`` stops on a bad tile naming it; ``skip`` leaves it out, logged
            and counted in :attr:`bad_tiles` (see :mod:`deforest.validation`).
        packed: a pack of ``layout`` written by ``deforest-pack``: tiles are read from it
            (same samples, splits and augmentation); a stale pack is an error.
        device_flips: random flips/rotations of each training batch after it reached the
            device (GPU), instead of augmenting in the DataLoader workers (then ``augment=[]``).
    """

    def __init__(
        self,
        layout: TileLayout,
        bands: Sequence[int | str] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split: str = "random",
        block_size: float | None = None,
        seed: int = 42,
        augment: Sequence[A.BasicTransform] | None = None,
        log_scale: bool = True,
        cache_dir: str | None = None,
        stats_max_samples: int = 5000,
        imbalance: Mapping[str, float] | None = None,
        validate: str = "quick",
        on_bad_tile: str = "error",
        packed: str | None = None,
        device_flips: bool = False,
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
        self.layout = PackedLayout(packed, layout) if packed else layout
        self.band_selection = None if bands is None else list(bands)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        if split not in ("random", "spatial"):
            raise ValueError(f"data.split must be random or spatial, not {split!r}")
        self.split, self.block_size = split, block_size
        self.seed = seed
        self.augment_transforms = list(augment or [])
        self.log_scale = log_scale
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.stats_max_samples = stats_max_samples
        self.imbalance = dict(imbalance) if imbalance else None
        self.validate = validate
        self.device_flips = device_flips
        self.index: TileIndex | None = None
        self.assignment: list[str] = []
        self.datasets: dict[str, TileDataset] = {}
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
    def loaded_band_names(self) -> list[str] | None:
        """Names of the loaded bands, in order; ``None`` when the data config's band names
        do not describe these files (no names, or a different band count)."""
        names = self.layout.band_names
        if not names or len(names) != self.source_band_count:
            return None
        return [names[b - 1] for b in self.bands]

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
        if len(index) == 0:
            raise DatasetError(f"{self.layout.root}: no tiles found")
        first = self._reference_header(index)
        self.nodata = first.nodata  # the reference tile's; every tile is read with its own
        self.source_band_count = self.layout.band_count(first.count)
        try:
            self.bands = resolve_bands(self.band_selection, self.layout.band_names, self.source_band_count)
        except ValueError as err:
            raise DatasetError(
                f"{self.layout.root}: the tiles have {self.source_band_count} bands; data.bands: {err}"
            ) from None
        groups = spatial_blocks(index, self.block_size) if self.split == "spatial" else None
        assignment = assign_splits(index, self.val_fraction, self.test_fraction, self.seed, groups)
        if self.imbalance:
            keep = self._imbalance_mask(index, assignment)
            index = _subset(index, keep)
            assignment = [a for a, k in zip(assignment, keep) if k]
        self.index, self.assignment = index, assignment
        self.tile_size = self._validate_headers(first)
        if self.validate == "full":
            self._validate_pixels()
        self._drop_bad_tiles()
        self.band_mean, self.band_std = self._band_statistics()
        self._drop_bad_tiles()  # tiles that failed while measuring the statistics
        index, assignment = self.index, self.assignment
        # nodata pixels get the raw value that normalises to 0 (see deforest.validation)
        fill = nodata_fill(self.band_mean, self.log_scale)
        augment = build_augmentation(self.augment_transforms, self.num_bands, self.tile_size)
        if augment is not None:
            augment.set_random_seed(self.seed)  # albumentations ignores the global seed
        if self.device_flips and self.tile_size[0] != self.tile_size[1]:
            raise ValueError(f"data.device_flips needs square tiles, these are {self.tile_size[0]}x{self.tile_size[1]}")
        for split in SPLITS:
            rows = [i for i, a in enumerate(assignment) if a == split]
            self.datasets[split] = TileDataset(
                self.layout,
                [index.sources[i] for i in rows],
                index.targets[rows],
                self.bands,
                augment if split == "train" else None,
                fill=fill,  # nodata: each tile's own
            )
        counts = {s: len(d) for s, d in self.datasets.items()}
        log.info("%d tiles, %d classes, bands %s, splits %s", len(index), index.num_classes, self.bands, counts)

    def _reference_header(self, index: TileIndex) -> RasterHeader:
        """What the dataset's tiles are: the commonest band count and size among the first headers."""
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
            self.index = _subset(index, keep)
            self.assignment = [a for a, k in zip(self.assignment, keep) if k]
            log.warning("%d bad tile(s) skipped (data.on_bad_tile=skip)", len(self.bad_tiles))
        self._check_splits()

    def _imbalance_mask(self, index: TileIndex, assignment: list[str]) -> np.ndarray:
        """Keep each training sample with the fraction of its (rarest kept) class."""
        fractions = np.asarray(
            [self.imbalance.get(name, self.imbalance.get("*", 1.0)) for name in index.class_names]
        )
        unknown = set(self.imbalance) - set(index.class_names) - {"*"}
        if unknown:
            raise ValueError(f"data.imbalance names unknown classes {sorted(unknown)}")
        one_hot = index.one_hot().astype(bool)
        per_sample = np.where(one_hot, fractions[None, :], np.inf).min(axis=1)
        per_sample[np.isinf(per_sample)] = fractions.min()
        rng = np.random.default_rng(self.seed)
        draw = rng.random(len(index))
        is_train = np.asarray(assignment) == "train"
        return ~is_train | (draw < per_sample)

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
        cached = self._cache_load("headers", _valid_headers_cache)
        if cached is None:
            bad = {}
            for source in self._index().sources:
                path = self.layout.header_source(source)
                try:
                    check_header(path, read_header(path), first)
                except TileError as err:
                    bad[source] = [err.path, err.problem]
            cached = {"tile_size": list(size), "bad": bad}
            self._cache_store("headers", cached)
        for source, (path, problem) in cached["bad"].items():
            self.bad_tiles.add(TileError(path, problem), source, more=len(cached["bad"]) - 1)
        return tuple(cached["tile_size"])

    def _validate_pixels(self) -> None:
        """Read every pixel once (``validate=full``): unreadable, NaN/inf or all-nodata tiles are bad."""
        index = self._index()
        probe = TileDataset(self.layout, index.sources, index.targets, self.bands)
        for i, source in enumerate(probe.sources):
            if source not in self.bad_tiles.problems:
                try:
                    probe.read_valid(i)
                except TileError as err:
                    self.bad_tiles.add(err, source)

    def _band_statistics(self) -> tuple[list[float], list[float]]:
        """Per-band mean/std of the valid pixels of (a seeded sample of) the training split, cached as JSON."""
        cached = self._cache_load("stats", lambda value: _valid_stats_cache(value, self.num_bands))
        if cached is not None:
            return cached["mean"], cached["std"]
        rows = [i for i, a in enumerate(self.assignment) if a == "train"]
        if not rows and self.evaluation_only:
            # identity statistics: evaluation normalises with the checkpoint's own
            return [0.0] * self.num_bands, [1.0] * self.num_bands
        rng = np.random.default_rng(self.seed)
        if len(rows) > self.stats_max_samples:
            rows = sorted(rng.choice(rows, self.stats_max_samples, replace=False).tolist())
        index = self._index()
        reader = TileDataset(self.layout, [index.sources[i] for i in rows], index.targets[rows], self.bands)
        total = np.zeros(self.num_bands)
        total_sq = np.zeros(self.num_bands)
        n = np.zeros(self.num_bands)
        for i in range(len(reader)):
            try:
                image, valid = reader.read_valid(i)
            except TileError as err:
                self.bad_tiles.add(err, reader.sources[i])
                continue
            image = image.astype(np.float64)
            if self.log_scale:
                image = np.log1p(np.clip(image, 0, None))
            if valid is not None:
                image = np.where(valid, image, 0.0)
            total += image.sum(axis=(1, 2))
            total_sq += (image**2).sum(axis=(1, 2))
            n += valid.sum(axis=(1, 2)) if valid is not None else image.shape[1] * image.shape[2]
        n = np.maximum(n, 1)
        mean = total / n
        std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)  # constant bands: centre, do not blow up
        stats = {"mean": mean.tolist(), "std": std.tolist()}
        self._cache_store("stats", stats)
        return stats["mean"], stats["std"]

    # ---- cache keyed by what the result depends on ------------------------------------
    def _cache_key(self, kind: str) -> str:
        rows = [i for i, a in enumerate(self.assignment) if a == "train"] if kind == "stats" else range(len(self._index()))
        sources = [self._index().sources[i] for i in rows]
        files = [self.layout.header_source(s) for s in sources]
        payload = {
            "version": STATS_VERSION,
            "kind": kind,
            "bands": self.bands,
            "log_scale": self.log_scale,
            "max_samples": self.stats_max_samples,
            "seed": self.seed,
            "files": file_fingerprint(files),
        }
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]

    def _cache_load(self, kind: str, check: Callable[[object], str | None]) -> dict | None:
        """The cached value, or None to recompute: when there is none, and (with a warning naming
        the file) when it is unreadable or ``check`` finds it malformed (then it is rewritten)."""
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{kind}-{self._cache_key(kind)}.json"
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            problem = check(value)
        except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
            problem = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if problem is None:
            return value
        log.warning("%s cache %s is corrupt (%s): recomputing it", kind, path, problem)
        return None

    def _cache_store(self, kind: str, value: dict) -> None:
        """Write through a unique temporary file: DDP ranks and parallel jobs computing the same
        entry at once never interleave their writes (the last complete one wins)."""
        if self.cache_dir is None:
            return
        atomic_write_text(self.cache_dir / f"{kind}-{self._cache_key(kind)}.json", json.dumps(value))

    # ---- loaders ------------------------------------------------------------------------
    def split_counts(self) -> dict[str, dict[str, int]]:
        """Per split, tiles carrying each class."""
        return describe_split_counts(self._index(), self.assignment)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Bad tiles met by the DataLoader workers are raised or counted here, in the main process."""
        for source, path, problem in batch.pop("bad", []):
            self.bad_tiles.add(TileError(path, problem), source)
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # A last training batch of one sample breaks batch norm; drop the remainder.
            drop_last=shuffle and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_tiles,
            worker_init_fn=_seed_worker,
        )

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.device_flips and self.trainer is not None and self.trainer.training:
            batch = {**batch, "image": random_d4(batch["image"])}
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


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
    return None


def _seed_worker(worker_id: int) -> None:
    """Lightning's worker seeding, plus a per-worker augmentation seed drawn from the run's seed."""
    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    if info.dataset.augment is not None:
        info.dataset.augment.set_random_seed(info.seed % 2**32)


def _subset(index: TileIndex, keep: np.ndarray) -> TileIndex:
    rows = np.flatnonzero(keep)
    return TileIndex(
        index.task,
        index.class_names,
        [index.sources[i] for i in rows],
        index.targets[rows],
        [index.splits[i] for i in rows],
        {k: [v[i] for i in rows] for k, v in index.meta.items()},
    )
