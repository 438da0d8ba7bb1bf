"""deforest-pack on two-date samples (``data=pairs``): a pair becomes one packed tile of both
dates' bands (before, then after) with the dated band names, and training from the pack sees
what training from the files sees.

Pairs are built as in ``test_change.py`` (its builders): the real Rondonia Landsat 8 clip and a
copy with seeded clearings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hydra import compose, initialize_config_module

from deforest.cli.pack import pack
from deforest.cli.train import train
from deforest.core.errors import DatasetError
from deforest.data.pairs import PairLayout, dated_band_names
from deforest.data.stores.pack import PackedLayout
from deforest.data.stores.packing import check_pack, pack_dataset
from deforest.runs.build import build_datamodule
from tests.conftest import REPO
from tests.mapping.test_change import BANDS, write_pairs


def _pack_config(overrides: list[str]):
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose("pack", overrides=[f"paths.root_dir={REPO}", "data=pairs", *overrides])


@pytest.fixture(scope="module")
def packed_pairs(tmp_path_factory) -> dict:
    """Pairs with their tiles' band descriptions unset, packed through the real ``pack`` config."""
    tmp = tmp_path_factory.mktemp("packpairs")
    root = tmp / "pairs"
    written = write_pairs(root)
    out = tmp / "pack"
    result = pack(_pack_config([f"data.root={root}", f"out={out}", f"data.layout.band_names=[{','.join(BANDS)}]"]))
    return {"root": root, "out": out, "result": result, **written}


def test_a_pair_is_one_packed_tile_of_both_dates(packed_pairs):
    result, root = packed_pairs["result"], packed_pairs["root"]
    assert result.written and result.tiles == packed_pairs["pairs"]
    assert result.shape == (packed_pairs["pairs"], 12, 32, 32) and result.dtype == "int16"
    packed = PackedLayout(result.path)
    assert packed.band_names == dated_band_names(BANDS) and packed.band_count(6) == 12
    index = json.loads((result.path / "index.json").read_text())
    source = index["sources"][3]
    before, after = index["source_files"][3]
    assert before == str(root / "t0" / Path(before).name) and after == str(root / "t1" / Path(before).name)
    with rasterio.open(before) as b, rasterio.open(after) as a:
        stacked = np.concatenate([b.read(), a.read()])
    np.testing.assert_array_equal(packed.row(3), stacked)  # before's bands, then after's, as stored
    np.testing.assert_array_equal(packed.read(source, [4, 10]), stacked[[3, 9]].astype(np.float32))
    check_pack(PairLayout(root, band_names=BANDS), result.path)  # up to date: every file of every pair unchanged


def _datamodules(train_config, packed_pairs, extra: list[str]):
    base = ["experiment=forest_loss", f"data.root={packed_pairs['root']}",
            f"data.layout.band_names=[{','.join(BANDS)}]", "data.batch_size=16", *extra]
    files = build_datamodule(train_config(base).data)
    packed = build_datamodule(train_config([*base, f"data.packed={packed_pairs['out']}"]).data)
    files.setup("fit")
    packed.setup("fit")
    return files, packed


@pytest.mark.parametrize("bands", [None, "[B5@t0,B5@t1,B4@t1]"])
def test_pack_of_pairs_gives_the_file_loaders_statistics_and_batches(train_config, packed_pairs, bands):
    files, packed = _datamodules(train_config, packed_pairs, [] if bands is None else [f"data.bands={bands}"])
    assert isinstance(packed.layout, PackedLayout)
    assert packed.assignment == files.assignment and packed.bands == files.bands
    assert packed.input_spec.band_names == files.input_spec.band_names
    if bands is not None:
        assert files.input_spec.band_names == ["B5@t0", "B5@t1", "B4@t1"] and files.bands == [4, 10, 9]
    f_norm, p_norm = files.input_spec.normalization, packed.input_spec.normalization
    assert p_norm.mean == pytest.approx(f_norm.mean, rel=1e-9) and p_norm.std == pytest.approx(f_norm.std, rel=1e-9)
    for split in ("val", "test"):  # un-augmented: the file reader's items exactly
        a = files.datasets[split]
        batch = packed.on_after_batch_transfer(packed.on_before_batch_transfer(next(iter(packed._loader(split, shuffle=False))), 0), 0)
        rows = batch["index"].tolist()
        assert len(rows) == min(16, len(a)) and batch["image"].dtype == torch.float32
        expected = files.on_after_batch_transfer(files.on_before_batch_transfer(next(iter(files._loader(split, shuffle=False))), 0), 0)
        assert expected["index"].tolist() == rows
        assert torch.equal(batch["image"], expected["image"]) and torch.equal(batch["target"], expected["target"])


def test_train_from_the_pack_of_pairs(train_config, packed_pairs):
    metrics = train(train_config(["experiment=forest_loss", f"data.root={packed_pairs['root']}",
                                  f"data.packed={packed_pairs['out']}", f"data.layout.band_names=[{','.join(BANDS)}]",
                                  "model.input_pool=1", "trainer.max_epochs=1", "data.batch_size=32",
                                  "report.enabled=false"]))
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    from deforest.training.module import TileClassifier

    spec = TileClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu").input_spec
    assert spec.band_names == dated_band_names(BANDS) and spec.source.band_count == 12


def test_a_changed_after_tile_makes_the_pack_stale(packed_pairs, tmp_path):
    """A pack re-checks every file a sample is read from: the after tile of a pair too."""
    root, out = tmp_path / "pairs", tmp_path / "pack"
    shutil.copytree(packed_pairs["root"], root)
    pack_dataset(PairLayout(root, band_names=BANDS), out)
    after = root / "t1" / sorted(os.listdir(root / "t1"))[0]
    stat = after.stat()
    with rasterio.open(after, "r+") as dst:
        dst.write(dst.read() + 1)
    os.utime(after, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DatasetError, match=rf"data.packed={out} is stale: .*\|t1/{after.name} is modified since packing"):
        PackedLayout(out)
    run = subprocess.run(
        [sys.executable, "-m", "deforest.cli.pack", "data=pairs", f"data.root={root}", f"out={out}", "check=true",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"DatasetError: data.packed={out} is stale" in errors[0], output
