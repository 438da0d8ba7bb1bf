"""Forest loss from two dates: pair samples, pair scenes, change maps and their areas.

Most pairs here are the real Rondonia Landsat 8 scene (``before``) and the same scene with
seeded clearings (``after``): forest pixels inside random disks get the spectrum of a real
bare-soil pixel of the same scene. That gives exact loss labels to test the mechanics with; it
is not evidence of how well a model finds real clearings. The one real two-date sample shipped
(data/scenes/colorado-landsat5, see data/README.md) runs the whole sequence at the end.
"""

from __future__ import annotations

import csv
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from hydra import compose, initialize_config_module
from scipy import ndimage

from deforest.cli.predict import predict
from deforest.cli.train import train
from deforest.core.contract import InputSpec
from deforest.core.errors import ConfigError, DatasetError
from deforest.data.pairs import PairLayout
from deforest.mapping.change import (
    HIGH,
    LOW,
    NO_CHANGE,
    change_map,
    confidence_classes,
    loss_hectares,
    pixel_areas,
    remove_small_patches,
)
from deforest.training.module import TileClassifier

RONDONIA = Path(__file__).resolve().parents[2] / "data" / "scenes" / "rondonia-landsat8" / "LC08_232066_20190727.tif"
# Landsat 8 surface reflectance bands 2-7 of the scikit-eo clip (blue, green, red, NIR, SWIR1, SWIR2)
BANDS = ["B2", "B3", "B4", "B5", "B6", "B7"]
TILE, STRIDE = 32, 16


def _write(path: Path, data: np.ndarray, profile: dict, descriptions=None) -> Path:
    with rasterio.open(path, "w", **{**profile, "count": data.shape[0]}) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = tuple(descriptions)
    return path


def simulate_clearing(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The real scene, the scene after seeded clearings, the loss mask and the profile."""
    with rasterio.open(RONDONIA) as src:
        before, profile = src.read(), src.profile
    values = before.astype(np.float32)
    ndvi = (values[3] - values[2]) / (values[3] + values[2])
    forest = ndvi > 0.8  # a quarter of the clip: dense canopy
    soil = np.flatnonzero(((ndvi < 0.35) & (values[4] > 1500)).ravel())  # bright bare soil / pasture
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(forest)
    yy, xx = np.mgrid[: before.shape[1], : before.shape[2]]
    loss = np.zeros(forest.shape, bool)
    for k in rng.choice(len(rows), 45, replace=False):
        radius = rng.uniform(3, 8)
        loss |= (yy - rows[k]) ** 2 + (xx - cols[k]) ** 2 <= radius**2
    loss &= forest
    after = before.copy()
    donors = rng.choice(soil, int(loss.sum()))  # a real soil pixel's spectrum for each cleared pixel
    after[:, loss] = before.reshape(before.shape[0], -1)[:, donors]
    return before, after, loss, profile


def write_pairs(root: Path, multilabel: bool = False) -> dict:
    """32 px tile pairs every 16 px (``t0/``, ``t1/``) and ``pairs.csv``; returns counts."""
    before, after, loss, profile = simulate_clearing()
    values = before.astype(np.float32)
    forest = (values[3] - values[2]) / (values[3] + values[2]) > 0.8
    for date in ("t0", "t1"):
        (root / date).mkdir(parents=True)
    rows, counts = [], {}
    for r in range(0, before.shape[1] - TILE + 1, STRIDE):
        for c in range(0, before.shape[2] - TILE + 1, STRIDE):
            share = loss[r : r + TILE, c : c + TILE].mean()
            if 0 < share < 0.03:
                continue  # a few cleared pixels: neither clearly loss nor clearly stable
            if multilabel:
                tags = (["forest"] if forest[r : r + TILE, c : c + TILE].mean() >= 0.3 else []) + (["loss"] if share > 0 else [])
                tags = tags or ["nonforest"]
            else:
                tags = ["loss" if share > 0 else "stable"]
            window = rasterio.windows.Window(c, r, TILE, TILE)
            tile_profile = {**profile, "width": TILE, "height": TILE,
                            "transform": rasterio.windows.transform(window, profile["transform"])}
            name = f"r{r:03d}_c{c:03d}.tif"
            _write(root / "t0" / name, before[:, r : r + TILE, c : c + TILE], tile_profile)
            _write(root / "t1" / name, after[:, r : r + TILE, c : c + TILE], tile_profile)
            rows.append({"before": f"t0/{name}", "after": f"t1/{name}", "labels": " ".join(tags)})
            for tag in tags:
                counts[tag] = counts.get(tag, 0) + 1
    with (root / "pairs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["before", "after", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return {"pairs": len(rows), "counts": counts}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pairs")
    return {"root": root, **write_pairs(root)}


# ---- the layout ------------------------------------------------------------------------------
def test_pair_layout_stacks_both_dates_with_dated_band_names(pairs):
    layout = PairLayout(pairs["root"], band_names=BANDS)
    index = layout.build_index()
    assert len(index) == pairs["pairs"] and index.class_names == ["loss", "stable"]
    assert pairs["counts"]["loss"] >= 40 and pairs["counts"]["stable"] >= 40, pairs["counts"]
    assert layout.band_names == [f"{b}@t0" for b in BANDS] + [f"{b}@t1" for b in BANDS]
    assert layout.band_count(6) == 12
    row = index.class_names.index("loss")
    source = next(s for s, t in zip(index.sources, index.targets) if t == row)
    image, nodata = layout.read_with_nodata(source, None)
    before, after = layout.pair_files(source)
    with rasterio.open(before) as b, rasterio.open(after) as a:
        np.testing.assert_array_equal(image[:6], b.read().astype(np.float32))
        np.testing.assert_array_equal(image[6:], a.read().astype(np.float32))
        assert not np.array_equal(b.read(), a.read())  # a loss pair differs between the dates
    assert nodata == [-9999.0] * 12
    chosen, chosen_nodata = layout.read_with_nodata(source, [4, 10])  # B5 (NIR) of each date
    np.testing.assert_array_equal(chosen, image[[3, 9]])
    assert layout.header_source(source) == before


def test_pair_not_on_one_grid_is_refused(pairs, tmp_path):
    root = tmp_path / "shifted"
    (root / "t0").mkdir(parents=True)
    (root / "t1").mkdir()
    with rasterio.open(pairs["root"] / "t0" / "r000_c000.tif") as src:
        data, profile = src.read(), src.profile
    _write(root / "t0" / "a.tif", data, profile)
    _write(root / "t1" / "a.tif", data, {**profile, "transform": profile["transform"] @ Affine.translation(1, 0)})
    (root / "pairs.csv").write_text("before,after,labels\nt0/a.tif,t1/a.tif,loss\n")
    with pytest.raises(DatasetError, match=r"pairs.csv, line 2: after .*t1/a.tif is not on the grid of before .*t0/a.tif"):
        PairLayout(root).build_index()
    (root / "pairs.csv").write_text("before,after,labels\nt0/a.tif,t0/a.tif,loss\n")
    with pytest.raises(DatasetError, match="line 2: before and after are the same file"):
        PairLayout(root).build_index()


# ---- training through the real entry, both heads ---------------------------------------------
def _train_pairs(train_config, root: Path, extra: list[str]) -> tuple[dict, InputSpec]:
    cfg = train_config(["experiment=forest_loss", f"data.root={root}", f"data.layout.band_names=[{','.join(BANDS)}]",
                        "model.input_pool=1", "trainer.max_epochs=1", "data.batch_size=32", *extra])
    metrics = train(cfg)
    model = TileClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu")
    return metrics, model.input_spec


def test_pairs_train_multiclass_and_predict_writes_change_map(train_config, pairs, tmp_path):
    metrics, spec = _train_pairs(train_config, pairs["root"], [])
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    assert spec.task == "multiclass" and spec.class_names == ["loss", "stable"]
    assert spec.band_names == [f"{b}@t0" for b in BANDS] + [f"{b}@t1" for b in BANDS]
    assert spec.bands == list(range(1, 13)) and spec.source.band_count == 12

    # deforest-eval rebuilds the checkpoint's split of the pairs and scores it as training did;
    # the before tiles alone (a single-date manifest) are refused by the contract's band count
    from deforest.cli.eval import evaluate

    def eval_config(out: str, *data: str):
        with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
            return compose("eval", overrides=[
                f"paths.root_dir={Path(__file__).resolve().parents[2]}", f"paths.output_dir={tmp_path / out}",
                f"paths.cache_dir={tmp_path / 'cache'}", f"ckpt_path={metrics['best_checkpoint']}",
                "trainer.enable_progress_bar=false", "report.enabled=false", *data,
            ])

    evaluated = evaluate(eval_config("eval", "data=pairs", f"data.root={pairs['root']}"))
    assert evaluated["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    single = tmp_path / "single"
    single.mkdir()
    with (pairs["root"] / "pairs.csv").open(newline="") as handle:
        rows = [f"{pairs['root'] / row['before']},{row['labels']}" for row in csv.DictReader(handle)]
    (single / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match="the tiles have 6 bands, the checkpoint was trained on 12-band tiles"):
        evaluate(eval_config("eval1", "data=manifest", f"data.root={single}", "resplit=true",
                             "data.layout.allow_outside_root=true"))  # the rows name the pairs' tiles

    # the two whole scenes, described as the tiles were named: matched to the checkpoint by name
    before, after, loss, profile = simulate_clearing()
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    _write(scenes / "before.tif", before, profile, BANDS)
    _write(scenes / "after.tif", after, profile, BANDS)
    def run(out: Path, *change: str) -> dict:
        overrides = [f"ckpt_path={metrics['best_checkpoint']}", f"before={scenes / 'before.tif'}",
                     f"after={scenes / 'after.tif'}", f"out={out}", "full_resolution=true", "stride=16", "device=cpu"]
        with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
            return predict(compose("predict", overrides=overrides + list(change)))

    first = run(tmp_path / "map.tif", "change.min_area_ha=0")
    assert first["band_order"].startswith("matched by name")
    assert first["change_out"] == str(tmp_path / "map_change.tif") and first["pixels_removed_by_mmu"] == 0
    with rasterio.open(tmp_path / "map.tif") as full:
        assert full.crs == profile["crs"] and full.transform == profile["transform"]
        p_loss = full.read(2).astype(np.float64) / 254  # band 1: class; then p_loss, p_stable
    # scene=[before,after] is the same pair for a checkpoint trained on pairs; one date alone is refused
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        listed = predict(compose("predict", overrides=[
            f"ckpt_path={metrics['best_checkpoint']}", f"scene=[{scenes / 'before.tif'},{scenes / 'after.tif'}]",
            f"out={tmp_path / 'listed.tif'}", "full_resolution=true", "stride=16", "device=cpu", "change.min_area_ha=0"]))
        with rasterio.open(tmp_path / "listed_change.tif") as a, rasterio.open(tmp_path / "map_change.tif") as b:
            np.testing.assert_array_equal(a.read(), b.read())
        assert listed["loss_ha"] == first["loss_ha"]
        with pytest.raises(ConfigError, match=r"give both before=PATH and after=PATH for a change map \(after is missing\)"):
            predict(compose("predict", overrides=[f"ckpt_path={metrics['best_checkpoint']}",
                                                  f"before={scenes / 'before.tif'}", f"out={tmp_path / 'x.tif'}"]))
    # thresholds and a unit from this model's own map, so that some patches fall under the unit
    # and some do not whatever one epoch of training gave
    low, high = np.quantile(p_loss, 0.9), np.quantile(p_loss, 0.97)
    raw = confidence_classes(p_loss, low, high)
    raw_labels, count = ndimage.label(raw > 0, structure=np.ones((3, 3)))
    sizes = np.bincount(raw_labels.ravel())
    sizes[0] = 0
    assert count > 1 and len(set(sizes[1:])) > 1, sizes
    unit = sizes.max() * 0.09  # 30 m pixels: 0.09 ha; only the largest patch(es) stay
    summary = run(tmp_path / "map2.tif", f"change.low={low}", f"change.high={high}", f"change.min_area_ha={unit}",
                  f"change.out={tmp_path / 'loss.tif'}")
    with rasterio.open(tmp_path / "loss.tif") as src:
        assert src.crs == profile["crs"] and src.transform == profile["transform"]
        assert src.descriptions == ("confidence", "p_loss")
        classes, stored = src.read(1), src.read(2)
    assert set(np.unique(classes)) == {NO_CHANGE, LOW, HIGH}
    np.testing.assert_array_equal(stored, np.rint(p_loss * 254).astype(np.uint8))
    kept = sizes[raw_labels] == sizes.max()
    np.testing.assert_array_equal(classes > 0, (raw > 0) & kept)
    np.testing.assert_array_equal(classes[kept], raw[kept])  # kept pixels keep their confidence class
    assert summary["pixels_removed_by_mmu"] == int(((raw > 0) & ~kept).sum()) > 0
    hectares = summary["loss_ha"]
    assert hectares["high"] == pytest.approx((classes == HIGH).sum() * 0.09)
    assert hectares["total"] == pytest.approx((classes > 0).sum() * 0.09) == pytest.approx(sizes.max() * 0.09 * (sizes == sizes.max()).sum())
    assert loss.sum() > 500  # the simulated clearings cover ~ 50 ha of the 6,700 ha clip


def test_pairs_train_multilabel(train_config, tmp_path):
    root = tmp_path / "multilabel"
    written = write_pairs(root, multilabel=True)
    assert {"forest", "loss", "nonforest"} == set(written["counts"])
    metrics, spec = _train_pairs(train_config, root, [])
    assert spec.task == "multilabel" and spec.class_names == ["forest", "loss", "nonforest"]
    assert spec.band_names[6] == "B2@t1"
    for key in ("test/f1_micro", "test/f1_macro", "test/map"):
        assert 0.0 <= metrics[key] <= 1.0


def test_forest_loss_experiment_needs_its_data_root(tmp_path):
    """As a user runs it: a missing path is one line naming the setting, not a traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "deforest.cli.train", "experiment=forest_loss", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1, output
    assert "ConfigError: invalid config: no value for data.root: give it on the command line (data.root=...)" in errors[0]


# ---- change-map post-processing (pure) -------------------------------------------------------
def test_mmu_removes_a_5_pixel_patch_and_keeps_a_20_pixel_one():
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:4] = True
    mask[4, 4] = True  # touches the 2x2 block only at a corner: one 5-pixel patch (8-connectivity)
    mask[10:14, 10:15] = True  # 20 pixels
    # 10 m pixels (100 m2): the patches are 0.05 ha and 0.2 ha; the unit lies between them
    kept = remove_small_patches(mask, np.full(20, 100.0), min_area_ha=0.1)
    expected = np.zeros_like(mask)
    expected[10:14, 10:15] = True
    np.testing.assert_array_equal(kept, expected)
    # with 4-connectivity the corner pixel would be a patch of its own; here it goes with its block
    assert remove_small_patches(mask, 100.0, 0.05)[4, 4]
    assert remove_small_patches(mask, 100.0, 0.0).sum() == 25


def test_change_map_confidence_classes_and_hectares():
    prob = np.zeros((10, 10), np.float32)
    prob[1:5, 1:6] = 0.9  # 20 px high confidence
    prob[1:5, 6] = 0.6  # 4 px low confidence, touching: one 24-pixel patch
    prob[8, 8] = 0.95  # one isolated pixel
    prob[0, 9] = np.nan
    classes = change_map(prob, low=0.5, high=0.8, min_area_ha=0.1, row_areas=np.full(10, 100.0))
    assert (classes == HIGH).sum() == 20 and (classes == LOW).sum() == 4
    assert classes[8, 8] == NO_CHANGE and classes[0, 9] == 255
    assert loss_hectares(classes, 100.0) == {"high": 0.2, "low": 0.04, "total": pytest.approx(0.24)}


def test_pixel_areas_projected_and_per_row_geographic():
    np.testing.assert_array_equal(pixel_areas(Affine(30, 0, 500000, 0, -30, 9000000), "EPSG:32620", 3), [900.0] * 3)
    # 0.00025 degree pixels (about 28 m) at 10 degrees south: the reference is the geodesic area
    # of the first row's pixel on WGS 84, 757.935 m2 (pyproj.Geod(ellps="WGS84").polygon_area_perimeter)
    areas = pixel_areas(Affine(0.00025, 0, -63.0, 0, -0.00025, -10.0), "EPSG:4326", 4000)
    assert areas[0] == pytest.approx(757.9350301548839, rel=1e-7)
    assert len(np.unique(areas)) == 4000 and np.all(np.diff(areas) < 0)  # one area per row, shrinking southwards
    assert areas[-1] / areas[0] == pytest.approx(np.cos(np.radians(11.0)) / np.cos(np.radians(10.0)), rel=1e-3)
    # a 1 degree cell at the equator: 12,308 km2 on the ellipsoid, not (111.32 km)^2 = 12,392 km2
    assert pixel_areas(Affine(1, 0, 0, 0, -1, 1), "EPSG:4326", 1)[0] / 1e6 == pytest.approx(12308.46, abs=0.01)


def test_deforest_tile_cuts_both_dates_into_pairs(tmp_path):
    from deforest.cli.tile import tile

    before, after, loss, profile = simulate_clearing()
    _write(tmp_path / "before.tif", before, profile, BANDS)
    _write(tmp_path / "after.tif", after, profile, BANDS)
    label = _write(tmp_path / "loss.tif", loss[None].astype(np.uint8), {**profile, "dtype": "uint8", "nodata": None})
    overrides = [f"before={tmp_path / 'before.tif'}", f"after={tmp_path / 'after.tif'}", f"label_raster={label}",
                 f"out={tmp_path / 'pairs'}", "tile_size=32", "mode=majority", "class_names={0: stable, 1: loss}"]
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        report = tile(compose("tile", overrides=overrides))
    assert report["pairs"] == (235 // 32) * (318 // 32) == 63 and report["skipped"] == 0
    with (tmp_path / "pairs" / "pairs.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["before", "after", "labels", "split", "minx", "miny", "maxx", "maxy", "crs"]
    assert rows[0]["before"] == "t0/tiles/before_r00000_c00000.tif" and rows[0]["after"] == "t1/tiles/after_r00000_c00000.tif"
    assert not (tmp_path / "pairs" / "t0" / "labels.csv").exists()
    for row in rows:
        r, c = map(int, re.search(r"_r(\d+)_c(\d+)\.tif$", row["before"]).groups())
        share = loss[r : r + 32, c : c + 32].mean()
        assert row["labels"] == ("loss" if share > 0.5 else "stable")
    layout = PairLayout(tmp_path / "pairs")
    index = layout.build_index()
    assert layout.band_names[:2] == ["B2@t0", "B3@t0"] and layout.band_names[6] == "B2@t1"  # from the files' descriptions
    assert index.meta["crs"][0] == "EPSG:32620" and len(index) == 63
    image = layout.read(index.sources[10], None)
    r, c = map(int, re.search(r"_r(\d+)_c(\d+)\.tif$", rows[10]["before"]).groups())
    np.testing.assert_array_equal(image[6:], after[:, r : r + 32, c : c + 32].astype(np.float32))


def test_statistics_cache_notices_a_changed_after_tile(train_config, tmp_path):
    """The normalisation cached for a dataset must be measured again when an after tile changes,
    not only when a before tile (the pair's header file) does."""
    from deforest.runs.build import build_datamodule

    root = tmp_path / "pairs"
    write_pairs(root)
    cfg = train_config(["experiment=forest_loss", f"data.root={root}", "data.val_fraction=0.1", "data.test_fraction=0.1"])
    first = build_datamodule(cfg.data)
    first.setup("fit")
    mean = np.asarray(first.input_spec.normalization.mean)
    for tile in sorted((root / "t1").glob("*.tif")):  # every after tile brightened 4x: a new t1
        with rasterio.open(tile, "r+") as dst:
            dst.write(np.clip(dst.read().astype(np.int32) * 4, -9999, 32767).astype(np.int16))
    second = build_datamodule(cfg.data)
    second.setup("fit")
    again = np.asarray(second.input_spec.normalization.mean)
    np.testing.assert_allclose(again[:6], mean[:6], rtol=1e-6)  # t0 untouched
    assert np.all(again[6:] > mean[6:] + 1.0), (mean, again)  # log1p(4x): about +1.4 in every t1 band


# ---- real imagery of two dates: the whole sequence on data/scenes/colorado-landsat5 -------------
COLORADO = Path(__file__).resolve().parents[2] / "data" / "scenes" / "colorado-landsat5"
BEFORE_2008, AFTER_2011 = COLORADO / "LT05_035032_20080708.tif", COLORADO / "LT05_035032_20110701.tif"
LOSS_DNBR = COLORADO / "loss_dnbr.tif"


def _nbr(bands: np.ndarray) -> np.ndarray:
    """Normalised burn ratio of Landsat TM bands B3, B4, B5 (NIR and SWIR1: bands 2 and 3)."""
    nir, swir = bands[1].astype(np.float64), bands[2].astype(np.float64)
    return (nir - swir) / (nir + swir)


@pytest.mark.slow
def test_real_two_date_pair_tiles_trains_both_heads_and_maps_change(train_config, tmp_path, caplog):
    """Two real Landsat 5 TM dates of one 61x61 px place (2008-07-08, 2011-07-01): tiled, trained
    with both heads, and mapped with a unit and confidence classes. The labels are the pixels
    whose NBR fell by 0.10 or more between the dates (data/README.md): derived from the same
    imagery, so this checks the sequence on real pixels, not a model's skill."""
    from deforest.cli.tile import tile

    with rasterio.open(BEFORE_2008) as a, rasterio.open(AFTER_2011) as b, rasterio.open(LOSS_DNBR) as lab:
        assert a.crs == b.crs == lab.crs == rasterio.crs.CRS.from_epsg(32613)
        assert a.transform == b.transform == lab.transform and a.shape == b.shape == lab.shape == (61, 61)
        assert a.descriptions == b.descriptions == ("B3", "B4", "B5") and a.nodata == b.nodata == -9999
        before, after, label = a.read(), b.read(), lab.read(1)
        transform, crs = a.transform, a.crs
    # the shipped label is its recipe applied to the shipped dates; the dates really differ
    np.testing.assert_array_equal(label, (_nbr(after) - _nbr(before) <= -0.10).astype(np.uint8))
    assert int(label.sum()) == 405 and np.abs(after.astype(int) - before.astype(int)).mean() > 50
    np.testing.assert_array_equal(pixel_areas(transform, crs, 61), np.full(61, 900.0))  # 30 m: 0.09 ha

    def cut(out: Path, mode: str) -> dict:
        with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
            return tile(compose("tile", overrides=[
                f"before={BEFORE_2008}", f"after={AFTER_2011}", f"label_raster={LOSS_DNBR}", f"out={out}",
                "tile_size=8", "stride=2", f"mode={mode}", "class_names={0: stable, 1: loss}"]))

    # 8 px windows every 2 px: 27 x 27 pairs; majority: loss where at least half of the window
    # lost NBR (a 32/32 tie goes to the first name in sorted order, loss)
    report = cut(tmp_path / "pairs", "majority")
    assert report["pairs"] == 27 * 27 == 729 and report["skipped"] == 0
    with (tmp_path / "pairs" / "pairs.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        r, c = map(int, re.search(r"_r(\d+)_c(\d+)\.tif$", row["before"]).groups())
        assert row["labels"] == ("loss" if label[r : r + 8, c : c + 8].mean() >= 0.5 else "stable"), row
    assert report["class_counts"] == {"stable": 662, "loss": 67}
    # any: every class present, so windows at a patch's edge carry both tags (multi-label)
    both = cut(tmp_path / "pairs_any", "any")
    assert both["class_counts"]["loss"] > report["class_counts"]["loss"]

    # both heads through the real entry; one date's bands named B3@t0 ... B5@t1 in the checkpoint
    def fit(root: Path) -> tuple[dict, InputSpec]:
        metrics = train(train_config(["experiment=forest_loss", f"data.root={root}", "model.input_pool=1",
                                      "trainer.max_epochs=1", "data.batch_size=64"]))
        return metrics, TileClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu").input_spec

    multilabel, spec = fit(tmp_path / "pairs_any")
    assert spec.task == "multilabel" and spec.class_names == ["loss", "stable"]
    assert 0.0 <= multilabel["test/f1_macro"] <= 1.0
    metrics, spec = fit(tmp_path / "pairs")
    assert spec.task == "multiclass" and spec.class_names == ["loss", "stable"]
    assert spec.band_names == ["B3@t0", "B4@t0", "B5@t0", "B3@t1", "B4@t1", "B5@t1"]

    # the change map of the two whole scenes: on the scenes' grid, then with a unit and classes
    def run(out: Path, *change: str) -> dict:
        with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
            return predict(compose("predict", overrides=[
                f"ckpt_path={metrics['best_checkpoint']}", f"before={BEFORE_2008}", f"after={AFTER_2011}",
                f"out={out}", "full_resolution=true", "stride=2", "device=cpu", *change]))

    run(tmp_path / "map.tif", "change.min_area_ha=0")
    with rasterio.open(tmp_path / "map.tif") as full, rasterio.open(tmp_path / "map_change.tif") as change:
        for src in (full, change):
            assert src.crs == crs and src.transform == transform and src.shape == (61, 61)
        p_loss = full.read(2).astype(np.float64) / 254  # band 1: class; then p_loss, p_stable
        np.testing.assert_array_equal(change.read(2), full.read(2))
    # thresholds from this model's own map, so that patches of several sizes exist whatever one
    # epoch gave; the unit then sits between the smallest and the largest of them
    low, high = np.quantile(p_loss, 0.85), np.quantile(p_loss, 0.95)
    raw = confidence_classes(p_loss, low, high)
    patches, count = ndimage.label(raw > 0, structure=np.ones((3, 3)))
    sizes = np.bincount(patches.ravel())
    sizes[0] = 0
    distinct = np.unique(sizes[1:])
    assert count > 1 and len(distinct) > 1, sizes
    unit_px = int(distinct[len(distinct) // 2])  # patches of fewer pixels go
    unit_ha = unit_px * 0.09 - 0.001
    caplog.set_level(logging.INFO, logger="deforest.cli.predict")
    summary = run(tmp_path / "mmu.tif", f"change.low={low}", f"change.high={high}", f"change.min_area_ha={unit_ha}")
    with rasterio.open(tmp_path / "mmu_change.tif") as src:
        assert src.crs == crs and src.transform == transform
        classes = src.read(1)
    kept = sizes[patches] >= unit_px
    np.testing.assert_array_equal(classes > 0, (raw > 0) & kept)
    np.testing.assert_array_equal(classes[kept], raw[kept])  # kept pixels keep their class
    assert summary["pixels_removed_by_mmu"] == int(((raw > 0) & ~kept).sum()) > 0
    hectares = summary["loss_ha"]
    assert hectares["high"] == pytest.approx((classes == HIGH).sum() * 0.09)
    assert hectares["low"] == pytest.approx((classes == LOW).sum() * 0.09)
    assert hectares["total"] == pytest.approx((classes > 0).sum() * 0.09) and hectares["total"] > 0
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mapped loss: ")]
    assert printed and printed[-1].startswith(
        f"mapped loss: {(classes > 0).sum() * 0.09:.2f} ha ({(classes == HIGH).sum() * 0.09:.2f} ha high confidence, "
        f"{(classes == LOW).sum() * 0.09:.2f} ha low; patches under {unit_ha} ha dropped)"), printed
