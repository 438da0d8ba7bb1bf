"""Calibrated probabilities: ECE, the correction fitted on validation, and its journey through
the checkpoint, on a real multi-label run (data/bigearthnet-s2) with a prior-biasing scheme."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deforest.cli.train import train
from deforest.core.contract import InputSpec
from deforest.runs.build import build_datamodule
from deforest.training.calibration import calibration_errors, fit_calibration
from deforest.training.metrics import compute_metrics
from deforest.training.module import TileClassifier
from deforest.training.thresholds import tune_thresholds
from tests.conftest import compose_train_config

REPO = Path(__file__).resolve().parents[2]


def test_ece_by_hand():
    probs = torch.tensor([[0.9], [0.9], [0.1], [0.1]])
    target = torch.tensor([[1], [0], [0], [0]])
    # bin of 0.9: confidence 0.9, observed 0.5 (2 of 4 pairs); bin of 0.1: 0.1 against 0 (2 of 4)
    assert float(calibration_errors("multilabel", probs, target)["ece"]) == pytest.approx(0.4 / 2 + 0.1 / 2, abs=1e-6)
    mc = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    # top-label confidences 0.8 (right) and 0.6 (wrong): (0.2 + 0.6) / 2
    assert float(calibration_errors("multiclass", mc, torch.tensor([0, 1]))["ece"]) == pytest.approx(0.4, abs=1e-6)


def test_fit_recovers_a_known_shift():
    """Logits of a label drawn with P(y=1) = sigmoid(2 z - 1): the fit finds T = 1/2, b = -1."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, generator=g) * 2
    y = (torch.rand(20000, 1, generator=g) < torch.sigmoid(2 * z - 1)).long()
    temperature, bias = fit_calibration("multilabel", z, y)
    assert float(temperature) == pytest.approx(0.5, abs=0.03)
    assert float(bias) == pytest.approx(-1.0, abs=0.06)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_a_validation_set_without_a_mistake_does_not_make_the_model_certain(task):
    """Twenty validation tiles, every one right (a small or easy validation split): the log-loss
    falls as T -> 0 without end, and an unbounded fit made every later probability 0 or 1."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 10, generator=g)
    y = z.argmax(dim=1) if task == "multiclass" else (z > 0).long()
    temperature, _ = fit_calibration(task, z, y)
    assert 0.25 <= float(temperature) < 1.0


def test_a_small_calibrated_validation_set_keeps_the_temperature_near_one():
    """Labels drawn from the model's own softmax (it is calibrated): on 20 tiles the fit stays
    within 25% of T = 1 for every draw, where sampling noise alone moved it to 0.59."""
    temperatures = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(20, 10, generator=g) * 3
        y = torch.multinomial(z.softmax(dim=1), 1, generator=g).squeeze(1)
        temperatures.append(float(fit_calibration("multiclass", z, y)[0]))
    assert 0.75 <= min(temperatures) and max(temperatures) <= 1.25


def test_many_tiles_outweigh_the_temperature_prior():
    """2000 tiles of a model twice too confident: the fit finds T = 2 despite the prior."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 10, generator=g) * 3
    y = torch.multinomial((z / 2).softmax(dim=1), 1, generator=g).squeeze(1)
    assert float(fit_calibration("multiclass", z, y)[0]) == pytest.approx(2.0, rel=0.1)


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory, bigearthnet_root):
    """15 epochs of the multi-label head with ``balanced`` weights, which lift the rare labels'
    probabilities (docs/imbalance.md, "Multi-label weighting")."""
    out = tmp_path_factory.mktemp("balanced")
    cfg = compose_train_config(out, [
        "data=bigearthnet", f"data.root={bigearthnet_root}", "loss.scheme=balanced",
        "trainer.max_epochs=15", "model.width=16", "data.batch_size=8",
    ])
    metrics = train(cfg)
    return cfg, metrics, out


def test_correction_lowers_the_test_ece(balanced_run):
    _, metrics, out = balanced_run
    written = json.loads((out / "metrics.json").read_text())
    assert written["test/ece"] < 0.8 * metrics["test/ece_uncorrected"], metrics
    assert written["test/ece_macro"] < metrics["test/ece_macro_uncorrected"], metrics
    report = (out / "report.md").read_text()
    assert f"| ece | {written['test/ece']:.4f} |" in report and "![reliability diagram](reliability.png)" in report


def _split_scores(model: TileClassifier, cfg, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit" if split == "val" else "test")
    datamodule.use_contract(model.input_spec)
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    scores, targets = [], []
    with torch.no_grad():
        for batch in loader:
            batch = datamodule.on_after_batch_transfer(batch, 0)  # what Lightning does after the copy
            scores.append(model._probabilities(batch["image"])[1])
            targets.append(batch["target"])
    return torch.cat(scores), torch.cat(targets)


def test_correction_round_trips_through_the_checkpoint(balanced_run):
    cfg, _, out = balanced_run
    ckpt = Path(json.loads((out / "metrics.json").read_text())["best_checkpoint"])
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    spec = InputSpec.from_dict(stored["input_spec"])
    model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    calibration = spec.calibration
    assert calibration.temperature == pytest.approx(float(model.calibration_temperature))
    assert calibration.bias == pytest.approx(model.calibration_bias.tolist())
    assert calibration.temperature != 1.0 and any(abs(b) > 1e-3 for b in calibration.bias)
    datamodule, loader = _loader(model, cfg)
    images = datamodule.on_after_batch_transfer(next(iter(loader)), 0)["image"]
    with torch.no_grad():
        expected = torch.sigmoid(model(images) / calibration.temperature + torch.tensor(calibration.bias))
        torch.testing.assert_close(model.predict_proba(images), expected, rtol=0, atol=1e-6)
    # a checkpoint written before the correction existed loads with the identity
    del stored["state_dict"]["calibration_temperature"], stored["state_dict"]["calibration_bias"]
    del stored["input_spec"]["calibration"]
    old = out / "before-calibration.ckpt"
    torch.save(stored, old)
    legacy = TileClassifier.load_from_checkpoint(old, map_location="cpu").eval()
    assert float(legacy.calibration_temperature) == 1.0 and not legacy.calibration_bias.any()
    with torch.no_grad():
        torch.testing.assert_close(legacy.predict_proba(images), torch.sigmoid(legacy(images)), rtol=0, atol=1e-6)


def _loader(model: TileClassifier, cfg):
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("test")
    datamodule.use_contract(model.input_spec)
    return datamodule, datamodule.test_dataloader()


def test_thresholds_are_tuned_on_the_corrected_probabilities(balanced_run):
    """The checkpoint's thresholds are the ones tuned on the corrected validation probabilities,
    and F1 on the test split at them equals F1 at thresholds tuned on the raw probabilities
    (the correction is monotone per label): calibrating costs no F1."""
    cfg, _, out = balanced_run
    ckpt = Path(json.loads((out / "metrics.json").read_text())["best_checkpoint"])
    model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    val_scores, val_target = _split_scores(model, cfg, "val")
    test_scores, test_target = _split_scores(model, cfg, "test")
    corrected = lambda s: torch.sigmoid(model.calibrated(s))  # noqa: E731
    tuned = tune_thresholds(corrected(val_scores), val_target, "f1")
    torch.testing.assert_close(model.thresholds, tuned)
    c = len(model.class_names)
    f1_corrected = compute_metrics("multilabel", c, corrected(test_scores), test_target, tuned)["f1_macro"]
    raw_tuned = tune_thresholds(torch.sigmoid(val_scores), val_target, "f1")
    f1_raw = compute_metrics("multilabel", c, torch.sigmoid(test_scores), test_target, raw_tuned)["f1_macro"]
    assert float(f1_corrected) == pytest.approx(float(f1_raw), abs=1e-6)


def test_thresholds_of_a_constant_probability():
    """The correction of a head that tells tiles apart by nothing is a constant per label
    (``T`` grows, the bias carries the rate); tuning must then keep that constant, not fail."""
    target = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 0], [0, 1]])
    assert tune_thresholds(torch.full((5, 2), 0.3), target).tolist() == pytest.approx([0.3, 0.3])


def test_a_crafted_correction_is_refused(balanced_run, tmp_path):
    """A checkpoint whose correction is not finite would turn every probability into NaN."""
    from deforest.core.safety import CheckpointError

    _, _, out = balanced_run
    ckpt = Path(json.loads((out / "metrics.json").read_text())["best_checkpoint"])
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    stored["state_dict"]["calibration_bias"][0] = float("nan")
    crafted = tmp_path / "crafted.ckpt"
    torch.save(stored, crafted)
    with pytest.raises(CheckpointError, match=r"crafted\.ckpt.*refused: its calibration bias holds nan"):
        TileClassifier.load_from_checkpoint(crafted, map_location="cpu")
