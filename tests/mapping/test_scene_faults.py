"""Scene and checkpoint faults for deforest-tile, -predict and -eval, on the real scenes."""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import rasterio.warp
import shapely

from deforest.cli.train import train
from deforest.core.errors import DatasetError, TileError
from deforest.mapping.labelling import VectorLabels
from deforest.mapping.scene import Scene
from deforest.mapping.tiling import tile_scene

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def rondonia(scenes_root: Path) -> tuple[Path, Path]:
    folder = scenes_root / "rondonia-landsat8"
    return folder / "LC08_232066_20190727.tif", folder / "endmembers.shp"


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open(newline="") as handle:
        return [{"path": r["path"], "labels": r["labels"]} for r in csv.DictReader(handle)]


def test_scene_without_crs_warns_and_still_tiles(rondonia, tmp_path, caplog):
    scene_path, points = rondonia
    bare = tmp_path / "no_crs.tif"
    with rasterio.open(scene_path) as src:
        profile, data = src.profile, src.read()
    profile["crs"] = None
    with rasterio.open(bare, "w", **profile) as dst:
        dst.write(data)
    with caplog.at_level(logging.WARNING), Scene(bare) as scene:
        assert scene.crs is None
        report = tile_scene(scene, tmp_path / "out", tile_size=32, labeller=VectorLabels(points, "class", scene))
    assert f"{points} or {bare} has no CRS: assuming both share one" in caplog.text
    assert report.written > 0


def test_vector_labels_in_another_crs_are_reprojected(rondonia, tmp_path):
    scene_path, points = rondonia
    meta, _, wkb, fields = pyogrio.raw.read(points, columns=["class"])
    geoms = shapely.from_wkb(wkb)
    xs, ys = rasterio.warp.transform(meta["crs"], "EPSG:4326", shapely.get_x(geoms), shapely.get_y(geoms))
    wgs84 = tmp_path / "endmembers_wgs84.gpkg"
    pyogrio.raw.write(
        wgs84, shapely.to_wkb(shapely.points(np.column_stack([xs, ys]))), field_data=[fields[0]], fields=["class"],
        crs="EPSG:4326", geometry_type="Point", driver="GPKG",
    )
    with Scene(scene_path) as scene:
        tile_scene(scene, tmp_path / "utm", tile_size=32, labeller=VectorLabels(points, "class", scene))
        tile_scene(scene, tmp_path / "wgs84", tile_size=32, labeller=VectorLabels(wgs84, "class", scene))
    assert _rows(tmp_path / "wgs84") == _rows(tmp_path / "utm") and len(_rows(tmp_path / "utm")) > 5


def test_vector_labels_outside_the_scene_are_an_error(rondonia, scenes_root):
    _, points = rondonia  # Rondonia points against the Bahamas scene
    with Scene(scenes_root / "landsat7-bahamas" / "RGB.byte.tif") as scene:
        with pytest.raises(TileError, match=r"endmembers\.shp: has no feature inside the scene .*RGB\.byte\.tif"):
            VectorLabels(points, "class", scene)


@pytest.fixture(scope="module")
def twelve_band_checkpoint(tmp_path_factory) -> Path:
    """A multi-class model on bands 1..12 of the 13-band EuroSAT tiles."""
    from tests.conftest import compose_train_config

    out = tmp_path_factory.mktemp("ckpt")
    cfg = compose_train_config(out, [
        "data.bands=[1,2,3,4,5,6,7,8,9,10,11,12]", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
        "test=false", "report.enabled=false", "logger=csv",
    ])
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


def _compose(app: str, tmp_path: Path, overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose(app, overrides=[f"paths.root_dir={REPO}", f"paths.output_dir={tmp_path / 'out'}",
                                       f"paths.cache_dir={tmp_path / 'cache'}", *overrides])


def _eval(ckpt: Path, tmp_path: Path, *data: str) -> None:
    from deforest.cli.eval import evaluate

    evaluate(_compose("eval", tmp_path, [f"ckpt_path={ckpt}", "report.enabled=false", *data]))


def test_eval_refuses_a_checkpoint_of_another_task(twelve_band_checkpoint, eurosat_root, tmp_path):
    """Multi-label tags on real EuroSAT tiles (a manifest) given to the multi-class model."""
    root = tmp_path / "tags"
    rows = ["path,labels"]
    for cls, tags in (("Forest", "Forest"), ("River", "River Forest"), ("Highway", "Highway River")):
        shutil.copytree(eurosat_root / "train" / cls, root / cls)
        rows += [f"{cls}/{t.name},{tags}" for t in sorted((root / cls).glob("*.tif"))]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=rf"^{root}: the data is multilabel, the checkpoint multiclass$"):
        _eval(twelve_band_checkpoint, tmp_path, "data=manifest", f"data.root={root}")


@pytest.fixture
def rgb_tiles(scenes_root: Path, tmp_path: Path) -> Path:
    """Three-band tiles cut from the real Bahamas scene, two (made-up) classes."""
    root = tmp_path / "rgb"
    with rasterio.open(scenes_root / "landsat7-bahamas" / "RGB.byte.tif") as src:
        for cls, col in (("a", 192), ("b", 256)):
            (root / cls).mkdir(parents=True)
            for row in (64, 128, 192, 256, 320):
                window = rasterio.windows.Window(col, row, 64, 64)
                profile = {**src.profile, "width": 64, "height": 64, "transform": src.window_transform(window)}
                with rasterio.open(root / cls / f"{cls}_{row}.tif", "w", **profile) as dst:
                    dst.write(src.read(window=window))
    return root


def test_predict_refuses_a_checkpoint_of_another_band_count(twelve_band_checkpoint, rgb_tiles, tmp_path):
    from deforest.cli.predict import predict

    cfg = _compose("predict", tmp_path, [f"ckpt_path={twelve_band_checkpoint}", f"tiles={rgb_tiles / 'a'}",
                                         f"out={tmp_path / 'p.csv'}", "device=cpu"])
    with pytest.raises(TileError, match=r"a_128\.tif: has 3 bands, the checkpoint was trained on 13-band tiles"):
        predict(cfg)
    assert not (tmp_path / "p.csv").exists()


def test_eval_refuses_data_without_the_checkpoint_bands(twelve_band_checkpoint, rgb_tiles, tmp_path):
    with pytest.raises(DatasetError, match=rf"^{rgb_tiles}: the tiles have 3 bands, the checkpoint was trained on 13-band tiles$"):
        _eval(twelve_band_checkpoint, tmp_path, f"data.root={rgb_tiles}", "data.layout.band_names=null")


def test_predict_and_eval_load_checkpoints_weights_only(twelve_band_checkpoint, tmp_path):
    """TileClassifier.load_from_checkpoint (used by predict and eval) refuses pickled code."""
    import pickle

    import torch

    from deforest.training.module import TileClassifier

    assert TileClassifier.load_from_checkpoint(twelve_band_checkpoint, map_location="cpu").input_spec.bands[-1] == 12
    tampered = torch.load(twelve_band_checkpoint, map_location="cpu", weights_only=True)
    tampered["hyper_parameters"]["hook"] = subprocess.Popen
    torch.save(tampered, tmp_path / "tampered.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TileClassifier.load_from_checkpoint(tmp_path / "tampered.ckpt", map_location="cpu")
