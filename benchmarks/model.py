"""Model-side measurements in a fresh process; prints one JSON object.

* ``weighting``: seconds per training step (resnet18, 13x64x64) with the dynamic weighted
  loss and with plain cross-entropy, interleaved so load changes hit both alike;
* ``predict``: windows/s of ``deforest.mapping.predict.predict_scene`` and of the model's forward
  pass alone on the same windows already in memory;
* ``rss``: peak resident memory of predicting one scene (one process per scene size);
* ``epoch``: seconds per epoch of the default experiment (``deforest-train`` defaults).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deforest.training.losses import DynamicWeightedLoss
from deforest.models.networks import build_backbone

BANDS = 4  # synthetic scenes: four bands keep the 8192 px file small; speed depends on pixels


def weighting(batch: int, size: int, reps: int) -> dict:
    """A full step: forward, loss, backward, AdamW update."""
    torch.manual_seed(0)
    net = build_backbone("resnet18", 13, 10, small_tile_stem=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.rand(batch, 13, size, size)
    y = torch.randint(0, 10, (batch,))
    losses = {
        "weighted": DynamicWeightedLoss("multiclass", 10, scheme="inverse_count"),
        "unweighted": torch.nn.functional.cross_entropy,
    }

    def step(loss_fn) -> float:
        start = time.perf_counter()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def loss_only(loss_fn, n: int = 150) -> float:
        """The loss's own forward and backward: the only part of the step weighting changes
        (the network runs the same ops on the same shapes either way)."""
        logits = torch.randn(batch, 10, requires_grad=True)
        start = time.perf_counter()
        for _ in range(n):
            loss_fn(logits, y).backward()
        return (time.perf_counter() - start) / n

    for loss_fn in losses.values():  # warm-up
        step(loss_fn)
    times: dict[str, list[float]] = {name: [] for name in losses}
    loss_times: dict[str, list[float]] = {name: [] for name in losses}
    for rep in range(reps):
        # each repetition: two steps of each loss in ABBA order (BAAB the next time), so a
        # drift of the machine's speed within the repetition hits both alike
        order = ["weighted", "unweighted", "unweighted", "weighted"]
        sequence = order if rep % 2 == 0 else order[::-1]
        seconds: dict[str, list[float]] = {name: [] for name in losses}
        loss_seconds: dict[str, list[float]] = {name: [] for name in losses}
        for name in sequence:
            seconds[name].append(step(losses[name]))
        for name in sequence:
            loss_seconds[name].append(loss_only(losses[name]))
        for name in losses:
            times[name].append(sum(seconds[name]) / len(seconds[name]))
            loss_times[name].append(sum(loss_seconds[name]) / len(loss_seconds[name]))
    return {"seconds_per_step": times, "seconds_per_loss": loss_times}


def _model(width: int):
    from deforest.core.contract import Normalization, untrained_spec
    from deforest.training.module import TileClassifier

    norm = Normalization([500.0] * BANDS, [100.0] * BANDS, transform="scale")
    spec = untrained_spec("multiclass", [f"c{i}" for i in range(10)], BANDS, 64, normalization=norm)
    return TileClassifier.from_keys(spec, width=width).eval(), spec


def predict(scene_path: Path, out: Path, width: int, reps: int, batch: int) -> dict:
    """The predictor against ``predict_proba`` on the same windows (no reading, no writing)."""
    import rasterio

    from deforest.mapping.predict import predict_scene
    from deforest.mapping.scene import Scene

    torch.manual_seed(0)
    model, spec = _model(width)
    with rasterio.open(scene_path) as src:
        data = src.read()
    t = spec.tile_size[0]
    windows = data.reshape(BANDS, data.shape[1] // t, t, data.shape[2] // t, t).transpose(1, 3, 0, 2, 4)
    windows = np.ascontiguousarray(windows.reshape(-1, BANDS, t, t))
    n = len(windows)

    def forward() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, batch):
                model.predict_proba(torch.from_numpy(windows[s : s + batch].astype(np.float32)))
        return n / (time.perf_counter() - start)

    def predictor() -> float:
        start = time.perf_counter()
        with Scene(scene_path) as scene:
            summary = predict_scene(model, spec, scene, out, batch_size=batch)
        assert summary["windows"] == n, summary
        return n / (time.perf_counter() - start)

    forward(), predictor()  # warm-up
    rates: dict[str, list[float]] = {"predict": [], "forward": []}
    for _ in range(reps):
        rates["predict"].append(predictor())
        rates["forward"].append(forward())
    return {"windows_per_s": rates, "windows": n}


def rss(scene_path: Path, out: Path, width: int, batch: int) -> dict:
    from deforest.mapping.predict import predict_scene
    from deforest.mapping.scene import Scene

    model, spec = _model(width)
    with Scene(scene_path) as scene:
        predict_scene(model, spec, scene, out, batch_size=batch)
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def epoch(work: Path, epochs: int, limit_batches: int | None) -> dict:
    """Seconds per epoch (training and validation) of ``deforest-train`` with its defaults."""
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from deforest.runs.build import build_datamodule, build_model, trainer_options

    repo = Path(__file__).resolve().parents[1]
    overrides = [f"paths.root_dir={repo}", f"paths.cache_dir={work / 'cache'}", f"trainer.max_epochs={epochs}",
                 "trainer.enable_progress_bar=false"]
    if limit_batches:
        overrides += [f"+trainer.limit_train_batches={limit_batches}", f"+trainer.limit_val_batches={limit_batches}"]
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    pl.seed_everything(cfg.seed)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg.model, cfg.loss, datamodule)
    stamps: list[float] = []

    class Stamp(pl.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            stamps.append(time.perf_counter())

    trainer = instantiate(trainer_options(cfg), default_root_dir=str(work / "epoch"), callbacks=[Stamp()], logger=False,
                          enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    stamps.append(time.perf_counter())
    durations = np.diff(stamps).tolist()
    return {"seconds_per_epoch": durations[1:] or durations, "train_tiles": len(datamodule.datasets["train"]),
            "model": cfg.model.backbone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("measure", choices=["weighting", "predict", "rss", "epoch"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--scene", type=Path)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="tile size of the weighting step")
    parser.add_argument("--width", type=int, default=32, help="small_cnn width of the predict model")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-batches", type=int, help="epoch: at most this many batches (quick runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.work / f"map-{args.measure}.tif"
    result = {
        "weighting": lambda: weighting(args.batch, args.size, args.reps),
        "predict": lambda: predict(args.scene, out, args.width, args.reps, args.batch),
        "rss": lambda: rss(args.scene, out, args.width, args.batch),
        "epoch": lambda: epoch(args.work, args.epochs, args.limit_batches),
    }[args.measure]()
    result["torch_threads"] = torch.get_num_threads()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
