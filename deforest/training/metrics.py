"""The evaluation metric set (torchmetrics) and decisions at per-label thresholds.

Lightning logs these metrics during validation/test and the run report recomputes them on
the stored predictions with the same builders, so both always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryFBetaScore,
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAUROC,
    MultilabelAveragePrecision,
    MultilabelConfusionMatrix,
    MultilabelF1Score,
    MultilabelHammingDistance,
    MultilabelPrecision,
    MultilabelRecall,
)

from deforest.core.vocabulary import MULTICLASS
from deforest.training.calibration import calibration_errors


class SampleMeanFBeta(BinaryFBetaScore):
    """Mean over tiles of each tile's F-beta across its labels (the Planet Amazon score).

    torchmetrics' multi-label F-beta averages over labels or pools all decisions; the
    competition averages per-tile scores, which the binary metric gives ``samplewise``.
    """

    def __init__(self, beta: float = 2.0) -> None:
        super().__init__(beta=beta, multidim_average="samplewise")

    def compute(self) -> Tensor:
        return super().compute().mean()


def build_metrics(task: str, num_classes: int) -> dict[str, MetricCollection]:
    """Metric collections by input: ``decisions`` take class/label decisions, ``scores`` probabilities.

    Multi-label decisions are made at per-label thresholds (:func:`decide`) before the
    metrics see them, since torchmetrics thresholds every label at one value.
    """
    c = num_classes
    if task == MULTICLASS:
        return {
            "decisions": MetricCollection(
                {
                    "accuracy": MulticlassAccuracy(c, average="micro"),
                    "balanced_accuracy": MulticlassAccuracy(c, average="macro"),
                    "kappa": MulticlassCohenKappa(c),
                    "f1_macro": MulticlassF1Score(c, average="macro"),
                    "f1_weighted": MulticlassF1Score(c, average="weighted"),
                    "recall": MulticlassRecall(c, average="none"),
                    "precision": MulticlassPrecision(c, average="none"),
                    "f1": MulticlassF1Score(c, average="none"),
                    "confusion_matrix": MulticlassConfusionMatrix(c),
                    "confusion_matrix_normalized": MulticlassConfusionMatrix(c, normalize="true"),
                }
            )
        }
    return {
        "decisions": MetricCollection(
            {
                "f1_micro": MultilabelF1Score(c, average="micro"),
                "f1_macro": MultilabelF1Score(c, average="macro"),
                "f2": SampleMeanFBeta(beta=2.0),
                "hamming_loss": MultilabelHammingDistance(c, average="micro"),
                "recall": MultilabelRecall(c, average="none"),
                "precision": MultilabelPrecision(c, average="none"),
                "f1": MultilabelF1Score(c, average="none"),
                "confusion_matrix": MultilabelConfusionMatrix(c),
            }
        ),
        "scores": MetricCollection(
            {
                "map": MultilabelAveragePrecision(c, average="macro"),
                "ap": MultilabelAveragePrecision(c, average="none"),
                "auroc": MultilabelAUROC(c, average="none"),
            }
        ),
    }


def decide(task: str, probs: Tensor, thresholds: Tensor) -> Tensor:
    """Decisions from probabilities: class probabilities as they are (the metrics take the
    argmax), labels as 0/1 where ``probs >= thresholds``."""
    if task == MULTICLASS:
        return probs
    return (probs >= thresholds.to(probs.device)).to(probs.dtype)


def metric_inputs(task: str, probs: Tensor, target: Tensor, thresholds: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """What each collection of :func:`build_metrics` is updated with."""
    if task == MULTICLASS:
        return {"decisions": (probs, target)}
    target = target.long()
    return {"decisions": (decide(task, probs, thresholds), target), "scores": (probs, target)}


def compute_metrics(task: str, num_classes: int, probs: Tensor, target: Tensor, thresholds: Tensor) -> dict[str, Tensor]:
    """Every metric of :func:`build_metrics` on a whole set of predictions at once."""
    collections = build_metrics(task, num_classes)
    values: dict[str, Tensor] = {}
    for kind, inputs in metric_inputs(task, probs, target, thresholds).items():
        values.update(collections[kind](*inputs))
    values.update(calibration_errors(task, probs, target))
    return values


def flatten_metrics(values: dict[str, Tensor], class_names: Sequence[str], prefix: str) -> dict[str, float]:
    """Scalars as ``prefix/name``, per-class vectors as ``prefix/name/<class>``; matrices are left out."""
    flat: dict[str, float] = {}
    for name, value in values.items():
        if value.ndim == 0:
            flat[f"{prefix}/{name}"] = float(value)
        elif value.ndim == 1:
            flat.update({f"{prefix}/{name}/{c}": float(v) for c, v in zip(class_names, value)})
    return flat
