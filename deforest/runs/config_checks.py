"""Out-of-range config values fail before any data is read or any step is trained.

Hydra's strict mode already rejects unknown keys; these rules catch known keys with values
that would otherwise fail late (a batch size of 0 in the first DataLoader, a misspelt loss
scheme once the model is built) or train nonsense (a negative learning rate, a validation
share of 150%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from deforest.core.errors import ConfigError, closest
from deforest.core.vocabulary import LABEL_MODES, MAP_DTYPES, POLICIES, SPLITS, TASKS
from deforest.data.bigearthnet import NOMENCLATURES
from deforest.data.settings import SAMPLERS, SPLIT_KINDS, VALIDATE
from deforest.data.splits import SPATIAL_BLOCK_PROBLEM

#: ``(key, lower bound, bound allowed)`` or ``(key, low, low allowed, high, high allowed)``;
#: keys absent from a config (or null) are not checked.
Rule = tuple
#: ``(key, allowed values)``: a key absent from a config is not checked; ``None`` is checked
#: against the allowed values like any other value.
Choice = tuple[str, Sequence[object]]

TRAIN_RULES: tuple[Rule, ...] = (
    ("data.batch_size", 1, True),
    ("data.num_workers", 0, True),
    ("data.stats_max_samples", 1, True),
    ("data.block_buffer", 0, True),
    ("data.layout.size", 1, True),
    ("data.val_fraction", 0, True, 1, False),
    ("data.test_fraction", 0, True, 1, False),
    ("model.input_pool", 1, True),
    ("model.width", 1, True),
    ("model.dropout", 0, True, 1, False),
    ("model.optimizer.lr", 0, False),
    ("model.optimizer.weight_decay", 0, True),
    ("loss.label_smoothing", 0, True, 1, False),
    ("loss.negative_scale", 0, False),
    ("loss.momentum", 0, True, 1, False),
    ("loss.beta", 0, True, 1, False),
    ("loss.gamma", 0, True),
    ("trainer.accumulate_grad_batches", 1, True),
    ("trainer.check_val_every_n_epoch", 1, True),
)
#: choices of the data group, shared by deforest-train and deforest-eval
DATA_CHOICES: tuple[Choice, ...] = (
    ("data.validate", VALIDATE),
    ("data.on_bad_tile", POLICIES),
    ("data.split", SPLIT_KINDS),
    ("data.sampler", (*SAMPLERS, None)),
    ("data.layout.task", (*TASKS, None)),
    ("data.layout.nomenclature", NOMENCLATURES),
)
EVAL_RULES: tuple[Rule, ...] = (
    ("data.batch_size", 1, True),
    ("data.num_workers", 0, True),
    ("data.layout.size", 1, True),
    ("data.val_fraction", 0, True, 1, False),
    ("data.test_fraction", 0, True, 1, False),
)
EVAL_CHOICES: tuple[Choice, ...] = (("split", SPLITS), *DATA_CHOICES)
TILE_RULES: tuple[Rule, ...] = (("tile_size", 1, True), ("stride", 1, True))
TILE_CHOICES: tuple[Choice, ...] = (("mode", LABEL_MODES),)
PREDICT_RULES: tuple[Rule, ...] = (("tile_size", 1, True), ("stride", 1, True), ("batch_size", 1, True))
PREDICT_CHOICES: tuple[Choice, ...] = (("dtype", MAP_DTYPES),)


def train_choices() -> tuple[Choice, ...]:
    """The named options of ``deforest-train`` (imports the modules that define them)."""
    from deforest.models.networks import FUSIONS, backbone_names
    from deforest.training.losses import EMA_BASES, NORMALIZATIONS, SCHEMES
    from deforest.training.settings import SCHEDULER_INTERVALS
    from deforest.training.thresholds import TUNING_BETAS

    return (
        ("model.backbone", backbone_names()),
        ("model.fusion", FUSIONS),
        ("model.task", (*TASKS, None)),
        ("model.nonfinite_loss", POLICIES),
        ("model.scheduler_interval", SCHEDULER_INTERVALS),
        ("loss.scheme", SCHEMES),
        ("loss.multilabel_scheme", tuple(s for s in SCHEMES if s != "auto")),
        ("loss.normalize", NORMALIZATIONS),
        ("loss.ema_base", EMA_BASES),
        ("tune_thresholds", (*sorted(TUNING_BETAS), None)),
        *DATA_CHOICES,
    )


def range_problems(cfg: DictConfig, rules: Sequence[Rule]) -> list[str]:
    """One line per value of ``cfg`` outside its rule's range."""
    problems = []
    for rule in rules:
        key, low, low_ok = rule[:3]
        high, high_ok = rule[3:5] if len(rule) == 5 else (math.inf, False)
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}={value!r} must be a number")
        elif math.isnan(value):
            problems.append(f"{key}={value} must be a number")
        elif value < low or (value == low and not low_ok):
            problems.append(f"{key}={value} must be {'>=' if low_ok else '>'} {low}")
        elif value > high or (value == high and not high_ok):
            problems.append(f"{key}={value} must be {'<=' if high_ok else '<'} {high}")
    return problems


_ABSENT = object()


def choice_problems(cfg: DictConfig, choices: Sequence[Choice]) -> list[str]:
    """One line per value of ``cfg`` that is none of its key's options (with a suggestion)."""
    problems = []
    for key, allowed in choices:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            continue
        names = [a for a in allowed if a is not None]
        near = closest(str(value), [str(a) for a in names])
        suggestion = f" (did you mean {near!r}?)" if near else ""
        nullable = " or null" if None in allowed else ""
        shown = names if len(names) <= 12 else [*names[:12], f"... ({len(names)} in all)"]
        problems.append(f"{key}={value!r} must be one of {shown}{nullable}{suggestion}")
    return problems


def missing_value_problems(cfg: DictConfig) -> list[str]:
    """One line naming every required setting (``???`` in the config) still without a value."""
    missing = _missing_keys(cfg)
    if not missing:
        return []
    them = "it" if len(missing) == 1 else "them"
    return [f"no value for {', '.join(missing)}: give {them} on the command line ({' '.join(k + '=...' for k in missing)})"]


def _missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Read without resolving interpolations: a setting that points at a missing one (``root:
    ${data.root}``) is not named again, only the one to give on the command line."""
    missing = []
    for key in cfg.keys():
        if OmegaConf.is_missing(cfg, key):
            missing.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(cfg, key) and isinstance(node := cfg._get_node(key), DictConfig):
            missing += _missing_keys(node, f"{prefix}{key}.")
    return missing


def check_ranges(cfg: DictConfig, rules: Sequence[Rule], choices: Sequence[Choice] = ()) -> None:
    """Raise :class:`ConfigError` listing every value of ``cfg`` outside its rule's range or choices."""
    problems = range_problems(cfg, rules) + choice_problems(cfg, choices)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def epoch_limit_problems(cfg: DictConfig) -> list[str]:
    """``trainer.max_epochs`` and ``trainer.max_steps``: a positive count, or -1 for no limit;
    and the settings that only work together (the split fractions, a spatial split's block size)."""
    problems = []
    for key in ("trainer.max_epochs", "trainer.max_steps"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}={value!r} must be a whole number")
        elif value < 1 and value != -1:
            problems.append(f"{key}={value} must be >= 1 (or -1: no limit)")
    if OmegaConf.select(cfg, "data.split", default=None) == "spatial":
        block = OmegaConf.select(cfg, "data.block_size", default=None)
        if isinstance(block, bool) or not isinstance(block, (int, float)) or not block > 0:
            problems.append(SPATIAL_BLOCK_PROBLEM.format(block))
    fractions = [OmegaConf.select(cfg, f"data.{k}_fraction", default=None) for k in ("val", "test")]
    if all(isinstance(f, (int, float)) and 0 <= f < 1 for f in fractions) and sum(fractions) >= 1:
        problems.append(
            f"data.val_fraction={fractions[0]} and data.test_fraction={fractions[1]} must leave a training share "
            f"(their sum must be < 1)"
        )
    return problems
