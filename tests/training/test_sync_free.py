"""The training step makes no device-to-host synchronisation (non-finite-loss policy and logging included).

Where CUDA exists the step runs under ``torch.cuda.set_sync_debug_mode("error")``; on the
CPU the proxy counts the calls that force one on a GPU (``Tensor.item``, ``.cpu()``,
``.tolist()``, ``.numpy()``, ``bool()``/``int()``/``float()`` of a tensor) while the step
and the pre-optimizer hook run: torch is wrapped, the module under test is not.
"""

from __future__ import annotations

import contextlib
import functools

import lightning.pytorch as pl
import pytest
import torch

from deforest.cli.train import train
from deforest.data.layouts import FolderLayout
from deforest.data.stores.packing import pack_dataset

SYNCING = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class CountSyncs(pl.Callback):
    """Counts host syncs inside ``training_step``, ``on_before_optimizer_step`` and the
    ``skip`` policy's undo after the optimizer step (``_undo_skipped_step``) of the module."""

    calls: list[str] = []
    steps: int = 0
    undos: int = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        type(self).calls, type(self).steps, type(self).undos = [], 0, 0
        for name in ("training_step", "on_before_optimizer_step", "_undo_skipped_step"):
            setattr(pl_module, name, self._counted(getattr(pl_module, name), name))

    def _counted(self, method, name: str):
        @functools.wraps(method)
        def run(*args, **kwargs):
            if name == "training_step":
                type(self).steps += 1
            if name == "_undo_skipped_step":
                type(self).undos += 1
            with _counting(type(self).calls), _cuda_sync_errors():
                return method(*args, **kwargs)
        return run


@contextlib.contextmanager
def _counting(calls: list[str]):
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name):
        original = saved[name]

        def counted(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return counted

    for name in SYNCING:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def _cuda_sync_errors():
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("packed", [False, True], ids=["files", "packed"])
def test_training_step_makes_no_host_sync(train_config, eurosat_root, tmp_path, policy, packed):
    extra = []
    if packed:  # uint16 batches converted and flipped on the device
        pack_dataset(FolderLayout(eurosat_root), tmp_path / "pack")
        extra = [f"data.packed={tmp_path / 'pack'}"]
    cfg = train_config([
        f"model.nonfinite_loss={policy}", "test=false", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1",
        "+callbacks.sync._target_=tests.training.test_sync_free.CountSyncs", *extra,
    ])
    train(cfg)
    assert CountSyncs.steps == 4
    assert CountSyncs.calls == []


def test_skip_over_an_accumulation_window_makes_no_host_sync(train_config):
    """A NaN micro-batch, two accumulation windows: the flag carried over the window, the
    batch-norm restore and the undone optimizer step stay on the device."""
    cfg = train_config([
        "model.nonfinite_loss=skip", "trainer.accumulate_grad_batches=2", "test=false",
        "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1",
        "+callbacks.sync._target_=tests.training.test_sync_free.CountSyncs",
        "+callbacks.nan_pixel._target_=tests.core.test_run_safety.NaNPixel", "+callbacks.nan_pixel.batch_idx=0",
    ])
    train(cfg)
    assert (CountSyncs.steps, CountSyncs.undos) == (4, 2)
    assert CountSyncs.calls == []


@pytest.mark.parametrize("scheme", ["balanced", "asymmetric", "logit_adjusted"])
def test_multilabel_schemes_make_no_host_sync(train_config, bigearthnet_root, scheme):
    """The multi-label schemes' positive/negative weights and the running prior stay on the device."""
    cfg = train_config([
        "data=bigearthnet", f"data.root={bigearthnet_root}", f"loss.scheme={scheme}", "data.batch_size=4", "test=false",
        "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1",
        "+callbacks.sync._target_=tests.training.test_sync_free.CountSyncs",
    ])
    train(cfg)
    assert CountSyncs.steps == 4
    assert CountSyncs.calls == []
