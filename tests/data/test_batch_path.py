"""Whole batches in the stored dtype: file batches read into one uint16 tensor (also from a
real worker process), packed batches copied into recycled memory that a kept batch never
shares, and the file errors the batch reader names."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from deforest.data.batch_buffers import POOL_SIZE, BatchBuffers
from deforest.data.layouts import FolderLayout
from deforest.data.stores.packing import pack_dataset
from deforest.runs.build import build_datamodule
from tests.data.test_pack import _nodata_tiles


def _setup(train_config, overrides: list[str]):
    dm = build_datamodule(train_config(overrides).data)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("workers", [0, 1])
def test_file_batches_travel_as_uint16_and_convert_to_the_file_readers_values(train_config, workers):
    dm = _setup(train_config, [f"data.num_workers={workers}", "data.batch_size=16"])
    assert dm.datasets["train"].augment is None and dm.device_flips  # D4 of whole batches, after the transfer
    for split in ("train", "val"):
        raw = next(iter(dm._loader(split, shuffle=False)))
        assert raw["image"].dtype == torch.uint16 and raw["image"].shape == (16, 13, 64, 64)
        assert raw["image"].is_shared() == (workers > 0)  # a worker writes the batch straight into shared memory
        batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
        expected = torch.stack([dm.datasets[split][i]["image"] for i in batch["index"].tolist()])
        assert batch["image"].dtype == torch.float32 and torch.equal(batch["image"], expected)
        assert batch["target"].tolist() == [int(dm.datasets[split].targets[i]) for i in batch["index"].tolist()]


def test_file_tiles_with_nodata_arrive_filled_in_float32(train_config, tmp_path):
    root = tmp_path / "nodata"
    _nodata_tiles(root)
    dm = _setup(train_config, [f"data.root={root}", "data.val_fraction=0.25", "data.test_fraction=0.25",
                               "data.on_bad_tile=skip", "data.validate=full"])
    raw = next(iter(dm._loader("val", shuffle=False)))
    assert raw["image"].dtype == torch.float32  # filled as read: each file has its own nodata
    fill = torch.tensor(dm.input_spec.fill, dtype=torch.float32)
    assert torch.equal(raw["image"][:, :, 0, 0], fill.expand(len(raw["image"]), -1))
    expected = torch.stack([dm.datasets["val"][i]["image"] for i in raw["index"].tolist()])
    assert torch.equal(dm.on_after_batch_transfer(raw, 0)["image"], expected)


def test_files_broken_after_setup_are_named_in_the_batch(train_config, eurosat_root, tmp_path):
    root = tmp_path / "eurosat"
    shutil.copytree(eurosat_root, root)
    dm = _setup(train_config, [f"data.root={root}", "data.on_bad_tile=skip", "data.batch_size=8"])
    val = dm.datasets["val"]
    empty, not_tiff, gone = (val.sources[i] for i in (0, 1, 2))
    open(empty, "wb").close()
    with open(not_tiff, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(64))
    os.unlink(gone)
    batch = dm.on_before_batch_transfer(next(iter(dm._loader("val", shuffle=False))), 0)
    assert batch["index"].tolist() == list(range(3, 8)) and len(batch["image"]) == 5
    assert dm.bad_tiles.problems == {
        empty: f"{empty}: is empty (0 bytes)",
        not_tiff: f"{not_tiff}: is named .tif but is not a TIFF file (it starts with b'\\x89PNG')",
        gone: f"{gone}: does not exist",
    }


def test_a_kept_packed_batch_is_never_overwritten_and_a_dropped_one_is_reused(train_config, eurosat_root, tmp_path):
    pack_dataset(FolderLayout(eurosat_root), tmp_path / "pack")
    dm = _setup(train_config, [f"data.packed={tmp_path / 'pack'}", "data.batch_size=16", "data.num_workers=2"])
    loader = dm.train_dataloader()
    assert loader.num_workers == 0  # a local pack is gathered in this process
    kept = list(loader)  # every batch held at once: each in its own memory, with its own tiles
    tiles, rows = dm.layout.tiles, dm.layout.rows_of(dm.datasets["train"].sources)
    assert len(kept) >= 8 and len({b["image"].data_ptr() for b in kept}) == len(kept)
    for batch in kept:
        assert np.array_equal(batch["image"].numpy(), tiles[rows[batch["index"].numpy()]])
    del kept, batch
    addresses = [b["image"].data_ptr() for b in loader]  # ``b`` holds a batch until the next one is made
    assert len(addresses) >= 8 and len(set(addresses)) == 2 and addresses[0] != addresses[1]


def test_buffers_are_reused_only_when_no_view_or_array_holds_them():
    pool = BatchBuffers()
    first = pool.take((4, 2), torch.uint16)
    address = first.data_ptr()
    assert pool.take((4, 2), torch.uint16).data_ptr() != address  # still held
    row, array = first[1], first.numpy()
    del first
    assert pool.take((4, 2), torch.uint16).data_ptr() != address  # a view and an array still hold it
    del row
    assert pool.take((4, 2), torch.uint16).data_ptr() != address
    del array
    assert pool.take((4, 2), torch.uint16).data_ptr() == address  # nothing holds it: reused
    held = [pool.take((4, 2), torch.uint16) for _ in range(POOL_SIZE + 2)]
    assert len({t.data_ptr() for t in held}) == len(held)  # beyond the pool: fresh memory, never shared
