"""What a Lightning + lightning-hydra-template user expects of the commands: the default run
from any directory, a debug config group, local overrides, and one line for a misspelt key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from deforest.cli.overrides import override_problem
from deforest.core.errors import DatasetError
from deforest.core.paths import shipped_data_dir
from deforest.data.layouts import FolderLayout
from deforest.runs.build import build_trainer
from tests.conftest import REPO

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DEFOREST_NUM_THREADS", "DEFOREST_DATA_DIR")


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def test_default_run_works_from_another_directory_with_the_cores_it_is_given(tmp_path):
    """A real deforest-train started outside the repository, confined to one core: it finds the
    shipped sample, logs under its own working directory and runs one thread."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    cmd = [sys.executable, "-m", "deforest.cli.train", "trainer.fast_dev_run=true", "model.width=8",
           "model.tta=false", "report.enabled=false", f"paths.cache_dir={tmp_path / 'c'}"]
    core = min(os.sched_getaffinity(0))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1 and "test/accuracy" in json.loads((runs[0] / "metrics.json").read_text())
    summary = (runs[0] / "summary.md").read_text()
    assert f"`{REPO / 'data' / 'eurosat-ms'}`" in summary
    assert "CPU threads: 1 (of 1 cores this process may use)" in done.stderr + done.stdout


def test_data_dir_is_the_variable_else_the_checkout_else_an_error_naming_both(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFOREST_DATA_DIR", str(tmp_path / "elsewhere"))
    assert _compose([]).data.root == str(tmp_path / "elsewhere" / "eurosat-ms")
    monkeypatch.delenv("DEFOREST_DATA_DIR")
    assert _compose([]).data.root == str(REPO / "data" / "eurosat-ms")
    # an installed wheel: no data/ beside the package, none in the working directory
    monkeypatch.chdir(tmp_path)
    wheel_data = shipped_data_dir(tmp_path / "site-packages" / "deforest")
    assert wheel_data == str(tmp_path / "data")
    with pytest.raises(DatasetError, match=r"is not a directory: give data.root=DIR, or set DEFOREST_DATA_DIR"):
        FolderLayout(Path(wheel_data) / "eurosat-ms")


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("fdr", {"fast_dev_run": 1}),
        ("overfit", {"overfit_batches": 2, "max_epochs": 30}),
        ("limit", {"limit_train_batches": 3, "limit_val_batches": 2, "limit_test_batches": 2, "max_epochs": 3}),
        ("profiler", {"max_epochs": 1}),
    ],
)
def test_debug_group_reaches_the_trainer(option, expected, tmp_path):
    cfg = _compose([f"debug={option}", f"paths.output_dir={tmp_path}", "logger=csv"])
    assert cfg.task_name == "debug"
    trainer = build_trainer(cfg)
    for name, value in expected.items():
        assert getattr(trainer, name) == value, name
    if option == "profiler":
        assert type(trainer.profiler).__name__ == "SimpleProfiler"
    if option == "overfit":
        assert list(cfg.data.augment) == [] and cfg.test is False


def test_fast_dev_run_is_a_key_of_the_trainer():
    assert _compose(["trainer.fast_dev_run=true"]).trainer.fast_dev_run is True
    assert override_problem("train", ["+trainer.fast_dev_run=true"]) == (
        "trainer.fast_dev_run is already a config key: set it without the + (trainer.fast_dev_run=...)")


def test_local_overrides_are_merged_last_and_ignored_by_git():
    local = REPO / "conf" / "local" / "default.yaml"
    assert not local.exists(), "a developer's conf/local/default.yaml would change this test"
    local.write_text("# @package _global_\ntrainer:\n  num_threads: 3\nseed: 7\n")
    try:
        cfg = _compose(["experiment=imbalance"])
        assert cfg.trainer.num_threads == 3 and cfg.seed == 7
        assert _compose(["seed=1"]).seed == 1  # the command line still wins
        ignored = subprocess.run(["git", "check-ignore", "-q", str(local)], cwd=REPO)
        assert ignored.returncode == 0
    finally:
        local.unlink()
    assert _compose([]).seed == 42


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["model.widht=8"], "model.widht is not a config key: did you mean model.width? (a new key needs +model.widht=...)"),
        (["-m", "seed=0,1", "trainer.max_epoch=2"], "trainer.max_epoch is not a config key: did you mean trainer.max_epochs?"),
        (["model=resnet19"], "model=resnet19 is not an option of model: did you mean model=resnet18?"),
        (["debug=limits"], "debug=limits is not an option of debug: did you mean debug=limit?"),
        (["debug=fast"], "debug=fast is not an option of debug: choose from fdr, limit, overfit, profiler"),
    ],
)
def test_a_misspelt_key_or_option_names_the_closest_valid_one(args, line):
    assert override_problem("train", args).startswith(line)


def test_a_misspelt_key_ends_the_command_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "deforest.cli.train", "trainer.max_epoch=2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "train.py: trainer.max_epoch is not a config key: did you mean trainer.max_epochs? "
        "(a new key needs +trainer.max_epoch=...)"
    ]
    assert not (tmp_path / "logs").exists()
