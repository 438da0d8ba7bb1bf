"""The wheel carries the Hydra config, so a non-editable install (the container) works."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_every_config(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )
    wheel = next(tmp_path.glob("deforest-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"deforest/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")
               if "local" not in p.relative_to(REPO / "conf").parts}
    assert configs and configs <= names, sorted(configs - names)
    assert "deforest/conf/debug/fdr.yaml" in names and not any(n.startswith("deforest/conf/local/") for n in names)
    assert "deforest/cli/train.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "deforest-train = deforest.cli.train:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
