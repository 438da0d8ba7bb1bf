"""deforest-pack and data.packed on the real data: same items, splits and labels as the files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hydra import compose, initialize_config_module

from deforest.cli.pack import pack
from deforest.cli.train import train
from deforest.core.errors import DatasetError, TileError
from deforest.data.bigearthnet import BigEarthNetLayout
from deforest.data.layouts import FolderLayout
from deforest.data.stores.pack import PackedLayout
from deforest.data.stores.packing import check_pack, pack_dataset
from deforest.data.transforms import d4_views, random_d4
from deforest.runs.build import build_datamodule

REPO = Path(__file__).resolve().parents[2]


def _pack_config(overrides: list[str]):
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose("pack", overrides=[f"paths.root_dir={REPO}", *overrides])


@pytest.fixture(scope="module")
def sample_pack(tmp_path_factory) -> Path:
    """The shipped EuroSAT sample packed through the real ``pack`` config."""
    out = tmp_path_factory.mktemp("pack") / "eurosat"
    result = pack(_pack_config([f"out={out}"]))
    assert result.written and result.tiles == 270 and result.dtype == "uint16"
    assert result.shape == (270, 13, 64, 64)
    return out


def _datamodules(train_config, pack_dir: Path, extra: list[str] | None = None):
    extra = list(extra or [])
    files = build_datamodule(train_config(extra).data)
    packed = build_datamodule(train_config([*extra, f"data.packed={pack_dir}"]).data)
    files.setup("fit")
    packed.setup("fit")
    return files, packed


@pytest.mark.parametrize("bands", [None, "[B04,B03,B02]"])
def test_packed_items_equal_file_items(train_config, sample_pack, bands):
    extra = [] if bands is None else [f"data.bands={bands}"]
    files, packed = _datamodules(train_config, sample_pack, extra)
    assert isinstance(packed.layout, PackedLayout)
    assert packed.assignment == files.assignment and packed.bands == files.bands
    assert packed.input_spec.normalization.mean == pytest.approx(files.input_spec.normalization.mean) and packed.input_spec.normalization.std == pytest.approx(files.input_spec.normalization.std)
    for split in ("train", "val", "test"):
        a, b = files.datasets[split], packed.datasets[split]
        assert a.sources == b.sources and np.array_equal(a.targets, b.targets) and len(a) > 0
        for i in range(0, len(a), 7):  # per-tile reads (reports, statistics)
            assert np.array_equal(a.read(i), b.read(i)), (split, i, a.sources[i])
        batch = next(iter(packed._loader(split, shuffle=False)))  # one gather, stored dtype
        assert batch["image"].dtype == torch.uint16 and batch["image"].shape[1:] == (len(files.bands), 64, 64)
        batch = packed.on_after_batch_transfer(packed.on_before_batch_transfer(batch, 0), 0)
        rows = batch["index"].tolist()
        assert rows == list(range(len(rows))) and batch["image"].dtype == torch.float32
        assert batch["target"].tolist() == [int(a.targets[i]) for i in rows]
        if split != "train":  # un-augmented: the file reader's items exactly
            expected = torch.stack([a[i]["image"] for i in rows])
            assert torch.equal(batch["image"], expected), split
        else:  # D4 on the device (what the hook does in training): one of the eight views of the file tile
            flipped = random_d4(batch["image"])
            for i in rows:
                views = [v[0] for v in d4_views(torch.from_numpy(a.read(i))[None])]
                assert any(torch.equal(flipped[i], v) for v in views), i
    assert packed.datasets["train"].augment is None and packed.device_flips  # D4 moved to the device
    with rasterio.open(files.datasets["test"].sources[0]) as src:  # and the raw values, not a rescale
        assert np.array_equal(packed.datasets["test"].read(0), src.read(files.bands).astype(np.float32))


def test_device_d4_is_random_per_tile(train_config, sample_pack):
    _, packed = _datamodules(train_config, sample_pack)
    train = packed.datasets["train"]
    raw = torch.from_numpy(train.read(0))[None]
    views = {v.numpy().tobytes() for v in d4_views(raw)}
    seen = {random_d4(raw.expand(64, -1, -1, -1))[k].numpy().tobytes() for k in range(64)}
    assert len(seen) >= 6 and seen <= views


def _nodata_tiles(root: Path) -> None:
    """Seeded uint16 tiles with nodata=0 and a zeroed corner; one tile entirely nodata."""
    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(12):
            data = rng.integers(1, 3000, (4, 16, 16), dtype=np.uint16)
            data[:, :5, :5] = 0
            if cls == "b" and k == 11:
                data[:] = 0
            with rasterio.open(root / cls / f"{cls}_{k}.tif", "w", driver="GTiff", width=16, height=16, count=4,
                               dtype="uint16", nodata=0) as dst:
                dst.write(data)


def test_nodata_fill_on_device_equals_file_reader(train_config, tmp_path):
    root = tmp_path / "nodata"
    _nodata_tiles(root)
    pack_dataset(FolderLayout(root), tmp_path / "pack")
    extra = [f"data.root={root}", "data.val_fraction=0.25", "data.test_fraction=0.25", "data.on_bad_tile=skip",
             "data.validate=full"]  # the file reader finds all-nodata tiles up front only then; the pack always
    files, packed = _datamodules(train_config, tmp_path / "pack", extra)
    packed_norm, files_norm = packed.input_spec.normalization, files.input_spec.normalization
    assert packed_norm.mean == pytest.approx(files_norm.mean) and packed_norm.std == pytest.approx(files_norm.std)
    assert set(packed.bad_tiles.problems) == set(files.bad_tiles.problems) == {str(root / "b" / "b_11.tif")}
    for split in ("val", "test"):
        batch = packed.on_after_batch_transfer(next(iter(packed._loader(split, shuffle=False))), 0)
        expected = torch.stack([files.datasets[split][i]["image"] for i in batch["index"].tolist()])
        assert torch.equal(batch["image"], expected) and (expected[:, :, 0, 0] != 0).all()  # filled, not 0


def test_training_needs_only_the_pack(train_config, eurosat_root, tmp_path):
    root = tmp_path / "eurosat"
    shutil.copytree(eurosat_root, root)
    out = tmp_path / "pack"
    cmd = [sys.executable, "-m", "deforest.cli.pack", f"data.root={root}", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(root)  # the sources are gone
    metrics = train(train_config([f"data.root={root}", f"data.packed={out}", "trainer.max_epochs=1"]))
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and (tmp_path / "report.md").is_file()
    index = json.loads((out / "index.json").read_text())  # a plain JSON document
    assert index["band_names"][:3] == ["B01", "B02", "B03"] and index["task"] == "multiclass"
    assert len(index["sources"]) == len(index["splits"]) == 270 and index["header"]["dtype"] == "uint16"


def test_rerun_keeps_fresh_pack_and_rebuilds_changed(eurosat_root, tmp_path):
    root = tmp_path / "data"
    for cls in ("Forest", "River", "SeaLake"):
        shutil.copytree(eurosat_root / "train" / cls, root / cls)
    out = tmp_path / "pack"
    first = pack_dataset(FolderLayout(root), out)
    stamp = (out / "tiles.npy").stat().st_mtime_ns
    assert first.written and first.tiles == 68
    again = pack_dataset(FolderLayout(root), out)
    assert not again.written and (out / "tiles.npy").stat().st_mtime_ns == stamp
    check_pack(FolderLayout(root), out)  # check=true on an unchanged dataset

    victim = sorted((root / "River").glob("*.tif"))[0]
    shutil.copy(sorted((root / "Forest").glob("*.tif"))[0], victim)  # same name, other pixels
    with pytest.raises(DatasetError, match=f"stale: {victim} is modified since packing; rerun deforest-pack"):
        PackedLayout(out)  # sources present and few: checked at each start
    with pytest.raises(DatasetError, match="stale"):
        check_pack(FolderLayout(root), out)
    assert pack_dataset(FolderLayout(root), out).written
    index = PackedLayout(out).build_index()
    row = index.sources.index(str(victim))
    assert np.array_equal(PackedLayout(out).read(str(victim), None), FolderLayout(root).read(str(victim), None))
    assert index.class_names[index.targets[row]] == "River"

    (root / "SeaLake" / "extra.tif").write_bytes(victim.read_bytes())
    with pytest.raises(DatasetError, match="1 new, e.g. .*extra.tif"):
        check_pack(FolderLayout(root), out)
    cfg = _pack_config([f"data.root={root}", f"out={out}", "check=true"])
    with pytest.raises(DatasetError, match="1 new"):
        pack(cfg)


def _pack_cmd(root: Path, out: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "deforest.cli.pack", f"data.root={root}", f"out={out}", "num_workers=2",
            "shard_tiles=16", f"hydra.run.dir={run}"]


@pytest.mark.slow
def test_killed_pack_resumes_to_identical_bytes(eurosat_root, tmp_path):
    root = tmp_path / "data"
    for copy in range(2):  # 540 tiles, 34 shards
        for tif in eurosat_root.glob("*/*/*.tif"):
            target = root / tif.parent.name / f"{tif.stem}_{copy}.tif"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tif, target)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.Popen(_pack_cmd(root, killed, tmp_path / "r1"), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list((killed / ".progress").glob("*.done"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the packer and its workers
    proc.wait()
    finished = len(list((killed / ".progress").glob("*.done")))
    assert 4 <= finished < 34 and not (killed / "index.json").exists(), finished
    resumed = subprocess.run(_pack_cmd(root, killed, tmp_path / "r2"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    done_after = int(log.split("resumed after ")[1].split()[0])
    assert done_after >= finished
    first_count = int(log.split("packed ")[1].split("/")[0])  # the first shard written on resume
    assert first_count >= 16 * (done_after + 1) or first_count == 540
    again = subprocess.run(_pack_cmd(root, whole, tmp_path / "r3"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("tiles.npy", "stats.npy", "targets.npy", "index.json"):  # byte-identical
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (killed / ".progress").exists()


def test_bad_tile_fails_packing_naming_file(eurosat_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(eurosat_root / "train" / "Forest", root / "Forest")
    shutil.copytree(eurosat_root / "train" / "River", root / "River")
    for tile in root.rglob("*.tif"):  # a float32 dataset: a float tile among uint16 ones fails on its dtype
        with rasterio.open(tile) as src:
            profile, pixels = src.profile, src.read()
        with rasterio.open(tile, "w", **{**profile, "dtype": "float32"}) as dst:
            dst.write(pixels.astype(np.float32))
    bad = root / "River" / "River_nan.tif"
    data = np.random.default_rng(0).random((13, 64, 64), dtype=np.float32)
    data[3, 10, 10] = np.nan
    with rasterio.open(bad, "w", driver="GTiff", width=64, height=64, count=13, dtype="float32") as dst:
        dst.write(data)
    with pytest.raises(TileError, match=r"River_nan\.tif: contains NaN"):
        pack_dataset(FolderLayout(root), tmp_path / "pack")
    # nothing half-written left behind (the packers' lock file is all there is)
    assert [p.name for p in (tmp_path / "pack").iterdir()] == [".pack.lock"]
    with pytest.raises(DatasetError, match="no pack there"):
        PackedLayout(tmp_path / "pack")


def test_bigearthnet_pack_is_multilabel_and_resampled(bigearthnet_root, tmp_path, train_config):
    layout = BigEarthNetLayout(bigearthnet_root, size=60)
    result = pack_dataset(layout, tmp_path / "ben")
    assert result.shape == (44, 12, 60, 60) and result.dtype == "uint16"
    packed = PackedLayout(tmp_path / "ben")
    index = packed.build_index()
    assert index.task == "multilabel" and index.targets.shape[0] == 44 and index.targets.sum() > 44
    for source in index.sources[::11]:
        assert np.array_equal(packed.read(source, [2, 3, 4]), layout.read(source, [2, 3, 4]))
    with pytest.raises(DatasetError, match="stale"):  # another grid size is another dataset
        check_pack(BigEarthNetLayout(bigearthnet_root, size=120), tmp_path / "ben")
    dm = build_datamodule(train_config(["data=bigearthnet", f"data.packed={tmp_path / 'ben'}"]).data)  # no data.root
    dm.setup("fit")
    assert dm.task == "multilabel" and dm.tile_size == (60, 60) and dm.loaded_band_names[1] == "B02"


def test_spawned_workers_do_not_copy_the_pack(sample_pack, eurosat_root):
    layout = PackedLayout(sample_pack)
    expected = layout.read(layout.record["sources"][5], None)
    clone = pickle.loads(pickle.dumps(layout))
    assert len(pickle.dumps(layout)) < (sample_pack / "tiles.npy").stat().st_size / 10
    assert np.array_equal(clone.read(layout.record["sources"][5], None), expected)


def test_console_script_then_train_from_pack(train_config, tmp_path):
    out = tmp_path / "pack"
    cmd = [sys.executable, "-m", "deforest.cli.pack", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stderr + done.stdout and (out / "tiles.npy").is_file()
    metrics = train(train_config([f"data.packed={out}", "trainer.fast_dev_run=true"]))
    assert 0.0 <= metrics["test/accuracy"] <= 1.0

