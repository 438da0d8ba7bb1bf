"""Work on whole batches: collation, dtype conversion and nodata fill on the device.

A pack serves a batch in one gather, in the stored dtype (uint16 for Sentinel-2: half the
bytes of float32 through the worker queue, pinned memory and the host-to-device copy).
:class:`FillBatch` then turns it into the float32 values the file reader gives,
on whatever device the batch reached (the GPU in training, the CPU otherwise), with the
same values as :func:`deforest.core.nodata.fill_nodata`, whatever the stored dtype (a pack of
int32, float32 or float64 sources stores float32 and its nodata pixels still hold -9999 or
NaN); D4 augmentation of such batches is :func:`deforest.data.transforms.random_d4`, also on the
device.

A batch still in its stored form says so: it carries the pack's ``nodata`` (``None``: the pack
declares none). Batches without that key were filled as they were read (file tiles, each with
its own nodata, and tiles augmented in the workers).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deforest.core.contract import InputSpec
from deforest.core.nodata import is_nodata

if TYPE_CHECKING:
    # annotations only: the bare GPU machines of scripts/gpu-check.sh have no albumentations
    import albumentations as A


def collate_tiles(items: list[dict]) -> dict:
    """Batch the good items; bad ones ride along as ``batch["bad"] = [(path, problem)]``."""
    from torch.utils.data import default_collate

    bad = [item["bad"] for item in items if "bad" in item]
    good = [item for item in items if "bad" not in item]
    if good:
        batch = default_collate(good)
    else:
        batch = {"image": torch.empty(0), "target": torch.empty(0, dtype=torch.long), "index": torch.empty(0, dtype=torch.long)}
    batch["bad"] = bad
    return batch


def collate_batches(items: list[dict] | dict) -> dict:
    """A batch gathered whole by the dataset passes as it is; items are collated."""
    return items if isinstance(items, dict) else collate_tiles(items)


def is_device_d4(transforms: Sequence[A.BasicTransform]) -> bool:
    """The augmentation is exactly a uniform random D4 element (``SquareSymmetry(p=1)``),
    which :func:`deforest.data.transforms.random_d4` draws from the same distribution on the device."""
    # a transform of albumentations exists only once it was imported: importing it here would make
    # it a dependency of every training run, also of trainer=gpu's, which has no pipeline
    albumentations = sys.modules.get("albumentations")
    return (albumentations is not None and len(transforms) == 1
            and type(transforms[0]) is albumentations.SquareSymmetry and transforms[0].p == 1.0)


class FillBatch:
    """The batch the model sees, on the batch's device: stored-dtype pixels (a pack's gather,
    tile files read in their dtype) to float32; in a batch that carries its ``nodata`` (a pack's, in the
    stored form), the pixels holding it get their band's fill from ``spec``, the contract the
    model is built with (read at each batch: a contract given later is used from then on).

    Free of host synchronisation: comparisons and a ``torch.where`` on the batch's device.
    """

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        image: Tensor = batch["image"]
        nodata = batch.get("nodata")
        if "nodata" in batch:
            batch = {k: v for k, v in batch.items() if k != "nodata"}  # the model sees what file batches hold
        if image.numel() == 0 or (image.dtype == torch.float32 and nodata is None):
            return batch
        x = image.to(torch.float32)
        if nodata is not None:
            fill = torch.as_tensor(self.spec.fill, dtype=torch.float32).view(1, -1, 1, 1).to(x.device, non_blocking=True)
            x = torch.where(is_nodata(x, nodata), fill, x)
        return {**batch, "image": x}
