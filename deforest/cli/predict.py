"""``deforest-predict``: a checkpoint applied to a scene (GeoTIFF map) or to tiles (CSV)."""

from __future__ import annotations

import dataclasses
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.cli.train import CONFIG_PATH
from deforest.config_checks import PREDICT_RULES, ConfigError, check_ranges
from deforest.predict import load_classifier, predict_scene, predict_tiles, resolve_device
from deforest.scene import Scene

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> dict[str, object]:
    """Run the configured prediction; returns a summary of what was written."""
    check_ranges(cfg, PREDICT_RULES)
    if (cfg.get("scene") is None) == (cfg.get("tiles") is None):
        raise ConfigError("give exactly one of scene=PATH (a map) or tiles=DIR (a CSV)")
    model, spec = load_classifier(cfg.ckpt_path, resolve_device(cfg.device))
    if cfg.get("tile_size") and [cfg.tile_size] * 2 != spec.tile_size:
        log.warning("tile_size=%d overrides the checkpoint's %s", cfg.tile_size, spec.tile_size)
        spec = dataclasses.replace(spec, tile_size=[int(cfg.tile_size)] * 2)
    if cfg.get("tiles") is not None:
        summary = predict_tiles(model, spec, cfg.tiles, cfg.out, cfg.batch_size)
        log.info("wrote predictions for %d tiles to %s (band order %s)", summary["tiles"], cfg.out, summary["band_order"])
        return summary
    scene_paths = OmegaConf.to_container(cfg.scene) if OmegaConf.is_list(cfg.scene) else cfg.scene
    with Scene(scene_paths) as scene:
        summary = predict_scene(
            model, spec, scene, cfg.out, cfg.stride, cfg.batch_size, cfg.full_resolution,
            cfg.max_nodata, cfg.dtype, cfg.cog, tags={"checkpoint": str(cfg.ckpt_path)},
        )
    log.info("wrote %s: %s", cfg.out, summary)
    return summary


@checked_overrides("predict")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        predict(cfg)


if __name__ == "__main__":
    main()
