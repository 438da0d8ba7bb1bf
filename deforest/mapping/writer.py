"""The files ``deforest-predict`` writes: the class/probability GeoTIFF map, and how an earlier
output (map, change map or tile CSV) is recognised so the next prediction may replace it.

Imports neither torch nor Lightning: the torch-free ONNX path (:mod:`deforest.mapping.serve`)
writes its maps here too.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from deforest.core.contract import InputSpec
from deforest.core.vocabulary import MAP_DTYPES, MULTICLASS
from deforest.mapping.scene import Scene

#: the ``written_by`` tag of a map: an existing file carrying it may be replaced by the next map
WRITTEN_BY = "deforest-predict"
#: the first columns of ``tiles=`` predictions: an existing CSV starting so may be replaced
CSV_HEADER = ("path", "predicted")

UINT8_NODATA = 255
UINT8_SCALE = 254  # probabilities 0..254 so that 255 stays free for nodata


class MapWriter:
    """The output GeoTIFF: decision band(s), then one probability band per class."""

    def __init__(
        self,
        path: Path,
        spec: InputSpec,
        scene: Scene,
        width: int,
        height: int,
        transform: Affine,
        dtype: str,
        tags: dict[str, str],
    ) -> None:
        if dtype not in MAP_DTYPES:
            raise ValueError(f"dtype must be one of {MAP_DTYPES}, not {dtype!r}")
        if dtype == "uint8" and spec.num_classes >= UINT8_NODATA:
            raise ValueError(f"{spec.num_classes} classes do not fit uint8 class indexes; use dtype=float32")
        self.spec, self.dtype = spec, dtype
        self.nodata = UINT8_NODATA if dtype == "uint8" else float("nan")
        c = spec.num_classes
        decisions = ["class"] if spec.task == MULTICLASS else list(spec.class_names)
        descriptions = decisions + [f"p_{name}" for name in spec.class_names]
        block = 256 if min(width, height) >= 256 else 16 * max(1, min(width, height) // 16)
        profile = {
            "driver": "GTiff", "width": width, "height": height, "count": len(descriptions),
            "dtype": dtype, "crs": scene.crs, "transform": transform, "nodata": self.nodata,
            "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
            "predictor": 2 if dtype == "uint8" else 3, "interleave": "band",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self.dst = rasterio.open(path, "w", **profile)
        self.dst.descriptions = tuple(descriptions)
        self.dst.update_tags(
            class_names=json.dumps(spec.class_names),
            task=spec.task,
            probability_scale=str(1 / UINT8_SCALE if dtype == "uint8" else 1.0),
            **tags,
        )
        if dtype == "uint8":
            for band in range(len(decisions) + 1, len(descriptions) + 1):
                self.dst.update_tags(band, scale=str(1 / UINT8_SCALE))
        self.num_decisions = len(decisions)
        self.num_classes = c

    def write(self, probs: np.ndarray, invalid: np.ndarray, window: Window) -> None:
        """Write ``probs`` ``[C, h, w]`` (float) at ``window``; ``invalid`` pixels get nodata."""
        if self.spec.task == MULTICLASS:
            decisions = probs.argmax(axis=0)[None].astype(np.float64)
        else:
            decisions = (probs >= self.spec.decision_thresholds()[:, None, None]).astype(np.float64)
        values = probs * UINT8_SCALE if self.dtype == "uint8" else probs
        out = np.concatenate([decisions, values])
        if self.dtype == "uint8":
            out = np.rint(out)
        out[:, invalid] = self.nodata
        self.dst.write(out.astype(self.dtype), window=window)

    def close(self) -> None:
        self.dst.close()


def is_earlier_output(path: Path) -> bool:
    """Whether ``path`` is a map, change map or CSV that ``deforest-predict`` wrote (so the
    next prediction may replace it): its ``written_by`` tag, or the tags and header every
    such file has carried (maps written before the tag)."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return tuple(next(csv.reader(handle), [])[: len(CSV_HEADER)]) == CSV_HEADER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            tags = src.tags()
    return tags.get("written_by") == WRITTEN_BY or {"class_names", "checkpoint"} <= tags.keys() or "change_class" in tags
