"""Two-date samples: a pair of co-registered tiles of one place read as one early-fused image.

Band ``B04`` of the first date is ``B04@t0``, of the second ``B04@t1``; those names travel in the
checkpoint's input contract, so evaluation and prediction take each date's bands by name and
refuse a pair given in the wrong order or with other bands. Everything a layout does (reading,
nodata, band count, header) is answered per pair by :class:`PairLayout`, so both heads, batch
weighting, splits and packs see an ordinary ``2N``-band dataset. Change maps of two scenes are
``deforest.mapping.change``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rasterio.errors import RasterioError

from deforest.core.errors import DatasetError, TileError
from deforest.core.vocabulary import SPLITS
from deforest.data.io import open_raster, read_header, read_tile
from deforest.data.layouts import ManifestLayout

#: joins a pair's two tile paths into one sample source (refused inside a path)
PAIR_SEP = "|"
#: joins a band name and its date: ``B04@t0``
DATE_SEP = "@"
#: the dates of a pair, in stacking order (before, after)
DATES = ("t0", "t1")
PAIR_COLUMNS = ("before", "after", "labels")


def dated_band_names(names: Sequence[str | None] | None, dates: Sequence[str] = DATES) -> list[str] | None:
    """``[B02@t0, B03@t0, ..., B02@t1, B03@t1, ...]``; ``None`` unless every band has a name."""
    if not names or not all(names):
        return None
    return [f"{name}{DATE_SEP}{date}" for date in dates for name in names]


def is_dated(names: Sequence[str] | None) -> bool:
    """Whether band names carry a date (a checkpoint trained on pairs)."""
    return bool(names) and all(DATE_SEP in name for name in names)


def date_band_positions(names: Sequence[str] | None) -> list[list[int]]:
    """Per date (``t0``, ``t1``), the positions of its bands among ``names``, in their order:
    how a siamese network (``model.fusion=siamese``) takes the dates apart. Its one backbone
    sees each date in turn, so both dates must hold the same bands in the same order; a
    :class:`ValueError` says what is missing."""
    if not names:
        raise ValueError("model.fusion=siamese needs two-date samples (data=pairs): the data's bands have no names, "
                         f"so no dates (a pair's bands are named B04{DATE_SEP}t0, B04{DATE_SEP}t1)")
    if not is_dated(names):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"model.fusion=siamese needs two-date samples (data=pairs): the bands [{shown}] carry no "
                         f"date (a pair's bands are named B04{DATE_SEP}t0, B04{DATE_SEP}t1)")
    split = [name.rsplit(DATE_SEP, 1) for name in names]
    positions = [[i for i, (_, d) in enumerate(split) if d == date] for date in DATES]
    bands = [[split[i][0] for i in chosen] for chosen in positions]
    if bands[0] != bands[1] or not bands[0] or len(names) != sum(map(len, positions)):
        first, second = (", ".join(b) for b in bands)
        raise ValueError(f"model.fusion=siamese needs the same bands of each date in the same order: {DATES[0]} has "
                         f"[{first}], {DATES[1]} [{second}] (data.bands and model.network_exclude_bands select them)")
    return positions


# ---- two-date samples ------------------------------------------------------------------------
class PairLayout(ManifestLayout):
    """``pairs.csv`` with ``before`` and ``after`` tile paths (relative to ``root``), space-separated
    ``labels`` and an optional ``split``; other columns (``deforest-tile``'s bounds and crs) are
    kept as per-sample metadata, so spatial splits work as for single tiles.

    A sample is both tiles stacked (``before`` bands first). Both must be on one grid (size,
    band count, CRS, transform): checked per pair from the headers when indexing. ``band_names``
    are the names of one date's bands (``null``: the files' band descriptions); the layout's
    own :attr:`band_names` carry the date (``B04@t0``), so ``data.bands`` selects by dated name.
    """

    def __init__(
        self, root: str | Path, manifest: str = "pairs.csv", band_names: Sequence[str] | None = None, **options
    ) -> None:
        # options: ManifestLayout's (task, class_names, allow_outside_root, label_separator)
        super().__init__(root, manifest, band_names=None, **options)
        self.date_band_names = list(band_names) if band_names else None

    def build_index(self):
        index = super().build_index()
        names = self.date_band_names
        if names is None and len(index):
            try:  # the files' own descriptions, when every band has one
                names = list(read_header(self.header_source(index.sources[0])).descriptions)
            except TileError:
                names = None  # an unreadable first tile is named where the datamodule reads it
        self.band_names = dated_band_names(names)
        return index

    def pair_files(self, source: str) -> tuple[str, str]:
        """The ``before`` and ``after`` files of a sample source."""
        before, after = source.split(PAIR_SEP, 1)
        return before, str(self.root / after)

    def read(self, source: str, bands: Sequence[int] | None) -> np.ndarray:
        return self.read_with_nodata(source, bands)[0]

    def read_with_nodata(
        self, source: str, bands: Sequence[int] | None, native: bool = False
    ) -> tuple[np.ndarray, list[float | None]]:
        """Both dates stacked, each band with the nodata value its own file declares."""
        before, after = self.pair_files(source)
        first, first_nodata = read_tile(before, None, native=native)
        second, second_nodata = read_tile(after, None, native=native)
        if second.shape != first.shape:
            raise TileError(
                after,
                f"is {second.shape[0]} bands of {second.shape[1]}x{second.shape[2]}, its before tile {before} "
                f"{first.shape[0]} bands of {first.shape[1]}x{first.shape[2]}: the two dates must match",
            )
        image, nodata = np.concatenate([first, second]), first_nodata + second_nodata
        if bands is None:
            return image, nodata
        chosen = [b - 1 for b in bands]
        return image[chosen], [nodata[i] for i in chosen]

    def header_source(self, source: str) -> str:
        return self.pair_files(source)[0]

    def band_count(self, header_count: int) -> int:
        return len(DATES) * header_count

    def stamp_files(self, source: str) -> list[str]:
        return list(self.pair_files(source))  # a new after tile must renew the cached statistics

    def source_files(self, source: str) -> list[str]:
        return list(self.pair_files(source))  # a pack re-checks both dates

    def _rows(self) -> list[dict[str, str]]:
        """The manifest's rows as :class:`ManifestLayout` reads them: ``path`` is the pair
        (``before|after``), every file checked to exist and each pair to share one grid."""
        reader = self._reader()
        columns = set(reader.fieldnames or [])
        missing = set(PAIR_COLUMNS) - columns
        if missing:
            also = " (a pair manifest names the two dates' tiles, not one 'path')" if "path" in columns else ""
            raise DatasetError(f"{self.manifest}: missing column(s) {sorted(missing)}{also}")
        rows = list(reader)
        if not rows:
            raise DatasetError(f"{self.manifest}: no rows")
        seen: dict[tuple[str, str], int] = {}
        out = []
        for row_no, row in enumerate(rows, start=2):
            where = f"{self.manifest}, line {row_no}"
            if None in row:  # csv puts values beyond the header's columns under the key None
                raise DatasetError(f"{where}: {len(row[None])} more value(s) than the header's columns {reader.fieldnames}")
            absent = [c for c in PAIR_COLUMNS if row.get(c) is None]
            if absent:
                raise DatasetError(f"{where}: no {' and no '.join(map(repr, absent))} value (fewer columns than the header)")
            files = []
            for column in ("before", "after"):
                path = row[column]
                if not path.strip():
                    raise DatasetError(f"{where}: empty {column!r}")
                if PAIR_SEP in path:
                    raise DatasetError(f"{where}: {column} path {path!r} contains {PAIR_SEP!r}, which joins a pair's two paths")
                self.check_inside_root(where, path)
                file = self.root / path
                if not file.is_file():
                    state = f"is a dangling symlink (to {os.readlink(file)})" if file.is_symlink() else "does not exist"
                    raise DatasetError(f"{where}: {column} file {file} {state}")
                files.append(file)
            key = tuple(os.path.normcase(os.path.realpath(f)) for f in files)
            if key[0] == key[1]:
                raise DatasetError(f"{where}: before and after are the same file ({key[0]}): a pair needs two dates")
            if key in seen:
                raise DatasetError(f"{where}: the same pair as line {seen[key]}")
            seen[key] = row_no
            split = row.get("split") or None
            if split is not None and split not in SPLITS:
                raise DatasetError(f"{where}: split {split!r} not in {SPLITS}")
            _check_same_grid(where, *files)
            pair = {"path": f"{row['before']}{PAIR_SEP}{row['after']}"}
            out.append(pair | {k: v for k, v in row.items() if k not in ("before", "after")})
        return out


def _check_same_grid(where: str, before: Path, after: Path) -> None:
    """Early fusion compares pixels: the two dates must be co-registered (same grid)."""
    try:
        with open_raster(before) as first, open_raster(after) as second:
            a = (first.width, first.height, first.count, first.crs, first.transform)
            b = (second.width, second.height, second.count, second.crs, second.transform)
    except (RasterioError, OSError):
        return  # an unreadable file is named, with its problem, where it is read
    if a != b:
        raise DatasetError(
            f"{where}: after {after} is not on the grid of before {before} ({b[0]}x{b[1]}, {b[2]} bands, {b[3]}, "
            f"{tuple(b[4])[:6]} vs {a[0]}x{a[1]}, {a[2]} bands, {a[3]}, {tuple(a[4])[:6]}): co-register the dates first"
        )


__all__ = ["DATES", "DATE_SEP", "PAIR_COLUMNS", "PAIR_SEP", "PairLayout", "date_band_positions", "dated_band_names", "is_dated"]
