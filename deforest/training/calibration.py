"""Calibrated probabilities: expected calibration error and a correction fitted on validation.

Batch weighting moves a model's priors (``inverse_count`` halves a rare label's probability,
``balanced`` and ``pos_weight`` inflate it; docs/imbalance.md, "Multi-label weighting"), so a probability
of 0.3 need not mean 30%. The correction is an affine map of the logits, ``z / T + b``: one
temperature ``T`` for the whole head and one bias per class or label (temperature scaling with
a per-label intercept, i.e. Platt scaling that shares its slope; a multi-class head gets the
temperature alone, so its argmax never moves). Each validation epoch fits it
on that epoch's validation logits; the checkpoint keeps it in its contract, and
``predict_proba``, deforest-predict, deforest-eval and the exported graph apply it.

It is monotone per label, so the per-label ranking (AP, AUROC) and F1 at thresholds tuned on
the corrected probabilities do not move.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from deforest.core.vocabulary import MULTICLASS

#: ECE bins (equal width over [0, 1], the common choice).
ECE_BINS = 15
#: Strength of the pull of each bias towards 0, in pseudo-tiles: keeps a label that validation
#: shows no positive of (or only positives) from getting an unbounded bias.
BIAS_PRIOR_TILES = 1.0
#: Standard deviation of the Gaussian prior on ``log T`` (centred on T = 1). A validation split
#: the model gets entirely right lowers the log-loss without end as T -> 0, and a few dozen
#: tiles move T by sampling noise alone; the prior keeps both near 1 while a few hundred tiles
#: of a truly over- or under-confident model outweigh it.
TEMPERATURE_PRIOR_SD = 0.2


def calibration_errors(task: str, probs: Tensor, target: Tensor, n_bins: int = ECE_BINS) -> dict[str, Tensor]:
    """ECE (L1, ``n_bins`` equal-width bins). Multi-class: ``ece`` of the top-label confidence.
    Multi-label: ``ece`` over all label-tile pairs, ``ece_macro`` the mean of the labels' ECEs."""
    probs = probs.float()
    if task == MULTICLASS:
        return {"ece": multiclass_calibration_error(probs, target.long(), probs.shape[1], n_bins=n_bins)}
    target = target.long()
    pooled = binary_calibration_error(probs.reshape(-1), target.reshape(-1), n_bins=n_bins)
    per_label = torch.stack(
        [binary_calibration_error(probs[:, c], target[:, c], n_bins=n_bins) for c in range(probs.shape[1])]
    )
    return {"ece": pooled, "ece_macro": per_label.mean()}


def apply_calibration(scores: Tensor, temperature: Tensor, bias: Tensor) -> Tensor:
    """``scores / T + b``: logits of the corrected probabilities."""
    return scores / temperature + bias


def probabilities(task: str, scores: Tensor) -> Tensor:
    return scores.softmax(dim=1) if task == MULTICLASS else torch.sigmoid(scores)


def fit_calibration(task: str, scores: Tensor, target: Tensor, steps: int = 100) -> tuple[Tensor, Tensor]:
    """``(T [], b [C])`` minimising the validation log-loss (cross-entropy or BCE) of
    ``scores / T + b`` (multi-class: ``b = 0``), plus a Gaussian pull of each bias towards 0 worth
    :data:`BIAS_PRIOR_TILES` tiles and a Gaussian prior on ``log T`` (:data:`TEMPERATURE_PRIOR_SD`).
    The identity when there are no tiles."""
    scores = scores.detach().float().cpu()
    target = target.detach().cpu()
    c = scores.shape[1]
    if scores.shape[0] == 0:
        return torch.ones(()), torch.zeros(c)
    log_t = torch.zeros((), requires_grad=True)  # T = exp(log_t) stays positive
    bias = torch.zeros(c, requires_grad=task != MULTICLASS)
    params = [log_t] if task == MULTICLASS else [log_t, bias]
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    n = scores.shape[0]

    def closure() -> Tensor:
        optimizer.zero_grad()
        z = apply_calibration(scores, log_t.exp(), bias)
        if task == MULTICLASS:
            loss = torch.nn.functional.cross_entropy(z, target.long(), reduction="sum")
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, target.float(), reduction="sum")
        prior = 0.5 * BIAS_PRIOR_TILES * (bias**2).sum() + 0.5 * (log_t / TEMPERATURE_PRIOR_SD) ** 2
        loss = (loss + prior) / n
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature, bias = log_t.detach().exp(), bias.detach()
    if not (torch.isfinite(temperature) and torch.isfinite(bias).all()):
        return torch.ones(()), torch.zeros(c)
    return temperature, bias


__all__ = ["ECE_BINS", "apply_calibration", "calibration_errors", "fit_calibration", "probabilities"]
