"""Freeze a pretrained backbone for the first epochs, then train it (``model.unfreeze_backbone_at_epoch``).

Lightning's :class:`~lightning.pytorch.callbacks.BackboneFinetuning` freezes
``pl_module.backbone`` before training and, at the given epoch, unfreezes it and adds it to
the optimizer as a new parameter group whose rate it then drives itself. Here the backbone
is in the optimizer from the start, in its own group at ``model.backbone_lr_multiplier``
times the head's rate (:meth:`deforest.module.TileClassifier.configure_optimizers`), so the
configured scheduler (OneCycleLR by default, which needs every group from its first step)
schedules both: unfreezing only makes the backbone trainable again.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BackboneFinetuning as LightningBackboneFinetuning
from torch.optim import Optimizer


class BackboneFinetuning(LightningBackboneFinetuning):
    """Lightning's callback, with the backbone already in the optimizer.

    Args:
        unfreeze_backbone_at_epoch: the first epoch (0-based) that trains the backbone.
        train_bn: keep the backbone's batch norm layers training while it is frozen.
    """

    def __init__(self, unfreeze_backbone_at_epoch: int, train_bn: bool = True) -> None:
        if unfreeze_backbone_at_epoch < 0:
            raise ValueError(f"model.unfreeze_backbone_at_epoch must be >= 0, not {unfreeze_backbone_at_epoch}")
        super().__init__(unfreeze_backbone_at_epoch=unfreeze_backbone_at_epoch, train_bn=train_bn)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=self.train_bn)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        # ">=": a run resumed past the epoch unfreezes too
        if epoch >= self.unfreeze_backbone_at_epoch:
            self.make_trainable(pl_module.backbone)
