"""Output folders that refuse writes, for real: a small tmpfs that fills up after the checkpoints
are written (while the report and the records are written), and a read-only output folder for
``deforest-train`` and ``deforest-predict``. Each ends in one line, exit status 2, naming the file
or folder, and leaves no half-written file that looks complete.

The file systems are real: a tmpfs mounted inside a user and mount namespace
(``unshare --user --map-root-user --mount``), which needs no privilege on Linux (root or not) and
is gone when the command ends. Where the kernel forbids such namespaces the tests skip, saying why.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from tests.cli.test_cli_faults import _checkpoint, _folder

REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "data" / "scenes" / "landsat7-bahamas" / "RGB.byte.tif"
# a short real run that writes checkpoints, tests the best one and writes the report
SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "++model.width=8",
         "model.tta=false", "data.num_workers=0", "trainer.enable_progress_bar=false"]
# mount a tmpfs at $1 (read-only with $2=ro), run the command that follows in the namespace, list
# what it left on the tmpfs (size and path of each file) in $3, which lies outside it, and exit as the command did
_MOUNT = ('mount -t tmpfs -o size=64m tmpfs "$1" || exit 99; if [ "$2" = ro ]; then mount -o remount,ro "$1" || exit 99; fi; '
          'mount_point=$1 listing=$3; shift 3; "$@"; rc=$?; find "$mount_point" -type f -printf "%s %p\\n" > "$listing"; exit $rc')


def _namespaces_work(where: Path) -> str | None:
    """``None`` when a tmpfs can be mounted in a user+mount namespace here, else why not."""
    if not shutil.which("unshare"):
        return "no unshare command (util-linux)"
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _MOUNT, "sh", str(where), "ro",
                           os.devnull, "true"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here: {done.stderr.strip()}"
    return None


def _run_on_tmpfs(mount: Path, cmd: list[str], readonly: bool = False, env: dict | None = None) -> tuple[int, str, dict[str, int]]:
    """``cmd`` with a fresh 64 MiB tmpfs at ``mount`` (read-only with ``readonly``): its exit
    status, everything it printed, and the files it left there (path relative to ``mount`` -> size)."""
    reason = _namespaces_work(mount.parent / "probe")
    if reason:
        pytest.skip(reason)
    mount.mkdir(parents=True, exist_ok=True)
    listing = mount.parent / "listing.txt"
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _MOUNT, "sh", str(mount),
                           "ro" if readonly else "rw", str(listing), *cmd], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode != 99, done.stderr
    left = {}
    for row in listing.read_text().splitlines():
        size, path = row.split(" ", 1)
        left[str(Path(path).relative_to(mount))] = int(size)
    return done.returncode, done.stdout + done.stderr, left


def _one_line(output: str, kind: str) -> str:
    """The single ``<kind>: ...`` line of a refused command (no traceback, no logging error)."""
    assert "Traceback" not in output and "--- Logging error ---" not in output, output[-4000:]
    lines = [line.split(f"{kind}: ", 1)[1] for line in output.splitlines() if f"{kind}: " in line]
    assert len(lines) == 1, output[-4000:]
    return lines[0]


class FillDisk(pl.Callback):
    """Once the best checkpoint is tested (the checkpoints are written), fills the file system of
    the run directory to the last byte: what follows, the report and the records, finds it full."""

    def __init__(self, where: str) -> None:
        self.where = Path(where)

    def on_test_end(self, trainer, pl_module) -> None:
        assert any((self.where / "checkpoints").glob("*.ckpt")), "no checkpoint before the disk filled"
        with open(self.where / "filler", "wb", buffering=0) as handle:
            for size in (1 << 20, 4096, 1):  # down to the last byte the file system gives
                chunk = b"\0" * size
                while True:
                    try:
                        handle.write(chunk)
                    except OSError as err:
                        assert err.errno == errno.ENOSPC, err
                        break


@pytest.mark.slow
def test_disk_full_while_writing_the_report_is_one_line_and_leaves_no_half_file(tmp_path, eurosat_root):
    run_dir = tmp_path / "run"
    root = _folder(tmp_path, {"eurosat": eurosat_root})
    cmd = [sys.executable, "-m", "deforest.cli.train", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
           f"data.root={root}", *SHORT, "+callbacks.fill._target_=tests.core.test_output_faults.FillDisk",
           f"+callbacks.fill.where={run_dir}"]
    rc, output, left = _run_on_tmpfs(run_dir, cmd, env={"PYTHONPATH": str(REPO)})
    assert rc == 2, output[-4000:]
    line = _one_line(output, "OutputError")
    assert re.fullmatch(rf"{re.escape(str(run_dir))}/\S+: cannot be written \(No space left on device\)", line), line
    assert "checkpoints/last.ckpt" in left and left["filler"] > 60 << 20, left  # written before the disk filled
    # no record and no report that looks complete, no temporary file left behind
    assert not {"metrics.json", "summary.md", "report.md", "report.html", "predictions.csv"} & set(left), left
    assert not [p for p in left if p.endswith(".tmp") or ".tmp." in p], left


@pytest.mark.slow
def test_read_only_run_directory_for_train_is_one_line_naming_it(tmp_path, eurosat_root):
    run_dir = tmp_path / "run"
    root = _folder(tmp_path, {"eurosat": eurosat_root})
    cmd = [sys.executable, "-m", "deforest.cli.train", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
           f"data.root={root}", *SHORT]
    rc, output, left = _run_on_tmpfs(run_dir, cmd, readonly=True)
    assert rc == 2, output[-4000:]
    line = _one_line(output, "OutputError")
    assert line == f"{run_dir}: cannot be written (Read-only file system): give hydra.run.dir= a writable folder", line
    assert left == {}


@pytest.mark.slow
def test_read_only_output_folder_for_predict_is_one_line_naming_it(tmp_path):
    maps = tmp_path / "maps"
    cmd = [sys.executable, "-m", "deforest.cli.predict", f"hydra.run.dir={tmp_path / 'run'}",
           f"ckpt_path={_checkpoint(tmp_path)}", f"scene={SCENE}", f"out={maps / 'map.tif'}", "device=cpu"]
    rc, output, left = _run_on_tmpfs(maps, cmd, readonly=True)
    assert rc == 2, output[-4000:]
    line = _one_line(output, "OutputError")
    assert line == f"{maps / 'map.tif'}: cannot be written (Read-only file system)", line
    assert left == {}


@pytest.mark.slow
def test_disk_full_while_writing_a_map_is_one_line_and_leaves_no_half_map(tmp_path):
    """GDAL writes the map through its own I/O: the refusal must still be named as a full disk."""
    maps = tmp_path / "maps"
    predict = [sys.executable, "-m", "deforest.cli.predict", f"hydra.run.dir={tmp_path / 'run'}",
               f"ckpt_path={_checkpoint(tmp_path)}", f"scene={SCENE}", f"out={maps / 'map.tif'}", "device=cpu"]
    # the tmpfs filled to the last byte before the command starts
    cmd = ["sh", "-c", f'cat /dev/zero > "{maps / "filler"}" 2>/dev/null; exec "$@"', "sh", *predict]
    rc, output, left = _run_on_tmpfs(maps, cmd)
    assert rc == 2, output[-4000:]
    line = _one_line(output, "OutputError")
    assert line == f"{maps / 'map.tif'}: cannot be written (No space left on device)", line
    assert set(left) == {"filler"}, left  # no map, no temporary file
