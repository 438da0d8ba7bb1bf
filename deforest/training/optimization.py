"""The optimizer and scheduler from their config factories (Hydra partials).

What the factories cannot know from the config comes from the model and the trainer here:
the parameter groups (the backbone's at ``model.backbone_lr_multiplier`` times the rate, with
OneCycleLR's peak scaled alike) and the schedule's length (``total_steps`` / ``T_max``, filled
in when the scheduler takes them and the config does not set them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from deforest.training.settings import OptimizationSettings

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


def param_groups(model: nn.Module, backbone: nn.Module, factory: OptimizerFactory, multiplier: float) -> Any:
    """All parameters; with a ``multiplier`` other than 1 two groups, the backbone's at the scaled rate.

    Frozen parameters stay in the optimizer (they have no gradient, so it skips them):
    ``BackboneFinetuning`` unfreezes them later without adding a group.
    """
    if multiplier == 1.0:
        return model.parameters()
    lr = getattr(factory, "keywords", {}).get("lr")
    if lr is None:
        raise ValueError("model.backbone_lr_multiplier needs model.optimizer.lr")
    inside = {id(p) for p in backbone.parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) not in inside], "lr": lr, "lr_scale": 1.0},
        {"params": [p for p in model.parameters() if id(p) in inside], "lr": lr * multiplier, "lr_scale": multiplier},
    ]


def scheduler_config(factory: SchedulerFactory, optimizer: torch.optim.Optimizer, interval: str,
                     stepping_batches: int, max_epochs: int | None) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` entry: the scheduler with the arguments the trainer decides."""
    kwargs: dict[str, Any] = {}
    target = getattr(factory, "func", factory)
    params = inspect.signature(target).parameters
    given = getattr(factory, "keywords", {})
    if len(optimizer.param_groups) > 1 and "max_lr" in given:  # OneCycleLR: one peak per group
        kwargs["max_lr"] = [given["max_lr"] * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    steps = int(stepping_batches)
    if interval == "epoch":
        steps = int(max_epochs or 1)
    for name in ("total_steps", "T_max"):
        if name in params and name not in given:
            kwargs[name] = steps
    return {"scheduler": factory(optimizer, **kwargs), "interval": interval}


def build_optimization(model: nn.Module, backbone: nn.Module, optimizer: OptimizerFactory | None,
                       scheduler: SchedulerFactory | None, options: OptimizationSettings, trainer: Any,
                       step_hooks: Iterable[Callable[[torch.optim.Optimizer], None]] = ()) -> Any:
    """What ``configure_optimizers`` returns; ``step_hooks`` run after every optimizer step."""
    if optimizer is None:
        raise ValueError("no optimizer configured (model.optimizer)")
    built = optimizer(params=param_groups(model, backbone, optimizer, options.backbone_lr_multiplier))
    for hook in step_hooks:
        built.register_step_post_hook(lambda opt, args, kwargs, hook=hook: hook(opt))
    if scheduler is None:
        return built
    schedule = scheduler_config(scheduler, built, options.scheduler_interval,
                                trainer.estimated_stepping_batches, trainer.max_epochs)
    return {"optimizer": built, "lr_scheduler": schedule}


__all__ = ["OptimizerFactory", "SchedulerFactory", "build_optimization", "param_groups", "scheduler_config"]
