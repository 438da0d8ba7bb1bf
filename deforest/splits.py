"""Seeded, stratified train/val/test assignment for samples without a given split.

One algorithm serves both tasks: iterative stratification (Sechidis, Tsoumakas & Vlahavas,
ECML 2011), which for single-label data reduces to an exact per-class split.
"""

from __future__ import annotations

import numpy as np

from deforest.datasets import SPLITS, TileIndex


def iterative_stratification(
    one_hot: np.ndarray, fractions: dict[str, float], seed: int
) -> np.ndarray:
    """Assign each row of ``one_hot`` ``[N, C]`` to a key of ``fractions``.

    Rarest labels are distributed first, each sample going to the split that most lacks
    that label (ties broken by overall need, then at random), so every split gets its share
    of rare labels. Rows without any label are spread by overall need at the end.
    """
    rng = np.random.default_rng(seed)
    names = list(fractions)
    ratios = np.asarray([fractions[n] for n in names], dtype=float)
    ratios = ratios / ratios.sum()
    n = len(one_hot)
    labels = one_hot.astype(bool)
    want_total = ratios * n
    want_label = ratios[:, None] * labels.sum(axis=0)[None, :]
    out = np.full(n, -1)
    remaining = labels.copy()
    unassigned = np.ones(n, dtype=bool)
    while remaining[unassigned].any():
        counts = remaining[unassigned].sum(axis=0)
        counts[counts == 0] = n + 1
        label = int(np.argmin(counts))
        rows = np.flatnonzero(unassigned & remaining[:, label])
        for row in rng.permutation(rows):
            need = want_label[:, label]
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:
                best = best[want_total[best] == want_total[best].max()]
            split = int(rng.choice(best))
            out[row] = split
            unassigned[row] = False
            want_label[split, labels[row]] -= 1
            want_total[split] -= 1
    for row in rng.permutation(np.flatnonzero(unassigned)):
        split = int(np.argmax(want_total))
        out[row] = split
        want_total[split] -= 1
    return np.asarray(names, dtype=object)[out]


def assign_splits(
    index: TileIndex, val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """Keep given splits; stratify the rest.

    Samples without a split are divided into train/val/test. When the data gives train and
    test but no val (the EuroSAT sample), val is carved out of train with ``val_fraction``.
    """
    given = np.asarray([s or "" for s in index.splits], dtype=object)
    out = given.copy()
    free = given == ""
    one_hot = index.one_hot()
    if free.any():
        fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
        fractions = {k: v for k, v in fractions.items() if v > 0}
        out[free] = iterative_stratification(one_hot[free], fractions, seed)
    if not (out == "val").any() and val_fraction > 0:
        train = np.flatnonzero(out == "train")
        carved = iterative_stratification(
            one_hot[train], {"train": 1.0 - val_fraction, "val": val_fraction}, seed
        )
        out[train] = carved
    return [str(s) for s in out]


__all__ = ["SPLITS", "assign_splits", "iterative_stratification"]
