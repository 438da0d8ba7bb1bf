"""Tile layouts on the real files: folder (shipped EuroSAT), manifest, BigEarthNet."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio

from deforest.core.errors import DatasetError, TileError
from deforest.data.bigearthnet import BIGEARTHNET_19, BigEarthNetLayout
from deforest.data.datamodule import TileDataModule
from deforest.data.io import read_raster, resolve_bands
from deforest.data.layouts import FolderLayout, ManifestLayout
from deforest.data.splits import assign_splits, iterative_stratification

EUROSAT_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]


def test_folder_layout_keeps_given_split(eurosat_root):
    index = FolderLayout(eurosat_root).build_index()
    assert len(index) == 270
    assert index.class_names[:3] == ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    assert Counter(index.splits) == {"train": 216, "test": 54}
    forest = index.class_names.index("Forest")
    assert all("/Forest/" in s for s, t in zip(index.sources, index.targets) if t == forest)


def test_folder_layout_without_split_is_stratified(eurosat_root, tmp_path):
    for cls in ("Forest", "River", "SeaLake"):
        shutil.copytree(eurosat_root / "train" / cls, tmp_path / cls)
    index = FolderLayout(tmp_path).build_index()
    assert set(index.splits) == {None}
    splits = assign_splits(index, val_fraction=0.2, test_fraction=0.2, seed=0)
    per_class = Counter(zip(splits, index.targets.tolist()))
    for label in range(3):
        n = int((index.targets == label).sum())
        assert abs(per_class[("val", label)] - 0.2 * n) <= 1
        assert abs(per_class[("test", label)] - 0.2 * n) <= 1
    assert splits == assign_splits(index, 0.2, 0.2, seed=0)
    assert splits != assign_splits(index, 0.2, 0.2, seed=1)


def test_iterative_stratification_spreads_rare_labels():
    rng = np.random.default_rng(0)
    labels = (rng.random((300, 6)) < [0.5, 0.3, 0.1, 0.05, 0.03, 0.02]).astype(np.uint8)
    out = iterative_stratification(labels, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs((out == split).sum() - share * 300) <= 3
        got = labels[out == split].sum(0)
        assert np.all(np.abs(got - share * labels.sum(0)) <= 1.5), (split, got, share * labels.sum(0))


def test_read_tile_and_bands_by_name(eurosat_root):
    tile = next((eurosat_root / "train" / "Forest").glob("*.tif"))
    full = read_raster(tile)
    assert full.shape == (13, 64, 64) and full.dtype == np.float32
    indexes = resolve_bands(["B04", "B03", "B02"], EUROSAT_BANDS, 13)
    assert indexes == [4, 3, 2]
    rgb = read_raster(tile, indexes)
    np.testing.assert_array_equal(rgb[0], full[3])
    assert resolve_bands([13, "1"], EUROSAT_BANDS, 13) == [13, 1]
    with pytest.raises(ValueError, match="B99"):
        resolve_bands(["B99"], EUROSAT_BANDS, 13)
    with pytest.raises(ValueError, match="outside 1..13"):
        resolve_bands([0], EUROSAT_BANDS, 13)


def _write_manifest(root: Path, rows: list[str]) -> None:
    (root / "labels.csv").write_text("path,labels,split\n" + "\n".join(rows) + "\n")


def test_manifest_multiclass_and_multilabel(eurosat_root, tmp_path):
    tiles = sorted((eurosat_root / "train" / "Forest").glob("*.tif"))[:4]
    (tmp_path / "t").mkdir()
    for t in tiles:
        shutil.copy(t, tmp_path / "t" / t.name)
    names = [f"t/{t.name}" for t in tiles]
    _write_manifest(tmp_path, [f"{names[0]},forest,train", f"{names[1]},water,train", f"{names[2]},forest,test", f"{names[3]},water,"])
    index = ManifestLayout(tmp_path).build_index()
    assert index.task == "multiclass" and index.class_names == ["forest", "water"]
    assert index.targets.tolist() == [0, 1, 0, 1]
    assert index.splits == ["train", "train", "test", None]
    _write_manifest(tmp_path, [f"{names[0]},primary clear,", f"{names[1]},primary haze agriculture,", f"{names[2]},clear,", f"{names[3]},agriculture,"])
    index = ManifestLayout(tmp_path).build_index()
    assert index.task == "multilabel"
    assert index.class_names == ["agriculture", "clear", "haze", "primary"]
    assert index.targets.tolist() == [[0, 1, 0, 1], [1, 0, 1, 1], [0, 1, 0, 0], [1, 0, 0, 0]]


def test_bigearthnet_layout_reads_all_bands_on_one_grid(bigearthnet_root):
    layout = BigEarthNetLayout(bigearthnet_root)
    index = layout.build_index()
    assert len(index) == 44 and index.task == "multilabel"
    assert index.targets.shape == (44, index.num_classes) and index.targets.sum(1).min() >= 1
    assert "Sea and ocean" in index.class_names
    patch = index.sources[0]
    image = layout.read(patch, None)
    assert image.shape == (12, 120, 120)
    b02 = read_raster(Path(patch) / f"{Path(patch).name}_B02.tif")[0]
    np.testing.assert_array_equal(image[1], b02)  # 10 m band untouched
    by_name = layout.read(patch, resolve_bands(["B01", "B12"], layout.band_names, 12))
    np.testing.assert_array_equal(by_name[1], image[11])
    nineteen = BigEarthNetLayout(bigearthnet_root, nomenclature=19, drop_absent_classes=False).build_index()
    assert nineteen.class_names == BIGEARTHNET_19 and len(BIGEARTHNET_19) == 19


@pytest.mark.parametrize(
    "name, shrink, message",
    [
        ("River_odd.tif", {"count": 12}, r"River_odd\.tif: has 12 bands, the dataset's tiles have 13"),
        ("small.tif", {"width": 32, "height": 32}, r"small\.tif: is 32x32 pixels, the dataset's tiles are 64x64"),
    ],
)
def test_odd_tile_among_good_ones_is_named(eurosat_root, tmp_path, name, shrink, message):
    for cls in ("Forest", "River"):
        shutil.copytree(eurosat_root / "train" / cls, tmp_path / cls)
    src = next((tmp_path / "River").glob("*.tif"))
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read()
    profile.update(shrink)
    with rasterio.open(tmp_path / "River" / name, "w", **profile) as dst:
        dst.write(data[: profile["count"], : profile["height"], : profile["width"]])
    dm = TileDataModule.from_keys(FolderLayout(tmp_path), val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "c"))
    with pytest.raises(TileError, match=message):
        dm.setup()


def test_datamodule_statistics_cached_and_invalidated(eurosat_root, tmp_path):
    for cls in ("Forest", "River"):
        shutil.copytree(eurosat_root / "train" / cls, tmp_path / "d" / cls)
    cache = tmp_path / "cache"
    dm = TileDataModule.from_keys(FolderLayout(tmp_path / "d"), val_fraction=0.2, test_fraction=0.2, cache_dir=str(cache))
    dm.setup()
    stats_files = list(cache.glob("stats-*.json"))
    assert len(stats_files) == 1
    train = dm.datasets["train"]
    pixels = np.stack([np.log1p(train.read(i)) for i in range(len(train))])
    np.testing.assert_allclose(dm.input_spec.normalization.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dm.input_spec.normalization.std, pixels.std(axis=(0, 2, 3)), rtol=1e-4)
    # the second setup takes the cached file (marked here) instead of measuring again
    marked = {"mean": [1.5] * 13, "std": [2.5] * 13}
    stats_files[0].write_text(json.dumps(marked))
    again = TileDataModule.from_keys(FolderLayout(tmp_path / "d"), val_fraction=0.2, test_fraction=0.2, cache_dir=str(cache))
    again.setup()
    assert again.input_spec.normalization.mean == marked["mean"] and again.input_spec.normalization.std == marked["std"]
    assert len(list(cache.glob("stats-*.json"))) == 1
    next((tmp_path / "d" / "River").glob("*.tif")).unlink()
    changed = TileDataModule.from_keys(FolderLayout(tmp_path / "d"), val_fraction=0.2, test_fraction=0.2, cache_dir=str(cache))
    changed.setup()
    assert len(list(cache.glob("stats-*.json"))) == 2
    assert changed.input_spec.normalization.mean != marked["mean"]  # measured, not the stale file


def test_empty_class_folder_is_an_error(eurosat_root, tmp_path):
    shutil.copytree(eurosat_root / "train" / "Forest", tmp_path / "Forest")
    (tmp_path / "Clearcut").mkdir()
    with pytest.raises(DatasetError, match="Clearcut: class folder holds no .tif tiles"):
        FolderLayout(tmp_path).build_index()
