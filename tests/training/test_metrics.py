"""The metric set and threshold tuning against torchmetrics called directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryFBetaScore,
    MulticlassCohenKappa,
    MulticlassRecall,
    MultilabelF1Score,
)

from deforest.core.vocabulary import MULTICLASS, MULTILABEL
from deforest.runs.plots import quicklook
from deforest.runs.report import rgb_bands
from deforest.training.metrics import compute_metrics, decide
from deforest.training.thresholds import ThresholdTuner, tune_thresholds


def _multilabel_predictions(seed: int = 0, n: int = 120, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores that carry some signal, with label 4 never positive."""
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, c, generator=g) < 0.35).long()
    target[:, 4] = 0
    probs = (0.35 * target + 0.65 * torch.rand(n, c, generator=g)).clamp(0, 1)
    return probs, target


@pytest.mark.parametrize("metric, beta", [("f1", 1.0), ("f2", 2.0)])
def test_tuned_thresholds_are_the_best_per_label(metric, beta):
    probs, target = _multilabel_predictions()
    thresholds = tune_thresholds(probs, target, metric)
    for label in range(4):
        score = BinaryFBetaScore(beta=beta)
        tuned = score((probs[:, label] >= thresholds[label]).float(), target[:, label])
        # brute force over every candidate threshold
        best = max(float(score((probs[:, label] >= t).float(), target[:, label])) for t in probs[:, label].unique())
        assert float(tuned) == pytest.approx(best, abs=1e-6)
        assert float(tuned) >= float(score(probs[:, label], target[:, label])) - 1e-7  # at 0.5
    assert float(thresholds[4]) == 0.5  # no positive: nothing to tune


def test_validation_thresholds_are_tuned_on_the_other_tiles():
    probs, target = _multilabel_predictions()
    kept, scoring = ThresholdTuner("f1").fit(probs, target)
    torch.testing.assert_close(kept, tune_thresholds(probs, target, "f1"))  # the checkpoint's
    even = torch.arange(len(probs)) % 2 == 0
    for scored, other in ((even, ~even), (~even, even)):
        expected = tune_thresholds(probs[other], target[other], "f1").expand(int(scored.sum()), -1)
        torch.testing.assert_close(scoring[scored], expected)
    # a tile's own prediction never moves the threshold it is scored at
    moved = probs.clone()
    moved[even] = torch.rand(int(even.sum()), probs.shape[1], generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ThresholdTuner("f1").fit(moved, target)[1][even], scoring[even])
    assert not torch.allclose(ThresholdTuner("f1").fit(moved, target)[1][~even], scoring[~even])
    with pytest.raises(ValueError, match="tune_thresholds must be one of"):
        ThresholdTuner("f3")


def test_tuned_thresholds_do_not_lower_macro_f1():
    probs, target = _multilabel_predictions(seed=3)
    thresholds = tune_thresholds(probs, target, "f1")
    f1 = MultilabelF1Score(5, average="macro")
    assert float(f1(decide(MULTILABEL, probs, thresholds), target)) > float(f1(probs, target))
    with pytest.raises(ValueError, match="f3"):
        tune_thresholds(probs, target, "f3")


def test_multiclass_metrics_match_torchmetrics():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (80,), generator=g)
    probs = torch.softmax(torch.randn(80, 4, generator=g) + 2 * torch.nn.functional.one_hot(target, 4), dim=1)
    values = compute_metrics(MULTICLASS, 4, probs, target, torch.full((4,), 0.5))
    assert float(values["kappa"]) == pytest.approx(float(MulticlassCohenKappa(4)(probs, target)))
    recall = MulticlassRecall(4, average="none")(probs, target)
    assert float(values["balanced_accuracy"]) == pytest.approx(float(recall.mean()))
    counts = values["confusion_matrix"]
    assert int(counts.sum()) == 80 and torch.equal(counts.diagonal() / counts.sum(1), values["confusion_matrix_normalized"].diagonal())
    assert float(values["accuracy"]) == pytest.approx(float((probs.argmax(1) == target).float().mean()))


def test_multilabel_f2_is_the_mean_per_tile_score_and_hamming_the_error_rate():
    probs, target = _multilabel_predictions(seed=2)
    thresholds = torch.tensor([0.4, 0.5, 0.6, 0.5, 0.5])
    values = compute_metrics(MULTILABEL, 5, probs, target, thresholds)
    decided = (probs >= thresholds).long()
    tp = (decided & target).sum(1).float()
    per_tile = torch.nan_to_num(5 * tp / (4 * target.sum(1) + decided.sum(1)))
    assert float(values["f2"]) == pytest.approx(float(per_tile.mean()), abs=1e-6)
    assert float(values["hamming_loss"]) == pytest.approx(float((decided != target).float().mean()))
    f1 = BinaryF1Score()
    assert float(values["f1"][0]) == pytest.approx(float(f1(decided[:, 0].float(), target[:, 0])))


def test_quicklook_bands_per_sensor_and_stretch(eurosat_root):
    from deforest.data.bigearthnet import BIGEARTHNET_BANDS
    from deforest.data.io import read_raster

    eurosat = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
    assert rgb_bands(None, eurosat, 13) == [4, 3, 2]
    assert rgb_bands(None, BIGEARTHNET_BANDS, 1) == [4, 3, 2]
    assert rgb_bands(None, None, 6) == [1, 2, 3] and rgb_bands(None, None, 1) == [1]
    assert rgb_bands(["B08", "B04", "B03"], eurosat, 13) == [8, 4, 3] and rgb_bands([5, 4, 3], None, 6) == [5, 4, 3]
    with pytest.raises(ValueError, match="1 or 3"):
        rgb_bands([1, 2], None, 6)
    tile = sorted((eurosat_root / "test" / "Forest").glob("*.tif"))[0]
    picture = quicklook(read_raster(tile, [4, 3, 2]))
    assert picture.shape == (64, 64, 3) and picture.min() == 0.0 and picture.max() == 1.0
    for band in range(3):  # 2-98 % stretch: about 2 % of the pixels clip at each end
        assert 0.005 < np.mean(picture[..., band] == 0.0) < 0.06
        assert 0.005 < np.mean(picture[..., band] == 1.0) < 0.06
