"""Runs that must not end looking successful, or lose work: SIGTERM, broken checkpoints, caches,
run-directory locks, disk full, config values, scenes smaller than a window.

Real ``deforest-train`` processes on copies of the shipped EuroSAT sample; checkpoints from real
(short) trainings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from deforest.cli.train import build_datamodule, check_train_config, resume_path, train
from deforest.core.errors import ConfigError, TileError
from deforest.core.safety import CheckpointError, RunDirLocked, RunLock, host_name
from deforest.data.datamodule import TileDataModule
from deforest.data.layouts import FolderLayout
from deforest.data.stores.pack import PackedLayout
from deforest.training.checkpoints import AtomicCheckpointIO
from tests.conftest import compose_train_config

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("Forest", "River", "SeaLake")
SHORT = ["data.batch_size=8", "model.width=8", "model.tta=false", "report.enabled=false",
         "trainer.enable_progress_bar=false", "logger=csv"]


def _data(eurosat_root: Path, dest: Path, classes=CLASSES) -> Path:
    for split in ("train", "test"):
        for cls in classes:
            shutil.copytree(eurosat_root / split / cls, dest / split / cls)
    return dest


def _cli(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deforest.cli.train", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", *extra]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _one_error_line(output: str, kind: str) -> str:
    """The command's last word: exactly one ``<kind>: ...`` line and no traceback."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if f"] - {kind}: " in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0].split(f"] - {kind}: ", 1)[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, eurosat_root) -> Path:
    """A real run directory after one short epoch: checkpoints/last.ckpt and the best epoch checkpoint."""
    run = tmp_path_factory.mktemp("trained")
    data = _data(eurosat_root, run / "data")
    # no OneCycleLR: a resume may then train longer than the first run
    train(compose_train_config(run, [*SHORT, f"data.root={data}", "+trainer.limit_train_batches=3",
                                     "+trainer.limit_val_batches=1", "test=false", "model.scheduler=null"]))
    return run


# ---- SIGTERM --------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_saves_last_ckpt_exits_143_and_auto_resumes(eurosat_root, tmp_path):
    data = _data(eurosat_root, tmp_path / "data")
    epochs = 4
    run = [*SHORT, f"data.root={data}", f"trainer.max_epochs={epochs}", "callbacks.last_checkpoint.every_n_train_steps=2"]
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cli(run_dir, cache, *run), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if last.is_file() and _load(last)["global_step"] >= 3:
            proc.send_signal(signal.SIGTERM)  # what SLURM and Kubernetes send
            break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output[-3000:]
    line = _one_error_line(output, "RunInterrupted")
    step = _load(last)["global_step"]
    assert line == (f"stopped by SIGTERM while training at global step {step}; saved {last}. Resume with the same "
                    f"overrides plus hydra.run.dir={run_dir} ckpt_path=auto")
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "deforest.lock").exists()

    done = subprocess.run(_cli(run_dir, cache, *run, "ckpt_path=auto"), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"ckpt_path=auto: resuming from {last}" in done.stdout + done.stderr
    dm = build_datamodule(compose_train_config(tmp_path / "probe", run).data)
    dm.setup("fit")
    steps_per_epoch = len(dm.datasets["train"]) // 8
    assert _load(last)["global_step"] == epochs * steps_per_epoch > step
    assert "test/accuracy" in json.loads((run_dir / "metrics.json").read_text())


# ---- truncated and unreadable checkpoints ---------------------------------------------------
def _truncate(src: Path, dest: Path) -> Path:
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dest


def test_truncated_checkpoint_is_one_clear_error(trained, tmp_path):
    bad = _truncate(trained / "checkpoints" / "last.ckpt", tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match=rf"^{bad}: is not a readable checkpoint: truncated or corrupt \(\d+ bytes; "):
        resume_path(str(bad), tmp_path)
    from deforest.training.module import TileClassifier

    with pytest.raises(CheckpointError, match=rf"^{bad}: is not a readable checkpoint: truncated or corrupt"):
        TileClassifier.load_from_checkpoint(bad)  # deforest-eval and deforest-predict
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"text\.ckpt: is not a readable checkpoint"):
        resume_path(str(tmp_path / "text.ckpt"), tmp_path)
    with pytest.raises(CheckpointError, match=r"missing\.ckpt: checkpoint not found"):
        resume_path(str(tmp_path / "missing.ckpt"), tmp_path)


def test_auto_falls_back_to_the_newest_readable_checkpoint(trained, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    last = run / "checkpoints" / "last.ckpt"
    _truncate(trained / "checkpoints" / "last.ckpt", last)
    older = next(p for p in (run / "checkpoints").glob("epoch_*.ckpt"))
    os.utime(older, (time.time() - 60, time.time() - 60))
    with caplog.at_level(logging.WARNING):
        assert resume_path("auto", run) == str(older)
    assert f"ckpt_path=auto: {last}: is not a readable checkpoint: truncated or corrupt" in caplog.text
    assert f"resuming from {older} instead" in caplog.text
    _truncate(older, older)
    with pytest.raises(CheckpointError, match=r"checkpoints: ckpt_path=auto found no readable checkpoint"):
        resume_path("auto", run)
    assert resume_path("auto", tmp_path / "fresh") is None  # nothing there: a fresh start


# ---- band-statistics cache ------------------------------------------------------------------
def _stats_dm(root: Path, cache: Path) -> TileDataModule:
    return TileDataModule.from_keys(FolderLayout(root), val_fraction=0.2, cache_dir=str(cache))


@pytest.mark.parametrize("corruption", ["{\"mean\": [1.0, ", "{\"mean\": \"x\", \"std\": []}", "\x00\xff"])
def test_corrupt_stats_cache_is_recomputed_with_a_warning(eurosat_root, tmp_path, caplog, corruption):
    root = _data(eurosat_root, tmp_path / "d")
    first = _stats_dm(root, tmp_path / "cache")
    first.setup()
    cached, = (tmp_path / "cache").glob("stats-*.json")
    cached.write_bytes(corruption.encode("latin-1"))
    again = _stats_dm(root, tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        again.setup()
    assert f"stats cache {cached} is corrupt (" in caplog.text and "recomputing it" in caplog.text
    norm, norm_first = again.input_spec.normalization, first.input_spec.normalization
    assert norm.mean == pytest.approx(norm_first.mean) and norm.std == pytest.approx(norm_first.std)
    assert json.loads(cached.read_text())["mean"] == pytest.approx(norm_first.mean)  # rewritten whole


STARTER = """
import json, sys, time
from pathlib import Path
root, cache, pack, go, out = map(Path, sys.argv[1:])
from deforest.data.datamodule import TileDataModule
from deforest.data.layouts import FolderLayout
from deforest.data.stores.packing import pack_dataset
while not go.exists():
    time.sleep(0.001)
dm = TileDataModule.from_keys(FolderLayout(root), val_fraction=0.2, cache_dir=str(cache))
dm.setup()
result = pack_dataset(FolderLayout(root), pack)
out.write_text(json.dumps({"mean": dm.input_spec.normalization.mean, "tiles": result.tiles}))
"""


@pytest.mark.slow
def test_processes_starting_at_once_never_clobber_cache_or_pack(eurosat_root, tmp_path):
    """Four processes (as DDP ranks or parallel sweep jobs would) released at the same instant."""
    root = _data(eurosat_root, tmp_path / "d")
    cache, pack, go = tmp_path / "cache", tmp_path / "pack", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(root), str(cache), str(pack), str(go), str(tmp_path / f"{i}.json")],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for i in range(4)]
    time.sleep(5)  # let them import and wait at the line
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(4)]
    assert all(r == results[0] for r in results)
    for entry in cache.iterdir():
        assert entry.suffix == ".json", entry  # no temporary file left
        json.loads(entry.read_text())
    # one complete pack: no partial file or progress folder of another packer left behind
    assert sorted(p.name for p in pack.iterdir()) == [".pack.lock", "index.json", "stats.npy", "targets.npy", "tiles.npy"]
    layout = PackedLayout(pack)
    index = layout.build_index()
    source = index.sources[7]
    assert np.array_equal(layout.read(source, None), FolderLayout(root).read(source, None))


# ---- one run per run directory ----------------------------------------------------------------
HOLDER = "import sys, time\nfrom deforest.core.safety import RunLock\nRunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n"


def test_second_run_in_a_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run(_cli(run_dir, tmp_path / "cache", "trainer.max_epochs=1"), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
        message = _one_error_line(done.stdout + done.stderr, "RunDirLocked")
        assert message.startswith(f"{run_dir} is in use by pid {holder.pid} on host {socket.gethostname()} (since ")
        assert f"lock file {run_dir / 'deforest.lock'}" in message
        # refused before Hydra wrote anything: no config, no log interleaved with the holder's
        assert sorted(p.name for p in run_dir.iterdir()) == ["deforest.lock"]
        with pytest.raises(RunDirLocked):
            RunLock(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # the holder died without releasing (SIGKILL): its lock file is left, but its flock is gone
    assert json.loads((run_dir / "deforest.lock").read_text())["pid"] == holder.pid
    with RunLock(run_dir) as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert not (run_dir / "deforest.lock").exists()


def test_checkpoint_writer_never_deletes_another_writers_temp_file(tmp_path):
    target = tmp_path / "last.ckpt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live = tmp_path / f".last.ckpt.{host_name()}.{sleeper.pid}.abc.tmp"
        other_host = tmp_path / f".last.ckpt.otherhost.{dead.pid}.abc.tmp"
        stale = tmp_path / f".last.ckpt.{host_name()}.{dead.pid}.abc.tmp"
        for temp in (live, other_host, stale):
            temp.write_bytes(b"partial")
        AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
        assert live.exists() and other_host.exists() and not stale.exists()
        assert AtomicCheckpointIO().load_checkpoint(target) == {"step": 1}
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- disk full while saving ------------------------------------------------------------------
SAVER = """
import resource, signal, sys, torch
from deforest.training.checkpoints import AtomicCheckpointIO
from deforest.core.safety import CheckpointError
target, limit = sys.argv[1], int(sys.argv[2])
io = AtomicCheckpointIO()
io.save_checkpoint({"step": 0, "w": torch.zeros(10_000)}, target)  # 40 kB: fits
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    io.save_checkpoint({"step": 1, "w": torch.zeros(2_000_000)}, target)  # 8 MB: does not fit
except CheckpointError as err:
    print(err)
    sys.exit(3)
"""


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode == 0
    return ok


def test_disk_full_while_saving_names_the_directory_and_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC where the test may mount a 1 MiB tmpfs (root with CAP_SYS_ADMIN); otherwise a
    real file-size limit (RLIMIT_FSIZE, in a subprocess), where the kernel refuses the write with
    EFBIG: both are the file system refusing a write, which the writer must survive alike."""
    folder = tmp_path / "small"
    tmpfs = _can_mount_tmpfs(folder)
    try:
        target = folder / "last.ckpt"
        folder.mkdir(exist_ok=True)
        done = subprocess.run([sys.executable, "-c", SAVER, str(target), "0" if tmpfs else str(1_000_000)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        reason = "No space left on device" if tmpfs else "File too large"
        assert done.returncode == 3, done.stdout + done.stderr
        assert done.stdout.strip() == (f"{folder}: no room to save last.ckpt ({reason}); the previous one is intact. "
                                       f"Free space there, or write the run elsewhere (hydra.run.dir=...)")
        assert AtomicCheckpointIO().load_checkpoint(target)["step"] == 0  # the previous checkpoint, intact
        assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no temporary file left
    finally:
        if tmpfs:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_disk_full_during_training_is_one_line_and_leaves_last_ckpt_intact(trained, tmp_path):
    """Through ``deforest-train``: the run resumes from its last.ckpt and its next save hits a
    file-size limit (RLIMIT_FSIZE, half the checkpoint's size: logs and configs stay under it).
    A tmpfs filled to the brim would also refuse the logs' writes, so the limit is the honest tool here."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run_dir / "checkpoints")
    last = run_dir / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    limit = last.stat().st_size // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    cmd = _cli(run_dir, trained / "cache", *SHORT, f"data.root={trained / 'data'}", "ckpt_path=auto",
               "trainer.max_epochs=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1", "test=false",
               "model.scheduler=null", "callbacks.last_checkpoint.every_n_train_steps=1")  # last.ckpt is saved first
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=limited,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    message = _one_error_line(done.stdout + done.stderr, "CheckpointError")
    assert message.startswith(f"{run_dir / 'checkpoints'}: no room to save last.ckpt (File too large); the previous one is intact")
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.suffix == ".tmp"]


# ---- config values ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,message",
    [
        ("data.val_fraction=1.5", r"data\.val_fraction=1\.5 must be < 1"),
        ("data.test_fraction=-0.1", r"data\.test_fraction=-0\.1 must be >= 0"),
        ("trainer.max_epochs=-3", r"trainer\.max_epochs=-3 must be >= 1 \(or -1: no limit\)"),
        ("trainer.max_epochs=0", r"trainer\.max_epochs=0 must be >= 1"),
        ("loss.scheme=inverse_cnt", r"loss\.scheme='inverse_cnt' must be one of \[.*\] \(did you mean 'inverse_count'\?\)"),
        ("model.backbone=resnet81", r"model\.backbone='resnet81' must be one of \[.*\] \(did you mean 'resnet18'\?\)"),
        ("data.on_bad_tile=skp", r"data\.on_bad_tile='skp' must be one of \['error', 'skip'\] \(did you mean 'skip'\?\)"),
        ("model.dropout=1.2", r"model\.dropout=1\.2 must be < 1"),
    ],
)
def test_out_of_range_values_fail_first_naming_the_key(train_config, tmp_path, override, message):
    cfg = train_config([override, f"data.root={tmp_path / 'no-such-folder'}"])  # indexing would fail differently
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^invalid config: {message}"):
        train(cfg)
    assert time.monotonic() - started < 1.0
    assert not (tmp_path / "cache").exists()


def test_fractions_must_leave_a_training_share(train_config, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.val_fraction=0\.6 and data\.test_fraction=0\.5 must leave a training share"):
        train(train_config(["data.val_fraction=0.6", "data.test_fraction=0.5"]))


def test_unbounded_epochs_warn_loudly(train_config, caplog):
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs=-1 \(no limit\) leaves model\.scheduler \(OneCycleLR\) no total_steps"):
        check_train_config(train_config(["trainer.max_epochs=-1"]))
    with caplog.at_level(logging.WARNING):
        check_train_config(train_config(["trainer.max_epochs=-1", "model.scheduler=null"]))
    assert "trainer.max_epochs=-1: NO EPOCH LIMIT" in caplog.text
    caplog.clear()
    check_train_config(train_config(["trainer.max_epochs=-1", "+trainer.max_steps=50"]))  # bounded by steps
    assert "NO EPOCH LIMIT" not in caplog.text


# ---- a scene smaller than one window ---------------------------------------------------------
def _crop(scene: Path, dest: Path, height: int, width: int) -> Path:
    with rasterio.open(scene) as src:
        window = Window(300, 300, width, height)
        profile = {**src.profile, "width": width, "height": height, "transform": src.window_transform(window)}
        with rasterio.open(dest, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return dest


@pytest.mark.parametrize("shape", [(20, 20), (20, 300), (300, 31)], ids=["small", "thin", "narrow"])
@pytest.mark.parametrize("full_resolution", [False, True])
def test_scene_smaller_than_one_window_is_refused(scenes_root, tmp_path, shape, full_resolution):
    from deforest.mapping.predict import load_classifier, predict_scene
    from deforest.mapping.scene import Scene
    from tests.mapping.test_predict import save_untrained

    model, spec = load_classifier(save_untrained(tmp_path / "rgb.ckpt", "multiclass", ["land", "water"], bands=3, tile=32))
    scene_path = _crop(scenes_root / "landsat7-bahamas" / "RGB.byte.tif", tmp_path / "crop.tif", *shape)
    out = tmp_path / "map.tif"
    with Scene(scene_path) as scene, pytest.raises(
        TileError, match=rf"crop\.tif: is {shape[0]}x{shape[1]} pixels, smaller than one 32x32 window"
    ):
        predict_scene(model, spec, scene, out, full_resolution=full_resolution)
    assert not out.exists()
