"""Builders: the datamodule, classifier and trainer from the Hydra config groups.

The command-line entry points (``deforest.cli``) only parse, call these and report. What the
model expects of its input comes from the datamodule's :class:`~deforest.core.contract.InputSpec`
(for evaluation, the checkpoint's); nothing is copied across by hand. Everything that is
instantiated (``_target_``) comes from the current config, never from a checkpoint.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from deforest.core.bands import canonical_band
from deforest.core.contract import InputSpec, NetworkInput, Normalization
from deforest.core.cpu import use_onednn, use_threads
from deforest.core.errors import ConfigError
from deforest.core.progress import progress_callbacks
from deforest.data.datamodule import TileDataModule
from deforest.data.pairs import date_band_positions
from deforest.models.finetuning import BackboneFinetuning
from deforest.models.networks import smallest_tile
from deforest.models.weights import PretrainedWeights, band_plan, input_normalization, load_pretrained, resolve_weights
from deforest.runs.callbacks import SaveOnSigterm
from deforest.training.losses import MULTILABEL_ONLY
from deforest.training.module import TileClassifier
from deforest.training.settings import NetworkSettings

log = logging.getLogger(__name__)

#: what a ``model`` group without a ``_target_`` builds: the classifier from its flat keys
DEFAULT_MODEL_TARGET = "deforest.training.module.TileClassifier.from_keys"


def build_datamodule(data_cfg: DictConfig, **overrides: Any) -> TileDataModule:
    """The datamodule from the ``data`` group (``root`` only feeds the layout); ``overrides``
    are constructor arguments that do not come from the config (e.g. ``input_spec``).
    A pack stands alone: ``data.root`` and the layout are then neither resolved nor needed."""
    values = {key: data_cfg[key] for key in data_cfg if key not in ("root", "layout")}
    options = {key: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for key, v in values.items()}
    layout = None if options.get("packed") else instantiate(data_cfg.layout)
    augment = instantiate(options.pop("augment", None) or [])
    # the flat data.* keys, as documented, sorted into the settings groups (deforest.data.settings)
    return TileDataModule.from_keys(layout, list(augment), **{**options, **overrides})


def build_model(
    model_cfg: DictConfig, loss_cfg: DictConfig, datamodule: TileDataModule, tune_thresholds: str | None = None
) -> TileClassifier:
    """The classifier on the datamodule's contract, completed with the model's input settings
    (the bands the network sees, the input pooling) and started from ``model.weights`` when
    given: its bands matched by name, its input scaling replacing the data's in the contract.
    The datamodule then serves that contract (:meth:`TileDataModule.use_contract`)."""
    spec = datamodule.input_spec
    if spec is None:
        raise RuntimeError("call datamodule.setup() before build_model")
    options = OmegaConf.to_container(model_cfg, resolve=True)
    target = options.pop("_target_", None) or DEFAULT_MODEL_TARGET
    options.pop("_partial_", None)
    options.pop("unfreeze_backbone_at_epoch", None)  # a callback, see build_trainer
    backbone = options.get("backbone", "small_cnn")
    weights = resolve_weights(
        options.pop("weights", None), backbone, options.pop("weights_bands", None), options.pop("weights_normalization", None)
    )
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
    spec = replace(spec, network=NetworkInput(network_bands, input_pool))
    _check_fusion(options.get("fusion", "early"), spec, weights)
    _check_tile_fits(backbone, options, len(network_bands or spec.bands), spec.tile_size, input_pool)
    plan = None
    if weights is not None:
        names = spec.band_names
        network_names = names if names is None or network_bands is None else [names[i] for i in network_bands]
        plan = band_plan(weights, network_names, len(network_bands or spec.bands))
        spec = replace(spec, normalization=weights_normalization(weights, spec))
    # the data is served for this contract: its fill (a pretrained normalisation's, for one)
    # is what the checkpoint gives deforest-eval and prediction
    datamodule.use_contract(spec)
    loss = OmegaConf.to_container(loss_cfg, resolve=True)
    if loss.get("scheme") in MULTILABEL_ONLY and spec.task != "multilabel":
        # the task is known only from the data, after the config checks have run
        raise ConfigError(f"invalid config: loss.scheme={loss['scheme']} weighs the positive and negative terms of BCE "
                          f"apart and needs a multi-label task; this data is {spec.task} (use loss.scheme=auto)")
    criterion = instantiate(loss.pop("criterion", None))
    # the model group's _target_ takes the remaining flat model.* keys; what only the data, the
    # weights and the other groups know is given here
    model = instantiate({"_target_": target, "_partial_": True, **options}, _convert_="all")(
        spec, pretrained=plan, loss=loss, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
        tune_thresholds=tune_thresholds,
    )
    if weights is not None:
        load_pretrained(model.net, weights, plan, backbone, model.network_settings.small_tile_stem)
    return model


def _check_fusion(fusion: str, spec: InputSpec, weights: PretrainedWeights | None) -> None:
    """``model.fusion=siamese`` needs two-date samples whose dates hold the same bands, and
    starts from random weights: a :class:`ConfigError` before training, not in the model."""
    if fusion != "siamese":
        return
    names = spec.band_names
    network_names = names if names is None or spec.network.bands is None else [names[i] for i in spec.network.bands]
    try:
        date_band_positions(network_names)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if weights is not None:
        # pretrained weights are mapped onto one network's input bands (band_plan); the shared
        # backbone of one date's bands is another input, which that mapping does not cover yet
        raise ConfigError("model.fusion=siamese starts from random weights: model.weights is not supported with it "
                          "(use model.fusion=early with model.weights)")


def _check_tile_fits(backbone: str, options: dict[str, Any], channels: int, tile: list[int], input_pool: int) -> None:
    """A :class:`ConfigError` naming the smallest tile ``backbone`` takes when the tiles (or
    ``model.input_resize``) are smaller: before training, not in its first forward pass."""
    resize = options.get("input_resize")
    size = (int(resize), int(resize)) if resize else (int(tile[0]), int(tile[1]))
    net_options = {k: options[k] for k in ("small_tile_stem", "width", "dropout") if k in options}
    net_options.setdefault("small_tile_stem", NetworkSettings.small_tile_stem)
    smallest = smallest_tile(backbone, channels, size, input_pool, **net_options)
    if smallest is None:
        return
    what = f"the {size[0]}x{size[1]} px input (model.input_resize={resize})" if resize else f"the {size[0]}x{size[1]} px tiles"
    pool = f" with model.input_pool={input_pool}" if input_pool > 1 else ""
    raise ConfigError(
        f"model.backbone={backbone} cannot take {what}{pool}: the smallest it takes is {smallest}x{smallest} px "
        f"(set model.input_resize={smallest}, or use a backbone that takes small tiles, e.g. model=small_cnn)"
    )


def weights_normalization(weights: PretrainedWeights, spec: InputSpec) -> Normalization:
    """The contract's normalisation under pretrained ``weights``: their own input scaling
    when they have one (``source`` names them), else the data's statistics unchanged."""
    norm = spec.normalization
    data_mean = norm.mean if norm.transform == "log1p" else [m * norm.scale for m in norm.mean]
    data_std = norm.std if norm.transform == "log1p" else [s * norm.scale for s in norm.std]
    chosen = input_normalization(weights, spec.band_names, data_mean, data_std, norm.transform == "log1p")
    if chosen.source == "data statistics":
        return norm
    log.info("input normalisation: %s", chosen.source)
    return Normalization(chosen.mean, chosen.std, "log1p" if chosen.log_scale else "scale", 1.0, source=chosen.source)


def network_band_positions(exclude: list[str] | None, names: list[str] | None) -> list[int] | None:
    """Positions among the loaded bands (named ``names``) that the network sees: all but ``exclude``.

    ``None`` (every band) when nothing is excluded or the data has no band names; names
    the data lacks are ignored, so one model config suits Sentinel-2 and other sensors.
    """
    if not exclude or names is None:
        return None
    # matched by canonical_band (B1 is B01); a band of one date of a pair (B01@t0,
    # deforest.mapping.change) is excluded by its band name
    excluded = {canonical_band(band) for band in exclude}
    positions = [i for i, name in enumerate(names)
                 if canonical_band(name) not in excluded and canonical_band(name.split("@", 1)[0]) not in excluded]
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


#: trainer settings for this process, not for Lightning's Trainer
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
    """The trainer with the configured callbacks and loggers, backbone fine-tuning when
    ``model.unfreeze_backbone_at_epoch`` asks for it, and a progress display that suits the
    output (rich bar on a terminal, log lines otherwise)."""
    options = trainer_options(cfg)
    progress, show_bar = progress_callbacks(options.get("enable_progress_bar", True))
    unfreeze_at = cfg.model.get("unfreeze_backbone_at_epoch") if "model" in cfg else None
    finetuning = [BackboneFinetuning(unfreeze_at)] if unfreeze_at is not None else []
    return instantiate(
        options,
        callbacks=instantiate_group(cfg.get("callbacks")) + finetuning + progress + [SaveOnSigterm()],
        logger=instantiate_group(cfg.get("logger")),
        enable_progress_bar=show_bar,
    )


__all__ = [
    "build_datamodule", "build_model", "build_trainer", "instantiate_group", "network_band_positions",
    "trainer_options", "use_cpu_settings", "weights_normalization",
]
