"""Builders: the datamodule, classifier and trainer from the Hydra config groups.

The command-line entry points (``deforest.cli``) only parse, call these and report. What the
model expects of its input comes from the datamodule's :class:`~deforest.contract.InputSpec`
(for evaluation, the checkpoint's); nothing is copied across by hand. Everything that is
instantiated (``_target_``) comes from the current config, never from a checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from deforest.datamodule import TileDataModule
from deforest.module import TileClassifier
from deforest.progress import progress_callbacks

log = logging.getLogger(__name__)


def build_datamodule(data_cfg: DictConfig, **overrides: Any) -> TileDataModule:
    """The datamodule from the ``data`` group (``root`` only feeds the layout); ``overrides``
    are constructor arguments that do not come from the config (e.g. ``input_spec``)."""
    options = OmegaConf.to_container(data_cfg, resolve=True)
    options.pop("root", None)
    layout = instantiate(options.pop("layout"))
    augment = instantiate(options.pop("augment", None) or [])
    return TileDataModule(layout=layout, augment=list(augment), **{**options, **overrides})


def build_model(
    model_cfg: DictConfig, loss_cfg: DictConfig, datamodule: TileDataModule, tune_thresholds: str | None = None
) -> TileClassifier:
    """The classifier on the datamodule's contract, completed with the model's input settings
    (the bands the network sees, the input pooling)."""
    spec = datamodule.input_spec
    if spec is None:
        raise RuntimeError("call datamodule.setup() before build_model")
    options = OmegaConf.to_container(model_cfg, resolve=True)
    task = options.pop("task", None) or spec.task
    if task != spec.task:
        raise ValueError(f"model.task={task} but the data is {spec.task}")
    optimizer = instantiate(options.pop("optimizer"))
    scheduler = instantiate(options.pop("scheduler", None))
    input_pool, tile = int(options.pop("input_pool", 1)), min(spec.tile_size)
    if input_pool > 1 and tile // input_pool < 32:
        log.warning(
            "model.input_pool=%d leaves %d px of the %d px tiles: set model.input_pool=1 for small or "
            "coarse tiles (e.g. 16 px of 30 m Landsat)", input_pool, tile // input_pool, tile,
        )
    network_bands = network_band_positions(options.pop("network_exclude_bands", None), spec.band_names)
    loss = OmegaConf.to_container(loss_cfg, resolve=True)
    criterion = instantiate(loss.pop("criterion", None))
    return TileClassifier(
        replace(spec, network_bands=network_bands, input_pool=input_pool),
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=criterion,
        tune_thresholds=tune_thresholds,
        **options,
    )


def network_band_positions(exclude: list[str] | None, names: list[str] | None) -> list[int] | None:
    """Positions among the loaded bands (named ``names``) that the network sees: all but ``exclude``.

    ``None`` (every band) when nothing is excluded or the data has no band names; names
    the data lacks are ignored, so one model config suits Sentinel-2 and other sensors.
    """
    if not exclude or names is None:
        return None
    positions = [i for i, name in enumerate(names) if name not in exclude]
    if not positions:
        raise ValueError(f"model.network_exclude_bands={exclude} leaves the network none of the bands {names}")
    if len(positions) == len(names):
        return None
    log.info("the network sees bands %s (model.network_exclude_bands=%s)", [names[i] for i in positions], exclude)
    return positions


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Every node of a config group that has a ``_target_`` (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The trainer with the configured callbacks and loggers, and a progress display that
    suits the output (rich bar on a terminal, log lines otherwise)."""
    progress, show_bar = progress_callbacks(cfg.trainer.get("enable_progress_bar", True))
    return instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")) + progress,
        logger=instantiate_group(cfg.get("logger")),
        enable_progress_bar=show_bar,
    )


__all__ = ["build_datamodule", "build_model", "build_trainer", "instantiate_group", "network_band_positions"]
