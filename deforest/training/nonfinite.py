"""The non-finite-loss policy (``model.nonfinite_loss``), without a host sync per step.

``error`` stops on a NaN/inf training loss naming the batch's files; ``skip`` skips that
batch: its loss becomes a zero that reaches every parameter, the batch-norm statistics of the
accumulation window go back to their start, and the optimizer step is undone (parameters and
optimizer state) by ``torch.where`` on the device. Every decision stays on the device; the
flags are read back once per check (:meth:`NonFinitePolicy.check`), every ``log_every_n_steps``
steps and at the epoch's last batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deforest.core.contract import SplitRecord
from deforest.core.vocabulary import POLICIES

log = logging.getLogger(__name__)



def training_files(split: SplitRecord | None, index: Tensor) -> list[str]:
    """A training batch's files, from the contract's train list (dataset order); the dataset
    indexes themselves when the contract has no split."""
    indexes = index.tolist()
    if split is None:
        return [str(i) for i in indexes]
    train, root = split.lists.get("train", []), split.root
    return [os.path.join(root, train[i]) if i < len(train) else str(i) for i in indexes]


class NonFinitePolicy:
    """What a training step does with a non-finite loss; ``mode`` is ``error`` or ``skip``."""

    def __init__(self, mode: str = "error") -> None:
        if mode not in POLICIES:
            raise ValueError(f"model.nonfinite_loss must be error or skip, not {mode!r}")
        self.mode = mode
        #: per training step since the last check: step, batch, loss finite?, loss, tile indexes
        self.pending: list[tuple[int, int, Tensor, Tensor, Tensor]] = []
        #: ``skip``: the accumulation window's finite flag and its batch-norm statistics at its start
        self.window: tuple[Tensor, list[Tensor]] | None = None
        #: ``skip``: the finite flag, and each stepped parameter with its value and optimizer state before the step
        self.snapshot: tuple[Tensor, list[tuple[Tensor, Tensor, dict[str, Tensor]]]] | None = None

    @property
    def skip(self) -> bool:
        return self.mode == "skip"

    def reset(self) -> None:
        """At the start of training (a resumed run too): no window or step in flight."""
        self.window = self.snapshot = None

    def window_start(self, buffers: Callable[[], list[Tensor]]) -> list[Tensor] | None:
        """``skip``: the batch-norm statistics at the start of the accumulation window.

        They see a NaN batch in the forward pass: kept as they were at the window's start, to
        restore if any of its micro-batches is skipped. ``None`` under ``error``."""
        if self.window is not None:
            return self.window[1]
        return [b.clone() for b in buffers()] if self.skip else None

    def guard(self, loss: Tensor, world_size: int, where: tuple[int, int, Tensor], saved: list[Tensor] | None,
              zero: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        """``(loss, finite)``: the step's loss under the policy and whether it was finite, decided
        on the device. ``where``: global step, batch index and the batch's tile indexes, for the
        report at the next check; ``saved``: :meth:`window_start`'s; ``zero``: a zero loss that
        reaches every parameter (a backward pass with zero gradients)."""
        finite = torch.isfinite(loss.detach()).float()
        if world_size > 1:  # every rank takes the same decision
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        finite = finite.bool()
        step, batch_idx, index = where
        self.pending.append((step, batch_idx, finite, loss.detach(), index))
        if saved is not None:  # restored after the backward pass, which still needs them
            # one non-finite micro-batch poisons the window's summed gradients: skip the whole step
            self.window = (finite if self.window is None else self.window[0] & finite, saved)
            loss = torch.where(finite, loss, zero())
        return loss, finite

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, buffers: list[Tensor]) -> None:
        """``skip``: when a micro-batch of this accumulation window had a non-finite loss, the
        batch-norm statistics go back to the window's start, and the parameters and optimizer
        state are kept so that :meth:`undo_step` can undo the step; all on the device."""
        if self.window is None:
            return
        (finite, saved), self.window = self.window, None
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(torch.where(finite, buffer, value))
            state = getattr(optimizer, "optimizer", optimizer).state
            kept = [
                (p, p.detach().clone(), {k: v.clone() for k, v in state.get(p, {}).items() if isinstance(v, Tensor)})
                for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
        self.snapshot = (finite, kept)

    def undo_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step (a step post-hook): a skipped step's parameters and optimizer
        state (moments, step count; weight decay moved the parameters too) back to the values
        before it, by ``torch.where`` on the device.

        Undoing works for any optimizer, where the fused optimizers' ``found_inf`` serves only
        fused Adam/AdamW/SGD/Adagrad; it costs a copy of the parameters and state per step,
        paid only under ``skip``. The step runs on NaN gradients and the ``where`` discards it.
        State the step created (the first step) goes back to zeros: the fresh state of
        torch's Adam family, and a zero momentum buffer acts as a fresh one in SGD.
        """
        snapshot, self.snapshot = self.snapshot, None
        if snapshot is None:
            return
        finite, kept = snapshot
        state = getattr(optimizer, "optimizer", optimizer).state
        with torch.no_grad():
            for p, value, before in kept:
                p.copy_(torch.where(finite, p, value))
                for key, now in state[p].items():
                    if isinstance(now, Tensor):
                        old = before.get(key)
                        old = torch.zeros_like(now) if old is None else old
                        # a host-side step counter (see device_step_counters) would need the flag on the host
                        flag = finite if now.device == finite.device else finite.to(now.device)
                        now.copy_(torch.where(flag, now, old))

    def device_step_counters(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """``skip`` on a GPU: optimizers with a ``capturable`` mode (Adam, AdamW, ...) keep their
        step counter on the device, where :meth:`undo_step` restores it without a sync; by
        default they keep it on the host. Set after a resumed checkpoint's optimizer state is
        loaded (which brings its own setting), and undone on the CPU, where capturable is refused."""
        from torch.optim.optimizer import _get_capturable_supported_devices

        for optimizer in optimizers:
            for group in optimizer.param_groups:
                if "capturable" not in group or group.get("fused") or not group["params"]:
                    continue
                device = group["params"][0].device
                wanted = self.skip and device.type in _get_capturable_supported_devices()
                if group["capturable"] == wanted:
                    continue
                group["capturable"] = wanted
                # capturable is chosen for the device-side counter, not for CUDA graphs: torch's
                # once-per-instance warning about running it uncaptured does not apply
                optimizer._warned_capturable_if_run_uncaptured = True
                for p in group["params"]:  # once, before training: moved where the new mode keeps them
                    step = optimizer.state.get(p, {}).get("step")
                    if isinstance(step, Tensor):
                        optimizer.state[p]["step"] = step.to(p.device if wanted else "cpu")

    def check(self, trainer: Any, batch_files: Callable[[Tensor], list[str]]) -> None:
        """The steps since the last check with a non-finite loss: ``error`` raises naming the
        first one's step and files, ``skip`` warns. One host sync per check, not per step."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        flags = torch.stack([p[2] for p in pending]).cpu().tolist()
        for (step, batch_idx, _, loss, index), ok in zip(pending, flags):
            if ok:
                continue
            files = batch_files(index)
            if self.mode == "error":
                world = trainer.world_size
                if world > 1:
                    # the decision was all-reduced in the step: every rank raises here together, so
                    # the line can name every rank's files, and the command line prints rank 0's only
                    gathered: list[Any] = [None] * world
                    torch.distributed.all_gather_object(gathered, files)
                    files = [f for rank_files in gathered for f in rank_files]
                error = FloatingPointError(
                    f"non-finite training loss ({loss.item()}) at global step {step}, batch {batch_idx}; files: {files}"
                )
                if world > 1:
                    error.ddp_rank = trainer.global_rank
                raise error
            log.warning("skipped non-finite training loss at global step %d, batch %d; files: %s", step, batch_idx, files)


__all__ = ["NonFinitePolicy", "training_files"]
