"""The ``data`` settings, grouped by what they steer: the store, the preparation, the loaders.

The config keeps its flat keys (``data.batch_size``, ``data.split``, ``data.packed``, ... as
``conf/data/base.yaml`` documents them); :meth:`DataSettings.from_keys` sorts them into the
groups, and each group refuses a bad value with one line naming its key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from deforest.core.contract import InputSpec
from deforest.core.errors import unknown_setting
from deforest.core.vocabulary import POLICIES, SPLITS

#: ``data.sampler``: the order training draws tiles in (``null`` is ``shuffle``; ``auto``, the default, is
#: ``balanced`` for a multi-label dataset whose tiles can be drawn one by one, ``shuffle`` otherwise)
SAMPLERS = ("auto", "shuffle", "balanced")
#: ``data.validate``: read every header (``quick``), also every pixel (``full``), or trust the data
VALIDATE = ("quick", "full", "off")
#: ``data.split``
SPLIT_KINDS = ("random", "spatial")


@dataclass(frozen=True)
class StoreSettings:
    """Where the tiles are read from: the files, or a pack (``packed``: a folder or an
    ``s3://`` URL written by ``deforest-pack``); ``cache_dir`` holds the statistics cache and a
    remote pack's small files and chunks (``cache_chunks``)."""

    packed: str | None = None
    cache_dir: str | None = None
    cache_chunks: bool = True


@dataclass(frozen=True)
class SplitSettings:
    """How samples without a given split are split (``data.split``, ``val_fraction``, ...)."""

    kind: str = "random"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    #: spatial: the side of the squares that go to one split whole (tile CRS units)
    block_size: float | None = None
    #: spatial: each tile's footprint grown by this before tiles reaching into another split's block are dropped
    block_buffer: float = 0.0
    #: ``{class name: kept fraction}`` (``"*"``: the rest): an imbalanced training split
    imbalance: Mapping[str, float] | None = None
    #: ``{train: path, val: path, test: path}``: lists of sample names that set the splits
    files: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} and data.test_fraction={self.test_fraction} "
                             "must leave a training share")
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"data.split must be random or spatial, not {self.kind!r}")


@dataclass(frozen=True)
class CheckSettings:
    """How much of the data is checked (``data.validate``) and what a bad tile does (``data.on_bad_tile``)."""

    validate: str = "quick"
    on_bad_tile: str = "error"

    def __post_init__(self) -> None:
        if self.validate not in VALIDATE:
            raise ValueError(f"data.validate must be quick, full or off, not {self.validate!r}")
        if self.on_bad_tile not in POLICIES:
            raise ValueError(f"data.on_bad_tile must be error or skip, not {self.on_bad_tile!r}")


@dataclass(frozen=True)
class PrepareSettings:
    """What :func:`deforest.data.prepare.prepare` needs: the bands, the split, the checks, the
    normalisation, and in evaluation the checkpoint's contract (``input_spec``), whose split is
    used unless ``resplit``."""

    bands: Sequence[int | str] | None = None
    seed: int = 42
    split: SplitSettings = field(default_factory=SplitSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    #: normalise ``log1p`` of the values
    log_scale: bool = True
    #: at most this many training tiles (a seeded sample) for the band statistics
    stats_max_samples: int = 5000
    input_spec: InputSpec | None = None
    resplit: bool = False


@dataclass(frozen=True)
class LoaderSettings:
    """The DataLoaders: batch size, workers, the training sampler, flips on the device, and the
    split :meth:`~deforest.data.datamodule.TileDataModule.test_dataloader` serves."""

    batch_size: int = 32
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    #: ``None`` or ``shuffle``: each training tile once per epoch; ``balanced``: drawn by weight;
    #: ``auto``: ``balanced`` for multi-label data (not from a streamed pack), else ``shuffle``
    sampler: str | None = "auto"
    #: random flips/rotations of each training batch on the device instead of in the workers
    device_flips: bool = False
    test_split: str = "test"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.test_split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {self.test_split!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be null, auto, shuffle or balanced, not {self.sampler!r}")


#: the flat keys whose field is named otherwise in its group
_RENAMED = {"split": "kind", "split_files": "files"}
_REVERSE = {new: old for old, new in _RENAMED.items()}


@dataclass(frozen=True)
class DataSettings:
    """Every ``data`` setting but the layout and the augmentation, in its group."""

    store: StoreSettings = field(default_factory=StoreSettings)
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    loader: LoaderSettings = field(default_factory=LoaderSettings)

    @classmethod
    def from_keys(cls, **keys: Any) -> DataSettings:
        """The settings from the flat ``data.*`` keys (plus ``input_spec``, ``resplit`` and
        ``test_split`` of evaluation); an unknown key is a :class:`ConfigError` naming it."""
        groups: dict[type, dict[str, Any]] = {StoreSettings: {}, SplitSettings: {}, CheckSettings: {},
                                              PrepareSettings: {}, LoaderSettings: {}}
        for key, value in keys.items():
            name = _RENAMED.get(key, key)
            group = next((g for g in groups if name in _field_names(g) and name not in ("split", "checks")), None)
            if group is None:
                known = {_REVERSE.get(n, n) for g in groups for n in _field_names(g) - {"split", "checks"}}
                raise unknown_setting("data", key, known)
            groups[group][name] = dict(value) if isinstance(value, Mapping) else value
        loader = LoaderSettings(**groups[LoaderSettings])  # data.batch_size is reported first
        prepare = PrepareSettings(split=SplitSettings(**groups[SplitSettings]),
                                  checks=CheckSettings(**groups[CheckSettings]), **groups[PrepareSettings])
        return cls(StoreSettings(**groups[StoreSettings]), prepare, loader)


def _field_names(group: type) -> set[str]:
    return {f.name for f in fields(group)}
