#!/usr/bin/env python3
"""GPU check: train the default experiment with trainer=gpu for a fixed number of steps, report
training tiles/s and peak GPU memory, and prove the loss never syncs with the host.

The loss runs under ``torch.cuda.set_sync_debug_mode("error")`` (set and cleared by hooks on the
criterion), so any ``.item()``, boolean indexing or ``bincount`` in the loss path stops the run.
First, one multi-label training step and its validation (sanity check included) run in
bf16-mixed on the BigEarthNet-S2 sample (``data/bigearthnet-s2``): CUDA autocast refuses some
losses that CPU autocast lets through, and the kept validation probabilities must be float32;
the ``multilabel_bf16`` entry of the JSON records it.
Prints a table and writes JSON. Run through scripts/gpu-check.sh (which bounds it to 5 minutes);
``--cpu`` exercises everything except the CUDA parts on a machine without a GPU (the multi-label
step then runs under CPU bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from deforest.runs.build import build_datamodule, build_model, trainer_options


class StepTimer(pl.Callback):
    """Wall time of each training step after ``warmup`` (compilation, cudnn autotuning) ends."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup, self.cuda = warmup, cuda
        self.seconds, self.tiles, self.start = 0.0, 0, 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.start = self._now()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        elapsed = self._now() - self.start
        if trainer.global_step > self.warmup:
            self.seconds += elapsed
            self.tiles += batch["image"].shape[0]


def guard_loss_syncs(criterion: torch.nn.Module, cuda: bool) -> list[int]:
    """Run ``criterion`` under sync debug mode "error"; returns a counter of guarded calls."""
    calls = [0]

    def enter(module, args):
        calls[0] += 1
        if cuda:
            torch.cuda.set_sync_debug_mode("error")

    def leave(module, args, output):
        if cuda:
            torch.cuda.set_sync_debug_mode("default")

    criterion.register_forward_pre_hook(enter)
    criterion.register_forward_hook(leave)
    return calls


def guard_step_syncs(model: torch.nn.Module, cuda: bool) -> dict[str, int]:
    """Run the training step, the pre-optimizer hook and the skip policy's undo of the optimizer
    step under sync debug mode "error"; returns how often each ran."""
    calls: dict[str, int] = {}

    def guarded(name: str, method):
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                return method(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        return run

    for name in ("training_step", "on_before_optimizer_step", "_undo_skipped_step"):
        setattr(model, name, guarded(name, getattr(model, name)))
    return calls


def multilabel_bf16_step(cuda: bool, tmp: str) -> dict:
    """One multi-label training step and one validation batch in bf16-mixed: their losses and the
    dtype of the probabilities validation keeps. Stops the check if those are not float32."""
    # --cpu: D4 on the batch as trainer=gpu does, not albumentations in the workers (not on the GPU machines)
    trainer_overrides = (["trainer=gpu", "model.compile=false"] if cuda else
                         ["trainer=cpu", "trainer.precision=bf16-mixed", "data.augment=[]", "data.device_flips=true"])
    cfg = compose(
        "train",
        overrides=["data=bigearthnet", "data.root=${paths.data_dir}/bigearthnet-s2", "model=resnet18", *trainer_overrides,
                   # the skip policy's snapshot and undo of the optimizer step run too, over a window of two
                   "model.nonfinite_loss=skip", "trainer.accumulate_grad_batches=2",
                   "data.batch_size=8", "data.num_workers=0", "data.persistent_workers=false",
                   f"paths.output_dir={tmp}/multilabel", f"paths.cache_dir={tmp}/cache"],
    )
    pl.seed_everything(0, workers=True)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg.model, cfg.loss, datamodule)
    loss_calls = guard_loss_syncs(model.criterion, cuda)
    step_calls = guard_step_syncs(model, cuda)
    trainer: pl.Trainer = instantiate(
        trainer_options(cfg), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1,
    )
    trainer.fit(model, datamodule=datamodule)
    probs = model.predictions["val"]["probs"]
    steps = {str(s["step"].device) for s in trainer.optimizers[0].state.values()}
    result = {
        "task": model.task,
        "precision": str(cfg.trainer.precision),
        "nonfinite_loss": cfg.model.nonfinite_loss,
        "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        "optimizer_steps": trainer.global_step,
        "optimizer_step_counters_on": sorted(steps),
        "step_calls_under_sync_debug_error": step_calls if cuda else None,
        "train_loss": float(trainer.callback_metrics["train/loss_epoch"]),
        "val_loss": float(trainer.callback_metrics["val/loss"]),
        "val_map": float(trainer.callback_metrics["val/map"]),
        "val_probs_dtype": str(probs.dtype).removeprefix("torch."),
        "val_tiles": int(probs.shape[0]),
        "loss_calls_under_sync_debug_error": loss_calls[0] if cuda else None,
    }
    if step_calls.get("_undo_skipped_step") != trainer.global_step or trainer.global_step != 1:
        raise SystemExit(f"gpu-check: the skip policy's optimizer step did not run once: {result}")
    if probs.dtype != torch.float32 or not torch.isfinite(probs).all():
        raise SystemExit(f"gpu-check: multi-label bf16 validation kept {probs.dtype} probabilities: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30, help="steps left out of tiles/s (compile, autotune)")
    parser.add_argument("--out", default="gpu-check.json")
    parser.add_argument("--cpu", action="store_true", help="dry run without a GPU (no compile, no CUDA figures)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=256")
    args = parser.parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device visible (use --cpu for a dry run)")
    trainer_overrides = ["trainer=gpu"] if cuda else ["trainer=cpu", "data.augment=[]", "data.device_flips=true"]
    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("deforest.conf", version_base="1.3"):
        multilabel = multilabel_bf16_step(cuda, tmp)
        # kept even if the throughput run below fails or times out
        Path(args.out).write_text(json.dumps({"multilabel_bf16": multilabel}, indent=2))
        cfg = compose(
            "train",
            overrides=["experiment=eurosat_resnet18", *trainer_overrides, f"paths.output_dir={tmp}",
                       f"paths.cache_dir={tmp}/cache", *args.overrides],
        )
        pl.seed_everything(0, workers=True)
        datamodule = build_datamodule(cfg.data)
        datamodule.setup("fit")
        model = build_model(cfg.model, cfg.loss, datamodule)
        loss_calls = guard_loss_syncs(model.criterion, cuda)
        timer = StepTimer(args.warmup, cuda)
        trainer: pl.Trainer = instantiate(
            trainer_options(cfg), callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
            max_epochs=-1, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        wall = time.perf_counter() - started
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "batch_size": cfg.data.batch_size,
        "precision": str(cfg.trainer.precision),
        "switches": {k: cfg.model[k] for k in ("channels_last", "compile")}
        | {k: cfg.data[k] for k in ("device_flips", "pin_memory")} | {"cudnn_benchmark": cfg.trainer.get("benchmark")},
        "train_step_tiles_per_s": timer.tiles / timer.seconds if timer.seconds else None,
        "end_to_end_tiles_per_s": args.steps * cfg.data.batch_size / wall,
        "fit_wall_s": wall,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss_calls_under_sync_debug_error": loss_calls[0] if cuda else None,
    }
    table = dict(result)
    result["multilabel_bf16"] = multilabel
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| " + " | ".join(table) + " |")
    print("|" + "---|" * len(table))
    print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in table.values()) + " |")
    print("multi-label bf16 step: "
          + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in multilabel.items()))
    print(f"gpu-check: wrote {args.out}")


if __name__ == "__main__":
    main()
