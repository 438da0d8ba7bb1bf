"""Each tile's own band order: tiles that name their bands (band descriptions) are read in the
dataset's band order by name, in training, in packing and in evaluation; a tile without one of
the dataset's bands is a bad tile. Real EuroSAT tiles, rewritten in tmp_path with their bands
and descriptions permuted alike (same content, another order on disk)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hydra import compose, initialize_config_module

from deforest.cli.pack import pack
from deforest.core.errors import TileError
from deforest.runs.build import build_datamodule

REPO = Path(__file__).resolve().parents[2]
#: EuroSAT's band order, as data=folder names it
NAMES = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
#: B02 and B03 swapped (the issue's case), and a full shuffle
SWAP = [0, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
SHUFFLE = np.random.default_rng(7).permutation(13).tolist()


def _write(src: Path, dest: Path, order: list[int], names: list[str]) -> None:
    """``src``'s bands ``order`` (0-based) into ``dest``, described as ``names[order]``."""
    with rasterio.open(src) as ds:
        profile, pixels = ds.profile, ds.read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dest, "w", **profile) as out:
        out.write(pixels[order])
        out.descriptions = tuple(names[i] for i in order)


def _described(eurosat_root: Path, dest: Path, permuted: bool) -> list[Path]:
    """The EuroSAT sample with every band described; ``permuted``: every second tile of a class
    folder stored in another band order (the first tile of each folder, the reference among them,
    keeps the data's order). Returns the permuted tiles."""
    moved = []
    for folder in sorted(p for p in eurosat_root.glob("*/*") if p.is_dir()):
        for n, tile in enumerate(sorted(folder.glob("*.tif"))):
            target = dest / tile.relative_to(eurosat_root)
            order = list(range(13))
            if permuted and n % 2:
                order = SWAP if n % 4 == 1 else SHUFFLE
                moved.append(target)
            _write(tile, target, order, NAMES)
    return moved


@pytest.fixture(scope="module")
def described(tmp_path_factory, eurosat_root):
    """(plain copy, permuted copy, permuted tiles): the sample described in its own order, and
    the same tiles with half of them stored in another order."""
    base = tmp_path_factory.mktemp("bands")
    _described(eurosat_root, base / "plain", permuted=False)
    moved = _described(eurosat_root, base / "permuted", permuted=True)
    return base / "plain", base / "permuted", moved


def _fit(train_config, root: Path, extra: list[str] | None = None):
    dm = build_datamodule(train_config([f"data.root={root}", *(extra or [])]).data)
    dm.setup("fit")
    return dm


def _batches(dm, split: str) -> torch.Tensor:
    """Every batch of ``split`` as the model gets it (after the transfer hook), concatenated."""
    return torch.cat([dm.on_after_batch_transfer(b, 0)["image"] for b in dm._loader(split, shuffle=False)])


def test_tiles_in_another_band_order_train_in_the_dataset_order(train_config, described):
    plain, permuted, moved = described
    files, shuffled = _fit(train_config, plain), _fit(train_config, permuted)
    assert len(moved) > 100 and files.bad_tiles.problems == shuffled.bad_tiles.problems == {}
    assert shuffled.input_spec.band_names == files.input_spec.band_names == NAMES
    # band statistics of the training split: the same values, not bands averaged across positions
    np.testing.assert_array_equal(shuffled.input_spec.normalization.mean, files.input_spec.normalization.mean)
    np.testing.assert_array_equal(shuffled.input_spec.normalization.std, files.input_spec.normalization.std)
    for split in ("val", "test"):
        expected = _batches(files, split)
        assert expected.shape[1] == 13 and torch.equal(_batches(shuffled, split), expected)
    # every training tile, as the batch reader reads it (in its stored dtype)
    train_files, train_shuffled = files.datasets["train"], shuffled.datasets["train"]
    for i in range(len(train_files)):
        np.testing.assert_array_equal(train_shuffled.read(i, native=True), train_files.read(i, native=True))


def test_band_selection_by_name_follows_each_tile(train_config, described):
    plain, permuted, _ = described
    extra = ["data.bands=[B04,B03,B02]"]
    files, shuffled = _fit(train_config, plain, extra), _fit(train_config, permuted, extra)
    assert shuffled.bands == files.bands == [4, 3, 2] and shuffled.input_spec.band_names == ["B04", "B03", "B02"]
    for split in ("val", "test"):
        assert torch.equal(_batches(shuffled, split), _batches(files, split))


def test_the_order_survives_the_header_cache(train_config, described, tmp_path):
    """The per-tile order is found when the headers are checked and kept with their cache: a
    second datamodule on the same cache reads the tiles in the same order."""
    _, permuted, moved = described
    first, second = _fit(train_config, permuted), _fit(train_config, permuted)
    assert list((tmp_path / "cache").glob("headers-*.json"))
    assert second.band_orders == first.band_orders and str(moved[0]) in second.band_orders
    assert torch.equal(_batches(second, "val"), _batches(first, "val"))


def _pack_config(overrides: list[str]):
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose("pack", overrides=[f"paths.root_dir={REPO}", *overrides])


def test_packing_stores_each_tile_in_the_dataset_order(train_config, described, tmp_path):
    plain, permuted, _ = described
    out = tmp_path / "pack"
    result = pack(_pack_config([f"data.root={permuted}", f"out={out}"]))
    assert result.written and result.shape == (270, 13, 64, 64)
    files, packed = _fit(train_config, plain), _fit(train_config, permuted, [f"data.packed={out}"])
    assert packed.input_spec.band_names == NAMES
    np.testing.assert_allclose(packed.input_spec.normalization.mean, files.input_spec.normalization.mean, rtol=1e-12)
    for split in ("val", "test"):
        assert torch.equal(_batches(packed, split), _batches(files, split))


def _renamed(described, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the permuted data where one tile calls its B8A band ``B13``."""
    _, permuted, moved = described
    root = tmp_path / "renamed"
    shutil.copytree(permuted, root)
    tile = root / moved[3].relative_to(permuted)
    with rasterio.open(tile, "r+") as ds:
        ds.set_band_description(ds.descriptions.index("B8A") + 1, "B13")
    return root, tile


def test_tile_without_one_of_the_dataset_bands_is_a_bad_tile(train_config, described, tmp_path):
    root, tile = _renamed(described, tmp_path)
    with pytest.raises(TileError, match=rf"^{tile}: has no band B8A \(its bands: B\d\d, .*B13.*\) \(data.on_bad_tile"):
        _fit(train_config, root)
    dm = _fit(train_config, root, ["data.on_bad_tile=skip"])
    assert list(dm.bad_tiles.problems) == [str(tile)]
    assert all(str(tile) not in d.sources for d in dm.datasets.values())


def test_evaluation_matches_the_checkpoint_bands_by_name(train_config, described):
    """A model trained on the plain copy scores the permuted copy on the same pixels: evaluation
    reads each tile's bands by the checkpoint's band names, as prediction does."""
    from deforest.data.datamodule import TileDataModule
    from deforest.data.layouts import FolderLayout

    plain, permuted, _ = described
    files = _fit(train_config, plain)
    spec = files.input_spec
    evaluated = TileDataModule.from_keys(FolderLayout(permuted, NAMES), input_spec=spec, batch_size=16)
    evaluated.setup("test")
    assert torch.equal(_batches(evaluated, "test"), _batches(files, "test"))
