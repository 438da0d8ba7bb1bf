"""Data that must be refused, on copies of the shipped data with one fault each, and what is not a fault.

Each fault is one clear error naming the file (``TileError`` for one tile, subject to
``data.on_bad_tile``; ``DatasetError`` for the dataset's own records). CRS differences alone
are normal; each tile's own nodata (header or ``.aux.xml`` sidecar) is honoured.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from deforest.core.errors import DatasetError, TileError
from deforest.data.bigearthnet import BigEarthNetLayout
from deforest.data.datamodule import TileDataModule
from deforest.data.io import pixel_reads, read_header
from deforest.data.layouts import FolderLayout, ManifestLayout
from deforest.data.stores.pack import PackedLayout
from deforest.data.stores.packing import pack_dataset


def _copy(eurosat_root: Path, dest: Path, classes=("Forest", "River"), split: str = "train") -> Path:
    for cls in classes:
        shutil.copytree(eurosat_root / split / cls, dest / cls)
    return dest


def _rewrite(src: Path, dest: Path, data: np.ndarray | None = None, **profile_changes) -> None:
    with rasterio.open(src) as ds:
        profile, pixels = ds.profile, ds.read()
    profile.update(profile_changes)
    with rasterio.open(dest, "w", **profile) as out:
        out.write((pixels if data is None else data).astype(profile["dtype"]))


def _datamodule(root: Path, tmp_path: Path, policy: str = "error", validate: str = "quick", **kw) -> TileDataModule:
    return TileDataModule.from_keys(FolderLayout(root), val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                          validate=validate, on_bad_tile=policy, **kw)


# ---- the same tile twice in a manifest ------------------------------------------------------
def _manifest_tiles(eurosat_root: Path, root: Path) -> list[str]:
    (root / "tiles").mkdir(parents=True)
    names = []
    for cls in ("Forest", "River"):
        for tile in sorted((eurosat_root / "train" / cls).glob("*.tif"))[:4]:
            shutil.copy(tile, root / "tiles" / tile.name)
            names.append(tile.name)
    return names


@pytest.mark.parametrize("spelling", ["./tiles//{name}", "tiles/./{name}", "{root}/tiles/{name}", "tiles/../tiles/{name}",
                                      "link.tif"])
def test_manifest_lists_one_tile_twice_under_another_spelling(eurosat_root, tmp_path, spelling):
    root = tmp_path / "m"
    names = _manifest_tiles(eurosat_root, root)
    os.symlink(root / "tiles" / names[0], root / "link.tif")
    rows = ["path,labels"] + [f"tiles/{n},{n.split('_')[0]}" for n in names]
    rows.append(f"{spelling.format(name=names[0], root=root)},River")  # Forest's tile, now also River
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=rf"labels\.csv, line 10: .* is the same file as tiles/{names[0]} on line 2 "):
        ManifestLayout(root).build_index()


def test_a_tile_in_two_class_folders_is_refused(eurosat_root, tmp_path):
    root = _copy(eurosat_root, tmp_path / "d")
    tile = sorted((root / "Forest").glob("*.tif"))[0]
    os.symlink(tile, root / "River" / "River_9999.tif")
    with pytest.raises(DatasetError, match=r"River_9999\.tif is the same file as .*Forest_\d+\.tif \(classes River and Forest\)"):
        FolderLayout(root).build_index()


# ---- tiles unlike the dataset's -------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "float64"])
def test_tile_of_another_dtype_is_named_or_skipped(eurosat_root, tmp_path, dtype):
    root = _copy(eurosat_root, tmp_path / "d")
    src = sorted((root / "River").glob("*.tif"))[0]
    bad = root / "River" / "River_other.tif"
    with rasterio.open(src) as ds:
        pixels = ds.read()
    _rewrite(src, bad, np.clip(pixels // 100, 0, 127) if dtype == "int8" else pixels, dtype=dtype)
    with pytest.raises(TileError, match=rf"River_other\.tif: has dtype {dtype}, the dataset's tiles are uint16"):
        _datamodule(root, tmp_path).setup()
    dm = _datamodule(root, tmp_path, "skip")
    dm.setup()
    assert list(dm.bad_tiles.problems) == [str(bad)]


def test_tile_of_another_pixel_size_is_named_or_skipped(eurosat_root, tmp_path):
    """A 60 m tile (the transform scaled six times) among the sample's 10 m tiles."""
    root = _copy(eurosat_root, tmp_path / "d")
    src = sorted((root / "River").glob("*.tif"))[0]
    bad = root / "River" / "River_60m.tif"
    with rasterio.open(src) as ds:
        coarse = ds.transform * Affine.scale(6)
    _rewrite(src, bad, transform=coarse)
    with pytest.raises(TileError, match=r"River_60m\.tif: has 60[.\d]* m pixels, the dataset's tiles have 10[.\d]* m"):
        _datamodule(root, tmp_path).setup()
    dm = _datamodule(root, tmp_path, "skip")
    dm.setup()
    assert list(dm.bad_tiles.problems) == [str(bad)]
    with pytest.raises(TileError, match=r"River_60m\.tif: has 60[.\d]* m pixels"):  # packing checks the same
        pack_dataset(FolderLayout(root), tmp_path / "pack")


def test_crs_differences_alone_are_normal(eurosat_root, tmp_path):
    """The sample spans several UTM zones: same bands, size, dtype and pixel size, so nothing is refused."""
    root = _copy(eurosat_root, tmp_path / "d", classes=("Forest", "River", "SeaLake", "Highway"))
    crs = Counter(str(rasterio.open(t).crs) for t in root.rglob("*.tif"))
    assert len(crs) >= 3, crs
    dm = _datamodule(root, tmp_path)
    dm.setup()
    assert len(dm.bad_tiles) == 0 and sum(len(d) for d in dm.datasets.values()) == sum(crs.values())


def test_bigearthnet_patches_without_georeference_are_not_refused(bigearthnet_root, tmp_path):
    """30 of the 44 shipped patches have no CRS: their pixel size is unknown, not wrong."""
    dm = TileDataModule.from_keys(BigEarthNetLayout(bigearthnet_root), val_fraction=0.15, cache_dir=str(tmp_path / "c"))
    dm.setup()
    assert len(dm.bad_tiles) == 0


# ---- dangling symlinks ----------------------------------------------------------------------
def test_dangling_symlink_in_a_class_folder_is_named_or_skipped(eurosat_root, tmp_path, caplog):
    root = _copy(eurosat_root, tmp_path / "d")
    link = root / "River" / "River_gone.tif"
    os.symlink(tmp_path / "elsewhere" / "River_gone.tif", link)
    with pytest.raises(TileError, match=rf"River_gone\.tif: is a dangling symlink \(to {tmp_path}/elsewhere/River_gone\.tif"):
        _datamodule(root, tmp_path).setup()
    dm = _datamodule(root, tmp_path, "skip")
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert list(dm.bad_tiles.problems) == [str(link)] and "skipping bad tile" in caplog.text


def test_dangling_symlink_in_a_manifest(eurosat_root, tmp_path):
    root = tmp_path / "m"
    names = _manifest_tiles(eurosat_root, root)
    os.symlink(tmp_path / "gone.tif", root / "tiles" / "gone.tif")
    rows = ["path,labels", f"tiles/{names[0]},Forest", "tiles/gone.tif,River"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=r"labels\.csv, line 3: file .*tiles/gone\.tif is a dangling symlink"):
        ManifestLayout(root).build_index()


# ---- label records --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "row,message",
    [
        ("tiles/{1}", r"line 3: no 'labels' value \(the row has fewer columns than the header \['path', 'labels'\]\)"),
        ("tiles/{1},River,extra", r"line 3: 1 more value\(s\) than the header's columns"),
        (",River", r"line 3: empty 'path'"),
    ],
    ids=["no-label-column", "extra-column", "no-path"],
)
def test_manifest_row_without_its_columns(eurosat_root, tmp_path, row, message):
    root = tmp_path / "m"
    names = _manifest_tiles(eurosat_root, root)
    (root / "labels.csv").write_text(f"path,labels\ntiles/{names[0]},Forest\n{row.format(*names)}\n")
    with pytest.raises(DatasetError, match=rf"labels\.csv, {message}"):
        ManifestLayout(root).build_index()


@pytest.mark.parametrize(
    "labels,message",
    [
        (None, r"'labels' is null"),
        ("Pastures", r"'labels' is a str \('Pastures'\), not a list"),
        ({"a": 1}, r"'labels' is a dict"),
        ([], r"'labels' is empty"),
        (["Pastures", 3], r"unknown BigEarthNet label\(s\) \[3\]"),
    ],
    ids=["null", "string", "dict", "empty", "number"],
)
def test_bigearthnet_labels_that_are_not_a_list_of_names(bigearthnet_root, tmp_path, labels, message):
    for patch in sorted(p for p in bigearthnet_root.iterdir() if p.is_dir())[:3]:
        shutil.copytree(patch, tmp_path / "ben" / patch.name)
    patch = sorted((tmp_path / "ben").iterdir())[1]
    path = patch / f"{patch.name}_labels_metadata.json"
    record = json.loads(path.read_text())
    record["labels"] = labels
    path.write_text(json.dumps(record))
    with pytest.raises(DatasetError, match=rf"{patch.name}_labels_metadata\.json: {message}"):
        BigEarthNetLayout(tmp_path / "ben").build_index()


# ---- nodata: every tile's own -------------------------------------------------------------
def _hole(src: Path, dest: Path, value: int, nodata: int | None) -> np.ndarray:
    """``src`` with a 16x16 block of ``value`` in every band, declaring ``nodata``; returns the block mask."""
    with rasterio.open(src) as ds:
        pixels = ds.read()
    pixels[:, 8:24, 8:24] = value
    _rewrite(src, dest, pixels, nodata=nodata)
    mask = np.zeros(pixels.shape, bool)
    mask[:, 8:24, 8:24] = True
    return mask


def test_each_tile_own_nodata_is_honoured(eurosat_root, tmp_path):
    """The sample declares no nodata; one River tile declares 0 and has a block of zeros (nodata
    there), one Forest tile declares 65535 but its zeros are reflectance. The reference tile (the
    first) declares none, which used to decide for all of them."""
    root = _copy(eurosat_root, tmp_path / "d")
    river = sorted((root / "River").glob("*.tif"))
    forest = sorted((root / "Forest").glob("*.tif"))
    holes = _hole(river[0], river[0], 0, nodata=0)
    _hole(forest[-1], forest[-1], 0, nodata=65535)
    dm = _datamodule(root, tmp_path, validate="full")
    dm.setup()
    assert dm.nodata is None  # the reference (first) tile declares none
    (owner, i), = [(d, d.sources.index(str(river[0]))) for d in dm.datasets.values() if str(river[0]) in d.sources]
    image, valid = owner.read_valid(i)
    np.testing.assert_array_equal(valid, ~holes)  # its own nodata, not the first tile's
    filled = owner.read(i)
    assert np.allclose(filled[holes.any(axis=0)[None].repeat(13, 0)].reshape(13, -1).T, dm.input_spec.fill)
    (owner, i), = [(d, d.sources.index(str(forest[-1]))) for d in dm.datasets.values() if str(forest[-1]) in d.sources]
    image, valid = owner.read_valid(i)
    assert valid.all() and (image[:, 8:24, 8:24] == 0).all()  # 0 is a value there, 65535 would be nodata
    # a pack holds one nodata value: packing refuses the tile that declares another, naming it
    with pytest.raises(TileError, match=r"(River|Forest)_\d+\.tif: declares nodata \[(0|65535)\.0, .*the dataset's first tile None"):
        pack_dataset(FolderLayout(root), tmp_path / "pack")


def test_nodata_declared_in_an_aux_xml_sidecar_is_honoured(eurosat_root, tmp_path):
    """GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR (set for speed) hides sidecars; a tile that has one
    is opened with GDAL's sidecar lookup, so the nodata its ``.aux.xml`` declares counts."""
    assert os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    root = _copy(eurosat_root, tmp_path / "d")
    tile = sorted((root / "River").glob("*.tif"))[0]
    holes = _hole(tile, tile, 0, nodata=None)
    bands = "".join(f'<PAMRasterBand band="{b}"><NoDataValue>0</NoDataValue></PAMRasterBand>' for b in range(1, 14))
    Path(f"{tile}.aux.xml").write_text(f"<PAMDataset>{bands}</PAMDataset>\n")
    with rasterio.open(tile) as plain:
        assert plain.nodata is None  # what the directory-listing setting alone gives
    assert read_header(tile).nodata == 0
    dm = _datamodule(root, tmp_path, validate="full")
    dm.setup()
    (owner, i), = [(d, d.sources.index(str(tile))) for d in dm.datasets.values() if str(tile) in d.sources]
    np.testing.assert_array_equal(owner.read_valid(i)[1], ~holes)
    with pixel_reads():  # as batches are read: without georeferencing, the sidecar still counts
        np.testing.assert_array_equal(owner.read_valid(i)[1], ~holes)
