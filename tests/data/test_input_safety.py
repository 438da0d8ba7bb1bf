"""Inputs are never harmed by the commands that read them: no output is written over an input
(same path, another spelling, a hard link), an existing output is replaced only when it is an
earlier output of the same command (or with ``overwrite=true``), manifest rows stay inside the
data root, and class names split by a space are flagged instead of silently making the task
multi-label. Through the real commands, each refusal one line with exit status 2."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import rasterio
from rasterio.windows import Window

from tests.cli.test_cli_faults import _checkpoint
from tests.cli.test_command_faults import SCENE, _command, _one_line


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scene(path: Path, col: int = 300) -> Path:
    """A 64x64 crop of the real Bahamas Landsat scene (a fast prediction)."""
    with rasterio.open(SCENE) as src:
        window = Window(col, 300, 64, 64)
        profile = {**src.profile, "width": 64, "height": 64, "transform": src.window_transform(window)}
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path


def _tiles(root: Path, eurosat_root: Path, labels: dict[str, str]) -> Path:
    """``root/<name>.tif`` copies of real EuroSAT tiles with ``labels.csv`` rows ``name,labels``."""
    sources = sorted((eurosat_root / "train").rglob("*.tif"))
    root.mkdir(parents=True)
    rows = ["path,labels"]
    for source, (name, tags) in zip(sources, labels.items()):
        shutil.copy(source, root / f"{name}.tif")
        rows.append(f"{name}.tif,{tags}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


# ---- outputs never overwrite inputs --------------------------------------------------------
def _scene_onto_itself(tmp: Path, ckpt: Path, eurosat_root: Path) -> tuple[list[str], Path]:
    scene = _scene(tmp / "scene.tif")
    return [f"scene={scene}", f"out={scene}"], scene


def _scene_onto_a_hard_link(tmp: Path, ckpt: Path, eurosat_root: Path) -> tuple[list[str], Path]:
    scene = _scene(tmp / "scene.tif")
    os.link(scene, tmp / "link.tif")
    return [f"scene={scene}", f"out={tmp / 'sub' / '..' / 'link.tif'}"], scene


def _tiles_onto_their_labels(tmp: Path, ckpt: Path, eurosat_root: Path) -> tuple[list[str], Path]:
    root = _tiles(tmp / "tiles", eurosat_root, {f"t{i}": "Forest" for i in range(4)})
    return [f"tiles={root}", f"out={root / 'labels.csv'}"], root / "labels.csv"


def _change_map_onto_the_after_scene(tmp: Path, ckpt: Path, eurosat_root: Path) -> tuple[list[str], Path]:
    before, after = _scene(tmp / "before.tif"), _scene(tmp / "map_change.tif", col=400)
    return [f"before={before}", f"after={after}", f"out={tmp / 'map.tif'}"], after


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [_scene_onto_itself, _scene_onto_a_hard_link, _tiles_onto_their_labels, _change_map_onto_the_after_scene],
    ids=lambda case: case.__name__.strip("_"),
)
def test_predict_refuses_to_write_over_its_input(case, tmp_path, eurosat_root):
    ckpt = _checkpoint(tmp_path)
    overrides, victim = case(tmp_path, ckpt, eurosat_root)
    before = _digest(victim)
    rc, output = _command("deforest.cli.predict", [f"ckpt_path={ckpt}", "device=cpu", *overrides], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "OutputError")
    assert "is the same file as the input" in line and str(victim.name) in line, line
    assert _digest(victim) == before  # the input is untouched


@pytest.mark.slow
def test_predict_replaces_only_its_own_earlier_map(tmp_path):
    ckpt = _checkpoint(tmp_path)
    scene = _scene(tmp_path / "scene.tif")
    common = [f"ckpt_path={ckpt}", "device=cpu", f"scene={scene}"]
    for _ in range(2):  # the second run replaces the first one's map
        rc, output = _command("deforest.cli.predict", [*common, f"out={tmp_path / 'map.tif'}"], tmp_path)
        assert rc == 0, output[-3000:]
    with rasterio.open(tmp_path / "map.tif") as dst:
        assert dst.tags()["written_by"] == "deforest-predict" and dst.count == 3
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".map.tif")]  # no temporary left
    other = _scene(tmp_path / "other.tif", col=500)  # a file the command did not write
    kept = _digest(other)
    rc, output = _command("deforest.cli.predict", [*common, f"out={other}"], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "OutputError")
    assert line == (f"{other}: exists and is not an earlier output of deforest-predict: give another out=, "
                    f"or overwrite=true to replace it"), line
    assert _digest(other) == kept
    rc, output = _command("deforest.cli.predict", [*common, f"out={other}", "overwrite=true"], tmp_path)
    assert rc == 0, output[-3000:]
    with rasterio.open(other) as dst:
        assert dst.tags()["written_by"] == "deforest-predict"


@pytest.mark.slow
def test_predict_over_a_folder_is_one_line(tmp_path):
    ckpt = _checkpoint(tmp_path)
    scene = _scene(tmp_path / "scene.tif")
    (tmp_path / "maps").mkdir()
    rc, output = _command("deforest.cli.predict", [f"ckpt_path={ckpt}", "device=cpu", f"scene={scene}",
                                                   f"out={tmp_path / 'maps'}"], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "OutputError")
    assert line == f"{tmp_path / 'maps'}: is a folder: give out= a file name, e.g. {tmp_path / 'maps' / 'map.tif'}", line


@pytest.mark.slow
def test_predict_where_no_file_can_be_made_is_one_line(tmp_path):
    ckpt = _checkpoint(tmp_path)
    scene = _scene(tmp_path / "scene.tif")
    rc, output = _command("deforest.cli.predict", [f"ckpt_path={ckpt}", "device=cpu", f"scene={scene}",
                                                   f"out={scene / 'map.tif'}"], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "OutputError")
    assert line == f"{scene / 'map.tif'}: cannot be written: {scene} is a file, not a folder", line


def test_tile_refuses_to_write_over_its_scene(tmp_path):
    scene = _scene(tmp_path / "scene.tif")
    kept = _digest(scene)
    rc, output = _command("deforest.cli.tile", [f"scene={scene}", f"out={scene}", "tile_size=32"], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "OutputError")
    assert line == f"out={scene}: is the same file as the input scene={scene}: give another out=", line
    assert _digest(scene) == kept


def test_tile_keeps_hand_labels_in_its_output_folder(tmp_path):
    scene = _scene(tmp_path / "scene.tif")
    out = tmp_path / "tiles"
    out.mkdir()
    (out / "labels.csv").write_text("path,labels\nmine/a.tif,Forest\n")
    rc, output = _command("deforest.cli.tile", [f"scene={scene}", f"out={out}", "tile_size=32"], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "OutputError")
    assert line == (f"{out / 'labels.csv'}: exists and is not an earlier output of deforest-tile: give another out=, "
                    f"or overwrite=true to replace it"), line
    assert (out / "labels.csv").read_text() == "path,labels\nmine/a.tif,Forest\n"
    rc, output = _command("deforest.cli.tile", [f"scene={scene}", f"out={out}", "tile_size=32", "overwrite=true"], tmp_path)
    assert rc == 0, output[-3000:]  # the hand labels are replaced only with overwrite=true
    assert (out / "labels.csv").read_text().startswith("path,labels,split,minx,miny,maxx,maxy,crs\n")
    rc, output = _command("deforest.cli.tile", [f"scene={scene}", f"out={out}", "tile_size=32"], tmp_path)
    assert rc == 0, output[-3000:]  # its own manifest is replaced without it


@pytest.mark.slow
def test_export_refuses_to_write_over_its_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path)
    before = _digest(ckpt)
    rc, output = _command("deforest.cli.export", [f"ckpt_path={ckpt}", f"out={ckpt}", "format=torchscript"], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "OutputError")
    assert line == f"out={ckpt}: is the same file as the input ckpt_path={ckpt}: give another out=", line
    assert _digest(ckpt) == before


# ---- manifest rows stay inside the data root ----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("absolute", [False, True], ids=["dot_dot", "absolute"])
def test_manifest_rows_outside_the_root_are_refused(absolute, tmp_path, eurosat_root):
    root = _tiles(tmp_path / "d", eurosat_root, {f"t{i}": "Forest River".split()[i % 2] for i in range(6)})
    shutil.copy(root / "t0.tif", tmp_path / "outside.tif")
    outside = str(tmp_path / "outside.tif") if absolute else "../outside.tif"
    with (root / "labels.csv").open("a") as handle:
        handle.write(f"{outside},River\n")
    common = ["data=manifest", f"data.root={root}", "num_workers=0"]
    rc, output = _command("deforest.cli.pack", [*common, f"out={tmp_path / 'pack'}"], tmp_path)
    assert rc == 2, output[-3000:]
    line = _one_line(output, "DatasetError")
    assert line == (f"{root / 'labels.csv'}, line 8: {outside} is outside data.root {root} (give paths relative to "
                    f"data.root, or set data.layout.allow_outside_root=true)"), line
    rc, output = _command("deforest.cli.pack", [*common, f"out={tmp_path / 'pack2'}",
                                                "data.layout.allow_outside_root=true"], tmp_path)
    assert rc == 0, output[-3000:]
    assert "(7 tiles," in output, output[-3000:]


# ---- class names split by a space ----------------------------------------------------------
SPLIT_NAMES = {"a0": "Annual Crop", "a1": "Annual Crop", "f0": "Forest", "f1": "Forest",
               "p0": "Permanent Crop", "p1": "Permanent Crop", "s0": "Sea Lake", "r0": "River"}


@pytest.mark.slow
def test_class_names_split_by_a_space_warn_with_the_fix(tmp_path, eurosat_root):
    root = _tiles(tmp_path / "d", eurosat_root, SPLIT_NAMES)
    rc, output = _command("deforest.cli.pack", ["data=manifest", f"data.root={root}", "num_workers=0",
                                                f"out={tmp_path / 'pack'}"], tmp_path)
    assert rc == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if "split by a space" in line]
    assert len(warnings) == 1, output[-3000:]
    assert ("'Annual Crop' (2 rows), 'Permanent Crop' (2 rows), 'Sea Lake' (1 row)" in warnings[0]
            and "data.layout.task=multiclass data.layout.label_separator=','" in warnings[0]), warnings[0]
    assert "task multilabel (rows carry several space-separated labels): 7 classes" in output, output[-3000:]


def test_label_separator_reads_multi_word_class_names(tmp_path, eurosat_root, caplog):
    from deforest.data.layouts import ManifestLayout

    root = _tiles(tmp_path / "d", eurosat_root, {k: f'"{v}"' for k, v in SPLIT_NAMES.items()})
    with caplog.at_level(logging.INFO, logger="deforest.data.layouts"):
        index = ManifestLayout(root, task="multiclass", label_separator=",").build_index()
    assert index.task == "multiclass"
    assert index.class_names == ["Annual Crop", "Forest", "Permanent Crop", "River", "Sea Lake"]
    assert index.targets.tolist() == [0, 0, 1, 1, 2, 2, 4, 3]
    assert "task multiclass (set by data.layout.task): 5 classes" in caplog.text
    assert "split by a space" not in caplog.text


def test_real_multilabel_manifest_does_not_warn(tmp_path, eurosat_root, bigearthnet_root, caplog):
    """Rows with varying tag counts (the real BigEarthNet labels, one tag per class) are multi-label."""
    import json

    from deforest.data.layouts import ManifestLayout

    labels = {}
    for patch in sorted(p for p in bigearthnet_root.iterdir() if p.is_dir())[:20]:
        record = json.loads((patch / f"{patch.name}_labels_metadata.json").read_text())
        labels[patch.name] = " ".join(name.replace(" ", "_").replace(",", "") for name in record["labels"])
    assert len({len(tags.split()) for tags in labels.values()}) > 1  # varying counts
    root = _tiles(tmp_path / "d", eurosat_root, labels)
    with caplog.at_level(logging.INFO, logger="deforest.data.layouts"):
        index = ManifestLayout(root).build_index()
    assert index.task == "multilabel" and len(index) == 20
    assert "split by a space" not in caplog.text
    assert f"task multilabel (rows carry several space-separated labels): {index.num_classes} classes" in caplog.text
