"""``deforest-tile``: scene (+ vector or raster labels) -> GeoTIFF tiles and ``labels.csv``."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.core.errors import ConfigError
from deforest.core.outputs import check_outputs, check_replaceable
from deforest.core.vocabulary import CONFIG_PATH
from deforest.mapping.change import tile_pair
from deforest.mapping.labelling import RasterLabels, VectorLabels
from deforest.mapping.scene import Scene
from deforest.mapping.tiling import MANIFEST_COLUMNS, Labeller, TilingReport, tile_scene
from deforest.runs.config_checks import TILE_CHOICES, TILE_RULES, check_ranges

log = logging.getLogger(__name__)

#: the header of the pairs.csv that deforest-tile before=/after= writes (deforest.mapping.change.tile_pair)
PAIR_COLUMNS_WRITTEN = ("before", "after", "labels", *[c for c in MANIFEST_COLUMNS if c not in ("path", "labels")])

# not imported from deforest.cli.train: tiling needs no torch, and starts faster without it


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
    check_ranges(cfg, TILE_RULES, TILE_CHOICES)
    _check_outputs(cfg)
    if cfg.get("before") is not None or cfg.get("after") is not None:
        return _tile_pair(cfg)
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


def _check_outputs(cfg: DictConfig) -> None:
    """Nothing ``out=`` holds or will hold (the folder, its manifests, its tiles) is an input."""
    if OmegaConf.is_missing(cfg, "out"):
        return  # the tiling itself names the missing value
    inputs = {}
    for key in ("scene", "before", "after", "labels", "label_raster"):
        if not OmegaConf.is_missing(cfg, key) and cfg.get(key) is not None:
            inputs[key] = OmegaConf.to_container(cfg[key]) if OmegaConf.is_list(cfg[key]) else cfg[key]
    out = Path(cfg.out)
    check_outputs({"out": out}, inputs, files=False)
    written = [out / "labels.csv", out / "pairs.csv"]
    for folder in ("tiles", "t0/tiles", "t1/tiles"):
        written += sorted((out / folder).glob("*.tif"))
    for path in written:
        check_outputs({"out": path}, inputs)
    # a manifest is replaced only when deforest-tile wrote it (its header): hand labels are kept
    pair = cfg.get("before") is not None or cfg.get("after") is not None
    manifest, header = (out / "pairs.csv", PAIR_COLUMNS_WRITTEN) if pair else (out / "labels.csv", MANIFEST_COLUMNS)
    check_replaceable(manifest, "deforest-tile", lambda path: _header(path) == list(header), bool(cfg.get("overwrite")))


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return next(csv.reader(handle), [])


def _tile_pair(cfg: DictConfig) -> dict[str, object]:
    """before=/after=: the same windows of both dates and ``pairs.csv`` (:func:`deforest.mapping.change.tile_pair`)."""
    if cfg.get("before") is None or cfg.get("after") is None:
        raise ConfigError("give both before=PATH and after=PATH to tile a pair of dates")
    if not OmegaConf.is_missing(cfg, "scene"):
        raise ConfigError("give scene=PATH (one date) or before=/after= (two dates), not both")
    report = tile_pair(
        [cfg.before, cfg.after], cfg.out, lambda scene: build_labeller(cfg, scene), tile_size=cfg.tile_size,
        stride=cfg.stride, max_nodata=cfg.max_nodata, center_on_points=cfg.center_on_points,
    )
    log.info("wrote %d tile pairs to %s (%d tiles left out: too much nodata on one date); pairs per class %s",
             report["pairs"], report["manifest"], report["skipped"], report["class_counts"])
    log.info("train on them with: deforest-train experiment=forest_loss data.root=%s", cfg.out)
    return report


@checked_overrides("tile")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="tile")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        tile(cfg)


if __name__ == "__main__":
    main()
