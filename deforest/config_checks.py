"""Out-of-range config values fail before any data is read or any step is trained.

Hydra's strict mode already rejects unknown keys; these rules catch known keys with values
that would otherwise fail late (a batch size of 0 in the first DataLoader) or train
nonsense (a negative learning rate).
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

#: ``(key, lower bound, bound allowed)``; keys absent from a config (or null) are not checked.
Rule = tuple[str, float, bool]

TRAIN_RULES: tuple[Rule, ...] = (
    ("data.batch_size", 1, True),
    ("data.num_workers", 0, True),
    ("data.stats_max_samples", 1, True),
    ("data.block_buffer", 0, True),
    ("data.layout.size", 1, True),
    ("model.input_pool", 1, True),
    ("model.optimizer.lr", 0, False),
    ("model.optimizer.weight_decay", 0, True),
    ("trainer.accumulate_grad_batches", 1, True),
)
TILE_RULES: tuple[Rule, ...] = (("tile_size", 1, True), ("stride", 1, True))
PREDICT_RULES: tuple[Rule, ...] = (("tile_size", 1, True), ("stride", 1, True), ("batch_size", 1, True))


class ConfigError(ValueError):
    """Config values that cannot work, all listed in one message."""


def check_ranges(cfg: DictConfig, rules: Sequence[Rule]) -> None:
    """Raise :class:`ConfigError` listing every value of ``cfg`` outside its rule's range."""
    problems = []
    for key, low, inclusive in rules:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}={value!r} must be a number")
        elif value < low or (value == low and not inclusive):
            problems.append(f"{key}={value} must be {'>=' if inclusive else '>'} {low}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
