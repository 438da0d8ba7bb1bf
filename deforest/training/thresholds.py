"""Multi-label decision thresholds, tuned per label on validation predictions.

A rare label rarely reaches a probability of 0.5, so each validation epoch tunes one threshold
per label for F1 or F2; the module keeps them with its weights. Scoring the same predictions
at those thresholds would be optimistic, so validation is scored at thresholds tuned on the
other tiles (:meth:`ThresholdTuner.fit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.classification import MultilabelPrecisionRecallCurve

#: ``tune_thresholds`` values and the F-beta each maximises.
TUNING_BETAS = {"f1": 1.0, "f2": 2.0}


def tune_thresholds(probs: Tensor, target: Tensor, metric: str = "f1") -> Tensor:
    """Per-label thresholds that maximise F1 or F2 (``metric``) on these predictions.

    The candidates are every distinct predicted probability (torchmetrics' exact
    precision-recall curve, positive where ``prob >= threshold``); a label whose best
    F-score is 0 (e.g. no positive tile) keeps 0.5.
    """
    if metric not in TUNING_BETAS:
        raise ValueError(f"threshold tuning maximises one of {sorted(TUNING_BETAS)}, not {metric!r}")
    beta2 = TUNING_BETAS[metric] ** 2
    num_labels = probs.shape[1]
    curve = MultilabelPrecisionRecallCurve(num_labels, thresholds=None)
    precision, recall, candidates = curve(probs.float(), target.long())
    thresholds = torch.full((num_labels,), 0.5)
    for label, (p, r, t) in enumerate(zip(precision, recall, candidates)):
        p, r = p[:-1], r[:-1]  # the curve's last point (recall 0) has no threshold
        t = torch.atleast_1d(t)  # one distinct probability (e.g. a constant after calibration): a 0-d tensor
        score = torch.nan_to_num((1 + beta2) * p * r / (beta2 * p + r))
        if len(score) and score.max() > 0:
            thresholds[label] = t[score.argmax()]
    return thresholds


def cross_fitted_thresholds(probs: Tensor, target: Tensor, metric: str = "f1", folds: int = 2) -> Tensor:
    """Per-tile thresholds ``[N, C]``, each tuned on the other folds' tiles, never its own.

    Scoring predictions at thresholds tuned on the same predictions is optimistic (the
    tuning fits their noise), and checkpoints and sweeps select on the validation score;
    tiles go to ``folds`` folds by position, so the split is the same every epoch.
    """
    fold = torch.arange(len(probs)) % folds
    out = torch.empty(probs.shape, dtype=torch.float32)
    for k in range(folds):
        held_out = fold == k
        if held_out.all():  # a single tile: nothing else to tune on
            out[held_out] = 0.5
            continue
        out[held_out] = tune_thresholds(probs[~held_out], target[~held_out], metric)
    return out


@dataclass(frozen=True)
class ThresholdTuner:
    """Tunes thresholds for ``metric`` (``f1`` or ``f2``) on a validation epoch's predictions."""

    metric: str

    def __post_init__(self) -> None:
        if self.metric not in TUNING_BETAS:
            raise ValueError(f"tune_thresholds must be one of {sorted(TUNING_BETAS)} or null, not {self.metric!r}")

    def fit(self, probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(kept, scoring)``: the thresholds tuned on every tile ``[C]`` (the checkpoint's), and
        per tile the thresholds tuned on the other tiles ``[N, C]`` (for the validation score)."""
        return tune_thresholds(probs, target, self.metric), cross_fitted_thresholds(probs, target, self.metric)
