"""One split's samples: tiles read, checked, nodata filled and augmented, by index or by batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from deforest.core.contract import InputSpec
from deforest.core.errors import TileError
from deforest.core.nodata import fill_nodata, valid_pixels
from deforest.data.batch_buffers import TORCH_DTYPES, BatchBuffers, batch_tensor
from deforest.data.batch_transforms import collate_tiles
from deforest.data.checks import check_pixels
from deforest.data.io import pixel_reads
from deforest.data.layouts import TileLayout

if TYPE_CHECKING:
    # annotations only: deforest.data.transforms imports it where a pipeline is built (trainer=gpu has
    # none, and the bare GPU machines of scripts/gpu-check.sh have no albumentations)
    import albumentations as A


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
        """A whole batch in the stored dtype (see :mod:`deforest.data.batch_transforms`): tile
        files read into one batch tensor (a pack's dataset gathers its rows instead)."""
        return self.read_batch(indices)

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
