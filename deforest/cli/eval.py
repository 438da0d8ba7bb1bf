"""``deforest-eval``: evaluate a checkpoint on a dataset split and write the run report.

The checkpoint decides the bands, normalisation, class names, task, TTA and thresholds;
the data config only says where the tiles are and how they are split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from deforest.cli.errors import exit_on_user_error
from deforest.cli.train import CONFIG_PATH, build_datamodule, build_trainer
from deforest.config_checks import EVAL_CHOICES, EVAL_RULES, check_ranges
from deforest.datamodule import TileDataModule
from deforest.datasets import MULTICLASS, DatasetError
from deforest.module import TileClassifier
from deforest.report import report_on_split
from deforest.safety import RunInterrupted, run_dir_lock
from deforest.validation import nodata_fill

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` on ``cfg.split`` of ``cfg.data``; write ``metrics.json`` and the report."""
    check_ranges(cfg, EVAL_RULES, EVAL_CHOICES)
    ckpt = Path(cfg.ckpt_path).expanduser()
    # weights and plain settings only: compile and other code-execution settings never come from the file
    model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    datamodule = build_datamodule(OmegaConf.merge(cfg.data, {"bands": list(model.hparams.bands)}))
    datamodule.setup("test")
    align_classes(datamodule, cfg.split, model)
    if tuple(datamodule.tile_size) != tuple(model.hparams.tile_size or datamodule.tile_size):
        log.warning("tiles are %s pixels, the model was trained on %s", datamodule.tile_size, model.hparams.tile_size)
    trainer = build_trainer(cfg)
    # the datamodule's own loader settings (collation of skipped bad tiles included), unshuffled
    loader = datamodule._loader(cfg.split, shuffle=False)
    try:
        results = trainer.test(model, dataloaders=loader, verbose=False)
    except SIGTERMException:  # Lightning's, a SystemExit with status 0: the evaluation would look finished
        raise RunInterrupted("stopped by SIGTERM while evaluating; no metrics written: run deforest-eval again") from None
    output_dir = Path(cfg.paths.output_dir)
    metrics: dict[str, Any] = {"checkpoint": str(ckpt), "data_root": str(cfg.data.root), "split": cfg.split}
    metrics[f"{cfg.split}/loss"] = float(results[0]["test/loss"])
    if trainer.is_global_zero:
        details = [f"checkpoint: `{ckpt}`", f"data: `{cfg.data.root}`"]
        csv_log = ckpt.resolve().parent.parent / "csv" / "metrics.csv"  # the training run's, when beside it
        metrics.update(report_on_split(model, datamodule, cfg.split, output_dir, cfg.report, trainer.loggers,
                                       details, csv_log if csv_log.is_file() else None))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def align_classes(datamodule: TileDataModule, split: str, model: TileClassifier) -> None:
    """Put the split's targets in the checkpoint's class order, and fill its nodata pixels with
    the raw values the checkpoint's statistics normalise to 0 (not this dataset's).

    A multi-class tile of a class the model does not know cannot be scored: an error.
    Multi-label tags the model does not know are dropped with a warning.
    """
    if datamodule.task != model.task:
        raise DatasetError(f"{datamodule.layout.root}: the data is {datamodule.task}, the checkpoint {model.task}")
    dataset = datamodule.datasets[split]
    if len(dataset) == 0:
        raise DatasetError(f"{datamodule.layout.root}: the {split} split is empty")
    known = {name: i for i, name in enumerate(model.class_names)}
    unknown = [n for n in datamodule.class_names if n not in known]
    targets = np.asarray(dataset.targets)
    if model.task == MULTICLASS:
        present = {datamodule.class_names[t] for t in targets.tolist()}
        if present & set(unknown):
            raise DatasetError(f"{datamodule.layout.root}: class(es) {sorted(present & set(unknown))} "
                               f"are not among the checkpoint's classes {model.class_names}")
        aligned = np.asarray([known[datamodule.class_names[t]] for t in targets.tolist()], np.int64)
    else:
        if unknown:
            log.warning("labels %s are not among the checkpoint's classes and are ignored", unknown)
        aligned = np.zeros((len(targets), len(known)), np.uint8)
        for column, name in enumerate(datamodule.class_names):
            if name in known:
                aligned[:, known[name]] = targets[:, column]
    dataset.targets = aligned
    dataset.fill = nodata_fill(model.hparams.band_mean, model.hparams.log_scale)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(), run_dir_lock(cfg.paths.output_dir):
        evaluate(cfg)


if __name__ == "__main__":
    main()
