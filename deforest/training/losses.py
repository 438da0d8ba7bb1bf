"""Class-imbalance aware losses: class weights from each training batch, on the device.

The building blocks (:mod:`deforest.training.batch_weights`: :func:`batch_class_counts`,
:func:`class_weights`, :func:`label_weights`) are pure tensor functions;
:class:`DynamicWeightedLoss` combines them with cross-entropy (multi-class) or BCE with
logits (multi-label).

Design rules, all tested:

* nothing calls ``.item()``, ``.cpu()``, ``.tolist()`` or branches on a tensor value, so a
  CUDA step never waits for the host;
* weights come from targets only and nothing is detached from the graph of the logits;
* under DDP the counts and the normaliser are summed over processes first, so every rank
  weighs with the global batch and the averaged gradient equals the single-process
  gradient of the concatenated batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deforest.core.contract import SplitRecord
from deforest.core.errors import unknown_setting
from deforest.core.vocabulary import MULTICLASS, MULTILABEL
from deforest.training.batch_weights import SCHEMES, batch_class_counts, class_weights, label_weights

#: Schemes that weigh the positive and negative BCE terms apart: they have no multi-class meaning.
MULTILABEL_ONLY = ("pos_weight", "balanced", "asymmetric", "logit_adjusted", "tolerant")
#: What ``scheme="auto"`` means for a multi-class head; multi-label heads take ``multilabel_scheme``.
AUTO_MULTICLASS = "inverse_count"
#: Asymmetric loss (Ridnik et al., ICCV 2021): negatives' focusing exponent and probability margin.
ASL_GAMMA_NEG, ASL_CLIP = 4.0, 0.05
#: ``tolerant``'s lambda unless ``negative_scale`` is set: Wu et al.'s value (ECCV 2020), and the one measured
#: on the long-tailed benchmark (docs/imbalance.md)
TOLERANT_SCALE = 2.0
#: Running average of the weight a positive and a negative get (``logit_adjusted``): slow, because a
#: label in 2% of tiles appears in a batch of 16 only about one step in four.
PRIOR_MOMENTUM = 0.99
NORMALIZATIONS = ("mean", "weighted")
#: The count-based schemes that can turn ``ema``'s running counts into weights.
EMA_BASES = ("inverse_count", "inverse_frequency", "effective_number", "pos_weight")

#: ``criterion(logits, targets, weights) -> scalar``: a user loss that receives the weights.
Criterion = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class EmaOptions:
    """``scheme="ema"``: ``momentum``, the weight of the running counts (0.9 keeps 90% of the
    past), and ``base``, the count-based scheme (:data:`EMA_BASES`) that turns them into weights.
    The config spells them ``loss.momentum`` and ``loss.ema_base``."""

    momentum: float = 0.9
    base: str = "inverse_frequency"


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
        scheme: one of :data:`SCHEMES` (:data:`MULTILABEL_ONLY` need the multi-label head).
            ``balanced`` weighs each label's positives by ``N / (2 (P_c + 1))`` and negatives by
            ``N / (2 (N - P_c + 1))``; ``logit_adjusted`` weighs as ``balanced`` and adds to the
            logits, inside the loss only, the log ratio of the average weight a positive and a
            negative of the label received so far, so the loss optimum of the raw logits stays at
            the label's true rate; ``asymmetric`` is the asymmetric loss (focusing ``gamma``,
            default 4, on negatives only, probability margin 0.05); ``tolerant`` weighs as
            ``pos_weight`` and makes the negatives' loss tolerant (``negative_scale``, default 2).
            ``static`` uses counts given once through
            :meth:`set_static_counts`; ``ema`` smooths batch counts with ``momentum``.
        normalize: ``"mean"`` divides ``sum(w * l)`` by the number of loss elements (with
            ``inverse_count`` this is exactly the classic ``(ce * w[y]).mean()``);
            ``"weighted"`` divides by ``sum(w)`` like PyTorch's weighted cross-entropy.
        gamma: focal-loss exponent (0 disables; ``scheme="focal"`` defaults it to 2).
        beta: ``effective_number`` hyper-parameter.
        ema: ``scheme="ema"``'s :class:`EmaOptions` (or a mapping of them).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`; for multi-label
            targets become ``y * (1 - eps) + eps / 2`` inside each element's BCE, while the
            element's weight is chosen by its hard target (``w_pos`` for ``y = 1``, ``w_neg``
            for ``y = 0``), so a weighted negative never turns into a pseudo-positive.
        multilabel_scheme: what ``scheme="auto"`` means for a multi-label head (a multi-class
            head takes :data:`AUTO_MULTICLASS`).
        negative_scale: multi-label ``lambda`` (``None``: 2 for ``tolerant``, else 1) of the negative-tolerant regularisation of
            Wu et al. (ECCV 2020, distribution-balanced loss): a negative's BCE is taken at the
            logit ``lambda * z`` and divided by ``lambda``, so a negative already below the
            boundary (``z < 0``) pulls its label down ``exp((lambda - 1) z)`` times less, while a
            wrong negative (``z > 0``) keeps a gradient of about 1. 1 is plain BCE.
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
        multilabel_scheme: str = "inverse_count",
        gamma: float | None = None,
        beta: float = 0.999,
        ema: EmaOptions | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        negative_scale: float | None = None,
        ignore_index: int = -100,
        criterion: Criterion | None = None,
    ) -> None:
        super().__init__()
        if task not in (MULTICLASS, MULTILABEL):
            raise ValueError(f"task must be {MULTICLASS!r} or {MULTILABEL!r}, not {task!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown loss scheme {scheme!r}; choose from {SCHEMES}")
        if multilabel_scheme not in SCHEMES or multilabel_scheme == "auto":
            raise ValueError(f"unknown loss multilabel_scheme {multilabel_scheme!r}; choose from {SCHEMES[:-1]}")
        if scheme == "auto":
            scheme = multilabel_scheme if task == MULTILABEL else AUTO_MULTICLASS
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown loss normalize {normalize!r}; choose from {NORMALIZATIONS}")
        if scheme in MULTILABEL_ONLY and task != MULTILABEL:
            raise ValueError(f"scheme {scheme!r} weighs the positive and negative terms of BCE apart: multilabel only")
        ema = ema if isinstance(ema, EmaOptions) else EmaOptions(**(ema or {}))
        if ema.base not in EMA_BASES:
            raise ValueError(f"ema_base {ema.base!r} is not a count-based scheme")
        if not 0.0 <= ema.momentum < 1.0:
            raise ValueError(f"ema momentum must be in [0, 1), got {ema.momentum}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.task = task
        self.num_classes = num_classes
        self.scheme = scheme
        self.normalize = normalize
        default_gamma = {"focal": 2.0, "asymmetric": ASL_GAMMA_NEG}.get(scheme, 0.0)
        self.gamma = float(default_gamma if gamma is None else gamma)
        if self.gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {self.gamma}")
        self.beta = beta
        self.momentum = ema.momentum
        self.ema_base = ema.base
        if negative_scale is None:
            negative_scale = TOLERANT_SCALE if scheme == "tolerant" else 1.0
        if negative_scale <= 0:
            raise ValueError(f"negative_scale must be > 0, got {negative_scale}")
        if negative_scale != 1.0 and scheme == "asymmetric":
            raise ValueError("negative_scale and scheme 'asymmetric' both reshape the negative term: choose one")
        self.label_smoothing = label_smoothing
        self.negative_scale = float(negative_scale)
        self.ignore_index = ignore_index
        self.criterion = criterion
        # Buffers travel with the checkpoint, so a resumed run weighs as the original did.
        self.register_buffer("static_counts", torch.zeros(num_classes))
        self.register_buffer("static_total", torch.zeros(()))
        self.register_buffer("ema_counts", torch.zeros(num_classes))
        self.register_buffer("ema_total", torch.zeros(()))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        if scheme == "logit_adjusted":
            # running averages of the weight mass on positives and negatives and of their counts,
            # per label; only this scheme has them, so checkpoints of the others keep their keys
            self.register_buffer("prior_mass", torch.zeros(4, num_classes))
            self.register_buffer("prior_steps", torch.zeros((), dtype=torch.long))
        self.last_counts: Tensor | None = None
        self.last_weights: Tensor | None = None

    @classmethod
    def from_keys(cls, task: str, num_classes: int, criterion: Criterion | None = None, **keys: Any) -> DynamicWeightedLoss:
        """The loss from the ``loss`` config group's flat keys (``scheme``, ``momentum``,
        ``ema_base``, ...): the ``ema`` keys are gathered into :class:`EmaOptions`, the others
        are the constructor's."""
        known = (set(inspect.signature(cls).parameters) - {"task", "num_classes", "ema"}) | {"momentum", "ema_base"}
        for key in keys:
            if key not in known:
                raise unknown_setting("loss", key, known)
        ema = {name: keys.pop(key) for key, name in (("momentum", "momentum"), ("ema_base", "base")) if key in keys}
        return cls(task, num_classes, ema=ema, criterion=criterion, **keys)

    def set_static_counts(self, counts: Tensor, total: float) -> None:
        """Whole-training-set label counts for ``scheme="static"`` (taken once at fit start)."""
        self.static_counts.copy_(torch.as_tensor(counts, dtype=torch.float32))
        self.static_total.fill_(float(total))

    def set_split_counts(self, split: SplitRecord | None, class_names: Sequence[str]) -> None:
        """:meth:`set_static_counts` from the contract's split record: its training tiles' label counts."""
        if split is None or "train" not in split.class_counts:
            raise ValueError("loss.scheme=static needs the training split's label counts (the input contract has no split)")
        per_class = split.class_counts["train"]
        counts = torch.as_tensor([float(per_class.get(name, 0)) for name in class_names])
        self.set_static_counts(counts, float(len(split.lists["train"])))

    def weights(self, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(weights [C], counts [C], N)`` for this (global) batch; multi-label: the
        positive-term weights (see :meth:`term_weights` for both)."""
        w_pos, _, counts, total = self.term_weights(targets)
        return w_pos, counts, total

    def term_weights(self, targets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(w_pos [C], w_neg [C], counts [C], N)`` for this (global) batch; multi-class: the
        class weights twice."""
        counts = batch_class_counts(targets, self.task, self.num_classes, self.ignore_index)
        if self.task == MULTICLASS:
            total = (targets != self.ignore_index).sum().float()
        else:
            total = torch.full((), float(targets.shape[0]), device=targets.device)
        summed = _all_reduce_sum(torch.cat([counts, total.reshape(1)]))
        counts, total = summed[:-1], summed[-1]
        if self.scheme == "static":
            source, base = (self.static_counts, self.static_total), "inverse_frequency"
        elif self.scheme == "ema":
            if self.training:
                self._update_ema(counts, total)
            source, base = (self.ema_counts, self.ema_total), self.ema_base
        else:
            source, base = (counts, total), self.scheme
        if self.task == MULTICLASS:
            w = class_weights(source[0], base, source[1], self.beta)
            return w, w, counts, total
        w_pos, w_neg = label_weights(source[0], source[1], base, self.beta)
        return w_pos, w_neg, counts, total

    @torch.no_grad()
    def _update_ema(self, counts: Tensor, total: Tensor) -> None:
        # The first batch seeds the average; branch-free so nothing is read back to the host.
        first = (self.ema_steps == 0).float()
        keep = self.momentum * (1.0 - first)
        self.ema_counts.mul_(keep).add_((1.0 - keep) * counts)
        self.ema_total.mul_(keep).add_((1.0 - keep) * total)
        self.ema_steps.add_(1)

    @torch.no_grad()
    def _update_prior(self, w_pos: Tensor, w_neg: Tensor, counts: Tensor, total: Tensor) -> None:
        # Global (all-reduced) counts and weights, so every rank keeps the same averages.
        sample = torch.stack([w_pos * counts, w_neg * (total - counts), counts, total - counts])
        first = (self.prior_steps == 0).float()
        keep = PRIOR_MOMENTUM * (1.0 - first)
        self.prior_mass.mul_(keep).add_((1.0 - keep) * sample)
        self.prior_steps.add_(1)

    def logit_offset(self) -> Tensor:
        """``logit_adjusted``: ``log(mean w_pos / mean w_neg)`` per label over the running
        averages, the shift of the constant-predictor optimum that the weights cause; 0 before
        the first training step.

        A weighted BCE with weights ``a`` (positives) and ``b`` (negatives) is lowest at
        ``logit p = logit pi + log(E[a P] / E[b (N - P)]) - log(E[P] / E[N - P])``; adding this
        offset to the logits inside the loss puts the raw logits' optimum back at ``logit pi``.
        """
        tiny = torch.finfo(self.prior_mass.dtype).tiny
        pos_mass, neg_mass, pos, neg = self.prior_mass
        mean_pos = (pos_mass + tiny) / (pos + tiny)
        mean_neg = (neg_mass + tiny) / (neg + tiny)
        return torch.log(mean_pos) - torch.log(mean_neg)

    def forward(self, logits: Tensor | Sequence[Tensor], targets: Tensor) -> Tensor:
        """The weighted loss; for several heads' logits, the mean of their losses under one
        set of batch weights (stateful schemes such as ``ema`` see each batch once)."""
        w_pos, w_neg, counts, total = self.term_weights(targets)
        if self.scheme == "logit_adjusted" and self.training:
            self._update_prior(w_pos, w_neg, counts, total)
        self.last_counts, self.last_weights = counts.detach(), w_pos.detach()
        if isinstance(logits, Tensor):  # float32 under bf16/fp16 autocast: sums of many small terms
            return self._weighted_loss(logits.float(), targets, w_pos, w_neg)
        return torch.stack([self._weighted_loss(head.float(), targets, w_pos, w_neg) for head in logits]).mean()

    def _weighted_loss(self, logits: Tensor, targets: Tensor, w_pos: Tensor, w_neg: Tensor) -> Tensor:
        if self.criterion is not None:
            return self.criterion(logits, targets, w_pos)
        if self.task == MULTICLASS:
            weighted, element_weights, n_elements = self._multiclass(logits, targets, w_pos)
        else:
            weighted, element_weights, n_elements = self._multilabel(logits, targets, w_pos, w_neg)
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

    def _multilabel(
        self, logits: Tensor, targets: Tensor, w_pos: Tensor, w_neg: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        hard = targets.float()
        soft = hard * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.scheme == "logit_adjusted":
            logits = logits + self.logit_offset()
        # Negative-tolerant regularisation: a negative's (smoothed) BCE is taken at lambda * z and
        # divided by lambda; positives keep scale 1. Focusing below still sees the raw logits.
        scale = torch.where(hard > 0, 1.0, self.negative_scale) if self.negative_scale != 1.0 else None
        scaled = logits if scale is None else logits * scale
        log_p, log_not_p = F.logsigmoid(scaled), F.logsigmoid(-scaled)
        # Focusing, like the weight, follows the hard target and scales the element's whole
        # smoothed BCE: focusing only the negative part of a negative would leave its smoothed
        # positive part in charge and pull the negative towards p = 0.5.
        focus_pos = focus_neg = None
        if self.scheme == "asymmetric":
            # Ridnik et al.: positives plain, negatives focused by p_m ** gamma with the margin-shifted
            # p_m = max(p - m, 0), so easy negatives (p < m) drop out of the loss altogether.
            p_m = (torch.sigmoid(logits) - ASL_CLIP).clamp(min=0.0)
            log_not_p = torch.where(hard > 0, log_not_p, torch.log1p(-p_m))
            focus_neg = p_m**self.gamma
        elif self.gamma > 0:
            p = torch.sigmoid(logits)
            focus_pos, focus_neg = (1.0 - p) ** self.gamma, p**self.gamma
        bce = -soft * log_p - (1.0 - soft) * log_not_p
        if scale is not None:
            bce = bce / scale
        if focus_neg is not None:
            focus = hard * (1.0 if focus_pos is None else focus_pos) + (1.0 - hard) * focus_neg
            bce = bce * focus
        # The hard target picks the weight; smoothing stays inside the element's BCE. Weighing the
        # smoothed target's two parts apart would make a negative with a large w_pos a pseudo-positive.
        element_weights = hard * w_pos + (1.0 - hard) * w_neg
        weighted = element_weights * bce
        n_elements = _all_reduce_sum(torch.full((), float(soft.numel()), device=soft.device))
        return weighted, element_weights, n_elements


__all__ = ["EMA_BASES", "MULTILABEL_ONLY", "NORMALIZATIONS", "SCHEMES", "TOLERANT_SCALE", "DynamicWeightedLoss", "EmaOptions"]
