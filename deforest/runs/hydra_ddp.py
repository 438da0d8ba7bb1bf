"""Keep Lightning's DDP child processes inside the Hydra job that started them.

Lightning's subprocess launcher (``strategy=ddp``) starts ranks > 0 by re-running this
process's command line with ``hydra.run.dir=<HydraConfig run.dir>`` appended. Under a
multirun that command line still says ``-m seed=0,1`` and ``run.dir`` is not the job's
directory, so every child would start a sweep of its own and write new run directories and
checkpoints. While a job runs, :func:`ddp_children_join_this_job` makes the re-run command
this one job: its own overrides, no ``-m``, and ``run.dir`` pinned to the job's output dir.
Afterwards it tears the process group down and drops the rendezvous variables Lightning
exported, so the next job of a sweep launches its own processes instead of joining the old ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

# the command-line flags that choose the config and so must reach the children too
_CONFIG_FLAGS = {"config_path": "--config-path", "config_name": "--config-name", "config_dir": "--config-dir"}
# what Lightning's launcher exports in this process; left set, the next job would think it is a child
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def job_command_line(argv: list[str], task_overrides: list[str]) -> list[str]:
    """``argv`` reduced to one job: its config flags and ``task_overrides``, without ``-m``."""
    args, _ = get_args_parser().parse_known_args(argv[1:])
    flags = [part for key, flag in _CONFIG_FLAGS.items() if getattr(args, key) for part in (flag, getattr(args, key))]
    return [argv[0], *flags, *task_overrides]


@contextmanager
def ddp_children_join_this_job() -> Iterator[None]:
    """Within the block, a DDP re-launch of this process runs this job in this job's directory."""
    # SLURM/torchrun ranks and Lightning's own children already carry a rank: nothing to pin.
    if not HydraConfig.initialized() or "LOCAL_RANK" in os.environ:
        yield
        return
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_run_dir = list(sys.argv), hydra_cfg.run.dir
    saved_env = {name: os.environ.get(name) for name in _LAUNCH_ENV}
    sys.argv = job_command_line(sys.argv, list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved_env.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
