"""Tiles of one value per band (every pixel 0, or each band constant) that declare no nodata:
counted and warned wherever pixels are read, refused by ``data.validate=full`` (a bad tile, under
``data.on_bad_tile``). Real EuroSAT tiles, copied to tmp_path and overwritten with constants."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from deforest.core.errors import TileError
from deforest.data.datamodule import TileDataModule
from deforest.data.layouts import FolderLayout

REPO = Path(__file__).resolve().parents[2]
ZERO = "every pixel is 0 in every band and the file declares no nodata"


def _overwrite(tile: Path, values: np.ndarray, **profile_changes) -> None:
    """``tile`` rewritten in place with each band filled with its value of ``values``."""
    with rasterio.open(tile) as ds:
        profile = ds.profile
    profile.update(profile_changes)
    data = np.broadcast_to(values.astype(profile["dtype"])[:, None, None], (profile["count"], profile["height"], profile["width"]))
    with rasterio.open(tile, "w", **profile) as out:
        out.write(np.ascontiguousarray(data))


@pytest.fixture
def dataset(eurosat_root, tmp_path) -> tuple[Path, Path, Path]:
    """Forest and River tiles in given train/val/test folders; two River training tiles replaced
    by an all-zero tile and a tile whose bands are constant (100, 200, ... 1300): (root, zero, constant)."""
    root = tmp_path / "d"
    for cls in ("Forest", "River"):
        tiles = sorted((eurosat_root / "train" / cls).glob("*.tif"))
        for split, chosen in (("val", tiles[:3]), ("test", tiles[3:6]), ("train", tiles[6:])):
            (root / split / cls).mkdir(parents=True)
            for tile in chosen:
                shutil.copy(tile, root / split / cls / tile.name)
    zero, constant = sorted((root / "train" / "River").glob("*.tif"))[2:4]
    _overwrite(zero, np.zeros(13))
    _overwrite(constant, np.arange(1, 14) * 100.0)
    return root, zero, constant


def _datamodule(root: Path, tmp_path: Path, validate: str, policy: str = "error") -> TileDataModule:
    return TileDataModule.from_keys(FolderLayout(root), cache_dir=str(tmp_path / "cache"), validate=validate, on_bad_tile=policy)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "hold one value" in r.getMessage()]


def test_full_validation_refuses_an_all_zero_tile(dataset, tmp_path, caplog):
    root, zero, _ = dataset
    with pytest.raises(TileError, match=rf"^{zero}: {ZERO}: declare its nodata .*or remove it "
                                        r"\(data.on_bad_tile=skip leaves bad tiles out; 1 other bad tile\(s\) found too\)$"):
        _datamodule(root, tmp_path, "full").setup("fit")
    assert len(_warnings(caplog)) == 1 and "2 tile(s) of all tiles" in _warnings(caplog)[0]


def test_full_validation_skips_zero_and_constant_tiles(dataset, tmp_path, caplog):
    root, zero, constant = dataset
    dm = _datamodule(root, tmp_path, "full", "skip")
    dm.setup("fit")
    assert dm.bad_tiles.problems == {
        str(zero): f"{zero}: {ZERO}: declare its nodata (gdal_edit.py -a_nodata 0 FILE) or remove it",
        str(constant): f"{constant}: every band holds one value across the tile (100, 200, 300, 400, 500, 600, 700, "
                       "800, 900, 1000, 1100, 1200, 1300) and the file declares no nodata: declare its nodata or remove it",
    }
    assert all(str(t) not in d.sources for d in dm.datasets.values() for t in (zero, constant))
    assert len(dm.datasets["train"]) == len(list(root.glob("train/*/*.tif"))) - 2
    assert len(dm.datasets["val"]) == len(dm.datasets["test"]) == 6
    (line,) = _warnings(caplog)
    assert line.startswith(f"2 tile(s) of all tiles hold one value in every band (all 0, or constant) and declare no "
                           f"nodata, the first {zero}: they are bad tiles")


@pytest.mark.parametrize("validate", ["quick", "off"])
def test_quick_validation_counts_and_warns_from_the_statistics_pass(dataset, tmp_path, caplog, validate):
    """``quick`` (and ``off``) read pixels only for the band statistics: the constant training
    tiles met there are counted in one warning, and train as they are; a cached run warns again."""
    root, zero, constant = dataset
    for _ in range(2):  # the second run takes the statistics (and the count) from the cache
        caplog.clear()
        dm = _datamodule(root, tmp_path, validate)
        dm.setup("fit")
        (line,) = _warnings(caplog)
        assert line.startswith(f"2 tile(s) of the training tiles read for the band statistics hold one value in every "
                               f"band (all 0, or constant) and declare no nodata, the first {zero}: they train as they are")
        assert dm.bad_tiles.problems == {} and {str(zero), str(constant)} <= set(dm.datasets["train"].sources)
    assert len(list((tmp_path / "cache").glob("stats-*.json"))) == 1


def test_declared_nodata_tile_of_nodata_only_is_still_an_all_nodata_tile(eurosat_root, tmp_path, caplog):
    """A zero tile that declares nodata 0 is the all-nodata bad tile it always was, not a constant one."""
    root = tmp_path / "d"
    for cls in ("Forest", "River"):
        shutil.copytree(eurosat_root / "train" / cls, root / cls)
    tile = sorted((root / "River").glob("*.tif"))[5]
    _overwrite(tile, np.zeros(13), nodata=0)
    dm = _datamodule(root, tmp_path, "full", "skip")
    dm.setup("fit")
    assert dm.bad_tiles.problems == {str(tile): f"{tile}: every pixel is nodata"}
    assert _warnings(caplog) == []


def test_training_command_refuses_an_all_zero_tile_in_one_line(dataset, tmp_path):
    root, zero, _ = dataset
    cmd = [sys.executable, "-m", "deforest.cli.train", f"data.root={root}", "data.validate=full",
           f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", "trainer.fast_dev_run=true"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if "TileError: " in line]
    assert len(lines) == 1 and lines[0].split("TileError: ", 1)[1].startswith(f"{zero}: {ZERO}"), output[-3000:]
