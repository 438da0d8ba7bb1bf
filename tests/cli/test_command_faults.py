"""Faults met through the real commands: band names spelled without the zero (``B1``), tiles
smaller than a backbone's stem, a checkpoint that would run ``os.system``, two commands started
in the same second, and config or input mistakes that must end in one line and exit status 2."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from tests.cli.test_cli_faults import _checkpoint, _folder

REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "data" / "scenes" / "landsat7-bahamas" / "RGB.byte.tif"
FAST = ["trainer.fast_dev_run=true", "++model.width=8", "model.tta=false", "data.num_workers=0"]


def _command(module: str, overrides: list[str], tmp: Path) -> tuple[int, str]:
    """Run ``python -m module`` as a user would (run directory ``tmp/run``); its exit status and
    everything it printed."""
    cmd = [sys.executable, "-m", module, f"hydra.run.dir={tmp / 'run'}", f"paths.cache_dir={tmp / 'cache'}", *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def _one_line(output: str, kind: str) -> str:
    """The single ``<kind>: ...`` line of a refused command (no traceback, no second line)."""
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output[-3000:]
    lines = [line.split(f"{kind}: ", 1)[1] for line in output.splitlines() if f"{kind}: " in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


# ---- band names: B1 is B01, b8a is B8A ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "loaded", "seen"),
    [
        # the files' bands named without the zero: the default exclusion (B01, B09, B10) still applies
        (["data.layout.band_names=[B1,B2,B3,B4,B5,B6,B7,B8,B9,B10,B11,B12,b8a]"],
         "B1, B2, B3, B4, B5, B6, B7, B8, B9, B10, B11, B12, b8a (13)",
         "B2, B3, B4, B5, B6, B7, B8, B11, B12, b8a (10)"),
        # a band selection spelled otherwise than the data config's names (B01 ... B8A)
        (["data.bands=[b1,B2,B3,B4,B8,B9,b8a]"],
         "B01, B02, B03, B04, B08, B09, B8A (7)",
         "B02, B03, B04, B08, B8A (5)"),
    ],
    ids=["names_without_zero", "selection_spelled_otherwise"],
)
def test_band_names_are_matched_whatever_their_spelling(overrides, loaded, seen, tmp_path):
    rc, output = _command("deforest.cli.train", [*FAST, *overrides], tmp_path)
    assert rc == 0, output[-3000:]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert f"- bands: {loaded}" in summary, summary
    assert f"- the network sees: {seen}; the band-statistics head sees every band" in summary, summary


def test_canonical_band_names_are_one_spelling():
    from deforest.core.bands import canonical_band
    from deforest.data.io import resolve_bands

    assert [canonical_band(b) for b in ("B1", "B01", "b01", " b1 ", "B10", "B8a", "b8A", "B04@t0", "VV")] == [
        "B01", "B01", "B01", "B01", "B10", "B8A", "B8A", "B04@t0", "VV"]
    names = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
    assert resolve_bands(["b4", "B3", "B02", "b8a", 9], names, 13) == [4, 3, 2, 13, 9]
    with pytest.raises(ValueError, match=r"band 'B13' is not among"):
        resolve_bands(["B13"], names, 13)


# ---- tiles smaller than a backbone's stem ----------------------------------------------------
def _small_tiles(root: Path, size: int = 8, per_class: int = 12) -> Path:
    """Seeded 4-band 30 m uint16 tiles of two classes that differ in brightness."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("Forest", "Pasture")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(400, 900, (4, size, size)) + 1500 * c
            profile = {"driver": "GTiff", "width": size, "height": size, "count": 4, "dtype": "uint16",
                       "crs": CRS.from_epsg(32721), "transform": Affine(30, 0, 500000 + 300 * i, 0, -30, 8e6)}
            with rasterio.open(root / cls / f"{cls}_{i}.tif", "w", **profile) as dst:
                dst.write(pixels.astype("uint16"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["small_cnn", "resnet18", "resnet50", "efficientnet_b0"])
def test_eight_pixel_tiles_train_with_every_cnn(model, tmp_path):
    root = _small_tiles(tmp_path / "tiles")
    rc, output = _command("deforest.cli.train", [f"data.root={root}", f"model={model}", *FAST], tmp_path)
    assert rc == 0, output[-3000:]
    assert "tiles 8x8" in (tmp_path / "run" / "summary.md").read_text()


@pytest.mark.slow
def test_eight_pixel_tiles_are_refused_for_a_vit_before_training(tmp_path):
    root = _small_tiles(tmp_path / "tiles")
    rc, output = _command("deforest.cli.train", [f"data.root={root}", "model=vit_small", *FAST], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "ConfigError")
    assert re.fullmatch(
        r"model\.backbone=vit_small_patch16_224 cannot take the 8x8 px tiles: the smallest it takes is 16x16 px "
        r"\(set model\.input_resize=16, or use a backbone that takes small tiles, e\.g\. model=small_cnn\)", line
    ), line
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- a checkpoint whose pickle runs code -------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_calling_os_system_is_refused_as_code(writer, tmp_path, eurosat_root):
    import torch

    checkpoint = torch.load(_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["hook"] = _RunsCode(tmp_path / "ran")
    path = tmp_path / "code.ckpt"
    if writer == "torch.save":
        torch.save(checkpoint, path)
    else:  # a plain pickle (protocol 4), which torch.load also reads
        path.write_bytes(pickle.dumps(checkpoint, protocol=4))
    rc, output = _command("deforest.cli.eval", [f"ckpt_path={path}", f"data.root={_folder(tmp_path, {'eurosat': eurosat_root})}"],
                          tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "CheckpointError")
    assert re.fullmatch(r"\S*code\.ckpt: refused: it holds pickled objects, not only tensors and plain data "
                        r"\(Weights only load failed: Unsupported global: GLOBAL os\.system\)", line), line
    assert not (tmp_path / "ran").exists()


# ---- two commands started in the same second ---------------------------------------------------
# deforest-tile, imported, then started at the whole second the test writes into the go file
_AT_SECOND = """
import pathlib, sys, time
from deforest.cli.tile import main
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.01)
time.sleep(max(0.0, float(go.read_text()) - time.time()))
sys.argv = ["deforest-tile", *sys.argv[3:]]
main()
"""


@pytest.mark.slow
def test_two_commands_started_in_the_same_second_get_their_own_run_directories(tmp_path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _AT_SECOND, str(tmp_path / f"ready{i}"), str(go), f"scene={SCENE}",
             f"out={tmp_path / f'tiles{i}'}", "tile_size=256", f"paths.log_dir={tmp_path / 'logs'}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.05)
    # both start Hydra at the start of one second, once imported: they compose in that second
    (tmp_path / "go.tmp").write_text(str(float(int(time.time()) + 2)))
    (tmp_path / "go.tmp").rename(go)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = sorted((tmp_path / "logs" / "tile" / "runs").iterdir())
    assert len(runs) == 2 and all((r / ".hydra" / "config.yaml").is_file() for r in runs), runs
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", r.name) for r in runs), runs
    assert runs[0].name[:19] == runs[1].name[:19], runs  # the same second, told apart by the suffix
    # 256 px windows of the 791x718 scene: one has at most 10% nodata
    assert [sorted(p.name for p in (tmp_path / f"tiles{i}" / "tiles").glob("*.tif")) for i in range(2)] == [["RGB.byte_r00256_c00256.tif"]] * 2


# ---- config and input mistakes: one line, exit status 2 ---------------------------------------
def _train(tmp, roots, *extra):
    return "deforest.cli.train", [f"data.root={_folder(tmp, roots)}", *FAST, *extra]


def spatial_split_without_block_size(tmp, roots):
    return _train(tmp, roots, "data.split=spatial")


def imbalance_misspelt_class(tmp, roots):
    return _train(tmp, roots, "data.imbalance={Forst: 0.5}")


def tile_mode_misspelt(tmp, roots):
    return "deforest.cli.tile", [f"scene={SCENE}", f"out={tmp / 'tiles'}", "mode=majorty"]


def tile_larger_than_the_scene(tmp, roots):
    return "deforest.cli.tile", [f"scene={SCENE}", f"out={tmp / 'tiles'}", "tile_size=1000"]


def data_root_is_a_file(tmp, roots):
    (tmp / "notes.txt").write_text("not a folder\n")
    return "deforest.cli.train", [f"data.root={tmp / 'notes.txt'}", *FAST]


def manifest_root_is_the_labels_csv(tmp, roots):
    root = _folder(tmp, roots)
    (root / "labels.csv").write_text("path,labels\n" + "".join(
        f"{p.parent.name}/{p.name},{p.parent.name}\n" for p in sorted(root.rglob("*.tif"))))
    return "deforest.cli.train", [f"data.root={root / 'labels.csv'}", "data=manifest", *FAST]


def data_root_is_a_file_in_a_config_file(tmp, roots):
    (tmp / "notes.txt").write_text("not a folder\n")
    (tmp / "conf" / "experiment").mkdir(parents=True)
    (tmp / "conf" / "experiment" / "mine.yaml").write_text(f"# @package _global_\ndata:\n  root: {tmp / 'notes.txt'}\n")
    return "deforest.cli.train", [f"hydra.searchpath=[file://{tmp / 'conf'}]", "experiment=mine", *FAST]


def predict_empty_tiles_folder(tmp, roots):
    (tmp / "empty").mkdir()
    return "deforest.cli.predict", [f"ckpt_path={_checkpoint(tmp)}", f"tiles={tmp / 'empty'}", f"out={tmp / 'p.csv'}",
                                    "device=cpu"]


def predict_int16(tmp, roots):
    return "deforest.cli.predict", [f"ckpt_path={_checkpoint(tmp)}", f"scene={SCENE}", f"out={tmp / 'map.tif'}",
                                    "dtype=int16", "device=cpu"]


ONE_LINE_CASES = [
    (spatial_split_without_block_size, "ConfigError",
     r"invalid config: data\.split=spatial needs data\.block_size > 0 \(tile CRS units, e\.g\. metres\), not None"),
    (imbalance_misspelt_class, "ConfigError",
     r"data\.imbalance names classes the data does not have: \['Forst'\] \(did you mean 'Forest'\?\); "
     r"the classes are \['Forest', 'River'\]"),
    (tile_mode_misspelt, "ConfigError",
     r"invalid config: mode='majorty' must be one of \['majority', 'any', 'fraction'\] \(did you mean 'majority'\?\)"),
    (tile_larger_than_the_scene, "TileError",
     r"\S*RGB\.byte\.tif: the scene \(718x791\) is smaller than tile_size=1000"),
    (data_root_is_a_file, "DatasetError", r"data\.root \S*notes\.txt is not a directory: give data\.root=DIR"),
    (manifest_root_is_the_labels_csv, "DatasetError", r"data\.root \S*labels\.csv is not a directory: give data\.root=DIR"),
    (data_root_is_a_file_in_a_config_file, "DatasetError", r"data\.root \S*notes\.txt is not a directory: give data\.root=DIR"),
    (predict_empty_tiles_folder, "DatasetError", r"\S*empty: no labels\.csv and no \.tif tiles"),
    (predict_int16, "ConfigError", r"invalid config: dtype='int16' must be one of \['uint8', 'float32'\]"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,kind,message", ONE_LINE_CASES, ids=[c[0].__name__ for c in ONE_LINE_CASES])
def test_mistake_ends_in_one_line_and_exit_status_2(case, kind, message, tmp_path, eurosat_root):
    module, overrides = case(tmp_path, {"eurosat": eurosat_root})
    rc, output = _command(module, overrides, tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, kind)
    assert re.match(message, line), line
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "map.tif").exists()
