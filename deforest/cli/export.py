"""``deforest-export``: a checkpoint as ONNX, TorchScript or a torch.export ExportedProgram."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.core.errors import ConfigError
from deforest.core.vocabulary import CONFIG_PATH
from deforest.mapping.export import FORMATS
from deforest.mapping.export import export as write
from deforest.runs.config_checks import choice_problems, missing_value_problems

log = logging.getLogger(__name__)

CHOICES = (("format", tuple(FORMATS)), ("tta", (None, True, False)), ("fill_nodata", (True, False)))


def export(cfg: DictConfig) -> dict[str, object]:
    """Run the configured export; returns a summary of what was written."""
    problems = missing_value_problems(cfg) + choice_problems(cfg, CHOICES)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    summary = write(cfg.ckpt_path, str(cfg.format), cfg.get("out"), cfg.get("tta"), bool(cfg.fill_nodata),
                    bool(cfg.get("overwrite")))
    log.info("exported %s: %s", cfg.ckpt_path, summary)
    return summary


@checked_overrides("export")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        export(cfg)


if __name__ == "__main__":
    main()
