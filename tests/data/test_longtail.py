"""The long-tailed multi-label benchmark cut from the real EuroSAT sample: geometric label
frequencies, train/val and test mosaics from disjoint source tiles, real pixels at their
source's georeference, deterministic per seed, read by data=manifest."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from affine import Affine

from deforest.data.longtail import build_longtail, ensure_longtail
from deforest.runs.build import build_datamodule
from tests.conftest import REPO

SIZES = {"train": 500, "val": 100, "test": 300}


@pytest.fixture(scope="module")
def benchmark(eurosat_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("longtail") / "b"
    return out, build_longtail(eurosat_root, out, seed=0, sizes=SIZES)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_labels_are_long_tailed(benchmark):
    out, record = benchmark
    rows = _rows(out / "labels.csv")
    assert [r["split"] for r in rows].count("test") == 300 and len(rows) == 900
    labels = [set(r["labels"].split()) for r in rows]
    freq = [np.mean([name in row for row in labels]) for name in record["tail_order"]]
    assert freq == pytest.approx([record["label_frequency"][c] for c in record["tail_order"]])
    # the commonest label in most mosaics, the rarest in 2-5% of them, decaying in between
    assert freq[0] > 0.75 and 0.015 < freq[-1] < 0.05, freq
    assert all(later < earlier * 1.15 for earlier, later in zip(freq, freq[1:])), freq
    assert freq[len(freq) // 2] < freq[0] / 2 and np.mean([len(x) for x in labels]) > 2


def test_train_val_and_test_mosaics_come_from_disjoint_real_tiles(benchmark, eurosat_root):
    out, _ = benchmark
    quadrants = _rows(out / "sources.csv")
    sources = {split: {q["source"] for q in quadrants if q["path"].startswith(split + "/")} for split in SIZES}
    assert sources["test"] and not (sources["test"] & (sources["train"] | sources["val"]))
    # val is disjoint from train too: thresholds and the probability correction fitted on val
    # must see pixels the network never trained on, as test does
    assert sources["val"] and not (sources["val"] & sources["train"]), sorted(sources["val"] & sources["train"])[:5]
    assert all(s.startswith("test/") for s in sources["test"]) and all(s.startswith("train/") for s in sources["train"])
    labels = {r["path"]: set(r["labels"].split()) for r in _rows(out / "labels.csv")}
    for q in quadrants[:40] + quadrants[-40:]:  # real pixels, at their source's place on the ground
        k, col, row = int(q["quadrant"]), int(q["col_off"]), int(q["row_off"])
        with rasterio.open(out / q["path"]) as mosaic, rasterio.open(eurosat_root / q["source"]) as src:
            r, c = divmod(k, 2)
            got = mosaic.read()[:, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
            np.testing.assert_array_equal(got, src.read(window=rasterio.windows.Window(col, row, 16, 16)))
            assert mosaic.dtypes[0] == "uint16" and mosaic.count == 13
            if k == 0:  # the mosaic lies where its top-left quadrant's source lies
                assert mosaic.crs == src.crs and mosaic.transform == src.transform @ Affine.translation(col, row)
        assert q["source"].split("/")[1] in labels[q["path"]]


def test_same_seed_same_benchmark_and_the_manifest_reads_it(benchmark, eurosat_root, tmp_path, train_config):
    out, record = benchmark
    small = {"train": 20, "val": 5, "test": 5}
    again = [build_longtail(eurosat_root, tmp_path / name, seed=0, sizes=small) for name in ("a", "b")]
    assert (tmp_path / "a" / "labels.csv").read_text() == (tmp_path / "b" / "labels.csv").read_text()
    assert (tmp_path / "a" / "train" / "train_00003.tif").read_bytes() == (tmp_path / "b" / "train" / "train_00003.tif").read_bytes()
    other = build_longtail(eurosat_root, tmp_path / "c", seed=1, sizes=small)
    assert (tmp_path / "c" / "labels.csv").read_text() != (tmp_path / "a" / "labels.csv").read_text()
    assert again[0]["tail_order"] != other["tail_order"]
    assert ensure_longtail(eurosat_root, tmp_path / "a", seed=0, sizes=small) == again[0]  # reused, not rebuilt

    dm = build_datamodule(train_config(["data=manifest", f"data.root={out}"]).data)
    dm.setup("fit")
    assert dm.task == "multilabel" and sorted(dm.class_names) == sorted(record["tail_order"])
    assert {s: len(d) for s, d in dm.datasets.items()} == SIZES and dm.tile_size == (32, 32)


def test_a_folder_built_with_other_settings_is_refused_in_one_line(eurosat_root, tmp_path):
    build_longtail(eurosat_root, tmp_path / "a", seed=0, sizes={"train": 8, "val": 2, "test": 2})
    done = subprocess.run([sys.executable, "-m", "deforest.data.longtail", str(tmp_path / "a"), "--seed", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'a' / 'benchmark.json'}: built with {{'version': 2, 'seed': 0, 'sizes': {{'train': 8, 'val': 2, 'test': 2}}, "
        f"'size': 32, 'decay': 0.65}}, not {{'version': 2, 'seed': 1, 'sizes': {{'train': 1500, 'val': 300, 'test': 600}}, 'size': 32, "
        f"'decay': 0.65}}; choose another folder or delete it"]


def test_a_folder_that_is_no_benchmark_is_refused(eurosat_root, tmp_path):
    # the experiment pointed at a folder of other data: one line, exit status 2, nothing written there
    done = subprocess.run([sys.executable, "-m", "deforest.cli.train", "experiment=imbalance_multilabel",
                           f"data.root={eurosat_root}", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"DatasetError: {eurosat_root}: not a long-tail benchmark folder (no benchmark.json); choose another folder")
    assert not (eurosat_root / "benchmark.json").exists()
