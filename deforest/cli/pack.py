"""``deforest-pack``: convert the configured dataset (``data=...``) into a packed store."""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.cli.train import CONFIG_PATH
from deforest.pack import PackResult, pack_dataset

log = logging.getLogger(__name__)


def pack(cfg: DictConfig) -> PackResult:
    """Pack ``cfg.data.layout`` into ``cfg.out`` and log what happened."""
    layout = instantiate(cfg.data.layout)
    def progress(done: int, total: int) -> None:
        if done % 1000 == 0 or done == total:
            log.info("packed %d/%d tiles", done, total)

    result = pack_dataset(layout, cfg.out, progress=progress)
    verb = "wrote" if result.written else "up to date:"
    log.info("%s %s (%d tiles, %s %s)", verb, result.path, result.tiles, result.dtype, list(result.shape[1:]))
    return result


@checked_overrides("pack")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pack")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        pack(cfg)


if __name__ == "__main__":
    main()
