"""The Lightning datamodule: prepared data served as datasets and DataLoaders.

:meth:`TileDataModule.setup` runs :func:`deforest.data.prepare.prepare` on the store the
settings name (tile files, a local pack or a pack in object storage), then makes one dataset
per split; the batch hooks raise or count the bad tiles the loaders met, convert and fill
batches on the device and flip them there. For evaluation it takes a checkpoint's
:class:`~deforest.core.contract.InputSpec`: the same bands, fill, normalisation and split.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from deforest.core.contract import InputSpec
from deforest.core.errors import DatasetError, TileError
from deforest.core.vocabulary import MULTILABEL, SPLITS
from deforest.data.batch_transforms import FillBatch, collate_batches, is_device_d4
from deforest.data.checks import BadTiles
from deforest.data.dataset import TileDataset
from deforest.data.layouts import TileLayout
from deforest.data.prepare import PreparedData, prepare
from deforest.data.sampling import BalancedSampler, augmentation_seed, balanced_weights, seed_worker
from deforest.data.settings import DataSettings
from deforest.data.stores.base import TileStore
from deforest.data.stores.opening import open_store
from deforest.data.transforms import build_augmentation, random_d4

if TYPE_CHECKING:
    # annotations only: deforest.data.transforms imports it where a pipeline is built (trainer=gpu has
    # none, and the bare GPU machines of scripts/gpu-check.sh have no albumentations)
    import albumentations as A

log = logging.getLogger(__name__)


class TileDataModule(pl.LightningDataModule):
    """Splits a dataset into train/val/test and serves DataLoaders.

    Args:
        layout: where and how tile files are stored (``folder``, ``manifest``, ``bigearthnet``),
            or a :class:`~deforest.data.stores.base.TileStore`; ``None`` with ``data.packed``.
        settings: the ``data`` settings (:class:`~deforest.data.settings.DataSettings`;
            :meth:`from_keys` takes the config's flat keys).
        augment: albumentations transforms for training (instantiated by Hydra).
    """

    def __init__(self, layout: TileLayout | TileStore | None, settings: DataSettings | None = None,
                 augment: Sequence[A.BasicTransform] | None = None) -> None:
        super().__init__()
        self.settings = settings = settings or DataSettings()
        self.bad_tiles = BadTiles(settings.prepare.checks.on_bad_tile)
        self.store = layout if isinstance(layout, TileStore) else open_store(layout, settings.store)
        self.loaders = settings.loader
        if self.loaders.sampler == "balanced" and self.store.streams:
            raise DatasetError(f"{settings.store.packed}: data.sampler=balanced draws tiles one by one and a pack in "
                               f"object storage streams whole chunks: copy the pack to a local folder, or set "
                               f"data.sampler=null")
        self.augment_transforms = list(augment or [])
        self.seed = settings.prepare.seed
        self.test_split = self.loaders.test_split
        #: random flips/rotations of training batches on the device (also set for a D4 ``augment``)
        self.device_flips = self.loaders.device_flips
        #: the data as :meth:`setup` prepared it
        self.prepared: PreparedData | None = None
        #: the contract the model is built from (after :meth:`setup`; :meth:`use_contract` replaces it)
        self.input_spec: InputSpec | None = None
        self.batch_transform: FillBatch | None = None
        self.datasets: dict[str, TileDataset] = {}
        self._gloo = None  # see _host_group
        self._flips: tuple[torch.device, torch.Generator] | None = None  # see _flip_generator

    @classmethod
    def from_keys(cls, layout: TileLayout | TileStore | None, augment: Sequence[A.BasicTransform] | None = None,
                  **keys: Any) -> TileDataModule:
        """The datamodule from the flat ``data.*`` keys (``batch_size``, ``split``, ``packed``, ...,
        as ``conf/data/base.yaml`` documents them) and ``input_spec``, ``resplit``, ``test_split``."""
        return cls(layout, DataSettings.from_keys(**keys), augment)

    # ---- what the model needs to know -------------------------------------------------
    def _prepared(self) -> PreparedData:
        if self.prepared is None:
            raise RuntimeError("call setup() first")
        return self.prepared

    @property
    def layout(self) -> TileLayout:
        """Reads the samples: the files' layout, or the pack."""
        return self.store.layout

    @property
    def batch_size(self) -> int:
        return self.loaders.batch_size

    @property
    def index(self):
        return self._prepared().index

    @property
    def assignment(self) -> list[str]:
        return self._prepared().assignment

    @property
    def task(self) -> str:
        return self._prepared().index.task

    @property
    def class_names(self) -> list[str]:
        return self._prepared().index.class_names

    @property
    def bands(self) -> list[int]:
        return self._prepared().bands

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    @property
    def tile_size(self) -> tuple[int, int]:
        return self._prepared().tile_size

    @property
    def nodata(self) -> float | None:
        return self._prepared().nodata

    @property
    def reference_header(self):
        return self._prepared().reference_header

    @property
    def source_band_count(self) -> int:
        return self._prepared().source_band_count

    @property
    def source_band_names(self) -> list[str] | None:
        return self._prepared().source_band_names

    @property
    def loaded_band_names(self) -> list[str] | None:
        return self._prepared().loaded_band_names

    @property
    def band_orders(self) -> dict[str, list[int]]:
        return self._prepared().band_orders

    @property
    def dropped_at_edges(self) -> int:
        return self._prepared().dropped_at_edges

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Per split, tiles carrying each class."""
        return self._prepared().split_counts()

    # ---- setup ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.prepared is not None:
            return
        prepared = self.prepared = prepare(self.store, self.settings.prepare, stage in ("test", "predict"),
                                           self.bad_tiles)
        self.input_spec = prepared.input_spec
        tile_size = prepared.tile_size
        augment = build_augmentation(self.augment_transforms, len(prepared.bands), tile_size)
        if augment is not None:  # albumentations ignores the global seed; the loader reseeds per rank
            augment.set_random_seed(augmentation_seed(self.seed, 0))
        if self.device_flips and tile_size[0] != tile_size[1]:
            raise ValueError(f"data.device_flips needs square tiles, these are {tile_size[0]}x{tile_size[1]}")
        # batches arrive in the stored dtype; a pack's nodata is filled on the device too (file
        # tiles, each with its own nodata, are filled as they are read)
        self.batch_transform = FillBatch(self.input_spec)
        if augment is not None and is_device_d4(self.augment_transforms) and tile_size[0] == tile_size[1]:
            # D4 of whole batches on the device: albumentations' per-tile call costs about
            # 190 us, a fifth of reading a EuroSAT file (benchmarks/README.md)
            augment, self.device_flips = None, True
        index = prepared.index
        for split in SPLITS:
            rows = prepared.rows(split)
            self.datasets[split] = self.store.dataset(
                [index.sources[i] for i in rows],
                index.targets[rows],
                prepared.bands,
                augment if split == "train" else None,
                spec=self.input_spec,  # its fill; nodata: each tile's own
                orders=prepared.band_orders,
            )
        counts = {s: len(d) for s, d in self.datasets.items()}
        log.info("%d tiles, %d classes, bands %s, splits %s", len(index), index.num_classes, prepared.bands, counts)
        if self.gathers_in_process and self.loaders.num_workers > 0:
            log.info("data.packed: batches are gathered in the main process (one copy each); "
                     "data.num_workers=%d is not used for a pack", self.loaders.num_workers)

    def use_contract(self, spec: InputSpec) -> None:
        """Serve the model built on ``spec`` (:func:`deforest.runs.build.build_model` gives it: a
        pretrained network's own normalisation, for one): from now on nodata pixels get its
        fill, in the datasets and on the device, so training scores the inputs that
        ``deforest-eval`` and prediction give the checkpoint."""
        if self.input_spec is None:
            raise RuntimeError("call setup() first")
        self.input_spec = spec
        self.batch_transform = FillBatch(spec)
        for dataset in self.datasets.values():
            dataset.spec = spec

    # ---- loaders ------------------------------------------------------------------------
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

    @property
    def sampler(self) -> str:
        """The training draw ``data.sampler`` resolves to: ``auto`` is ``balanced`` for multi-label data
        (rare labels lose least to the frequent ones: docs/imbalance.md), ``shuffle`` for multi-class data
        and for a pack in object storage, which streams whole chunks instead of single tiles."""
        chosen = self.loaders.sampler or "shuffle"
        if chosen == "auto":
            return "balanced" if self.task == MULTILABEL and not self.store.streams else "shuffle"
        return chosen

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset, loaders = self.datasets[split], self.loaders
        rank = self._rank()
        if dataset.augment is not None:  # each rank its own draws, the same ones for the same seed
            dataset.augment.set_random_seed(augmentation_seed(self.seed, rank))
        stream = self.store.stream(dataset, loaders.batch_size, shuffle, self.seed)
        if stream is not None:  # a pack in object storage: whole chunks, disjoint per rank
            # gathered in this process too; the chunk requests run on s3fs's event loop
            return DataLoader(stream, batch_size=None, pin_memory=loaders.pin_memory, collate_fn=collate_batches)
        workers = 0 if self.gathers_in_process else loaders.num_workers
        sampler = None
        if shuffle and self.sampler == "balanced":
            world = self.trainer.world_size if self.trainer is not None else 1
            sampler = BalancedSampler(balanced_weights(dataset.targets, self.task), self.seed, world, rank)
            shuffle = False  # the sampler draws the order
        return DataLoader(
            dataset,
            batch_size=loaders.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            # A last training batch of one sample breaks batch norm; drop the remainder.
            drop_last=(shuffle or sampler is not None) and len(dataset) > loaders.batch_size,
            num_workers=workers,
            pin_memory=loaders.pin_memory,
            persistent_workers=loaders.persistent_workers and workers > 0,
            collate_fn=collate_batches,
            worker_init_fn=functools.partial(seed_worker, rank=rank),
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
        """Batches are gathered whole in the main process (``num_workers`` is for files): a pack's,
        unless a local pack's tiles are augmented in the workers."""
        train = self.datasets.get("train")
        return self.store.gathers_in_process(train is not None and train.augment is not None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False)
