"""A drill of the faults through the real commands: each ends with exit status 2 and one line
naming the problem, no traceback, no metrics. (SIGTERM, the run-directory lock and disk full run
as commands in test_survival.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[2]
Case = Callable[[Path, dict[str, Path]], tuple[str, list[str]]]


def _folder(tmp: Path, roots: dict[str, Path], classes=("Forest", "River")) -> Path:
    for cls in classes:
        shutil.copytree(roots["eurosat"] / "train" / cls, tmp / "d" / cls)
    return tmp / "d"


def _rewrite(src: Path, dest: Path, data=None, **changes) -> None:
    with rasterio.open(src) as ds:
        profile, pixels = ds.profile, ds.read()
    profile.update(changes)
    with rasterio.open(dest, "w", **profile) as out:
        out.write((pixels if data is None else data).astype(profile["dtype"]))


def _train(root: Path, *extra: str) -> tuple[str, list[str]]:
    return "deforest.cli.train", [f"data.root={root}", "trainer.max_epochs=1", *extra]


def config_values(tmp, roots):
    return "deforest.cli.train", ["data.val_fraction=1.5", "trainer.max_epochs=-3", "loss.scheme=inverse_cnt",
                                  "model.backbone=resnet81"]


def manifest_same_tile_twice(tmp, roots):
    root = _folder(tmp, roots)
    rows = ["path,labels"] + [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.tif"))]
    first = rows[1].split(",")[0]
    rows.append(f"./{first.replace('/', '//')},River")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return _train(root, "data=manifest")


def int8_tile(tmp, roots):
    root = _folder(tmp, roots)
    src = sorted((root / "River").glob("*.tif"))[0]
    with rasterio.open(src) as ds:
        pixels = ds.read()
    _rewrite(src, root / "River" / "River_int8.tif", np.clip(pixels // 100, 0, 127), dtype="int8")
    return _train(root)


def sixty_metre_tile(tmp, roots):
    root = _folder(tmp, roots)
    src = sorted((root / "River").glob("*.tif"))[0]
    with rasterio.open(src) as ds:
        transform = ds.transform * Affine.scale(6)
    _rewrite(src, root / "River" / "River_60m.tif", transform=transform)
    return _train(root)


def dangling_symlink(tmp, roots):
    root = _folder(tmp, roots)
    os.symlink(tmp / "gone.tif", root / "River" / "River_gone.tif")
    return _train(root)


def manifest_row_without_label(tmp, roots):
    root = _folder(tmp, roots)
    tiles = sorted(root.rglob("*.tif"))
    rows = ["path,labels"] + [f"{p.parent.name}/{p.name},{p.parent.name}" for p in tiles[:-1]]
    rows.append(f"{tiles[-1].parent.name}/{tiles[-1].name}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return _train(root, "data=manifest")


def bigearthnet_null_labels(tmp, roots):
    for patch in sorted(p for p in roots["bigearthnet"].iterdir() if p.is_dir())[:4]:
        shutil.copytree(patch, tmp / "ben" / patch.name)
    patch = sorted((tmp / "ben").iterdir())[2]
    path = patch / f"{patch.name}_labels_metadata.json"
    record = json.loads(path.read_text())
    record["labels"] = None
    path.write_text(json.dumps(record))
    return _train(tmp / "ben", "data=bigearthnet")


def _checkpoint(tmp: Path) -> Path:
    from tests.mapping.test_predict import save_untrained

    return save_untrained(tmp / "rgb.ckpt", "multiclass", ["land", "water"], bands=3, tile=32)


def _cut(path: Path) -> Path:
    cut = path.with_name("cut.ckpt")
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


def eval_truncated_checkpoint(tmp, roots):
    return "deforest.cli.eval", [f"ckpt_path={_cut(_checkpoint(tmp))}", f"data.root={_folder(tmp, roots)}"]


def train_resume_truncated_checkpoint(tmp, roots):
    return _train(_folder(tmp, roots), f"ckpt_path={_cut(_checkpoint(tmp))}")


def eval_pickled_code_checkpoint(tmp, roots):
    import torch

    checkpoint = torch.load(_checkpoint(tmp), map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["hook"] = subprocess.Popen
    torch.save(checkpoint, tmp / "code.ckpt")
    return "deforest.cli.eval", [f"ckpt_path={tmp / 'code.ckpt'}", f"data.root={_folder(tmp, roots)}"]


def predict_scene_smaller_than_a_window(tmp, roots):
    scene = roots["scenes"] / "landsat7-bahamas" / "RGB.byte.tif"
    with rasterio.open(scene) as src:
        window = Window(300, 300, 20, 20)
        profile = {**src.profile, "width": 20, "height": 20, "transform": src.window_transform(window)}
        with rasterio.open(tmp / "crop.tif", "w", **profile) as dst:
            dst.write(src.read(window=window))
    return "deforest.cli.predict", [f"ckpt_path={_checkpoint(tmp)}", f"scene={tmp / 'crop.tif'}",
                                    f"out={tmp / 'map.tif'}", "device=cpu"]


CASES: list[tuple[Case, str, str]] = [
    (config_values, "ConfigError",
     r"invalid config: data\.val_fraction=1\.5 must be < 1; model\.backbone='resnet81' must be one of .* \(did you mean "
     r"'resnet18'\?\); loss\.scheme='inverse_cnt' must be one of .*; trainer\.max_epochs=-3 must be >= 1 \(or -1: no limit\)$"),
    (manifest_same_tile_twice, "DatasetError", r"labels\.csv, line \d+: \./Forest//Forest_\d+\.tif is the same file as "
                                               r"Forest/Forest_\d+\.tif on line 2 "),
    (int8_tile, "TileError", r"River_int8\.tif: has dtype int8, the dataset's tiles are uint16"),
    (sixty_metre_tile, "TileError", r"River_60m\.tif: has 60[.\d]* m pixels, the dataset's tiles have 10[.\d]* m"),
    (dangling_symlink, "TileError", r"River_gone\.tif: is a dangling symlink \(to .*gone\.tif, which does not exist\)"),
    (manifest_row_without_label, "DatasetError", r"labels\.csv, line \d+: no 'labels' value"),
    (bigearthnet_null_labels, "DatasetError", r"_labels_metadata\.json: 'labels' is null"),
    (eval_truncated_checkpoint, "CheckpointError", r"cut\.ckpt: is not a readable checkpoint: truncated or corrupt"),
    (train_resume_truncated_checkpoint, "CheckpointError", r"cut\.ckpt: is not a readable checkpoint: truncated or corrupt"),
    (eval_pickled_code_checkpoint, "CheckpointError",
     r"code\.ckpt: refused: it holds pickled objects, not only tensors and plain data \(Weights only load failed: "
     r"Unsupported global: GLOBAL \S*Popen\)$"),
    (predict_scene_smaller_than_a_window, "TileError", r"crop\.tif: is 20x20 pixels, smaller than one 32x32 window"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,kind,message", CASES, ids=[c[0].__name__ for c in CASES])
def test_fault_ends_in_one_line_without_traceback(case, kind, message, tmp_path, eurosat_root, bigearthnet_root, scenes_root):
    import re

    module, overrides = case(tmp_path, {"eurosat": eurosat_root, "bigearthnet": bigearthnet_root, "scenes": scenes_root})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", module, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line.split(f"] - {kind}: ", 1)[1] for line in output.splitlines() if f"] - {kind}: " in line]
    assert len(lines) == 1 and re.search(message, lines[0]), output[-3000:]
    assert not (run_dir / "metrics.json").exists() and not (tmp_path / "map.tif").exists()
    assert not (run_dir / "deforest.lock").exists()  # the lock was released
