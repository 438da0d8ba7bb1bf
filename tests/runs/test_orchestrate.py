"""Hydra orchestration: experiments, DDP under Hydra (run dirs), sweep summaries, Optuna."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deforest.cli.train import train
from deforest.runs.hydra_ddp import job_command_line
from deforest.runs.sweeps import collect_runs

REPO = Path(__file__).resolve().parents[2]
# the *_benchmark experiments need official split files and pretrained weights: tests/models/test_weights.py
# runs them on generated split files and weights in a temporary hub cache
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if not p.stem.endswith("_benchmark"))
# a few batches of everything: each run below takes seconds
TINY = [
    "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
    "trainer.max_epochs=1", "model.width=8", "model.tta=false", "trainer.enable_progress_bar=false",
    "report.enabled=false",
]


def _deforest_train(tmp_path: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``deforest-train`` as a user runs it, logging under ``tmp_path/logs``."""
    env = {**os.environ, "DEFOREST_LOG_DIR": str(tmp_path / "logs"), "DEFOREST_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "deforest.cli.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_three_experiments_exist():
    assert {"eurosat_resnet18", "bigearthnet_resnet50", "imbalance"} <= set(EXPERIMENTS)


@pytest.mark.slow  # ResNet-18/50 steps on the CPU
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_runs_fast_dev_run(experiment, train_config, tmp_path, request):
    overrides = [f"experiment={experiment}", "trainer.fast_dev_run=true", "data.batch_size=4", "report.enabled=false"]
    if experiment.startswith("bigearthnet"):
        overrides.append(f"data.root={request.getfixturevalue('bigearthnet_root')}")
    if experiment == "imbalance_multilabel":  # the long-tail benchmark, built in tmp_path at test size
        overrides.append("data.layout.sizes={train:32,val:8,test:8}")
    if experiment == "forest_loss":  # needs the user's pairs: real Rondonia tiles with simulated clearings
        from tests.mapping.test_change import BANDS, write_pairs

        write_pairs(tmp_path / "pairs")
        overrides += [f"data.root={tmp_path / 'pairs'}", f"data.layout.band_names=[{','.join(BANDS)}]"]
    cfg = train_config(overrides)
    assert cfg.model.backbone == {"eurosat_resnet18": "resnet18", "bigearthnet_resnet50": "resnet50"}.get(
        experiment, cfg.model.backbone
    )
    metrics = train(cfg)
    key = "test/map" if experiment.startswith("bigearthnet") or experiment.endswith("multilabel") else "test/accuracy"
    assert 0.0 <= metrics[key] <= 1.0
    assert (tmp_path / "metrics.json").is_file()


def test_experiment_settings_reach_the_run(train_config, bigearthnet_root):
    ben = train_config(["experiment=bigearthnet_resnet50", f"data.root={bigearthnet_root}"])
    assert (ben.model.backbone, ben.data.layout.nomenclature, ben.data.root) == ("resnet50", 19, str(bigearthnet_root))
    imbalance = train_config(["experiment=imbalance"])
    assert imbalance.model.backbone == "small_cnn" and imbalance.data.imbalance["SeaLake"] == 0.3


def test_job_command_line_is_one_job_of_the_sweep():
    argv = ["/venv/bin/deforest-train", "-m", "--config-name", "train", "seed=0,1", "trainer=ddp_cpu"]
    assert job_command_line(argv, ["seed=1", "trainer=ddp_cpu"]) == [
        "/venv/bin/deforest-train", "--config-name", "train", "seed=1", "trainer=ddp_cpu"
    ]


def test_ddp_cpu_single_run_leaves_one_run_dir_and_one_checkpoint_set(tmp_path):
    _deforest_train(tmp_path, ["trainer=ddp_cpu", *TINY])
    runs = list((tmp_path / "logs" / "train").iterdir())
    assert [p.name for p in runs] == ["runs"]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    # rank 1 ran, and ran here: its Hydra log sits in the parent's run dir
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.slow
def test_ddp_cpu_multirun_keeps_each_job_in_its_dir_and_writes_the_summary(tmp_path):
    """Lightning re-runs the command line for rank 1; under -m that would start new sweeps."""
    _deforest_train(tmp_path, ["-m", "trainer=ddp_cpu", "seed=0,1", *TINY])
    assert [p.name for p in (tmp_path / "logs" / "train").iterdir()] == ["multiruns"]
    (sweep_dir,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert sorted(p.name for p in (sweep_dir / job / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
        assert (sweep_dir / job / "train_ddp_process_1.log").is_file()
    rows = _summary_rows(sweep_dir)
    assert [(r["job"], r["seed"], r["trainer"], r["status"]) for r in rows] == [
        ("0", "0", "ddp_cpu", "done"), ("1", "1", "ddp_cpu", "done")
    ]
    assert all(0.0 <= float(r["test/accuracy"]) <= 1.0 for r in rows)
    assert rows == [{k: str(v) for k, v in run.items()} for run in collect_runs(sweep_dir)]


def test_collect_runs_lists_a_job_without_metrics(tmp_path):
    """A job that died still gets its row, marked, instead of silently vanishing."""
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- model.backbone=resnet18\n- +trainer.max_steps=5\n")
    (tmp_path / "0" / "metrics.json").write_text('{"test/accuracy": 0.5}')
    (tmp_path / "10" / ".hydra").mkdir(parents=True)
    (tmp_path / "10" / ".hydra" / "overrides.yaml").write_text("- model.backbone=small_cnn\n")
    (tmp_path / ".submitit").mkdir()
    runs = collect_runs(tmp_path)
    assert [(r["job"], r["status"], r["model.backbone"]) for r in runs] == [
        ("0", "done", "resnet18"), ("10", "no metrics", "small_cnn")
    ]
    assert runs[0]["trainer.max_steps"] == "5" and runs[0]["test/accuracy"] == 0.5
    with pytest.raises(FileNotFoundError, match="no such multirun directory"):
        collect_runs(tmp_path / "missing")


@pytest.mark.slow
def test_optuna_search_two_trials_with_sqlite_storage(tmp_path):
    optuna = pytest.importorskip("optuna")
    # a fixed value on the command line takes the backbone out of the search (keeps it fast)
    _deforest_train(tmp_path, ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "model=small_cnn",
                               "test=false", *TINY])
    (sweep_dir,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    study = optuna.load_study(study_name="train", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(0.0 <= t.value <= 1.0 for t in study.trials)
    assert {"model.optimizer.lr", "model.optimizer.weight_decay", "loss.scheme"} <= set(study.trials[0].params)
    assert 1e-4 <= study.trials[0].params["model.optimizer.lr"] <= 1e-2
    rows = _summary_rows(sweep_dir)
    assert len(rows) == 2 and {r["model"] for r in rows} == {"small_cnn"}
    assert [float(r["val/f1_macro"]) for r in rows] == pytest.approx([t.value for t in study.trials])


def test_gpu_trainers_turn_on_the_speed_switches_and_launchers_compose(tmp_path):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        gpu = compose("train", overrides=["trainer=gpu", "model=resnet18"])
        ddp = compose("train", overrides=["trainer=ddp", "model.compile=false"])
        slurm = compose("train", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4"],
                        return_hydra_config=True)
    assert (gpu.trainer.accelerator, gpu.trainer.devices, gpu.trainer.precision, gpu.trainer.benchmark) == (
        "gpu", 1, "bf16-mixed", True
    )
    assert gpu.model.backbone == "resnet18" and gpu.model.channels_last and gpu.model.compile
    assert gpu.data.pin_memory and gpu.data.device_flips and list(gpu.data.augment) == []
    assert (ddp.trainer.devices, ddp.trainer.strategy, ddp.trainer.precision, ddp.model.compile) == (
        -1, "ddp", "bf16-mixed", False
    )
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 4
