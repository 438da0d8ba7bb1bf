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

:func:`estimate_area` is that estimator, numpy in and :class:`AreaEstimate` out; this module
reads no file. :mod:`deforest.mapping.strata` measures the strata on a GeoTIFF,
:mod:`deforest.mapping.reference_sample` samples the map at labelled reference points and
estimates (:func:`~deforest.mapping.reference_sample.assess`), and
:mod:`deforest.mapping.sampling_design` draws the stratified random sample a user then labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: two-sided 95% normal quantile, as in Olofsson et al. (2014)
Z95 = 1.96


class AreaError(ValueError):
    """A sample the estimator cannot use (a mapped class without enough sample units)."""


@dataclass(frozen=True)
class Accuracy:
    """User's, producer's (by class) and overall accuracy, each with its standard error
    (Olofsson et al. 2014, eqs. 5-7); NaN for a class the sample never found."""

    users: np.ndarray
    users_se: np.ndarray
    producers: np.ndarray
    producers_se: np.ndarray
    overall: float
    overall_se: float


@dataclass(frozen=True)
class AreaEstimate:
    """Olofsson et al. (2014) estimates; arrays are indexed by ``classes`` (rows: map, columns: reference)."""

    classes: list[str]
    counts: np.ndarray
    mapped_area_ha: np.ndarray
    weights: np.ndarray
    proportions: np.ndarray
    accuracy: Accuracy
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

        acc = self.accuracy
        per_class = {}
        for k, name in enumerate(self.classes):
            per_class[name] = {
                "mapped_area_ha": float(self.mapped_area_ha[k]),
                "weight": float(self.weights[k]),
                "sample_count": int(self.counts[k].sum()),
                "users_accuracy": clean(acc.users[k : k + 1])[0],
                "users_accuracy_se": clean(acc.users_se[k : k + 1])[0],
                "producers_accuracy": clean(acc.producers[k : k + 1])[0],
                "producers_accuracy_se": clean(acc.producers_se[k : k + 1])[0],
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
            "overall_accuracy": acc.overall,
            "overall_accuracy_se": acc.overall_se,
            "per_class": per_class,
            "error_matrix_counts": self.counts.astype(int).tolist(),
            "error_matrix_proportions": self.proportions.tolist(),
            **self.info,
        }

    def markdown(self) -> str:
        """The estimates as Markdown: one row per class, then both error matrices."""
        ci = f"{100 * (2 * _normal_cdf(self.z) - 1):.0f}% CI"
        names, acc = self.classes, self.accuracy
        lines = [
            "# Area estimate (stratified estimator, Olofsson et al. 2014)",
            "",
            *[f"- {key}: {value}" for key, value in self.info.items() if not isinstance(value, (dict, list))],
            f"- total mapped area: {self.total_area_ha:,.1f} ha; sample: {int(self.counts.sum())} points",
            f"- overall accuracy: {acc.overall:.3f} ± {self.z * acc.overall_se:.3f} ({ci})",
            "",
            f"| class | mapped area (ha) | W | n | user's accuracy ± {ci} | producer's accuracy ± {ci} "
            f"| estimated area (ha) | SE (ha) | {ci} (ha) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, name in enumerate(names):
            lines.append(
                f"| {name} | {self.mapped_area_ha[k]:,.1f} | {self.weights[k]:.4f} | {int(self.counts[k].sum())} "
                f"| {_pm(acc.users[k], self.z * acc.users_se[k])} "
                f"| {_pm(acc.producers[k], self.z * acc.producers_se[k])} "
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
        accuracy=Accuracy(users, users_se, producers, producers_se, overall, overall_se),
        area_proportion=area_proportion,
        area_proportion_se=area_proportion_se, z=z,
    )


__all__ = ["Accuracy", "AreaError", "AreaEstimate", "Z95", "estimate_area"]
