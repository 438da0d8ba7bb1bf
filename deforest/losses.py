"""Class-imbalance aware losses: class weights from each training batch, on the device.

The two building blocks, :func:`batch_class_counts` and :func:`class_weights`, are pure
tensor functions; :class:`DynamicWeightedLoss` combines them with cross-entropy
(multi-class) or BCE with logits (multi-label).

Design rules, all tested:

* nothing calls ``.item()``, ``.cpu()``, ``.tolist()`` or branches on a tensor value, so a
  CUDA step never waits for the host;
* weights come from targets only and nothing is detached from the graph of the logits;
* under DDP the counts and the normaliser are summed over processes first, so every rank
  weighs with the global batch and the averaged gradient equals the single-process
  gradient of the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

MULTICLASS, MULTILABEL = "multiclass", "multilabel"
SCHEMES = (
    "none",
    "static",
    "inverse_count",
    "inverse_frequency",
    "effective_number",
    "ema",
    "pos_weight",
    "focal",
)
NORMALIZATIONS = ("mean", "weighted")

#: ``criterion(logits, targets, weights) -> scalar``: a user loss that receives the weights.
Criterion = Callable[[Tensor, Tensor, Tensor], Tensor]


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


def class_weights(
    counts: Tensor, scheme: str, total: Tensor | float | None = None, beta: float = 0.999
) -> Tensor:
    """Per-class weights from class counts.

    ``total`` is the number of samples the counts come from (``N``); it defaults to the
    sum of ``counts``, which is right for multi-class but not for multi-label, where a
    sample can carry several labels.

    * ``inverse_count``: ``1 / (n_c + 1)``;
    * ``inverse_frequency``: ``N / (C * n_c)``, absent classes counted as 1;
    * ``effective_number``: ``(1 - beta) / (1 - beta ** n_c)`` (Cui et al., CVPR 2019),
      rescaled to sum to ``C``; absent classes counted as 1;
    * ``pos_weight``: ``(N - P_c + 1) / (P_c + 1)``, the positive-term weight of BCE;
    * ``none`` and ``focal``: ones.
    """
    counts = counts.float()
    n_classes = counts.numel()
    if total is None:
        total = counts.sum()
    if scheme in ("none", "focal"):
        return torch.ones_like(counts)
    if scheme == "inverse_count":
        return 1.0 / (counts + 1.0)
    if scheme == "inverse_frequency":
        return total / (n_classes * counts.clamp(min=1.0))
    if scheme == "effective_number":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"effective_number needs 0 <= beta < 1, got {beta}")
        weights = (1.0 - beta) / (1.0 - beta ** counts.clamp(min=1.0))
        return weights * n_classes / weights.sum()
    if scheme == "pos_weight":
        return (total - counts + 1.0) / (counts + 1.0)
    raise ValueError(f"unknown weighting scheme {scheme!r}; choose from {SCHEMES}")


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over processes when a process group is running; identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class DynamicWeightedLoss(nn.Module):
    """Cross-entropy or BCE-with-logits weighted by class weights taken from each batch.

    Args:
        task: ``"multiclass"`` (logits ``[N, C]``, int64 targets ``[N]``) or
            ``"multilabel"`` (logits ``[N, C]``, ``{0, 1}`` targets ``[N, C]``).
        num_classes: ``C``.
        scheme: one of :data:`SCHEMES`. ``static`` uses counts given once through
            :meth:`set_static_counts`; ``ema`` smooths batch counts with ``momentum``.
        normalize: ``"mean"`` divides ``sum(w * l)`` by the number of loss elements (with
            ``inverse_count`` this is exactly the classic ``(ce * w[y]).mean()``);
            ``"weighted"`` divides by ``sum(w)`` like PyTorch's weighted cross-entropy.
        gamma: focal-loss exponent (0 disables; ``scheme="focal"`` defaults it to 2).
        beta: ``effective_number`` hyper-parameter.
        momentum: ``ema`` weight of the running counts (0.9 keeps 90% of the past).
        ema_base: the count-based scheme that turns the running counts into weights.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`; for multi-label
            targets become ``y * (1 - eps) + eps / 2``.
        ignore_index: multi-class targets to leave out of counts and loss.
        criterion: optional ``criterion(logits, targets, weights)`` that replaces the
            built-in loss and receives the ``[C]`` weights.
    """

    def __init__(
        self,
        task: str,
        num_classes: int,
        scheme: str = "inverse_count",
        normalize: str = "mean",
        gamma: float | None = None,
        beta: float = 0.999,
        momentum: float = 0.9,
        ema_base: str = "inverse_frequency",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        criterion: Criterion | None = None,
    ) -> None:
        super().__init__()
        if task not in (MULTICLASS, MULTILABEL):
            raise ValueError(f"task must be {MULTICLASS!r} or {MULTILABEL!r}, not {task!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown loss scheme {scheme!r}; choose from {SCHEMES}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown loss normalize {normalize!r}; choose from {NORMALIZATIONS}")
        if scheme == "pos_weight" and task != MULTILABEL:
            raise ValueError("scheme 'pos_weight' weighs the positive term of BCE: multilabel only")
        if ema_base not in ("inverse_count", "inverse_frequency", "effective_number", "pos_weight"):
            raise ValueError(f"ema_base {ema_base!r} is not a count-based scheme")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ema momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.task = task
        self.num_classes = num_classes
        self.scheme = scheme
        self.normalize = normalize
        self.gamma = float(2.0 if gamma is None and scheme == "focal" else gamma or 0.0)
        if self.gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {self.gamma}")
        self.beta = beta
        self.momentum = momentum
        self.ema_base = ema_base
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.criterion = criterion
        # Buffers travel with the checkpoint, so a resumed run weighs as the original did.
        self.register_buffer("static_counts", torch.zeros(num_classes))
        self.register_buffer("static_total", torch.zeros(()))
        self.register_buffer("ema_counts", torch.zeros(num_classes))
        self.register_buffer("ema_total", torch.zeros(()))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.last_counts: Tensor | None = None
        self.last_weights: Tensor | None = None

    def set_static_counts(self, counts: Tensor, total: float) -> None:
        """Whole-training-set label counts for ``scheme="static"`` (taken once at fit start)."""
        self.static_counts.copy_(torch.as_tensor(counts, dtype=torch.float32))
        self.static_total.fill_(float(total))

    def weights(self, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(weights [C], counts [C], N)`` for this (global) batch."""
        counts = batch_class_counts(targets, self.task, self.num_classes, self.ignore_index)
        if self.task == MULTICLASS:
            total = (targets != self.ignore_index).sum().float()
        else:
            total = torch.full((), float(targets.shape[0]), device=targets.device)
        summed = _all_reduce_sum(torch.cat([counts, total.reshape(1)]))
        counts, total = summed[:-1], summed[-1]
        if self.scheme == "static":
            return class_weights(self.static_counts, "inverse_frequency", self.static_total), counts, total
        if self.scheme == "ema":
            if self.training:
                self._update_ema(counts, total)
            return class_weights(self.ema_counts, self.ema_base, self.ema_total, self.beta), counts, total
        return class_weights(counts, self.scheme, total, self.beta), counts, total

    @torch.no_grad()
    def _update_ema(self, counts: Tensor, total: Tensor) -> None:
        # The first batch seeds the average; branch-free so nothing is read back to the host.
        first = (self.ema_steps == 0).float()
        keep = self.momentum * (1.0 - first)
        self.ema_counts.mul_(keep).add_((1.0 - keep) * counts)
        self.ema_total.mul_(keep).add_((1.0 - keep) * total)
        self.ema_steps.add_(1)

    def forward(self, logits: Tensor | Sequence[Tensor], targets: Tensor) -> Tensor:
        """The weighted loss; for several heads' logits, the mean of their losses under one
        set of batch weights (stateful schemes such as ``ema`` see each batch once)."""
        weights, counts, total = self.weights(targets)
        self.last_counts, self.last_weights = counts.detach(), weights.detach()
        if isinstance(logits, Tensor):  # float32 under bf16/fp16 autocast: sums of many small terms
            return self._weighted_loss(logits.float(), targets, weights)
        return torch.stack([self._weighted_loss(head.float(), targets, weights) for head in logits]).mean()

    def _weighted_loss(self, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        if self.criterion is not None:
            return self.criterion(logits, targets, weights)
        if self.task == MULTICLASS:
            weighted, element_weights, n_elements = self._multiclass(logits, targets, weights)
        else:
            weighted, element_weights, n_elements = self._multilabel(logits, targets, weights)
        if self.normalize == "mean":
            denominator = n_elements
        else:
            denominator = _all_reduce_sum(element_weights.sum())
        # DDP averages gradients over ranks: scale so the average equals the global gradient.
        return weighted.sum() * _world_size() / denominator.clamp(min=torch.finfo(weighted.dtype).tiny)

    def _multiclass(self, logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        valid = targets != self.ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        ce = F.cross_entropy(
            logits, safe, reduction="none", label_smoothing=self.label_smoothing
        )
        if self.gamma > 0:
            p_true = torch.softmax(logits.float(), dim=1).gather(1, safe[:, None]).squeeze(1)
            ce = ce * (1.0 - p_true).clamp(min=0.0) ** self.gamma
        element_weights = weights[safe] * valid.float()
        n_elements = _all_reduce_sum(valid.sum().float())
        return ce * element_weights, element_weights, n_elements

    def _multilabel(self, logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hard = targets.float()
        soft = hard * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        pos_term, neg_term = -soft * log_p, -(1.0 - soft) * log_not_p
        if self.gamma > 0:
            p = torch.sigmoid(logits)
            pos_term = pos_term * (1.0 - p) ** self.gamma
            neg_term = neg_term * p**self.gamma
        if self.scheme == "pos_weight" or (self.scheme == "ema" and self.ema_base == "pos_weight"):
            w_pos, w_neg = weights.expand_as(soft), torch.ones_like(soft)
        else:
            w_pos = w_neg = weights.expand_as(soft)
        weighted = w_pos * pos_term + w_neg * neg_term
        element_weights = soft * w_pos + (1.0 - soft) * w_neg
        n_elements = _all_reduce_sum(torch.full((), float(soft.numel()), device=soft.device))
        return weighted, element_weights, n_elements


__all__ = [
    "NORMALIZATIONS",
    "SCHEMES",
    "DynamicWeightedLoss",
    "batch_class_counts",
    "class_weights",
]
