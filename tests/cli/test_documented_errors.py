"""Every error docs/errors.md documents, through the real commands: each ends in exit status 2
(143 for ``RunInterrupted``), exactly one error line, no traceback, and the line says what the
page says (up to its placeholders).

**The page's convention** (what :func:`documented_errors` reads): an error is

* the first backticked message of a row of a table whose first column is headed ``message``
  (``message (after `<file>: `)`` included); rows starting with ``warning`` or ``info`` are not
  errors, and further ``/``-separated variants of a row are covered by the row's case;
* a line of a fenced block, or a backticked span in the text, that starts with an error type
  (``ConfigError: ...``).

Placeholders in a message: ``<anything>``, ``...``, ``DIR``, ``HxW``/``hxw`` and the capitals ``X``,
``Y``, ``R``, ``T``, ``N``, ``M``, ``K``, ``A``, ``B`` standing alone; in a console example (a
fenced block) its paths and numbers too. Every documented error has a case in :data:`CASES` (a
command line and the files it needs; :data:`VARIANTS` where it triggers a later variant of its
row) or a reason in :data:`ELSEWHERE` (a test of its own needs a signal, a full disk, a diverging run);
``test_every_documented_error_has_a_case`` fails naming the ones that have neither, so a new
error gets a case with its line in the page.

The cases run through each command's ``main`` (the console scripts' entry point, with its error
handler) in two worker processes that import torch once, each case's output captured at the
file descriptors, as a terminal shows it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
from affine import Affine

from tests.cli import test_cli_faults as cli_faults
from tests.cli import test_command_faults as command_faults
from tests.cli.test_cli_faults import _checkpoint, _folder, _rewrite

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "errors.md"
SCENE = REPO / "data" / "scenes" / "landsat7-bahamas" / "RGB.byte.tif"
TYPES = ("TileError", "DatasetError", "ConfigError", "CheckpointError", "OutputError", "RunDirLocked",
         "AugmentationError", "WeightsError", "FloatingPointError", "RunInterrupted", "AreaError")
FAST = ["trainer.fast_dev_run=true", "++model.width=8", "model.tta=false", "data.num_workers=0"]


# ---- the page ------------------------------------------------------------------------------
def documented_errors(text: str) -> dict[str, bool]:
    """The documented error messages of ``text`` (docs/errors.md), in page order (see the module
    doc): message -> whether it is a console example (a fenced block), whose numbers and paths
    are examples too."""
    found: dict[str, bool] = {}
    typed = re.compile(r"(?:%s): " % "|".join(TYPES))
    header, fenced = None, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:  # an example of the console: the message after the log prefix
            message = re.sub(r"^(?:\[[^\]]*\])+ - ", "", line.strip())
            if typed.match(message):
                found.setdefault(message, True)
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set(cells[0]) <= set("-: "):
                continue
            if header is None:
                header = cells[0]
            elif header.startswith("message") and not re.match(r"(warning|info)\b", cells[0]):
                spans = re.findall(r"`([^`]+)`", cells[0])
                if spans:
                    found.setdefault(spans[0], False)
            continue
        header = None
        for span in re.findall(r"`([^`]+)`", line):
            if typed.match(span):
                found.setdefault(span, False)
    return found


PLACEHOLDER = r"<[^<>]+>|\.\.\.|\b(?:[XYRTNMKAB]|DIR|HxW|hxw)\b"


def message_pattern(documented: str, example: bool = False) -> re.Pattern:
    """``documented`` as a regular expression: its placeholders match anything; in a console
    ``example``, so do its paths (a word with a ``/``) and numbers."""
    placeholder = rf"{PLACEHOLDER}|\S*/\S*[^\s.;:,)]|\d+(?:[-:.]\d+)*|\bnode\d+" if example else PLACEHOLDER
    parts = re.split(f"({placeholder})", documented)
    return re.compile("".join(".*?" if i % 2 else re.escape(p) for i, p in enumerate(parts)))


# ---- the cases: documented message -> (tmp, roots) -> (command module, overrides) ----------------
Case = Callable[[Path, dict[str, Path]], tuple[str, list[str]]]


def _train(root: Path, *extra: str) -> tuple[str, list[str]]:
    return "deforest.cli.train", [f"data.root={root}", *FAST, *extra]


def _manifest(tmp: Path, roots, rows: list[str], header: str = "path,labels") -> Path:
    root = _folder(tmp, roots)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def _rows(root: Path) -> list[str]:
    return [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.tif"))]


def _first_tile(root: Path, cls: str = "River") -> Path:
    return sorted((root / cls).glob("*.tif"))[0]


def _predict(tmp: Path, *extra: str) -> tuple[str, list[str]]:
    return "deforest.cli.predict", [f"ckpt_path={_checkpoint(tmp)}", "device=cpu", *extra]


def truncated_tile(tmp, roots):
    root = _folder(tmp, roots)
    tile = _first_tile(root)
    tile.write_bytes(tile.read_bytes()[: tile.stat().st_size // 2])
    return _train(root)


def empty_tile(tmp, roots):
    root = _folder(tmp, roots)
    _first_tile(root).write_bytes(b"")
    return _train(root)


def html_as_tif(tmp, roots):
    root = _folder(tmp, roots)
    _first_tile(root).write_bytes(b"<!doctype html><html>404</html>\n")
    return _train(root)


def other_band_count(tmp, roots):
    root = _folder(tmp, roots)
    src = _first_tile(root)
    with rasterio.open(src) as ds:
        pixels = ds.read()
    _rewrite(src, root / "River" / "River_3bands.tif", pixels[:3], count=3)
    return _train(root)


def other_tile_size(tmp, roots):
    root = _folder(tmp, roots)
    src = _first_tile(root)
    with rasterio.open(src) as ds:
        pixels = ds.read()
    _rewrite(src, root / "River" / "River_edge.tif", pixels[:, :32, :40], height=32, width=40)
    return _train(root)


def complex_tile(tmp, roots):
    root = _folder(tmp, roots)
    src = _first_tile(root)
    with rasterio.open(src) as ds:
        pixels = ds.read()
    _rewrite(src, root / "River" / "River_complex.tif", pixels.astype("complex64"), dtype="complex64")
    return _train(root)


def nan_tile(tmp, roots):
    root = _folder(tmp, roots)
    src = _first_tile(root)
    with rasterio.open(src) as ds:
        pixels = ds.read().astype("float32")
    pixels[0, :2, :3] = np.nan
    for tile in sorted(root.rglob("*.tif")):  # one dtype for all, so only the NaN is wrong
        with rasterio.open(tile) as ds:
            data = ds.read().astype("float32")
        _rewrite(tile, tile, pixels if tile == src else data, dtype="float32")
    return _train(root, "data.validate=full")


def all_nodata_tile(tmp, roots):
    root = _folder(tmp, roots)
    src = _first_tile(root)
    with rasterio.open(src) as ds:
        shape = (ds.count, ds.height, ds.width)
    _rewrite(src, src, np.zeros(shape), nodata=0)
    return _train(root, "data.validate=full")


def no_class_folders(tmp, roots):
    (tmp / "flat").mkdir()
    shutil.copy(_first_tile(roots["eurosat"] / "train"), tmp / "flat" / "a.tif")
    return _train(tmp / "flat")


def empty_class_folder(tmp, roots):
    root = _folder(tmp, roots)
    (root / "Pasture").mkdir()
    return _train(root)


def class_without_training_tile(tmp, roots):
    root = tmp / "d"
    shutil.copytree(roots["eurosat"] / "train" / "Forest", root / "train" / "Forest")
    shutil.copytree(roots["eurosat"] / "train" / "Forest", root / "test" / "Forest")
    shutil.copytree(roots["eurosat"] / "train" / "River", root / "test" / "River")
    return _train(root)


def empty_train_split(tmp, roots):
    return _train(_folder(tmp, roots), "data.val_fraction=0.5", "data.test_fraction=0.49")


def manifest_missing(tmp, roots):
    return _train(_folder(tmp, roots), "data=manifest")


def manifest_missing_column(tmp, roots):
    root = _folder(tmp, roots)
    return _train(_manifest(tmp / "m", roots, [r.split(",")[0] for r in _rows(root)], header="path"), "data=manifest")


def manifest_not_utf8(tmp, roots):
    root = _folder(tmp, roots)
    (root / "labels.csv").write_bytes(("path,labels\n" + "\n".join(_rows(root)) + "\n").encode() + b"Forest/\xff.tif,Forest\n")
    return _train(root, "data=manifest")


def manifest_file_missing(tmp, roots):
    root = _folder(tmp, roots)
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*_rows(root), "Forest/gone.tif,Forest"]) + "\n")
    return _train(root, "data=manifest")


def manifest_duplicate(tmp, roots):
    root = _folder(tmp, roots)
    rows = _rows(root)
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*rows, rows[0]]) + "\n")
    return _train(root, "data=manifest")


def same_tile_in_two_classes(tmp, roots):
    root = _folder(tmp, roots)
    tile = _first_tile(root, "Forest")
    os.symlink(tile, root / "River" / "River_link.tif")
    return _train(root)


def manifest_extra_value(tmp, roots):
    root = _folder(tmp, roots)
    rows = _rows(root)
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*rows[:-1], rows[-1] + ",extra"]) + "\n")
    return _train(root, "data=manifest")


def manifest_empty_path(tmp, roots):
    root = _folder(tmp, roots)
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*_rows(root), ",Forest"]) + "\n")
    return _train(root, "data=manifest")


def manifest_dangling_symlink(tmp, roots):
    root = _folder(tmp, roots)
    os.symlink(tmp / "gone.tif", root / "Forest" / "zz_gone.tif")
    rows = [r for r in _rows(root) if "zz_gone" not in r]
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*rows, "Forest/zz_gone.tif,Forest"]) + "\n")
    return _train(root, "data=manifest")


def manifest_unknown_label(tmp, roots):
    root = _folder(tmp, roots)
    rows = _rows(root)
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*rows[:-1], rows[-1].split(",")[0] + ",wter"]) + "\n")
    return _train(root, "data=manifest", "data.layout.class_names=[Forest,River]")


def manifest_empty_labels(tmp, roots):
    root = _folder(tmp, roots)
    rows = _rows(root)
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*rows[:-1], rows[-1].split(",")[0] + ","]) + "\n")
    return _train(root, "data=manifest")


def manifest_several_labels_multiclass(tmp, roots):
    root = _folder(tmp, roots)
    rows = _rows(root)
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*rows[:-1], rows[-1] + " Forest"]) + "\n")
    return _train(root, "data=manifest", "data.layout.task=multiclass")


def manifest_outside_root(tmp, roots):
    root = _folder(tmp, roots)
    outside = tmp / "x.tif"
    shutil.copy(_first_tile(root), outside)
    (root / "labels.csv").write_text("path,labels\n" + "\n".join([*_rows(root), "../x.tif,River"]) + "\n")
    return _train(root, "data=manifest")


def bigearthnet_missing_band(tmp, roots):
    for patch in sorted(p for p in roots["bigearthnet"].iterdir() if p.is_dir())[:4]:
        shutil.copytree(patch, tmp / "ben" / patch.name)
    patch = sorted((tmp / "ben").iterdir())[1]
    next(patch.glob("*_B8A.tif")).unlink()
    return _train(tmp / "ben", "data=bigearthnet")


def bigearthnet_labels_json_missing(tmp, roots):
    for patch in sorted(p for p in roots["bigearthnet"].iterdir() if p.is_dir())[:4]:
        shutil.copytree(patch, tmp / "ben" / patch.name)
    patch = sorted((tmp / "ben").iterdir())[1]
    (patch / f"{patch.name}_labels_metadata.json").unlink()
    return _train(tmp / "ben", "data=bigearthnet")


def band_index_outside(tmp, roots):
    root = tmp / "rgb"
    for cls in ("Forest", "River"):
        (root / cls).mkdir(parents=True)
        for tile in sorted((roots["eurosat"] / "train" / cls).glob("*.tif"))[:8]:
            with rasterio.open(tile) as ds:
                pixels = ds.read()
            _rewrite(tile, root / cls / tile.name, pixels[:3], count=3)
    return _train(root, "data.bands=[1,2,4]", "data.layout.band_names=null")


def no_pack_there(tmp, roots):
    return _train(_folder(tmp, roots), f"data.packed={tmp / 'nopack'}")


def checkpoint_not_found(tmp, roots):
    return "deforest.cli.eval", [f"ckpt_path={tmp / 'absent.ckpt'}", f"data.root={_folder(tmp, roots)}"]


def checkpoint_weights_only(tmp, roots):
    import torch

    checkpoint = torch.load(_checkpoint(tmp), map_location="cpu", weights_only=True)
    torch.save({"state_dict": checkpoint["state_dict"]}, tmp / "weights.ckpt")
    return _train(_folder(tmp, roots), f"ckpt_path={tmp / 'weights.ckpt'}")


def checkpoint_of_another_program(tmp, roots):
    import torch

    torch.save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {"lr": 0.1}}, tmp / "other.ckpt")
    return "deforest.cli.eval", [f"ckpt_path={tmp / 'other.ckpt'}", f"data.root={_folder(tmp, roots)}"]


def checkpoint_with_nan_calibration(tmp, roots):
    import torch

    checkpoint = torch.load(_checkpoint(tmp), map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["calibration_bias"][0] = float("nan")
    torch.save(checkpoint, tmp / "calibration.ckpt")
    return "deforest.cli.eval", [f"ckpt_path={tmp / 'calibration.ckpt'}", f"data.root={_folder(tmp, roots)}"]


def checkpoint_of_another_network(tmp, roots):
    import torch

    checkpoint = torch.load(_checkpoint(tmp), map_location="cpu", weights_only=True)
    checkpoint["state_dict"].pop(next(iter(checkpoint["state_dict"])))  # a deforest file, a network it cannot fill
    torch.save(checkpoint, tmp / "other.ckpt")
    return _predict(tmp, f"scene={SCENE}", f"out={tmp / 'map.tif'}")[0], [
        f"ckpt_path={tmp / 'other.ckpt'}", f"scene={SCENE}", f"out={tmp / 'map.tif'}", "device=cpu"]


def three_bad_tiles(tmp, roots):
    root = _folder(tmp, roots)
    for tile in sorted((root / "River").glob("*.tif"))[-3:]:  # past the reference headers (the first 32)
        tile.write_bytes(tile.read_bytes()[: tile.stat().st_size // 2])
    return _train(root)


def auto_resume_all_damaged(tmp, roots):
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 100)
    return _train(_folder(tmp, roots), "ckpt_path=auto")


def onnx_not_found(tmp, roots):
    return "deforest.cli.predict", [f"ckpt_path={tmp / 'absent.onnx'}", f"scene={SCENE}", f"out={tmp / 'map.tif'}", "device=cpu"]


class _RunsCode:
    def __reduce__(self):
        return os.system, ("true",)


def pickle_calling_os_system(tmp, roots):
    import torch

    checkpoint = torch.load(_checkpoint(tmp), map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["hook"] = _RunsCode()
    torch.save(checkpoint, tmp / "code.ckpt")
    return "deforest.cli.eval", [f"ckpt_path={tmp / 'code.ckpt'}", f"data.root={_folder(tmp, roots)}"]


def predict_into_the_scene(tmp, roots):
    scene = tmp / "scene.tif"
    shutil.copy(SCENE, scene)
    return _predict(tmp, f"scene={scene}", f"out={scene}")


def pack_into_the_data(tmp, roots):
    root = _folder(tmp, roots)
    return "deforest.cli.pack", [f"data.root={root}", f"out={root}"]


def predict_over_a_foreign_file(tmp, roots):
    (tmp / "notes.tif").write_text("mine\n")
    return _predict(tmp, f"scene={SCENE}", f"out={tmp / 'notes.tif'}")


def predict_out_is_a_folder(tmp, roots):
    (tmp / "maps").mkdir()
    return _predict(tmp, f"scene={SCENE}", f"out={tmp / 'maps'}")


def predict_through_a_file(tmp, roots):
    (tmp / "afile").write_text("x\n")
    return _predict(tmp, f"scene={SCENE}", f"out={tmp / 'afile' / 'map.tif'}")


def predict_wrong_band_count(tmp, roots):
    from tests.mapping.test_predict import save_untrained

    ckpt = save_untrained(tmp / "six.ckpt", "multiclass", ["land", "water"], bands=6, tile=32)
    return "deforest.cli.predict", [f"ckpt_path={ckpt}", f"scene={SCENE}", f"out={tmp / 'map.tif'}", "device=cpu"]


def run_dir_locked(tmp, roots):
    # the real lock, held by another live process
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from deforest.core.safety import RunLock; "
                               "RunLock.hold(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(tmp / "run")],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    _HOLDERS.append(holder)
    return "deforest.cli.tile", [f"scene={SCENE}", f"out={tmp / 'tiles'}"]


def tile_without_a_band(tmp, roots):
    root = _folder(tmp, roots)
    tile = sorted((root / "River").glob("*.tif"))[1]  # not the reference tile: its names would be the dataset's
    with rasterio.open(tile, "r+") as ds:
        ds.descriptions = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B13")
    return _train(root)


def constant_tile(tmp, roots, value: float = 0.0):
    root = _folder(tmp, roots)
    src = _first_tile(root)
    with rasterio.open(src) as ds:
        shape = (ds.count, ds.height, ds.width)
    _rewrite(src, src, np.full(shape, value) + (np.arange(shape[0])[:, None, None] * value))
    return _train(root, "data.validate=full")


_HOLDERS: list[subprocess.Popen] = []
#: what the worker processes need beside the cases' files: environment variables, servers to stop at the end
_ENV: dict[str, str] = {}
_SERVERS: list = []


def balanced_sampler_on_a_streamed_pack(tmp, roots):
    """A pack in object storage: a real S3 API (moto's server on 127.0.0.1), as tests/data/test_stream.py uses."""
    import fsspec
    from hydra import compose, initialize_config_module
    from moto.server import ThreadedMotoServer

    from deforest.cli.pack import pack

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _SERVERS.append(server)
    host, port = server.get_host_and_port()
    _ENV.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    root = _folder(tmp, roots)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _ENV.items():
            mp.setenv(key, value)
        # moto keeps every server's buckets in one store per process: a bucket name of its own,
        # so test_stream.py's "packs" bucket is still free when that module runs in this process
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("documented-errors")
        with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
            cfg = compose("pack", overrides=[f"data.root={root}", f"paths.cache_dir={tmp / 'cache'}",
                                             "out=s3://documented-errors/d", "chunk_tiles=16"])
        pack(cfg)
    return _train(root, "data.packed=s3://documented-errors/d", "data.sampler=balanced")


def garbage_tiff(tmp, roots):
    root = _folder(tmp, roots)
    tile = _first_tile(root)
    tile.write_bytes(b"II*\x00" + bytes(range(256)) * 400)  # a TIFF signature over garbage
    return _train(root)


def manifest_one_tile_two_spellings(tmp, roots):
    root = _folder(tmp, roots)
    rows = ["tiles/x.tif,River", *_rows(root)[1:], "./tiles//x.tif,Forest"]
    (root / "tiles").mkdir()
    shutil.copy(_first_tile(root), root / "tiles" / "x.tif")
    (root / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    return _train(root, "data=manifest")


def _pairs(tmp: Path, rows: list[str], header: str = "before,after,labels") -> Path:
    """Two-date tiles cut from the real Landsat scene (``t0/``, ``t1/``: the same windows) and a pair manifest."""
    root = tmp / "pairs"
    with rasterio.open(SCENE) as src:
        for date in ("t0", "t1"):
            (root / date).mkdir(parents=True)
            for i in range(16):
                window = rasterio.windows.Window(200 + 32 * (i % 8), 300 + 32 * (i // 8), 32, 32)
                profile = {**src.profile, "width": 32, "height": 32, "transform": src.window_transform(window)}
                with rasterio.open(root / date / f"a{i}.tif", "w", **profile) as dst:
                    dst.write(src.read(window=window))
    (root / "pairs.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def _train_pairs(root: Path, *extra: str) -> tuple[str, list[str]]:
    return "deforest.cli.train", ["experiment=forest_loss", f"data.root={root}", *FAST, *extra]


def pairs_missing_column(tmp, roots):
    return _train_pairs(_pairs(tmp, ["t0/a0.tif,loss"], header="before,labels"))


def pairs_not_on_one_grid(tmp, roots):
    root = _pairs(tmp, ["t0/a0.tif,t1/a1.tif,loss"])
    with rasterio.open(root / "t1" / "a1.tif") as src:
        data, profile = src.read(), src.profile
    with rasterio.open(root / "t1" / "a1.tif", "w", **{**profile, "transform": profile["transform"] * Affine.translation(1, 0)}) as dst:
        dst.write(data)
    return _train_pairs(root)


def pairs_same_file(tmp, roots):
    return _train_pairs(_pairs(tmp, ["t0/a0.tif,t0/a0.tif,loss"]))


def pack_holding_objects(tmp, roots):
    from deforest.data.layouts import FolderLayout
    from deforest.data.stores.packing import pack_dataset

    root = _folder(tmp, roots)
    pack_dataset(FolderLayout(root), tmp / "pack")
    np.save(tmp / "pack" / "tiles.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return _train(root, f"data.packed={tmp / 'pack'}")


def predict_dates_of_other_bands(tmp, roots):
    with rasterio.open(SCENE) as src:
        profile, data = src.profile, src.read()
    for name, count in (("before.tif", 6), ("after.tif", 4)):  # the page's example: 6 bands, then 4
        with rasterio.open(tmp / name, "w", **{**profile, "count": count}) as dst:
            dst.write(np.concatenate([data, data])[:count])
    return "deforest.cli.predict", [f"ckpt_path={_pair_checkpoint(tmp, 6)}", f"before={tmp / 'before.tif'}",
                                    f"after={tmp / 'after.tif'}", f"out={tmp / 'map.tif'}", "device=cpu",
                                    "change.class_name=loss"]


def _pair_checkpoint(tmp: Path, per_date: int = 3) -> Path:
    from tests.mapping.test_predict import save_untrained

    names = [f"B{b}@t{t}" for t in (0, 1) for b in range(1, per_date + 1)]
    return save_untrained(tmp / "pair.ckpt", "multiclass", ["loss", "stable"], bands=2 * per_date, tile=32,
                          band_names=names)


def change_map_without_crs(tmp, roots):
    with rasterio.open(SCENE) as src:
        profile, data = src.profile, src.read(window=rasterio.windows.Window(200, 200, 96, 96))
    profile.update(width=96, height=96, crs=None, transform=Affine.identity())
    for name in ("before.tif", "after.tif"):
        with rasterio.open(tmp / name, "w", **profile) as dst:
            dst.write(data)
    return "deforest.cli.predict", [f"ckpt_path={_pair_checkpoint(tmp)}", f"before={tmp / 'before.tif'}",
                                    f"after={tmp / 'after.tif'}", f"out={tmp / 'map.tif'}", "device=cpu",
                                    "change.class_name=loss", "change.min_area_ha=1"]


def _eurosat_checkpoint(tmp: Path, task: str, classes: list[str]) -> Path:
    from deforest.core.contract import SourceRecord
    from tests.mapping.test_predict import save_untrained

    return save_untrained(tmp / f"{task}.ckpt", task, classes, bands=13, tile=64,
                          source=SourceRecord(13, "uint16"))


def eval_other_task(tmp, roots):
    ckpt = _eurosat_checkpoint(tmp, "multiclass", ["Forest", "River"])
    ben = tmp / "ben"
    for patch in sorted(p for p in roots["bigearthnet"].iterdir() if p.is_dir())[:6]:
        shutil.copytree(patch, ben / patch.name)
    return "deforest.cli.eval", [f"ckpt_path={ckpt}", "data=bigearthnet", f"data.root={ben}", "resplit=true"]


def eval_unknown_classes(tmp, roots):
    ckpt = _eurosat_checkpoint(tmp, "multiclass", ["Forest", "Pasture"])
    return "deforest.cli.eval", [f"ckpt_path={ckpt}", f"data.root={_folder(tmp, roots)}", "resplit=true"]


def _band_file(tmp: Path, name: str, band: int, window=None) -> Path:
    with rasterio.open(SCENE) as src:
        window = window or rasterio.windows.Window(0, 0, src.width, src.height)
        profile = {**src.profile, "count": 1, "width": int(window.width), "height": int(window.height),
                   "transform": src.window_transform(window)}
        with rasterio.open(tmp / name, "w", **profile) as dst:
            dst.write(src.read(band, window=window), 1)
    return tmp / name


def tile_band_files_off_grid(tmp, roots):
    first = _band_file(tmp, "b1.tif", 1)
    second = _band_file(tmp, "b2.tif", 2, rasterio.windows.Window(0, 0, 400, 400))
    return "deforest.cli.tile", [f"scene=[{first},{second}]", f"out={tmp / 'tiles'}"]


def _polygons(path: Path, boxes, fields: dict) -> Path:
    import pyogrio
    import shapely

    with rasterio.open(SCENE) as src:
        crs = src.crs.to_string()
    pyogrio.raw.write(path, geometry=np.asarray([shapely.to_wkb(shapely.box(*b)) for b in boxes], dtype=object),
                      field_data=[np.asarray(v, dtype=object) for v in fields.values()], fields=list(fields),
                      geometry_type="Polygon", crs=crs, driver="GPKG")
    return path


def _scene_box(shift: float = 0.0) -> tuple[float, float, float, float]:
    with rasterio.open(SCENE) as src:
        left, bottom, right, top = src.bounds
    return left + shift, bottom + shift, (left + right) / 2 + shift, (bottom + top) / 2 + shift


def tile_labels_elsewhere(tmp, roots):
    labels = _polygons(tmp / "labels.gpkg", [_scene_box(shift=1e6)], {"class": ["forest"]})
    return "deforest.cli.tile", [f"scene={SCENE}", f"labels={labels}", f"out={tmp / 'tiles'}", "tile_size=128"]


def tile_labels_without_the_field(tmp, roots):
    labels = _polygons(tmp / "labels.gpkg", [_scene_box()], {"class": ["forest"]})
    return "deforest.cli.tile", [f"scene={SCENE}", f"labels={labels}", "label_field=klass", f"out={tmp / 'tiles'}",
                                 "tile_size=128"]


class RemoveTrainingTiles(pl.Callback):
    """Deletes every training tile once training starts: the files were indexed, then went away."""

    def on_train_start(self, trainer, pl_module) -> None:
        for source in trainer.datamodule.datasets["train"].sources:
            os.unlink(source)


def tile_gone_after_indexing(tmp, roots):
    return _train(_folder(tmp, roots), "+callbacks.gone._target_=tests.cli.test_documented_errors.RemoveTrainingTiles")


def onnx_without_contract(tmp, roots):
    import onnx

    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["raw"], ["probabilities"])], "plain",
                                   [onnx.helper.make_tensor_value_info("raw", onnx.TensorProto.FLOAT, [1, 2])],
                                   [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, 2])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(tmp / "plain.onnx"))
    return "deforest.cli.predict", [f"ckpt_path={tmp / 'plain.onnx'}", f"scene={SCENE}", f"out={tmp / 'map.tif'}"]


def _exported(tmp: Path, tile: int = 64) -> Path:
    from tests.mapping.test_export import run_export
    from tests.mapping.test_predict import save_untrained

    ckpt = save_untrained(tmp / "m.ckpt", "multiclass", ["land", "water"], bands=3, tile=tile)
    return run_export(tmp, str(ckpt), "onnx")


def onnx_other_tile_size(tmp, roots):
    return "deforest.cli.predict", [f"ckpt_path={_exported(tmp)}", f"scene={SCENE}", f"out={tmp / 'map.tif'}",
                                    "tile_size=32"]


def onnx_without_onnxruntime(tmp, roots):
    module, argv = onnx_other_tile_size(tmp, roots)
    return module, argv[:-1], ["onnxruntime"]


def change_area_without_scipy(tmp, roots):
    shutil.copy(SCENE, tmp / "after.tif")
    return "deforest.cli.predict", [f"ckpt_path={_pair_checkpoint(tmp)}", f"before={SCENE}", f"after={tmp / 'after.tif'}",
                                    f"out={tmp / 'map.tif'}", "device=cpu", "change.class_name=loss",
                                    "change.low=0", "change.high=0", "change.min_area_ha=1"], ["scipy"]


def predict_other_pixel_size(tmp, roots):
    from deforest.core.contract import SourceRecord
    from tests.mapping.test_predict import save_untrained

    # a model of 30 m tiles; the Landsat scene has 300 m pixels
    ckpt = save_untrained(tmp / "m.ckpt", "multiclass", ["land", "water"], bands=3, tile=32,
                          source=SourceRecord(3, "uint8", pixel_size=[30.0, 30.0], pixel_units="m"))
    return "deforest.cli.predict", [f"ckpt_path={ckpt}", f"scene={SCENE}", f"out={tmp / 'map.tif'}", "device=cpu"]


def predict_other_scale(tmp, roots):
    from deforest.core.contract import SourceRecord
    from tests.mapping.test_predict import save_untrained

    # a model of uint16 reflectance x10000; the scene as float32 reflectance 0..1
    ckpt = save_untrained(tmp / "m.ckpt", "multiclass", ["land", "water"], bands=3, tile=32,
                          source=SourceRecord(3, "uint16", value_low=[300.0] * 3, value_high=[9000.0] * 3))
    with rasterio.open(SCENE) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(tmp / "reflectance.tif", "w", **{**profile, "dtype": "float32", "nodata": None}) as dst:
        dst.write(data.astype("float32") / 255)
    return "deforest.cli.predict", [f"ckpt_path={ckpt}", f"scene={tmp / 'reflectance.tif'}", f"out={tmp / 'map.tif'}",
                                    "device=cpu"]


def longtail_folder_of_something_else(tmp, roots):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("mine\n")
    return "deforest.cli.train", ["experiment=imbalance_multilabel", f"data.root={tmp / 'notes'}", *FAST]


def longtail_folder_of_other_settings(tmp, roots):
    (tmp / "bench").mkdir()
    (tmp / "bench" / "benchmark.json").write_text(json.dumps({"seed": 7, "sizes": {}, "size": 16, "decay": 0.5}))
    return "deforest.cli.train", ["experiment=imbalance_multilabel", f"data.root={tmp / 'bench'}", *FAST]


def siamese_with_pretrained_weights(tmp, roots):
    rows = [f"t0/a{i}.tif,t1/a{i}.tif,{'loss' if i % 2 else 'stable'}" for i in range(16)]
    return _train_pairs(_pairs(tmp, rows), "data.layout.band_names=[B1,B2,B3]", "model.fusion=siamese",
                        f"model.weights={_checkpoint(tmp)}")


def siamese_on_single_dates(tmp, roots):
    return _train(_folder(tmp, roots), "model.fusion=siamese")


# ---- deforest-area: the map and points of Olofsson et al. (2014), as tests/mapping/test_area.py writes them
def _area(tmp: Path, counts=None, edit=None, *extra: str) -> tuple[str, list[str]]:
    from tests.mapping.test_area import CLASS_NAMES, COUNTS, paper_map, paper_points

    grid = paper_map(tmp / "map.tif")
    paper_points(tmp / "points.gpkg", grid, COUNTS if counts is None else counts)
    if edit is not None:
        edit(tmp / "points.gpkg")
    return "deforest.cli.area", [f"map={tmp / 'map.tif'}", f"reference={tmp / 'points.gpkg'}", "class_field=reference",
                                 CLASS_NAMES, *extra]


def _edit_points(path: Path, xy=None, labels=None, name: str = "reference") -> None:
    import pyogrio
    import shapely

    from tests.mapping.test_area import write_points

    meta, _, geometry, fields = pyogrio.raw.read(path)
    points = shapely.from_wkb(geometry)
    xs, ys, values = shapely.get_x(points), shapely.get_y(points), np.asarray(fields[0], dtype=object)
    if xy is not None:
        xs, ys = np.append(xs, xy[0]), np.append(ys, xy[1])
        values = np.append(values, "deforestation")
    if labels is not None:
        values = labels(values)
    write_points(path, xs, ys, {name: values}, "EPSG:4326")


def area_field_missing(tmp, roots):
    module, argv = _area(tmp, edit=lambda p: _edit_points(p))
    return module, [a.replace("class_field=reference", "class_field=klass") for a in argv]


def area_points_outside(tmp, roots):
    return _area(tmp, edit=lambda p: _edit_points(p, xy=(-60.0, 18.0)))


def area_points_on_nodata(tmp, roots):
    import rasterio.warp

    x, y = rasterio.transform.xy(Affine(3000, 0, 500_000, 0, -3000, 2_000_000), 3, 40)  # the nodata column
    (lon,), (lat,) = rasterio.warp.transform("EPSG:32619", "EPSG:4326", [x], [y])
    return _area(tmp, edit=lambda p: _edit_points(p, xy=(lon, lat)))


def area_class_without_sample(tmp, roots):
    from tests.mapping.test_area import COUNTS

    counts = COUNTS.copy()
    counts[1] = 0
    return _area(tmp, counts, edit=lambda p: _edit_points(p))


def area_unlabelled_point(tmp, roots):
    return _area(tmp, edit=lambda p: _edit_points(p, labels=lambda v: np.append(v[:-1], "")))


def area_unknown_reference(tmp, roots):
    return _area(tmp, edit=lambda p: _edit_points(p, labels=lambda v: np.append(v[:-1], "wter")))


def area_polygons(tmp, roots):
    import pyogrio
    import shapely

    module, argv = _area(tmp, edit=lambda p: _edit_points(p))
    box = shapely.box(-68.9, 18.0, -68.8, 18.1)
    pyogrio.raw.write(tmp / "polygons.gpkg", geometry=np.asarray([shapely.to_wkb(box)], dtype=object),
                      field_data=[np.asarray(["forest_gain"], dtype=object)], fields=["reference"],
                      geometry_type="Polygon", crs="EPSG:4326", driver="GPKG")
    return module, [a.replace(str(tmp / "points.gpkg"), str(tmp / "polygons.gpkg")) for a in argv]


def area_map_without_crs(tmp, roots):
    module, argv = _area(tmp, edit=lambda p: _edit_points(p))
    with rasterio.open(tmp / "map.tif") as src:
        profile, data = src.profile, src.read()
    with rasterio.open(tmp / "nocrs.tif", "w", **{**profile, "crs": None}) as dst:
        dst.write(data)
    return module, [a.replace(str(tmp / "map.tif"), str(tmp / "nocrs.tif")) for a in argv]


def area_sample_impossible(tmp, roots):
    from tests.mapping.test_area import CLASS_NAMES, paper_map

    paper_map(tmp / "map.tif")
    return "deforest.cli.area", ["sample", f"map={tmp / 'map.tif'}", "n=10", "min_per_class=5", f"out={tmp / 's.gpkg'}",
                                 CLASS_NAMES]

#: documented message (as the page writes it) -> the case that triggers it
CASES: dict[str, Case] = {
    "TileError: data/eurosat-ms/train/River/River_17.tif: is truncated: its pixel data needs 107244 bytes, the file has 53622 (data.on_bad_tile=skip leaves bad tiles out; 2 other bad tile(s) found too)": three_bad_tiles,
    "is empty (0 bytes)": empty_tile,
    "is named .tif but is not a TIFF file (it starts with b'...')": html_as_tif,
    "is truncated: its pixel data needs N bytes, the file has M": truncated_tile,
    "has N bands, the dataset's tiles have M": other_band_count,
    "is HxW pixels, the dataset's tiles are hxw": other_tile_size,
    "has unsupported dtype complex64 (supported: [...])": complex_tile,
    "has dtype int8, the dataset's tiles are uint16 (...)": cli_faults.int8_tile,
    "has 60 m pixels, the dataset's tiles have 10 m (...)": cli_faults.sixty_metre_tile,
    "is a dangling symlink (to X, which does not exist)": cli_faults.dangling_symlink,
    "contains N NaN or infinite pixel values": nan_tile,
    "every pixel is nodata": all_nodata_tile,
    "has no band B8A (its bands: B01, B02, ...)": tile_without_a_band,
    "every pixel is 0 in every band and the file declares no nodata: declare its nodata (gdal_edit.py -a_nodata 0 FILE) or remove it": constant_tile,
    "every band holds one value across the tile (...) and the file declares no nodata: declare its nodata or remove it": lambda tmp, roots: constant_tile(tmp, roots, 100.0),
    "data.root X is not a directory": command_faults.data_root_is_a_file,
    "ConfigError: data.imbalance names classes the data does not have: ['Forst'] (did you mean 'Forest'?); the classes are [...]": command_faults.imbalance_misspelt_class,
    "X: no class sub-folders found (expected <class>/*.tif)": no_class_folders,
    "<folder>: class folder holds no .tif tiles": empty_class_folder,
    "X: class(es) ['River'] have no tile in the training split": class_without_training_tile,
    "X: the train split is empty": empty_train_split,
    "labels.csv: manifest not found": manifest_missing,
    "labels.csv: missing column(s) ['labels']": manifest_missing_column,
    "labels.csv: not UTF-8 text (... at byte N)": manifest_not_utf8,
    "labels.csv, line N: file X does not exist": manifest_file_missing,
    "labels.csv, line N: duplicate of line M (<file>)": manifest_duplicate,
    "<file> is the same file as <file> (classes A and B)": same_tile_in_two_classes,
    "labels.csv, line N: no 'labels' value (the row has fewer columns than the header [...])": cli_faults.manifest_row_without_label,
    "labels.csv, line N: K more value(s) than the header's columns [...] (an unquoted comma?)": manifest_extra_value,
    "labels.csv, line N: empty 'path'": manifest_empty_path,
    "labels.csv, line N: file X is a dangling symlink (to T)": manifest_dangling_symlink,
    "labels.csv, line N: unknown label(s) ['wter']; known: [...]": manifest_unknown_label,
    "labels.csv, line N: empty 'labels'": manifest_empty_labels,
    "labels.csv: task=multiclass but a row has several labels": manifest_several_labels_multiclass,
    "labels.csv, line N: ../x.tif is outside data.root R (...)": manifest_outside_root,
    "<patch>: missing band file(s) ['B8A']": bigearthnet_missing_band,
    "<patch>_labels_metadata.json: labels JSON missing": bigearthnet_labels_json_missing,
    "<patch>_labels_metadata.json: 'labels' is null": cli_faults.bigearthnet_null_labels,
    "X: the tiles have 3 bands; data.bands: band index 4 is outside 1..3": band_index_outside,
    "data.packed=...: no pack there": no_pack_there,
    "out=X: is the same file as the input scene=X: give another out=": predict_into_the_scene,
    "out=DIR: is the same folder as the input data.root=DIR": pack_into_the_data,
    "X: exists and is not an earlier output of deforest-predict: give another out=, or overwrite=true to replace it": predict_over_a_foreign_file,
    "X: is a folder: give out= a file name, e.g. X/map.tif": predict_out_is_a_folder,
    "ConfigError: invalid config: data.val_fraction=1.5 must be < 1; loss.scheme='inverse_cnt' must be one of ['none', 'static', 'inverse_count', ...] (did you mean 'inverse_count'?); trainer.max_epochs=-3 must be >= 1 (or -1: no limit)": lambda tmp, roots: ("deforest.cli.train", ["data.val_fraction=1.5", "loss.scheme=inverse_cnt", "trainer.max_epochs=-3"]),
    "ConfigError: invalid config: data.split=spatial needs data.block_size > 0 (tile CRS units, e.g. metres), not None": command_faults.spatial_split_without_block_size,
    "ConfigError: invalid config: no value for data.root: give it on the command line (data.root=...)": lambda tmp, roots: ("deforest.cli.train", ["data.root=???"]),
    "ConfigError: invalid config: <group>.<key> is not a <group> setting (...)": lambda tmp, roots: _train(_folder(tmp, roots), "+model.widht=8"),
    "TileError: <scene>: the scene (718x791) is smaller than tile_size=1000": command_faults.tile_larger_than_the_scene,
    "DatasetError: <folder>: no labels.csv and no .tif tiles": command_faults.predict_empty_tiles_folder,
    "<scene>: has 3 bands, the checkpoint was trained on 6-band tiles (using bands [...])": predict_wrong_band_count,
    "<scene>: is 20x20 pixels, smaller than one 32x32 window (the checkpoint's tile size): ...": cli_faults.predict_scene_smaller_than_a_window,
    "CheckpointError: <file>: checkpoint not found": checkpoint_not_found,
    "CheckpointError: <file>: is not a readable checkpoint: truncated or corrupt (N bytes; ...)": cli_faults.eval_truncated_checkpoint,
    "CheckpointError: <file>: holds weights only, no training state to resume from": checkpoint_weights_only,
    "CheckpointError: <file>: cannot rebuild the model from it (...)": checkpoint_of_another_network,
    "CheckpointError: <file>: refused: ...": checkpoint_of_another_program,
    "CheckpointError: <file>: refused: its calibration bias holds nan (finite numbers expected)": checkpoint_with_nan_calibration,
    "CheckpointError: <file>: refused: it holds pickled objects, not only tensors and plain data (Weights only load failed: Unsupported global: GLOBAL os.system)": pickle_calling_os_system,
    "CheckpointError: <run dir>/checkpoints: ckpt_path=auto found no readable checkpoint (...)": auto_resume_all_damaged,
    "CheckpointError: <file>.onnx: model not found": onnx_not_found,
    "cannot be opened as a raster (...)": garbage_tiff,
    "does not exist": tile_gone_after_indexing,
    "<pack>: data.sampler=balanced draws tiles one by one and a pack in object storage streams whole chunks: ...": balanced_sampler_on_a_streamed_pack,
    "ConfigError: model.fusion=siamese starts from random weights: model.weights is not supported with it (...)": siamese_with_pretrained_weights,
    "<folder>: not a long-tail benchmark folder (no benchmark.json); choose another folder": longtail_folder_of_something_else,
    "<folder>/benchmark.json: built with {...}, not {...}; choose another folder or delete it": longtail_folder_of_other_settings,
    "ConfigError: invalid config: loss.scheme=balanced weighs the positive and negative terms of BCE apart and needs a multi-label task; this data is multiclass (use loss.scheme=auto)":
        lambda tmp, roots: _train(_folder(tmp, roots), "loss.scheme=balanced"),
    "<scene>: dtype float32 with values ..., the model was trained on uint16 values ... (band ...: 2nd-98th percentiles, about ...x larger) (allow_dtype=true or allow_scale=true to predict anyway)": predict_other_scale,
    "<scene>: pixel size ... m, the model was trained on ... m tiles (allow_resolution=true to predict anyway)": predict_other_pixel_size,
    "CheckpointError: <file>.onnx: has no deforest.export metadata: not a model written by deforest-export": onnx_without_contract,
    "ConfigError: <file>.onnx: the ONNX model takes 64x64 windows, not 32x32 (tile_size= cannot change an exported model)": onnx_other_tile_size,
    "ConfigError: <file>.onnx: an ONNX model needs the onnxruntime package: pip install onnxruntime": onnx_without_onnxruntime,
    "ConfigError: change.min_area_ha > 0 needs the scipy package: pip install scipy, or change.min_area_ha=0": change_area_without_scipy,
    "<file>: is not on the grid of <first>": tile_band_files_off_grid,
    "<labels>: has no feature inside the scene <scene> (bounds ... in EPSG:...)": tile_labels_elsewhere,
    "<labels>: has no field 'klass' (label_field)": tile_labels_without_the_field,
    "ConfigError: model.fusion=siamese needs two-date samples (data=pairs): the bands [B02, B03, ...] carry no date (...)": siamese_on_single_dates,
    "X: cannot be written (Permission denied)": predict_through_a_file,
    "labels.csv, line N: ./tiles//x.tif is the same file as tiles/x.tif on line M (...)": manifest_one_tile_two_spellings,
    "pairs.csv: missing column(s) ['after']": pairs_missing_column,
    "pairs.csv, line N: after X is not on the grid of before Y (...): co-register the dates first": pairs_not_on_one_grid,
    "pairs.csv, line N: before and after are the same file (...)": pairs_same_file,
    "<pack>/tiles.npy: not a pack array (...)": pack_holding_objects,
    "<after>: has 4 bands, the before scene <before> 6: the dates need the same bands": predict_dates_of_other_bands,
    "<map>: has no CRS: change.min_area_ha needs pixel areas": change_map_without_crs,
    "X: the data is multilabel, the checkpoint multiclass": eval_other_task,
    "X: class(es) [...] are not among the checkpoint's classes": eval_unknown_classes,
    "<points>: has no field 'klass' (class_field); its fields: ...": area_field_missing,
    "<points>: N of M point(s) lie outside the map <map> (first at x=..., y=...; map bounds ... in EPSG:...): ...": area_points_outside,
    "<points>: N of M point(s) fall on nodata of the map <map> (...)": area_points_on_nodata,
    "<points>: map class 'X' covers A ha but has no sample unit: ...": area_class_without_sample,
    "<points>: N of M point(s) have no 'reference' value: label every sample point first": area_unlabelled_point,
    "<points>: 'reference' holds [...] that name no map class (map classes: [...]; ...)": area_unknown_reference,
    "<points>: needs point features (one sample unit each), found Polygon": area_polygons,
    "<map>: has no CRS: its pixel areas are unknown (...)": area_map_without_crs,
    "ConfigError: n=10 cannot give min_per_class=5 to each of 4 mapped classes": area_sample_impossible,
    "RunDirLocked: logs/train/runs/x is in use by pid 4242 on host node17 (since 2025-01-31 10:00:00; lock file logs/train/runs/x/deforest.lock): give this run another hydra.run.dir, or wait for that one to end": run_dir_locked,
}

#: a case that triggers another variant of its row than the first (the page lists them ``/``-separated)
VARIANTS: dict[str, str] = {
    # Permission denied needs a user that file modes stop (not root); the read-only mount: test_output_faults.py
    "X: cannot be written (Permission denied)": "cannot be written: Y is a file, not a folder",
}

#: documented messages checked by a test of their own, with the reason they are not run here
ELSEWHERE: dict[str, str] = {
    "RunInterrupted: stopped by SIGTERM while training at global step 37; saved <run dir>/checkpoints/last.ckpt. Resume with the same overrides plus hydra.run.dir=<run dir> ckpt_path=auto":
        "needs a SIGTERM mid-training; exit status 143 and the one line: tests/runs/test_survival.py",
    "CheckpointError: <run dir>/checkpoints: no room to save last.ckpt (No space left on device); the previous one is intact. Free space there, or write the run elsewhere (hydra.run.dir=...)":
        "needs a disk that fills during training: tests/runs/test_survival.py (tmpfs and RLIMIT_FSIZE)",
    "OutputError: <run dir>/confusion_matrix.png: cannot be written (No space left on device)":
        "needs a disk that fills after the checkpoints: tests/core/test_output_faults.py (tmpfs in a user namespace)",
    "X: cannot be written (No space left on device)":
        "needs a full disk: tests/core/test_output_faults.py (tmpfs in a user namespace)",
    "<run dir>: cannot be written (Read-only file system): give hydra.run.dir= a writable folder":
        "needs a read-only mount: tests/core/test_output_faults.py (tmpfs in a user namespace)",
    "FloatingPointError: non-finite training loss (nan) at global step 1, batch 1; files: [...]":
        "needs a diverging run: tests/core/test_run_safety.py (one process), tests/training/test_ddp_faults.py (two ranks, one line)",
    "ConfigError: model.backbone=vit_small_patch16_224 cannot take the 8x8 px tiles: the smallest it takes is 16x16 px (set model.input_resize=16, ...)":
        "needs 8 px tiles: tests/cli/test_command_faults.py::test_eight_pixel_tiles_are_refused_for_a_vit_before_training",
    "s3://.../order.npy: unreadable (...)": "needs a pack in object storage: tests/data/test_stream.py (its S3 stand-in)",
    "<pack>: data.sampler=balanced draws tiles one by one and a pack in object storage streams whole chunks: ...":
        "needs a pack in object storage: tests/data/test_stream.py::test_balanced_sampler_on_a_streamed_pack_is_refused_in_one_line",
    "<folder>/benchmark.json: built with {...}, not {...}; choose another folder or delete it":
        "tests/data/test_longtail.py::test_a_folder_built_with_other_settings_is_refused_in_one_line",
    "<folder>: not a long-tail benchmark folder (no benchmark.json); choose another folder":
        "tests/data/test_longtail.py::test_a_folder_that_is_no_benchmark_is_refused",
    "ConfigError: model.fusion=siamese needs the same bands of each date in the same order: t0 has [B04, B08], t1 [B08] (...)":
        "tests/models/test_siamese.py (the band check); its page example names bands of a Sentinel-2 pair",
}


# ---- running the cases -------------------------------------------------------------------------
# one worker process: runs each case's command through its main, as the console script does, its
# output captured at file descriptors 1 and 2; writes {case: [exit status, output]} as JSON
_WORKER = r"""
import importlib, json, os, sys, traceback
jobs_file, result_file = sys.argv[1:3]
jobs, result = json.load(open(jobs_file)), {}
class Blocked:  # an install without these packages: importing them fails as if absent
    def __init__(self, names):
        self.names = names
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
for name, module, argv, out, blocked in jobs:
    hidden = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in blocked}
    finder = Blocked(blocked)
    sys.meta_path.insert(0, finder)
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1); os.dup2(fd, 2)
    try:
        sys.argv = [module, *argv]
        importlib.import_module(module).main()
        rc = 0
    except SystemExit as err:
        rc = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        os.close(fd); os.close(saved[0]); os.close(saved[1])
        sys.meta_path.remove(finder)
        sys.modules.update(hidden)
    result[name] = [rc, open(out, errors="replace").read()]
json.dump(result, open(result_file, "w"))
"""


def _case_id(message: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", message)[:60].strip("_")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, eurosat_root, bigearthnet_root, scenes_root) -> dict[str, tuple[int, str, Path]]:
    """Every case run once: message -> (exit status, output, the case's folder)."""
    roots = {"eurosat": eurosat_root, "bigearthnet": bigearthnet_root, "scenes": scenes_root}
    base = tmp_path_factory.mktemp("documented")
    jobs, folders, unprepared = [], {}, {}
    for i, (message, case) in enumerate(CASES.items()):
        tmp = base / f"c{i:03d}"
        tmp.mkdir()
        folders[message] = tmp
        try:
            module, overrides, *blocked = case(tmp, roots)
        except Exception as err:  # that case fails, naming why; the others still run
            unprepared[message] = (-1, f"preparing the case failed: {type(err).__name__}: {err}", tmp)
            continue
        # the overrides first: deforest-area's action word (sample) comes first on its command line
        argv = [*overrides, f"hydra.run.dir={tmp / 'run'}", f"paths.cache_dir={tmp / 'cache'}"]
        jobs.append((message, module, argv, str(tmp / "output.txt"), blocked[0] if blocked else []))
    workers = []
    try:
        for w in range(2):  # two processes: the machine's two cores
            (base / f"jobs{w}.json").write_text(json.dumps(jobs[w::2]))
            workers.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(base / f"jobs{w}.json"),
                                             str(base / f"result{w}.json")], cwd=REPO,
                                            env={**os.environ, **_ENV, "PYTHONPATH": str(REPO)}))
        for worker in workers:
            assert worker.wait(timeout=900) == 0
    finally:
        for process in [*workers, *_HOLDERS]:
            process.kill()
            process.wait()
        for server in _SERVERS:
            server.stop()
        if _SERVERS:  # S3 filesystems cached for the stopped server would point at its closed port
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
    results = {}
    for w in range(2):
        results.update(json.loads((base / f"result{w}.json").read_text()))
    return {**unprepared, **{m: (rc, out, folders[m]) for m, (rc, out) in results.items()}}


def test_every_documented_error_has_a_case():
    documented = list(documented_errors(DOC.read_text()))
    assert len(documented) > 50  # the convention still finds the page's errors
    stale = [m for m in [*CASES, *ELSEWHERE] if m not in documented]
    assert not stale, f"cases for messages the page no longer documents: {stale}"
    missing = [m for m in documented if m not in CASES and m not in ELSEWHERE]
    assert not missing, f"{len(missing)} documented error(s) without a case in CASES:\n" + "\n".join(missing)


def test_placeholders_match_anything_and_the_rest_literally():
    pattern = message_pattern("labels.csv, line N: file X does not exist")
    assert pattern.search("/d/labels.csv, line 12: file Forest/gone.tif does not exist")
    assert not pattern.search("/d/labels.csv, line 12: file Forest/gone.tif is missing")
    assert message_pattern("<patch>: missing band file(s) ['B8A']").search("/b/S2A_x: missing band file(s) ['B8A']")
    assert not message_pattern("<patch>: missing band file(s) ['B8A']").search("/b/S2A_x: missing band file(s) ['B09']")
    example = message_pattern("x/River_17.tif: needs 107244 bytes, the file has 53622 (2 other bad tile(s))", example=True)
    assert example.search("/t/d/River/River_1.tif: needs 99 bytes, the file has 5 (2 other bad tile(s))")
    assert not example.search("/t/d/River/River_1.tif: needs 99 bytes, the file has 5 (other bad tile(s))")


@pytest.mark.slow
@pytest.mark.parametrize("message", list(CASES), ids=[_case_id(m) for m in CASES])
def test_documented_error_through_the_command(message, outcomes):
    rc, output, tmp = outcomes[message]
    expected = 143 if message.startswith("RunInterrupted:") else 2
    assert rc == expected, output[-3000:]
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if re.search(r"(?:^|\] - )(?:%s): " % "|".join(TYPES), line)]
    assert len(errors) == 1, output[-3000:]
    line = re.split(r"\] - ", errors[0], maxsplit=1)[-1]
    kind, text = line.split(": ", 1)
    documented = message.split(": ", 1)[1] if message.split(": ", 1)[0] in TYPES else message
    if message in VARIANTS:
        row = next(line for line in DOC.read_text().splitlines() if f"`{message}`" in line)
        assert f"`{VARIANTS[message]}`" in row.split(" | ")[0], row  # a variant of that row
        documented = VARIANTS[message]
    if message.split(": ", 1)[0] in TYPES:
        assert kind == message.split(": ", 1)[0], line
    example = documented_errors(DOC.read_text()).get(message, False)
    assert message_pattern(documented, example).search(text), f"{line!r} does not say {message!r}"
    assert not (tmp / "run" / "metrics.json").exists()
