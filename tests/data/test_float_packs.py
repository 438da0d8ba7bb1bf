"""Packs of any source dtype give the model the batches the files give: nodata filled the same
way whether the pack stores the sources' integers or float32 (int32, float32, float64 sources)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from deforest.data.layouts import FolderLayout
from deforest.data.stores.packing import pack_dataset
from deforest.runs.build import build_datamodule

NAN = float("nan")


def _tiles(root: Path, dtype: str, nodata: float) -> None:
    """Seeded 4-band tiles of ``dtype`` declaring ``nodata``, each with a nodata corner and a few
    scattered nodata pixels; values well inside the dtype's range."""
    rng = np.random.default_rng(7)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(12):
            data = rng.uniform(1, 3000, (4, 16, 16))
            data = data.astype(dtype) if np.dtype(dtype).kind == "f" else np.rint(data).astype(dtype)
            data[:, :4, :4] = nodata
            data[rng.integers(0, 4, 6), rng.integers(0, 16, 6), rng.integers(0, 16, 6)] = nodata
            with rasterio.open(root / cls / f"{cls}_{k}.tif", "w", driver="GTiff", width=16, height=16, count=4,
                               dtype=dtype, nodata=nodata) as dst:
                dst.write(data)


def _model_batches(dm, split: str) -> list[dict]:
    """What the model receives: every batch of ``split`` (in order) through the datamodule's hooks."""
    return [dm.on_after_batch_transfer(dm.on_before_batch_transfer(b, 0), 0) for b in dm._loader(split, shuffle=False)]


@pytest.mark.parametrize("dtype, nodata, stored", [
    ("int16", -9999, "int16"),
    ("float32", -9999, "float32"),
    ("float32", NAN, "float32"),
    ("int32", -9999, "float32"),
    ("float64", NAN, "float32"),
])
def test_packed_batches_equal_file_batches_for_every_dtype(train_config, tmp_path, dtype, nodata, stored):
    root = tmp_path / "tiles"
    _tiles(root, dtype, nodata)
    result = pack_dataset(FolderLayout(root), tmp_path / "pack")
    assert result.dtype == stored
    extra = [f"data.root={root}", "data.val_fraction=0.25", "data.test_fraction=0.25", "data.batch_size=4"]
    files = build_datamodule(train_config(extra).data)
    packed = build_datamodule(train_config([*extra, f"data.packed={tmp_path / 'pack'}"]).data)
    files.setup("fit")
    packed.setup("fit")
    assert packed.assignment == files.assignment
    fill = torch.tensor(files.input_spec.fill, dtype=torch.float32)
    assert torch.equal(torch.tensor(packed.input_spec.fill, dtype=torch.float32), fill)
    assert math.isnan(nodata) or not (fill == nodata).any()
    for split in ("train", "val", "test"):
        a, b = _model_batches(files, split), _model_batches(packed, split)
        assert len(a) == len(b) > 0, split
        for got, expected in zip(b, a):
            assert torch.equal(got["index"], expected["index"]) and got["image"].dtype == torch.float32
            assert torch.equal(got["image"], expected["image"]), split
            corner = got["image"][:, :, 0, 0]  # a nodata pixel of every tile: its band's fill
            assert torch.equal(corner, fill.expand_as(corner)), split
            assert torch.isfinite(got["image"]).all() and (got["image"] != -9999).all(), split
