"""Faults under DDP with two real gloo processes (``trainer=ddp_cpu``): a tile found bad only when
its pixels are read on one rank (``skip``: the run finishes and counts it; ``error``: every rank
stops together with one line naming the file), a rank without any evaluation output, backbone
fine-tuning that starts mid-run, and per-rank augmentation seeds."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import albumentations as A
import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
from torch.utils.data import DistributedSampler

from deforest.cli.train import build_datamodule

REPO = Path(__file__).resolve().parents[2]
PER_CLASS = 4  # 40 real EuroSAT tiles: 24 train, 8 val, 8 test


def _tiny_eurosat(root: Path) -> Path:
    """The first tiles of each class of the shipped EuroSAT sample, copied (they get overwritten)."""
    for folder in sorted((REPO / "data" / "eurosat-ms" / "train").iterdir()):
        (root / folder.name).mkdir(parents=True)
        for tile in sorted(folder.glob("*.tif"))[:PER_CLASS]:
            shutil.copy(tile, root / folder.name / tile.name)
    return root


def _all_nodata(path: str) -> None:
    """Rewrite a tile in place with the same header, every pixel 0 and nodata=0: only reading its
    pixels shows it is bad (``data.validate=quick`` reads headers)."""
    with rasterio.open(path) as src:
        profile, shape = src.profile, (src.count, src.height, src.width)
    profile.update(nodata=0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.zeros(shape, profile["dtype"]))


def _rank_reads(n: int, rank: int) -> list[int]:
    """The evaluation tiles one of two ranks reads (Lightning's unshuffled DistributedSampler)."""
    return list(DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=False))


class FaultProbe(pl.Callback):
    """Records each rank's pid, augmentation draws, evaluation predictions and backbone weights; on rank 1,
    turns one tile of its last training batch all-nodata after the epoch began (``corrupt_train``)."""

    def __init__(self, out: str, corrupt_train: bool = False) -> None:
        self.out = Path(out)
        self.corrupt_train = corrupt_train

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._write("pid", {"pid": os.getpid()})

    def on_train_start(self, trainer, pl_module) -> None:
        # what this rank's augmentation draws for 64 copies of one tile: the device-side D4 (the
        # data's default augmentation), or the albumentations pipeline where one is configured
        ramp = torch.arange(16.0).reshape(1, 1, 4, 4).expand(64, 1, 4, 4)
        augment = trainer.datamodule.datasets["train"].augment
        if augment is None:
            flipped = trainer.datamodule.on_after_batch_transfer({"image": ramp}, 0)["image"]
        else:
            flipped = torch.stack([torch.as_tensor(augment(image=t.permute(1, 2, 0).numpy())["image"]) for t in ramp])
        self._write("flips", {"flips": flipped.flatten().tolist(), "device": augment is None})
        self._write("frozen-start", {"weights": _frozen(pl_module).tolist()})

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self.corrupt_train or trainer.global_rank != 1 or trainer.current_epoch:
            return
        order = list(trainer.train_dataloader.sampler)  # this rank's tiles this epoch
        size = trainer.datamodule.batch_size
        last = order[(len(order) // size - 1) * size]  # in the last batch, not yet fetched
        path = trainer.datamodule.datasets["train"].sources[last]
        _all_nodata(path)
        self._write("corrupted", {"path": path})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        backbone = torch.cat([p.detach().flatten() for p in pl_module.backbone.parameters()])
        self._write(f"backbone-{trainer.current_epoch}", {"weights": backbone.tolist()})
        self._write(f"frozen-{trainer.current_epoch}", {"weights": _frozen(pl_module).tolist()})

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._predictions("val", trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._predictions("test", trainer, pl_module)

    def _predictions(self, stage: str, trainer, pl_module) -> None:
        predictions = pl_module.predictions[stage]
        correct = (predictions["probs"].argmax(dim=1) == predictions["target"]).float().mean()
        self._write(stage, {"index": predictions["index"].tolist(), "accuracy": float(correct),
                            "logged": float(trainer.callback_metrics[f"{stage}/accuracy"])})

    def _write(self, kind: str, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{kind}-{torch.distributed.get_rank()}.json").write_text(json.dumps(record))


def _frozen(pl_module) -> torch.Tensor:
    """The backbone's weights that fine-tuning freezes (batch norm keeps training: train_bn)."""
    modules = pl.callbacks.BaseFinetuning.flatten_modules(pl_module.backbone)
    return torch.cat([p.detach().flatten() for m in modules if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                      for p in m.parameters(recurse=False)])


def _setup(train_config, root: Path):
    dm = build_datamodule(train_config([f"data.root={root}", "data.val_fraction=0.2", "data.test_fraction=0.2"]).data)
    dm.setup("fit")
    assert dm.nodata is None  # the tiles declare none: the all-nodata tile's own header decides
    return dm


def _train(tmp_path: Path, root: Path, *overrides: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    args = [
        "trainer=ddp_cpu", f"data.root={root}", "data.val_fraction=0.2", "data.test_fraction=0.2",
        "data.batch_size=4", "data.num_workers=0", "trainer.num_threads=1", "trainer.max_epochs=1",
        "+trainer.num_sanity_val_steps=0", "model.width=8", "model.tta=false", "trainer.enable_progress_bar=false",
        "report.enabled=false", f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.probe._target_=tests.training.test_ddp_faults.FaultProbe", f"+callbacks.probe.out={tmp_path / 'probe'}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEFOREST_LOG_DIR": str(tmp_path / "logs"),
           "DEFOREST_CACHE_DIR": str(tmp_path / "cache")}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "deforest.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # a hang ends here, failed
    return done, time.monotonic() - start


def _read(probe: Path, kind: str, rank: int) -> dict:
    return json.loads((probe / f"{kind}-{rank}.json").read_text())


@pytest.mark.slow
def test_skipped_tiles_on_one_rank_and_a_rank_without_test_outputs(train_config, tmp_path):
    root = _tiny_eurosat(tmp_path / "data")
    dm = _setup(train_config, root)
    val, test = dm.datasets["val"].sources, dm.datasets["test"].sources
    assert len(val) >= 4 and len(test) >= 4 and len(test) % 2 == 0
    bad_val = val[1]  # read by rank 1 only
    bad_test = [test[i] for i in _rank_reads(len(test), 1)]  # every test tile of rank 1
    assert not set(_rank_reads(len(test), 0)) & set(_rank_reads(len(test), 1))
    for path in [bad_val, *bad_test]:
        _all_nodata(path)
    done, _ = _train(tmp_path, root, "data.on_bad_tile=skip")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert f"skipping bad tile {bad_val}: every pixel is nodata" in out
    probe, run = tmp_path / "probe", tmp_path / "run"
    for stage, bad, n in (("val", {1}, len(val)), ("test", set(_rank_reads(len(test), 1)), len(test))):
        records = [_read(probe, stage, r) for r in (0, 1)]
        assert records[0]["index"] == records[1]["index"]  # both ranks hold every rank's predictions
        assert sorted(records[0]["index"]) == sorted(set(range(n)) - bad), stage
        assert records[0]["logged"] == pytest.approx(records[0]["accuracy"], abs=1e-6)  # each tile counted once
    # rank 0 writes the records: it counts the tiles rank 1 skipped
    skipped = json.loads((run / "bad_tiles.json").read_text())
    assert sorted(skipped) == sorted([bad_val, *bad_test])
    flips = [_read(probe, "flips", r) for r in (0, 1)]
    assert flips[0]["device"] and flips[0]["flips"] != flips[1]["flips"]  # each rank its own draws
    assert f"- bad tiles skipped: {1 + len(bad_test)} (listed in `bad_tiles.json`)" in (run / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train", "val"])
def test_a_bad_tile_on_one_rank_stops_every_rank_with_one_line(train_config, tmp_path, stage):
    root = _tiny_eurosat(tmp_path / "data")
    dm = _setup(train_config, root)
    if stage == "val":
        bad = dm.datasets["val"].sources[1]  # read by rank 1 only, in the first validation
        _all_nodata(bad)
        overrides = ()
    else:
        bad = None  # rank 1 corrupts one of its own training tiles once the epoch began
        overrides = ("+callbacks.probe.corrupt_train=true",)
    done, seconds = _train(tmp_path, root, *overrides, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-6000:]
    lines = [line for line in out.splitlines() if "TileError:" in line]
    assert len(lines) == 1, out[-6000:]
    named = lines[0].split("TileError: ", 1)[1]
    bad = bad or _read(tmp_path / "probe", "corrupted", 1)["path"]
    assert named == f"{bad}: every pixel is nodata (data.on_bad_tile=skip leaves bad tiles out)", named
    assert "Traceback" not in out and "Error executing job" not in out and "Connection" not in out, out[-6000:]
    pids = [_read(tmp_path / "probe", "pid", r)["pid"] for r in (0, 1)]
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # no rank left waiting in a collective
    assert seconds < 120, seconds


@pytest.mark.slow
def test_a_nonfinite_loss_stops_every_rank_with_one_line(tmp_path):
    # plain SGD at lr=1e30: the first step blows the weights up on both ranks (one model), the
    # next loss is NaN on both; the ranks take the decision together, rank 0 alone says so
    root = _tiny_eurosat(tmp_path / "data")
    done, seconds = _train(tmp_path, root, "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1e30",
                           "model.scheduler=null", "test=false", timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-6000:]
    lines = [line for line in out.splitlines() if "FloatingPointError:" in line]
    assert len(lines) == 1, out[-6000:]
    message = lines[0].split("FloatingPointError: ", 1)[1]
    assert message.startswith("non-finite training loss (nan) at global step 1, batch 1; files: "), message
    files = ast.literal_eval(message.split("files: ", 1)[1])
    # both ranks' batches (4 tiles each), every one a training tile of the data
    assert len(files) == len(set(files)) == 8 and all(Path(f).is_file() and Path(f).is_relative_to(root) for f in files), files
    assert "Traceback" not in out and "Error executing job" not in out, out[-6000:]
    assert seconds < 120, seconds


@pytest.mark.slow
def test_backbone_unfrozen_mid_run_stays_identical_across_ranks(train_config, tmp_path):
    root = _tiny_eurosat(tmp_path / "data")
    augment = "data.augment=[{_target_:albumentations.SquareSymmetry,p:0.9}]"  # albumentations, not device flips
    done, _ = _train(tmp_path, root, "model.unfreeze_backbone_at_epoch=1", "trainer.max_epochs=2", "test=false", augment)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    probe = tmp_path / "probe"
    flips = [_read(probe, "flips", r) for r in (0, 1)]
    assert not flips[0]["device"] and flips[0]["flips"] != flips[1]["flips"]  # each rank its own draws
    epochs = [[torch.tensor(_read(probe, f"backbone-{e}", r)["weights"]) for r in (0, 1)] for e in (0, 1)]
    assert torch.equal(epochs[0][0], epochs[0][1])
    for rank in (0, 1):  # frozen in epoch 0: only batch norm moved
        assert _read(probe, "frozen-0", rank)["weights"] == _read(probe, "frozen-start", rank)["weights"]
    assert _read(probe, "frozen-1", 0)["weights"] != _read(probe, "frozen-0", 0)["weights"]
    assert not torch.equal(epochs[1][0], epochs[0][0])  # the backbone trained in epoch 1
    torch.testing.assert_close(epochs[1][0], epochs[1][1], rtol=0, atol=1e-6)  # and stayed one model


def test_augmentation_seeds_differ_per_rank_and_worker_and_repeat_per_seed():
    from deforest.data.sampling import augmentation_seed

    seeds = {augmentation_seed(42, rank, worker) for rank in (0, 1) for worker in (None, 0, 1)}
    assert len(seeds) == 6 and all(0 <= s < 2**32 for s in seeds)
    assert augmentation_seed(42, 1, 0) == augmentation_seed(42, 1, 0) != augmentation_seed(43, 1, 0)
    tile = np.arange(13 * 8 * 8, dtype=np.float32).reshape(8, 8, 13)

    def draws(rank: int) -> list[bytes]:
        augment = A.Compose([A.SquareSymmetry(p=1.0)])
        augment.set_random_seed(augmentation_seed(42, rank))
        return [augment(image=tile)["image"].tobytes() for _ in range(16)]

    assert draws(0) == draws(0) and draws(1) == draws(1)
    assert draws(0) != draws(1)


def test_dataloader_workers_draw_per_rank_and_repeat_per_seed(eurosat_root):
    from functools import partial

    from torch.utils.data import DataLoader

    from deforest.data.batch_transforms import collate_batches
    from deforest.data.dataset import TileDataset
    from deforest.data.layouts import FolderLayout
    from deforest.data.sampling import seed_worker

    layout = FolderLayout(eurosat_root / "train")
    tile = layout.build_index().sources[0]
    dataset = TileDataset(layout, [tile] * 8, np.zeros(8, np.int64), [2, 3, 4],
                          augment=A.Compose([A.SquareSymmetry(p=1.0)]))

    def draws(rank: int) -> list[bytes]:
        torch.manual_seed(0)  # what seed_everything does on every rank alike
        loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_batches,
                            worker_init_fn=partial(seed_worker, rank=rank))
        return [batch["image"].numpy().tobytes() for batch in loader]

    first = draws(0)
    assert len(set(first)) > 1  # the augmentation ran
    assert draws(0) == first and draws(1) == draws(1)
    assert draws(1) != first
