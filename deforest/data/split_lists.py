"""Official split and exclusion lists: give samples the split their list names, drop the excluded.

TorchGeo's EuroSAT split files and BigEarthNet's ``train.csv``/``val.csv``/``test.csv`` and
exclusion CSVs name samples by file or folder name; these functions match them to an index.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from deforest.core.errors import DatasetError
from deforest.core.vocabulary import SPLITS
from deforest.data.index import TileIndex

log = logging.getLogger(__name__)


def sample_name(source: str) -> str:
    """How split lists name a sample: its file or folder name without extension
    (TorchGeo's EuroSAT lists say ``Forest_1.jpg`` for ``Forest_1.tif``)."""
    return Path(source).stem


def read_name_list(path: str | Path) -> list[str]:
    """Sample names, one a line: the first comma-separated field, without extension.

    Reads TorchGeo's EuroSAT split files and BigEarthNet's split and exclusion CSVs
    (``S2_patch[,S1_patch]`` lines, no header).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"{path}: split/exclusion list not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [Path(line.split(",")[0].strip()).stem for line in lines if line.strip()]


def apply_split_lists(
    index: TileIndex, split_files: Mapping[str, str] | None = None, exclude_files: Sequence[str] | None = None
) -> TileIndex:
    """Give samples the split their list names and drop the excluded ones.

    With ``split_files`` (``{train: path, val: path, test: path}``, any of them), samples in
    no list are left out, as in the official protocols; listed names missing from the data
    are counted in the log (a partial copy still runs). A name in two lists is an error.
    """
    keep = np.ones(len(index), bool)
    names = [sample_name(s) for s in index.sources]
    for path in exclude_files or []:
        excluded = set(read_name_list(path))
        hit = np.asarray([n in excluded for n in names], bool)
        log.info("%s: %d of %d samples excluded", path, int((hit & keep).sum()), len(index))
        keep &= ~hit
    splits = list(index.splits)
    if split_files:
        unknown = set(split_files) - set(SPLITS)
        if unknown:
            raise DatasetError(f"split lists are for {list(SPLITS)}, not {sorted(unknown)}")
        lookup = {n: i for i, n in enumerate(names)}
        given: dict[int, str] = {}
        owner: dict[str, str] = {}
        for split, path in split_files.items():
            listed = read_name_list(path)
            for name in listed:
                if name in owner and owner[name] != str(path):
                    raise DatasetError(f"{path}: {name} is also listed in {owner[name]}")
                owner[name] = str(path)
            rows = [lookup[n] for n in listed if n in lookup]
            if len(rows) < len(listed):
                absent = next(n for n in listed if n not in lookup)
                log.warning("%s: %d of %d listed samples are not in the data (e.g. %s)", path, len(listed) - len(rows), len(listed), absent)
            given.update((r, split) for r in rows)
        unlisted = int(sum(1 for i in range(len(index)) if keep[i] and i not in given))
        if unlisted:
            log.info("%d samples are in no split list and are left out", unlisted)
        keep &= np.asarray([i in given for i in range(len(index))], bool)
        splits = [given.get(i) for i in range(len(index))]
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise DatasetError(f"{index.sources[0] if index.sources else 'the data'}: no sample left after the split/exclusion lists")
    return index.select(rows.tolist(), [splits[i] for i in rows])


__all__ = ["apply_split_lists", "read_name_list", "sample_name"]
