"""``deforest-train``: fit, test the best checkpoint, write ``metrics.json``, ``summary.md`` and ``report.md``."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from deforest.checkpoints import checkpoint_epoch
from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.config_checks import TRAIN_RULES, check_ranges
from deforest.cpu import use_onednn, use_threads
from deforest.datamodule import TileDataModule
from deforest.finetuning import BackboneFinetuning
from deforest.hydra_ddp import ddp_children_join_this_job
from deforest.module import TileClassifier
from deforest.progress import progress_callbacks
from deforest.report import report_on_split
from deforest.transforms import AugmentationError
from deforest.weights import WeightsError, band_plan, input_normalization, load_pretrained, resolve_weights

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
    """The classifier, sized and normalised from what the datamodule found, and started from
    ``model.weights`` when given (its bands matched by name, its input scaling kept)."""
    options = OmegaConf.to_container(model_cfg, resolve=True)
    options.pop("unfreeze_backbone_at_epoch", None)  # a callback, see build_trainer
    backbone = options.get("backbone", "small_cnn")
    weights = resolve_weights(
        options.pop("weights", None), backbone, options.pop("weights_bands", None), options.pop("weights_normalization", None)
    )
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
    names = datamodule.loaded_band_names
    plan = None
    if weights is not None:
        network_names = names if names is None or network_bands is None else [names[i] for i in network_bands]
        plan = band_plan(weights, network_names, len(network_bands) if network_bands else datamodule.num_bands)
    norm = input_normalization(weights, names, datamodule.band_mean, datamodule.band_std, datamodule.log_scale)
    if weights is not None:
        log.info("input normalisation: %s", norm.source)
    loss = OmegaConf.to_container(loss_cfg, resolve=True)
    criterion = instantiate(loss.pop("criterion", None))
    model = TileClassifier(
        task=task,
        class_names=datamodule.class_names,
        band_mean=norm.mean,
        band_std=norm.std,
        log_scale=norm.log_scale,
        normalization_source=norm.source,
        bands=datamodule.bands,
        band_names=names,
        tile_size=list(datamodule.tile_size),
        source_band_count=datamodule.source_band_count,
        pretrained=plan,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=criterion,
        tune_thresholds=tune_thresholds,
        network_bands=network_bands,
        **options,
    )
    if weights is not None:
        load_pretrained(model.net, weights, plan, backbone, options.get("small_tile_stem", True))
    return model


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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint and write the run's records; returns the metrics."""
    check_ranges(cfg, TRAIN_RULES)
    use_cpu_settings(cfg.trainer)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg.model, cfg.loss, datamodule, cfg.get("tune_thresholds"))
    trainer = build_trainer(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(cfg.get("ckpt_path"), output_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in results[0].items()})
        metrics["best_checkpoint"] = best
        if trainer.is_global_zero and cfg.report.enabled:
            details = [f"checkpoint: `{best or 'final weights (no checkpoint)'}`", f"data: `{cfg.data.root}`"]
            tested_epoch = checkpoint_epoch(best) if best else trainer.current_epoch - 1
            metrics.update(report_on_split(model, datamodule, "test", output_dir, cfg.report, trainer.loggers,
                                           details, tested_epoch=tested_epoch))
    if trainer.is_global_zero:
        _write_records(output_dir, metrics, cfg, datamodule, model)
    return metrics


def resume_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``ckpt_path=auto``: resume from this run directory's ``last.ckpt`` when there is one,
    so rerunning a killed job with the same ``hydra.run.dir`` continues it."""
    if ckpt_path != "auto":
        return ckpt_path
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("ckpt_path=auto: resuming from %s", last)
        return str(last)
    return None


# trainer settings for this process, not for Lightning's Trainer
PROCESS_SETTINGS = ("num_threads", "onednn")


def use_cpu_settings(trainer_cfg: DictConfig) -> None:
    """Threads and oneDNN as ``trainer.num_threads`` / ``trainer.onednn`` say, before any work."""
    use_threads(trainer_cfg.get("num_threads"))
    use_onednn(trainer_cfg.get("onednn", True))


def trainer_options(cfg: DictConfig) -> DictConfig:
    """``cfg.trainer`` without :data:`PROCESS_SETTINGS`: what ``lightning.Trainer`` takes.
    A node of a copy of the whole config, so its interpolations still resolve."""
    trainer = copy.deepcopy(cfg).trainer
    with open_dict(trainer):
        for key in PROCESS_SETTINGS:
            trainer.pop(key, None)
    return trainer


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The trainer with the configured callbacks and loggers, and a progress display that
    suits the output (rich bar on a terminal, log lines otherwise)."""
    options = trainer_options(cfg)
    progress, show_bar = progress_callbacks(options.get("enable_progress_bar", True))
    unfreeze_at = cfg.model.get("unfreeze_backbone_at_epoch")
    finetuning = [BackboneFinetuning(unfreeze_at)] if unfreeze_at is not None else []
    return instantiate(
        options,
        callbacks=_instantiate_group(cfg.get("callbacks")) + finetuning + progress,
        logger=_instantiate_group(cfg.get("logger")),
        enable_progress_bar=show_bar,
    )


HEADLINE = ("accuracy", "f1_macro", "f1_micro", "map")


def headline_metrics(metrics: dict[str, Any], split: str = "test") -> dict[str, float]:
    """The few numbers a run is judged by, as the console and ``summary.md`` show them."""
    return {f"{split}/{k}": round(float(metrics[f"{split}/{k}"]), 4) for k in HEADLINE if f"{split}/{k}" in metrics}


def band_lines(dm: TileDataModule, network_bands: list[int] | None, statistics_head: bool) -> list[str]:
    """``summary.md`` lines naming the loaded bands and the ones the network sees."""
    names = dm.loaded_band_names or [f"band {b}" for b in dm.bands]
    seen = names if network_bands is None else [names[i] for i in network_bands]
    head = "; the band-statistics head sees every band" if statistics_head else ""
    return [f"- bands: {', '.join(names)} ({len(names)})",
            f"- the network sees: {', '.join(seen)} ({len(seen)}){head}"]


def _write_records(
    output_dir: Path, metrics: dict[str, Any], cfg: DictConfig, dm: TileDataModule, model: TileClassifier
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    headline = headline_metrics(metrics)
    lines = [
        "# deforest run summary",
        "",
        f"- data: `{cfg.data.root}` ({dm.task}, {len(dm.class_names)} classes, "
        f"tiles {dm.tile_size[0]}x{dm.tile_size[1]})",
        *band_lines(dm, model.hparams.get("network_bands"), bool(model.hparams.get("band_statistics"))),
        f"- splits: " + ", ".join(f"{s} {len(d)}" for s, d in dm.datasets.items()),
        f"- model: {cfg.model.backbone} (weights: {cfg.model.get('weights') or 'random'}), loss scheme {cfg.loss.scheme} ({cfg.loss.normalize})",
        f"- best checkpoint: `{metrics.get('best_checkpoint', '')}`",
        f"- bad tiles skipped: {len(dm.bad_tiles)}" + (" (listed in `bad_tiles.json`)" if dm.bad_tiles else ""),
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in headline.items()],
        "",
    ]
    (output_dir / "summary.md").write_text("\n".join(lines))
    if dm.bad_tiles:
        (output_dir / "bad_tiles.json").write_text(json.dumps(dm.bad_tiles.problems, indent=2))
    if headline:
        log.info("metrics: %s", headline)


@checked_overrides("train")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error(AugmentationError, WeightsError), ddp_children_join_this_job():
        metrics = train(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
