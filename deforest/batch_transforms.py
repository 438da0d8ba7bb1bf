"""Work on whole packed batches: collation, dtype conversion and nodata fill on the device.

A pack serves a batch in one gather, in the stored dtype (uint16 for Sentinel-2: half the
bytes of float32 through the worker queue, pinned memory and the host-to-device copy).
:class:`PackedBatchTransform` then turns it into the float32 values the file reader gives,
on whatever device the batch reached (the GPU in training, the CPU otherwise), with the
same values as :func:`deforest.validation.fill_nodata`; D4 augmentation of such batches is
:func:`deforest.transforms.random_d4`, also on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import torch
from torch import Tensor

from deforest.validation import collate_tiles


def collate_batches(items: list[dict] | dict) -> dict:
    """A batch gathered whole by the dataset passes as it is; items are collated."""
    return items if isinstance(items, dict) else collate_tiles(items)


def is_device_d4(transforms: Sequence[A.BasicTransform]) -> bool:
    """The augmentation is exactly a uniform random D4 element (``SquareSymmetry(p=1)``),
    which :func:`deforest.transforms.random_d4` draws from the same distribution on the device."""
    return len(transforms) == 1 and type(transforms[0]) is A.SquareSymmetry and transforms[0].p == 1.0


class PackedBatchTransform:
    """Stored-dtype pixels to float32, nodata pixels set to their band's ``fill`` value
    (``nodata=None`` for file batches, which are filled as they are read).

    Free of host synchronisation: a comparison and a ``torch.where`` on the batch's device.
    Float batches (per-tile reads, already converted in the workers) pass unchanged.
    """

    def __init__(self, nodata: float | None, fill: Sequence[float]) -> None:
        self.nodata = nodata
        self.fill = torch.as_tensor(list(fill), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, batch: dict) -> dict:
        image: Tensor = batch["image"]
        if image.is_floating_point() or image.numel() == 0:
            return batch
        x = image.to(torch.float32)
        if self.nodata is not None:
            fill = self.fill.to(x.device, non_blocking=True)
            x = torch.where(x == self.nodata, fill, x)
        return {**batch, "image": x}
