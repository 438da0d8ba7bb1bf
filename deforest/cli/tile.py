"""``deforest-tile``: scene (+ vector or raster labels) -> GeoTIFF tiles and ``labels.csv``."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.config_checks import TILE_RULES, check_ranges
from deforest.labelling import RasterLabels, VectorLabels
from deforest.scene import Scene
from deforest.tiling import Labeller, TilingReport, tile_scene

log = logging.getLogger(__name__)

# not imported from deforest.cli.train: tiling needs no torch, and starts faster without it
CONFIG_PATH = "pkg://deforest.conf"


def build_labeller(cfg: DictConfig, scene: Scene) -> Labeller | None:
    """Vector labels, a label raster, or none (tiles for prediction)."""
    class_names = OmegaConf.to_container(cfg.class_names) if cfg.get("class_names") else None
    if cfg.get("labels") and cfg.get("label_raster"):
        raise ValueError("give labels=PATH (vector) or label_raster=PATH, not both")
    if cfg.get("labels"):
        return VectorLabels(cfg.labels, cfg.label_field, scene, cfg.mode, cfg.min_fraction, class_names)
    if cfg.get("label_raster"):
        return RasterLabels(cfg.label_raster, scene, cfg.mode, cfg.min_fraction, class_names)
    return None


def tile(cfg: DictConfig) -> TilingReport:
    """Tile the configured scene and log what was written and what was skipped."""
    check_ranges(cfg, TILE_RULES)
    scene_paths = OmegaConf.to_container(cfg.scene) if OmegaConf.is_list(cfg.scene) else cfg.scene
    with Scene(scene_paths) as scene:
        labeller = build_labeller(cfg, scene)
        try:
            report = tile_scene(
                scene, cfg.out, cfg.tile_size, cfg.stride, cfg.max_nodata, labeller, cfg.center_on_points
            )
        finally:
            if isinstance(labeller, RasterLabels):
                labeller.close()
    log.info(
        "wrote %d tiles to %s; skipped %d with more than %.0f%% nodata, %d without a label, "
        "%d points outside the scene; tiles per class %s",
        report.written, cfg.out, report.skipped_nodata, 100 * cfg.max_nodata, report.unlabelled,
        report.outside, report.class_counts,
    )
    if labeller is not None:
        task = "" if cfg.mode == "majority" else " data.layout.task=multilabel"
        log.info("train on them with: deforest-train data=manifest data.root=%s%s", cfg.out, task)
    return report


@checked_overrides("tile")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="tile")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        tile(cfg)


if __name__ == "__main__":
    main()
