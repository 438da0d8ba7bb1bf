"""The classifier's settings, grouped by concern: plain-data records.

:class:`~deforest.training.module.TileClassifier` takes each group as one argument (a record
or a mapping of its fields) and saves it as a plain dict among the checkpoint's
hyper-parameters, so a checkpoint rebuilds the same model without running anything
(:mod:`deforest.training.loading`). The config keeps its flat keys (``model.width``,
``model.tta``, ...): :func:`deforest.runs.build.build_model` sorts them into these groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from deforest.models.networks import FUSIONS

SCHEDULER_INTERVALS = ("step", "epoch")


@dataclass(frozen=True)
class NetworkSettings:
    """What the network is.

    Args:
        backbone, small_tile_stem, width, dropout: see :func:`deforest.models.networks.build_backbone`.
        band_statistics: add a linear head on per-band statistics
            (:class:`deforest.models.networks.BandStatistics`), trained beside the CNN with the same
            loss; predictions average the two heads' logits.
        input_resize: resize (bilinear) the tile to this many pixels a side before the network,
            as pretrained weights' published figures do (224); ``None`` keeps the tile size.
        fusion: how the dates of a two-date sample meet (:data:`deforest.models.networks.FUSIONS`):
            ``early`` feeds their stacked bands to one network; ``siamese`` runs one shared
            backbone on each date's bands (taken apart by the contract's dated band names,
            ``B04@t0``/``B04@t1``) and classifies their features and difference
            (:class:`deforest.models.networks.SiameseNetwork`). The band-statistics head sees every band.
        pretrained: where the network's weights started (:func:`deforest.models.weights.band_plan`:
            weights name, band-to-kernel mapping); a record, nothing is loaded from it.
    """

    backbone: str = "small_cnn"
    small_tile_stem: bool = True
    width: int = 32
    dropout: float = 0.2
    band_statistics: bool = False
    input_resize: int | None = None
    fusion: str = "early"
    pretrained: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {list(FUSIONS)}, not {self.fusion!r}")
        if self.input_resize is not None and self.input_resize < 1:
            raise ValueError(f"model.input_resize must be >= 1 or null, not {self.input_resize}")


@dataclass(frozen=True)
class OptimizationSettings:
    """How the optimizer (``model.optimizer``) and scheduler (``model.scheduler``) are applied.

    Args:
        scheduler_interval: the scheduler steps every ``step`` or every ``epoch``.
        freeze_backbone: keep everything but the classifier head frozen (a linear probe).
        backbone_lr_multiplier: the backbone's learning rate is the optimizer's times this.
    """

    scheduler_interval: str = "step"
    freeze_backbone: bool = False
    backbone_lr_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"model.scheduler_interval must be step or epoch, not {self.scheduler_interval!r}")
        if self.backbone_lr_multiplier <= 0:
            raise ValueError(f"model.backbone_lr_multiplier must be > 0, not {self.backbone_lr_multiplier}")


@dataclass(frozen=True)
class EvaluationSettings:
    """How predictions are made and decided in val, test and predict.

    Args:
        tta: average predictions over the eight flips/rotations in val, test and predict.
        tune_thresholds: multi-label: ``f1`` or ``f2`` re-tunes the thresholds on every
            validation epoch to maximise that score per label, so each checkpoint carries
            the thresholds of its own weights; ``None`` keeps them fixed. The validation
            scores are then computed at thresholds tuned on the other half of the
            validation tiles (:class:`deforest.training.thresholds.ThresholdTuner`).
        calibrate: fit the probability correction (:mod:`deforest.training.calibration`) on every
            validation epoch, before the thresholds are tuned, so each checkpoint carries the
            correction of its own weights; ``False`` keeps the one it has (identity when new).
    """

    tta: bool = False
    tune_thresholds: str | None = None
    calibrate: bool = True


Settings = TypeVar("Settings", NetworkSettings, OptimizationSettings, EvaluationSettings)


def settings(kind: type[Settings], value: Settings | Mapping[str, Any] | None) -> Settings:
    """``value`` as a ``kind`` record: a record as it is, a mapping of its fields, ``None`` the defaults.
    An unknown field is a ``ValueError`` naming it (a checkpoint's is refused, see loading)."""
    if isinstance(value, kind):
        return value
    options = dict(value or {})
    unknown = sorted(set(options) - {f.name for f in fields(kind)})
    if unknown:
        raise ValueError(f"{kind.__name__} takes no {unknown}")
    return kind(**options)


def plain(record: NetworkSettings | OptimizationSettings | EvaluationSettings) -> dict[str, Any]:
    """The record as the plain dict a checkpoint's hyper-parameters hold."""
    values = asdict(record)
    if isinstance(record, NetworkSettings) and record.pretrained is not None:
        values["pretrained"] = dict(record.pretrained)
    return values


#: Which group each flat ``model.*`` config key (and older checkpoints' flat hyper-parameter) belongs to.
GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "network": tuple(f.name for f in fields(NetworkSettings)),
    "optimization": tuple(f.name for f in fields(OptimizationSettings)),
    "evaluation": tuple(f.name for f in fields(EvaluationSettings)),
}


def grouped(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys sorted into their groups (:data:`GROUP_KEYS`); the other keys as they are.
    A group given whole as well keeps its own values over the flat ones."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        group = next((g for g, keys in GROUP_KEYS.items() if key in keys), None)
        if group is None:
            out[key] = value
        else:
            groups.setdefault(group, {})[key] = value
    for group, values in groups.items():
        given = out.get(group)
        out[group] = {**values, **given} if isinstance(given, Mapping) else values
    return out


__all__ = [
    "GROUP_KEYS", "EvaluationSettings", "NetworkSettings", "OptimizationSettings", "grouped", "plain", "settings",
]
