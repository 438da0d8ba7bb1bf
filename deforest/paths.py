"""Where the shipped data are, whichever directory a command runs from.

``paths.data_dir`` is ``DEFOREST_DATA_DIR`` when set, else the ``data/`` folder of the
repository checkout the package runs from (an editable install), else ``./data``. An
installed wheel carries no data: then the error names ``data.root`` and ``DEFOREST_DATA_DIR``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
RESOLVER = "deforest_data_dir"


def shipped_data_dir(package_dir: Path = PACKAGE_DIR) -> str:
    """``<checkout>/data`` beside the package when it exists, else ``data`` in the working directory."""
    checkout = package_dir.parent / "data"
    return str(checkout if checkout.is_dir() else Path("data").resolve())


def register_resolver() -> None:
    """``${deforest_data_dir:}`` for the config (conf/paths/default.yaml)."""
    OmegaConf.register_new_resolver(RESOLVER, shipped_data_dir, replace=True)
