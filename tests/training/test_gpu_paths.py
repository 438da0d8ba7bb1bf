"""What a GPU run does differently, checked on the CPU: autocast in the steps (bf16-mixed),
the ``skip`` policy under gradient accumulation and its device-side optimizer step counters,
and device flips of an all-bad batch."""

from __future__ import annotations

import math
import shutil

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from deforest.cli.train import train
from deforest.data.datamodule import TileDataModule
from deforest.data.layouts import FolderLayout
from deforest.runs.build import build_datamodule, build_model, trainer_options

#: The ops CUDA autocast refuses: aten/src/ATen/autocast_mode.cpp registers
#: ``binary_cross_entropy_banned`` for the AutocastCUDA key ("unsafe to autocast"), listed
#: as ``AutocastTestLists.banned`` in torch/testing/_internal/autocast_test_lists.py.
#: CPU autocast lets them through, so on the CPU this mode refuses them in its place.
CUDA_AUTOCAST_BANNED = frozenset({"aten::binary_cross_entropy"})


class CudaAutocastRules(TorchDispatchMode):
    """Raises on an op that CUDA autocast bans; counts bf16 outputs (proof autocast is on)."""

    def __init__(self) -> None:
        super().__init__()
        self.bf16_outputs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in CUDA_AUTOCAST_BANNED:
            raise RuntimeError(f"{name} is unsafe to autocast: CUDA autocast refuses it")
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16:
            self.bf16_outputs += 1
        return out


def _trainer(cfg, callbacks=()) -> pl.Trainer:
    return instantiate(trainer_options(cfg), callbacks=list(callbacks), logger=False, enable_checkpointing=False)


@pytest.mark.parametrize(
    "data,tta",
    [([], True), (["data=bigearthnet"], False), (["data=bigearthnet"], True)],
    ids=["multiclass-tta", "multilabel", "multilabel-tta"],
)
def test_steps_run_under_bf16_autocast_and_keep_float32_probabilities(train_config, bigearthnet_root, data, tta):
    if data:
        data = [*data, f"data.root={bigearthnet_root}"]
    cfg = train_config([
        *data, "trainer.precision=bf16-mixed", f"model.tta={str(tta).lower()}", "model.band_statistics=true",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
    ])
    pl.seed_everything(0)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg.model, cfg.loss, datamodule)
    trainer = _trainer(cfg)
    test_tiles = datamodule.datasets["test"]
    images = torch.stack([test_tiles[i]["image"] for i in range(8)])  # float32 band values, as deforest.mapping.predict gives
    rules = CudaAutocastRules()
    with rules:
        trainer.fit(model, datamodule=datamodule)  # sanity check, training and validation steps
        tested = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        predicted = trainer.predict(model, dataloaders=DataLoader(images, batch_size=4))
    assert rules.bf16_outputs > 0  # the network really ran in bf16
    assert math.isfinite(tested["test/loss"]) and tested["test/loss"] > 0
    for stage in ("val", "test"):
        probs = model.predictions[stage]["probs"]
        assert probs.dtype == torch.float32, (stage, probs.dtype)
        assert ((probs >= 0) & (probs <= 1)).all()
    assert [p.dtype for p in predicted] == [torch.float32] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.predict_proba(images).dtype == torch.float32


class SkippedWindow(pl.Callback):
    """A NaN pixel in the first micro-batch of the second accumulation window; snapshots of the
    weights, batch-norm statistics and optimizer state around the second and third windows."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.taken: dict[str, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx in (self.window, 2 * self.window):
            self.taken[f"start{batch_idx}"] = self._state(trainer, pl_module)
        if batch_idx == self.window:
            batch["image"][0, 0, 0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx in (2 * self.window - 1, 3 * self.window - 1):
            self.taken[f"end{batch_idx}"] = self._state(trainer, pl_module)

    @staticmethod
    def _state(trainer, pl_module) -> dict:
        optimizer = trainer.optimizers[0]
        return {
            "weights": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "batch_norm": {n: b.clone() for n, b in pl_module.net.named_buffers()},
            "optimizer": {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in pl_module.named_parameters()},
        }


def _assert_same(a: dict, b: dict) -> None:
    for part in ("weights", "batch_norm"):
        assert a[part].keys() == b[part].keys()
        changed = [n for n in a[part] if not torch.equal(a[part][n], b[part][n])]
        assert changed == [], (part, changed)
    changed = [(n, k) for n in a["optimizer"] for k in a["optimizer"][n]
               if not torch.equal(a["optimizer"][n][k], b["optimizer"][n][k])]
    assert changed == [] and a["optimizer"].keys() == b["optimizer"].keys(), changed


@pytest.mark.parametrize("accumulate", [1, 4])
def test_skip_leaves_weights_and_optimizer_state_as_if_the_step_never_happened(train_config, accumulate):
    cfg = train_config(["model.nonfinite_loss=skip", f"trainer.accumulate_grad_batches={accumulate}",
                        f"+trainer.limit_train_batches={3 * accumulate}", "+trainer.limit_val_batches=1"])
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW" and cfg.model.optimizer.weight_decay > 0
    pl.seed_everything(0)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg.model, cfg.loss, datamodule)
    probe = SkippedWindow(accumulate)
    _trainer(cfg, [probe]).fit(model, datamodule=datamodule)
    w = accumulate
    before, after = probe.taken[f"start{w}"], probe.taken[f"end{2 * w - 1}"]
    assert {k for n in before["optimizer"] for k in before["optimizer"][n]} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(v["step"] == 1 for v in before["optimizer"].values())  # one step taken before the skipped one
    _assert_same(before, after)  # the skipped window: nothing moved
    # the next window trains again, from finite values
    start, end = probe.taken[f"start{2 * w}"], probe.taken[f"end{3 * w - 1}"]
    _assert_same(after, start)
    moved = [n for n in start["weights"] if not torch.equal(start["weights"][n], end["weights"][n])]
    assert len(moved) >= 20  # the convolutions; at one-cycle's last, tiny rate batch-norm scales of 1.0 stay put
    assert all(torch.isfinite(p).all() for p in end["weights"].values())
    assert all(v["step"] == 2 for v in end["optimizer"].values())


def test_all_bad_training_batch_passes_device_flips(eurosat_root, tmp_path):
    root = tmp_path / "data"
    for cls in ("Forest", "River"):
        shutil.copytree(eurosat_root / "train" / cls, root / cls)
    datamodule = TileDataModule.from_keys(FolderLayout(root), batch_size=4, on_bad_tile="skip", device_flips=True,
                                cache_dir=str(tmp_path / "cache"))
    datamodule.setup("fit")
    tiles = datamodule.datasets["train"]
    for source in tiles.sources[:4]:  # the tiles fail when read: a batch of only bad tiles
        open(source, "wb").close()
    batch = tiles.__getitems__(list(range(4)))
    assert len(batch["bad"]) == 4 and batch["target"].shape == (0,)
    datamodule.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    datamodule.trainer.training = True
    batch = datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(batch, 0), 0)
    assert batch["image"].shape[0] == 0 and batch["target"].shape == (0,)
    assert len(datamodule.bad_tiles) == 4


def test_skip_checkpoint_with_device_step_counters_resumes_on_the_cpu(train_config, tmp_path):
    """``skip`` on a GPU keeps Adam's step counters on the device (``capturable``), and the
    checkpoint's optimizer state says so; resumed on the CPU, where torch refuses capturable,
    the counters go back to the host and training goes on."""
    short = ["model.nonfinite_loss=skip", "model.scheduler=null", "test=false", "+trainer.limit_train_batches=2",
             "+trainer.limit_val_batches=1"]
    train(train_config(short))
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for group in saved["optimizer_states"][0]["param_groups"]:  # as a GPU run with skip writes them
        assert group["capturable"] is False
        group["capturable"] = True
    gpu_like = tmp_path / "gpu-like.ckpt"
    torch.save(saved, gpu_like)
    metrics = train(train_config([*short, "trainer.max_epochs=2", f"ckpt_path={gpu_like}"]))
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == saved["epoch"] + 1 and math.isfinite(metrics["val/loss"])
    assert [g["capturable"] for g in resumed["optimizer_states"][0]["param_groups"]] == [False]
    assert {float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()} == {4.0}
