"""Tiles to batches: layouts and stores, preparation (split, checks, statistics), datasets,
sampling and the Lightning datamodule.

Public names import from the package (``from deforest.data import TileDataModule``) and resolve on first
use (:mod:`deforest.core.lazy`), so importing one light module does not load torch.
"""

from deforest.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "datamodule": ("TileDataModule",),
    "dataset": ("TileDataset",),
    "prepare": ("PreparedData",),
    "settings": ("DataSettings", "StoreSettings", "PrepareSettings", "SplitSettings", "CheckSettings", "LoaderSettings"),
    "sampling": ("BalancedSampler", "balanced_weights", "augmentation_seed"),
    "batch_transforms": ("FillBatch", "collate_batches", "collate_tiles"),
    "batch_buffers": ("BatchBuffers",),
    "statistics": ("JsonCache",),
})
