"""Compare the settings of a Hydra multirun (loss schemes, backbones, ...) over seeds.

Reads every finished job (via :func:`deforest.runs.sweeps.collect_runs`), groups the jobs by
every config key whose value differs between them (taken from each job's composed config,
so defaults count too; seeds, paths and Hydra's own keys excepted) and reports mean and
standard deviation over the jobs of each group of macro F1, accuracy and the recall of the
classes rarest in the training split (multi-class), or of macro mAP, macro F1 (at the tuned
thresholds the test used), the F1 of the rarest labels and their mean, and the expected
calibration error (multi-label).

ECE is the run's own ``test/ece*`` metrics when it logged them (``test/ece`` of the
probabilities it writes, after its calibration; ``test/ece_uncorrected`` before), else
computed here from its ``predictions.csv`` (:func:`expected_calibration_error`, the same
15-bin ECE over every label-tile pair), for both columns: such a run corrected nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from deforest.runs.sweeps import collect_runs
from deforest.training.calibration import ECE_BINS  # the bins the runs' own ECE used

# what differs between jobs without being a setting to compare
IGNORED_PREFIXES = ("paths.", "hydra.")
SEED_VALUE = "${seed}"


def flat_settings(node: Any, prefix: str = "") -> dict[str, str]:
    """``{"loss.scheme": "none", "model.width": "8", ...}`` of a job's config, unresolved, lists as text."""
    if isinstance(node, DictConfig):
        flat: dict[str, str] = {}
        for key in node.keys():
            flat.update(flat_settings(node._get_node(key), f"{prefix}{key}."))
        return flat
    if isinstance(node, ListConfig):
        return {prefix[:-1]: str(OmegaConf.to_container(node, resolve=False))}
    return {prefix[:-1]: str(node._value() if hasattr(node, "_value") else node)}


def varying_keys(settings: Sequence[dict[str, str]]) -> list[str]:
    """Keys whose value is not the same in every job (missing counts as a value), sorted;
    the seed (``seed`` and keys set to ``${seed}``), ``paths.*`` and ``hydra.*`` excepted."""
    keys = sorted({k for s in settings for k in s})
    seeded = {k for s in settings for k, v in s.items() if v == SEED_VALUE}
    return [
        k for k in keys
        if k != "seed" and k not in seeded and not k.startswith(IGNORED_PREFIXES)
        and len({s.get(k, "<unset>") for s in settings}) > 1
    ]


def rarest_classes(run_dir: Path, k: int) -> list[str]:
    """The ``k`` classes with the fewest training tiles (from the run's class_distribution.json)."""
    counts = json.loads((run_dir / "class_distribution.json").read_text())["train"]
    return sorted(counts, key=lambda name: (counts[name], name))[:k]



def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Multi-label ECE: every (tile, label) probability is one binary forecast; forecasts are
    put into ``bins`` equal-width bins of probability, and the gaps between each bin's mean
    probability and its share of positives are averaged, weighted by the bin's size."""
    p, y = np.asarray(probs, dtype=np.float64).ravel(), np.asarray(targets, dtype=np.float64).ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    size = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, p, bins) - np.bincount(which, y, bins))
    return float(gap.sum() / max(len(p), 1)) if size.any() else float("nan")


def predictions_ece(run_dir: Path) -> float:
    """ECE of a multi-label run's test predictions (``predictions.csv``: ``true`` holds the
    labels separated by ``"; "``, ``p:<label>`` columns the probabilities); NaN for a run
    without one (``report.enabled=false`` writes none)."""
    if not (run_dir / "predictions.csv").is_file():
        return float("nan")
    table = pd.read_csv(run_dir / "predictions.csv", keep_default_na=False)
    labels = [c[2:] for c in table.columns if c.startswith("p:")]
    truth = [set(filter(None, (t.strip() for t in str(row).split(";")))) for row in table["true"]]
    targets = np.array([[label in row for label in labels] for row in truth], dtype=np.float64)
    return expected_calibration_error(table[[f"p:{label}" for label in labels]].to_numpy(), targets)


def _multilabel_metrics(frame: pd.DataFrame, rare: list[str]) -> list[str]:
    """Adds the rare labels' mean F1 and (where the runs did not log it) the ECE to ``frame``;
    returns the multi-label columns to compare."""
    rare_f1 = [f"test/f1/{c}" for c in rare]
    frame["test/f1_rare"] = frame[rare_f1].mean(axis=1)
    if "test/ece" not in frame:
        frame["test/ece"] = np.nan
    lacking = frame["test/ece"].isna()
    if lacking.any():  # runs that logged no ECE (report on, calibration off or absent)
        values = [predictions_ece(Path(d)) for d in frame.loc[lacking, "run_dir"]]
        frame.loc[lacking, "test/ece"] = values
        if "test/ece_uncorrected" in frame:  # such a run corrected nothing: its written probabilities are raw
            frame.loc[lacking, "test/ece_uncorrected"] = values
    ece = ["test/ece"] + sorted(c for c in frame if c.startswith("test/ece") and c != "test/ece")
    return ["test/map", "test/f1_macro", "test/f1_rare", *rare_f1, *ece]


def compare_runs(
    multirun_dirs: Sequence[str | Path], rare_k: int = 2, group_by: Sequence[str] | None = None
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Per group of settings: jobs, mean and std of the headline metrics; the grouping keys; the rare classes.

    Several multirun directories are pooled (e.g. a sweep extended by a second one).
    ``group_by`` names the keys to group by instead of every key that differs (sweeps run
    with different versions of the code differ in keys that are not the compared settings).
    """
    runs = [r for d in multirun_dirs for r in collect_runs(d) if r["status"] == "done"]
    if not runs:
        raise ValueError(f"{', '.join(map(str, multirun_dirs))}: no finished job with a metrics.json")
    settings = [flat_settings(OmegaConf.load(Path(r["run_dir"]) / ".hydra" / "config.yaml")) for r in runs]
    group = varying_keys(settings) if group_by is None else list(group_by)
    frame = pd.DataFrame([{**r, **{k: s.get(k, "<unset>") for k in group}} for r, s in zip(runs, settings)])
    if not group:  # every job has the same settings: one group
        group = ["runs"]
        frame["runs"] = "all"
    rare = rarest_classes(Path(runs[0]["run_dir"]), rare_k)
    if "test/map" in frame:
        metrics = _multilabel_metrics(frame, rare)
    else:
        second = "test/accuracy" if "test/accuracy" in frame else "test/f1_micro"
        metrics = ["test/f1_macro", second] + [f"test/recall/{c}" for c in rare]
    grouped = frame.groupby(group, sort=True)[metrics]
    table = grouped.mean().add_suffix(" mean").join(grouped.std(ddof=0).add_suffix(" std"))
    table.insert(0, "jobs", grouped.size())
    ordered = ["jobs"] + [f"{m} {s}" for m in metrics for s in ("mean", "std")]
    return table[ordered].reset_index(), group, rare


def write_comparison(
    multirun_dirs: Sequence[str | Path], rare_k: int = 2, out_dir: str | Path | None = None,
    group_by: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``comparison.csv`` and ``comparison.md`` (into ``out_dir``, default the first directory)."""
    root = Path(out_dir or multirun_dirs[0])
    root.mkdir(parents=True, exist_ok=True)
    table, group, rare = compare_runs(multirun_dirs, rare_k, group_by)
    how = "the settings given" if group_by is not None else "every setting that differs between the jobs"
    csv_path, md_path = root / "comparison.csv", root / "comparison.md"
    table.to_csv(csv_path, index=False)
    metric_names = [c[: -len(" mean")] for c in table.columns if c.endswith(" mean")]
    header = [*group, "jobs", *metric_names]
    lines = [
        f"# Comparison of {', '.join(Path(d).name for d in multirun_dirs)}",
        "",
        f"Grouped by {how} ({', '.join(group)}); mean ± standard "
        f"deviation over the jobs of each group (seeds); rarest training classes: {', '.join(rare)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in group] + [str(int(row["jobs"]))]
        cells += [f"{row[m + ' mean']:.3f} ± {row[m + ' std']:.3f}" for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
