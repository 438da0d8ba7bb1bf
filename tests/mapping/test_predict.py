"""deforest-predict: Rondonia scene -> tiles -> model -> map; Bahamas nodata; output layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
from affine import Affine
from hydra import compose, initialize_config_module

from deforest.cli.predict import predict
from deforest.cli.train import train
from deforest.core.contract import Normalization, untrained_spec
from deforest.core.errors import TileError
from deforest.mapping.labelling import VectorLabels
from deforest.mapping.predict import load_classifier, predict_scene, predict_tiles
from deforest.mapping.scene import Scene
from deforest.mapping.tiling import tile_scene
from deforest.training.module import TileClassifier
from tests.conftest import compose_train_config

RONDONIA_CLASSES = {0: "water", 1: "bare_soil", 2: "forest", 3: "agriculture"}


@pytest.fixture(scope="module")
def rondonia(scenes_root, tmp_path_factory):
    """The Rondonia scene tiled around its 91 points and a small model trained on the tiles."""
    folder = scenes_root / "rondonia-landsat8"
    scene_path = folder / "LC08_232066_20190727.tif"
    tiles = tmp_path_factory.mktemp("rondonia-tiles")
    with Scene(scene_path) as scene:
        labels = VectorLabels(folder / "endmembers.shp", "class", scene, class_names=RONDONIA_CLASSES)
        tile_scene(scene, tiles, tile_size=16, labeller=labels, center_on_points=True)
        points = labels.points()
    run = tmp_path_factory.mktemp("rondonia-run")
    cfg = compose_train_config(
        run, ["data=manifest", f"data.root={tiles}", "data.batch_size=8", "trainer.max_epochs=4", "model.width=16",
              "model.input_pool=1", "model.optimizer.lr=0.002"]
    )
    metrics = train(cfg)
    return {"scene": scene_path, "tiles": tiles, "points": points, "ckpt": metrics["best_checkpoint"]}


def save_untrained(path: Path, task: str, class_names: list[str], bands: int, tile: int, thresholds=None, **spec) -> Path:
    """A checkpoint of an untrained classifier (for output layout, nodata and band-order
    checks, not accuracy); ``spec``: changes to its input contract."""
    spec = {"normalization": Normalization([4.0] * bands, [1.0] * bands), **spec}
    spec = untrained_spec(task, class_names, bands, tile, thresholds=thresholds, **spec)
    model = TileClassifier(spec, network={"width": 8}, evaluation={"tta": False})
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


@pytest.mark.slow  # shares the module fixture that trains on the Rondonia tiles
def test_rondonia_full_resolution_map_has_the_scene_grid(rondonia, tmp_path):
    model, spec = load_classifier(rondonia["ckpt"])
    assert spec.source.band_count == 6 and spec.tile_size == [16, 16] and spec.class_names == sorted(RONDONIA_CLASSES.values())
    out = tmp_path / "map.tif"
    with Scene(rondonia["scene"]) as scene:
        predict_scene(model, spec, scene, out, stride=8, full_resolution=True)
    with rasterio.open(rondonia["scene"]) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs and dst.bounds == src.bounds and dst.transform == src.transform
        assert (dst.height, dst.width, dst.count) == (235, 318, 5) and dst.nodata == 255
        assert dst.descriptions == ("class", *(f"p_{n}" for n in spec.class_names))
        assert json.loads(dst.tags()["class_names"]) == spec.class_names
        assert dst.profile["tiled"] and dst.compression.name == "deflate"
        classes, probs = dst.read(1), dst.read()[1:].astype(int)
        row_col = [src.index(x, y) for x, y, _ in rondonia["points"]]
    assert set(np.unique(classes)) <= {0, 1, 2, 3}
    assert np.all(np.abs(probs.sum(axis=0) - 254) <= 3)  # uint8 probabilities x254 sum to one
    chosen = np.take_along_axis(probs, classes[None].astype(int), axis=0)[0]
    assert (chosen >= probs.max(axis=0) - 1).all()  # the class band is the arg-max (up to uint8 rounding)
    hits = [spec.class_names[classes[r, c]] == tag for (r, c), (_, _, tag) in zip(row_col, rondonia["points"])]
    assert np.mean(hits) >= 0.6, np.mean(hits)  # the labelled points are mapped to their class


@pytest.mark.slow  # shares the module fixture that trains on the Rondonia tiles
def test_rondonia_one_pixel_per_window(rondonia, tmp_path):
    model, spec = load_classifier(rondonia["ckpt"])
    out = tmp_path / "coarse.tif"
    with Scene(rondonia["scene"]) as scene:
        summary = predict_scene(model, spec, scene, out, batch_size=7)
    with rasterio.open(rondonia["scene"]) as src, rasterio.open(out) as dst:
        assert (dst.height, dst.width) == (15, 20) and summary["windows"] == 300
        assert dst.transform == src.transform @ Affine.scale(16) and dst.crs == src.crs
        assert dst.bounds.left == src.bounds.left and dst.bounds.top == src.bounds.top
        assert 0 <= dst.bounds.right - src.bounds.right < 16 * 30 and 0 <= src.bounds.bottom - dst.bounds.bottom < 16 * 30
        assert set(np.unique(dst.read(1))) <= {0, 1, 2, 3}


@pytest.mark.slow  # shares the module fixture that trains on the Rondonia tiles
def test_tiles_to_csv(rondonia, tmp_path):
    model, spec = load_classifier(rondonia["ckpt"])
    out = tmp_path / "tiles.csv"
    assert predict_tiles(model, spec, rondonia["tiles"], out, batch_size=32)["tiles"] == 91
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (rondonia["tiles"] / "labels.csv").open(newline="") as handle:
        truth = [row["labels"] for row in csv.DictReader(handle)]
    assert list(rows[0]) == ["path", "predicted", *(f"p_{n}" for n in spec.class_names)]
    probs = np.asarray([[float(row[f"p_{n}"]) for n in spec.class_names] for row in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert [row["predicted"] for row in rows] == [spec.class_names[i] for i in probs.argmax(axis=1)]
    assert np.mean([row["predicted"] == t for row, t in zip(rows, truth)]) >= 0.7


@pytest.mark.slow  # shares the module fixture that trains on the Rondonia tiles
def test_band_mismatch_fails_before_any_work(rondonia, scenes_root, tmp_path):
    """Through the packaged ``predict`` config, as ``deforest-predict`` composes it."""
    out = tmp_path / "map.tif"
    overrides = [f"ckpt_path={rondonia['ckpt']}", f"scene={scenes_root / 'landsat7-bahamas' / 'RGB.byte.tif'}", f"out={out}"]
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("predict", overrides=overrides)
    with pytest.raises(TileError, match="RGB.byte.tif: has 3 bands, the checkpoint was trained on 6-band tiles"):
        predict(cfg)
    assert not out.exists()


def test_bahamas_nodata_stays_nodata(scenes_root, tmp_path):
    ckpt = save_untrained(tmp_path / "rgb.ckpt", "multiclass", ["land", "water"], bands=3, tile=32)
    model, spec = load_classifier(ckpt)
    path = scenes_root / "landsat7-bahamas" / "RGB.byte.tif"
    with rasterio.open(path) as src:
        missing = src.dataset_mask() == 0
    with Scene(path) as scene:
        summary = predict_scene(model, spec, scene, tmp_path / "coarse.tif", max_nodata=0.5)
        predict_scene(model, spec, scene, tmp_path / "full.tif", full_resolution=True)
    padded = np.pad(missing, ((0, 23 * 32 - 718), (0, 25 * 32 - 791)), mode="symmetric")
    window_missing = padded.reshape(23, 32, 25, 32).mean(axis=(1, 3)) > 0.5
    with rasterio.open(tmp_path / "coarse.tif") as dst:
        np.testing.assert_array_equal(dst.read(1) == 255, window_missing)
        assert (dst.read() == 255).all(axis=0).sum() == window_missing.sum() == summary["nodata_windows"] > 100
    with rasterio.open(tmp_path / "full.tif") as dst:
        out_missing = dst.read(1) == 255
        assert (dst.read()[:, missing] == 255).all()  # every band, wherever the input is nodata
        assert out_missing[~missing].mean() < 0.05 and not out_missing[300:400, 300:400].any()


def test_multilabel_map_without_crs_float32_cog(tmp_path):
    rng = np.random.default_rng(3)
    scene_path = tmp_path / "nocrs.tif"
    with rasterio.open(scene_path, "w", driver="GTiff", width=80, height=72, count=2, dtype="uint16") as dst:
        dst.write(rng.integers(0, 5000, (2, 72, 80), dtype=np.uint16))
    ckpt = save_untrained(tmp_path / "ml.ckpt", "multilabel", ["loss", "cloud"], bands=2, tile=16, thresholds=[0.3, 0.6])
    model, spec = load_classifier(ckpt)
    out = tmp_path / "ml.tif"
    with Scene(scene_path) as scene, pytest.warns(UserWarning, match="nocrs.tif has no CRS"):
        predict_scene(model, spec, scene, out, stride=8, full_resolution=True, dtype="float32", cog=True)
    with rasterio.open(out) as dst:
        assert dst.crs is None and dst.count == 4 and dst.dtypes[0] == "float32"
        assert dst.descriptions == ("loss", "cloud", "p_loss", "p_cloud")
        assert dst.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        data = dst.read()
    np.testing.assert_array_equal(data[0], data[2] >= np.float32(0.3))
    np.testing.assert_array_equal(data[1], data[3] >= np.float32(0.6))
    assert ((data[2:] > 0) & (data[2:] < 1)).all()


def test_scene_bands_are_matched_by_name_whatever_their_spelling():
    """A scene that spells its bands B1..B4 (and lower case) is read in the checkpoint's B01..B04
    order: the same canonical names training used."""
    from deforest.core.contract import InputSpec, Normalization, SourceRecord
    from deforest.core.errors import TileError
    from deforest.mapping.sliding import match_bands

    spec = InputSpec(
        task="multiclass", class_names=["a", "b"], bands=[1, 2, 3], source=SourceRecord(4, "uint16"),
        nodata=None, normalization=Normalization([0.0] * 3, [1.0] * 3), tile_size=[8, 8],
        band_names=["B02", "B03", "B04"],
    )
    matched, note = match_bands(spec, ["b4", "B1", "B3", "B2"], 4, "scene.tif")
    assert matched.bands == [4, 3, 1]
    assert "matched by name" in note
    with pytest.raises(TileError, match="do not match"):
        match_bands(spec, ["B1", "B5", "B3", "B2"], 4, "scene.tif")
