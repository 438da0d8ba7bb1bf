"""Compare loss-weighting schemes across the jobs of a Hydra multirun.

Reads every finished job (via :func:`deforest.sweeps.collect_runs`), groups by
``loss.scheme`` and ``loss.normalize`` (taken from each job's composed config, so defaults
count too) and reports mean and standard deviation over seeds of macro F1, accuracy (or
micro F1 for multi-label) and the recall of the classes rarest in the training split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from deforest.sweeps import collect_runs

GROUP = ["loss.scheme", "loss.normalize"]


def _job_settings(run_dir: Path) -> dict[str, str]:
    # a run directory is data: its interpolations (${oc.env:...}) are shown as written, never resolved
    loss = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)["loss"]
    return {"loss.scheme": str(loss["scheme"]), "loss.normalize": str(loss["normalize"])}


def rarest_classes(run_dir: Path, k: int) -> list[str]:
    """The ``k`` classes with the fewest training tiles (from the run's class_distribution.json)."""
    counts = json.loads((run_dir / "class_distribution.json").read_text())["train"]
    return sorted(counts, key=lambda name: (counts[name], name))[:k]


def compare_runs(multirun_dirs: Sequence[str | Path], rare_k: int = 2) -> tuple[pd.DataFrame, list[str]]:
    """Per scheme and normalisation: seeds, mean and std of the headline metrics.

    Several multirun directories are pooled (e.g. a sweep extended by a second one).
    """
    runs = [r for d in multirun_dirs for r in collect_runs(d) if r["status"] == "done"]
    if not runs:
        raise ValueError(f"{', '.join(map(str, multirun_dirs))}: no finished job with a metrics.json")
    rows = [{**r, **_job_settings(Path(r["run_dir"]))} for r in runs]
    frame = pd.DataFrame(rows)
    rare = rarest_classes(Path(runs[0]["run_dir"]), rare_k)
    second = "test/accuracy" if "test/accuracy" in frame else "test/f1_micro"
    metrics = ["test/f1_macro", second] + [f"test/recall/{c}" for c in rare]
    grouped = frame.groupby(GROUP, sort=True)[metrics]
    table = grouped.mean().add_suffix(" mean").join(grouped.std(ddof=0).add_suffix(" std"))
    table.insert(0, "seeds", grouped.size())
    ordered = ["seeds"] + [f"{m} {s}" for m in metrics for s in ("mean", "std")]
    return table[ordered].reset_index(), rare


def write_comparison(
    multirun_dirs: Sequence[str | Path], rare_k: int = 2, out_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``comparison.csv`` and ``comparison.md`` (into ``out_dir``, default the first directory)."""
    root = Path(out_dir or multirun_dirs[0])
    root.mkdir(parents=True, exist_ok=True)
    table, rare = compare_runs(multirun_dirs, rare_k)
    csv_path, md_path = root / "comparison.csv", root / "comparison.md"
    table.to_csv(csv_path, index=False)
    metric_names = [c[: -len(" mean")] for c in table.columns if c.endswith(" mean")]
    header = ["scheme", "normalize", "seeds", *metric_names]
    lines = [
        f"# Loss weighting comparison ({', '.join(Path(d).name for d in multirun_dirs)})",
        "",
        f"Mean ± standard deviation over seeds; rarest training classes: {', '.join(rare)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, row in table.iterrows():
        cells = [row["loss.scheme"], row["loss.normalize"], str(int(row["seeds"]))]
        cells += [f"{row[m + ' mean']:.3f} ± {row[m + ' std']:.3f}" for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
