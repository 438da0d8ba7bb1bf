"""deforest-train composed from the real Hydra config, on the real data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deforest.cli.train import train
from deforest.core.contract import InputSpec
from deforest.runs.build import build_datamodule, network_band_positions
from deforest.training.module import TileClassifier


def test_fast_dev_run_multiclass(train_config, tmp_path):
    cfg = train_config(["trainer.fast_dev_run=true"])
    metrics = train(cfg)
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(f"test/recall/{c}" for c in ("Forest", "River", "SeaLake")) <= set(written)
    summary = (tmp_path / "summary.md").read_text()
    assert re.search(r"- splits: train 196, val 20, test 54 \(random, digest [0-9a-f]{16}, 0 dropped at block edges\)", summary)
    assert f"| test/accuracy | {metrics['test/accuracy']:.4f} |" in summary
    assert "loss inverse_count (loss.scheme=auto, mean), training draw shuffle (data.sampler=auto)" in summary
    assert (tmp_path / "class_distribution.png").stat().st_size > 1000


def test_fast_dev_run_multilabel_bigearthnet(train_config, bigearthnet_root, tmp_path):
    cfg = train_config(["data=bigearthnet", f"data.root={bigearthnet_root}", "trainer.fast_dev_run=true"])
    metrics = train(cfg)
    for key in ("test/f1_micro", "test/f1_macro", "test/map"):
        assert 0.0 <= metrics[key] <= 1.0
    assert any(k.startswith("test/recall/") for k in metrics)
    # what auto resolved to for multi-label data: the tolerant loss and the balanced draw
    assert "loss tolerant (loss.scheme=auto, mean), training draw balanced (data.sampler=auto)" in (
        tmp_path / "summary.md").read_text()


@pytest.mark.slow  # 8 epochs; test_report's runs cover checkpoints in the default set
def test_short_training_learns_and_checkpoint_carries_preprocessing(train_config, tmp_path):
    cfg = train_config(["trainer.max_epochs=8", "model.width=16", "logger=csv"])
    metrics = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    assert written["test/accuracy"] >= 0.4, written  # chance is 0.1 on 10 balanced classes
    assert len([k for k in written if k.startswith("test/recall/")]) == 10
    ckpt = Path(written["best_checkpoint"])
    assert ckpt.parent == tmp_path / "checkpoints" and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.class_names[1] == "Forest" and model.input_spec.bands == list(range(1, 14))
    assert model.normalizer.mean.shape == (1, 13, 1, 1)
    # the contract is plain data at the checkpoint's top level, loadable without pickled code
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["input_spec"]
    assert InputSpec.from_dict(stored) == model.input_spec
    assert stored["band_names"][:3] == ["B01", "B02", "B03"] and stored["split"]["kind"] == "random"
    assert sorted(len(v) for v in stored["split"]["lists"].values()) == [20, 54, 196]
    assert (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.slow  # a training subprocess; test_entry_points runs one in the default set
def test_console_script_runs_hydra_app(tmp_path):
    """The installed entry point resolves the packaged config and honours hydra.run.dir."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "deforest.cli.train", f"hydra.run.dir={run_dir}",
        "trainer.fast_dev_run=true", "model.width=8", "model.tta=false", f"paths.cache_dir={tmp_path / 'c'}",
    ]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test/accuracy" in json.loads((run_dir / "metrics.json").read_text())


def test_unknown_config_key_is_rejected(train_config):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="learnig_rate"):
        train_config(["model.learnig_rate=0.1"])


def test_band_statistics_head_trains_beside_the_cnn(train_config, tmp_path):
    """The default small CNN carries the statistics head: predictions average both heads' logits."""
    cfg = train_config(["trainer.max_epochs=2"])
    assert cfg.model.band_statistics is True
    metrics = train(cfg)
    model = TileClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu").eval()
    assert any(k.startswith("band_statistics.linear") for k in model.state_dict())
    assert model.band_statistics.linear.weight.abs().sum() > 0  # moved from its zero start
    tiles = torch.rand(3, 13, 64, 64) * 3000
    with torch.no_grad():
        cnn, stats = model.head_logits(tiles)
        torch.testing.assert_close(model(tiles), (cnn + stats) / 2)
        # the CNN does not see the atmospheric bands B01, B09, B10; the statistics head does
        assert model.input_spec.network.bands == [1, 2, 3, 4, 5, 6, 7, 10, 11, 12]
        hazy = tiles.clone()
        hazy[:, [0, 8, 9]] *= 3
        cnn_hazy, stats_hazy = model.head_logits(hazy)
        torch.testing.assert_close(cnn_hazy, cnn)
        assert not torch.allclose(stats_hazy, stats)
        cnn_red, _ = model.head_logits(tiles * torch.tensor([1.0] * 3 + [3.0] + [1.0] * 9).view(1, 13, 1, 1))
        assert not torch.allclose(cnn_red, cnn)  # B04 (red) does reach it


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], [1, 2, 3, 4, 5, 6, 7, 10, 11, 12]),  # EuroSAT: B01 B02 ... B10 B11 B12 B8A
        (["data.bands=[B04,B10,B08]"], [0, 2]),
        (["data.bands=[B04,B03,B02]"], None),  # nothing to exclude: every band
        (["data.layout.band_names=null"], None),  # no names: the list cannot apply
        (["data=bigearthnet"], "bigearthnet"),
    ],
)
def test_network_band_exclusion_follows_band_names(train_config, bigearthnet_root, overrides, expected):
    if expected == "bigearthnet":  # 12 bands, no B10: only B01 and B09 go
        overrides = overrides + [f"data.root={bigearthnet_root}"]
    cfg = train_config(overrides)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    positions = network_band_positions(list(cfg.model.network_exclude_bands), datamodule.loaded_band_names)
    if expected == "bigearthnet":
        names = datamodule.loaded_band_names
        assert len(names) == 12 and [names[i] for i in positions] == [n for n in names if n not in ("B01", "B09")]
    else:
        assert positions == expected


def test_network_band_exclusion_must_leave_a_band(train_config):
    cfg = train_config(["data.bands=[B01,B09]"])
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    with pytest.raises(ValueError, match=r"leaves the network none of the bands \['B01', 'B09'\]"):
        network_band_positions(["B01", "B09", "B10"], datamodule.loaded_band_names)
