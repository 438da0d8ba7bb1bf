"""scripts/gpu-check.sh runs on a bare, air-gapped GPU machine: only the checkout and the wheels
of scripts/gpu_payload.py's CARRIED_WHEELS travel, within a device call's 64 MiB, and nothing the
check runs imports a module of BARE_MISSING (the machine lacks them and no wheel brings them)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_payload", REPO / "scripts" / "gpu_payload.py")
gpu_payload = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_payload)

#: sitecustomize.py of the simulated bare machine: the modules it lacks cannot be imported, and the
#: project is not installed there (the editable install's finder is dropped), so deforest comes
#: from the checkout on PYTHONPATH alone. Child processes (the pack command, loader workers) inherit it.
BARE_MACHINE = """
import importlib.abc
import sys

MISSING = frozenset({missing!r})


class BareMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the bare GPU machine)", name=name)
        return None


sys.meta_path[:] = [BareMachine()] + [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
"""


def bare_machine_env(tmp_path: Path, also_missing: tuple[str, ...] = ()) -> dict[str, str]:
    site = tmp_path / "bare-machine"
    site.mkdir()
    missing = sorted({*gpu_payload.BARE_MISSING, *also_missing})
    (site / "sitecustomize.py").write_text(BARE_MACHINE.format(missing=missing))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DEFOREST_"))}
    return env | {"PYTHONPATH": str(site)}


def test_bare_machine_refuses_the_missing_modules(tmp_path):
    """The simulation itself: albumentations (installed here) and the uninstalled project are refused."""
    probe = "import importlib\nfor name in ('albumentations', 'shapely', 'deforest'):\n" \
            "    try:\n        importlib.import_module(name)\n        print(name, 'imported')\n" \
            "    except ModuleNotFoundError as err:\n        print(name, 'refused')\n"
    result = subprocess.run([sys.executable, "-c", probe], env=bare_machine_env(tmp_path), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["albumentations", "refused", "shapely", "refused", "deforest", "refused"], result.stderr


def travelling_copy(tmp_path: Path) -> Path:
    """The checkout as a device call sends it (tracked and untracked-not-ignored files)."""
    copy = tmp_path / "checkout"
    for path in gpu_payload.checkout_files(REPO):
        target = copy / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return copy


@pytest.mark.slow
def test_gpu_check_dry_run_on_a_bare_machine(tmp_path):
    """scripts/gpu-check.sh --cpu from a copy of the checkout, with BARE_MISSING refused and no
    install of the project: both entry points run (benchmarks/gpu.py --smoke with its pack
    command, scripts/gpu_check.py --cpu with the multi-label bf16 step) and one summary is written."""
    checkout, out = travelling_copy(tmp_path), tmp_path / "out"
    out.mkdir()
    env = bare_machine_env(tmp_path) | {"PYTHON": sys.executable, "OUT": str(out)}
    result = subprocess.run(["bash", "scripts/gpu-check.sh", "--cpu"], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((out / "gpu-summary.json").read_text())
    assert summary["device"] == "cpu"
    assert Path(summary["versions"]["deforest_from"]).resolve() == (checkout / "deforest").resolve()
    assert set(summary["versions"]) >= {"python", "torch", "lightning", "torchmetrics", "rasterio", "hydra", "numpy"}
    assert summary["end_to_end_tiles_per_s"] > 0 and summary["on_device_tiles_per_s"] > 0
    assert summary["ratio"] == pytest.approx(summary["end_to_end_tiles_per_s"] / summary["on_device_tiles_per_s"])
    multilabel = summary["multilabel_bf16"]
    assert multilabel["task"] == "multilabel" and multilabel["precision"] == "bf16-mixed"
    assert multilabel["val_probs_dtype"] == "float32" and multilabel["optimizer_steps"] == 1
    assert summary["train"]["steps"] == 3 and summary["train"]["end_to_end_tiles_per_s"] > 0
    # the link that maps deforest.conf for an uninstalled checkout is gone again
    assert not (checkout / "deforest" / "conf").exists()


def test_gpu_check_without_the_wheels_stops_with_one_line(tmp_path):
    """A machine that lacks the carried modules and was sent no .whl/ gets one line naming the fix."""
    checkout, out = travelling_copy(tmp_path), tmp_path / "out"
    env = bare_machine_env(tmp_path, also_missing=gpu_payload.CARRIED_MODULES) | {"PYTHON": sys.executable, "OUT": str(out)}
    result = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=checkout, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gpu-check: {sys.executable} cannot import {','.join(gpu_payload.CARRIED_MODULES)} and .whl/ holds no wheels: "
        "run scripts/gpu-wheels.sh where PyPI is reachable and carry .whl"]
    assert not (checkout / "deforest" / "conf").exists()


def test_payload_fits_a_device_call():
    """The checkout as it stands plus the carried wheels (their measured sizes, or the files in .whl/
    when gpu-wheels.sh fetched them) fit in 64 MiB."""
    rows, total = gpu_payload.payload(REPO)
    wheels = gpu_payload.wheel_files(REPO)
    if not wheels:
        total += sum(size for _, size in gpu_payload.CARRIED_WHEELS.values())
    assert total <= gpu_payload.LIMIT, f"{total:,d} bytes travel, {total - gpu_payload.LIMIT:,d} over the limit"
    data = sum(size for name, size in rows if name.startswith("data/"))
    assert data > 30 * 2**20  # the samples travel: the check trains on them


def test_dry_run_lists_the_payload_and_refuses_more_than_64_mib(tmp_path):
    """--dry-run prints every file with its size and the total, and exits 1 once the checkout is over
    the limit (a sparse untracked file of 64 MiB beside two small files)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "small.txt").write_text("x" * 100)
    (repo / ".gitignore").write_text("ignored/\n")
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_bytes(b"")
    os.truncate(repo / "ignored" / "big.bin", 2 * gpu_payload.LIMIT)  # ignored: does not travel
    script = [sys.executable, str(REPO / "scripts" / "gpu_payload.py"), "--dry-run", "--repo", str(repo)]
    fits = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "         100  small.txt" in fits.stdout.splitlines()
    assert "ignored/big.bin" not in fits.stdout
    assert fits.stdout.splitlines()[-1].startswith("gpu-payload: 109 bytes (0.0 MiB) in 2 files fits")
    (repo / "big.bin").write_bytes(b"")
    os.truncate(repo / "big.bin", gpu_payload.LIMIT)
    over = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert over.returncode == 1
    assert over.stdout.splitlines()[-1].startswith(f"gpu-payload: {gpu_payload.LIMIT + 109:,d} bytes (64.0 MiB) in 3 files is over")


def test_carried_wheels_match_what_gpu_wheels_fetches():
    """.whl/ (when present) holds exactly one wheel per carried distribution, of the listed version,
    each installable on the machine (cp312 or pure Python, x86-64 manylinux), of the size recorded
    in CARRIED_WHEELS (a wheel built here from an sdist may differ by its zip timestamps)."""
    wheels = gpu_payload.wheel_files(REPO)
    if not wheels:  # not fetched on this machine: the list itself must be consistent
        assert set(gpu_payload.BUILT_FROM_SDIST) <= set(gpu_payload.CARRIED_WHEELS)
        assert not {n.replace("-", "_") for n in gpu_payload.CARRIED_WHEELS} & set(gpu_payload.BARE_MISSING)
        return
    found = {}
    for wheel in wheels:
        name, version, *_, python, abi, platform = wheel.stem.split("-")
        found[name.lower().replace("_", "-")] = (version, wheel.stat().st_size, python, platform)
        with zipfile.ZipFile(wheel) as archive:
            assert archive.testzip() is None
    assert set(found) == set(gpu_payload.CARRIED_WHEELS)
    for name, (version, size) in gpu_payload.CARRIED_WHEELS.items():
        got_version, got_size, python, platform = found[name]
        assert got_version == version
        assert python in ("cp312", "py3") and (platform == "any" or "x86_64" in platform)
        assert got_size == size if name not in gpu_payload.BUILT_FROM_SDIST else abs(got_size - size) < 1024
