"""Read a Hydra multirun directory back as one record per job, and summarise it as a CSV.

Every job of ``deforest-train -m ...`` leaves ``<sweep dir>/<job num>/`` with
``.hydra/overrides.yaml`` (what was varied) and ``metrics.json`` (written by ``train``).
:func:`collect_runs` is the one reader of that layout, shared by the sweep summary and by
tools that compare runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.csv"


def _job_sort_key(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["model.backbone=resnet18", "+trainer.x=1"]`` -> ``{"model.backbone": "resnet18", "trainer.x": "1"}``."""
    parsed = {}
    for item in overrides:
        key, _, value = item.partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def collect_runs(multirun_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per job directory: ``job``, ``run_dir``, ``status``, its overrides, then its metrics.

    ``status`` is ``done`` when the job wrote ``metrics.json`` and ``no metrics`` otherwise
    (failed, still running, or killed), so a summary shows every job that started.
    """
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such multirun directory")
    runs = []
    for job_dir in sorted((p for p in root.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()), key=_job_sort_key):
        overrides = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        runs.append(
            {
                "job": job_dir.name,
                "run_dir": str(job_dir),
                "status": "done" if metrics_file.is_file() else "no metrics",
                **parse_overrides(overrides),
                **metrics,
            }
        )
    return runs


def write_summary(multirun_dir: str | Path, filename: str = SUMMARY_NAME) -> Path:
    """Write ``collect_runs`` as a CSV (one row per job) at the sweep root; returns its path."""
    # here, not at the top: every command loads this callback, deforest-predict without pandas too
    import pandas as pd

    path = Path(multirun_dir) / filename
    pd.DataFrame(collect_runs(multirun_dir)).to_csv(path, index=False)
    return path


class SweepSummary(Callback):
    """Hydra callback: the sweep root exists before the sweep starts (Optuna's SQLite storage
    lives there) and holds ``summary.csv`` once every job has finished."""

    def __init__(self, filename: str = SUMMARY_NAME) -> None:
        self.filename = filename

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(config.hydra.sweep.dir, self.filename)
        log.info("sweep summary: %s", path)
