"""deforest-compare: jobs grouped by every setting that differs, on a real multirun and on
job directories holding real composed configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, compose_train_config


def _compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deforest.cli.compare", *args, f"hydra.run.dir={cwd / 'compare-run'}"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def _fake_job(root: Path, num: int, overrides: list[str], f1: float) -> None:
    """A finished job directory as deforest-train leaves it: the composed config, the overrides, metrics."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    cfg = compose_train_config(job, overrides)
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (job / "metrics.json").write_text(json.dumps({"test/f1_macro": f1, "test/accuracy": f1, "test/recall/a": f1}))
    (job / "class_distribution.json").write_text(json.dumps({"train": {"a": 1, "b": 5}}))


def test_compare_groups_by_every_setting_that_differs(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [
        (["model.width=8", "seed=0"], 0.5), (["model.width=8", "seed=1"], 0.7),
        (["model.width=16", "seed=0"], 0.6), (["model.width=16", "loss.scheme=none", "seed=0"], 0.2),
    ]
    for num, (overrides, f1) in enumerate(jobs):
        _fake_job(sweep, num, overrides, f1)
    done = _compare(f"dirs=[{sweep}]", "rare=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(sweep / "comparison.csv")
    # the width and the scheme differ between jobs, the seed is what each group averages over
    assert list(table.columns[:3]) == ["loss.scheme", "model.width", "jobs"]
    rows = {(r["loss.scheme"], int(r["model.width"])): r for _, r in table.iterrows()}
    # the default loss.scheme is auto (inverse_count for this multi-class head)
    assert set(rows) == {("auto", 8), ("auto", 16), ("none", 16)}
    assert rows[("auto", 8)]["jobs"] == 2
    assert rows[("auto", 8)]["test/f1_macro mean"] == pytest.approx(0.6)
    assert rows[("auto", 8)]["test/f1_macro std"] == pytest.approx(0.1)
    assert "| loss.scheme | model.width | jobs |" in done.stdout


def test_compare_names_a_misspelt_argument(tmp_path):
    done = _compare("dirz=[x]", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["compare.py: dirz is not a config key: did you mean dirs? (a new key needs +dirz=...)"]


@pytest.mark.slow
def test_multirun_then_compare(tmp_path: Path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "deforest.cli.train", "-m",
        "loss.scheme=none,inverse_count", "seed=0,1",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "model.width=8", "model.tta=false",
        "data.imbalance={Forest:1.0,*:0.3}", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'c'}",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    compared = _compare(f"dirs={sweep}", "rare=2", cwd=tmp_path)
    assert compared.returncode == 0 and "comparison" in compared.stdout, compared.stderr[-2000:]

    table = pd.read_csv(sweep / "comparison.csv")
    assert table["loss.scheme"].tolist() == ["inverse_count", "none"]
    assert table["jobs"].tolist() == [2, 2]
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
    assert "| inverse_count | 2 |" in markdown and rare[0] in markdown


def test_multilabel_ece_of_binary_forecasts():
    from deforest.runs.compare import expected_calibration_error

    # bins of 0.1: 0.05 (a negative: gap 0.05), 0.15 (a positive: 0.85), 0.9 and 0.95 (both
    # positive: mean 0.925 against 1, over two forecasts 0.15): (0.05 + 0.85 + 0.15) / 4
    probs = np.array([[0.05, 0.15], [0.95, 0.9]])
    targets = np.array([[0, 1], [1, 1]])
    assert expected_calibration_error(probs, targets, bins=10) == pytest.approx(0.2625)
    assert expected_calibration_error(targets.astype(float), targets) == 0.0


@pytest.mark.slow
def test_imbalance_multilabel_experiment_then_compare(tmp_path: Path, eurosat_root):
    """The experiment as docs/imbalance.md runs it, shrunk: the long-tail benchmark built on first use,
    two schemes and the balanced sampler, one seed, then the comparison of the three."""
    sweep = tmp_path / "sweep"
    common = [
        "experiment=imbalance_multilabel", "data.layout.sizes={train:96,val:32,test:48}", "seed=0",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "model.width=8",
        f"paths.cache_dir={tmp_path / 'c'}",  # the report stays on: its predictions.csv gives the ECE
    ]
    for name, args in (("a", ["loss.scheme=none,pos_weight", "data.sampler=shuffle"]),
                       ("b", ["loss.scheme=none", "data.sampler=balanced"])):
        done = subprocess.run([sys.executable, "-m", "deforest.cli.train", "-m", *common, *args,
                               f"hydra.sweep.dir={sweep / name}"], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    compared = _compare(f"dirs=[{sweep / 'a'},{sweep / 'b'}]", "rare=3", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-2000:]

    table = pd.read_csv(sweep / "a" / "comparison.csv", keep_default_na=False)
    assert list(table.columns[:3]) == ["data.sampler", "loss.scheme", "jobs"]
    assert [(r["data.sampler"], r["loss.scheme"]) for _, r in table.iterrows()] == [
        ("balanced", "none"), ("shuffle", "none"), ("shuffle", "pos_weight")]
    counts = json.loads((sweep / "a" / "0" / "class_distribution.json").read_text())["train"]
    rare = sorted(counts, key=lambda c: (counts[c], c))[:3]
    record = json.loads((tmp_path / "c" / "longtail" / "eurosat-s0-32px" / "benchmark.json").read_text())
    assert set(rare) == set(record["tail_order"][-3:]) or counts[rare[-1]] <= counts[record["tail_order"][-4]]
    metrics = json.loads((sweep / "b" / "0" / "metrics.json").read_text())
    row = table.iloc[0]
    assert row["test/map mean"] == pytest.approx(metrics["test/map"])
    assert row["test/f1_macro mean"] == pytest.approx(metrics["test/f1_macro"])
    assert row["test/f1_rare mean"] == pytest.approx(np.mean([metrics[f"test/f1/{c}"] for c in rare]))
    assert row[f"test/f1/{rare[0]} mean"] == pytest.approx(metrics[f"test/f1/{rare[0]}"])
    # the run's own ECE (after its calibration) and the one compare computes from its
    # predictions.csv agree: two implementations of one 15-bin ECE over label-tile pairs
    assert 0.0 < row["test/ece mean"] < 1.0 and row["test/ece mean"] == pytest.approx(metrics["test/ece"])
    from deforest.runs.compare import predictions_ece

    assert predictions_ece(sweep / "b" / "0") == pytest.approx(metrics["test/ece"], abs=1e-6)
    markdown = (sweep / "a" / "comparison.md").read_text()
    assert "| balanced | none | 1 |" in markdown and "test/f1_rare" in markdown and "test/ece" in markdown


def test_compare_groups_by_the_keys_given(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [
        (["loss.scheme=none", "model.width=8", "seed=0"], 0.5), (["loss.scheme=none", "model.width=16", "seed=1"], 0.7),
        (["loss.scheme=focal", "model.width=16", "seed=0"], 0.2),
    ]
    for num, (overrides, f1) in enumerate(jobs):
        _fake_job(sweep, num, overrides, f1)
    done = _compare(f"dirs=[{sweep}]", "rare=1", "group=[loss.scheme]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(sweep / "comparison.csv")
    # the width differs too, but only the scheme groups: both widths pool into one row
    assert list(table.columns[:2]) == ["loss.scheme", "jobs"]
    assert table.set_index("loss.scheme")["jobs"].to_dict() == {"focal": 1, "none": 2}
    assert table.set_index("loss.scheme")["test/f1_macro mean"]["none"] == pytest.approx(0.6)
