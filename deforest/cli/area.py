"""``deforest-area``: the area of each map class from a reference sample (Olofsson et al. 2014).

``deforest-area map=MAP.tif reference=POINTS.gpkg class_field=FIELD`` estimates; ``deforest-area
sample map=MAP.tif n=N`` draws the stratified random sample to label first. A Hydra app like the
other commands (``key=value`` arguments, ``--help``, one line for a misspelt key), with its own
config (conf/area.yaml). See docs/forest-loss.md.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.core.errors import ConfigError
from deforest.core.outputs import check_outputs
from deforest.core.vocabulary import CONFIG_PATH
from deforest.mapping.area import AreaError
from deforest.mapping.reference_sample import assess
from deforest.mapping.sampling_design import allocate, draw_sample, sample_markdown, write_sample
from deforest.mapping.strata import map_class_areas

log = logging.getLogger(__name__)

# not imported from deforest.cli.train: the area needs no torch, and starts faster without it
#: first arguments naming the action (``deforest-area sample ...``); the config key is ``action``
ACTIONS = ("estimate", "sample")


def _plain(node: object) -> object:
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def _out_dir(cfg: DictConfig) -> Path:
    return Path(cfg.out if cfg.get("out") else cfg.paths.output_dir)


def _check_outputs(cfg: DictConfig, names: tuple[str, ...]) -> None:
    """None of the files this action writes into the output folder is ``map=`` or ``reference=``."""
    out = _out_dir(cfg)
    inputs = {"map": cfg.map, "reference": cfg.get("reference")}
    check_outputs({"out": out}, inputs, files=False)
    for name in names:
        check_outputs({"out": out / name}, inputs)


def estimate(cfg: DictConfig) -> dict:
    """Estimate the class areas of ``cfg.map`` from ``cfg.reference``; writes area.json/.md."""
    if not cfg.get("reference"):
        raise ConfigError("give reference=POINTS (.gpkg/.shp/.geojson with the reference class in class_field=), "
                          "or draw them first with: deforest-area sample map=... n=...")
    if not cfg.z > 0:
        raise ConfigError(f"z={cfg.z}: the confidence interval needs z > 0 (1.96: 95%)")
    _check_outputs(cfg, ("area.json", "area.md"))
    result = assess(cfg.map, cfg.reference, cfg.class_field, int(cfg.band), _plain(cfg.classes), float(cfg.z))
    out = _out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    record = result.to_dict()
    (out / "area.json").write_text(json.dumps(record, indent=2) + "\n")
    table = result.markdown()
    (out / "area.md").write_text(table)
    print(table)
    log.info("wrote %s and %s", out / "area.md", out / "area.json")
    return record


def sample(cfg: DictConfig) -> dict:
    """Draw a seeded stratified random sample of ``cfg.map``'s pixels; writes sample.gpkg/.csv/.md."""
    if cfg.min_per_class is None or int(cfg.min_per_class) < 0:
        raise ConfigError(f"min_per_class={cfg.min_per_class}: give a count >= 0")
    _check_outputs(cfg, ("sample.gpkg", "sample.csv", "sample.md"))
    strata = map_class_areas(cfg.map, int(cfg.band), _plain(cfg.classes))
    allocation = _plain(cfg.allocation)
    counts = allocate(
        cfg.n, strata.pixels, strata.names, allocation, int(cfg.min_per_class), _plain(cfg.expected_accuracy)
    )
    xs, ys, values = draw_sample(cfg.map, counts, strata, int(cfg.band), int(cfg.seed))
    out = _out_dir(cfg)
    files = write_sample(out, xs, ys, values, strata, cfg.class_field)
    design = f"{allocation}, min_per_class={int(cfg.min_per_class)}"
    table = sample_markdown(strata, counts, design, int(cfg.seed), files)
    (out / "sample.md").write_text(table)
    print(table)
    log.info(
        "label the %d points of %s (field %r), then: deforest-area map=%s reference=%s class_field=%s",
        len(xs), files[0], cfg.class_field, cfg.map, files[0], cfg.class_field,
    )
    return {"counts": dict(zip(strata.names, counts.tolist())), "files": [str(f) for f in files]}


def run(cfg: DictConfig) -> dict:
    if cfg.action not in ACTIONS:
        raise ConfigError(f"action={cfg.action!r}: choose from {', '.join(ACTIONS)}")
    return sample(cfg) if cfg.action == "sample" else estimate(cfg)


@checked_overrides("area")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="area")
def _main(cfg: DictConfig) -> None:
    with exit_on_user_error(AreaError, MissingMandatoryValue):
        run(cfg)


def main() -> None:
    """``deforest-area [estimate|sample] key=value ...``: the action word becomes ``action=``."""
    if len(sys.argv) > 1 and sys.argv[1] in ACTIONS:
        sys.argv[1:2] = [f"action={sys.argv[1]}"]
    _main()


if __name__ == "__main__":
    main()
