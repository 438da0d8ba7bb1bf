"""``deforest-compare dirs=[DIR,...]``: compare the jobs of multiruns into comparison.md/.csv.

A Hydra app like the other commands (``key=value`` arguments, ``--help``, one line for a
misspelt key), with its own small config (conf/compare.yaml).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.core.vocabulary import CONFIG_PATH
from deforest.runs.compare import write_comparison

log = logging.getLogger(__name__)



def compare(cfg: DictConfig) -> None:
    """Write the comparison of ``cfg.dirs`` and print it."""
    dirs = OmegaConf.to_container(cfg.dirs) if OmegaConf.is_list(cfg.dirs) else [cfg.dirs]
    group = cfg.get("group")
    group = None if group is None else OmegaConf.to_container(group) if OmegaConf.is_list(group) else [group]
    csv_path, md_path = write_comparison([str(d) for d in dirs], cfg.rare, cfg.out, group)
    print(md_path.read_text())
    log.info("wrote %s and %s", md_path, csv_path)


@checked_overrides("compare")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="compare")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(ValueError, FileNotFoundError, MissingMandatoryValue):
        compare(cfg)


if __name__ == "__main__":
    main()
