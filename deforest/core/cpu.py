"""CPU compute settings of a process: how many threads, and whether convolutions use oneDNN.

Two runs on one machine that each start as many threads as it has cores thrash: every
OpenMP barrier waits for a thread the other run has descheduled. So a run takes the
threads it is given (``trainer.num_threads``, else the standard variables, else the cores
this process may run on), and a parallel Hydra multirun shares the cores between its jobs
(:class:`ShareCoresBetweenJobs`). See docs/cpu.md.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from deforest.core.errors import ConfigError

log = logging.getLogger(__name__)

# read in this order when trainer.num_threads is not set; DEFOREST_NUM_THREADS is what a
# parallel multirun hands its jobs
THREAD_VARIABLES = ("DEFOREST_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroups cpusets, SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(requested: int | None, environ: Mapping[str, str] = os.environ) -> int:
    """``requested``, else the first of :data:`THREAD_VARIABLES` that is set, else every core.

    A value that is not a positive integer is a :class:`ConfigError` naming it (not a silent default).
    """
    if requested is not None:
        if int(requested) < 1:
            raise ConfigError(f"trainer.num_threads must be >= 1, not {requested}")
        return int(requested)
    for name in THREAD_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{name}={value!r} is not a positive thread count")
            return int(value)
    return available_cores()


def use_threads(requested: int | None) -> int:
    """Set torch's intra-op threads (and inter-op threads, once per process) and return the count."""
    # here, not at the top: every command loads ShareCoresBetweenJobs, deforest-predict without torch too
    import torch

    threads = resolve_threads(requested)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable before the first parallel work of the process
        pass
    log.info("CPU threads: %d (of %d cores this process may use)", torch.get_num_threads(), available_cores())
    return threads


def use_onednn(enabled: bool) -> None:
    """Switch oneDNN (``torch.backends.mkldnn``) convolutions for this process; off, PyTorch's
    native kernels run them (``trainer.onednn``, measured in benchmarks/cpu_threads.py)."""
    import torch

    if torch.backends.mkldnn.enabled != bool(enabled):
        log.info("oneDNN convolutions %s (trainer.onednn=%s)", "on" if enabled else "off", enabled)
    torch.backends.mkldnn.enabled = bool(enabled)


def sweep_size(overrides: list[str]) -> int | None:
    """Jobs of a basic sweep over ``overrides`` (product of the value lists); ``None`` for
    sweeps that are not lists (intervals for Optuna)."""
    jobs = 1
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            try:
                jobs *= len(list(override.sweep_string_iterator()))
            except Exception:  # interval sweeps have no fixed list of values
                return None
    return jobs


def parallel_jobs(launcher: Mapping[str, Any], sweeper: Mapping[str, Any], overrides: list[str]) -> int:
    """How many jobs of this multirun run at once on this machine."""
    target = str(launcher.get("_target_", ""))
    jobs = sweep_size(overrides) or int(sweeper.get("n_jobs") or 1)
    if target.endswith("submitit_launcher.LocalLauncher"):  # every job at once
        return jobs
    if "joblib" in target.lower():
        n_jobs = int(launcher.get("n_jobs") or 1)
        return min(jobs, available_cores() if n_jobs < 0 else n_jobs)
    return 1  # the basic launcher runs jobs one after another; SLURM jobs get their own cores


class ShareCoresBetweenJobs(Callback):
    """Hydra callback: jobs of a parallel local multirun get ``cores // parallel jobs`` threads
    each (through ``DEFOREST_NUM_THREADS``), unless threads were set some other way."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if any(os.environ.get(name) for name in THREAD_VARIABLES):
            return
        overrides = list(config.hydra.overrides.task)
        if any(item.lstrip("+").startswith("trainer.num_threads=") for item in overrides):
            return
        parallel = parallel_jobs(config.hydra.launcher, config.hydra.sweeper, overrides)
        if parallel > 1:
            threads = max(1, math.floor(available_cores() / parallel))
            os.environ["DEFOREST_NUM_THREADS"] = str(threads)
            log.info("%d jobs at once on %d cores: %d thread(s) each", parallel, available_cores(), threads)
