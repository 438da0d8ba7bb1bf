"""Progress: a rich bar in a terminal, plain log lines where there is none (CI, SLURM, nohup).

A redrawn bar written to a file or a CI log is thousands of carriage returns; a line per
epoch (and one every ``interval_s`` inside long epochs) reads well there.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)


@rank_zero_only
def _say(message: str, *args: Any) -> None:
    """One line per run, not one per DDP process."""
    log.info(message, *args)


def _epoch(trainer: pl.Trainer) -> str:
    """``current/last`` numbered from 0, as Lightning's bar, checkpoint names and the CSV log do."""
    last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else None
    return f"{trainer.current_epoch}/{last}" if last is not None else str(trainer.current_epoch)


class LineProgress(Callback):
    """Logs a line per epoch with the metrics a bar would show, one every ``interval_s``
    inside long epochs, and one when testing or predicting ends."""

    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_s = interval_s
        self._started = 0.0
        self._last = 0.0

    def _start(self) -> None:
        self._started = self._last = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            total = trainer.num_training_batches
            _say("epoch %s: batch %d/%s after %.0f s", _epoch(trainer), batch_idx + 1, total, now - self._started)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        shown = trainer.progress_bar_metrics  # what a bar would show
        text = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(shown.items()) if not k.endswith("_step"))
        _say("epoch %s done in %.1f s: %s", _epoch(trainer), time.monotonic() - self._started, text)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _say("test done (%.1f s, %d batches)", time.monotonic() - self._started, sum(trainer.num_test_batches))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _say("predict done (%.1f s, %d batches)", time.monotonic() - self._started, sum(trainer.num_predict_batches))


def progress_callbacks(enabled: bool, interactive: bool | None = None) -> tuple[list[Callback], bool]:
    """Callbacks and the trainer's ``enable_progress_bar`` for this output.

    ``interactive`` defaults to whether stdout is a terminal: a :class:`RichProgressBar`
    there, :class:`LineProgress` (no bar) otherwise; nothing when not ``enabled``.
    """
    if not enabled:
        return [], False
    if sys.stdout.isatty() if interactive is None else interactive:
        return [RichProgressBar()], True
    return [LineProgress()], False
