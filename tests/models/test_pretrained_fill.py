"""A model on pretrained weights' normalisation: training fills nodata with that contract's
fill, the one its checkpoint gives deforest-eval and prediction, so both score the same inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hydra import compose, initialize_config_module

from deforest.cli.eval import evaluate
from deforest.cli.train import train
from deforest.runs.build import build_datamodule, build_model
from tests.models.test_weights import FIT, SSL4EO_BANDS, _timm_resnet

REPO = Path(__file__).resolve().parents[2]
HOLE = 12  # the top-left HOLE x HOLE pixels of every tile are nodata


@pytest.fixture
def eurosat_with_nodata(eurosat_root, tmp_path) -> Path:
    """The real EuroSAT sample, every tile declaring nodata 0 and holding it in a corner."""
    root = tmp_path / "eurosat"
    shutil.copytree(eurosat_root, root)
    for path in root.rglob("*.tif"):
        with rasterio.open(path, "r+") as dst:
            data = dst.read()
            assert (data != 0).all()  # the corner is the only nodata
            data[:, :HOLE, :HOLE] = 0
            dst.nodata = 0
            dst.write(data)
    return root


def _config(train_config, root: Path, weights: Path) -> list[str]:
    return train_config([
        "model=resnet18", f"model.weights={weights}", f"model.weights_bands=[{','.join(SSL4EO_BANDS)}]",
        "model.weights_normalization={mean: 0, std: 10000}", f"data.root={root}", *FIT,
    ])


def test_training_batches_get_the_pretrained_contracts_fill(train_config, eurosat_with_nodata, tmp_path):
    torch.save(_timm_resnet("resnet18", 13), tmp_path / "s2.pth")
    cfg = _config(train_config, eurosat_with_nodata, tmp_path / "s2.pth")
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    statistics_fill = datamodule.input_spec.fill
    model = build_model(cfg.model, cfg.loss, datamodule)
    assert model.spec.normalization.transform == "scale" and model.spec.fill == [0.0] * 13  # 0 normalises to 0
    assert min(statistics_fill) > 10  # the statistics' fill (expm1 of the log means) is another one
    assert datamodule.input_spec == model.spec
    for split in ("train", "val", "test"):
        tile = datamodule.datasets[split][0]["image"]
        assert torch.equal(tile[:, :HOLE, :HOLE], torch.zeros(13, HOLE, HOLE)), split
        raw = next(iter(datamodule._loader(split, shuffle=False)))
        batch = datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(raw, 0), 0)
        assert (batch["image"][:, :, :HOLE, :HOLE] == 0).all() and (batch["image"][:, :, HOLE:, HOLE:] > 0).all()


def test_eval_of_a_pretrained_normalised_checkpoint_equals_the_fits_test_metrics(train_config, eurosat_with_nodata, tmp_path):
    torch.save(_timm_resnet("resnet18", 13), tmp_path / "s2.pth")
    metrics = train(_config(train_config, eurosat_with_nodata, tmp_path / "s2.pth"))
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"paths.root_dir={REPO}", f"paths.output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"ckpt_path={metrics['best_checkpoint']}", f"data.root={eurosat_with_nodata}", "split=test",
            "trainer.enable_progress_bar=false", "+trainer.limit_test_batches=1", "report.enabled=false",
        ])
    evaluated = evaluate(cfg)
    for key in ("test/loss", "test/accuracy", "test/f1_macro", "test/kappa", "test/recall/Forest"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert np.isfinite(metrics["test/loss"])
