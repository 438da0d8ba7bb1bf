"""The sampling design: how many reference points each map class gets, and where they fall.

:func:`allocate` sizes the strata (Olofsson et al. 2014; Cochran 1977),
:func:`draw_sample` draws a seeded stratified random sample of pixel centres, and
:func:`write_sample` writes it for labelling (GeoPackage and CSV) with
:func:`sample_markdown` describing the design.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio.transform
import shapely

from deforest.core.errors import ConfigError
from deforest.mapping.strata import MapStrata, map_blocks, open_map, read_classes

ALLOCATIONS = ("proportional", "equal", "neyman")


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """``total`` split by ``shares`` into integers that add up to ``total``."""
    if total <= 0 or shares.sum() <= 0:
        return np.zeros(len(shares), dtype=np.int64)
    exact = total * shares / shares.sum()
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - int(out.sum())]] += 1
    return out


def allocate(
    n: int | None,
    pixels: np.ndarray,
    names: Sequence[str],
    allocation: str | Mapping = "proportional",
    min_per_class: int = 0,
    expected_accuracy: float | Mapping | None = None,
) -> np.ndarray:
    """Sample size of each stratum (map class).

    ``proportional`` (to mapped area), ``equal``, ``neyman`` (to ``W_h S_h`` with
    ``S_h = sqrt(U_h (1 - U_h))`` from the expected user's accuracies, Cochran 1977 and
    Olofsson et al. eq. 13), or a mapping of class name -> count. ``min_per_class`` then
    raises every stratum below it (Olofsson et al.: 50-100 units in rare classes) and takes
    the units from the others by the same rule. No stratum gets more units than pixels.
    """
    pixels = np.asarray(pixels, dtype=np.int64)
    names = list(names)
    if isinstance(allocation, Mapping):
        given = {str(k): v for k, v in allocation.items()}
        missing = [nm for nm, p in zip(names, pixels) if p > 0 and nm not in given]
        extra = sorted(set(given) - set(names))
        if missing or extra:
            raise ConfigError(f"allocation counts must name every mapped class {[nm for nm, p in zip(names, pixels) if p > 0]}"
                              f"{'; missing ' + str(missing) if missing else ''}{'; unknown ' + str(extra) if extra else ''}")
        counts = np.asarray([int(given.get(nm, 0)) for nm in names], dtype=np.int64)
        if (counts < 0).any():
            raise ConfigError("allocation counts must be non-negative")
        too_many = [nm for nm, c, p in zip(names, counts, pixels) if c > p]
        if too_many:
            raise ConfigError(f"allocation asks for more points than pixels in {too_many}")
        if n is not None and int(n) != int(counts.sum()):
            raise ConfigError(f"n={n} but the allocation counts add up to {int(counts.sum())} (leave n=null)")
        return counts
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation={allocation!r}: choose from {', '.join(ALLOCATIONS)} or give counts {{class: n, ...}}")
    if n is None or int(n) < 1:
        raise ConfigError(f"n={'null' if n is None else n}: give the total sample size n= (a positive integer)")
    n = int(n)
    mapped = pixels > 0
    if n > pixels.sum():
        raise ConfigError(f"n={n} is more than the map's {int(pixels.sum())} classified pixels")
    if allocation == "proportional":
        base = pixels.astype(float)
    elif allocation == "equal":
        base = mapped.astype(float)
    else:
        if expected_accuracy is None:
            raise ConfigError("allocation=neyman needs expected_accuracy= (one user's accuracy, or {class: accuracy, ...})")
        if isinstance(expected_accuracy, Mapping):
            acc = {str(k): float(v) for k, v in expected_accuracy.items()}
            missing = [nm for nm, m in zip(names, mapped) if m and nm not in acc]
            if missing:
                raise ConfigError(f"expected_accuracy names no accuracy for {missing}")
            u = np.asarray([acc.get(nm, 0.5) for nm in names])
        else:
            u = np.full(len(names), float(expected_accuracy))
        if ((u <= 0) | (u >= 1))[mapped].any():
            raise ConfigError("expected_accuracy values must lie strictly between 0 and 1")
        base = pixels * np.sqrt(u * (1 - u))
    floor = np.minimum(int(min_per_class), pixels)
    fixed = np.zeros(len(pixels), dtype=bool)
    fixed_value = np.zeros(len(pixels), dtype=np.int64)
    while True:
        counts = np.where(fixed, fixed_value, 0)
        left = n - int(counts.sum())
        if left < 0:
            raise ConfigError(
                f"n={n} cannot give min_per_class={min_per_class} to each of {int(mapped.sum())} mapped classes"
            )
        free = mapped & ~fixed
        counts[free] = _largest_remainder(left, base[free])
        # a stratum under the floor gets the floor, one over its pixel count gets all its
        # pixels; the rest is shared again by the same rule
        low = free & (counts < floor)
        over = free & (counts > pixels)
        if not (low.any() or over.any()):
            return counts
        fixed_value[low], fixed_value[over] = floor[low], pixels[over]
        fixed |= low | over


def draw_sample(
    map_path: str | os.PathLike,
    counts: np.ndarray,
    strata: MapStrata,
    band: int = 1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stratified random sample of pixel centres: ``counts[h]`` distinct pixels of class
    ``strata.values[h]``, drawn without replacement with ``seed``. Returns ``(x, y, value)``
    in the map's CRS, ordered by class then raster order."""
    rng = np.random.default_rng(seed)
    # ranks of the chosen pixels among their class's pixels in raster order: two passes over
    # the map (counts, then positions) instead of holding every pixel index of a class
    ranks = [np.sort(rng.choice(int(p), size=int(c), replace=False)) if c else np.empty(0, np.int64)
             for p, c in zip(strata.pixels, counts)]
    seen = np.zeros(len(counts), dtype=np.int64)
    picked: list[list[np.ndarray]] = [[] for _ in counts]
    path = str(map_path)
    with open_map(path) as src:
        for top, window in map_blocks(src):
            data = read_classes(src, band, window, path)
            valid = ~np.ma.getmaskarray(data)
            flat = np.asarray(data).ravel()
            for h, value in enumerate(strata.values):
                if not counts[h]:
                    continue
                where = np.flatnonzero((flat == value) & valid.ravel())
                lo, hi = np.searchsorted(ranks[h], [seen[h], seen[h] + where.size])
                if hi > lo:
                    picked[h].append(where[ranks[h][lo:hi] - seen[h]] + top * src.width)
                seen[h] += where.size
        width, transform = src.width, src.transform
    index = np.concatenate([np.concatenate(p) if p else np.empty(0, np.int64) for p in picked])
    values = np.repeat(np.asarray(strata.values, dtype=np.int64), [sum(a.size for a in p) for p in picked])
    rows, cols = np.divmod(index, width)
    xs, ys = rasterio.transform.xy(transform, rows, cols, offset="center")
    return np.asarray(xs, float).reshape(-1), np.asarray(ys, float).reshape(-1), values


def write_sample(
    out_dir: str | os.PathLike,
    xs: np.ndarray,
    ys: np.ndarray,
    values: np.ndarray,
    strata: MapStrata,
    reference_field: str,
) -> tuple[Path, Path]:
    """``sample.gpkg`` (points in the map's CRS) and ``sample.csv``: ``sample_id``, ``map_value``,
    ``map_class`` and an empty ``reference_field`` for the user to fill in (in QGIS, say)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpkg, csv = out / "sample.gpkg", out / "sample.csv"
    ids = np.arange(1, len(xs) + 1, dtype=np.int64)
    names = np.asarray([strata.name_of(int(v)) for v in values], dtype=object)
    empty = np.full(len(xs), None, dtype=object)
    geometry = shapely.to_wkb(shapely.points(xs, ys))
    if gpkg.exists():
        gpkg.unlink()
    pyogrio.raw.write(
        gpkg, geometry=np.asarray(geometry, dtype=object), field_data=[ids, values, names, empty],
        fields=["sample_id", "map_value", "map_class", reference_field], geometry_type="Point",
        crs=strata.crs.to_wkt() if strata.crs is not None else None, driver="GPKG", layer="sample",
        dataset_options={}, layer_options={},
    )
    with csv.open("w") as fh:
        fh.write(f"sample_id,x,y,map_value,map_class,{reference_field}\n")
        for i, x, y, v, name in zip(ids, xs, ys, values, names):
            fh.write(f"{i},{x!r},{y!r},{int(v)},{_csv(name)},\n")
    return gpkg, csv


def _csv(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def sample_markdown(strata: MapStrata, counts: np.ndarray, allocation: object, seed: int, files: Sequence[Path]) -> str:
    """The sampling design as Markdown: strata, their areas and the units drawn in each."""
    total = strata.area_ha.sum()
    lines = [
        "# Stratified random sample (Olofsson et al. 2014)",
        "",
        f"- map: {strata.path}; pixel area: {strata.pixel_area_m2}; CRS: {strata.crs}",
        f"- allocation: {allocation}; seed: {seed}; sample: {int(counts.sum())} pixel centres",
        f"- files: {', '.join(str(f) for f in files)}",
        "",
        "| class | map value | pixels | mapped area (ha) | W | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, value, p, a, c in zip(strata.names, strata.values, strata.pixels, strata.area_ha, counts):
        lines.append(f"| {name} | {value} | {int(p)} | {a:,.1f} | {a / total:.4f} | {int(c)} |")
    lines.append(f"| total | | {int(strata.pixels.sum())} | {total:,.1f} | 1.0000 | {int(counts.sum())} |")
    return "\n".join(lines) + "\n"


__all__ = ["ALLOCATIONS", "allocate", "draw_sample", "sample_markdown", "write_sample"]
