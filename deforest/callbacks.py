"""Lightning callbacks that write what users look at in the run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl

from deforest.plots import plot_class_distribution

log = logging.getLogger(__name__)


class ClassDistribution(pl.Callback):
    """At fit start, log the class counts of every split and save them as a bar chart.

    Imbalance is the first thing to know about a dataset; this makes it visible per run.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        counts = trainer.datamodule.split_counts()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "class_distribution.json").write_text(json.dumps(counts, indent=2))
        plot_class_distribution(counts, self.output_dir / "class_distribution.png")
        for split, per_class in counts.items():
            log.info("%s class counts: %s", split, per_class)
