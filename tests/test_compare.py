"""A real multirun over loss schemes and seeds, summarised by deforest-compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deforest.cli.compare import main as compare_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multirun_then_compare(tmp_path: Path, capsys):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "deforest.cli.train", "-m",
        "loss.scheme=none,inverse_count", "seed=0,1",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "model.width=8", "model.tta=false",
        "data.imbalance={Forest:1.0,*:0.3}", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'c'}",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    compare_main([str(sweep), "--rare", "2"])
    assert "comparison.md" in capsys.readouterr().out

    table = pd.read_csv(sweep / "comparison.csv")
    assert table["loss.scheme"].tolist() == ["inverse_count", "none"]
    assert table["seeds"].tolist() == [2, 2]
    train_counts = json.loads((sweep / "0" / "class_distribution.json").read_text())["train"]
    assert train_counts["Forest"] == 22 and max(v for k, v in train_counts.items() if k != "Forest") < 22
    rare = sorted(train_counts, key=lambda c: (train_counts[c], c))[:2]
    for scheme, row in table.set_index("loss.scheme").iterrows():
        jobs = [
            json.loads((d / "metrics.json").read_text())
            for d in sorted(sweep.iterdir())
            if d.is_dir() and f"loss.scheme={scheme}" in (d / ".hydra" / "overrides.yaml").read_text()
        ]
        assert len(jobs) == 2
        f1 = [j["test/f1_macro"] for j in jobs]
        assert row["test/f1_macro mean"] == pytest.approx(np.mean(f1))
        assert row["test/f1_macro std"] == pytest.approx(np.std(f1))
        recall = [j[f"test/recall/{rare[0]}"] for j in jobs]
        assert row[f"test/recall/{rare[0]} mean"] == pytest.approx(np.mean(recall))
    markdown = (sweep / "comparison.md").read_text()
    assert "| inverse_count | mean | 2 |" in markdown and rare[0] in markdown
