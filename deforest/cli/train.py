"""``deforest-train``: fit, test the best checkpoint, write ``metrics.json``, ``summary.md`` and ``report.md``."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import get_method, instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from deforest.callbacks import SaveOnSigterm
from deforest.checkpoints import checkpoint_problem
from deforest.cli.errors import exit_on_user_error
from deforest.config_checks import (
    TRAIN_RULES,
    ConfigError,
    choice_problems,
    epoch_limit_problems,
    range_problems,
    train_choices,
)
from deforest.datamodule import TileDataModule
from deforest.hydra_ddp import ddp_children_join_this_job
from deforest.module import TileClassifier
from deforest.progress import progress_callbacks
from deforest.report import report_on_split
from deforest.safety import CheckpointError, RunInterrupted, run_dir_lock
from deforest.transforms import AugmentationError

log = logging.getLogger(__name__)

CONFIG_PATH = "pkg://deforest.conf"


def build_datamodule(data_cfg: DictConfig) -> TileDataModule:
    """The datamodule from the ``data`` group (``root`` only feeds the layout)."""
    options = OmegaConf.to_container(data_cfg, resolve=True)
    options.pop("root", None)
    layout = instantiate(options.pop("layout"))
    augment = instantiate(options.pop("augment", None) or [])
    return TileDataModule(layout=layout, augment=list(augment), **options)


def build_model(
    model_cfg: DictConfig, loss_cfg: DictConfig, datamodule: TileDataModule, tune_thresholds: str | None = None
) -> TileClassifier:
    """The classifier, sized and normalised from what the datamodule found."""
    options = OmegaConf.to_container(model_cfg, resolve=True)
    task = options.pop("task", None) or datamodule.task
    if task != datamodule.task:
        raise ValueError(f"model.task={task} but the data is {datamodule.task}")
    optimizer = instantiate(options.pop("optimizer"))
    scheduler = instantiate(options.pop("scheduler", None))
    input_pool, tile = options.get("input_pool", 1), min(datamodule.tile_size)
    if input_pool > 1 and tile // input_pool < 32:
        log.warning(
            "model.input_pool=%d leaves %d px of the %d px tiles: set model.input_pool=1 for small or "
            "coarse tiles (e.g. 16 px of 30 m Landsat)", input_pool, tile // input_pool, tile,
        )
    network_bands = network_band_positions(options.pop("network_exclude_bands", None), datamodule)
    loss = OmegaConf.to_container(loss_cfg, resolve=True)
    criterion = instantiate(loss.pop("criterion", None))
    return TileClassifier(
        task=task,
        class_names=datamodule.class_names,
        band_mean=datamodule.band_mean,
        band_std=datamodule.band_std,
        log_scale=datamodule.log_scale,
        bands=datamodule.bands,
        tile_size=list(datamodule.tile_size),
        source_band_count=datamodule.source_band_count,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=criterion,
        tune_thresholds=tune_thresholds,
        network_bands=network_bands,
        **options,
    )


def network_band_positions(exclude: list[str] | None, datamodule: TileDataModule) -> list[int] | None:
    """Positions among the loaded bands that the network sees: all but the ``exclude`` names.

    ``None`` (every band) when nothing is excluded or the data has no band names; names
    the data lacks are ignored, so one model config suits Sentinel-2 and other sensors.
    """
    names = datamodule.loaded_band_names
    if not exclude or names is None:
        return None
    positions = [i for i, name in enumerate(names) if name not in exclude]
    if not positions:
        raise ValueError(f"model.network_exclude_bands={exclude} leaves the network none of the bands {names}")
    if len(positions) == len(names):
        return None
    log.info("the network sees bands %s (model.network_exclude_bands=%s)", [names[i] for i in positions], exclude)
    return positions


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def check_train_config(cfg: DictConfig) -> None:
    """Every out-of-range or misspelt value at once, before any file is read (:class:`ConfigError`);
    a loud warning for a run without an epoch limit."""
    problems = range_problems(cfg, TRAIN_RULES) + choice_problems(cfg, train_choices()) + epoch_limit_problems(cfg)
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
            details = [f"checkpoint: `{best or 'final weights (no checkpoint)'}`", f"data: `{cfg.data.root}`"]
            metrics.update(report_on_split(model, datamodule, "test", output_dir, cfg.report, trainer.loggers, details))
    if trainer.is_global_zero:
        _write_records(output_dir, metrics, cfg, datamodule)
    return metrics


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


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The trainer with the configured callbacks and loggers, and a progress display that
    suits the output (rich bar on a terminal, log lines otherwise)."""
    progress, show_bar = progress_callbacks(cfg.trainer.get("enable_progress_bar", True))
    return instantiate(
        cfg.trainer,
        callbacks=_instantiate_group(cfg.get("callbacks")) + progress + [SaveOnSigterm()],
        logger=_instantiate_group(cfg.get("logger")),
        enable_progress_bar=show_bar,
    )


def _write_records(output_dir: Path, metrics: dict[str, Any], cfg: DictConfig, dm: TileDataModule) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    headline = [k for k in ("test/accuracy", "test/f1_macro", "test/f1_micro", "test/map") if k in metrics]
    lines = [
        "# deforest run summary",
        "",
        f"- data: `{cfg.data.root}` ({dm.task}, {len(dm.class_names)} classes, bands {dm.bands}, "
        f"tiles {dm.tile_size[0]}x{dm.tile_size[1]})",
        f"- splits: " + ", ".join(f"{s} {len(d)}" for s, d in dm.datasets.items()),
        f"- model: {cfg.model.backbone}, loss scheme {cfg.loss.scheme} ({cfg.loss.normalize})",
        f"- best checkpoint: `{metrics.get('best_checkpoint', '')}`",
        f"- bad tiles skipped: {len(dm.bad_tiles)}" + (" (listed in `bad_tiles.json`)" if dm.bad_tiles else ""),
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {metrics[k]:.4f} |" for k in headline],
        "",
    ]
    (output_dir / "summary.md").write_text("\n".join(lines))
    if dm.bad_tiles:
        (output_dir / "bad_tiles.json").write_text(json.dumps(dm.bad_tiles.problems, indent=2))
    log.info("metrics: %s", {k: round(metrics[k], 4) for k in headline})


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error(AugmentationError), ddp_children_join_this_job(), run_dir_lock(cfg.paths.output_dir):
        metrics = train(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
