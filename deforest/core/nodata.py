"""Nodata: which pixels hold no measurement, and what they become before a network sees them.

One rule for tiles read from files, batches from a pack (on any device) and scenes being mapped,
so the contract (``deforest.core.contract``) applies it the same way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def valid_pixels(image: np.ndarray, nodata: float | Sequence[float | None] | None) -> np.ndarray | None:
    """Per-pixel validity ``[C, H, W]`` (``None`` when the tile declares no nodata).

    ``nodata`` is one value for every band, or one per band (``None``: that band has none),
    as each tile's own header (or ``.aux.xml`` sidecar) declares it.
    """
    if nodata is None:
        return None
    values = list(nodata) if isinstance(nodata, (list, tuple)) else [nodata] * image.shape[0]
    if all(v is None for v in values):
        return None
    valid = np.ones(image.shape, bool)
    for band, value in enumerate(values):
        if value is not None:
            valid[band] = ~is_nodata(image[band], value)
    return valid


def is_nodata(values, nodata: float):
    """Which of ``values`` (a NumPy array, or a torch tensor on any device, without a host
    sync) hold ``nodata``: the one rule for tiles read from files and batches from a pack.

    A NaN nodata matches NaN pixels (NaN is the one value unequal to itself); any other
    value is compared as float32, the dtype pixels are read in, whatever the stored dtype.
    """
    if math.isnan(nodata):
        return values != values
    return values == float(np.float32(nodata))


def fill_nodata(image: np.ndarray, valid: np.ndarray | None, fill: Sequence[float]) -> np.ndarray:
    """Nodata pixels take their band's ``fill`` value (the raw value that normalises to 0)."""
    if valid is None or valid.all():
        return image
    return np.where(valid, image, np.asarray(fill, np.float32)[:, None, None])


__all__ = ["fill_nodata", "is_nodata", "valid_pixels"]
