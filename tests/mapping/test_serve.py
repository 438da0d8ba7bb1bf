"""deforest-predict on an exported ONNX model (ckpt_path=model.onnx): onnxruntime alone runs it,
through the same windows, blending, nodata handling and writers as the checkpoint, and the map
is the checkpoint's. The in-process tests map a mosaic of real EuroSAT tiles with a nodata corner
(the band-statistics model of test_export); the slow venv test installs deforest without torch and
maps the real Rondonia Landsat 8 scene there with a model trained on tiles cut from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from hydra import compose, initialize_config_module

from deforest.cli.predict import predict
from deforest.core.errors import ConfigError
from deforest.core.safety import CheckpointError
from tests.conftest import REPO
from tests.mapping.test_export import _train, run_export  # how test_export trains and exports its EuroSAT model
from tests.mapping.test_predict import RONDONIA_CLASSES, rondonia  # noqa: F401 (the fixture: a model trained on the Rondonia tiles)

ATOL = 1e-4
GRID = 3  # the scene: GRID x GRID real EuroSAT tiles
NODATA = 0
SERVE_PACKAGES = ["numpy", "rasterio", "onnxruntime", "hydra-core", "omegaconf"]  # pyproject's serve extra


def mosaic(eurosat_root: Path, out: Path) -> Path:
    """A 13-band uint16 scene of real EuroSAT test tiles (3x3, 192x192 px) on the first tile's grid,
    declaring nodata 0, with a 40x70 px nodata corner (windows mostly inside it are not classified)."""
    tiles = sorted((eurosat_root / "test").glob("*/*.tif"))[:: 54 // GRID**2][: GRID**2]
    with rasterio.open(tiles[0]) as src:
        profile, size = src.profile, src.width
    image = np.zeros((profile["count"], GRID * size, GRID * size), np.uint16)
    for i, tile in enumerate(tiles):
        with rasterio.open(tile) as src:
            r, c = divmod(i, GRID)
            image[:, r * size : (r + 1) * size, c * size : (c + 1) * size] = src.read()
    image[:, :40, :70] = NODATA
    profile.update(width=GRID * size, height=GRID * size, nodata=NODATA, tiled=False, compress="deflate")
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(image)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, eurosat_root) -> dict[str, Path]:
    """A model trained one epoch on the EuroSAT sample, its checkpoint and its ONNX export, and a scene."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = Path(_train(root / "run", []))
    onnx = run_export(root, str(ckpt), "onnx")
    return {"ckpt": ckpt, "onnx": onnx, "scene": mosaic(eurosat_root, root / "mosaic.tif")}


def predict_with(model: Path, scene: Path, out: Path, *overrides: str) -> dict:
    """The command's own function on the composed ``predict`` config."""
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path={model}", f"scene={scene}", f"out={out}", "device=cpu", *overrides])
    return predict(cfg)


def assert_same_map(got: Path, expected: Path) -> None:
    """Same grid, bands, nodata and tags (but the model's path); the class band identical, the
    probabilities within ``ATOL`` (one step of 1/254 in uint8 maps, where rounding may tip)."""
    with rasterio.open(got) as a, rasterio.open(expected) as b:
        assert (a.crs, a.transform, a.shape, a.count, a.dtypes) == (b.crs, b.transform, b.shape, b.count, b.dtypes)
        np.testing.assert_equal(a.nodata, b.nodata)  # 255, or NaN in float32 maps
        assert a.descriptions == b.descriptions
        tags_a, tags_b = a.tags(), b.tags()
        assert tags_a.pop("checkpoint").endswith(".onnx") and tags_b.pop("checkpoint").endswith(".ckpt")
        assert tags_a == tags_b
        x, y = a.read(), b.read()
    np.testing.assert_array_equal(x[0], y[0])
    if x.dtype == np.uint8:
        assert np.abs(x[1:].astype(int) - y[1:]).max() <= 1
        assert (x[1:] == y[1:]).mean() > 0.99
    else:
        np.testing.assert_allclose(x[1:], y[1:], atol=ATOL, rtol=0)  # NaN nodata at the same pixels


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize(
    "overrides",
    [[], ["full_resolution=true", "stride=16", "dtype=float32", "batch_size=7"]],
    ids=["per-window-uint8", "full-resolution-float32"],
)
def test_onnx_model_maps_as_its_checkpoint(exported, overrides, tmp_path):
    from_ckpt = predict_with(exported["ckpt"], exported["scene"], tmp_path / "ckpt.tif", *overrides)
    from_onnx = predict_with(exported["onnx"], exported["scene"], tmp_path / "onnx.tif", *overrides)
    assert {k: v for k, v in from_onnx.items() if k != "out"} == {k: v for k, v in from_ckpt.items() if k != "out"}
    assert from_onnx["nodata_windows"] > 0 and from_onnx["windows"] > 0  # the nodata corner was skipped
    assert_same_map(tmp_path / "onnx.tif", tmp_path / "ckpt.tif")
    with rasterio.open(tmp_path / "onnx.tif") as src:
        classes, probs = src.read(1), src.read()[1:].astype(np.float64)
        assert src.width == (192 if "full_resolution=true" in overrides else 3)
        nodata, uint8 = src.nodata, src.dtypes[0] == "uint8"
    valid = classes != nodata if uint8 else ~np.isnan(probs[0])
    assert 0 < valid.mean() < 1  # the nodata corner is nodata in the map, the rest is classified
    scale = 254 if uint8 else 1
    np.testing.assert_allclose(probs[:, valid].sum(axis=0) / scale, 1.0, atol=len(probs) / 254 if scale > 1 else 1e-4)
    assert len(np.unique(classes[valid])) > 1  # real tiles of several classes, not one answer everywhere


@pytest.mark.slow  # trains a model
def test_onnx_tile_size_cannot_change(exported, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.onnx: the ONNX model takes 64x64 windows, not 32x32"):
        predict_with(exported["onnx"], exported["scene"], tmp_path / "map.tif", "tile_size=32")
    assert not (tmp_path / "map.tif").exists()


def test_onnx_file_without_the_contract_is_refused(tmp_path, scenes_root):
    """An ONNX file not written by deforest-export, and a file that is no ONNX model: one line each."""
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model\x00" * 20)
    scene = scenes_root / "landsat7-bahamas" / "RGB.byte.tif"
    with pytest.raises(CheckpointError, match=r"garbage\.onnx: is not a readable ONNX model: .*INVALID_PROTOBUF"):
        predict_with(garbage, scene, tmp_path / "map.tif")
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["raw"], ["probabilities"])], "plain",
                                   [onnx.helper.make_tensor_value_info("raw", onnx.TensorProto.FLOAT, [1, 2])],
                                   [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, 2])])
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(plain))
    with pytest.raises(CheckpointError, match=r"plain\.onnx: has no deforest\.export metadata: not a model written by deforest-export"):
        predict_with(plain, scene, tmp_path / "map.tif")
    assert not (tmp_path / "map.tif").exists()


NO_TORCH = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):  # as in an install without them: importing one fails
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Absent())
import deforest.cli.predict, deforest.core.cpu, deforest.runs.sweeps, deforest.core.safety  # the command and its Hydra callbacks
print(sorted(m for m in sys.modules if m.split(".")[0] in {absent!r}))
"""


def test_the_onnx_path_imports_no_torch():
    """What ``deforest-predict`` and its Hydra callbacks import at start, with torch, Lightning,
    albumentations, torchvision, scipy and pandas made unimportable (fast; the slow test below
    checks the same in a real venv without them)."""
    absent = {"torch", "lightning", "albumentations", "torchvision", "torchmetrics", "scipy", "pandas", "matplotlib"}
    done = subprocess.run([sys.executable, "-c", NO_TORCH.format(absent=absent)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_the_reader_knows_what_the_exporter_writes():
    """The torch-free reader accepts the version the exporter writes, and both use one metadata key."""
    from deforest.mapping import export, serve

    assert serve.METADATA_KEY == export.METADATA_KEY == "deforest.export"
    assert export.EXPORT_VERSION in serve.EXPORT_VERSIONS
    assert serve.ONNX_SUFFIX == export.FORMATS["onnx"]


# ---- a venv without torch ------------------------------------------------------------------------
def _pip(venv: Path, *args: str) -> None:
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


@pytest.fixture(scope="session")
def serve_venv(tmp_path_factory) -> Path:
    """``python3.11 -m venv``, the serve extra's packages from the package index, then deforest itself
    with ``pip install --no-deps`` (from a copy of the sources: no build files in the checkout).
    About 20 s with a warm pip cache."""
    python = shutil.which("python3.11") or sys.executable
    venv = tmp_path_factory.mktemp("serve-venv") / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    _pip(venv, *SERVE_PACKAGES)
    source = tmp_path_factory.mktemp("serve-src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    for folder in ("deforest", "conf"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "local"))
    _pip(venv, "--no-deps", str(source))
    return venv


@pytest.fixture(scope="module")
def rondonia_onnx(rondonia, tmp_path_factory) -> Path:
    """The ONNX export of test_predict's model trained on the Rondonia tiles."""
    return run_export(tmp_path_factory.mktemp("rondonia-onnx"), rondonia["ckpt"], "onnx")


def outside_env() -> dict[str, str]:
    """This environment without what points Python at the checkout or at this test's venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def deforest_predict_in(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The ``deforest-predict`` console script of ``venv``."""
    return subprocess.run([str(venv / "bin" / "deforest-predict"), *args, f"hydra.run.dir={cwd / 'run'}"],
                          capture_output=True, text=True, env=outside_env(), cwd=cwd, timeout=600)


@pytest.mark.slow  # builds a venv (network: the package index) and trains a model on the Rondonia tiles
@pytest.mark.parametrize(
    "overrides",
    [["full_resolution=true", "stride=8", "dtype=float32"], []],
    ids=["full-resolution-float32", "per-window-uint8"],
)
def test_onnx_prediction_without_torch_maps_a_real_scene_as_deforest_predict(serve_venv, rondonia, rondonia_onnx, overrides,
                                                                            tmp_path):
    """The Rondonia Landsat 8 clip (318x235, int16) mapped by a model trained on tiles cut from it
    around its labelled points: its ONNX export run by deforest-predict in a venv without torch,
    against deforest-predict on the checkpoint, over the whole scene."""
    env = outside_env()
    python = serve_venv / "bin" / "python"
    absent = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert absent.returncode == 1 and "No module named 'torch'" in absent.stderr
    for package in ("lightning", "albumentations", "torchvision", "scipy", "pandas"):
        assert subprocess.run([str(python), "-c", f"import {package}"], capture_output=True, env=env).returncode == 1
    out = tmp_path / "onnx.tif"
    done = deforest_predict_in(serve_venv, tmp_path, f"ckpt_path={rondonia_onnx}", f"scene={rondonia['scene']}", f"out={out}",
                               *overrides)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    predict_with(Path(rondonia["ckpt"]), rondonia["scene"], tmp_path / "ckpt.tif", *overrides)
    assert_same_map(out, tmp_path / "ckpt.tif")
    with rasterio.open(rondonia["scene"]) as scene, rasterio.open(out) as src:
        if overrides:  # the scene's own grid
            assert (src.crs, src.transform, src.shape) == (scene.crs, scene.transform, (235, 318))
        else:  # one pixel per 16x16 window, from the scene's corner
            assert src.crs == scene.crs and src.transform == scene.transform @ Affine.scale(16) and src.shape == (15, 20)
        classes, probs = src.read(1), src.read()[1:].astype(np.float64)
        row_col = [src.index(x, y) for x, y, _ in rondonia["points"]]
        names = json.loads(src.tags()["class_names"])
    assert probs.shape[0] == 4 and not np.isnan(probs).any()  # no nodata in this scene: every pixel is classified
    scale = 1 if overrides else 254
    np.testing.assert_allclose(probs.sum(axis=0) / scale, 1.0, atol=1e-4 if overrides else 4 / 254)
    assert len(np.unique(classes)) > 1  # forest, agriculture, ...: not one answer everywhere
    if overrides:
        assert names == sorted(RONDONIA_CLASSES.values())
        hits = [names[int(classes[r, c])] == tag for (r, c), (_, _, tag) in zip(row_col, rondonia["points"])]
        assert np.mean(hits) >= 0.6, np.mean(hits)  # the labelled points are mapped to their class
