"""The input contract: prediction sees exactly the training inputs, bands by name, plain-data storage."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import rasterio
import torch

from deforest.cli.train import train
from deforest.core.contract import (
    Calibration,
    InputSpec,
    NetworkInput,
    Normalization,
    SourceRecord,
    SplitRecord,
    untrained_spec,
)
from deforest.core.errors import TileError
from deforest.data.datamodule import TileDataModule
from deforest.data.layouts import ManifestLayout
from deforest.mapping.labelling import VectorLabels
from deforest.mapping.predict import load_classifier, predict_scene, predict_tiles
from deforest.mapping.scene import Scene
from deforest.mapping.tiling import tile_scene
from tests.conftest import compose_train_config
from tests.mapping.test_predict import RONDONIA_CLASSES, save_untrained

TILE = 16
NAMES = ["blue", "green", "red", "nir", "swir1", "swir2"]


@pytest.fixture(scope="module")
def rondonia_model(scenes_root, tmp_path_factory):
    """A small model trained on 16 px tiles cut around the Rondonia scene's 91 labelled points."""
    folder = scenes_root / "rondonia-landsat8"
    tiles = tmp_path_factory.mktemp("contract-tiles")
    with Scene(folder / "LC08_232066_20190727.tif") as scene:
        labels = VectorLabels(folder / "endmembers.shp", "class", scene, class_names=RONDONIA_CLASSES)
        tile_scene(scene, tiles, tile_size=TILE, labeller=labels, center_on_points=True)
    run = tmp_path_factory.mktemp("contract-run")
    cfg = compose_train_config(run, ["data=manifest", f"data.root={tiles}", "data.batch_size=8", "trainer.max_epochs=2",
                                     "model.input_pool=1", "report.enabled=false"])
    return train(cfg)["best_checkpoint"]


def _write(path, profile, data, descriptions=None):
    with rasterio.open(path, "w", **{**profile, "count": data.shape[0]}) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = tuple(descriptions)
    return path


def _holey_scene(scenes_root, path):
    """The Rondonia scene with nodata holes: a block in every band, a block in one band, scattered pixels."""
    with rasterio.open(scenes_root / "rondonia-landsat8" / "LC08_232066_20190727.tif") as src:
        profile, data = src.profile, src.read()
    nodata = int(profile["nodata"])
    data[:, 20:40, 30:60] = nodata
    data[2, 100:130, 100:120] = nodata
    data[:, np.random.default_rng(0).random(data.shape[1:]) < 0.05] = nodata
    return _write(path, profile, data)


@pytest.mark.slow  # trains the module fixture
def test_prediction_gives_the_training_path_logits_on_a_scene_with_nodata(rondonia_model, scenes_root, tmp_path):
    model, spec = load_classifier(rondonia_model)
    scene_path = _holey_scene(scenes_root, tmp_path / "holey.tif")
    # tiles of the holey scene on the prediction grid, read the way training reads tiles
    root = tmp_path / "tiles"
    with Scene(scene_path) as scene:
        tile_scene(scene, root, tile_size=TILE, max_nodata=1.0)
    with (root / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.update(labels="forest", split="test")
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dm = TileDataModule.from_keys(ManifestLayout(root, class_names=spec.class_names), input_spec=spec, resplit=True)
    dm.setup("test")
    tiles = dm.datasets["test"]
    assert len(tiles) == len(rows) == 14 * 19
    with torch.no_grad():
        trained = model(torch.stack([torch.from_numpy(tiles.read(i)) for i in range(len(tiles))]))
    # the same pixels cut from the scene by predict_scene (one window per output pixel)
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with Scene(scene_path) as scene:
        predict_scene(model, spec, scene, tmp_path / "map.tif", stride=TILE, max_nodata=1.0, dtype="float32")
    hook.remove()
    predicted = torch.cat(seen).view(15, 20, -1)  # every window row is one batch
    positions = [(int(s.split("_r")[1][:5]) // TILE, int(s.split("_c")[1][:5]) // TILE) for s in tiles.sources]
    expected = torch.stack([predicted[r, c] for r, c in positions])
    torch.testing.assert_close(expected, trained, atol=1e-5, rtol=0)
    # the holes matter: raw nodata values give other logits
    raw = torch.stack([torch.from_numpy(tiles.read_valid(i)[0]) for i in range(len(tiles))])
    holes = (raw == spec.nodata).flatten(1).any(dim=1)
    assert holes.sum() > 20
    with torch.no_grad():
        unfilled = model(raw[holes])
    assert (unfilled - trained[holes]).abs().max() > 1e-2


def test_band_order_is_matched_by_name_or_said_to_be_trusted(scenes_root, tmp_path):
    ckpt = save_untrained(tmp_path / "named.ckpt", "multiclass", ["a", "b", "c"], bands=6, tile=TILE, band_names=NAMES,
                          normalization=Normalization([7.0] * 6, [1.0] * 6))
    model, spec = load_classifier(ckpt)
    with rasterio.open(scenes_root / "rondonia-landsat8" / "LC08_232066_20190727.tif") as src:
        profile, data = src.profile, src.read()
    scenes = {
        "named": (data, NAMES),
        "reversed": (data[::-1], NAMES[::-1]),
        "plain": (data, None),
        "plain_reversed": (data[::-1], None),
    }
    maps, orders = {}, {}
    for name, (values, descriptions) in scenes.items():
        path = _write(tmp_path / f"{name}.tif", profile, np.ascontiguousarray(values), descriptions)
        with Scene(path) as scene:
            summary = predict_scene(model, spec, scene, tmp_path / f"{name}_map.tif", dtype="float32")
        with rasterio.open(summary["out"]) as dst:
            maps[name], orders[name] = dst.read(), dst.tags()["band_order"]
        assert orders[name] == summary["band_order"]
    assert orders["named"].startswith("matched by name") and "are bands [1, 2, 3, 4, 5, 6]" in orders["named"]
    assert orders["reversed"].startswith("matched by name") and "are bands [6, 5, 4, 3, 2, 1]" in orders["reversed"]
    np.testing.assert_array_equal(maps["reversed"], maps["named"])
    assert orders["plain"].startswith("trusted (the file has no band descriptions)")
    np.testing.assert_array_equal(maps["plain"], maps["named"])
    assert not np.allclose(maps["plain_reversed"][1:], maps["named"][1:], equal_nan=True)  # what names prevent
    renamed = _write(tmp_path / "renamed.tif", profile, data, ["blue", "green", "red", "nir", "swir1", "thermal"])
    with Scene(renamed) as scene, pytest.raises(TileError) as refused:
        predict_scene(model, spec, scene, tmp_path / "never.tif")
    assert f"has bands {['blue', 'green', 'red', 'nir', 'swir1', 'thermal']}" in str(refused.value)
    assert f"the checkpoint needs {NAMES} in this order" in str(refused.value)
    assert not (tmp_path / "never.tif").exists()
    # tiles carry the scene's descriptions: the tile CSV matches them by name too
    with Scene(tmp_path / "reversed.tif") as scene:
        tile_scene(scene, tmp_path / "reversed_tiles", tile_size=TILE, stride=64)
    summary = predict_tiles(model, spec, tmp_path / "reversed_tiles", tmp_path / "tiles.csv")
    written = len(list((tmp_path / "reversed_tiles" / "tiles").glob("*.tif")))
    assert summary["band_order"].startswith("matched by name") and summary["tiles"] == written > 0


def test_contract_round_trips_as_plain_data():
    split = SplitRecord("ManifestLayout", "/data/tiles", "spatial", 7, 0.1, 0.2, {"train": ["a.tif"], "val": ["b.tif"], "test": []},
                        block_size=1500.0, buffer=30.0, dropped_at_edges=2, class_counts={"train": {"x": 1}})
    spec = untrained_spec("multilabel", ["x", "y"], 3, 16, nodata=float("nan"), thresholds=[0.3, 0.7], split=split)
    plain = spec.to_dict()
    assert plain["nodata"] == "nan" and plain["split"]["lists"]["train"] == ["a.tif"]
    again = InputSpec.from_dict(plain)
    assert math.isnan(again.nodata) and again.split == split and again.thresholds == [0.3, 0.7]
    assert again.split.digest == split.digest != SplitRecord(**{**plain["split"], "lists": {"train": ["b.tif"]}}).digest
    # weights-style normalisation: x / 10000, then the weights' mean/std; nodata gets the mean
    norm = Normalization([0.1, 0.2, 0.3], [0.05, 0.05, 0.05], transform="scale", scale=10000.0, source="weights")
    assert norm.fill() == pytest.approx([1000.0, 2000.0, 3000.0])
    image = np.array([[[5.0, float("nan")]], [[7.0, 8.0]], [[9.0, 10.0]]], np.float32)
    filled = untrained_spec("multiclass", ["a"], 3, 1, normalization=norm).prepare(image)
    assert filled[0, 0, 1] == pytest.approx(1000.0) and filled[0, 0, 0] == 5.0
    with pytest.raises(ValueError, match="transform must be one of"):
        Normalization([0.0], [1.0], transform="sqrt")


def _full_spec() -> InputSpec:
    """A contract with every record filled."""
    return InputSpec(
        task="multiclass", class_names=["forest", "pasture"], bands=[4, 3, 2], nodata=0.0,
        source=SourceRecord(6, "uint16", [120.0, 230.0, 310.0], [2100.0, 2400.0, 3900.0], [30.0, 30.0], "m"),
        normalization=Normalization([6.1, 6.2, 6.3], [0.4, 0.5, 0.6]), tile_size=[16, 16],
        band_names=["B4", "B3", "B2"], network=NetworkInput([0, 2], 2), thresholds=None,
        calibration=Calibration(1.7, [0.25, -0.25]),
    )


def test_contract_records_round_trip_nested():
    spec = _full_spec()
    plain = spec.to_dict()
    assert plain["source"] == {"band_count": 6, "dtype": "uint16", "value_low": [120.0, 230.0, 310.0],
                               "value_high": [2100.0, 2400.0, 3900.0], "pixel_size": [30.0, 30.0], "pixel_units": "m"}
    assert plain["network"] == {"bands": [0, 2], "pool": 2}
    assert plain["calibration"] == {"temperature": 1.7, "bias": [0.25, -0.25]}
    assert InputSpec.from_dict(plain) == spec
    uncalibrated = untrained_spec("multilabel", ["x"], 2, 8)
    assert uncalibrated.to_dict()["calibration"] is None and uncalibrated.network == NetworkInput(None, 1)
    assert InputSpec.from_dict(uncalibrated.to_dict()) == uncalibrated


def test_a_flat_contract_of_older_checkpoints_loads():
    """The layout checkpoints and ONNX exports wrote before the contract had sub-records."""
    flat = {
        "task": "multiclass", "class_names": ["forest", "pasture"], "bands": [4, 3, 2],
        "source_band_count": 6, "source_dtype": "uint16", "nodata": 0.0,
        "normalization": {"mean": [6.1, 6.2, 6.3], "std": [0.4, 0.5, 0.6], "transform": "log1p", "scale": 1.0,
                          "source": "training"},
        "tile_size": [16, 16], "band_names": ["B4", "B3", "B2"], "network_bands": [0, 2], "input_pool": 2,
        "thresholds": None, "split": None,
        "value_low": [120.0, 230.0, 310.0], "value_high": [2100.0, 2400.0, 3900.0],
        "pixel_size": [30.0, 30.0], "pixel_units": "m",
        "calibration_temperature": 1.7, "calibration_bias": [0.25, -0.25],
    }
    assert InputSpec.from_dict(flat) == _full_spec()
    # written before the value range, pixel size, band subset, pooling and correction were recorded
    oldest = {k: v for k, v in flat.items() if k not in ("value_low", "value_high", "pixel_size", "pixel_units",
                                                          "network_bands", "input_pool", "calibration_temperature",
                                                          "calibration_bias")}
    spec = InputSpec.from_dict(oldest)
    assert spec.source == SourceRecord(6, "uint16") and spec.network == NetworkInput(None, 1)
    assert spec.calibration is None
    uncorrected = InputSpec.from_dict({**flat, "calibration_temperature": None, "calibration_bias": None})
    assert uncorrected.calibration is None


@pytest.mark.parametrize("change,unknown", [
    ({"colour": "red"}, "colour"),
    ({"source": {"band_count": 6, "dtype": "uint16", "gain": 2.0}}, "gain"),
    ({"network": {"bands": None, "pool": 1, "stride": 2}}, "stride"),
    ({"calibration": {"temperature": 1.0, "bias": [0.0, 0.0], "offset": 1.0}}, "offset"),
    ({"input_pool": 2}, "input_pool"),  # a flat key beside its record is not read as either
])
def test_a_contract_with_an_unknown_key_is_refused_naming_it(change, unknown):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{unknown}'"):
        InputSpec.from_dict({**_full_spec().to_dict(), **change})
