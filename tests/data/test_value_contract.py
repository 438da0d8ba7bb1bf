"""The contract records the training tiles' dtype, value range and pixel size, and deforest-eval and
deforest-predict (checkpoint and ONNX) refuse an input on another scale or resolution before any
inference: one line naming both sides, or a warning and a run under ``allow_*=true``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from hydra import compose, initialize_config_module
from rasterio.warp import Resampling, calculate_default_transform, reproject

from deforest.core.contract import InputSpec
from deforest.core.errors import DatasetError
from deforest.mapping.serve import load_onnx
from deforest.training.module import TileClassifier
from tests.conftest import REPO
from tests.mapping.test_export import _train, run_export  # how test_export trains and exports its EuroSAT model
from tests.mapping.test_serve import mosaic, predict_with  # a scene of real EuroSAT test tiles; the command on it

pytestmark = pytest.mark.slow  # the module fixture trains a model


@pytest.fixture(scope="module")
def model(tmp_path_factory, eurosat_root) -> dict[str, Path]:
    """A model trained one epoch on the EuroSAT sample (uint16, 10 m), its ONNX export and a scene."""
    root = tmp_path_factory.mktemp("value-contract")
    ckpt = Path(_train(root / "run", []))
    return {"root": root, "ckpt": ckpt, "onnx": run_export(root, str(ckpt), "onnx"),
            "scene": mosaic(eurosat_root, root / "mosaic.tif")}


def _rewrite(src: Path, dest: Path, dtype: str, scale: float = 1.0) -> Path:
    """``src`` with its values divided by ``scale``, stored as ``dtype`` (same grid and nodata)."""
    with rasterio.open(src) as ds:
        profile, pixels = ds.profile, ds.read().astype(np.float64)
    profile.update(dtype=dtype)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dest, "w", **profile) as out:
        out.write((pixels / scale).astype(dtype))
    return dest


def _coarser(src: Path, dest: Path, factor: int) -> Path:
    """``src`` averaged onto a grid of ``factor`` times its pixel size (same extent, CRS, dtype)."""
    with rasterio.open(src) as ds:
        profile = ds.profile
        shape = (ds.count, ds.height // factor, ds.width // factor)
        pixels = ds.read(out_shape=shape, resampling=Resampling.average)
        profile.update(width=shape[2], height=shape[1], transform=ds.transform @ Affine.scale(factor))
    with rasterio.open(dest, "w", **profile) as out:
        out.write(pixels)
    return dest


def _geographic(src: Path, dest: Path, factor: float = 1.0) -> Path:
    """``src`` warped to EPSG:4326 at about its own pixel size (times ``factor``) in degrees."""
    with rasterio.open(src) as ds:
        transform, width, height = calculate_default_transform(ds.crs, "EPSG:4326", ds.width, ds.height, *ds.bounds)
        transform = transform @ Affine.scale(factor)
        width, height = int(width / factor), int(height / factor)
        profile = ds.profile
        profile.update(crs="EPSG:4326", transform=transform, width=width, height=height)
        with rasterio.open(dest, "w", **profile) as out:
            for band in range(1, ds.count + 1):
                reproject(rasterio.band(ds, band), rasterio.band(out, band), resampling=Resampling.nearest)
    return dest


def _eval_config(model: dict, root: Path, out: Path, *overrides: str):
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose("eval", overrides=[
            f"paths.root_dir={REPO}", f"paths.output_dir={out}", f"paths.cache_dir={model['root'] / 'cache'}",
            f"ckpt_path={model['ckpt']}", f"data.root={root}", "split=test", "trainer.enable_progress_bar=false",
            "report.enabled=false", *overrides,
        ])


def test_the_contract_records_dtype_value_range_and_pixel_size(model, eurosat_root):
    spec = TileClassifier.load_from_checkpoint(model["ckpt"], map_location="cpu").input_spec
    source = spec.source
    assert source.dtype == "uint16" and source.pixel_units == "m"
    assert source.pixel_size == pytest.approx([10.0, 10.0], abs=0.05)  # EuroSAT: ~10.007 x 10.02 m
    # the 2nd/98th percentiles of the training split's pixels, per band, from a sample of them
    pixels = []
    for path in sorted(eurosat_root.glob("train/*/*.tif")):
        with rasterio.open(path) as src:
            pixels.append(src.read().reshape(13, -1).astype(np.float64))
    pixels = np.concatenate(pixels, axis=1)
    low, high = np.percentile(pixels, [2, 98], axis=1)
    np.testing.assert_allclose(source.value_low, low, rtol=0.1, atol=2)
    np.testing.assert_allclose(source.value_high, high, rtol=0.1, atol=2)
    assert source.value_high[3] > 1000  # B04 in reflectance x 10000, not 0..1
    exported = load_onnx(model["onnx"], "cpu")[1].source  # the contract the torch-free path reads from the graph
    assert (exported.value_low, exported.value_high) == (source.value_low, source.value_high)
    assert (exported.pixel_size, exported.pixel_units) == (source.pixel_size, source.pixel_units)


def test_eval_refuses_float_copies_of_the_test_tiles(model, eurosat_root, tmp_path, caplog):
    """EuroSAT test tiles as float32 reflectance 0..1 on a model trained on uint16 x10000."""
    data = tmp_path / "float"
    for tile in sorted(eurosat_root.glob("test/*/*.tif")):
        _rewrite(tile, data / tile.relative_to(eurosat_root), "float32", 10000.0)
    from deforest.cli.eval import evaluate, main

    message = (r"float \(test tiles\): dtype float32 with values 0\.\d+-0\.\d+, the model was trained on uint16 "
               r"values \d+-\d+ \(band B\w+: 2nd-98th percentiles, about \d+x larger\) \(allow_dtype=true or "
               r"allow_scale=true to evaluate anyway\)$")
    with pytest.raises(DatasetError, match=message):
        evaluate(_eval_config(model, data, tmp_path / "refused"))
    assert not (tmp_path / "refused" / "metrics.json").exists()
    caplog.clear()
    with pytest.raises(SystemExit) as stopped:  # the command: exit 2, one line
        main(_eval_config(model, data, tmp_path / "refused"))
    assert stopped.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("DatasetError: ") and "\n" not in errors[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(_eval_config(model, data, tmp_path / "allowed", "allow_scale=true"))
    assert any("the model was trained on uint16 values" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    assert (tmp_path / "allowed" / "metrics.json").is_file() and 0 <= metrics["test/accuracy"] <= 1


def test_eval_accepts_another_integer_dtype_on_the_same_scale(model, eurosat_root, tmp_path, caplog):
    """int16 copies of the uint16 tiles: another integer dtype, the same values."""
    from deforest.cli.eval import evaluate

    data = tmp_path / "int16"
    for tile in sorted(eurosat_root.glob("test/*/*.tif")):
        _rewrite(tile, data / tile.relative_to(eurosat_root), "int16")
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(_eval_config(model, data, tmp_path / "out"))
    assert 0 <= metrics["test/accuracy"] <= 1
    assert not [r for r in caplog.records if "the model was trained on" in r.getMessage()]


@pytest.mark.parametrize("kind", ["ckpt", "onnx"])
def test_predict_refuses_a_scene_of_twice_the_pixel_size(model, kind, tmp_path, caplog):
    """The real-tile scene averaged onto 20 m pixels; the ONNX model is checked by the torch-free path."""
    coarse = _coarser(model["scene"], tmp_path / "mosaic20.tif", 2)
    message = (r"mosaic20\.tif: pixel size 20 m, the model was trained on 10 m tiles "
               r"\(allow_resolution=true to predict anyway\)")
    with pytest.raises(DatasetError, match=message):
        predict_with(model[kind], coarse, tmp_path / "map.tif")
    assert not (tmp_path / "map.tif").exists()
    with caplog.at_level(logging.WARNING):
        summary = predict_with(model[kind], coarse, tmp_path / "map.tif", "allow_resolution=true")
    assert summary["windows"] > 0 and (tmp_path / "map.tif").is_file()
    assert [r.getMessage() for r in caplog.records if re.search(message, r.getMessage())]  # the same line, warned


@pytest.mark.parametrize("kind", ["ckpt", "onnx"])
def test_predict_refuses_a_float_reflectance_scene(model, kind, tmp_path):
    scene = _rewrite(model["scene"], tmp_path / "reflectance.tif", "float32", 10000.0)
    message = (r"reflectance\.tif: dtype float32 with values 0\.\d+-0\.\d+, the model was trained on uint16 values "
               r"\d+-\d+ \(band B\w+: 2nd-98th percentiles, about \d+x larger\)")
    with pytest.raises(DatasetError, match=message):
        predict_with(model[kind], scene, tmp_path / "map.tif")
    assert not (tmp_path / "map.tif").exists()


@pytest.mark.parametrize("kind", ["ckpt", "onnx"])
def test_predict_accepts_the_scene_at_its_own_resolution_and_dtype(model, kind, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary = predict_with(model[kind], model["scene"], tmp_path / "map.tif")
    assert summary["windows"] > 0 and (tmp_path / "map.tif").is_file()
    assert not [r for r in caplog.records if "the model was trained on" in r.getMessage()]
    # the same pixels as float32 on the same scale: another dtype kind, but the values fit
    scene = _rewrite(model["scene"], tmp_path / "float-dn.tif", "float32")
    assert predict_with(model[kind], scene, tmp_path / "map2.tif")["windows"] == summary["windows"]


def test_predict_tiles_checks_the_first_tiles(model, eurosat_root, tmp_path):
    """``tiles=``: float32 0..1 copies of real test tiles are refused; int16 copies of the same values pass."""
    tiles = sorted(eurosat_root.glob("test/*/*.tif"))[::9]
    for name, dtype, scale in (("float", "float32", 10000.0), ("int16", "int16", 1.0)):
        for tile in tiles:
            _rewrite(tile, tmp_path / name / tile.name, dtype, scale)
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path={model['onnx']}", f"tiles={tmp_path / 'float'}",
                                            f"out={tmp_path / 'float.csv'}", "device=cpu"])
        kept = compose("predict", overrides=[f"ckpt_path={model['onnx']}", f"tiles={tmp_path / 'int16'}",
                                             f"out={tmp_path / 'int16.csv'}", "device=cpu"])
    from deforest.cli.predict import predict

    with pytest.raises(DatasetError, match=r"float: dtype float32 with values 0\.\d+-0\.\d+, the model was trained on "
                                           r"uint16 values \d+-\d+"):
        predict(cfg)
    assert not (tmp_path / "float.csv").exists()
    assert predict(kept)["tiles"] == len(tiles)


def test_geographic_scene_is_compared_in_metres_at_its_latitude(model, tmp_path):
    """A 10 m UTM model on the scene warped to degrees: ~10 m at the scene's latitude passes, ~20 m is refused."""
    same = _geographic(model["scene"], tmp_path / "wgs84.tif")
    assert predict_with(model["onnx"], same, tmp_path / "map.tif")["windows"] > 0
    coarse = _geographic(model["scene"], tmp_path / "wgs84-20.tif", 2.0)
    with pytest.raises(DatasetError, match=r"wgs84-20\.tif: pixel size [\d.e-]+ deg \(about [\d.]+ m at latitude "
                                           r"-?\d+\.\d\), the model was trained on 10 m tiles"):
        predict_with(model["onnx"], coarse, tmp_path / "map2.tif")


def test_a_contract_without_the_new_fields_checks_nothing(model):
    """Checkpoints and exports written before these fields load, and no input is refused for them."""
    from deforest.data.input_check import Allow, InputDescription, check_input

    spec = TileClassifier.load_from_checkpoint(model["ckpt"], map_location="cpu").input_spec
    old = spec.to_dict()
    old["source"] = {k: v for k, v in old["source"].items() if k in ("band_count", "dtype")}
    loaded = InputSpec.from_dict(old)
    assert loaded.source.value_low is None and loaded.source.pixel_size is None and loaded.source.pixel_units is None
    found = InputDescription("scene.tif", "float32", [0.01] * 13, [0.4] * 13, [60.0, 60.0], "m", 0.0)
    assert check_input(loaded, found, Allow(), "predict") == []
    assert len(check_input(spec, found, Allow(dtype=True, scale=True, resolution=True), "predict")) == 2
