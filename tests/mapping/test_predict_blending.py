"""Full-resolution blending: the same map as the dense tent-weight formula, with memory that
does not grow with the number of windows (stride 1 holds what stride 16 holds)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from deforest.mapping.predict import _classify, load_classifier, predict_scene
from deforest.mapping.scene import Scene
from deforest.mapping.sliding import tent, window_starts
from tests.mapping.test_predict import save_untrained


def _dense_blend(model, spec, scene, stride: int, batch_size: int = 256, max_nodata: float = 0.5):
    """The tent-weighted mean with a dense ``[windows, width]`` weight matrix per row of windows,
    as predict computed it before blending became separable: ``(probs, invalid)`` of the scene."""
    tile = spec.tile_size[0]
    ys, xs = window_starts(scene.height, tile, stride), window_starts(scene.width, tile, stride)
    weight = tent(tile)
    wx = np.zeros((len(xs), scene.width))
    for k, x in enumerate(xs):
        wx[k, x : x + tile] = weight
    out = np.zeros((spec.num_classes, scene.height, scene.width))
    invalid = np.zeros((scene.height, scene.width), bool)
    kept, done = [], 0
    for r, y in enumerate(ys):
        strip = scene.read(Window(0, y, scene.width, tile), spec.bands)
        probs, valid = _classify(model, spec, scene, strip, [(0, x) for x in xs], batch_size, max_nodata)
        kept.append((y, probs, valid))
        final = ys[r + 1] if r + 1 < len(ys) else scene.height
        num = np.zeros((spec.num_classes, final - done, scene.width))
        den = np.zeros((final - done, scene.width))
        for y0, p, v in kept:
            wy = np.zeros(final - done)
            lo, hi = max(y0, done), min(y0 + tile, final)
            if lo >= hi:
                continue
            wy[lo - done : hi - done] = weight[lo - y0 : hi - y0]
            num += wy[None, :, None] * ((p * v[:, None]).T @ wx)[:, None, :]
            den += wy[:, None] * (v @ wx)[None, :]
        rows = Window(0, done, scene.width, final - done)
        out[:, done:final] = num / np.maximum(den, 1e-12)[None]
        invalid[done:final] = (den == 0) | scene.nodata_mask(scene.read(rows, spec.bands))
        done = final
        kept = [k for k in kept if k[0] + tile > done]
    return out, invalid


@pytest.fixture(scope="module")
def bahamas_crop(scenes_root, tmp_path_factory) -> Path:
    """A 60 x 100 px corner of the real Landsat 7 Bahamas scene, nodata collar included."""
    out = tmp_path_factory.mktemp("bahamas") / "crop.tif"
    with rasterio.open(scenes_root / "landsat7-bahamas" / "RGB.byte.tif") as src:
        window = Window(0, 300, 100, 60)
        profile = {**src.profile, "width": 100, "height": 60, "transform": src.window_transform(window)}
        profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
        data = src.read(window=window)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    assert (data == 0).all(axis=0).any() and (data != 0).all(axis=0).any()  # nodata and valid pixels
    return out


@pytest.mark.parametrize("stride", [1, 16])
def test_separable_blending_writes_the_dense_formulas_map(bahamas_crop, tmp_path, stride):
    torch.manual_seed(0)
    model, spec = load_classifier(save_untrained(tmp_path / "rgb.ckpt", "multiclass", ["land", "water", "cloud"],
                                                 bands=3, tile=32))
    with Scene(bahamas_crop) as scene:
        expected, invalid = _dense_blend(model, spec, scene, stride)
        predict_scene(model, spec, scene, tmp_path / "f32.tif", stride=stride, full_resolution=True, dtype="float32")
        predict_scene(model, spec, scene, tmp_path / "u8.tif", stride=stride, full_resolution=True)
    assert invalid.any() and not invalid.all()
    with rasterio.open(tmp_path / "f32.tif") as f32, rasterio.open(tmp_path / "u8.tif") as u8:
        probs, scaled = f32.read()[1:], u8.read()[1:]
        classes = u8.read(1)
    # float32 bands: bit for bit the dense formula's values, nodata where it has none
    want = np.where(invalid[None], np.float32(np.nan), expected.astype(np.float32))
    np.testing.assert_array_equal(probs, want)
    np.testing.assert_array_equal(scaled, np.where(invalid[None], 255, np.rint(expected * 254)).astype(np.uint8))
    np.testing.assert_array_equal(classes, np.where(invalid, 255, expected.argmax(axis=0)).astype(np.uint8))
    assert np.nanstd(probs) > 1e-3  # probabilities that vary over the map (an untrained model's)


def _wide_scene(path: Path, width: int, height: int) -> Path:
    rng = np.random.default_rng(5)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint16") as dst:
        dst.write(rng.integers(1, 5000, (3, height, width), dtype=np.uint16))
    return path


def test_full_resolution_memory_does_not_grow_with_the_windows(tmp_path):
    """Peak traced (NumPy) memory of a 2048 px wide strip at stride 1 stays within 1.2x of
    stride 16: the dense weights alone were 33 MB at stride 1 against 2 MB at stride 16."""
    torch.manual_seed(0)
    model, spec = load_classifier(save_untrained(tmp_path / "m.ckpt", "multiclass", ["a", "b"], bands=3, tile=32))
    scene_path = _wide_scene(tmp_path / "wide.tif", 2048, 40)
    peaks = {}
    for stride in (16, 1):
        with Scene(scene_path) as scene:
            tracemalloc.start()
            summary = predict_scene(model, spec, scene, tmp_path / f"s{stride}.tif", stride=stride,
                                    full_resolution=True, batch_size=64)
            peaks[stride] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert summary["windows"] == len(window_starts(40, 32, stride)) * len(window_starts(2048, 32, stride))
    assert peaks[1] <= 1.2 * peaks[16], {s: f"{p / 2**20:.1f} MB" for s, p in peaks.items()}
