"""Area of map classes from a probability sample of reference labels (Olofsson et al. 2014).

A classified map's pixel counts are biased estimates of class areas: every omission and
commission error moves area from one class to another. The accepted way to report the area
of a class such as forest loss is the stratified estimator of Olofsson et al. (2014, "Good
practices for estimating area and assessing accuracy of land change", Remote Sensing of
Environment 148:42-57): the map classes are the strata, a stratified random sample of pixels
is labelled from reference data (imagery better than the map's), and the error matrix of
sample counts ``n_ij`` (map class ``i``, reference class ``j``) becomes estimated area
proportions ``p_ij = W_i n_ij / n_i.`` with ``W_i`` the share of the mapped area in class ``i``.
Column sums are the error-adjusted area shares; standard errors follow from the stratified
design (their eqs. 2-10).

:func:`estimate_area` is that estimator, numpy in and :class:`AreaEstimate` out.
:func:`map_class_areas` measures the strata on a GeoTIFF (pixel areas from its CRS, nodata
left out), :func:`assess` samples the map at reference points and estimates, and
:func:`draw_sample` draws the stratified random sample a user then labels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import rasterio
import rasterio.transform
import rasterio.warp
import shapely
from affine import Affine
from pyogrio.errors import DataLayerError, DataSourceError, FieldError
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window

from deforest.config_checks import ConfigError
from deforest.geodesy import row_pixel_areas
from deforest.io import TileError

log = logging.getLogger(__name__)

#: two-sided 95% normal quantile, as in Olofsson et al. (2014)
Z95 = 1.96
M2_PER_HA = 10_000.0
ALLOCATIONS = ("proportional", "equal", "neyman")
#: pixels read at once when a map is scanned (a few tens of MB for any dtype)
BLOCK_PIXELS = 1 << 22


class AreaError(ValueError):
    """A sample the estimator cannot use (a mapped class without enough sample units)."""


@dataclass(frozen=True)
class AreaEstimate:
    """Olofsson et al. (2014) estimates; arrays are indexed by ``classes`` (rows: map, columns: reference)."""

    classes: list[str]
    counts: np.ndarray
    mapped_area_ha: np.ndarray
    weights: np.ndarray
    proportions: np.ndarray
    users: np.ndarray
    users_se: np.ndarray
    producers: np.ndarray
    producers_se: np.ndarray
    overall: float
    overall_se: float
    area_proportion: np.ndarray
    area_proportion_se: np.ndarray
    z: float = Z95
    info: dict = field(default_factory=dict)

    @property
    def total_area_ha(self) -> float:
        return float(self.mapped_area_ha.sum())

    @property
    def area_ha(self) -> np.ndarray:
        """Error-adjusted area of each reference class."""
        return self.area_proportion * self.total_area_ha

    @property
    def area_se_ha(self) -> np.ndarray:
        return self.area_proportion_se * self.total_area_ha

    @property
    def area_ci_ha(self) -> np.ndarray:
        """Half-width of the confidence interval (``z`` standard errors; 1.96: 95%)."""
        return self.z * self.area_se_ha

    def to_dict(self) -> dict:
        """JSON-ready: NaN (a producer's accuracy of a class the sample never found) becomes null."""

        def clean(values: np.ndarray) -> list:
            return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, float).ravel()]

        per_class = {}
        for k, name in enumerate(self.classes):
            per_class[name] = {
                "mapped_area_ha": float(self.mapped_area_ha[k]),
                "weight": float(self.weights[k]),
                "sample_count": int(self.counts[k].sum()),
                "users_accuracy": clean(self.users[k : k + 1])[0],
                "users_accuracy_se": clean(self.users_se[k : k + 1])[0],
                "producers_accuracy": clean(self.producers[k : k + 1])[0],
                "producers_accuracy_se": clean(self.producers_se[k : k + 1])[0],
                "area_proportion": float(self.area_proportion[k]),
                "area_proportion_se": float(self.area_proportion_se[k]),
                "area_ha": float(self.area_ha[k]),
                "area_se_ha": float(self.area_se_ha[k]),
                "area_ci_ha": float(self.area_ci_ha[k]),
                "area_ci_low_ha": float(self.area_ha[k] - self.area_ci_ha[k]),
                "area_ci_high_ha": float(self.area_ha[k] + self.area_ci_ha[k]),
            }
        return {
            "method": "stratified estimator, Olofsson et al. (2014) Remote Sensing of Environment 148:42-57",
            "z": self.z,
            "classes": list(self.classes),
            "total_area_ha": self.total_area_ha,
            "sample_size": int(self.counts.sum()),
            "overall_accuracy": self.overall,
            "overall_accuracy_se": self.overall_se,
            "per_class": per_class,
            "error_matrix_counts": self.counts.astype(int).tolist(),
            "error_matrix_proportions": self.proportions.tolist(),
            **self.info,
        }

    def markdown(self) -> str:
        """The estimates as Markdown: one row per class, then both error matrices."""
        ci = f"{100 * (2 * _normal_cdf(self.z) - 1):.0f}% CI"
        names = self.classes
        lines = [
            "# Area estimate (stratified estimator, Olofsson et al. 2014)",
            "",
            *[f"- {key}: {value}" for key, value in self.info.items() if not isinstance(value, (dict, list))],
            f"- total mapped area: {self.total_area_ha:,.1f} ha; sample: {int(self.counts.sum())} points",
            f"- overall accuracy: {self.overall:.3f} ± {self.z * self.overall_se:.3f} ({ci})",
            "",
            f"| class | mapped area (ha) | W | n | user's accuracy ± {ci} | producer's accuracy ± {ci} "
            f"| estimated area (ha) | SE (ha) | {ci} (ha) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, name in enumerate(names):
            lines.append(
                f"| {name} | {self.mapped_area_ha[k]:,.1f} | {self.weights[k]:.4f} | {int(self.counts[k].sum())} "
                f"| {_pm(self.users[k], self.z * self.users_se[k])} "
                f"| {_pm(self.producers[k], self.z * self.producers_se[k])} "
                f"| {self.area_ha[k]:,.1f} | {self.area_se_ha[k]:,.1f} "
                f"| {self.area_ha[k] - self.area_ci_ha[k]:,.1f} – {self.area_ha[k] + self.area_ci_ha[k]:,.1f} |"
            )
        head = "| map \\ reference | " + " | ".join(names) + " | total |"
        rule = "|---|" + "---:|" * (len(names) + 1)
        lines += ["", "Error matrix, sample counts (rows: map class, columns: reference class):", "", head, rule]
        for k, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(str(int(c)) for c in self.counts[k]) + f" | {int(self.counts[k].sum())} |")
        lines.append("| total | " + " | ".join(str(int(c)) for c in self.counts.sum(0)) + f" | {int(self.counts.sum())} |")
        lines += ["", "Error matrix, estimated area proportions p_ij = W_i n_ij / n_i.:", "", head, rule]
        for k, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(f"{p:.4f}" for p in self.proportions[k]) + f" | {self.weights[k]:.4f} |")
        lines.append("| total | " + " | ".join(f"{p:.4f}" for p in self.area_proportion) + " | 1.0000 |")
        return "\n".join(lines) + "\n"


def _normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _pm(value: float, half: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f} ± {half:.3f}"


def estimate_area(
    counts: np.ndarray, mapped_area: Sequence[float], classes: Sequence[str] | None = None, z: float = Z95
) -> AreaEstimate:
    """The stratified estimator of Olofsson et al. (2014) from a stratified random sample.

    ``counts[i, j]``: sample units mapped as class ``i`` and labelled ``j`` in the reference
    (same class order on both axes); ``mapped_area[i]``: the area mapped as class ``i`` (any
    unit; areas come back in the same unit, hectares here). Every class with mapped area needs
    at least two sample units: one gives no variance, none no estimate at all.
    """
    n = np.asarray(counts, dtype=float)
    area = np.asarray(mapped_area, dtype=float)
    k = len(area)
    names = [str(c) for c in classes] if classes is not None else [str(c) for c in range(k)]
    if n.shape != (k, k) or len(names) != k:
        raise AreaError(f"the error matrix is {n.shape}, it needs {k}x{k} for {k} classes")
    if (n < 0).any() or (area < 0).any() or not np.isfinite(area).all() or area.sum() <= 0:
        raise AreaError("sample counts and mapped areas must be non-negative, with some mapped area")
    n_i = n.sum(axis=1)
    for i in range(k):
        if area[i] > 0 and n_i[i] < 2:
            found = "no sample unit" if n_i[i] == 0 else "only 1 sample unit"
            raise AreaError(
                f"map class {names[i]!r} covers {area[i]:,.1f} ha but has {found}: the stratified "
                "estimator needs at least 2 per mapped class (Olofsson et al. recommend 50-100 in rare classes)"
            )
        if area[i] == 0 and n_i[i] > 0:
            raise AreaError(f"map class {names[i]!r} has {int(n_i[i])} sample unit(s) but no mapped area")
    weights = area / area.sum()
    sampled = n_i > 0
    # row shares n_ij / n_i. (0 for strata without area and sample: they weigh nothing)
    share = np.divide(n, n_i[:, None], out=np.zeros_like(n), where=sampled[:, None])
    # per-stratum variance factor 1 / (n_i. - 1); n_i. >= 2 wherever W_i > 0
    inv = np.divide(1.0, n_i - 1, out=np.zeros_like(n_i), where=n_i > 1)
    p = weights[:, None] * share
    area_proportion = p.sum(axis=0)
    # eq. 10: V(p.j) = sum_i W_i^2 (n_ij/n_i.)(1 - n_ij/n_i.) / (n_i. - 1)
    cell_var = share * (1 - share) * inv[:, None]
    area_proportion_se = np.sqrt(((weights**2)[:, None] * cell_var).sum(axis=0))
    diag = np.diag(p)
    users = np.diag(share).copy()
    users[~sampled] = np.nan
    # eq. 6: V(U_i) = U_i (1 - U_i) / (n_i. - 1)
    users_se = np.sqrt(np.diag(cell_var)).copy()
    users_se[~sampled] = np.nan
    overall = float(diag.sum())
    # eq. 5: V(O) = sum_i W_i^2 U_i (1 - U_i) / (n_i. - 1)
    overall_se = float(np.sqrt((weights**2 * np.diag(cell_var)).sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        producers = np.where(area_proportion > 0, diag / area_proportion, np.nan)
        # eq. 7 in area proportions (N_i. / N -> W_i): the stratum's own omission term plus
        # the commission of the other strata into reference class j
        own = weights**2 * (1 - producers) ** 2 * np.diag(cell_var)
        others = ((weights**2)[:, None] * cell_var).sum(axis=0) - (weights**2) * np.diag(cell_var)
        producers_se = np.where(
            area_proportion > 0, np.sqrt((own + producers**2 * others) / area_proportion**2), np.nan
        )
    return AreaEstimate(
        classes=names, counts=n.astype(np.int64), mapped_area_ha=area, weights=weights, proportions=p,
        users=users, users_se=users_se, producers=producers, producers_se=producers_se,
        overall=overall, overall_se=overall_se, area_proportion=area_proportion,
        area_proportion_se=area_proportion_se, z=z,
    )


# --- the map -----------------------------------------------------------------------------


@dataclass
class MapStrata:
    """The map classes measured on a raster: values, names, pixel counts and areas."""

    path: str
    values: list[int]
    names: list[str]
    pixels: np.ndarray
    area_ha: np.ndarray
    crs: CRS | None
    transform: Affine
    pixel_area_m2: str = ""

    def name_of(self, value: int) -> str:
        return self.names[self.values.index(value)]


def category_names(src: rasterio.io.DatasetReader, band: int) -> dict[int, str]:
    """Class names the raster carries: deforest-predict's ``class_names`` tag (a JSON list by
    class index), else GDAL category names of the band in its ``.aux.xml``."""
    tag = src.tags().get("class_names")
    if tag:
        try:
            names = json.loads(tag)
            if isinstance(names, list):
                return {i: str(n) for i, n in enumerate(names)}
        except json.JSONDecodeError:
            pass
    aux = Path(f"{src.name}.aux.xml")
    if aux.is_file():
        try:
            root = ElementTree.parse(aux).getroot()
        except ElementTree.ParseError:
            return {}
        for node in root.iter("PAMRasterBand"):
            if node.get("band", "1") == str(band):
                cats = node.find("CategoryNames")
                if cats is not None:
                    return {i: c.text for i, c in enumerate(cats.findall("Category")) if c.text}
    return {}


def _open(path: str | os.PathLike) -> rasterio.io.DatasetReader:
    if not Path(path).exists():
        raise TileError(path, "does not exist")
    try:
        return rasterio.open(path)
    except RasterioError as err:
        raise TileError(path, f"cannot be opened as a raster ({str(err).splitlines()[0][:200]})") from None


def _blocks(src: rasterio.io.DatasetReader):
    rows = max(1, BLOCK_PIXELS // max(1, src.width))
    for top in range(0, src.height, rows):
        yield top, Window(0, top, src.width, min(rows, src.height - top))


def _read_classes(src: rasterio.io.DatasetReader, band: int, window: Window, path: str) -> np.ma.MaskedArray:
    """Class values of a window, nodata masked; a float map (deforest-predict dtype=float32)
    must hold whole numbers."""
    try:
        data = src.read(band, window=window, masked=True)
    except RasterioError as err:
        raise TileError(path, f"cannot be read as a raster ({str(err).splitlines()[0][:200]})") from None
    if data.dtype.kind == "f":
        values = np.ma.getdata(data)
        mask = np.ma.getmaskarray(data) | ~np.isfinite(values)
        valid = values[~mask]
        if valid.size and not np.array_equal(valid, np.round(valid)):
            raise TileError(path, f"band {band} holds fractional values: it is not a class map (pick band=)")
        data = np.ma.masked_array(np.where(mask, 0, values).astype(np.int64), mask=mask)
    elif data.dtype.kind not in "iu":
        raise TileError(path, f"band {band} has dtype {data.dtype}: a class map holds integers")
    return data


def map_class_areas(
    path: str | os.PathLike, band: int = 1, classes: Mapping | None = None
) -> MapStrata:
    """Pixel count and area (ha) of every class value on the map, nodata left out.

    Names come from ``classes`` (value -> name; its classes count even with no pixel), else
    from the raster's own class names (:func:`category_names`), else the values themselves.
    """
    path = str(path)
    with _open(path) as src:
        if not 1 <= band <= src.count:
            raise TileError(path, f"has {src.count} band(s), band={band} does not exist")
        rows_m2 = row_pixel_areas(src.transform, src.crs, src.height, path)
        own = category_names(src, band)
        pixels: dict[int, int] = {}
        area_m2: dict[int, float] = {}
        for top, window in _blocks(src):
            data = _read_classes(src, band, window, path)
            row = np.broadcast_to(np.arange(data.shape[0])[:, None], data.shape)
            keep = ~np.ma.getmaskarray(data)
            values, inverse = np.unique(np.asarray(data)[keep], return_inverse=True)
            if values.size == 0:
                continue
            counts = np.bincount(inverse, minlength=values.size)
            areas = np.bincount(inverse, weights=rows_m2[top + row[keep]], minlength=values.size)
            for v, c, a in zip(values.tolist(), counts.tolist(), areas.tolist()):
                pixels[v] = pixels.get(v, 0) + c
                area_m2[v] = area_m2.get(v, 0.0) + a
        transform, crs = src.transform, src.crs
    if not pixels:
        raise TileError(path, "every pixel is nodata: there is no mapped area")
    mapping = {_as_int(k, path): str(v) for k, v in (classes or {}).items()}
    values = sorted(set(pixels) | set(mapping))
    names = [mapping.get(v, own.get(v, str(v))) for v in values]
    if len(set(names)) != len(names):
        raise ConfigError(f"class names must differ, got {names} for values {values} (set classes=)")
    unit = (
        f"{rows_m2[0]:,.1f} m^2 (projected CRS)" if crs.is_projected
        else f"{rows_m2.min():,.1f}-{rows_m2.max():,.1f} m^2 by row (geographic CRS, ellipsoidal)"
    )
    return MapStrata(
        path=path, values=values, names=names,
        pixels=np.asarray([pixels.get(v, 0) for v in values], dtype=np.int64),
        area_ha=np.asarray([area_m2.get(v, 0.0) for v in values]) / M2_PER_HA,
        crs=crs, transform=transform, pixel_area_m2=unit,
    )


def _as_int(key: object, path: str) -> int:
    try:
        value = float(key)
    except (TypeError, ValueError):
        raise ConfigError(f"classes keys are the map's class values (integers), got {key!r}") from None
    if value != int(value):
        raise ConfigError(f"classes keys are the map's class values (integers), got {key!r}")
    return int(value)


# --- reference points --------------------------------------------------------------------


def read_points(path: str | os.PathLike, field_name: str, crs: CRS | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, values)`` of the point features of ``path``, in ``crs`` (reprojected if needed)."""
    path = str(path)
    if not Path(path).exists():
        raise TileError(path, "does not exist")
    try:
        info = pyogrio.read_info(path)
        if field_name not in list(info["fields"]):
            have = ", ".join(map(str, info["fields"])) or "none"
            raise TileError(path, f"has no field {field_name!r} (class_field); its fields: {have}")
        meta, _, geometries, fields = pyogrio.raw.read(path, columns=[field_name])
    except (DataSourceError, DataLayerError, FieldError, OSError) as err:
        raise TileError(path, f"cannot be read as reference points ({str(err).splitlines()[0][:200]})") from None
    if len(geometries) == 0:
        raise TileError(path, "holds no features")
    if any(g is None for g in geometries):
        raise TileError(path, f"has {sum(g is None for g in geometries)} feature(s) without a geometry")
    geoms = shapely.from_wkb(geometries)
    kinds = set(shapely.get_type_id(geoms).tolist())
    if kinds != {int(shapely.GeometryType.POINT)}:
        raise TileError(path, f"needs point features (one sample unit each), found {meta.get('geometry_type')}")
    xs, ys = shapely.get_x(geoms), shapely.get_y(geoms)
    source = meta.get("crs")
    if source and crs is not None and CRS.from_user_input(source) != crs:
        log.info("%s: reprojecting points from %s to %s", path, source, crs)
        xs, ys = (np.asarray(v) for v in rasterio.warp.transform(CRS.from_user_input(source), crs, xs, ys))
    elif (source is None) != (crs is None):
        log.warning("%s or the map has no CRS: assuming both share one", path)
    return np.asarray(xs, float), np.asarray(ys, float), np.asarray(fields[0], dtype=object)


def _label(value: object) -> str | None:
    """A reference attribute as text (``2.0`` -> ``2``); ``None`` when empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def reference_classes(values: np.ndarray, strata: MapStrata, path: str, field_name: str) -> np.ndarray:
    """Reference labels as indexes into ``strata.names``: a class name or a map value."""
    lookup = {name: k for k, name in enumerate(strata.names)}
    for k, value in enumerate(strata.values):
        lookup.setdefault(str(value), k)
    labels = [_label(v) for v in values]
    empty = sum(label is None for label in labels)
    if empty:
        raise TileError(path, f"{empty} of {len(labels)} point(s) have no {field_name!r} value: label every sample point first")
    unknown = sorted({label for label in labels if label not in lookup})
    if unknown:
        raise TileError(
            path,
            f"{field_name!r} holds {unknown[:5]} that name no map class (map classes: {strata.names}; "
            "values or names, see classes=)",
        )
    return np.asarray([lookup[label] for label in labels], dtype=np.int64)


def sample_map(
    src: rasterio.io.DatasetReader, band: int, xs: np.ndarray, ys: np.ndarray, path: str, points_path: str
) -> np.ndarray:
    """The map's class value under each point; points outside the map or on nodata are errors."""
    rows, cols = rasterio.transform.rowcol(src.transform, xs, ys, op=math.floor)
    rows, cols = np.asarray(rows), np.asarray(cols)
    outside = (rows < 0) | (rows >= src.height) | (cols < 0) | (cols >= src.width)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        left, bottom, right, top = src.bounds
        raise TileError(
            points_path,
            f"{int(outside.sum())} of {len(xs)} point(s) lie outside the map {path} (first at x={xs[first]:.6g}, "
            f"y={ys[first]:.6g}; map bounds {left:.6g}, {bottom:.6g}, {right:.6g}, {top:.6g} in {src.crs}): "
            "points of another area, or a wrong CRS?",
        )
    sampled = np.ma.concatenate(list(src.sample(zip(xs, ys), indexes=band, masked=True)))
    mask = np.ma.getmaskarray(sampled)
    if sampled.dtype.kind == "f":
        mask |= ~np.isfinite(np.ma.getdata(sampled))
    if mask.any():
        first = int(np.flatnonzero(mask)[0])
        raise TileError(
            points_path,
            f"{int(mask.sum())} of {len(xs)} point(s) fall on nodata of the map {path} (first at x={xs[first]:.6g}, "
            f"y={ys[first]:.6g}): the sample must come from the mapped area",
        )
    return np.asarray(np.ma.getdata(sampled)).astype(np.int64)


def assess(
    map_path: str | os.PathLike,
    reference: str | os.PathLike,
    class_field: str,
    band: int = 1,
    classes: Mapping | None = None,
    z: float = Z95,
) -> AreaEstimate:
    """Measure the map's strata, sample the map under each reference point, and estimate."""
    map_path, reference = str(map_path), str(reference)
    strata = map_class_areas(map_path, band, classes)
    xs, ys, values = read_points(reference, class_field, strata.crs)
    with _open(map_path) as src:
        mapped = sample_map(src, band, xs, ys, map_path, reference)
    row = np.asarray([strata.values.index(v) for v in mapped.tolist()], dtype=np.int64)
    col = reference_classes(values, strata, reference, class_field)
    k = len(strata.values)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (row, col), 1)
    try:
        result = estimate_area(counts, strata.area_ha, strata.names, z)
    except AreaError as err:
        raise TileError(reference, str(err)) from None
    result.info.update(
        map=map_path, reference=reference, class_field=class_field, band=band, pixel_area=strata.pixel_area_m2,
        map_values={name: value for name, value in zip(strata.names, strata.values)},
        mapped_pixels={name: int(c) for name, c in zip(strata.names, strata.pixels)},
    )
    return result


# --- sampling design ---------------------------------------------------------------------


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
    with _open(path) as src:
        for top, window in _blocks(src):
            data = _read_classes(src, band, window, path)
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
