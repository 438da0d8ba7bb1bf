"""GPU throughput: resnet18 training end to end from the packed store vs data already on the GPU.

    python benchmarks/gpu.py                      # ~3-5 min on one GPU, writes results/gpu.json
    python benchmarks/gpu.py --smoke              # seconds on a CPU: proves the script runs

Both runs are the same ``deforest-train`` model (``model=resnet18 trainer=gpu``: bf16-mixed,
channels_last, device-side D4 flips, cudnn benchmark) driven by the same Lightning Trainer;
only the data path differs. End to end: the EuroSAT sample copied to 10,260 files, packed
with ``deforest-pack`` and read through the project's datamodule (``data.packed``, pinned
memory, persistent workers). On the GPU: a few pre-made batches already on the device.
Goals: >= 30,000 tiles/s end to end on an H100 and >= 80% of the on-GPU rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import TORCHGEO_TIFS, copy_eurosat  # noqa: E402

from deforest.runs.build import build_datamodule, build_model, trainer_options  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Throughput(pl.Callback):
    """Tiles/s over the training batches after ``warmup`` (device synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.tiles = 0
        self.rate = float("nan")

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.warmup:
            self._sync(module)
            self.start, self.tiles = time.perf_counter(), 0
        elif step > self.warmup:
            self.tiles += len(batch["target"])

    def on_train_end(self, trainer, module) -> None:
        self._sync(module)
        self.rate = self.tiles / (time.perf_counter() - self.start)


class HostSyncs(pl.Callback):
    """Device-to-host syncs inside ``training_step``, per step: CUDA's sync debug mode warns on
    each one (``torch.cuda.set_sync_debug_mode("warn")``) and the warnings are counted."""

    def __init__(self) -> None:
        self.syncs, self.steps = 0, 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        step = pl_module.training_step

        def counted(*args, **kwargs):
            self.steps += 1
            if not torch.cuda.is_available():
                return step(*args, **kwargs)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return step(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    self.syncs += sum("synchroniz" in str(w.message) for w in caught)

        pl_module.training_step = counted

    @property
    def per_step(self) -> float:
        return self.syncs / max(self.steps, 1)


class OnDevice(Dataset):
    """``length`` batches cycling over a few made once on the device (no host work at all)."""

    def __init__(self, batches: list[dict], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batches[i % len(self.batches)]


def config(args, pack: Path, tif_root: Path):
    overrides = [
        f"paths.root_dir={REPO}", f"paths.cache_dir={args.work / 'cache'}", f"data.root={tif_root}",
        f"data.packed={pack}", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        "data.val_fraction=0.01", "data.test_fraction=0.0", "model=resnet18", "trainer=gpu",
        "model.small_tile_stem=true",  # the measured network: model=resnet18 no longer defaults to it
        f"model.compile={str(args.compile).lower()}", f"+trainer.max_steps={args.warmup + args.steps}",
        "trainer.max_epochs=-1", "+trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "test=false", "model.scheduler=null",  # OneCycleLR needs a known length; speed does not
    ]
    if args.smoke:
        overrides += ["trainer.accelerator=cpu", "data.pin_memory=false", "model.compile=false"]
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def fit(cfg, model, warmup: int, **data) -> tuple[float, float]:
    """Tiles/s after ``warmup`` steps and host syncs per training step."""
    meter, syncs = Throughput(warmup), HostSyncs()
    trainer = instantiate(trainer_options(cfg), callbacks=[meter, syncs], logger=False, enable_checkpointing=False,
                          default_root_dir=str(Path(cfg.paths.cache_dir).parent / "gpu-run"))
    trainer.fit(model, **data)
    return meter.rate, syncs.per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=30, help="steps before timing starts")
    parser.add_argument("--steps", type=int, default=600, help="timed steps per run")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network in both runs")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that only proves the script works")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.workers, args.warmup, args.steps = 8, 1, 2, 3
    with tempfile.TemporaryDirectory(prefix="deforest-gpu-") as tmp:
        args.work = args.work or Path(tmp)
        files = copy_eurosat(args.work, 300 if args.smoke else 10_000)
        tif_root = args.work / "eurosat" / TORCHGEO_TIFS
        pack = args.work / "pack"
        subprocess.run([sys.executable, "-m", "deforest.cli.pack", f"data.root={tif_root}", f"out={pack}",
                        f"num_workers={max(args.workers, 1)}", f"hydra.run.dir={args.work / 'pack-run'}"],
                       check=True, cwd=REPO)
        cfg = config(args, pack, tif_root)
        pl.seed_everything(0)
        datamodule = build_datamodule(cfg.data)
        datamodule.setup("fit")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        end_to_end, syncs = fit(cfg, build_model(cfg.model, cfg.loss, datamodule), args.warmup, datamodule=datamodule)
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")

        device = torch.device("cpu" if args.smoke else "cuda")
        g = torch.Generator().manual_seed(0)
        batches = [
            {"image": (torch.rand(args.batch, 13, 64, 64, generator=g) * 3000).to(device),
             "target": torch.randint(0, 10, (args.batch,), generator=g).to(device),
             "index": torch.arange(args.batch).to(device)}
            for _ in range(4)
        ]
        loader = DataLoader(OnDevice(batches, args.warmup + args.steps + 1), batch_size=None)
        on_gpu, _ = fit(cfg, build_model(cfg.model, cfg.loss, datamodule), args.warmup, train_dataloaders=loader)
    result = {
        "end_to_end_tiles_per_s": end_to_end,
        "on_device_tiles_per_s": on_gpu,
        "ratio": end_to_end / on_gpu,
        "host_syncs_per_step": syncs,
        "peak_gpu_memory_mb": peak_mb,
        "goals": {"end_to_end_tiles_per_s": ">= 30000 on an H100/H200", "ratio": ">= 0.8", "host_syncs_per_step": "0"},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu (smoke)",
        "settings": {"batch": args.batch, "workers": args.workers, "steps": args.steps, "warmup": args.warmup,
                     "compile": args.compile, "files": files, "cpus": torch.multiprocessing.cpu_count()},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
