"""Crashes and resume: SIGKILL mid-epoch then resume, atomic checkpoint saves, safe loading."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from deforest.cli.train import train
from deforest.training.checkpoints import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3
CLASSES = ("Forest", "Highway", "Industrial", "River", "SeaLake")  # half the sample: half the CPU time
RUN = [
    f"trainer.max_epochs={EPOCHS}", "data.batch_size=16", "model.width=16", "model.tta=false", "loss.scheme=ema",
    "trainer.deterministic=true", "callbacks.last_checkpoint.every_n_train_steps=2", "report.enabled=false",
    "trainer.enable_progress_bar=false", "logger=csv",
]


def _cli(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deforest.cli.train", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", *extra]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _kill_mid_epoch(cmd: list[str], last: Path, at_step: int) -> subprocess.Popen:
    """Start ``cmd`` and SIGKILL it once ``last`` holds a checkpoint of ``at_step`` or later."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if last.is_file() and _load(last)["global_step"] >= at_step:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    return proc


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(train_config, eurosat_root, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        for cls in CLASSES:
            shutil.copytree(eurosat_root / split / cls, data / split / cls)
    run = [*RUN, f"data.root={data}"]
    reference = train(train_config(run))
    reference_ckpt = _load(tmp_path / "checkpoints" / "last.ckpt")
    total = reference_ckpt["global_step"]
    steps_per_epoch = total // EPOCHS
    cache = tmp_path / "cache"

    killed_dir = tmp_path / "killed"
    last = killed_dir / "checkpoints" / "last.ckpt"
    proc = _kill_mid_epoch(_cli(killed_dir, cache, *run), last, at_step=steps_per_epoch + 2)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    state = _load(last)
    step = state["global_step"]
    assert step % steps_per_epoch != 0 and step < total, (step, steps_per_epoch)  # mid-epoch
    assert state["state_dict"]["criterion.ema_steps"] == step  # EMA weighting state is in it
    assert state["optimizer_states"][0]["state"], "optimiser moments missing"
    for key in ("normalizer.mean", "normalizer.std"):
        torch.testing.assert_close(state["state_dict"][key], reference_ckpt["state_dict"][key])

    resumed_dir = tmp_path / "resumed"
    done = subprocess.run(_cli(resumed_dir, cache, *run, f"ckpt_path={last}"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    final = _load(resumed_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == total == EPOCHS * steps_per_epoch
    # the EMA counted every step, before and after the kill: its state was restored, not reset
    assert final["state_dict"]["criterion.ema_steps"] == total
    resumed = OmegaConf.to_container(OmegaConf.load(resumed_dir / "metrics.json"))
    assert reference["test/accuracy"] > 0.4  # well above chance (0.2), or the comparison says nothing
    for key in ("test/accuracy", "test/f1_macro"):
        assert abs(resumed[key] - reference[key]) <= 0.15, (key, resumed[key], reference[key])


def test_same_seed_same_metrics_with_deterministic_trainer(tmp_path):
    from tests.conftest import compose_train_config

    overrides = ["trainer.deterministic=true", "+trainer.limit_train_batches=3", "+trainer.limit_test_batches=1",
                 "report.enabled=false", "callbacks=none"]
    first = train(compose_train_config(tmp_path / "a", overrides))
    second = train(compose_train_config(tmp_path / "b", overrides))
    first.pop("best_checkpoint"), second.pop("best_checkpoint")
    assert first == second and "test/accuracy" in first


SAVER = """
import sys, torch
from deforest.training.checkpoints import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
for step in range(1000):
    io.save_checkpoint({"step": step, "weights": torch.full((10_000_000,), float(step))}, path)
    print(step, flush=True)
"""


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "0"  # one complete checkpoint exists
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.stat().st_size > 0 for p in tmp_path.glob(".last.ckpt.*.tmp")):
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)  # a save is in progress
    proc.wait(timeout=60)
    partial = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert partial, "the kill did not land during a save"
    checkpoint = AtomicCheckpointIO().load_checkpoint(target)
    assert (checkpoint["weights"] == checkpoint["step"]).all()
    AtomicCheckpointIO().save_checkpoint({"step": -1}, target)
    assert not list(tmp_path.glob(".last.ckpt.*.tmp"))  # the next save clears the leftover


def test_checkpoints_load_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"bands": [1, 2]}}, tmp_path / "ok.ckpt")
    assert io.load_checkpoint(tmp_path / "ok.ckpt")["hyper_parameters"] == {"bands": [1, 2]}
    io.save_checkpoint({"payload": subprocess.Popen}, tmp_path / "code.ckpt")  # a pickled callable
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        io.load_checkpoint(tmp_path / "code.ckpt")


def test_config_values_are_not_evaluated(train_config):
    cfg = train_config(["data.batch_size=${eval:'__import__(\"os\").getpid()'}"])
    with pytest.raises(InterpolationResolutionError, match="Unsupported interpolation type eval"):
        OmegaConf.to_container(cfg.data, resolve=True)


def test_ckpt_path_auto_continues_the_run_in_its_directory(train_config, tmp_path, caplog):
    short = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false", "report.enabled=false",
             "model.scheduler=null"]  # OneCycleLR cannot stretch to more epochs than it was built for
    train(train_config([*short, "ckpt_path=auto"]))  # nothing to resume: a fresh start
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 2 and "Restoring states" not in caplog.text
    with caplog.at_level(logging.INFO):
        train(train_config([*short, "ckpt_path=auto", "trainer.max_epochs=2"]))
    assert f"Restoring states from the checkpoint path at {last}" in caplog.text
    assert _load(last)["global_step"] == 4  # epoch 2 on top of epoch 1
