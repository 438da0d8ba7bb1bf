"""Bad tiles: what makes a tile unusable, and the ``data.on_bad_tile`` policy for them.

A bad tile either stops the run with a :class:`TileError` naming the file (``error``, the
default) or is left out, logged and counted (``skip``). Faults found while loading batches
travel back from the DataLoader workers as data and are raised or counted in the main
process, so users never see a worker traceback.

Nodata rule: a tile whose pixels are all nodata is a bad tile; nodata pixels of a partly
covered tile are filled with the training mean of their band, which is 0 after
normalisation, so they carry no signal. A tile of one value in every band that declares no
nodata is counted in a warning, and is a bad tile under ``validate=full`` (:func:`constant_tile`).

Band order: tiles that name their bands are read in the dataset's order by name (:func:`band_order`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np

from deforest.core.bands import canonical_band, match_band_names
from deforest.core.errors import TileError
from deforest.core.vocabulary import POLICIES

# torch is imported where a batch is built, not here: the nodata rules below serve the
# torch-free prediction path (deforest.mapping.sliding, deforest-predict on an ONNX model) too
from deforest.data.io import SUPPORTED_DTYPES, RasterHeader

log = logging.getLogger(__name__)



class BadTiles:
    """Raises or records bad tiles according to ``data.on_bad_tile``."""

    def __init__(self, policy: str = "error") -> None:
        if policy not in POLICIES:
            raise ValueError(f"data.on_bad_tile must be error or skip, not {policy!r}")
        self.policy = policy
        self.problems: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.problems)

    def add(self, err: TileError, source: str | None = None, more: int = 0, rank: int | None = None,
            quiet: bool = False) -> None:
        """Stop on ``err`` (``error``) or remember ``source`` as skipped (``skip``).

        ``more``: how many other bad tiles the same pass found (named in the error).
        ``rank``: every DDP rank raises this same error together (:meth:`shared`); the error
        carries this rank as ``ddp_rank``, and the command line prints rank 0's only.
        ``quiet``: another rank found the tile and logged it; only remember it.
        """
        if self.policy == "error":
            others = f"; {more} other bad tile(s) found too" if more else ""
            error = TileError(err.path, f"{err.problem} (data.on_bad_tile=skip leaves bad tiles out{others})")
            if rank is not None:
                error.ddp_rank = rank
            raise error
        source = source or err.path
        if source not in self.problems:
            if not quiet:
                log.warning("skipping bad tile %s", err)
            self.problems[source] = str(err)

    @staticmethod
    def shared(found: list[tuple[str, str, str]], group=None) -> list[tuple[str, str, str]]:
        """Under DDP: every rank's bad tiles of this batch, in rank order, the same list on every
        rank (each rank calls this once per batch, so the calls pair up).

        A bad tile found when its pixels are read is found by the one rank that reads it; if that
        rank alone raised, the others would wait in the step's next collective (with NCCL until
        the process-group timeout). One small host-side all-reduce per batch tells every rank
        whether any rank found one; only then are the lists exchanged.
        """
        import torch
        import torch.distributed as dist

        count = torch.tensor([len(found)], dtype=torch.int64)
        dist.all_reduce(count, group=group)
        if not int(count):
            return []
        lists: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(lists, list(found), group=group)
        return list(dict.fromkeys(tuple(bad) for share in lists for bad in share))  # a tile two ranks read: once


#: pixel sizes within this relative difference are one resolution (EuroSAT's 10 m tiles measure
#: 9.97 to 10.03 m in their UTM zones); 20 m or 60 m among 10 m tiles are far outside it
PIXEL_SIZE_TOLERANCE = 0.1


def reference_header(headers: Sequence[RasterHeader]) -> RasterHeader:
    """What the dataset's tiles are: the most common band count, size and dtype among
    ``headers``, with the most common pixel size among those that have one.

    CRSs are not compared: a dataset may span UTM zones (EuroSAT spans eight).
    """
    shapes = Counter((h.count, h.height, h.width, h.dtype) for h in headers)
    common = shapes.most_common(1)[0][0]
    reference = next(h for h in headers if (h.count, h.height, h.width, h.dtype) == common)
    sizes = Counter(round(h.pixel_size, 1) for h in headers if h.pixel_size is not None)
    if not sizes:
        return dataclasses.replace(reference, pixel_size=None)
    size = sizes.most_common(1)[0][0]
    chosen = next(h for h in headers if h.pixel_size is not None and round(h.pixel_size, 1) == size)
    return dataclasses.replace(reference, pixel_size=chosen.pixel_size, res=chosen.res, units=chosen.units)


def check_header(path: str, header: RasterHeader, reference: RasterHeader) -> None:
    """Raise :class:`TileError` when ``header`` does not fit the dataset's tiles."""
    if header.dtype not in SUPPORTED_DTYPES:
        raise TileError(path, f"has unsupported dtype {header.dtype} (supported: {sorted(SUPPORTED_DTYPES)})")
    if header.count != reference.count:
        raise TileError(path, f"has {header.count} bands, the dataset's tiles have {reference.count}")
    if (header.height, header.width) != (reference.height, reference.width):
        raise TileError(
            path,
            f"is {header.height}x{header.width} pixels, the dataset's tiles are {reference.height}x{reference.width}",
        )
    if header.dtype != reference.dtype:
        raise TileError(
            path, f"has dtype {header.dtype}, the dataset's tiles are {reference.dtype} (another product or processing level?)"
        )
    if header.pixel_size is not None and reference.pixel_size is not None:
        if abs(header.pixel_size - reference.pixel_size) > PIXEL_SIZE_TOLERANCE * reference.pixel_size:
            raise TileError(
                path,
                f"has {header.pixel_size:.3g} m pixels, the dataset's tiles have {reference.pixel_size:.3g} m "
                f"(another resolution: resample it to the dataset's grid)",
            )


def dataset_band_names(reference: RasterHeader, configured: Sequence[str] | None, count: int) -> list[str] | None:
    """The names of the dataset's ``count`` bands, in the dataset's order: the reference tile's
    descriptions when it names every band, else the data config's names when they fit the count,
    else ``None`` (the bands have no names; tiles are read by position)."""
    described = reference.descriptions
    if len(described) == count and all(described):
        return list(described)
    if not configured or len(configured) != count:
        return None
    return list(configured)


def band_order(path: str, header: RasterHeader, names: Sequence[str] | None) -> list[int] | None:
    """The 1-based bands of the tile at ``path`` that hold ``names`` (the dataset's names, in the
    dataset's order), matched by :func:`~deforest.data.io.canonical_band` as prediction matches a
    scene's bands; ``None`` where position decides: the tile does not name every band, or it or
    the dataset repeats a name. Tiles of one dataset may store their bands in different orders,
    and the first tile's order read for all would shuffle the others' bands.

    Raises :class:`TileError` when the tile names its bands but one of ``names`` is not among them.
    """
    described = header.descriptions
    if not names or len(described) != header.count or not all(described):
        return None
    if tuple(described) == tuple(names):  # the common case, without a regex per band
        return None if len(set(names)) != len(names) else list(range(1, len(names) + 1))
    if len({canonical_band(name) for name in names}) != len(names):
        return None
    # the tile's names that repeat tell no order (possible for a subset of names only): None
    positions, missing = match_band_names(names, described)
    if missing:
        raise TileError(path, f"has no band {missing[0]} (its bands: {', '.join(described)})")
    return positions


def constant_tile(image: np.ndarray, valid: np.ndarray | None) -> str | None:
    """What is wrong with a tile whose every band holds one value across the tile and that
    declares no nodata (``valid`` is ``None``); ``None``: nothing. Such a tile (an empty
    export, a fill never declared as nodata) carries no signal but trains as a real sample;
    a tile that declares nodata and holds only nodata is refused by :func:`check_pixels`."""
    if valid is not None or image.size == 0:
        return None
    flat = image.reshape(image.shape[0], -1)
    low = flat.min(axis=1)
    if (flat.max(axis=1) != low).any():
        return None
    if not low.any():
        return ("every pixel is 0 in every band and the file declares no nodata: declare its nodata "
                "(gdal_edit.py -a_nodata 0 FILE) or remove it")
    values = ", ".join(f"{v:g}" for v in low.tolist()[:13])
    return (f"every band holds one value across the tile ({values}) and the file declares no nodata: "
            "declare its nodata or remove it")


def check_pixels(source: str, image: np.ndarray, valid: np.ndarray | None) -> None:
    """All-nodata tiles and NaN/inf among the valid pixels are errors."""
    if valid is not None and not valid.any():
        raise TileError(source, "every pixel is nodata")
    if image.dtype.kind in "iu":  # integers are always finite
        return
    finite = np.isfinite(image) if valid is None else np.isfinite(image) | ~valid
    if not finite.all():
        raise TileError(source, f"contains {int((~finite).sum())} NaN or infinite pixel values")
