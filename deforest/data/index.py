"""The index of a dataset: every sample's file, labels and given split, as plain arrays.

Layouts (``deforest.data.layouts``) build it from a folder, manifest or BigEarthNet tree; stores,
splits, statistics and the datamodule read it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from deforest.core.contract import InputSpec
from deforest.core.errors import DatasetError
from deforest.core.vocabulary import MULTICLASS, MULTILABEL, SPLITS

log = logging.getLogger(__name__)


@dataclass
class TileIndex:
    """Every sample of a dataset: where it is, its labels and its given split (if any).

    ``targets`` is int64 ``[N]`` (multi-class) or uint8 ``[N, C]`` (multi-label).
    ``meta`` holds optional per-sample columns (e.g. bounds and CRS written by ``deforest-tile``).
    """

    task: str
    class_names: list[str]
    sources: list[str]
    targets: np.ndarray
    splits: list[str | None]
    meta: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def select(self, rows: Sequence[int], splits: Sequence[str | None] | None = None) -> TileIndex:
        """The samples at ``rows`` (with new given ``splits`` if passed)."""
        rows = list(rows)
        return TileIndex(
            self.task,
            self.class_names,
            [self.sources[i] for i in rows],
            self.targets[rows],
            list(splits) if splits is not None else [self.splits[i] for i in rows],
            {k: [v[i] for i in rows] for k, v in self.meta.items()},
        )

    def one_hot(self) -> np.ndarray:
        """Targets as ``[N, C]`` indicators, whatever the task."""
        if self.task == MULTILABEL:
            return self.targets.astype(np.uint8)
        return np.eye(self.num_classes, dtype=np.uint8)[self.targets]


def describe_split_counts(index: TileIndex, assignment: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per split, the number of samples carrying each class (for logs and plots)."""
    one_hot = index.one_hot()
    assignment = np.asarray(assignment)
    return {
        split: dict(zip(index.class_names, one_hot[assignment == split].sum(axis=0).tolist()))
        for split in SPLITS
    }


def align_classes(index: TileIndex, spec: InputSpec, root: str | os.PathLike) -> TileIndex:
    """``index`` with its targets in the contract's class order (evaluating a checkpoint).

    A multi-class tile of a class the model does not know cannot be scored: an error.
    Multi-label tags the model does not know are dropped with a warning.
    """
    known = {name: i for i, name in enumerate(spec.class_names)}
    unknown = [n for n in index.class_names if n not in known]
    if index.task == MULTICLASS:
        present = {index.class_names[t] for t in index.targets.tolist()}
        if present & set(unknown):
            raise DatasetError(
                f"{root}: class(es) {sorted(present & set(unknown))} are not among the checkpoint's classes {spec.class_names}"
            )
        targets = np.asarray([known[index.class_names[t]] for t in index.targets.tolist()], np.int64)
    else:
        if unknown:
            log.warning("labels %s are not among the checkpoint's classes and are ignored", unknown)
        targets = np.zeros((len(index), len(known)), np.uint8)
        for column, name in enumerate(index.class_names):
            if name in known:
                targets[:, known[name]] = index.targets[:, column]
    return TileIndex(index.task, list(spec.class_names), index.sources, targets, index.splits, index.meta)


__all__ = ["TileIndex", "align_classes", "describe_split_counts"]
