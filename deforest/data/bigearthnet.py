"""BigEarthNet-S2 v1: its class nomenclatures, band list and patch-folder layout."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from deforest.core.errors import DatasetError
from deforest.core.vocabulary import MULTILABEL
from deforest.data.index import TileIndex
from deforest.data.io import read_tile
from deforest.data.layouts import TileLayout
from deforest.data.split_lists import apply_split_lists

# BigEarthNet-S2 v1: CORINE Land Cover level-3 classes (43) and the 19-class nomenclature
# of Sumbul et al. 2021 (BigEarthNet-MM), which merges or drops the ambiguous ones. The 43 are
# the official label list (label_indices.json of BigEarthNet-S2_19-classes_models; TorchGeo's
# BigEarthNet.class_sets[43]): CORINE's "Glaciers and perpetual snow" (335) is not among them.
#: the two label sets a layout reads (``data.layout.nomenclature``)
NOMENCLATURES = (19, 43)
BIGEARTHNET_43 = [
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports",
    "Mineral extraction sites", "Dump sites", "Construction sites", "Green urban areas",
    "Sport and leisure facilities", "Non-irrigated arable land", "Permanently irrigated land",
    "Rice fields", "Vineyards", "Fruit trees and berry plantations", "Olive groves", "Pastures",
    "Annual crops associated with permanent crops", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland", "Moors and heathland", "Sclerophyllous vegetation",
    "Transitional woodland/shrub", "Beaches, dunes, sands", "Bare rock",
    "Sparsely vegetated areas", "Burnt areas", "Inland marshes",
    "Peatbogs", "Salt marshes", "Salines", "Intertidal flats", "Water courses", "Water bodies",
    "Coastal lagoons", "Estuaries", "Sea and ocean",
]
BIGEARTHNET_43_TO_19 = {
    "Continuous urban fabric": "Urban fabric",
    "Discontinuous urban fabric": "Urban fabric",
    "Industrial or commercial units": "Industrial or commercial units",
    "Non-irrigated arable land": "Arable land",
    "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land",
    "Vineyards": "Permanent crops",
    "Fruit trees and berry plantations": "Permanent crops",
    "Olive groves": "Permanent crops",
    "Annual crops associated with permanent crops": "Permanent crops",
    "Pastures": "Pastures",
    "Complex cultivation patterns": "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas": "Agro-forestry areas",
    "Broad-leaved forest": "Broad-leaved forest",
    "Coniferous forest": "Coniferous forest",
    "Mixed forest": "Mixed forest",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub": "Transitional woodland, shrub",
    "Beaches, dunes, sands": "Beaches, dunes, sands",
    "Inland marshes": "Inland wetlands",
    "Peatbogs": "Inland wetlands",
    "Salt marshes": "Coastal wetlands",
    "Salines": "Coastal wetlands",
    "Water courses": "Inland waters",
    "Water bodies": "Inland waters",
    "Coastal lagoons": "Marine waters",
    "Estuaries": "Marine waters",
    "Sea and ocean": "Marine waters",
}
BIGEARTHNET_19 = list(dict.fromkeys(BIGEARTHNET_43_TO_19.values()))
BIGEARTHNET_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


class BigEarthNetLayout(TileLayout):
    """BigEarthNet-S2 v1 patch folders: one GeoTIFF per band plus a labels JSON.

    Bands at 20 m and 60 m are resampled (bilinear) onto the ``size`` x ``size`` grid.
    ``nomenclature`` is 43 (CORINE labels as stored) or 19 (merged classes; patches whose
    labels all map to nothing get an all-negative row). ``drop_absent_classes`` keeps only
    the classes that occur in this copy of the dataset.

    The official protocol (Sumbul et al. 2021): ``split_csvs`` (``{train, val, test}``: the
    published ``train.csv``/``val.csv``/``test.csv``) give each patch its split and leave
    unlisted patches out; ``exclude_csvs`` (``patches_with_cloud_and_shadow.csv``,
    ``patches_with_seasonal_snow.csv``) drop the patches they list.
    """

    band_names = BIGEARTHNET_BANDS

    def __init__(
        self,
        root: str | Path,
        nomenclature: int = 43,
        size: int = 120,
        drop_absent_classes: bool = True,
        split_csvs: Mapping[str, str] | None = None,
        exclude_csvs: Sequence[str] | None = None,
    ) -> None:
        super().__init__(root)
        self.split_csvs = dict(split_csvs) if split_csvs else None
        self.exclude_csvs = list(exclude_csvs) if exclude_csvs else None
        if nomenclature not in NOMENCLATURES:
            raise DatasetError(f"BigEarthNet nomenclature must be 19 or 43, not {nomenclature}")
        self.nomenclature = nomenclature
        self.size = size
        self.drop_absent_classes = drop_absent_classes

    def build_index(self) -> TileIndex:
        patches = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not patches:
            raise DatasetError(f"{self.root}: no BigEarthNet patch folders found")
        if self.split_csvs or self.exclude_csvs:  # before reading labels: 590,000 JSONs otherwise
            listed = TileIndex(MULTILABEL, [], [str(p) for p in patches], np.zeros(len(patches)), [None] * len(patches))
            listed = apply_split_lists(listed, self.split_csvs, self.exclude_csvs)
            patches, given = [Path(s) for s in listed.sources], listed.splits
        else:
            given = [None] * len(patches)
        names = BIGEARTHNET_43 if self.nomenclature == 43 else BIGEARTHNET_19
        lookup = {n: i for i, n in enumerate(names)}
        targets = np.zeros((len(patches), len(names)), np.uint8)
        for i, patch in enumerate(patches):
            for label in self._labels(patch):
                if self.nomenclature == 19:
                    label = BIGEARTHNET_43_TO_19.get(label)
                    if label is None:
                        continue
                targets[i, lookup[label]] = 1
            missing = [b for b in self.band_names if not self._band_file(patch, b).is_file()]
            if missing:
                raise DatasetError(f"{patch}: missing band file(s) {missing}")
        keep = np.arange(len(names))
        if self.drop_absent_classes:
            keep = np.flatnonzero(targets.any(axis=0))
        return TileIndex(
            MULTILABEL,
            [names[k] for k in keep],
            [str(p) for p in patches],
            targets[:, keep],
            list(given),
        )

    def _labels(self, patch: Path) -> list[str]:
        path = patch / f"{patch.name}_labels_metadata.json"
        if not path.is_file():
            raise DatasetError(f"{path}: labels JSON missing")
        try:
            labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise DatasetError(f"{path}: malformed labels JSON ({type(err).__name__}: {err})") from None
        if labels is None:
            raise DatasetError(f"{path}: 'labels' is null (a list of CORINE labels is expected)")
        if not isinstance(labels, list):
            raise DatasetError(f"{path}: 'labels' is a {type(labels).__name__} ({labels!r}), not a list of CORINE labels")
        if not labels:
            raise DatasetError(f"{path}: 'labels' is empty (every BigEarthNet patch has at least one label)")
        unknown = [label for label in labels if not isinstance(label, str) or label not in BIGEARTHNET_43]
        if unknown:
            raise DatasetError(f"{path}: unknown BigEarthNet label(s) {unknown}")
        return labels

    def _band_file(self, patch: Path, band: str) -> Path:
        return patch / f"{patch.name}_{band}.tif"

    def read(self, source: str, bands: Sequence[int] | None) -> np.ndarray:
        return self.read_with_nodata(source, bands)[0]

    def read_with_nodata(
        self, source: str, bands: Sequence[int] | None, native: bool = False
    ) -> tuple[np.ndarray, list[float | None]]:
        """The patch's bands on one grid, each with the nodata value of its own band file."""
        patch = Path(source)
        chosen = [self.band_names[i - 1] for i in bands] if bands else self.band_names
        shape = (self.size, self.size)
        read = [read_tile(self._band_file(patch, b), [1], shape, native=native) for b in chosen]
        return np.concatenate([image for image, _ in read]), [nodata[0] for _, nodata in read]

    def header_source(self, source: str) -> str:
        return str(self._band_file(Path(source), "B02"))

    def band_count(self, header_count: int) -> int:
        return len(self.band_names)  # one single-band file per band


__all__ = ["BIGEARTHNET_19", "BIGEARTHNET_43", "BIGEARTHNET_43_TO_19", "BIGEARTHNET_BANDS", "BigEarthNetLayout"]
