"""Where the shipped data are, whichever directory a command runs from.

``paths.data_dir`` is ``DEFOREST_DATA_DIR`` when set, else the ``data/`` folder of the
repository checkout the package runs from (an editable install), else ``./data``. An
installed wheel carries no data: then the error names ``data.root`` and ``DEFOREST_DATA_DIR``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from omegaconf import OmegaConf

#: the installed ``deforest`` package (this file is ``deforest/core/paths.py``)
PACKAGE_DIR = Path(__file__).resolve().parents[1]
RESOLVER = "deforest_data_dir"
RUN_ID_RESOLVER = "deforest_run_id"
#: this process's suffix of default run directories: drawn once, so every resolution of
#: ``hydra.run.dir`` in one command (Hydra's, the run-lock callback's, DDP's children's
#: command line) names the same directory
RUN_ID = secrets.token_hex(3)


def shipped_data_dir(package_dir: Path = PACKAGE_DIR) -> str:
    """``<checkout>/data`` beside the package when it exists, else ``data`` in the working directory."""
    checkout = package_dir.parent / "data"
    return str(checkout if checkout.is_dir() else Path("data").resolve())


def run_id() -> str:
    """Six hex digits, the same for the whole process (:data:`RUN_ID`)."""
    return RUN_ID


def register_resolver() -> None:
    """``${deforest_data_dir:}`` (conf/paths/default.yaml) and ``${deforest_run_id:}``
    (conf/hydra/default.yaml) for the config; the run id is cached in each config, so a
    config handed to another process (a launcher's job) keeps its directory."""
    OmegaConf.register_new_resolver(RESOLVER, shipped_data_dir, replace=True)
    OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id, replace=True, use_cache=True)
