"""Freeze a pretrained backbone for the first epochs, then train it (``model.unfreeze_backbone_at_epoch``).

Lightning's :class:`~lightning.pytorch.callbacks.BackboneFinetuning` freezes
``pl_module.backbone`` before training and, at the given epoch, unfreezes it and adds it to
the optimizer as a new parameter group whose rate it then drives itself. Here the backbone
is in the optimizer from the start, in its own group at ``model.backbone_lr_multiplier``
times the head's rate (:meth:`deforest.training.module.TileClassifier.configure_optimizers`), so the
configured scheduler (OneCycleLR by default, which needs every group from its first step)
schedules both: unfreezing only makes the backbone trainable again.

Under DDP the frozen backbone keeps ``requires_grad``: DDP registers only the parameters that
require gradients when it wraps the model, which is after the freeze, and never re-registers
them (PyTorch has no supported way to add parameters to a live reducer; Lightning's own
callback has this problem, Lightning-AI/pytorch-lightning#20340). A backbone frozen with
``requires_grad=False`` would then train unsynchronised on every rank once unfrozen, and the
checkpoint would hold rank 0's. So DDP gets every parameter from the start, and while the
backbone is frozen its gradients (all-reduced like the others) are dropped before each
optimizer step: with no gradient the optimizer leaves a parameter alone, weight decay and
momentum included. A single process keeps the cheaper ``requires_grad=False`` freeze.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BackboneFinetuning as LightningBackboneFinetuning
from torch import Tensor
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
        #: DDP: frozen backbone parameters left requiring gradients, whose updates are dropped
        self._held: list[Tensor] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # freezes, before the strategy wraps the model
        if trainer.world_size > 1:  # see the module docstring
            self._held = [p for p in pl_module.backbone.parameters() if not p.requires_grad]
            for p in self._held:
                p.requires_grad = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        for p in self._held:
            p.grad = None

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=self.train_bn)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        # ">=": a run resumed past the epoch unfreezes too
        if epoch >= self.unfreeze_backbone_at_epoch:
            self.make_trainable(pl_module.backbone)
            self._held = []
