"""prepare() without Lightning, on the shipped EuroSAT sample: splits, bands, tile size, contract."""

from __future__ import annotations

import sys

import pytest

from deforest.core.errors import ConfigError
from deforest.data.layouts import FolderLayout
from deforest.data.prepare import prepare
from deforest.data.settings import DataSettings, PrepareSettings
from deforest.data.stores.files import FileStore
from deforest.data.stores.opening import open_store
from deforest.data.stores.packing import pack_dataset

EUROSAT_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]


def test_prepare_splits_selects_bands_and_builds_the_contract(eurosat_root, tmp_path):
    store = FileStore(FolderLayout(eurosat_root, EUROSAT_BANDS), str(tmp_path / "cache"))
    data = prepare(store, PrepareSettings(bands=["B04", "B03", "B02", "B08"], seed=42))
    # the sample's given split: 216 train/ tiles (val carved from them at 0.1) and 54 test/ tiles
    assert {s: len(data.rows(s)) for s in ("train", "val", "test")} == {"train": 196, "val": 20, "test": 54}
    assert data.bands == [4, 3, 2, 8] and data.loaded_band_names == ["B04", "B03", "B02", "B08"]
    assert data.tile_size == (64, 64) and data.source_band_count == 13
    assert data.reference_header.dtype == "uint16" and data.nodata is None and len(data.bad_tiles) == 0
    spec = data.input_spec
    assert spec.class_names == CLASSES and spec.task == "multiclass" and spec.bands == [4, 3, 2, 8]
    assert spec.band_names == ["B04", "B03", "B02", "B08"] and spec.tile_size == [64, 64]
    assert spec.normalization.transform == "log1p" and len(spec.normalization.mean) == 4
    assert spec.split.layout == "FolderLayout" and spec.split.kind == "random" and spec.split.seed == 42
    assert len(spec.split.lists["val"]) == 20
    assert data.split_counts()["val"] == {name: 2 for name in CLASSES}


def test_prepare_imports_no_lightning():
    """prepare is usable where Lightning is not: its module imports none of it."""
    import subprocess

    code = "import sys, deforest.data.prepare; sys.exit('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_pack_prepares_as_its_files(eurosat_root, tmp_path):
    """The pack store gives the split, bands, size and statistics of the files it was made from."""
    layout = FolderLayout(eurosat_root, EUROSAT_BANDS)
    pack_dataset(layout, tmp_path / "pack")
    settings = PrepareSettings(bands=["B04", "B08"], seed=7)
    files = prepare(FileStore(layout), settings)
    packed = prepare(open_store(None, DataSettings.from_keys(packed=str(tmp_path / "pack")).store), settings)
    assert packed.assignment == files.assignment and packed.bands == files.bands == [4, 8]
    assert packed.tile_size == files.tile_size == (64, 64)
    assert packed.input_spec.split.layout == "FolderLayout"  # the layout the pack was made from
    assert packed.input_spec.normalization.mean == pytest.approx(files.input_spec.normalization.mean)
    assert packed.input_spec.normalization.std == pytest.approx(files.input_spec.normalization.std)


def test_flat_data_keys_map_onto_the_settings_groups():
    settings = DataSettings.from_keys(batch_size=8, split="spatial", block_size=1500.0, split_files=None,
                                      validate="full", on_bad_tile="skip", packed="p", seed=3, sampler="balanced")
    assert settings.loader.batch_size == 8 and settings.loader.sampler == "balanced"
    assert settings.prepare.split.kind == "spatial" and settings.prepare.split.block_size == 1500.0
    assert settings.prepare.checks.validate == "full" and settings.prepare.checks.on_bad_tile == "skip"
    assert settings.store.packed == "p" and settings.prepare.seed == 3
    with pytest.raises(ValueError, match="data.batch_size must be >= 1, got 0"):
        DataSettings.from_keys(batch_size=0)
    with pytest.raises(ConfigError, match=r"invalid config: data\.batchsize is not a data setting \(did you mean data\.batch_size\?\)"):
        DataSettings.from_keys(batchsize=8)
