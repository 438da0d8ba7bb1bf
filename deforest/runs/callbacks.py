"""Lightning callbacks that write what users look at in the run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl

from deforest.core.outputs import write_text_output
from deforest.runs.plots import plot_class_distribution

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
        write_text_output(self.output_dir / "class_distribution.json", json.dumps(counts, indent=2))
        plot_class_distribution(counts, self.output_dir / "class_distribution.png")
        for split, per_class in counts.items():
            log.info("%s class counts: %s", split, per_class)


class SaveOnSigterm(pl.Callback):
    """On SIGTERM (what SLURM and Kubernetes send before killing a job) during ``fit``, save
    ``last.ckpt`` where the run's checkpoints go, so ``ckpt_path=auto`` resumes from here.

    Lightning stops the loops at the next batch boundary by raising ``SIGTERMException``;
    this runs in its ``on_exception`` hook, on every rank (the save is collective). The path is
    kept in :attr:`saved` for the command's last line.
    """

    def __init__(self) -> None:
        self.saved: str | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        savers = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        folder = Path(savers[0].dirpath) if savers else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        self.saved = str(path)
        log.warning("SIGTERM: saved %s (global step %d)", path, trainer.global_step)
