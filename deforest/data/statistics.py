"""Per-band statistics of the training tiles, and the JSON cache that spares re-reading them.

Measuring reads every (sampled) training tile once; the result depends only on the file
list, the bands and the normalisation settings, so it is cached under a key made of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deforest.core.errors import TileError
from deforest.core.outputs import write_text_output

log = logging.getLogger(__name__)

# 3: per-tile nodata, dtype and pixel-size header checks
STATS_VERSION = 3


class JsonCache:
    """Small JSON results in ``folder``, one file per ``kind`` and key; ``None`` folder: off."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder).expanduser() if folder else None

    @staticmethod
    def key(kind: str, payload: Mapping[str, Any]) -> str:
        """A short hash of what the result depends on."""
        data = {"version": STATS_VERSION, "kind": kind, **payload}
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:24]

    def path(self, kind: str, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{kind}-{key}.json"

    def load(self, kind: str, key: str, check: Callable[[object], str | None]) -> dict | None:
        """The cached value, or None to recompute: when there is none, and (with a warning naming
        the file) when it is unreadable or ``check`` finds it malformed (then it is rewritten)."""
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            problem = check(value)
        except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
            problem = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if problem is None:
            return value
        log.warning("%s cache %s is corrupt (%s): recomputing it", kind, path, problem)
        return None

    def store(self, kind: str, key: str, value: dict) -> None:
        """Write through a unique temporary file: DDP ranks and parallel jobs computing the same
        entry at once never interleave their writes (the last complete one wins)."""
        path = self.path(kind, key)
        if path is None:
            return
        write_text_output(path, json.dumps(value))


def measure_band_statistics(
    read_valid: Callable[[int], tuple[np.ndarray, np.ndarray | None]],
    count: int,
    num_bands: int,
    log_scale: bool,
    on_bad: Callable[[TileError, int], None],
    on_tile: Callable[[np.ndarray, np.ndarray | None], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Mean/std per band over the valid pixels of tiles ``0..count-1`` (``log1p`` values when
    ``log_scale``); a tile that fails to read goes to ``on_bad`` and is left out. ``on_tile``
    sees each tile's raw values and valid mask in the same pass (the contract's value range)."""
    total = np.zeros(num_bands)
    total_sq = np.zeros(num_bands)
    n = np.zeros(num_bands)
    for i in range(count):
        try:
            image, valid = read_valid(i)
        except TileError as err:
            on_bad(err, i)
            continue
        if on_tile is not None:
            on_tile(image, valid)
        image = image.astype(np.float64)
        if log_scale:
            image = np.log1p(np.clip(image, 0, None))
        if valid is not None:
            image = np.where(valid, image, 0.0)
        total += image.sum(axis=(1, 2))
        total_sq += (image**2).sum(axis=(1, 2))
        n += valid.sum(axis=(1, 2)) if valid is not None else image.shape[1] * image.shape[2]
    return moments(n, total, total_sq)


def moments(n: np.ndarray, total: np.ndarray, total_sq: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-band mean/std from valid-pixel counts, sums and sums of squares (a pack stores
    these per tile, so its statistics need no pixel pass)."""
    n = np.maximum(n, 1)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # constant bands: centre, do not blow up
    return mean.tolist(), std.tolist()


def sample_rows(rows: Sequence[int], max_samples: int, seed: int) -> list[int]:
    """At most ``max_samples`` of ``rows`` (a seeded sample, in order)."""
    if len(rows) <= max_samples:
        return list(rows)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(list(rows), max_samples, replace=False).tolist())
