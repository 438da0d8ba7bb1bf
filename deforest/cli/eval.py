"""``deforest-eval``: evaluate a checkpoint on a dataset split and write the run report.

The checkpoint's input contract decides the bands, nodata fill, normalisation, class
names, task and thresholds, and by default the split: the tiles of each split are the
ones the model was trained, validated and tested on, whatever the data config says. The
data config says where the tiles are; ``resplit=true`` splits them by its settings instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.cli.train import headline_metrics
from deforest.core.errors import DatasetError
from deforest.core.outputs import write_text_output
from deforest.core.safety import RunInterrupted, run_dir_lock
from deforest.core.vocabulary import CONFIG_PATH
from deforest.data.input_check import Allow, check_input, describe_dataset
from deforest.runs.build import build_datamodule, build_trainer, use_cpu_settings
from deforest.runs.config_checks import EVAL_CHOICES, EVAL_RULES, check_ranges
from deforest.runs.report import report_on_split
from deforest.training.checkpoints import checkpoint_epoch
from deforest.training.module import TileClassifier

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` on ``cfg.split`` of ``cfg.data``; write ``metrics.json`` and the report."""
    check_ranges(cfg, EVAL_RULES, EVAL_CHOICES)
    ckpt = Path(cfg.ckpt_path).expanduser()
    # weights and plain settings only: compile and other code-execution settings never come from the file
    model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    spec = model.input_spec
    resplit = bool(cfg.get("resplit")) or spec.split is None
    datamodule = build_datamodule(cfg.data, input_spec=spec, resplit=resplit, test_split=cfg.split)
    datamodule.setup("test")
    if len(datamodule.datasets[cfg.split]) == 0:
        raise DatasetError(f"{datamodule.layout.root}: the {cfg.split} split is empty")
    if list(datamodule.tile_size) != list(spec.tile_size):
        log.warning("tiles are %s pixels, the model was trained on %s", datamodule.tile_size, spec.tile_size)
    # dtype, value scale and pixel size against the contract's, before any tile is scored
    dataset = datamodule.datasets[cfg.split]
    check_input(spec, describe_dataset(dataset, datamodule.reference_header,
                                       datamodule.layout.header_source(dataset.sources[0]),
                                       f"{datamodule.layout.root} ({cfg.split} tiles)"),
                Allow.from_config(cfg), "evaluate")
    split = datamodule.input_spec.split
    source = "this config (resplit=true)" if resplit else "the checkpoint"
    log.info("evaluating on the %s split of %s (%s, digest %s)", cfg.split, source, split.kind, split.digest)
    trainer = build_trainer(cfg)
    # through the datamodule: its collation and bad-tile policy apply as in training
    try:
        results = trainer.test(model, datamodule=datamodule, verbose=False)
    except SIGTERMException:  # Lightning's, a SystemExit with status 0: the evaluation would look finished
        raise RunInterrupted("stopped by SIGTERM while evaluating; no metrics written: run deforest-eval again") from None
    output_dir = Path(cfg.paths.output_dir)
    metrics: dict[str, Any] = {
        "checkpoint": str(ckpt), "data_root": str(cfg.data.root), "split": cfg.split,
        "split_source": "config" if resplit else "checkpoint", "split_digest": split.digest,
    }
    metrics.update({f"{cfg.split}/{k.split('/', 1)[1]}": float(v) for k, v in results[0].items()})
    if trainer.is_global_zero:
        details = [f"checkpoint: `{ckpt}`", f"data: `{cfg.data.root}`", f"split: {source}, digest `{split.digest}`"]
        csv_log = ckpt.resolve().parent.parent / "csv" / "metrics.csv"  # the training run's, when beside it
        metrics.update(report_on_split(model, datamodule, cfg.split, output_dir, cfg.report, trainer.loggers,
                                       details, csv_log if csv_log.is_file() else None, checkpoint_epoch(ckpt)))
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_output(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


@checked_overrides("eval")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(), run_dir_lock(cfg.paths.output_dir):
        use_cpu_settings(cfg.trainer)
        metrics = evaluate(cfg)
    log.info("metrics: %s", headline_metrics(metrics, cfg.split))


if __name__ == "__main__":
    main()
