"""``deforest-train``: fit, test the best checkpoint, write ``metrics.json``, ``summary.md`` and ``report.md``."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import get_method
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.core.contract import InputSpec
from deforest.core.errors import ConfigError
from deforest.core.outputs import write_text_output
from deforest.core.safety import CheckpointError, RunInterrupted, run_dir_lock
from deforest.core.vocabulary import CONFIG_PATH
from deforest.data.datamodule import TileDataModule
from deforest.data.transforms import AugmentationError
from deforest.models.weights import WeightsError
from deforest.runs.build import build_datamodule, build_model, build_trainer, use_cpu_settings
from deforest.runs.callbacks import SaveOnSigterm
from deforest.runs.config_checks import (
    TRAIN_RULES,
    choice_problems,
    epoch_limit_problems,
    missing_value_problems,
    range_problems,
    train_choices,
)
from deforest.runs.hydra_ddp import ddp_children_join_this_job
from deforest.runs.report import report_on_split
from deforest.training.checkpoints import checkpoint_epoch, checkpoint_problem
from deforest.training.module import TileClassifier

log = logging.getLogger(__name__)



def check_train_config(cfg: DictConfig) -> None:
    """Every out-of-range or misspelt value at once, before any file is read (:class:`ConfigError`);
    a loud warning for a run without an epoch limit."""
    problems = missing_value_problems(cfg) + range_problems(cfg, TRAIN_RULES) + choice_problems(cfg, train_choices())
    problems += epoch_limit_problems(cfg)
    unbounded = cfg.trainer.get("max_epochs") == -1 and cfg.trainer.get("max_steps") in (None, -1)
    scheduler = cfg.model.get("scheduler")
    if unbounded and scheduler and scheduler.get("_target_"):
        try:
            params = inspect.signature(get_method(scheduler._target_)).parameters
        except Exception:  # an unimportable target fails where it is built, naming itself
            params = {}
        planned = [name for name in ("total_steps", "T_max") if name in params and scheduler.get(name) is None]
        if planned:
            problems.append(
                f"trainer.max_epochs=-1 (no limit) leaves model.scheduler ({scheduler._target_.rsplit('.', 1)[-1]}) "
                f"no {planned[0]} to plan for: set trainer.max_steps, or model.scheduler=null"
            )
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    if unbounded:
        log.warning(
            "trainer.max_epochs=-1: NO EPOCH LIMIT. This run trains until it is stopped (SIGTERM or Ctrl-C; "
            "SIGTERM saves last.ckpt) or until trainer.max_steps; set trainer.max_epochs=N for a run that ends"
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint and write the run's records; returns the metrics."""
    check_train_config(cfg)
    use_cpu_settings(cfg.trainer)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_path(cfg.get("ckpt_path"), output_dir)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg.model, cfg.loss, datamodule, cfg.get("tune_thresholds"))
    trainer = build_trainer(cfg)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's, a SystemExit with status 0: the run would look finished
        raise _interrupted(trainer, "training") from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        try:
            results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        except SIGTERMException:
            raise _interrupted(trainer, "testing") from None
        metrics.update({k: float(v) for k, v in results[0].items()})
        metrics["best_checkpoint"] = best
        if trainer.is_global_zero and cfg.report.enabled:
            details = [f"checkpoint: `{best or 'final weights (no checkpoint)'}`", f"data: `{_data_source(cfg)}`"]
            tested_epoch = checkpoint_epoch(best) if best else trainer.current_epoch - 1
            metrics.update(report_on_split(model, datamodule, "test", output_dir, cfg.report, trainer.loggers,
                                           details, tested_epoch=tested_epoch))
    if trainer.is_global_zero:
        _write_records(output_dir, metrics, cfg, datamodule, model)
    return metrics


def _data_source(cfg: DictConfig) -> str:
    """What the run trained on: the pack when there is one, else the data root."""
    return str(cfg.data.get("packed") or cfg.data.root)


def _interrupted(trainer: pl.Trainer, stage: str) -> RunInterrupted:
    saved = next((c.saved for c in trainer.callbacks if isinstance(c, SaveOnSigterm) and c.saved), None)
    where = f"saved {saved}" if saved else "last.ckpt as of the last save"
    return RunInterrupted(
        f"stopped by SIGTERM while {stage} at global step {trainer.global_step}; {where}. Resume with the same "
        f"overrides plus hydra.run.dir={trainer.default_root_dir} ckpt_path=auto"
    )


def resume_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from, checked readable before any file is indexed.

    ``ckpt_path=auto``: this run directory's newest readable checkpoint (``last.ckpt``, or
    when that one is truncated the newest other one, said in a warning), so rerunning a killed
    job with the same ``hydra.run.dir`` continues it; none there: a fresh start. A named
    checkpoint that cannot be read is a :class:`CheckpointError`.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "auto":
        problem = checkpoint_problem(ckpt_path)
        if problem is not None:
            raise problem
        return str(ckpt_path)
    folder = output_dir / "checkpoints"
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)
    unreadable = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            if unreadable:
                log.warning("ckpt_path=auto: %s; resuming from %s instead", "; ".join(unreadable), candidate)
            else:
                log.info("ckpt_path=auto: resuming from %s", candidate)
            return str(candidate)
        unreadable.append(str(problem))
    if unreadable:
        raise CheckpointError(folder, f"ckpt_path=auto found no readable checkpoint ({'; '.join(unreadable)})")
    return None


PRINTED_METRICS = ("accuracy", "f1_macro", "f1_micro", "map")


def headline_metrics(metrics: dict[str, Any], split: str = "test") -> dict[str, float]:
    """The few numbers a run is judged by, as the console and ``summary.md`` show them."""
    return {f"{split}/{k}": round(float(metrics[f"{split}/{k}"]), 4) for k in PRINTED_METRICS if f"{split}/{k}" in metrics}


def band_lines(spec: InputSpec, statistics_head: bool) -> list[str]:
    """``summary.md`` lines naming the loaded bands and the ones the network sees."""
    names = spec.band_names or [f"band {b}" for b in spec.bands]
    seen = names if spec.network.bands is None else [names[i] for i in spec.network.bands]
    head = "; the band-statistics head sees every band" if statistics_head else ""
    return [f"- bands: {', '.join(names)} ({len(names)})",
            f"- the network sees: {', '.join(seen)} ({len(seen)}){head}"]


def _write_records(
    output_dir: Path, metrics: dict[str, Any], cfg: DictConfig, dm: TileDataModule, model: TileClassifier
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    # metrics.json marks a finished run: it is written whole, after the report, or not at all
    write_text_output(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    headline = headline_metrics(metrics)
    lines = [
        "# deforest run summary",
        "",
        f"- data: `{_data_source(cfg)}` ({dm.task}, {len(dm.class_names)} classes, "
        f"tiles {dm.tile_size[0]}x{dm.tile_size[1]})",
        *band_lines(model.spec, model.band_statistics is not None),
        f"- splits: " + ", ".join(f"{s} {len(d)}" for s, d in dm.datasets.items())
        + f" ({dm.input_spec.split.kind}, digest {dm.input_spec.split.digest}, {dm.dropped_at_edges} dropped at block edges)",
        f"- model: {cfg.model.backbone} (weights: {cfg.model.get('weights') or 'random'}), "
        f"loss {model.criterion.scheme} (loss.scheme={cfg.loss.scheme}, {cfg.loss.normalize}), "
        f"training draw {dm.sampler} (data.sampler={cfg.data.get('sampler')})",
        f"- best checkpoint: `{metrics.get('best_checkpoint', '')}`",
        f"- bad tiles skipped: {len(dm.bad_tiles)}" + (" (listed in `bad_tiles.json`)" if dm.bad_tiles else ""),
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in headline.items()],
        "",
    ]
    write_text_output(output_dir / "summary.md", "\n".join(lines))
    if dm.bad_tiles:
        write_text_output(output_dir / "bad_tiles.json", json.dumps(dm.bad_tiles.problems, indent=2))
    if headline:
        log.info("metrics: %s", headline)


@checked_overrides("train")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error(AugmentationError, WeightsError), ddp_children_join_this_job(), run_dir_lock(cfg.paths.output_dir):
        metrics = train(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
