"""benchmarks/run.py --quick runs from the repository and writes every named measure (no timing asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NAMES = {
    "loader_vs_torchgeo", "loader_vs_rasterio", "packed_vs_torchgeo", "packed_vs_memcpy",
    "weighting_step_overhead", "predict_vs_forward", "predict_rss_8192_vs_2048",
    "stream_vs_packed", "index_s_per_1k_patches", "pack_second_start_s",
}
#: rows that explain a goal's figure and have no goal of their own
CONTEXT = {"stream_first_pass_vs_packed", "stream_uncached_vs_packed", "stream_uncached_vs_s3_get",
           "weighting_step_paired"}


@pytest.mark.slow
def test_quick_benchmark_writes_every_measure(tmp_path):
    out = tmp_path / "latest.json"
    cmd = [sys.executable, "benchmarks/run.py", "--quick", "--out", str(out), "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert NAMES <= set(results)
    for name in NAMES:
        row = results[name]
        assert row["value"] > 0 and row["baseline"] > 0, (name, row)
        assert math.isclose(row["ratio"], row["value"] / row["baseline"]), (name, row)
        assert row["goal"].split()[0] in (">=", "<=") and isinstance(row["met"], bool)
    for name in CONTEXT:
        assert results[name]["ratio"] > 0 and results[name]["goal"] is None and results[name]["met"] is None
    assert "| stream_uncached_vs_s3_get |" in done.stdout and "| context | - |" in done.stdout
    assert results["_run"]["default_epoch_seconds"] > 0
    assert "| loader_vs_torchgeo |" in done.stdout
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


@pytest.mark.slow
def test_cpu_threads_benchmark_quick_writes_every_measure(tmp_path):
    """benchmarks/cpu_threads.py --quick: real deforest-tile and deforest-train processes, the
    concurrency and oneDNN rows in the table and the JSON (no timing asserted)."""
    out = tmp_path / "cpu_threads.json"
    cmd = [sys.executable, "benchmarks/cpu_threads.py", "--quick", "--out", str(out), "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["small_tiles"]["tiles"] == 1064  # 16 px tiles, stride 8, over the 235 x 318 px scene
    for ratio in (results["concurrency"]["ratio_default_threads"], results["concurrency"]["ratio_split_threads"],
                  results["small_tiles"]["native_vs_onednn"], results["eurosat"]["native_vs_onednn"]):
        assert ratio > 0
    assert [len(s) for s in results["concurrency"]["two_copies_split_threads"]["epoch_seconds"]] == [2, 2]
    assert "| + one copy, trainer.num_threads=" in done.stdout
