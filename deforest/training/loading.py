"""Rebuilding a classifier from a checkpoint without running anything the file says.

Unlike Lightning's loader, the saved hyper-parameters pass through
:func:`deforest.training.checkpoints.model_kwargs`: ``compile`` (whose options name compilers
that ``torch.compile`` runs) and other code-execution settings are never taken from the file,
only from the caller's keyword arguments (i.e. the current config); ``configure_model`` is not
called here. A missing, truncated or crafted file raises
:class:`~deforest.core.safety.CheckpointError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any, TypeVar

import torch
from torch import Tensor

from deforest.core.safety import CheckpointError
from deforest.training.checkpoints import check_numbers, model_kwargs, read_checkpoint
from deforest.training.settings import grouped

Model = TypeVar("Model")


def load_classifier(cls: type[Model], checkpoint_path: str | os.PathLike | IO, map_location: Any = None,
                    strict: bool | None = None, overrides: Mapping[str, Any] | None = None) -> Model:
    """A ``cls`` (:class:`~deforest.training.module.TileClassifier`) with the checkpoint's weights,
    on the device its tensors were mapped to.

    Checkpoints that keep the settings flat (``backbone``, ``width``, ``tta`` ... at the top of
    their hyper-parameters) load too: the flat keys are sorted into their groups first."""
    if map_location is None:
        from lightning.pytorch.core.saving import _default_map_location as map_location
    checkpoint = read_checkpoint(checkpoint_path, map_location)
    hparams = checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    if not isinstance(hparams, Mapping):
        raise CheckpointError(checkpoint_path, f"refused: its hyper-parameters are a {type(hparams).__name__}")
    options = model_kwargs(cls, grouped(hparams), checkpoint_path, overrides)
    spec = options.get("input_spec")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("normalization"), Mapping):
        raise CheckpointError(checkpoint_path, "refused: it has no input contract (input_spec); was it written by deforest?")
    check_numbers(checkpoint_path, "normalisation mean", spec["normalization"].get("mean"))
    check_numbers(checkpoint_path, "normalisation std", spec["normalization"].get("std"), low=1e-12)
    check_numbers(checkpoint_path, "thresholds", spec.get("thresholds"), low=0.0, high=1.0)
    try:
        model = cls(**options)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(
            checkpoint_path, f"cannot rebuild the model from it ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
        ) from None
    check_numbers(checkpoint_path, "thresholds", model.thresholds.tolist(), low=0.0, high=1.0)
    check_numbers(checkpoint_path, "calibration temperature", [float(model.calibration_temperature)], low=1e-6)
    check_numbers(checkpoint_path, "calibration bias", model.calibration_bias.tolist())
    tensors = (t for t in checkpoint["state_dict"].values() if isinstance(t, Tensor))
    return model.to(next(tensors, torch.tensor(0)).device)


__all__ = ["load_classifier"]
