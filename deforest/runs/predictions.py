"""The predictions a report shows: :class:`Evaluation` (one split's probabilities, targets and
sources), the decisions taken from them, and ``predictions.csv``, one row per tile, which every
number of the report can be checked against.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from deforest.core.outputs import atomic_output
from deforest.core.vocabulary import MULTICLASS
from deforest.training.metrics import decide


@dataclass
class Evaluation:
    """Predictions on one split and what is needed to show them.

    ``probs`` ``[N, C]``, ``target`` ``[N]`` or ``[N, C]`` and ``sources`` (one file per
    row) come from the model's test epoch; ``read_rgb`` reads a source's quicklook bands.
    """

    task: str
    class_names: list[str]
    probs: Tensor
    target: Tensor
    thresholds: Tensor
    sources: list[str]
    read_rgb: Callable[[str], np.ndarray]
    split: str = "test"
    split_counts: Mapping[str, Mapping[str, int]] | None = None
    csv_log: Path | None = None
    details: Sequence[str] = ()
    tested_epoch: int | None = None


def decisions(run: Evaluation) -> np.ndarray:
    """The predicted class of each row (multi-class), or its labels at the run's thresholds."""
    if run.task == MULTICLASS:
        return run.probs.argmax(dim=1).numpy()
    return decide(run.task, run.probs, run.thresholds).bool().numpy()


def wrong_rows(run: Evaluation, predicted: np.ndarray) -> np.ndarray:
    """Rows whose decision differs from the target (any label, multi-label)."""
    target = run.target.numpy()
    if run.task == MULTICLASS:
        return predicted != target
    return (predicted != target.astype(bool)).any(axis=1)


def label_names(run: Evaluation, row: int, values: np.ndarray) -> str:
    """Row ``row`` of decisions or targets as class names (``-``: no label)."""
    if run.task == MULTICLASS:
        return run.class_names[int(values[row])]
    return "; ".join(n for n, on in zip(run.class_names, values[row]) if on) or "-"


def write_predictions(run: Evaluation, path: Path) -> None:
    """One row per tile: file, true and predicted labels, every class probability."""
    target, predicted = run.target.numpy(), decisions(run)
    with atomic_output(path, ".csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", *(f"p:{n}" for n in run.class_names)])
        for row, source in enumerate(run.sources):
            writer.writerow([
                source,
                label_names(run, row, target),
                label_names(run, row, predicted),
                *(f"{p:.9g}" for p in run.probs[row].tolist()),
            ])
