"""Class weights from class counts: pure tensor functions, on the device.

:func:`batch_class_counts` counts a batch's classes (labels); :func:`class_weights` (one weight
per class) and :func:`label_weights` (a positive and a negative weight per label) turn counts
into the weights :class:`deforest.training.losses.DynamicWeightedLoss` applies. Nothing here
calls ``.item()``, ``.cpu()`` or ``.tolist()`` or branches on a tensor value, so a CUDA step
never waits for the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deforest.core.vocabulary import MULTICLASS, MULTILABEL

#: Every weighting scheme :class:`~deforest.training.losses.DynamicWeightedLoss` knows.
SCHEMES = (
    "none",
    "static",
    "inverse_count",
    "inverse_frequency",
    "effective_number",
    "ema",
    "pos_weight",
    "focal",
    "balanced",
    "asymmetric",
    "logit_adjusted",
    "tolerant",
    "auto",
)

def batch_class_counts(
    targets: Tensor, task: str, num_classes: int, ignore_index: int = -100
) -> Tensor:
    """Samples per class (multi-class) or positives per label (multi-label), float ``[C]``.

    Uses ``scatter_add`` rather than ``bincount``: on CUDA ``bincount`` reads the maximum
    back to the host to size its output.
    """
    if task == MULTICLASS:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        counts = torch.zeros(num_classes, device=targets.device, dtype=torch.float32)
        return counts.scatter_add_(0, safe.long(), valid.float())
    if task == MULTILABEL:
        return targets.float().sum(dim=0)
    raise ValueError(f"task must be {MULTICLASS!r} or {MULTILABEL!r}, not {task!r}")


def _unit_mean(raw: Tensor, counts: Tensor, total: Tensor | float) -> Tensor:
    """``raw`` rescaled so the weights of the ``total`` samples average 1.

    The scale then does not depend on which classes the batch lacks: an absent class has no
    samples to carry its (largest) weight, so it takes no share of the normaliser either.
    """
    mass = (counts * raw).sum()
    return raw * total / mass.clamp(min=torch.finfo(raw.dtype).tiny)


def class_weights(
    counts: Tensor, scheme: str, total: Tensor | float | None = None, beta: float = 0.999
) -> Tensor:
    """Per-class weights from class counts (multi-class; one weight per class).

    ``total`` is the number of samples the counts come from (``N``); it defaults to the
    sum of ``counts``.

    * ``inverse_count``: ``1 / (n_c + 1)`` (the reference formula, not rescaled);
    * ``inverse_frequency``: ``N / (C_b * n_c)``, ``C_b`` the classes present; the samples'
      weights average 1;
    * ``effective_number``: ``(1 - beta) / (1 - beta ** n_c)`` (Cui et al., CVPR 2019),
      rescaled so the samples' weights average 1;
    * ``pos_weight``: ``(N - P_c + 1) / (P_c + 1)``, the positive-term weight of BCE;
    * ``none``, ``focal``, ``asymmetric``: ones.
    """
    counts = counts.float()
    if total is None:
        total = counts.sum()
    if scheme in ("none", "focal", "asymmetric"):
        return torch.ones_like(counts)
    if scheme == "inverse_count":
        return 1.0 / (counts + 1.0)
    if scheme == "inverse_frequency":
        return _unit_mean(1.0 / counts.clamp(min=1.0), counts, total)
    if scheme == "effective_number":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"effective_number needs 0 <= beta < 1, got {beta}")
        return _unit_mean((1.0 - beta) / (1.0 - beta ** counts.clamp(min=1.0)), counts, total)
    if scheme == "pos_weight":
        return (total - counts + 1.0) / (counts + 1.0)
    raise ValueError(f"unknown weighting scheme {scheme!r}; choose from {SCHEMES}")


def label_weights(
    positives: Tensor, total: Tensor | float, scheme: str, beta: float = 0.999
) -> tuple[Tensor, Tensor]:
    """Multi-label ``(w_pos [C], w_neg [C])``: the weights of each label's positive and
    negative BCE terms, from its positives ``P_c`` among ``N = total`` samples.

    * ``inverse_count``: ``1 / (P_c + 1)`` on both terms (the reference formula: its
      constant-predictor optimum for a rare label is about half the true rate);
    * ``pos_weight``, ``tolerant``: ``(N - P_c + 1) / (P_c + 1)`` on positives, 1 on negatives
      (``tolerant`` also reshapes the negatives' loss: :class:`~deforest.training.losses.DynamicWeightedLoss`);
    * ``balanced``, ``logit_adjusted``: ``N / (2 (P_c + 1))`` on positives,
      ``N / (2 (N - P_c + 1))`` on negatives, so each label's positives and negatives carry
      about equal mass;
    * ``inverse_frequency``, ``effective_number``: the multi-class formula applied to the
      positives' count for ``w_pos`` and to the negatives' count for ``w_neg``, rescaled so
      the ``N * C`` elements' weights average 1 (an absent label's negatives do not get the
      largest weight);
    * ``none``, ``focal``, ``asymmetric``: ones.
    """
    positives = positives.float()
    total = torch.as_tensor(total, dtype=positives.dtype, device=positives.device)
    negatives = total - positives
    if scheme in ("none", "focal", "asymmetric"):
        ones = torch.ones_like(positives)
        return ones, ones
    if scheme == "inverse_count":
        w = 1.0 / (positives + 1.0)
        return w, w
    if scheme in ("pos_weight", "tolerant"):
        return (negatives + 1.0) / (positives + 1.0), torch.ones_like(positives)
    if scheme in ("balanced", "logit_adjusted"):
        return total / (2.0 * (positives + 1.0)), total / (2.0 * (negatives + 1.0))
    if scheme == "inverse_frequency":
        raw_pos, raw_neg = 1.0 / positives.clamp(min=1.0), 1.0 / negatives.clamp(min=1.0)
    elif scheme == "effective_number":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"effective_number needs 0 <= beta < 1, got {beta}")
        raw_pos = (1.0 - beta) / (1.0 - beta ** positives.clamp(min=1.0))
        raw_neg = (1.0 - beta) / (1.0 - beta ** negatives.clamp(min=1.0))
    else:
        raise ValueError(f"unknown weighting scheme {scheme!r}; choose from {SCHEMES}")
    mass = (positives * raw_pos + negatives * raw_neg).sum()
    scale = total * positives.numel() / mass.clamp(min=torch.finfo(mass.dtype).tiny)
    return raw_pos * scale, raw_neg * scale


__all__ = ["SCHEMES", "batch_class_counts", "class_weights", "label_weights"]
