"""CPU threads, the oneDNN switch and determinism: each run uses the threads it is given."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from deforest.cli import OPENMP_WAIT_VARIABLES
from deforest.cli.train import train
from deforest.core.cpu import ShareCoresBetweenJobs, parallel_jobs, resolve_threads, use_onednn
from deforest.runs.build import use_cpu_settings

LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def test_threads_come_from_the_setting_then_the_variables_then_the_affinity_mask():
    assert resolve_threads(3, {"OMP_NUM_THREADS": "1"}) == 3
    assert resolve_threads(None, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "4"}) == 1
    assert resolve_threads(None, {"DEFOREST_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}) == 2
    assert resolve_threads(None, {}) == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='two' is not a positive thread count"):
        resolve_threads(None, {"OMP_NUM_THREADS": "two"})
    with pytest.raises(ValueError, match="trainer.num_threads must be >= 1"):
        resolve_threads(0)


def _hydra_config(overrides: list[str]):
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    ("given", "expected"),
    [({}, "1000"), ({"GOMP_SPINCOUNT": "300000"}, "300000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, None)],
)
def test_entry_points_cap_openmp_spinning_before_torch_loads_unless_the_user_chose(given, expected):
    # a fresh process, as a console script starts (deforest.cli.<command> imports deforest.cli
    # first): the variable is set while torch, and with it libgomp, is not loaded yet
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARIABLES} | given
    code = "import sys, os; import deforest.cli; print(os.environ.get('GOMP_SPINCOUNT')); print('torch' not in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(expected), "True"]


def test_a_parallel_local_multirun_divides_the_cores(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DEFOREST_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("deforest.core.cpu.available_cores", lambda: 8)
    assert parallel_jobs({"_target_": LOCAL}, {}, ["seed=0,1", "loss.scheme=none,focal"]) == 4
    assert parallel_jobs({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, {}, ["seed=0,1"]) == 1
    cfg = _hydra_config(["hydra/launcher=submitit_local"])
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.overrides.task = ["seed=0,1"]  # what Hydra records for `-m seed=0,1`
    ShareCoresBetweenJobs().on_multirun_start(cfg)
    assert os.environ["DEFOREST_NUM_THREADS"] == "4"
    monkeypatch.delenv("DEFOREST_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # threads given: left alone
    ShareCoresBetweenJobs().on_multirun_start(cfg)
    assert "DEFOREST_NUM_THREADS" not in os.environ


def _convolution_ops() -> set[str]:
    net = torch.nn.Conv2d(4, 8, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        net(torch.rand(16, 4, 16, 16))
    return {e.key for e in prof.key_averages() if "convolution" in e.key}


def test_onednn_switch_decides_which_kernels_run_convolutions(train_config):
    before = torch.backends.mkldnn.enabled
    try:
        use_cpu_settings(train_config(["trainer.onednn=false"]).trainer)
        assert torch.backends.mkldnn.enabled is False
        assert "aten::mkldnn_convolution" not in _convolution_ops()
        use_onednn(True)
        if torch.backends.mkldnn.is_available():
            assert "aten::mkldnn_convolution" in _convolution_ops()
    finally:
        torch.backends.mkldnn.enabled = before


def test_two_runs_with_the_same_seed_and_threads_give_identical_metrics(train_config, tmp_path):
    results = []
    for run in ("a", "b"):
        cfg = train_config(["trainer.max_epochs=2", "+trainer.limit_train_batches=4", "trainer.num_threads=1",
                            f"paths.output_dir={tmp_path / run}", "report.enabled=false"])
        assert cfg.trainer.deterministic == "warn"
        train(cfg)
        results.append(json.loads((tmp_path / run / "metrics.json").read_text()))
    numbers = [{k: v for k, v in r.items() if k.startswith(("test/", "val/"))} for r in results]
    assert numbers[0] == numbers[1] and "test/accuracy" in numbers[0]
