"""The classifier's grouped settings: built from the flat config keys, saved as plain data, and
rebuilt from checkpoints, including those that keep the settings flat."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from deforest.core.contract import Calibration, NetworkInput, SourceRecord, untrained_spec
from deforest.core.safety import CheckpointError
from deforest.training.module import TileClassifier
from deforest.training.settings import EvaluationSettings, NetworkSettings, OptimizationSettings

CLASSES = ["Forest", "River", "Road"]


def _save(model: TileClassifier, path: Path) -> Path:
    """A real Lightning checkpoint of ``model``."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def _model() -> TileClassifier:
    torch.manual_seed(0)
    spec = untrained_spec("multilabel", CLASSES, 4, 16)
    return TileClassifier.from_keys(spec, width=8, band_statistics=True, tta=True, tune_thresholds="f2",
                                    freeze_backbone=True, loss={"scheme": "ema", "momentum": 0.5},
                                    nonfinite_loss="skip")


def test_flat_keys_are_sorted_into_the_settings_groups():
    model = _model()
    assert model.network_settings == NetworkSettings(width=8, band_statistics=True)
    assert model.evaluation == EvaluationSettings(tta=True, tune_thresholds="f2")
    assert model.optimization == OptimizationSettings(freeze_backbone=True)
    assert model.tta is True and model.threshold_tuner.metric == "f2" and model.nonfinite.mode == "skip"
    assert model.criterion.scheme == "ema" and model.criterion.momentum == 0.5
    # the checkpoint's hyper-parameters hold each group as plain data
    assert model.hparams.network["width"] == 8 and model.hparams.evaluation["tune_thresholds"] == "f2"
    assert model.hparams.loss == {"scheme": "ema", "momentum": 0.5}


def test_a_checkpoint_rebuilds_the_same_classifier(tmp_path):
    model = _model().eval()
    loaded = TileClassifier.load_from_checkpoint(_save(model, tmp_path / "m.ckpt"), map_location="cpu").eval()
    assert (loaded.network_settings, loaded.evaluation, loaded.optimization) == (
        model.network_settings, model.evaluation, model.optimization)
    assert loaded.criterion.momentum == 0.5 and loaded.nonfinite.mode == "skip"
    x = torch.rand(2, 4, 16, 16) * 100
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(x), model.predict_proba(x), rtol=0, atol=0)


def test_a_checkpoint_with_flat_settings_still_loads(tmp_path):
    """Checkpoints that keep the settings at the top of their hyper-parameters load with the
    same network, evaluation and training settings."""
    model = _model().eval()
    path = _save(model, tmp_path / "grouped.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    flat = {"input_spec": hparams["input_spec"], "loss": hparams["loss"], "nonfinite_loss": "skip",
            **hparams["network"], **hparams["optimization"], **hparams["evaluation"]}
    checkpoint["hyper_parameters"] = flat
    torch.save(checkpoint, tmp_path / "flat.ckpt")
    loaded = TileClassifier.load_from_checkpoint(tmp_path / "flat.ckpt", map_location="cpu").eval()
    assert loaded.network_settings == model.network_settings and loaded.evaluation == model.evaluation
    assert loaded.optimization == model.optimization
    x = torch.rand(2, 4, 16, 16) * 100
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(x), model.predict_proba(x), rtol=0, atol=0)


def _flat_contract(plain: dict) -> dict:
    """A contract as checkpoints wrote it before its sub-records: every field at the top level."""
    plain = dict(plain)
    source, network, calibration = plain.pop("source"), plain.pop("network"), plain.pop("calibration")
    return {**plain, "source_band_count": source["band_count"], "source_dtype": source["dtype"],
            "value_low": source["value_low"], "value_high": source["value_high"],
            "pixel_size": source["pixel_size"], "pixel_units": source["pixel_units"],
            "network_bands": network["bands"], "input_pool": network["pool"],
            "calibration_temperature": calibration["temperature"], "calibration_bias": calibration["bias"]}


def test_a_checkpoint_with_a_flat_contract_still_loads(tmp_path):
    spec = replace(untrained_spec("multilabel", CLASSES, 4, 16),
                   source=SourceRecord(4, "uint16", [10.0] * 4, [900.0] * 4, [10.0, 10.0], "m"),
                   network=NetworkInput([0, 2, 3], 2), calibration=Calibration(1.5, [0.1, -0.2, 0.3]))
    torch.manual_seed(0)
    model = TileClassifier.from_keys(spec, width=8, band_statistics=True).eval()
    checkpoint = torch.load(_save(model, tmp_path / "m.ckpt"), map_location="cpu", weights_only=True)
    checkpoint["input_spec"] = _flat_contract(checkpoint["input_spec"])
    checkpoint["hyper_parameters"]["input_spec"] = _flat_contract(checkpoint["hyper_parameters"]["input_spec"])
    torch.save(checkpoint, tmp_path / "flat.ckpt")
    loaded = TileClassifier.load_from_checkpoint(tmp_path / "flat.ckpt", map_location="cpu").eval()
    assert loaded.input_spec == model.input_spec and loaded.input_spec.network == NetworkInput([0, 2, 3], 2)
    assert loaded.input_spec.calibration.temperature == pytest.approx(1.5)
    x = torch.rand(2, 4, 16, 16) * 100
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(x), model.predict_proba(x), rtol=0, atol=0)


def test_an_unknown_key_in_a_checkpoints_contract_is_refused_naming_it(tmp_path):
    path = _save(_model(), tmp_path / "m.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["input_spec"]["source"]["gain"] = 2.0
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    with pytest.raises(CheckpointError, match=r"crafted\.ckpt: cannot rebuild the model from it \(TypeError: "
                                              r".*unexpected keyword argument 'gain'\)"):
        TileClassifier.load_from_checkpoint(tmp_path / "crafted.ckpt", map_location="cpu")


def test_an_unknown_setting_in_a_checkpoint_is_refused_naming_it(tmp_path):
    path = _save(_model(), tmp_path / "m.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["network"]["stem"] = "deep"
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    with pytest.raises(CheckpointError, match=r"crafted\.ckpt: cannot rebuild the model from it \(ValueError: "
                                              r"NetworkSettings takes no \['stem'\]\)"):
        TileClassifier.load_from_checkpoint(tmp_path / "crafted.ckpt", map_location="cpu")


@pytest.mark.parametrize("group,options,message", [
    ("network", {"fusion": "late"}, r"model\.fusion must be one of \['early', 'siamese'\], not 'late'"),
    ("network", {"input_resize": 0}, r"model\.input_resize must be >= 1 or null, not 0"),
    ("optimization", {"backbone_lr_multiplier": 0.0}, r"model\.backbone_lr_multiplier must be > 0, not 0\.0"),
    ("optimization", {"scheduler_interval": "batch"}, r"model\.scheduler_interval must be step or epoch"),
])
def test_bad_settings_are_refused_naming_the_config_key(group, options, message):
    with pytest.raises(ValueError, match=message):
        TileClassifier(untrained_spec("multiclass", CLASSES, 4, 16), **{group: options})
