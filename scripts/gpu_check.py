#!/usr/bin/env python3
"""GPU check: train the default experiment with trainer=gpu for a fixed number of steps, report
training tiles/s and peak GPU memory, and prove the loss never syncs with the host.

The loss runs under ``torch.cuda.set_sync_debug_mode("error")`` (set and cleared by hooks on the
criterion), so any ``.item()``, boolean indexing or ``bincount`` in the loss path stops the run.
Prints a table and writes JSON. Run through scripts/gpu-check.sh (which bounds it to 5 minutes);
``--cpu`` exercises everything except the CUDA parts on a machine without a GPU.
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

from deforest.build import build_datamodule, build_model, trainer_options


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
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in result.values()) + " |")
    print(f"gpu-check: wrote {args.out}")


if __name__ == "__main__":
    main()
