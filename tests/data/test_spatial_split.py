"""data.split=spatial: whole blocks of neighbouring tiles per split, from deforest-tile's bounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from deforest.cli.eval import evaluate
from deforest.cli.train import train
from deforest.core.contract import split_digest
from deforest.core.errors import DatasetError
from deforest.core.vocabulary import MULTICLASS
from deforest.data.index import TileIndex
from deforest.data.splits import assign_splits, spatial_blocks
from deforest.mapping.labelling import VectorLabels
from deforest.mapping.scene import Scene
from deforest.mapping.tiling import tile_scene
from deforest.runs.build import build_datamodule
from tests.conftest import REPO, compose_train_config


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
    every, random = _assignment(train_config, rondonia_tiles, [])
    blocks = spatial_blocks(every.index, 1500)
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


def _boxes(index: TileIndex) -> np.ndarray:
    return np.asarray([[float(index.meta[c][i]) for c in ("minx", "miny", "maxx", "maxy")] for i in range(len(index))])


def _gaps_between_splits(boxes: np.ndarray, assignment: np.ndarray) -> list[float]:
    """For every pair of tiles in different splits, the distance between their footprints (0: they share pixels)."""
    gaps = []
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if assignment[i] != assignment[j]:
                dx = max(boxes[j, 0] - boxes[i, 2], boxes[i, 0] - boxes[j, 2], 0.0)
                dy = max(boxes[j, 1] - boxes[i, 3], boxes[i, 1] - boxes[j, 3], 0.0)
                overlap = boxes[i, 0] < boxes[j, 2] and boxes[j, 0] < boxes[i, 2] and boxes[i, 1] < boxes[j, 3] and boxes[j, 1] < boxes[i, 3]
                gaps.append(0.0 if overlap else float(np.hypot(dx, dy)) or 1e-9)
    return gaps


def test_spatial_split_leaves_no_pixel_in_two_splits(train_config, rondonia_tiles):
    """Tiles centred on points near a block edge reach into the next block: they are left out, and counted."""
    dm, spatial = _assignment(train_config, rondonia_tiles, ["data.split=spatial", "data.block_size=1500"])
    full = build_datamodule(train_config(["data=manifest", f"data.root={rondonia_tiles}"]).data)
    full.setup("fit")
    by_centre = np.asarray(assign_splits(full.index, 0.1, 0.2, 42, spatial_blocks(full.index, 1500)))
    assert min(_gaps_between_splits(_boxes(full.index), by_centre)) == 0.0  # what the edge rule removes
    assert 0 < dm.dropped_at_edges == 91 - len(dm.index) == dm.input_spec.split.dropped_at_edges
    assert min(_gaps_between_splits(_boxes(dm.index), spatial)) > 0.0
    buffered, apart = _assignment(
        train_config, rondonia_tiles, ["data.split=spatial", "data.block_size=1500", "data.block_buffer=30"]
    )
    assert buffered.dropped_at_edges > dm.dropped_at_edges
    assert min(_gaps_between_splits(_boxes(buffered.index), apart)) >= 60.0


@pytest.mark.slow  # trains a small model
def test_deforest_eval_scores_the_checkpoints_spatial_split(rondonia_tiles, tmp_path):
    """Without the split overrides, eval scores the tiles the training run tested on."""
    data = ["data=manifest", f"data.root={rondonia_tiles}"]
    run = compose_train_config(tmp_path / "run", [*data, "data.split=spatial", "data.block_size=1500", "data.batch_size=8",
                                                  "trainer.max_epochs=2", "model.input_pool=1", "report.enabled=false"])
    metrics = train(run)

    def run_eval(out: str, *extra: str) -> dict:
        with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
            cfg = compose("eval", overrides=[
                f"paths.root_dir={REPO}", f"paths.output_dir={tmp_path / out}", f"paths.cache_dir={tmp_path / 'cache'}",
                f"ckpt_path={metrics['best_checkpoint']}", "trainer.enable_progress_bar=false", "report.enabled=false",
                *data, *extra,
            ])
        return evaluate(cfg)

    evaluated = run_eval("eval")
    for key in ("test/accuracy", "test/f1_macro", "test/kappa", "test/loss"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key
    trained = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)["input_spec"]["split"]
    assert evaluated["split_source"] == "checkpoint" and evaluated["split_digest"] == split_digest(trained["lists"])
    assert trained["kind"] == "spatial" and trained["block_size"] == 1500 and trained["dropped_at_edges"] == 24
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/accuracy"] == evaluated["test/accuracy"]
    other = run_eval("resplit", "resplit=true")  # the config's random split, asked for and recorded
    assert other["split_source"] == "config" and other["split_digest"] != evaluated["split_digest"]
