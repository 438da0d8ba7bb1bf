"""Augmentation and per-band normalisation.

Augmentation runs in albumentations on ``[H, W, C]`` arrays in the DataLoader workers;
normalisation runs in torch on the device (:class:`BandNormalizer`), so its statistics
live in the model's state dict and every checkpoint carries them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    # imported where a pipeline is built: trainer=gpu augments on the device (random_d4) and
    # the bare GPU machines of scripts/gpu-check.sh have no albumentations
    import albumentations as A


class AugmentationError(ValueError):
    """An augmentation config that cannot run on this dataset's tiles."""


def build_augmentation(
    transforms: Sequence[A.BasicTransform] | None, num_bands: int, tile_size: tuple[int, int]
) -> A.Compose | None:
    """Compose ``transforms`` and prove they run on a tile of this band count and size.

    Several albumentations transforms accept only 1 or 3 channels and fail deep inside a
    DataLoader worker otherwise; running the pipeline once up front turns that into a clear
    error naming the transform.
    """
    if not transforms:
        return None
    import albumentations as A  # only for a pipeline (see the module's imports)

    probe = np.random.default_rng(0).random((*tile_size, num_bands), dtype=np.float32)
    for transform in transforms:
        try:
            out = A.Compose([_always(transform)])(image=probe)["image"]
        except Exception as err:  # albumentations raises many types; all mean "unusable here"
            raise AugmentationError(
                f"augmentation {type(transform).__name__} cannot run on {num_bands}-band "
                f"{tile_size[0]}x{tile_size[1]} tiles: {err}"
            ) from None
        if out.shape[-1] != num_bands:
            raise AugmentationError(
                f"augmentation {type(transform).__name__} turned {num_bands} bands into {out.shape[-1]}"
            )
    return A.Compose(list(transforms))


def _always(transform: A.BasicTransform) -> A.BasicTransform:
    """A copy of ``transform`` that always fires, so the probe exercises it."""
    clone = copy.deepcopy(transform)
    clone.p = 1.0
    return clone


class BandNormalizer(nn.Module):
    """``(f(x) - mean) / std`` per band, with ``f = log1p`` when ``log_scale``, else ``x / scale``.

    Reflectance spans orders of magnitude between water and bright soil; ``log1p``
    compresses that range before standardising. ``scale`` serves statistics given on
    scaled values (e.g. reflectance / 10000 for pretrained weights).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], log_scale: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"normalisation has {len(mean)} means but {len(std)} stds")
        self.log_scale = log_scale
        self.scale = float(scale)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_bands(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.num_bands:
            raise ValueError(
                f"normalisation statistics are for {self.num_bands} bands, the batch has {x.shape[1]}"
            )
        if self.log_scale:
            x = torch.log1p(x.clamp(min=0))
        elif self.scale != 1.0:
            x = x / self.scale
        return (x - self.mean) / self.std


def d4_views(x: Tensor) -> list[Tensor]:
    """The eight flips and rotations of a batch (test-time augmentation for overhead images)."""
    rotations = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [r.flip(-1) for r in rotations]


def random_d4(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each square tile of a batch under its own random flip/rotation, on the batch's device.

    A random transpose, horizontal and vertical flip compose to the eight D4 elements with
    equal probability; ``torch.where`` keeps it free of host syncs (no boolean indexing).
    A batch without tiles (all of them skipped bad tiles: an image of shape ``[0]``) passes as it is.
    """
    if x.shape[0] == 0:
        return x
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"device flips need square tiles, got {x.shape[-2]}x{x.shape[-1]}")
    bits = torch.randint(0, 2, (3, x.shape[0], 1, 1, 1), device=x.device, generator=generator, dtype=torch.bool)
    x = torch.where(bits[0], x.transpose(-1, -2), x)
    x = torch.where(bits[1], x.flip(-1), x)
    return torch.where(bits[2], x.flip(-2), x)
