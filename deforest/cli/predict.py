"""``deforest-predict``: a checkpoint applied to a scene (GeoTIFF map) or to tiles (CSV)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.core.errors import ConfigError, DatasetError
from deforest.core.outputs import check_outputs, check_replaceable
from deforest.core.vocabulary import CONFIG_PATH
from deforest.data.input_check import Allow
from deforest.data.pairs import is_dated
from deforest.mapping.change import default_change_out, pair_paths, predict_change
from deforest.mapping.scene import Scene
from deforest.mapping.serve import load_model
from deforest.mapping.sliding import predict_scene, predict_tiles, tile_paths
from deforest.mapping.writer import is_earlier_output
from deforest.runs.config_checks import PREDICT_CHOICES, PREDICT_RULES, check_ranges, missing_value_problems

log = logging.getLogger(__name__)

# deforest.cli.train's, not imported from there: it imports torch, and an ONNX model (ckpt_path=*.onnx)
# is predicted without it


def predict(cfg: DictConfig) -> dict[str, object]:
    """Run the configured prediction; returns a summary of what was written."""
    missing = missing_value_problems(cfg)
    if missing:
        raise ConfigError("invalid config: " + missing[0])
    check_ranges(cfg, PREDICT_RULES, PREDICT_CHOICES)
    pair = pair_paths(cfg)  # before=/after=: a change map
    if pair is None and (cfg.get("scene") is None) == (cfg.get("tiles") is None):
        raise ConfigError("give exactly one of scene=PATH (a map), tiles=DIR (a CSV) or before=PATH after=PATH (a change map)")
    model, spec = load_model(cfg.ckpt_path, cfg.device)  # a batch -> probabilities function: checkpoint or .onnx
    if cfg.get("tile_size") and [cfg.tile_size] * 2 != spec.tile_size:
        log.warning("tile_size=%d overrides the checkpoint's %s", cfg.tile_size, spec.tile_size)
        spec = dataclasses.replace(spec, tile_size=[int(cfg.tile_size)] * 2)
    if cfg.get("tiles") is not None:
        _check_outputs(cfg, {"tiles": _tile_inputs(cfg.tiles)}, example="predictions.csv")
        summary = predict_tiles(model, spec, cfg.tiles, cfg.out, cfg.batch_size, allow=Allow.from_config(cfg))
        log.info("wrote predictions for %d tiles to %s (band order %s)", summary["tiles"], cfg.out, summary["band_order"])
        return summary
    scene_paths = None if pair else OmegaConf.to_container(cfg.scene) if OmegaConf.is_list(cfg.scene) else cfg.scene
    if pair is None and is_dated(spec.band_names) and isinstance(scene_paths, list) and len(scene_paths) == 2:
        pair = scene_paths  # scene=[before,after] for a checkpoint trained on pairs
    if pair is not None:
        change_out = cfg.change.get("out") or default_change_out(cfg.out)
        _check_outputs(cfg, {"before": pair[0], "after": pair[1]}, {"change.out": change_out})
        return _predict_change(cfg, model, spec, pair)
    _check_outputs(cfg, {"scene": scene_paths})
    with Scene(scene_paths) as scene:
        summary = predict_scene(
            model, spec, scene, cfg.out, cfg.stride, cfg.batch_size, cfg.full_resolution,
            cfg.max_nodata, cfg.dtype, cfg.cog, tags={"checkpoint": str(cfg.ckpt_path)}, allow=Allow.from_config(cfg),
        )
    log.info("wrote %s: %s", cfg.out, summary)
    return summary


def _tile_inputs(tiles: str) -> list[Path]:
    """The files a ``tiles=`` prediction reads: the folder's ``labels.csv`` and every tile."""
    try:
        paths = tile_paths(tiles)
    except FileNotFoundError as err:  # an empty or missing tiles= folder: the user's input, one line
        raise DatasetError(str(err)) from None
    manifest = Path(tiles) / "labels.csv"
    return [manifest, *paths] if manifest.is_file() else paths


def _check_outputs(cfg: DictConfig, inputs: dict, more: dict | None = None, example: str = "map.tif") -> None:
    """Before anything is written: no output is an input (the checkpoint included), and an
    existing output is replaced only when this command wrote it (or with ``overwrite=true``)."""
    outputs = {"out": cfg.out, **(more or {})}
    check_outputs(outputs, {"ckpt_path": cfg.ckpt_path, **inputs}, example=example)
    for path in outputs.values():
        check_replaceable(path, "deforest-predict", is_earlier_output, bool(cfg.get("overwrite")))


def _predict_change(cfg: DictConfig, model, spec, pair: list[str]) -> dict[str, object]:
    """Two scenes -> the class/probability map and the change map; logs the mapped loss."""
    summary = predict_change(
        model, spec, pair, cfg.out, cfg.change, stride=cfg.stride, batch_size=cfg.batch_size,
        full_resolution=cfg.full_resolution, max_nodata=cfg.max_nodata, dtype=cfg.dtype, cog=cfg.cog,
        allow=Allow.from_config(cfg),
        tags={"checkpoint": str(cfg.ckpt_path), "before": str(pair[0]), "after": str(pair[1])},
    )
    hectares = summary["loss_ha"]
    if hectares is None:
        log.info("wrote %s and %s (the scenes have no CRS: no area)", cfg.out, summary["change_out"])
    else:
        log.info(
            "mapped %s: %.2f ha (%.2f ha high confidence, %.2f ha low; patches under %s ha dropped): %s",
            cfg.change.class_name, hectares["total"], hectares["high"], hectares["low"], cfg.change.min_area_ha,
            summary["change_out"],
        )
    return summary


@checked_overrides("predict")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        predict(cfg)


if __name__ == "__main__":
    main()
