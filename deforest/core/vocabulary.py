"""Words every layer shares: task names, split names, tile file suffixes, where the configs are."""

from __future__ import annotations

#: the two heads: one class per tile (cross-entropy) or any set of labels (BCE with logits)
MULTICLASS, MULTILABEL = "multiclass", "multilabel"
TASKS = (MULTICLASS, MULTILABEL)
SPLITS = ("train", "val", "test")
#: what counts as a GeoTIFF tile in a folder (compared without case)
TIFF_SUFFIXES = (".tif", ".tiff")
#: what to do with a bad tile (``data.on_bad_tile``) or a non-finite loss (``model.nonfinite_loss``):
#: stop with a one-line error, or leave it out and count it
POLICIES = ("error", "skip")
#: how a tile of a label map is labelled (``deforest-tile mode=``): its majority class, every class
#: present, or every class above a share of its pixels
LABEL_MODES = ("majority", "any", "fraction")
#: the pixel types a written map can have (``deforest-predict dtype=``): class indexes, or probabilities
MAP_DTYPES = ("uint8", "float32")
#: the packaged Hydra configs (``conf/`` installed as ``deforest.conf``) every command composes
CONFIG_PATH = "pkg://deforest.conf"

__all__ = ["CONFIG_PATH", "LABEL_MODES", "MAP_DTYPES", "MULTICLASS", "MULTILABEL", "POLICIES", "SPLITS", "TASKS", "TIFF_SUFFIXES"]
