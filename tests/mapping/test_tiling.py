"""deforest-tile: real scenes (Rondonia points, Bahamas nodata) and generated ones for the rest."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import rasterio.warp
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from deforest.core.errors import TileError
from deforest.data.layouts import ManifestLayout
from deforest.mapping.labelling import RasterLabels, VectorLabels
from deforest.mapping.scene import Scene
from deforest.mapping.tiling import tile_scene

RONDONIA_CLASSES = {0: "water", 1: "bare_soil", 2: "forest", 3: "agriculture"}
UTM20 = CRS.from_epsg(32620)
ORIGIN = Affine(30.0, 0.0, 400000.0, 0.0, -30.0, -960000.0)


def rondonia(scenes_root: Path) -> tuple[Path, Path]:
    folder = scenes_root / "rondonia-landsat8"
    return folder / "LC08_232066_20190727.tif", folder / "endmembers.shp"


def manifest_rows(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_raster(path: Path, data: np.ndarray, crs: CRS | None = UTM20, nodata: float | None = None) -> Path:
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": data.dtype.name, "transform": ORIGIN, "nodata": nodata}
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def synthetic_scene(tmp_path: Path, bands: int = 3, size: int = 64) -> Path:
    data = np.random.default_rng(0).integers(1, 3000, (bands, size, size), dtype=np.uint16)
    return write_raster(tmp_path / "scene.tif", data)


def test_rondonia_one_tile_centred_on_each_point(scenes_root, tmp_path):
    scene_path, points_path = rondonia(scenes_root)
    with Scene(scene_path) as scene:
        labels = VectorLabels(points_path, "class", scene, class_names=RONDONIA_CLASSES)
        report = tile_scene(scene, tmp_path, tile_size=16, labeller=labels, center_on_points=True)
        points = labels.points()
    _, _, _, fields = pyogrio.raw.read(points_path, columns=["class"])
    expected = {RONDONIA_CLASSES[int(v)]: int(n) for v, n in zip(*np.unique(fields[0], return_counts=True))}
    assert report.written == 91 and report.skipped_nodata == 0 and report.class_counts == expected
    rows = manifest_rows(tmp_path)
    assert list(rows[0]) == ["path", "labels", "split", "minx", "miny", "maxx", "maxy", "crs"]
    with rasterio.open(scene_path) as src:
        scene_pixels, scene_transform = src.read(), src.transform
    centred = 0
    for row, (x, y, tag) in zip(rows, points):
        assert row["labels"] == tag and row["crs"] == "EPSG:32620"
        with rasterio.open(tmp_path / row["path"]) as tile:
            assert (tile.count, tile.width, tile.dtypes[0], tile.nodata, tile.crs) == (6, 16, "int16", -9999, UTM20)
            assert tuple(tile.bounds) == tuple(float(row[k]) for k in ("minx", "miny", "maxx", "maxy"))
            col, line = ~tile.transform @ (x, y)
            assert 0 <= col < 16 and 0 <= line < 16  # the point is in its tile
            c0, r0 = (round(v) for v in ~scene_transform @ (tile.bounds.left, tile.bounds.top))
            np.testing.assert_array_equal(tile.read(), scene_pixels[:, r0 : r0 + 16, c0 : c0 + 16])
            if 0 < c0 < 318 - 16 and 0 < r0 < 235 - 16:  # away from the edges: centred
                assert 8 <= col < 9 and 8 <= line < 9
                centred += 1
    assert centred > 60
    index = ManifestLayout(tmp_path).build_index()
    assert index.class_names == sorted(RONDONIA_CLASSES.values()) and len(index) == 91


def test_rondonia_grid_tiles_holding_points_get_the_majority_class(scenes_root, tmp_path):
    scene_path, points_path = rondonia(scenes_root)
    with Scene(scene_path) as scene:
        labels = VectorLabels(points_path, "class", scene)
        report = tile_scene(scene, tmp_path, tile_size=32, labeller=labels)
        xy = np.asarray([(x, y) for x, y, _ in labels.points()])
        tags = np.asarray([t for _, _, t in labels.points()])
    grid_tiles = (235 // 32) * (318 // 32)
    assert report.written + report.unlabelled == grid_tiles and 0 < report.written < 91
    for row in manifest_rows(tmp_path):
        minx, miny, maxx, maxy = (float(row[k]) for k in ("minx", "miny", "maxx", "maxy"))
        inside = (xy[:, 0] >= minx) & (xy[:, 0] <= maxx) & (xy[:, 1] >= miny) & (xy[:, 1] <= maxy)
        names, counts = np.unique(tags[inside], return_counts=True)
        assert row["labels"] == names[counts.argmax()]  # class codes as stored: "0".."3"


def test_bahamas_border_tiles_are_skipped(scenes_root, tmp_path):
    path = scenes_root / "landsat7-bahamas" / "RGB.byte.tif"
    with Scene(path) as scene:
        report = tile_scene(scene, tmp_path, tile_size=64, max_nodata=0.1)
    with rasterio.open(path) as src:
        mask = src.dataset_mask() == 0  # GDAL: nodata in every band
    expected = {
        (r, c) for r in range(0, 718 - 63, 64) for c in range(0, 791 - 63, 64) if mask[r : r + 64, c : c + 64].mean() <= 0.1
    }
    written = {tuple(int(p[1:]) for p in Path(row["path"]).stem.split("_")[-2:]) for row in manifest_rows(tmp_path)}
    assert written == expected and report.written == len(expected)
    assert report.skipped_nodata == 11 * 12 - len(expected) > 30
    assert (0, 0) not in written  # the corner is all nodata
    with rasterio.open(tmp_path / "tiles" / "RGB.byte_r00320_c00384.tif") as tile:
        assert tile.nodata == 0 and tile.dtypes[0] == "uint8" and tile.crs == CRS.from_epsg(32618)


def test_tile_console_script_reports_skips(scenes_root, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deforest.cli.tile", f"scene={scenes_root / 'landsat7-bahamas' / 'RGB.byte.tif'}",
           f"out={out}", "tile_size=128", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped" in done.stdout + done.stderr and len(manifest_rows(out)) == len(list((out / "tiles").iterdir()))


def _polygon_file(tmp_path: Path) -> Path:
    """Forest over pixel columns 0-41, pasture over 42-63 of the 64x64 synthetic scene, as GeoJSON (WGS84)."""
    def box(col0: int, col1: int) -> dict:
        (x0, y0), (x1, y1) = ORIGIN @ (col0, 0), ORIGIN @ (col1, 64)
        geom = shapely.geometry.mapping(shapely.box(x0, y1, x1, y0).segmentize(30.0))
        return rasterio.warp.transform_geom(UTM20, "EPSG:4326", geom)

    features = [
        {"type": "Feature", "properties": {"landcover": name}, "geometry": box(c0, c1)}
        for name, c0, c1 in (("forest", 0, 42), ("pasture", 42, 64))
    ]
    path = tmp_path / "polygons.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.mark.parametrize(
    ("mode", "min_fraction", "column_two"),
    [("majority", 0.5, "forest"), ("fraction", 0.3, "forest pasture"), ("fraction", 0.5, "forest"), ("any", 0.5, "forest pasture")],
)
def test_polygons_reprojected_from_wgs84(tmp_path, mode, min_fraction, column_two):
    scene_path = synthetic_scene(tmp_path)
    polygons = _polygon_file(tmp_path)
    assert pyogrio.read_info(polygons)["crs"] == "EPSG:4326"
    with Scene(scene_path) as scene:
        labels = VectorLabels(polygons, "landcover", scene, mode=mode, min_fraction=min_fraction)
        assert labels.kind == "polygons"
        tile_scene(scene, tmp_path / "out", tile_size=16, labeller=labels)
    by_column = {}
    for row in manifest_rows(tmp_path / "out"):
        by_column.setdefault(int(Path(row["path"]).stem.split("_c")[-1]) // 16, set()).add(row["labels"])
    assert by_column == {0: {"forest"}, 1: {"forest"}, 2: {column_two}, 3: {"pasture"}}


def test_label_raster_modes_and_grid_check(tmp_path):
    scene_path = synthetic_scene(tmp_path)
    loss = np.zeros((1, 64, 64), np.uint8)
    loss[0, :16, :4] = 1  # 25% of the first tile
    loss[0, 16:32, :] = 255  # nodata row of tiles: no label
    label_path = write_raster(tmp_path / "loss.tif", loss, nodata=255)
    names = {0: "intact", 1: "loss"}
    with Scene(scene_path) as scene:
        first = Window(0, 0, 16, 16)
        assert RasterLabels(label_path, scene, "majority", class_names=names).labels(first) == ["intact"]
        assert RasterLabels(label_path, scene, "any", class_names=names).labels(first) == ["intact", "loss"]
        assert RasterLabels(label_path, scene, "fraction", 0.3, names).labels(first) == ["intact"]
        assert RasterLabels(label_path, scene, "fraction", 0.2, names).labels(first) == ["intact", "loss"]
        report = tile_scene(scene, tmp_path / "out", 16, labeller=RasterLabels(label_path, scene, "any", class_names=names))
        assert report.written == 12 and report.unlabelled == 4
        with pytest.raises(ValueError, match="missing from class_names"):
            RasterLabels(label_path, scene, "any", class_names={0: "intact"}).labels(first)
    other_grid = write_raster(tmp_path / "coarse.tif", loss[:, :32, :32])
    with Scene(scene_path) as scene, pytest.raises(TileError, match="coarse.tif: is not on the scene's grid"):
        RasterLabels(other_grid, scene)


def test_scene_from_per_band_files(tmp_path):
    data = np.random.default_rng(1).integers(0, 10000, (3, 48, 48), dtype=np.int16)
    paths = [write_raster(tmp_path / f"B{i}.tif", data[i : i + 1], nodata=-1) for i in range(3)]
    with Scene(paths) as scene:
        assert scene.count == 3
        report = tile_scene(scene, tmp_path / "out", tile_size=16, stride=16)
    assert report.written == 9
    with rasterio.open(tmp_path / "out" / "tiles" / "B0_r00016_c00032.tif") as tile:
        np.testing.assert_array_equal(tile.read(), data[:, 16:32, 32:48])
        assert tile.transform == ORIGIN @ Affine.translation(32, 16) and tile.nodata == -1
    write_raster(tmp_path / "shifted.tif", data[:1, :40])
    with pytest.raises(TileError, match="shifted.tif: is not on the grid of"):
        Scene([paths[0], tmp_path / "shifted.tif"])


def test_bad_label_inputs_name_the_file(scenes_root, tmp_path):
    scene_path, points_path = rondonia(scenes_root)
    with Scene(scene_path) as scene:
        with pytest.raises(TileError, match="endmembers.shp: has no field 'klass'"):
            VectorLabels(points_path, "klass", scene)
        with pytest.raises(TileError, match="missing from class_names"):
            VectorLabels(points_path, "class", scene, class_names={0: "water"})
        with pytest.raises(ValueError, match="center_on_points=true needs point labels"):
            tile_scene(scene, tmp_path, 16, center_on_points=True)
