"""Tile dataset layouts: turn a folder on disk into an index of samples, labels and splits.

A layout only lists files and labels (no pixel is read here), so indexing 27,000 EuroSAT
tiles or 590,000 BigEarthNet patches stays cheap; :meth:`TileLayout.read` reads one sample.
The BigEarthNet layout is in :mod:`deforest.data.bigearthnet`; official split and exclusion
lists are applied by :mod:`deforest.data.split_lists`.
"""

from __future__ import annotations

import csv
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deforest.core.errors import DatasetError
from deforest.core.vocabulary import MULTICLASS, MULTILABEL, SPLITS, TIFF_SUFFIXES
from deforest.data.index import TileIndex
from deforest.data.io import read_header, read_raster, read_tile

log = logging.getLogger(__name__)



class TileLayout(ABC):
    """A way of storing labelled tiles on disk."""

    #: Names of the bands as stored, when the layout knows them (used to select by name).
    band_names: list[str] | None = None

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(
                f"data.root {self.root} is not a directory: give data.root=DIR, or set DEFOREST_DATA_DIR to "
                "the folder that holds the shipped data (a clone's data/)"
            )

    @abstractmethod
    def build_index(self) -> TileIndex:
        """List the samples, labels and given splits."""

    def read(self, source: str, bands: Sequence[int] | None) -> np.ndarray:
        """Read one sample as float32 ``[C, H, W]`` (``bands`` 1-based)."""
        return read_raster(source, bands)

    def read_with_nodata(
        self, source: str, bands: Sequence[int] | None, native: bool = False
    ) -> tuple[np.ndarray, list[float | None]]:
        """:meth:`read` and the nodata value each read band's own file declares (``None``: none).

        Every tile's own nodata counts, not the first tile's: tiles of one dataset may
        declare different values, or some none at all. ``native``: the stored dtype where
        the layout reads files itself (float32 otherwise).
        """
        if type(self).read is TileLayout.read:
            return read_tile(source, bands, native=native)  # one open for both
        image = self.read(source, bands)  # a layout with its own reader: its header tells the nodata
        values = read_header(self.header_source(source)).nodatavals
        chosen = list(bands) if bands is not None else list(range(1, image.shape[0] + 1))
        return image, [values[b - 1] if b - 1 < len(values) else None for b in chosen]

    def header_source(self, source: str) -> str:
        """The file whose header describes ``source`` (its band count and size)."""
        return source

    def band_count(self, header_count: int) -> int:
        """Bands of one sample, given the band count of its :meth:`header_source` file."""
        return header_count

    def source_files(self, source: str) -> list[str]:
        """Every file one sample is read from: the tile, or every file of a patch folder
        (a layout that stacks files of several folders names them all). A pack keys its
        rows on these files' names, sizes and mtimes."""
        path = Path(source)
        if path.is_dir():
            return sorted(str(p) for p in path.iterdir() if p.is_file())
        return [source]

    def stamp_files(self, source: str) -> list[str]:
        """The files whose name, size and mtime key the cached headers and statistics of
        ``source``: its header file (a layout that stacks several files names them all)."""
        return [self.header_source(source)]


def _tiles_in(folder: Path) -> list[Path]:
    """The folder's tiles, dangling symlinks included: they are bad tiles that must be named,
    not files to pass over without a word."""
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in TIFF_SUFFIXES and (p.is_file() or (p.is_symlink() and not p.exists()))
    )


def _same_file_twice(sources: Sequence[str]) -> tuple[int, int] | None:
    """The first pair of positions whose paths name one file (symlinks, ``./``, ``//``, ``..``)."""
    seen: dict[str, int] = {}
    for i, source in enumerate(sources):
        key = os.path.normcase(os.path.realpath(source))
        if key in seen:
            return seen[key], i
        seen[key] = i
    return None


class FolderLayout(TileLayout):
    """One sub-folder per class (EuroSAT), optionally inside ``train/``, ``val/``, ``test/``."""

    def __init__(self, root: str | Path, band_names: Sequence[str] | None = None) -> None:
        super().__init__(root)
        self.band_names = list(band_names) if band_names else None

    def build_index(self) -> TileIndex:
        split_dirs = [s for s in SPLITS if (self.root / s).is_dir()]
        groups = [(s, self.root / s) for s in split_dirs] or [(None, self.root)]
        class_names = sorted(
            {d.name for _, g in groups for d in g.iterdir() if d.is_dir() and not d.name.startswith(".")}
        )
        if not class_names:
            raise DatasetError(f"{self.root}: no class sub-folders found (expected <class>/*.tif)")
        sources, targets, splits = [], [], []
        for split, group in groups:
            for label, name in enumerate(class_names):
                folder = group / name
                if not folder.is_dir():
                    continue
                tiles = _tiles_in(folder)
                if not tiles:
                    raise DatasetError(f"{folder}: class folder holds no .tif tiles")
                sources += [str(t) for t in tiles]
                targets += [label] * len(tiles)
                splits += [split] * len(tiles)
        twice = _same_file_twice(sources)
        if twice is not None:
            first, second = twice
            raise DatasetError(
                f"{sources[second]} is the same file as {sources[first]} (classes {class_names[targets[second]]} "
                f"and {class_names[targets[first]]}): a tile can be in one class folder and one split only"
            )
        return TileIndex(MULTICLASS, class_names, sources, np.asarray(targets, np.int64), splits)


class ManifestLayout(TileLayout):
    """``labels.csv`` with ``path`` and space-separated ``labels`` (and optional ``split``)."""

    def __init__(
        self,
        root: str | Path,
        manifest: str = "labels.csv",
        task: str | None = None,
        class_names: Sequence[str] | None = None,
        band_names: Sequence[str] | None = None,
        allow_outside_root: bool = False,
        label_separator: str | None = None,
    ) -> None:
        super().__init__(root)
        self.manifest = self.root / manifest
        self.task = task
        self.class_names = list(class_names) if class_names else None
        self.band_names = list(band_names) if band_names else None
        self.allow_outside_root = bool(allow_outside_root)
        if label_separator is not None and not str(label_separator).strip():
            raise DatasetError(f"data.layout.label_separator={label_separator!r}: give a character such as ',' or '|' "
                               f"(null: labels separated by spaces)")
        self.label_separator = None if label_separator is None else str(label_separator)

    def split_labels(self, value: str) -> list[str]:
        """A row's ``labels`` value as tags: split at ``label_separator`` (stripped), or at spaces."""
        if self.label_separator is None:
            return value.split()
        return [tag.strip() for tag in value.split(self.label_separator) if tag.strip()]

    def check_inside_root(self, where: str, path: str) -> None:
        """Refuse a row's ``path`` that leads out of ``root`` (``../x.tif``, an absolute path
        elsewhere): a manifest describes the tiles of its folder, and evaluation, packing and
        spatial splits treat paths outside it differently from the rest."""
        if self.allow_outside_root:
            return
        root = os.path.abspath(self.root)
        full = os.path.normpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise DatasetError(f"{where}: {path} is outside data.root {self.root} (give paths relative to data.root, "
                               f"or set data.layout.allow_outside_root=true)")

    def build_index(self) -> TileIndex:
        rows = self._rows()
        tags = [self.split_labels(row["labels"]) for row in rows]
        for row_no, row_tags in enumerate(tags, start=2):
            if not row_tags:
                raise DatasetError(f"{self.manifest}, line {row_no}: empty 'labels'")
        separated = "space" if self.label_separator is None else repr(self.label_separator)
        if self.task:
            task, why = self.task, "set by data.layout.task"
        elif any(len(t) > 1 for t in tags):
            task, why = MULTILABEL, f"rows carry several {separated}-separated labels"
        else:
            task, why = MULTICLASS, "one label per row"
        class_names = self.class_names or sorted({t for row_tags in tags for t in row_tags})
        _log_once(logging.INFO, f"{self.manifest}: task {task} ({why}): {len(class_names)} classes")
        phrases = split_class_names(tags) if not self.task and self.label_separator is None else None
        if task == MULTILABEL and phrases:
            listed = ", ".join(f"'{p}' ({n} row{'s' if n > 1 else ''})" for p, n in phrases)
            _log_once(
                logging.WARNING,
                f"{self.manifest}: the labels {listed} look like class names split by a space, which makes the task "
                f"multi-label with {len(class_names)} classes: write each class name as one word (e.g. "
                f"{phrases[0][0].replace(' ', '_')}), or set data.layout.task=multiclass data.layout.label_separator=',' "
                f"(labels then separated by ',', quoted in the CSV)",
            )
        lookup = {name: i for i, name in enumerate(class_names)}
        for row_no, row_tags in enumerate(tags, start=2):
            unknown = [t for t in row_tags if t not in lookup]
            if unknown:
                raise DatasetError(
                    f"{self.manifest}, line {row_no}: unknown label(s) {unknown}; "
                    f"known: {class_names}"
                )
        if task == MULTICLASS:
            if any(len(t) != 1 for t in tags):
                raise DatasetError(f"{self.manifest}: task=multiclass but a row has several labels")
            targets = np.asarray([lookup[t[0]] for t in tags], np.int64)
        else:
            targets = np.zeros((len(rows), len(class_names)), np.uint8)
            for i, row_tags in enumerate(tags):
                targets[i, [lookup[t] for t in row_tags]] = 1
        sources = [str(self.root / row["path"]) for row in rows]
        splits = [row.get("split") or None for row in rows]
        extra = [c for c in rows[0] if c not in ("path", "labels", "split")]
        meta = {c: [row[c] for row in rows] for c in extra}
        return TileIndex(task, class_names, sources, targets, splits, meta)

    def _reader(self) -> csv.DictReader:
        """The manifest as CSV rows; a missing or non-UTF-8 manifest is named as such."""
        if not self.manifest.is_file():
            raise DatasetError(f"{self.manifest}: manifest not found")
        try:
            text = self.manifest.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DatasetError(f"{self.manifest}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        return csv.DictReader(text.splitlines())

    def _rows(self) -> list[dict[str, str]]:
        reader = self._reader()
        missing = {"path", "labels"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{self.manifest}: missing column(s) {sorted(missing)}")
        rows = list(reader)
        if not rows:
            raise DatasetError(f"{self.manifest}: no rows")
        seen: dict[str, tuple[int, str]] = {}
        for row_no, row in enumerate(rows, start=2):
            if None in row:  # csv puts values beyond the header's columns under the key None
                raise DatasetError(
                    f"{self.manifest}, line {row_no}: {len(row[None])} more value(s) than the header's columns "
                    f"{reader.fieldnames} (an unquoted comma?)"
                )
            absent = [c for c in ("path", "labels") if row.get(c) is None]
            if absent:
                raise DatasetError(
                    f"{self.manifest}, line {row_no}: no {' and no '.join(repr(c) for c in absent)} value "
                    f"(the row has fewer columns than the header {reader.fieldnames})"
                )
            path = row["path"]
            if not path.strip():
                raise DatasetError(f"{self.manifest}, line {row_no}: empty 'path'")
            self.check_inside_root(f"{self.manifest}, line {row_no}", path)
            # ./tiles//x.tif, tiles/x.tif, /abs/.../tiles/x.tif and symlinks to it are one tile
            key = os.path.normcase(os.path.realpath(self.root / path))
            if key in seen:
                line, spelling = seen[key]
                same = "duplicate of" if spelling == path else f"{path} is the same file as {spelling} on"
                raise DatasetError(f"{self.manifest}, line {row_no}: {same} line {line} ({key})")
            seen[key] = (row_no, path)
            if not (self.root / path).is_file():
                if (self.root / path).is_symlink():
                    raise DatasetError(
                        f"{self.manifest}, line {row_no}: file {self.root / path} is a dangling symlink "
                        f"(to {os.readlink(self.root / path)})"
                    )
                raise DatasetError(f"{self.manifest}, line {row_no}: file {self.root / path} does not exist")
            split = row.get("split") or None
            if split is not None and split not in SPLITS:
                raise DatasetError(f"{self.manifest}, line {row_no}: split {split!r} not in {SPLITS}")
        return rows


_logged: set[tuple[int, str]] = set()


def _log_once(level: int, message: str) -> None:
    """Log ``message`` the first time only: the index is built for each stage and each process."""
    if (level, message) not in _logged:
        _logged.add((level, message))
        log.log(level, message)


def split_class_names(tags: Sequence[Sequence[str]]) -> list[tuple[str, int]] | None:
    """The multi-word phrases (and their row counts) when every row with several tags reads as
    one class name split at its spaces; ``None`` when the rows look truly multi-label.

    A row reads as one split name when each of its tags but the last is *bound*: always followed
    by the same tag and never a row's last (or only) tag (``Annual`` in ``Annual Crop``). Real
    multi-label rows (``forest water``, ``forest``, ``crops water``) end with varying tags and
    pair them with varying neighbours, so some tag in them is free.
    """
    followers: dict[str, set[str]] = {}
    ends: set[str] = set()
    for row in tags:
        for tag, after in zip(row, row[1:]):
            followers.setdefault(tag, set()).add(after)
        if row:
            ends.add(row[-1])
    bound = {tag for tag, after in followers.items() if len(after) == 1 and tag not in ends}
    multi = [row for row in tags if len(row) > 1]
    if not multi or not all(all(tag in bound for tag in row[:-1]) for row in multi):
        return None
    counts: dict[str, int] = {}
    for row in multi:
        counts[" ".join(row)] = counts.get(" ".join(row), 0) + 1
    return sorted(counts.items())


__all__ = [
    "FolderLayout",
    "ManifestLayout",
    "TileLayout",
]
