"""Validation and test epochs: predictions gathered over processes, then calibrated, decided and scored.

Decisions wait for the epoch end so that validation metrics (and the checkpoint saved right
after) use the probability correction and thresholds fitted on this very epoch. Under DDP
every rank enters the gather, with or without predictions of its own, then computes the
metrics on all the de-duplicated predictions itself: the same numbers on every rank, each
tile counted once, and no metric collective that a rank without predictions would miss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deforest.core.vocabulary import MULTICLASS
from deforest.training.calibration import apply_calibration, calibration_errors, fit_calibration, probabilities
from deforest.training.metrics import compute_metrics
from deforest.training.thresholds import ThresholdTuner

#: ``all_gather(tensor) -> [world, ...]``: the LightningModule's, on its device.
AllGather = Callable[[Tensor], Tensor]


def no_outputs(task: str, num_classes: int, device: torch.device | str) -> dict[str, Tensor]:
    """Evaluation outputs of no tile, in the keys, dtypes and shapes every rank gathers
    (targets as the datasets give them: class indexes, or 0/1 labels as uint8)."""
    target = (torch.zeros(0, dtype=torch.long) if task == MULTICLASS
              else torch.zeros(0, num_classes, dtype=torch.uint8))
    empty = {"probs": torch.zeros(0, num_classes), "scores": torch.zeros(0, num_classes), "target": target,
             "index": torch.zeros(0, dtype=torch.long)}
    return {key: value.to(device) for key, value in empty.items()}


def gather_predictions(local: dict[str, Tensor], world_size: int, all_gather: AllGather) -> dict[str, Tensor]:
    """Every process's predictions, once per dataset index (samplers pad with repeats).

    Ranks hold different numbers of predictions where a tile turned out bad as it was
    read on one of them (``data.on_bad_tile=skip``), none at all where every tile of
    theirs did; ``all_gather`` needs one shape on every rank. So the counts are gathered
    first, every rank pads its share to the largest and the padding is cut off again.
    """
    if world_size == 1:
        return local
    device = local["index"].device
    counts = all_gather(torch.tensor([local["index"].shape[0]], device=device)).flatten().tolist()
    most = max(counts)
    gathered = {}
    for key, value in local.items():
        padded = torch.cat([value, value.new_zeros((most - value.shape[0], *value.shape[1:]))])
        every = all_gather(padded)  # [world, most, ...]
        gathered[key] = torch.cat([every[rank, :n] for rank, n in enumerate(counts)])
    _, first = np.unique(gathered["index"].cpu().numpy(), return_index=True)
    return {key: value[torch.as_tensor(first, device=value.device)] for key, value in gathered.items()}


@dataclass
class EpochResult:
    """One epoch's predictions (on the CPU: ``probs`` corrected, ``scores``, ``target``,
    ``index``) and its metric values (scalars, per class, matrices)."""

    predictions: dict[str, Tensor]
    values: dict[str, Tensor]


class EpochEvaluator:
    """Collects a stage's per-batch outputs and scores them at the epoch end.

    On validation (not the sanity check) it first fits the probability correction into
    ``temperature``/``bias`` when ``calibrate``, then, with a ``tuner``, the thresholds into
    ``thresholds``: the classifier's buffers, updated in place so the checkpoint saved right
    after carries them.
    """

    def __init__(self, task: str, num_classes: int, tuner: ThresholdTuner | None, calibrate: bool) -> None:
        self.task = task
        self.num_classes = num_classes
        self.tuner = tuner
        self.calibrate = calibrate
        self.outputs: dict[str, list[dict[str, Tensor]]] = {"val": [], "test": []}

    def add(self, stage: str, probs: Tensor, scores: Tensor, target: Tensor, index: Tensor) -> None:
        self.outputs[stage].append({"probs": probs.detach(), "scores": scores.detach().float(), "target": target,
                                    "index": index})

    def finish(self, stage: str, world_size: int, all_gather: AllGather, device: torch.device, fitting: bool,
               buffers: dict[str, Tensor]) -> EpochResult | None:
        """The epoch's result; ``None`` when no rank scored a tile. ``fitting``: fit the
        correction and thresholds (a validation epoch outside the sanity check); ``buffers``:
        the classifier's ``thresholds``, ``calibration_temperature`` and ``calibration_bias``."""
        outputs, self.outputs[stage] = self.outputs[stage], []
        if not outputs and world_size == 1:
            return None
        empty = no_outputs(self.task, self.num_classes, device)
        local = {key: torch.cat([o[key] for o in outputs]).to(empty[key].dtype) if outputs else value
                 for key, value in empty.items()}
        gathered = gather_predictions(local, world_size, all_gather)
        if gathered["index"].numel() == 0:  # every tile of every rank was skipped: nothing to score
            return None
        temperature, bias = buffers["calibration_temperature"], buffers["calibration_bias"]
        if fitting and self.calibrate:
            # before the thresholds: they are tuned on the corrected probabilities
            fitted_temperature, fitted_bias = fit_calibration(self.task, gathered["scores"], gathered["target"])
            temperature.copy_(fitted_temperature)
            bias.copy_(fitted_bias)
        raw_probs = gathered["probs"]
        gathered = {**gathered, "probs": probabilities(self.task, apply_calibration(gathered["scores"], temperature, bias))}
        thresholds: Tensor = buffers["thresholds"]
        if fitting and self.tuner is not None:
            kept, scoring = self.tuner.fit(gathered["probs"].cpu(), gathered["target"].cpu())
            buffers["thresholds"].copy_(kept)
            # each tile scored at thresholds tuned on the other tiles: the checkpoint and sweep
            # selection then see what the thresholds give on data they were not tuned on
            thresholds = scoring
        predictions = {key: value.cpu() for key, value in gathered.items()}
        values = compute_metrics(self.task, self.num_classes, predictions["probs"], predictions["target"],
                                 thresholds.cpu())
        # the calibration error the correction removed: the same tiles' uncorrected probabilities
        uncorrected = calibration_errors(self.task, raw_probs.cpu(), predictions["target"])
        values.update({f"{name}_uncorrected": value for name, value in uncorrected.items()})
        return EpochResult(predictions, values)


__all__ = ["EpochEvaluator", "EpochResult", "gather_predictions", "no_outputs"]
