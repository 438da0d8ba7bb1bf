"""The input contract: what a model expects of its input, from training to the map.

:class:`InputSpec` is produced once, by the datamodule that trained the model, and stored in
every checkpoint as plain data (loadable with ``torch.load(weights_only=True)``).
Evaluation, prediction and the report read it and nothing else, so a map is computed on
exactly the inputs the model was trained on: the same bands in the same order, the same
nodata fill and normalisation, the same tile size, and (for ``deforest-eval``) the same split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from deforest.core.nodata import fill_nodata, valid_pixels

log = logging.getLogger(__name__)

#: ways of turning raw band values into the values the statistics standardise
TRANSFORMS = ("log1p", "scale")


@dataclass(frozen=True)
class Normalization:
    """``(f(x) - mean) / std`` per band.

    ``transform`` is ``log1p`` (``f(x) = log1p(max(x, 0))``, statistics measured on the
    training tiles) or ``scale`` (``f(x) = x / scale``: e.g. ``scale=10000`` with the
    mean/std a set of pretrained weights was trained with, ``source="weights"``).
    """

    mean: list[float]
    std: list[float]
    transform: str = "log1p"
    scale: float = 1.0
    #: where mean/std come from: ``training`` (measured on the training split) or ``weights``
    source: str = "training"

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"normalisation transform must be one of {TRANSFORMS}, not {self.transform!r}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"normalisation has {len(self.mean)} means but {len(self.std)} stds")

    def fill(self) -> list[float]:
        """The raw value of each band that normalises to 0: what nodata pixels are given."""
        mean = np.asarray(self.mean, dtype=np.float64)
        return (np.expm1(mean) if self.transform == "log1p" else mean * self.scale).tolist()


@dataclass(frozen=True)
class SplitRecord:
    """How the tiles were split, and the split itself (sources relative to the layout root).

    ``lists`` holds each split's sources in dataset order, so evaluation rebuilds the exact
    split whatever the current config says; ``digest`` identifies it in reports.
    """

    layout: str
    #: the data root the lists are relative to, on the training machine (for messages only)
    root: str
    kind: str
    seed: int
    val_fraction: float
    test_fraction: float
    lists: dict[str, list[str]]
    block_size: float | None = None
    buffer: float = 0.0
    #: tiles left out because their footprint reached a block of another split (spatial)
    dropped_at_edges: int = 0
    #: per split, tiles carrying each class (static loss weighting reads the train counts)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return split_digest(self.lists)


def split_digest(lists: Mapping[str, Sequence[str]]) -> str:
    """A short sha256 of the split lists (order included)."""
    payload = json.dumps({k: list(v) for k, v in sorted(lists.items())}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SourceRecord:
    """What the training files were: eval and predict compare an input with it before inference."""

    #: bands in each training file (eval and predict refuse another count)
    band_count: int
    #: their dtype (named on both sides of a scale check)
    dtype: str
    #: per band of ``InputSpec.bands``, the 2nd and 98th percentiles of the training pixels' raw
    #: values (``None``: not recorded, nothing compared)
    value_low: list[float] | None = None
    value_high: list[float] | None = None
    #: ``[x, y]`` pixel size of the training tiles in ``pixel_units`` (``m`` or ``deg``);
    #: ``None`` when the tiles have no georeference
    pixel_size: list[float] | None = None
    pixel_units: str | None = None


@dataclass(frozen=True)
class NetworkInput:
    """What the CNN sees of the input: ``bands`` are positions among ``InputSpec.bands``
    (``None``: all; the band-statistics head always sees every band), ``pool`` the
    average-pooling factor applied before the network."""

    bands: list[int] | None = None
    pool: int = 1


@dataclass(frozen=True)
class Calibration:
    """The probability correction fitted on validation (:mod:`deforest.training.calibration`):
    the probabilities are those of ``logits / temperature + bias`` (one bias per class)."""

    temperature: float
    bias: list[float]


#: the contract's flat keys of checkpoints and exports written before the sub-records, by the
#: sub-record and field they fill
_FLAT_KEYS = {
    "source_band_count": ("source", "band_count"),
    "source_dtype": ("source", "dtype"),
    "value_low": ("source", "value_low"),
    "value_high": ("source", "value_high"),
    "pixel_size": ("source", "pixel_size"),
    "pixel_units": ("source", "pixel_units"),
    "network_bands": ("network", "bands"),
    "input_pool": ("network", "pool"),
    "calibration_temperature": ("calibration", "temperature"),
    "calibration_bias": ("calibration", "bias"),
}


@dataclass(frozen=True)
class InputSpec:
    """Everything a model expects of its input and says about its output.

    ``bands`` are 1-based indexes into the source files (in the order the model sees them);
    ``band_names`` their names when the files or the data config name them (prediction
    then matches scene bands by name). ``source`` records what the training files were,
    ``network`` which of ``bands`` the CNN sees and how they are pooled, ``calibration``
    the fitted probability correction (``None``: none fitted, the raw probabilities).
    """

    task: str
    class_names: list[str]
    bands: list[int]
    source: SourceRecord
    nodata: float | None
    normalization: Normalization
    tile_size: list[int]
    band_names: list[str] | None = None
    network: NetworkInput = field(default_factory=NetworkInput)
    thresholds: list[float] | None = None
    split: SplitRecord | None = None
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if len(self.normalization.mean) != len(self.bands):
            raise ValueError(
                f"the normalisation is for {len(self.normalization.mean)} bands, the input has {len(self.bands)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fill(self) -> list[float]:
        """Per band, the raw value nodata pixels get (normalises to 0, so it carries no signal)."""
        return self.normalization.fill()

    def decision_thresholds(self) -> np.ndarray:
        """Multi-label thresholds, one per class (0.5 when none were tuned)."""
        values = self.thresholds if self.thresholds is not None else [0.5] * self.num_classes
        return np.asarray(values, np.float32)

    def prepare(self, image: np.ndarray, nodata: float | None = None) -> np.ndarray:
        """Raw ``[..., C, H, W]`` values as the model was trained on them: float32, nodata and
        non-finite pixels given their band's fill. ``nodata``: the input's own value, when it
        declares one (a scene may say another than the training tiles did)."""
        image = image.astype(np.float32, copy=False)
        valid = valid_pixels(image, self.nodata if nodata is None else nodata)
        finite = np.isfinite(image)
        return fill_nodata(image, finite if valid is None else valid & finite, self.fill)

    def with_thresholds(self, thresholds: Sequence[float]) -> InputSpec:
        return replace(self, thresholds=[float(t) for t in thresholds])

    # ---- plain data -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain str/int/float/list/dict (``nodata`` NaN as the string ``"nan"``)."""
        out = asdict(self)
        if self.nodata is not None and math.isnan(self.nodata):
            out["nodata"] = "nan"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        """The contract from :meth:`to_dict`'s form, or from the flat form of older checkpoints and
        exports. A key it does not know is a ``TypeError`` naming it (the checkpoint is refused)."""
        data = _nested(data)
        data["normalization"] = Normalization(**data["normalization"])
        for key, record in (("source", SourceRecord), ("network", NetworkInput), ("split", SplitRecord),
                            ("calibration", Calibration)):
            if isinstance(data.get(key), Mapping):
                data[key] = record(**data[key])
        if data.get("nodata") == "nan":
            data["nodata"] = float("nan")
        return cls(**data)


def _nested(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with the flat keys of the earlier layout sorted into their sub-records. A flat key
    beside its nested record is left where it is, so the constructor refuses it."""
    data = dict(data)
    groups: dict[str, dict[str, Any]] = {}
    for key, (group, name) in _FLAT_KEYS.items():
        if key in data and group not in data:
            groups.setdefault(group, {})[name] = data.pop(key)
    calibration = groups.pop("calibration", {})
    if any(value is not None for value in calibration.values()):
        # written together by the model, so one without the other is the identity on its side
        temperature, bias = calibration.get("temperature"), calibration.get("bias")
        data["calibration"] = {"temperature": 1.0 if temperature is None else temperature,
                               "bias": [0.0] * len(data.get("class_names") or ()) if bias is None else bias}
    data.update(groups)
    return data


def untrained_spec(task: str, class_names: Sequence[str], band_count: int, tile_size: int, **changes: Any) -> InputSpec:
    """A contract for a model that is not trained on data (benchmarks, output-layout tests):
    every band of ``band_count``-band files, identity ``scale`` normalisation, no split."""
    spec = InputSpec(
        task=task,
        class_names=list(class_names),
        bands=list(range(1, band_count + 1)),
        source=SourceRecord(band_count=band_count, dtype="float32"),
        nodata=None,
        normalization=Normalization([0.0] * band_count, [1.0] * band_count, transform="scale"),
        tile_size=[tile_size, tile_size],
    )
    return replace(spec, **changes)


