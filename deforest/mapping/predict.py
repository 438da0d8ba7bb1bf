"""Sliding-window prediction with a checkpoint: its :class:`TileClassifier` as the
:data:`~deforest.mapping.sliding.Classify` function of :mod:`deforest.mapping.sliding`, which holds the
windows, blending, nodata handling, band matching and the CSV writer, and of the map writer
:mod:`deforest.mapping.writer` (both shared with the torch-free ONNX path, :mod:`deforest.mapping.serve`).
Everything about the input comes from the checkpoint's :class:`~deforest.core.contract.InputSpec`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from deforest.core.contract import InputSpec
from deforest.mapping import sliding
from deforest.mapping.scene import Scene
from deforest.mapping.sliding import Classify
from deforest.training.module import TileClassifier


def load_classifier(ckpt_path: str | os.PathLike, device: str = "cpu") -> tuple[TileClassifier, InputSpec]:
    """The classifier in eval mode on ``device`` and its input contract."""
    # weights and plain settings only: compile and other code-execution settings never come from the file;
    # a missing or unreadable file is a CheckpointError naming it
    model = TileClassifier.load_from_checkpoint(ckpt_path, map_location=device).eval()
    return model, model.input_spec


def resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def probabilities(model: TileClassifier) -> Classify:
    """``model`` as a batch -> probabilities function (prepared float32 windows in, float32
    ``[N, C]`` out), on the model's device."""

    @torch.inference_mode()
    def classify(windows: np.ndarray) -> np.ndarray:
        return model.predict_proba(torch.from_numpy(windows).to(model.device)).float().cpu().numpy()

    return classify


def predict_scene(
    model: TileClassifier, spec: InputSpec, scene: Scene, out: str | os.PathLike, *args, **kwargs
) -> dict[str, object]:
    """:func:`deforest.mapping.sliding.predict_scene` with ``model``'s probabilities."""
    return sliding.predict_scene(probabilities(model), spec, scene, out, *args, **kwargs)


def predict_tiles(model: TileClassifier, spec: InputSpec, tiles: str | os.PathLike, out: str | os.PathLike,
                  batch_size: int = 256) -> dict[str, object]:
    """:func:`deforest.mapping.sliding.predict_tiles` with ``model``'s probabilities."""
    return sliding.predict_tiles(probabilities(model), spec, tiles, out, batch_size)


def _classify(model: TileClassifier, spec: InputSpec, scene: Scene, block: np.ndarray,
              origins: Sequence[tuple[int, int]], batch_size: int, max_nodata: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`deforest.mapping.sliding._classify` with ``model``'s probabilities."""
    return sliding._classify(probabilities(model), spec, scene, block, origins, batch_size, max_nodata)
