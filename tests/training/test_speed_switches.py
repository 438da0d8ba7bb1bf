"""GPU speed switches (model.channels_last, model.compile, data.device_flips) behave on a CPU too."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from deforest.core.contract import untrained_spec
from deforest.data.datamodule import TileDataModule
from deforest.data.layouts import FolderLayout
from deforest.data.transforms import d4_views, random_d4
from deforest.training.module import TileClassifier


def _model(**switches) -> TileClassifier:
    torch.manual_seed(0)
    return TileClassifier(untrained_spec("multiclass", ["a", "b", "c"], 4, 16), network={"width": 8}, **switches)


def _which_view(out: torch.Tensor, tile: torch.Tensor) -> int:
    matches = [k for k, view in enumerate(d4_views(tile[None])) if torch.equal(view[0], out)]
    assert len(matches) == 1, "not one of the eight flips/rotations"
    return matches[0]


def test_random_d4_gives_each_tile_one_of_the_eight_views():
    tile = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5)  # no symmetry: views differ
    out = random_d4(tile.expand(64, -1, -1, -1), generator=torch.Generator().manual_seed(0))
    assert sorted({_which_view(o, tile) for o in out}) == list(range(8))
    with pytest.raises(ValueError, match="square tiles, got 4x6"):
        random_d4(torch.zeros(1, 2, 4, 6))


def test_device_flips_apply_to_training_batches_only(eurosat_root):
    datamodule = TileDataModule.from_keys(FolderLayout(eurosat_root / "train"), device_flips=True)
    datamodule.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    tile = torch.arange(4 * 6 * 6, dtype=torch.float32).view(4, 6, 6)
    batch = {"image": tile.expand(32, -1, -1, -1).clone(), "target": torch.zeros(32, dtype=torch.long)}
    datamodule.trainer.training = True
    flipped = datamodule.on_after_batch_transfer(batch, 0)["image"]
    assert len({_which_view(o, tile) for o in flipped}) > 1
    datamodule.trainer.validating = True
    assert torch.equal(datamodule.on_after_batch_transfer(batch, 0)["image"], batch["image"])


def test_channels_last_and_compile_keep_outputs_and_checkpoint_keys():
    x = torch.rand(3, 4, 16, 16)
    reference = _model().eval()
    fast = _model(channels_last=True, compile={"backend": "eager"}).eval()
    fast.configure_model()
    conv = next(m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.net._compiled_call_impl is not None
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x))
    assert fast.state_dict().keys() == reference.state_dict().keys()
