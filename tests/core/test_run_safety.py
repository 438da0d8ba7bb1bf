"""Runs that cannot work stop early and clearly; runs that diverge never keep training on NaN."""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from deforest.cli.train import train
from deforest.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.batch_size=0"], r"data\.batch_size=0 must be >= 1"),
        (["model.optimizer.lr=-0.001"], r"model\.optimizer\.lr=-0\.001 must be > 0"),
        (["data.batch_size=0", "model.optimizer.lr=0"], r"data\.batch_size=0 must be >= 1; model\.optimizer\.lr=0 must be > 0"),
        (["data=bigearthnet", "data.root=.", "data.layout.size=0"], r"data\.layout\.size=0 must be >= 1"),
        (["model.input_pool=0"], r"model\.input_pool=0 must be >= 1"),
    ],
    ids=["batch-size-0", "negative-lr", "both-listed", "tile-size-0", "input-pool-0"],
)
def test_out_of_range_config_fails_before_reading_data(train_config, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(train_config(overrides))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "checkpoints").exists()


def test_cli_reports_user_errors_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "deforest.cli.train", f"hydra.run.dir={tmp_path}", "model.optimizer.lr=-1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "ConfigError: invalid config: model.optimizer.lr=-1 must be > 0" in output
    assert "Traceback" not in output


def _diverging(train_config, policy: str):
    """Plain SGD at lr=1e30: the first step blows the weights up, the second loss is NaN."""
    return train_config([
        "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1e30", "model.scheduler=null",
        f"model.nonfinite_loss={policy}", "test=false", "logger=csv",
    ])


def test_nonfinite_loss_stops_naming_step_and_files(train_config):
    cfg = _diverging(train_config, "error")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at global step 1, batch 1; files: ") as caught:
        train(cfg)
    files = ast.literal_eval(str(caught.value).split("files: ", 1)[1])
    assert len(files) == cfg.data.batch_size == 16 and all(Path(f).is_file() and "/train/" in f for f in files)


class NaNPixel(pl.Callback):
    """Puts one NaN pixel into training batch ``batch_idx``: a real NaN batch for the module."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            batch["image"][0, 0, 0, 0] = float("nan")


def test_nonfinite_loss_skip_skips_only_that_batch(train_config, tmp_path):
    cfg = train_config([
        "model.nonfinite_loss=skip", "test=false", "logger=csv", "+trainer.limit_train_batches=4",
        "+callbacks.nan_pixel._target_=tests.core.test_run_safety.NaNPixel", "+callbacks.nan_pixel.batch_idx=2",
    ])
    metrics = train(cfg)
    logged = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert logged["train/skipped_batches"].dropna().tolist() == [1.0]
    assert logged["train/loss_epoch"].dropna().apply(math.isfinite).tolist() == [True]  # the 3 other batches trained
    assert math.isfinite(metrics["val/loss"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_skipped_bad_tiles_are_reported_in_the_run_summary(train_config, eurosat_root, tmp_path):
    root = tmp_path / "data"
    for cls in ("Forest", "River", "SeaLake"):
        shutil.copytree(eurosat_root / "train" / cls, root / cls)
    empty = root / "SeaLake" / "SeaLake_empty.tif"
    empty.write_bytes(b"")
    cfg = train_config([f"data.root={root}", "data.on_bad_tile=skip", "trainer.fast_dev_run=true"])
    train(cfg)
    assert "- bad tiles skipped: 1 (listed in `bad_tiles.json`)" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "bad_tiles.json").read_text()) == {str(empty): f"{empty}: is empty (0 bytes)"}


@pytest.mark.parametrize(
    "app,overrides,message",
    [
        ("tile", ["tile_size=0"], r"tile_size=0 must be >= 1"),
        ("predict", ["ckpt_path=missing.ckpt", "batch_size=0", "stride=-4"], r"stride=-4 must be >= 1; batch_size=0 must be >= 1"),
    ],
)
def test_tile_and_predict_check_ranges_first(tmp_path, app, overrides, message):
    from hydra import compose, initialize_config_module

    from deforest.cli.predict import predict
    from deforest.cli.tile import tile

    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose(app, overrides=[f"out={tmp_path / 'out'}", "scene=missing.tif", *overrides])
    with pytest.raises(ConfigError, match=message):
        (tile if app == "tile" else predict)(cfg)
    assert not (tmp_path / "out").exists()
