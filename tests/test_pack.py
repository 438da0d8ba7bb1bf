"""deforest-pack and data.packed on the real data: same items, splits and labels as the files."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hydra import compose, initialize_config_module

from deforest.cli.pack import pack
from deforest.cli.train import build_datamodule, train
from deforest.datasets import BigEarthNetLayout, DatasetError, FolderLayout
from deforest.io import TileError
from deforest.pack import PackedLayout, pack_dataset

REPO = Path(__file__).resolve().parents[1]


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
    assert packed.band_mean == pytest.approx(files.band_mean) and packed.band_std == pytest.approx(files.band_std)
    for split in ("train", "val", "test"):
        a, b = files.datasets[split], packed.datasets[split]
        assert a.sources == b.sources and np.array_equal(a.targets, b.targets) and len(a) > 0
        if split == "train":  # same augmentation: seed both pipelines alike
            a.augment.set_random_seed(7)
            b.augment.set_random_seed(7)
        for i in range(0, len(a), 7):
            x, y = a[i], b[i]
            assert y["image"].dtype == x["image"].dtype and y["image"].shape == (len(files.bands), 64, 64)
            assert np.array_equal(x["image"].numpy(), y["image"].numpy()), (split, i, a.sources[i])
            assert int(x["target"]) == int(y["target"]) and x["index"] == y["index"]
    with rasterio.open(files.datasets["test"].sources[0]) as src:  # and the raw values, not a rescale
        assert np.array_equal(packed.datasets["test"].read(0), src.read(files.bands).astype(np.float32))


def test_augmentation_is_random_per_item(train_config, sample_pack):
    _, packed = _datamodules(train_config, sample_pack)
    train = packed.datasets["train"]
    train.augment.set_random_seed(0)
    raw = train.read(0)
    d4 = [np.rot90(raw, k, axes=(1, 2)) for k in range(4)]
    d4 = {v.tobytes() for v in d4 + [v[:, :, ::-1] for v in d4]}
    views = {train[0]["image"].numpy().tobytes() for _ in range(64)}
    assert len(views) >= 4 and views <= d4  # random flips/rotations of the packed tile


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

    victim = sorted((root / "River").glob("*.tif"))[0]
    shutil.copy(sorted((root / "Forest").glob("*.tif"))[0], victim)  # same name, other pixels
    packed = PackedLayout(out, FolderLayout(root))
    with pytest.raises(DatasetError, match="stale.*rerun deforest-pack"):
        packed.build_index()
    assert pack_dataset(FolderLayout(root), out).written
    index = PackedLayout(out, FolderLayout(root)).build_index()
    row = index.sources.index(str(victim))
    assert np.array_equal(PackedLayout(out, FolderLayout(root)).read(str(victim), None), FolderLayout(root).read(str(victim), None))
    assert index.class_names[index.targets[row]] == "River"

    (root / "SeaLake" / "extra.tif").write_bytes(victim.read_bytes())
    with pytest.raises(DatasetError, match="1 new, e.g. .*extra.tif"):
        PackedLayout(out, FolderLayout(root)).build_index()


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
        PackedLayout(tmp_path / "pack", FolderLayout(root))


def test_bigearthnet_pack_is_multilabel_and_resampled(bigearthnet_root, tmp_path):
    layout = BigEarthNetLayout(bigearthnet_root, size=60)
    result = pack_dataset(layout, tmp_path / "ben")
    assert result.shape == (44, 12, 60, 60) and result.dtype == "uint16"
    packed = PackedLayout(tmp_path / "ben", BigEarthNetLayout(bigearthnet_root, size=60))
    index = packed.build_index()
    assert index.task == "multilabel" and index.targets.shape[0] == 44 and index.targets.sum() > 44
    for source in index.sources[::11]:
        assert np.array_equal(packed.read(source, [2, 3, 4]), layout.read(source, [2, 3, 4]))
    with pytest.raises(DatasetError, match="stale"):  # another grid size is another dataset
        PackedLayout(tmp_path / "ben", BigEarthNetLayout(bigearthnet_root, size=120)).build_index()


def test_spawned_workers_do_not_copy_the_pack(sample_pack, eurosat_root):
    layout = PackedLayout(sample_pack, FolderLayout(eurosat_root))
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
    metrics = train(train_config([f"data.packed={out}", "+trainer.fast_dev_run=true"]))
    assert 0.0 <= metrics["test/accuracy"] <= 1.0

