"""data.split=spatial: whole blocks of neighbouring tiles per split, from deforest-tile's bounds."""

from __future__ import annotations

import numpy as np
import pytest

from deforest.cli.train import build_datamodule
from deforest.datasets import MULTICLASS, DatasetError, TileIndex
from deforest.labelling import VectorLabels
from deforest.scene import Scene
from deforest.splits import spatial_blocks
from deforest.tiling import tile_scene


@pytest.fixture(scope="module")
def rondonia_tiles(scenes_root, tmp_path_factory):
    folder = scenes_root / "rondonia-landsat8"
    out = tmp_path_factory.mktemp("rondonia-tiles")
    with Scene(folder / "LC08_232066_20190727.tif") as scene:
        labels = VectorLabels(folder / "endmembers.shp", "class", scene)
        tile_scene(scene, out, tile_size=16, labeller=labels, center_on_points=True)
    return out


def _assignment(train_config, root, overrides):
    dm = build_datamodule(train_config(["data=manifest", f"data.root={root}", *overrides]).data)
    dm.setup("fit")
    return dm, np.asarray(dm.assignment)


def test_spatial_split_keeps_blocks_whole(train_config, rondonia_tiles):
    dm, spatial = _assignment(train_config, rondonia_tiles, ["data.split=spatial", "data.block_size=1500"])
    blocks = spatial_blocks(dm.index, 1500)
    assert 10 < len(set(blocks.tolist())) < 91
    assert all(len(set(spatial[blocks == b])) == 1 for b in set(blocks.tolist()))
    assert {s: int((spatial == s).sum()) > 0 for s in ("train", "val", "test")} == {"train": True, "val": True, "test": True}
    _, random = _assignment(train_config, rondonia_tiles, [])
    assert any(len(set(random[blocks == b])) > 1 for b in set(blocks.tolist()))  # what spatial prevents


def _index(rows: list[tuple[float, float, str]]) -> TileIndex:
    meta = {"minx": [], "miny": [], "maxx": [], "maxy": [], "crs": []}
    for x, y, crs in rows:
        for key, value in zip(meta, (x, y, x + 480, y + 480, crs)):
            meta[key].append(str(value))
    n = len(rows)
    return TileIndex(MULTICLASS, ["a"], [f"t{i}.tif" for i in range(n)], np.zeros(n, np.int64), [None] * n, meta)


def test_blocks_are_per_crs_and_by_tile_centre():
    index = _index([(0, 0, "EPSG:32620"), (300, 0, "EPSG:32620"), (800, 0, "EPSG:32620"), (0, 0, "EPSG:32619")])
    blocks = spatial_blocks(index, 1000)
    assert blocks[0] == blocks[1] != blocks[2] and blocks[3] not in blocks[:3]  # centres x 240, 540 | 1040 | other CRS


def test_spatial_split_needs_bounds_and_block_size(train_config, eurosat_root, rondonia_tiles):
    with pytest.raises(DatasetError, match=r"needs the manifest columns .*missing \['minx'"):
        spatial_blocks(TileIndex(MULTICLASS, ["a"], ["t.tif"], np.zeros(1, np.int64), [None]), 1000)
    with pytest.raises(ValueError, match="data.block_size > 0"):
        _assignment(train_config, rondonia_tiles, ["data.split=spatial"])
    with pytest.raises(ValueError, match="data.split must be random or spatial"):
        _assignment(train_config, rondonia_tiles, ["data.split=blocks"])
