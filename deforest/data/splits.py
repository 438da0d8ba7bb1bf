"""Seeded, stratified train/val/test assignment for samples without a given split.

One algorithm serves both tasks: iterative stratification (Sechidis, Tsoumakas & Vlahavas,
ECML 2011), which for single-label data reduces to an exact per-class split. Spatial splits
run it over square blocks of tiles instead of tiles, so neighbours never straddle splits.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from deforest.core.contract import SplitRecord
from deforest.core.errors import ConfigError, DatasetError, closest
from deforest.core.vocabulary import SPLITS
from deforest.data.index import TileIndex

log = logging.getLogger(__name__)

BOUNDS_COLUMNS = ("minx", "miny", "maxx", "maxy", "crs")


#: the one wording of this mistake, whether the config check or the splitter meets it first
SPATIAL_BLOCK_PROBLEM = "data.split=spatial needs data.block_size > 0 (tile CRS units, e.g. metres), not {}"

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


def spatial_blocks(index: TileIndex, block_size: float) -> np.ndarray:
    """Per tile, the block holding its centre: squares of ``block_size`` CRS units, per CRS.

    Reads the ``minx, miny, maxx, maxy, crs`` manifest columns that ``deforest-tile`` writes.
    """
    if not block_size or block_size <= 0:
        raise ConfigError(SPATIAL_BLOCK_PROBLEM.format(block_size))
    blocks: dict[tuple[str, int, int], int] = {}
    out = np.empty(len(index), np.int64)
    for i, (crs, minx, miny, maxx, maxy) in enumerate(_footprints(index)):
        cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
        key = (crs, math.floor(cx / block_size), math.floor(cy / block_size))
        out[i] = blocks.setdefault(key, len(blocks))
    return out


def _footprints(index: TileIndex) -> list[tuple[str, float, float, float, float]]:
    """``(crs, minx, miny, maxx, maxy)`` per tile from the manifest's bounds columns."""
    missing = [c for c in BOUNDS_COLUMNS if c not in index.meta]
    if missing:
        raise DatasetError(
            f"data.split=spatial needs the manifest columns {list(BOUNDS_COLUMNS)} (deforest-tile writes them); "
            f"missing {missing}"
        )
    out = []
    for i, (minx, miny, maxx, maxy, crs) in enumerate(zip(*(index.meta[c] for c in BOUNDS_COLUMNS))):
        try:
            out.append((crs, float(minx), float(miny), float(maxx), float(maxy)))
        except ValueError:
            raise DatasetError(f"{index.sources[i]}: bounds {minx, miny, maxx, maxy} are not numbers") from None
    return out


def edge_tiles(index: TileIndex, assignment: Sequence[str], block_size: float, buffer: float = 0.0) -> np.ndarray:
    """Per tile, whether it must leave the split so that no pixel is in two splits.

    A block belongs to the split of the tiles centred in it. A tile whose footprint, grown
    by ``buffer`` (CRS units) on every side, reaches a block of another split (overlapping
    tiles cut around points near a block edge) is dropped; blocks no tile is centred in go
    to the first tile that reaches them. Every block is then reached by tiles of one split
    only, so tiles of different splits share no pixel and lie ``2 * buffer`` apart or more.
    """
    if buffer < 0:
        raise ValueError(f"data.block_buffer must be >= 0, not {buffer}")
    footprints = _footprints(index)
    owner: dict[tuple[str, int, int], str] = {}
    for (crs, minx, miny, maxx, maxy), split in zip(footprints, assignment):
        owner.setdefault((crs, math.floor((minx + maxx) / 2 / block_size), math.floor((miny + maxy) / 2 / block_size)), split)
    drop = np.zeros(len(index), bool)
    for i, ((crs, minx, miny, maxx, maxy), split) in enumerate(zip(footprints, assignment)):
        # the footprint is [min, max): a tile ending on a block edge does not reach the next block
        xs = range(math.floor((minx - buffer) / block_size), math.ceil((maxx + buffer) / block_size))
        ys = range(math.floor((miny - buffer) / block_size), math.ceil((maxy + buffer) / block_size))
        reached = [(crs, x, y) for x in xs for y in ys]
        if any(owner.get(key, split) != split for key in reached):
            drop[i] = True
            continue
        for key in reached:
            owner.setdefault(key, split)
    return drop


def _stratify(
    one_hot: np.ndarray, fractions: dict[str, float], seed: int, groups: np.ndarray | None
) -> np.ndarray:
    """Iterative stratification of rows, or of whole groups (a group carries its rows' labels)."""
    if groups is None:
        return iterative_stratification(one_hot, fractions, seed)
    _, inverse = np.unique(groups, return_inverse=True)
    group_hot = np.zeros((inverse.max() + 1, one_hot.shape[1]), bool)
    np.logical_or.at(group_hot, inverse, one_hot.astype(bool))
    return iterative_stratification(group_hot, fractions, seed)[inverse]


def assign_splits(
    index: TileIndex, val_fraction: float, test_fraction: float, seed: int, groups: np.ndarray | None = None
) -> list[str]:
    """Keep given splits; stratify the rest.

    Samples without a split are divided into train/val/test. When the data gives train and
    test but no val (the EuroSAT sample), val is carved out of train with ``val_fraction``.
    ``groups`` (e.g. :func:`spatial_blocks`) keeps every group in one split.
    """
    given = np.asarray([s or "" for s in index.splits], dtype=object)
    out = given.copy()
    free = given == ""
    one_hot = index.one_hot()
    if free.any():
        fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
        fractions = {k: v for k, v in fractions.items() if v > 0}
        out[free] = _stratify(one_hot[free], fractions, seed, None if groups is None else groups[free])
    if not (out == "val").any() and val_fraction > 0:
        train = np.flatnonzero(out == "train")
        carved = _stratify(
            one_hot[train], {"train": 1.0 - val_fraction, "val": val_fraction}, seed,
            None if groups is None else groups[train],
        )
        out[train] = carved
    return [str(s) for s in out]


def subset(index: TileIndex, keep: np.ndarray) -> TileIndex:
    """The samples of ``index`` where ``keep`` (a boolean mask or row numbers), in that order."""
    rows = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
    return TileIndex(
        index.task,
        index.class_names,
        [index.sources[i] for i in rows],
        index.targets[rows],
        [index.splits[i] for i in rows],
        {k: [v[i] for i in rows] for k, v in index.meta.items()},
    )


def restore_split(index: TileIndex, record: SplitRecord, root: str | os.PathLike) -> tuple[TileIndex, list[str]]:
    """A checkpoint's split on the tiles under ``root``: each listed tile in its recorded split and
    order (so dataset positions match training's); tiles in no list are left out."""
    position = {source: n for n, source in enumerate(index.sources)}
    rows, assignment, missing = [], [], 0
    for split in SPLITS:
        for relative in record.lists.get(split, []):
            n = position.get(os.path.join(root, relative))
            if n is None:
                missing += 1
                continue
            rows.append(n)
            assignment.append(split)
    if not rows:
        raise DatasetError(
            f"{root}: none of the {missing} tiles of the checkpoint's split is here; "
            "to evaluate on other tiles, split them with resplit=true"
        )
    if missing:
        log.warning("%d tile(s) of the checkpoint's split are not under %s", missing, root)
    if len(rows) < len(index):
        log.info("%d tile(s) under %s are in none of the checkpoint's splits: left out", len(index) - len(rows), root)
    log.info("split: the checkpoint's (%s, %s, seed %d, %s)", record.kind, record.layout, record.seed, record.digest)
    return subset(index, rows), assignment


def imbalance_mask(index: TileIndex, assignment: Sequence[str], imbalance: dict[str, float], seed: int) -> np.ndarray:
    """Keep each training sample with the fraction of its (rarest kept) class (``"*"``: the rest)."""
    fractions = np.asarray([imbalance.get(name, imbalance.get("*", 1.0)) for name in index.class_names])
    unknown = set(imbalance) - set(index.class_names) - {"*"}
    if unknown:
        near = [closest(name, index.class_names) for name in sorted(unknown)]
        hint = ", ".join(repr(found) for found in near if found)
        raise ConfigError(
            f"data.imbalance names classes the data does not have: {sorted(unknown)}"
            + (f" (did you mean {hint}?)" if hint else "") + f"; the classes are {list(index.class_names)}"
        )
    one_hot = index.one_hot().astype(bool)
    per_sample = np.where(one_hot, fractions[None, :], np.inf).min(axis=1)
    per_sample[np.isinf(per_sample)] = fractions.min()
    draw = np.random.default_rng(seed).random(len(index))
    is_train = np.asarray(assignment) == "train"
    return ~is_train | (draw < per_sample)


__all__ = [
    "SPLITS", "assign_splits", "edge_tiles", "imbalance_mask", "iterative_stratification", "restore_split",
    "spatial_blocks", "subset",
]
